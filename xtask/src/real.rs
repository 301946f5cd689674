//! `cargo xtask real`: hookrs on a real checkpoint, SmolLM2-135M-Instruct (fetched and exported
//! once by `cargo xtask fetch smollm2`, in float32 and bfloat16), against the real easyroutine
//! and transformers:
//! - every extraction, average and intervention case of `parity models` on a sentence of real
//!   text, float32 within 1e-6 of each entry's largest magnitude, bfloat16 within two units in
//!   its last place (writes the `real` section of docs/parity.md);
//! - `hookrs tokenize` against transformers' tokenizer on 200+ varied strings, greedy
//!   `hookrs generate` against HF `generate`, the lens's last layer against the logits, and the
//!   attribution's parts against the logit difference (`xtask/python/real_checks.py`).
//!
//! About three minutes once the exports exist; `cargo xtask ci` runs it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{fetch, project_root, run, setup};

pub const USAGE: &str = "usage: cargo xtask real\n\n\
hookrs on the real SmolLM2-135M-Instruct (fetched once with `cargo xtask fetch smollm2`, float32 and bfloat16): the \
parity models cases against easyroutine on real text (docs/parity.md, section real), then tokenizer, greedy generation, \
logit lens and attribution against transformers. About three minutes when the exports exist.";

pub fn real(args: &[String]) -> Result<()> {
    if let Some(bad) = args.first() {
        crate::usage_error(&format!("real: unknown option {bad}\n{USAGE}"));
    }
    let python = setup::setup()?;
    let root = project_root();
    let f32 = fetch(&python, &["smollm2".to_string()])?;
    let bf16 = fetch(&python, &["smollm2".to_string(), "--dtype".to_string(), "bfloat16".to_string()])?;
    let hf = f32.parent().context("the export lies in a folder")?.join("hf");
    let dir = root.join("target/parity/real");
    run(Command::new(&python).arg(root.join("xtask/python/parity_models.py")).arg(&dir).arg("--real").arg(&hf).arg(&f32).arg(&bf16))
        .context("generating easyroutine's cases on the real model failed")?;
    let bin = crate::workspace_binaries()?;
    run(Command::new(bin.join("parity_models"))
        .arg(&dir)
        .args(["--section", "real", "--write"])
        .arg(root.join("docs/parity.md")))
    .context("parity on the real model failed: a row differs from easyroutine (see the table above)")?;
    checks(&python, &bin.join("hookrs"), &hf, &f32, &root.join("target/real"))
}

fn checks(python: &Path, hookrs: &Path, hf: &Path, model: &Path, work: &Path) -> Result<()> {
    run(Command::new(python).arg(project_root().join("xtask/python/real_checks.py")).arg(hookrs).arg(hf).arg(model).arg(work))
        .context("hookrs differs from transformers on the real model (see the FAIL lines above)")
}
