//! hookrs's side of `cargo xtask bench models`. Two modes, each printing one JSON line:
//!
//! - `bench_models MODEL.pt [--device D] [--batch B] [--seq S]`: the median of 8 runs of the
//!   plain TorchScript forward (tch, not instrumented), the instrumented forward with no hook,
//!   and the full extraction (resid in/mid/out of every layer, all-head patterns, head q/k/v:
//!   easyroutine's anchor measurement), interleaved three times, best of three.
//! - `bench_models MODEL.pt --load plain|hooked [--device D]`: one load in this fresh process:
//!   its wall time and the process's resident memory before the load and at its peak
//!   (`VmHWM`), so the caller can compare an instrumented load with a plain one.

use std::time::Instant;

use anyhow::{bail, Context};
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use tch::{Device, IValue, Kind, Tensor};

fn median(device: Device, mut f: impl FnMut()) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..8)
        .map(|_| {
            let t = Instant::now();
            f();
            if let Device::Cuda(_) = device {
                tch::Cuda::synchronize(0);
            }
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[ts.len() / 2]
}

/// A `/proc/self/status` field in kB (0 where there is none).
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    tch::set_num_threads(2);
    let mut args = std::env::args().skip(1);
    let path = args.next().context("usage: bench_models MODEL.pt [--device D] [--batch B] [--seq S] [--load plain|hooked]")?;
    let (mut device, mut batch, mut seq, mut load) = (Device::Cpu, 4i64, 128i64, None::<String>);
    while let Some(a) = args.next() {
        let mut v = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--device" => {
                // loads the CUDA backend before libtorch's first CUDA query
                let d = v()?;
                device = hook_torch::backend::parse_device(&d).with_context(|| format!("--device {d}"))?;
            }
            "--batch" => batch = v()?.parse()?,
            "--seq" => seq = v()?.parse()?,
            "--load" => load = Some(v()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if let Some(mode) = load {
        let before = status_kb("VmRSS:");
        let t = Instant::now();
        match mode.as_str() {
            "plain" => drop(tch::CModule::load_on_device(&path, device)?),
            "hooked" => drop(HookedModule::load(&path, device)?),
            other => bail!("--load {other}: plain or hooked"),
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        println!("{{\"load_ms\": {ms:.1}, \"rss_before_kb\": {before}, \"peak_rss_kb\": {}}}", status_kb("VmHWM:"));
        return Ok(());
    }
    let mut hooked = HookedModule::load(&path, device)?;
    let vocab = hooked.require_description()?.vocab_size as i64;
    let plain = tch::CModule::load_on_device(&path, device)?;
    tch::manual_seed(0);
    let ids = Tensor::randint(vocab, [batch, seq], (Kind::Int64, device));
    let mask = ids.ones_like();
    let inputs = [IValue::Tensor(ids.shallow_clone()), IValue::Tensor(mask.shallow_clone())];
    let cfg = ExtractionConfig::default().with_flags(&["resid_in", "resid_mid", "resid_out", "attn_pattern", "head_queries", "head_keys", "head_values"])?;
    let cfg = ExtractionConfig { save_logits: false, ..cfg };
    let groups = TokenGroups::all(seq as usize)?;
    let mut keys = 0;
    // interleave the three so machine noise hits them alike
    // the same extraction with the logits: the whole forward, as the plain one computes it
    // (without them the forward stops after the last layer, before the final norm and LM head)
    let with_logits = ExtractionConfig { save_logits: true, ..cfg.clone() };
    let (mut p, mut i, mut f, mut fl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        p.push(median(device, || tch::no_grad(|| drop(plain.forward_is(&inputs).expect("plain forward")))));
        i.push(median(device, || tch::no_grad(|| drop(hooked.forward(&ids, &mask).expect("instrumented forward")))));
        f.push(median(device, || {
            let (_, cache) = hooked.run_with_cache(&ids, &mask, &groups, &cfg).expect("extraction");
            keys = cache.len() - 1; // without mapping_index
        }));
        fl.push(median(device, || drop(hooked.run_with_cache(&ids, &mask, &groups, &with_logits).expect("extraction with logits"))));
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "{{\"plain_ms\": {:.3}, \"idle_ms\": {:.3}, \"full_ms\": {:.3}, \"full_logits_ms\": {:.3}, \"keys\": {keys}}}",
        best(&p),
        best(&i),
        best(&f),
        best(&fl)
    );
    Ok(())
}
