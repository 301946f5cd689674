//! Logit-lens parity with easyroutine (run by `cargo xtask parity lens`).
//!
//! For each case written by `xtask/python/parity_lens.py` (easyroutine's own
//! `LogitLens.compute` on a cache hookrs extracted), runs [`LogitLens::compute`] on the same
//! cache and compares keys, shapes and values within [`RTOL`]. Where easyroutine fails or
//! differs by construction (the case names why), hookrs is compared with the intended value
//! the harness computed, and the row is an explained deviation.
//!
//! Usage: `parity_lens CASE_DIR [--write docs/parity.md]`

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use hook_parity::{exit_code, publish, relative_diff, Args, Tally, Verdict};
use hook_analysis::{Direction, LogitLens, Metric};
use hook_cache::ActivationCache;
use hook_torch::HookedModule;
use serde_json::Value as Json;
use tch::{Device, Kind, Tensor};

/// Tolerance relative to each entry's largest magnitude, or to 1 when that is smaller (float32,
/// the same torch kernels on both sides; lens logits of a real model are in the tens).
const RTOL: f64 = 1e-5;

fn directions(v: &Json) -> Option<Vec<Direction>> {
    v.as_array().map(|a| {
        a.iter()
            .map(|d| match d {
                Json::Array(p) => Direction::Diff(p[0].as_i64().unwrap_or(0), p[1].as_i64().unwrap_or(0)),
                x => Direction::Token(x.as_i64().unwrap_or(0)),
            })
            .collect()
    })
}

fn main() -> ExitCode {
    exit_code("lens", real_main())
}

fn real_main() -> anyhow::Result<bool> {
    let Args { dir, write, section } = Args::from_env("lens")?;
    let spec: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
    let expected: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("expected.safetensors"))?.into_iter().collect();
    let mut lenses: HashMap<String, LogitLens> = HashMap::new();
    let mut tally = Tally::default();
    let mut rows = Vec::new();
    for case in spec["cases"].as_array().context("no cases")? {
        let family = case["family"].as_str().unwrap_or_default();
        let name = case["name"].as_str().unwrap_or_default();
        if !lenses.contains_key(family) {
            let m = HookedModule::load(dir.join(format!("{family}.pt")), Device::Cpu)?;
            lenses.insert(family.to_string(), LogitLens::from_model(&m)?);
        }
        let lens = &lenses[family];
        let cache = ActivationCache::load(dir.join(case["cache"].as_str().unwrap_or_default()))?;
        let metric = if case["metric"] == "accuracy" { Metric::Accuracy } else { Metric::LogitDiff };
        let dirs = directions(&case["directions"]);
        let deviation = case["deviation"].as_str();
        let side = if deviation.is_some() { "intended" } else { "easyroutine" };
        let target = case["target_key"].as_str().unwrap_or_default();
        let verdict = match lens.compute(&cache, target, dirs.as_deref(), case["apply_norm"].as_bool().unwrap_or(true), case["apply_softmax"].as_bool().unwrap_or(false), metric) {
            Err(e) => (f64::NAN, Verdict::Fail(e.to_string())),
            Ok(got) => {
                let want: Vec<String> = case["keys"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(String::from)).collect();
                if got.keys().cloned().collect::<Vec<_>>() != want {
                    (f64::NAN, Verdict::Fail(format!("keys {:?}, expected {want:?}", got.keys().collect::<Vec<_>>())))
                } else {
                    let mut worst: f64 = 0.0;
                    let mut why = None;
                    for k in &want {
                        let w = expected.get(&format!("{family}/{name}/{side}/{k}")).with_context(|| format!("missing {family}/{name}/{side}/{k}"))?;
                        let g = got[k].to_kind(Kind::Float);
                        if g.size() != w.size() {
                            why = Some(format!("{k}: shape {:?}, expected {:?}", g.size(), w.size()));
                            break;
                        }
                        let d = relative_diff(&g, w, 1.0);
                        worst = if d.is_nan() { d } else { worst.max(d) };
                    }
                    match (why, deviation) {
                        (Some(w), _) => (f64::NAN, Verdict::Fail(w)),
                        (None, _) if worst.is_nan() || worst > RTOL => (worst, Verdict::Fail(format!("max diff {worst:.2e} > {RTOL:e} of max(|value|, 1)"))),
                        (None, None) => (worst, Verdict::Pass),
                        (None, Some(r)) => (worst, Verdict::Explained(format!("{r}; compared with the intended value"))),
                    }
                }
            }
        };
        tally.count(&verdict.1);
        let opts = format!(
            "{target} directions={} norm={} softmax={} metric={} positions={}",
            case["directions"],
            case["apply_norm"],
            case["apply_softmax"],
            case["metric"].as_str().unwrap_or_default(),
            case["cache"].as_str().unwrap_or_default().trim_end_matches(".safetensors").trim_start_matches(&format!("{family}-"))
        );
        rows.push(format!("| {family} | {name} | {} | {} | {} |", opts.replace('|', "/"), if verdict.0.is_nan() { "-".into() } else { format!("{:.1e}", verdict.0) }, verdict.1.to_string().replace('|', "\\|")));
    }
    let mut s = format!(
        "Logit-lens parity: easyroutine 1.1.5's `LogitLens.compute` (built from the eager model's LM head and final norm, as \
         `LogitLens.from_model` does; the harness supplies the `progress_bar` its module uses without importing) against \
         hook-analysis's `LogitLens::compute`, both on the same cache extracted by hookrs (resid_out of every layer, head_out, \
         last_layernorm; batch 2, 8 tokens; positions `[[-1]]` or `[[1, 2], [-1]]`). Keys, shapes and values within {RTOL:e} of max(|value|, 1). \
         Where easyroutine raises or computes another thing by construction (LayerNorm bias broadcast as `bias.unsqueeze(-1)`, \
         Gemma's `1 + weight` ignored, accuracy over several positions), hookrs is compared with the intended value computed \
         by the harness. {} pass, {} explained deviations, {} fail.\n\n",
        tally.pass, tally.explained, tally.fail
    );
    s.push_str("| family | case | options | max abs diff | result |\n|---|---|---|---|---|\n");
    for r in &rows {
        s.push_str(r);
        s.push('\n');
    }
    publish(write.as_deref(), &section, &s)?;
    println!("parity lens: {tally}");
    Ok(tally.ok())
}

