//! `cargo xtask parity`: cases generated in Python with the real easyroutine, checked by a
//! Rust runner of the crate under test, which prints the table and writes its section of
//! `docs/parity.md`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, project_root, run};

/// Function-level parity of hook-ops.
pub fn ops(python: &Path) -> Result<()> {
    let root = project_root();
    let dir = root.join("target/parity/ops");
    run(Command::new(python).arg(root.join("xtask/python/parity_ops.py")).arg(&dir))
        .context("generating the easyroutine cases failed")?;
    run(cargo()
        .args(["run", "--quiet", "-p", "hook-ops", "--example", "parity_ops", "--"])
        .arg(&dir)
        .arg("--write")
        .arg(root.join("docs/parity.md")))
    .context("parity ops failed: a row differs from easyroutine beyond tolerance (see the table above)")
}
