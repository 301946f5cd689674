//! Build-script helper shared by every crate that links libtorch through tch.
//!
//! One job: make each binary of the calling crate (tests, examples, benches, the CLI) find
//! libtorch at run time in the folder torch-sys linked against (an rpath), and tell the crate
//! where that folder is (`HOOKRS_LIBTORCH_LIB`, for tests that look at it).
//!
//! The GPU backend (`libtorch_cuda.so`) is deliberately **not** linked: rustc links with
//! `--as-needed` and drops it, and `hook_torch::backend` loads it at start when the machine
//! has a GPU driver, or when a CUDA device is asked for. A CPU-only run then does not pay the
//! ~260 MB of resident memory the CUDA libraries cost.
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

/// The libtorch `lib/` folder torch-sys linked against (`DEP_TCH_LIBTORCH_LIB`, exported
/// because torch-sys has `links = "tch"`; only crates that depend on torch-sys directly see it).
pub fn libtorch_lib() -> Option<PathBuf> {
    std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from)
}

/// The linker arguments [`link_libtorch`] prints for `lib`: an rpath to it.
///
/// ```
/// let args = hook_build::link_args(std::path::Path::new("/nowhere"));
/// assert_eq!(args, vec!["-Wl,-rpath,/nowhere".to_string()]);
/// ```
pub fn link_args(lib: &Path) -> Vec<String> {
    vec![format!("-Wl,-rpath,{}", lib.display())]
}

/// Prints the cargo instructions: library search path and rpath. Without
/// `DEP_TCH_LIBTORCH_LIB` (the crate does not depend on torch-sys directly) it prints only the
/// rerun trigger.
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
