//! hookrs's side of `cargo xtask bench models`: on one exported model, B=4, S=128, 2 threads,
//! the median of 8 runs of: the plain TorchScript forward (tch, not instrumented), the
//! instrumented forward with no hook, and the full extraction (resid in/mid/out of every layer,
//! all-head patterns, head q/k/v: easyroutine's anchor measurement). Prints one JSON line.
//!
//! Usage: bench_models MODEL.pt

use std::time::Instant;

use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use tch::{Device, IValue, Kind, Tensor};

fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..8)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[ts.len() / 2]
}

fn main() -> anyhow::Result<()> {
    tch::set_num_threads(2);
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: bench_models MODEL.pt"))?;
    let mut hooked = HookedModule::load(&path, Device::Cpu)?;
    let vocab = hooked.require_description()?.vocab_size as i64;
    let plain = tch::CModule::load(&path)?;
    tch::manual_seed(0);
    let ids = Tensor::randint(vocab, [4, 128], (Kind::Int64, Device::Cpu));
    let mask = ids.ones_like();
    let inputs = [IValue::Tensor(ids.shallow_clone()), IValue::Tensor(mask.shallow_clone())];
    let cfg = ExtractionConfig::default().with_flags(&["resid_in", "resid_mid", "resid_out", "attn_pattern", "head_queries", "head_keys", "head_values"])?;
    let cfg = ExtractionConfig { save_logits: false, ..cfg };
    let groups = TokenGroups::all(128)?;
    let mut keys = 0;
    // interleave the three so machine noise hits them alike
    let (mut p, mut i, mut f) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        p.push(median(|| tch::no_grad(|| drop(plain.forward_is(&inputs).expect("plain forward")))));
        i.push(median(|| tch::no_grad(|| drop(hooked.forward(&ids, &mask).expect("instrumented forward")))));
        f.push(median(|| {
            let (_, cache) = hooked.run_with_cache(&ids, &mask, &groups, &cfg).expect("extraction");
            keys = cache.len() - 1; // without mapping_index
        }));
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "{{\"plain_ms\": {:.3}, \"idle_ms\": {:.3}, \"full_ms\": {:.3}, \"keys\": {keys}}}",
        best(&p),
        best(&i),
        best(&f)
    );
    Ok(())
}
