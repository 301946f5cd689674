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

/// Plain / instrumented / full extraction forward against easyroutine on the same model.
pub fn models(python: &Path) -> Result<()> {
    let root = project_root();
    let dir = root.join("target/bench/models");
    std::fs::create_dir_all(&dir)?;
    let model = dir.join("llama8.pt");
    let config = root.join("xtask/python/configs/bench_llama.json");
    if !model.exists() {
        run(Command::new(python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--config"]).arg(&config).arg("--out").arg(&model))?;
    }
    run(cargo().args(["build", "--quiet", "--release", "-p", "hook-torch", "--example", "bench_models"]))?;
    eprintln!("bench models: timing hookrs (plain TorchScript, instrumented idle, full extraction)...");
    let ours = Command::new(root.join("target/release/examples/bench_models")).arg(&model).output()?;
    if !ours.status.success() {
        bail!("bench_models failed:\n{}", String::from_utf8_lossy(&ours.stderr));
    }
    eprintln!("bench models: timing easyroutine (eager plain, full extraction)...");
    let py = Command::new(python).arg(root.join("xtask/python/bench_models.py")).arg(&config).arg("0").output()?;
    if !py.status.success() {
        bail!("bench_models.py failed:\n{}", String::from_utf8_lossy(&py.stderr));
    }
    let ours = String::from_utf8(ours.stdout)?;
    let theirs = String::from_utf8(py.stdout)?;
    let num = |line: &str, k: &str| -> Result<f64> {
        let i = line.find(&format!("\"{k}\":")).with_context(|| format!("no {k} in {line}"))? + k.len() + 3;
        let rest = line[i..].trim_start();
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Ok(rest[..end].trim().parse()?)
    };
    let (plain, idle, full) = (num(&ours, "plain_ms")?, num(&ours, "idle_ms")?, num(&ours, "full_ms")?);
    let (eager, er_full) = (num(&theirs, "eager_plain_ms")?, num(&theirs, "easyroutine_full_ms")?);
    println!("llama 8 layers, d_model 512, 8 heads / 2 kv heads, B=4, S=128, 2 threads ({} cache entries each side: hookrs {}, easyroutine {})",
        "", num(&ours, "keys")?, num(&theirs, "easyroutine_keys")?);
    println!("| run | ms | ratio |");
    println!("|---|---|---|");
    println!("| hookrs: plain TorchScript forward | {plain:.1} | 1.00 |");
    println!("| hookrs: instrumented, no hooks | {idle:.1} | {:.3}x plain |", idle / plain);
    println!("| hookrs: full extraction | {full:.1} | {:.3}x plain |", full / plain);
    println!("| easyroutine: eager forward | {eager:.1} | 1.00 |");
    println!("| easyroutine: full extraction | {er_full:.1} | {:.3}x eager |", er_full / eager);
    println!("| full extraction, easyroutine / hookrs | | {:.2}x faster |", er_full / full);
    Ok(())
}
