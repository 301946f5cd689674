//! Build-script helper shared by every crate that links libtorch through tch.
//!
//! One job: make each binary of the calling crate (tests, examples, benches, the CLI, a
//! Python extension) load libtorch from the folder torch-sys linked against, **including its
//! CUDA backend**. rustc links with `--as-needed`, and no Rust or C++ code of ours references a
//! symbol of `libtorch_cuda.so`, so without help the linker drops it from the binary's
//! `NEEDED` entries, libtorch never registers its CUDA backend, and `Device::Cuda` is never
//! found on a GPU machine. [`link_libtorch`] re-adds it with `--no-as-needed` whenever the
//! libtorch folder has it (a CPU-only libtorch has none, and nothing is added).
//!
//! `cargo:rustc-link-arg` only reaches the binaries of the crate whose build script prints
//! it, so every crate that links tch calls this from its own `build.rs`:
//!
//! ```no_run
//! // build.rs
//! fn main() {
//!     hook_build::link_libtorch();
//! }
//! ```

use std::path::{Path, PathBuf};

/// The libraries of a libtorch folder that register a device backend when loaded. Each is
/// linked with `--no-as-needed` when present.
pub const BACKEND_LIBRARIES: &[&str] = &["torch_cuda", "torch_cuda_cu", "torch_cuda_cpp", "torch_hip"];

/// The libtorch `lib/` folder torch-sys linked against (`DEP_TCH_LIBTORCH_LIB`, exported
/// because torch-sys has `links = "tch"`; only crates that depend on torch-sys directly see it).
pub fn libtorch_lib() -> Option<PathBuf> {
    std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from)
}

/// The backend libraries present in `lib`, by link name (`torch_cuda`).
///
/// ```
/// let dir = std::env::temp_dir().join("hook-build-doc");
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join("libtorch_cuda.so"), b"").unwrap();
/// assert_eq!(hook_build::backends_in(&dir), vec!["torch_cuda"]);
/// ```
pub fn backends_in(lib: &Path) -> Vec<&'static str> {
    BACKEND_LIBRARIES
        .iter()
        .copied()
        .filter(|name| lib.join(format!("lib{name}.so")).exists() || lib.join(format!("{name}.dll")).exists())
        .collect()
}

/// The linker arguments [`link_libtorch`] prints for `lib`: an rpath, and each backend
/// library between `--push-state,--no-as-needed` and `--pop-state`.
///
/// ```
/// let args = hook_build::link_args(std::path::Path::new("/nowhere"));
/// assert_eq!(args, vec!["-Wl,-rpath,/nowhere".to_string()]);
/// ```
pub fn link_args(lib: &Path) -> Vec<String> {
    let mut args = vec![format!("-Wl,-rpath,{}", lib.display())];
    for name in backends_in(lib) {
        args.push(format!("-Wl,--push-state,--no-as-needed,-l{name},--pop-state"));
    }
    args
}

/// Prints the cargo instructions: library search path, rpath, and the backend libraries
/// with `--no-as-needed`. Without `DEP_TCH_LIBTORCH_LIB` (the crate does not depend on
/// torch-sys directly) it prints only the rerun trigger.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = libtorch_lib() else { return };
    println!("cargo:rustc-link-search=native={}", lib.display());
    for arg in link_args(&lib) {
        println!("cargo:rustc-link-arg={arg}");
    }
    // for tests that check the link (`option_env!("HOOKRS_LIBTORCH_LIB")`)
    println!("cargo:rustc-env=HOOKRS_LIBTORCH_LIB={}", lib.display());
}
