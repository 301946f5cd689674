//! The hook-ops side of `cargo xtask bench ops`: times `attention_pattern` on the pattern
//! written by `xtask/python/bench_ops.py`, for the cases it printed (JSON lines on stdin), with
//! 2 threads as the anchor measurement. Prints one JSON line per case with our median ms.

use std::io::BufRead;
use std::time::Instant;

use hook_core::{HeadSelection, TokenGroups};
use hook_ops::pattern::attention_pattern;
use hook_ops::PatternAvg;
use serde_json::{json, Value};
use tch::Tensor;

fn main() -> anyhow::Result<()> {
    tch::set_num_threads(2);
    let dir = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: bench_ops DIR < cases.jsonl"))?;
    let pattern = Tensor::read_safetensors(format!("{dir}/pattern.safetensors"))?.remove(0).1;
    for line in std::io::stdin().lock().lines() {
        let case: Value = serde_json::from_str(&line?)?;
        let groups: TokenGroups = serde_json::from_value(case["groups"].clone())?;
        let mode: PatternAvg = case["mode"].as_str().unwrap_or("mean").parse()?;
        let run = || attention_pattern(&pattern, 0, &groups, Some(&groups), HeadSelection::All, mode);
        run()?; // warm-up
        let mut ts: Vec<f64> = (0..25)
            .map(|_| {
                let t = Instant::now();
                let out = run().expect("warm-up run succeeded");
                std::hint::black_box(out);
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        println!("{}", json!({"G": case["G"], "mode": case["mode"], "ms": ts[ts.len() / 2]}));
    }
    Ok(())
}
