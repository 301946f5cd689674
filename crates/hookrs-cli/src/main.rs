//! The `hookrs` binary: see the hookrs-cli library ([`hookrs_cli::run`]).

use std::process::ExitCode;

/// mimalloc serves every allocation of the process, libtorch's included (the `override`
/// feature exports malloc/free from the binary): glibc's malloc either keeps freed activation
/// buffers of many sizes in its heap (a run over mixed-length prompts held twice the memory it
/// needs) or, with a fixed mmap threshold, maps and zeroes each one anew (40 % slower).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A closed stdout (`hookrs inspect c.safetensors | head`) ends the process quietly, as it
    // does for other Unix tools, instead of a panic in `println!`.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts; no handler
    // runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HOOKRS_LOG").unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .try_init();
    // the process-wide settings: the GPU backend (before any CUDA query) and the memory guard
    hook_torch::runtime::init(&hook_torch::runtime::RuntimeOptions::from_env());
    match hookrs_cli::run(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        // clap's own output (usage errors, --help, --version), printed and exited as clap does
        Err(hookrs_cli::Failure { clap: Some(e), .. }) => e.exit(),
        Err(f) => {
            eprintln!("hookrs: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
