//! Soak: many forwards with extraction and interventions, and many load/drop cycles, watching
//! resident memory (run by `cargo xtask soak`).
//!
//! Usage: `soak MODEL [--forwards N] [--loads N]`. Prints one JSON line: forwards, loads, RSS
//! after warm-up and at the end, the RSS slope over the second half of the forwards (a least
//! squares fit, MB per 1,000 forwards), the RSS growth over the load cycles, and the hook
//! handles and armed sites left over (both must be 0).

use std::time::Instant;

use hook_core::{HookContext, HookIo, TokenGroups};
use hook_torch::{ExtractionConfig, HookedModule, Intervention, PatchValue};
use tch::{Device, Kind, Tensor};

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().ok_or_else(|| anyhow::anyhow!("usage: soak MODEL [--forwards N] [--loads N]"))?;
    let flag = |name: &str, default: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default);
    let (forwards, loads) = (flag("--forwards", 10_000), flag("--loads", 1_000));
    tch::set_num_threads(2);
    let started = Instant::now();
    let mut m = HookedModule::load(model, Device::Cpu)?;
    let vocab = m.require_description()?.vocab_size as i64;
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "attn_pattern", "head_out", "last_layernorm"])?;
    let ivs = [Intervention::Resid { component: m.require_description()?.component("residual_stream_hook_name", 0)?, positions: vec![-1], patch: PatchValue::Ablation }];
    let mut points = Vec::new();
    let mut warm = f64::NAN;
    for i in 0..forwards {
        let ids = Tensor::randint(vocab, [2, 6 + (i % 5) as i64], (Kind::Int64, Device::Cpu));
        let mask = ids.ones_like();
        let h = m.add_hook("model.layers[0].mlp.output", |_: &HookContext, io: &HookIo<Tensor>| Ok(Some(io.main_tensor()? * 0.5)))?;
        let (_, cache) = m.run_with_cache(&ids, &mask, &TokenGroups::last(), &cfg)?;
        drop(cache);
        m.remove_hook(h);
        let _ = m.run_with_interventions(&ids, &mask, &ivs)?;
        if i == forwards / 10 {
            warm = rss_mb();
        }
        if i >= forwards / 2 && i % 50 == 0 {
            points.push((i as f64, rss_mb()));
        }
    }
    let end = rss_mb();
    let (hooks_left, armed_left) = (m.hook_count(), hook_torch::module::armed_sites_on_this_thread());
    drop(m);
    let before_loads = rss_mb();
    for _ in 0..loads {
        let m = HookedModule::load(model, Device::Cpu)?;
        drop(m);
    }
    let after_loads = rss_mb();
    println!(
        "{}",
        serde_json::json!({
            "forwards": forwards, "loads": loads, "seconds": started.elapsed().as_secs_f64(),
            "rss_after_warmup_mb": warm, "rss_end_mb": end,
            "rss_slope_mb_per_1000_forwards": slope(&points) * 1000.0,
            "rss_before_loads_mb": before_loads, "rss_after_loads_mb": after_loads,
            "hooks_left": hooks_left, "armed_sites_left": armed_left,
        })
    );
    Ok(())
}
