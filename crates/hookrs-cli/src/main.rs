//! `hookrs`: extraction, activation patching and pictures from the shell.
//!
//! Exit codes: 0 ok, 2 usage (clap), 1 runtime error. Nothing is written under `--out` unless
//! the command succeeded (writes go to a temporary file renamed at the end).

mod heatmap;
mod inputs;
mod cmd_devices;
mod cmd_extract;
mod cmd_extract_chunks;
mod cmd_inspect;
mod cmd_merge;
mod cmd_patch;
mod cmd_plot;
mod cmd_sites;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Interpretability hooks for TorchScript transformers: read and edit activations, from the shell.
#[derive(Parser, Debug)]
#[command(name = "hookrs", version, about, long_about = None, after_help = "Exit codes: 0 ok; 1 runtime error (the model, the data or a file said no); 2 usage error (a missing or unknown flag, or a flag value that does not parse: bad JSON in --input-ids or --token-groups, a bad --shard, --chunk-size, --device or --extract name).")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every hookable component, grouped by layer, with the model description.
    Sites {
        /// A TorchScript model exported by `cargo xtask export`.
        model: PathBuf,
        /// Print JSON instead of a listing.
        #[arg(long)]
        json: bool,
    },
    /// The devices this build can run on (CPU, CUDA backend and GPUs), and why not when it cannot.
    Devices {
        /// Print JSON instead of a listing.
        #[arg(long)]
        json: bool,
    },
    /// Run prompts through a model and save the activations (easyroutine cache keys).
    Extract(cmd_extract::Args),
    /// Keys, shapes, dtypes, info strings, metadata and memory of a saved cache.
    Inspect {
        /// A cache file or chunk directory written by `hookrs extract` or hook-cache.
        cache: PathBuf,
    },
    /// Merge shard caches (from `extract --shard K/N`) in dataset order, or chunk directories
    /// (from `extract --out DIR`) one after another, into one file.
    Merge {
        /// The merged cache to write.
        out: PathBuf,
        /// The shard caches, or chunk directories.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Activation patching sweep with the logit-difference metric (clean = 1, corrupted = 0).
    Patch(cmd_patch::Args),
    /// A heatmap of one cache entry (e.g. an attention pattern), with token labels when known.
    Plot {
        /// The cache file or chunk directory.
        cache: PathBuf,
        /// The key to draw, e.g. pattern_L0H1.
        #[arg(long)]
        key: String,
        /// Which example of the batch.
        #[arg(long, default_value_t = 0)]
        example: i64,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// mimalloc serves every allocation of the process, libtorch's included (the `override`
/// feature exports malloc/free from the binary): glibc's malloc either keeps freed activation
/// buffers of many sizes in its heap (a run over mixed-length prompts held twice the memory it
/// needs) or, with a fixed mmap threshold, maps and zeroes each one anew (40 % slower).
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
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HOOKRS_LOG").unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Sites { model, json } => cmd_sites::run(&model, json),
        Command::Devices { json } => cmd_devices::run(json),
        Command::Extract(a) => cmd_extract::run(a),
        Command::Inspect { cache } => cmd_inspect::run(&cache),
        Command::Merge { out, inputs } => cmd_merge::run(&out, &inputs),
        Command::Patch(a) => cmd_patch::run(a),
        Command::Plot { cache, key, example, out } => cmd_plot::run(&cache, &key, example, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookrs: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// A malformed command line that clap itself cannot see: a flag's value that does not parse
/// (bad JSON in --input-ids or --token-groups, a bad --shard, --chunk-size or --device, an
/// unknown --extract name) or flags that do not go together. Exits 2, like clap's own usage
/// errors; every other failure exits 1.
#[derive(Debug)]
pub(crate) struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `usage!("--shard {s}: ...")`: an [`anyhow::Error`] that exits 2.
macro_rules! usage {
    ($($t:tt)*) => { anyhow::Error::new(crate::Usage(format!($($t)*))) };
}
pub(crate) use usage;

/// The exit code of a failed command: 2 for a usage error, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Usage>()) {
        2
    } else {
        1
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder (atomic rename).
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}
