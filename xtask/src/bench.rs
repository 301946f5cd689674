//! `cargo xtask bench`: easyroutine and hookrs on the same inputs in one run, ratios printed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{cargo, project_root, run};

/// attention_pattern_head block reductions: easyroutine vs hook-ops, G = 1, 4, 16, 32.
pub fn ops(python: &Path) -> Result<()> {
    let root = project_root();
    let dir = root.join("target/bench/ops");
    run(cargo().args(["build", "--quiet", "--release", "-p", "hook-ops", "--example", "bench_ops"]))?;
    eprintln!("bench ops: timing easyroutine (Python double loop; G=32 takes a few seconds per call)...");
    let py = Command::new(python).arg(root.join("xtask/python/bench_ops.py")).arg(&dir).output()?;
    if !py.status.success() {
        bail!("bench_ops.py failed:\n{}", String::from_utf8_lossy(&py.stderr));
    }
    let cases = String::from_utf8(py.stdout)?;
    eprintln!("bench ops: timing hook-ops...");
    let mut child = Command::new(root.join("target/release/examples/bench_ops"))
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting bench_ops")?;
    child.stdin.take().expect("piped").write_all(cases.as_bytes())?;
    let ours = child.wait_with_output()?;
    if !ours.status.success() {
        bail!("bench_ops failed");
    }
    let ours = String::from_utf8(ours.stdout)?;
    println!("| G | mode | easyroutine ms/layer | hookrs ms/layer | speed-up |");
    println!("|---|---|---|---|---|");
    for (a, b) in cases.lines().zip(ours.lines()) {
        let (g, mode, er) = fields(a)?;
        let (_, _, us) = fields(b)?;
        println!("| {g} | {mode} | {er:.3} | {us:.3} | {:.0}x |", er / us);
    }
    Ok(())
}

/// (G, mode, ms) from one JSON line, without a JSON dependency in xtask.
fn fields(line: &str) -> Result<(String, String, f64)> {
    let get = |k: &str| -> Option<&str> {
        let i = line.find(&format!("\"{k}\":"))? + k.len() + 3;
        let rest = line[i..].trim_start();
        let end = rest.find([',', '}'])?;
        Some(rest[..end].trim().trim_matches('"'))
    };
    let g = get("G").context("no G")?.to_string();
    let mode = get("mode").context("no mode")?.to_string();
    let ms: f64 = get("ms").context("no ms")?.parse()?;
    Ok((g, mode, ms))
}
