//! `cargo xtask parity`: cases generated in Python with the real easyroutine, checked by a
//! Rust runner of the crate under test, which prints the table and writes its section of
//! `docs/parity.md`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{project_root, run};

/// One parity suite: `xtask/python/parity_<suite>.py` writes the cases, the runner
/// `parity_<suite>` of the hook-parity crate checks them and writes its section of
/// docs/parity.md.
pub fn suite(python: &Path, suite: &str) -> Result<()> {
    let root = project_root();
    let dir = root.join("target/parity").join(suite);
    run(Command::new(python).arg(root.join(format!("xtask/python/parity_{suite}.py"))).arg(&dir))
        .with_context(|| format!("generating the easyroutine cases of parity {suite} failed"))?;
    run(Command::new(crate::workspace_binaries()?.join(format!("parity_{suite}")))
        .arg(&dir)
        .arg("--write")
        .arg(root.join("docs/parity.md")))
    .with_context(|| format!("parity {suite} failed: a row differs from easyroutine (see the table above)"))
}

/// Cache parity, then the Python side: every cache hook-cache saved is read by load_cache.py
/// and compared with easyroutine's state for the same inputs.
pub fn cache(python: &Path) -> Result<()> {
    suite(python, "cache")?;
    let root = project_root();
    run(Command::new(python).arg(root.join("xtask/python/parity_cache.py")).arg("verify").arg(root.join("target/parity/cache")))
        .context("Python could not read back a cache saved by hook-cache as easyroutine's state")
}

/// The Python API against the Rust API: every model case again through `import hookrs`,
/// compared bitwise with what the Rust runner returned (`xtask/python/parity_python.py`).
pub fn python_api(python: &Path) -> Result<()> {
    let root = project_root();
    run(Command::new(python).arg(root.join("xtask/python/parity_python.py")).arg(root.join("target/parity/models")))
        .context("the Python API returned other tensors than the Rust API (see DIFFER lines above)")
}
