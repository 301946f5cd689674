//! End-to-end parity with easyroutine (run by `cargo xtask parity models`).
//!
//! For each tiny family and each ExtractionConfig case written by
//! `xtask/python/parity_models.py` (easyroutine's own create_hooks/set_hooks on the eager
//! model), runs `run_with_cache` on the exported TorchScript model with the same input ids and
//! token groups, and compares keys (in order), shapes and values within [`RTOL`] (float32) or [`tolerance`] of the dtype.
//!
//! Usage: `parity_models CASE_DIR [--write docs/parity.md]`. It also saves what hookrs returned
//! for every case (`CASE_DIR/hookrs.safetensors`, keys `family/case/entry`; each case's key
//! order in `hookrs.keys.json`): the Python API's
//! check (`xtask/python/parity_python.py`) compares `import hookrs` against it.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use hook_parity::{compare, exit_code, flat_cache, publish, Args, Tally, Tol, Verdict};
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule, Intervention};
use indexmap::IndexMap;
use serde_json::Value as Json;
use tch::{Device, Tensor};

/// The tolerance of model-level parity in float32 (activations of a forward pass run by the
/// TorchScript interpreter vs the eager model), relative to the entry's largest magnitude, or to
/// 1 when that is smaller: 1e-6 (eight units in the last place at the largest value). On tiny
/// models, whose values are below 1, it is an absolute 1e-6; a real model's residual stream
/// holds values in the hundreds, where float32 itself resolves no better than 1e-5.
const RTOL: f64 = 1e-6;

/// The tolerance of each dtype. In half precision, relative to the entry's largest magnitude
/// (or 1e-3): two units in the last place (bfloat16 keeps 8 significant bits, float16 11), as
/// the two sides may round a reduction (a matmul, a mean) in a different order.
fn tolerance(dtype: &str) -> Tol {
    match dtype {
        "bfloat16" => Tol { limit: 2.0 * 2f64.powi(-7), floor: 1e-3 },
        "float16" => Tol { limit: 2.0 * 2f64.powi(-10), floor: 1e-3 },
        _ => Tol { limit: RTOL, floor: 1.0 },
    }
}

/// The harness's intervention records as hook-torch interventions (ablations).
fn interventions_of(v: &Json) -> anyhow::Result<Vec<Intervention>> {
    // one parser: Intervention's own, which refuses a missing or unknown field
    if v.is_null() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_value(v.clone()).context("the case's interventions")?)
}

fn main() -> ExitCode {
    exit_code("models", real_main())
}

fn real_main() -> anyhow::Result<bool> {
    // `--section real`: the cases of `parity_models.py OUT --real HF_DIR EXPORT.pt`
    let Args { dir, write, section } = Args::from_env("models")?;
    let spec: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
    let expected: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("expected.safetensors"))?.into_iter().collect();
    let tokens: TokenGroups = serde_json::from_value(spec["tokens"].clone())?;
    let mut models: HashMap<String, HookedModule> = HashMap::new();
    let mut tally = Tally::default();
    let mut rows = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    let mut returned: Vec<(String, Tensor)> = Vec::new();
    let mut order: IndexMap<String, Vec<String>> = IndexMap::new();
    for case in spec["cases"].as_array().context("no cases")? {
        let family = case["family"].as_str().unwrap_or_default();
        let name = case["name"].as_str().unwrap_or_default();
        if !models.contains_key(family) {
            let file = spec["families"][family]["model"].as_str().unwrap_or_default();
            models.insert(family.to_string(), HookedModule::load(dir.join(file), Device::Cpu)?);
        }
        let m = models.get_mut(family).expect("inserted");
        let ids = expected.get(&format!("{family}/input_ids")).context("input ids")?;
        let mask = ids.ones_like();
        let config: ExtractionConfig = serde_json::from_value(case["config"].clone()).with_context(|| format!("config of {family}/{name}"))?;
        let deviation = case["deviation"].as_str();
        let keys_field = if deviation.is_some() { "fixed_keys" } else { "keys" };
        let prefix = if deviation.is_some() { format!("{family}/{name}/fixed") } else { format!("{family}/{name}") };
        let want: IndexMap<String, Tensor> = case[keys_field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str())
            .map(|k| Ok((k.to_string(), expected.get(&format!("{prefix}/{k}")).with_context(|| format!("missing {prefix}/{k}"))?.shallow_clone())))
            .collect::<anyhow::Result<_>>()?;
        let interventions = interventions_of(&case["interventions"])?;
        let extraction = hook_torch::Extraction { vocabulary_index: case["vocabulary_index"].as_i64(), ..hook_torch::Extraction::new(&tokens, &config) };
        let verdict = match m.run(ids, &mask, hook_torch::RunSpec { extraction: Some(extraction), interventions: &interventions, ..Default::default() }) {
            Err(e) => (f64::NAN, Verdict::Fail(e.to_string())),
            Ok(hook_torch::RunOutput { cache, .. }) => {
                let got = flat_cache(&cache);
                returned.extend(got.iter().map(|(k, t)| (format!("{family}/{name}/{k}"), t.contiguous())));
                order.insert(format!("{family}/{name}"), got.keys().cloned().collect());
                let tol = tolerance(case["dtype"].as_str().unwrap_or("float32"));
                match compare(&got, &want, tol) {
                    (d, Some(why)) => (d, Verdict::Fail(why)),
                    (d, None) => match deviation {
                        None => (d, Verdict::Pass),
                        Some(r) => {
                            reasons.extend(r.lines().map(String::from));
                            let er: IndexMap<String, Tensor> = case["keys"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|k| k.as_str())
                                .filter_map(|k| expected.get(&format!("{family}/{name}/{k}")).map(|t| (k.to_string(), t.shallow_clone())))
                                .collect();
                            let (ed, _) = compare(&got, &er, tol);
                            let vs = if ed.is_nan() { "different keys/shapes".into() } else { format!("{ed:.2e}") };
                            (d, Verdict::Explained(format!("easyroutine differs: {vs}")))
                        }
                    },
                }
            }
        };
        tally.count(&verdict.1);
        let mut opts = case["config"].to_string().replace('"', "").replace("extract_", "");
        if !interventions.is_empty() {
            opts.push_str(&format!(" + {}", case["interventions"].to_string().replace('"', "").replace('|', "/")));
        }
        rows.push(format!("| {family} | {name} | {opts} | {} | {} |", if verdict.0.is_nan() { "-".into() } else { format!("{:.1e}", verdict.0) }, verdict.1.to_string().replace('|', "\\|")));
    }
    reasons.sort();
    reasons.dedup();
    let mut s = if section == "real" {
        format!(
            "Model-level parity on real checkpoints: the same cases as the models section, on the real model's eager HF form \
             (its save_pretrained directory) against its hookrs export, on a tokenized sentence of real text; token groups {tokens}. \
             Values within {RTOL:e} of max(|value|, 1) (float32; the residual stream of a real model holds values in the hundreds). \
             {} pass, {} explained deviations, {} fail.\n\n",
            tally.pass, tally.explained, tally.fail
        )
    } else {
        format!(
        "Model-level parity: for each tiny random family (weights shared: the harness exports the very model it hooks), \
         easyroutine 1.1.5's own `HookedModel.create_hooks` + `set_hooks` on the eager HF model (attention wrapped by its \
         `ModuleWrapperManager`) against hook-torch's `run_with_cache` on the TorchScript export; batch 1, 8 tokens, token \
         groups {tokens}. easyroutine has attention wrappers for llama, mistral, qwen2 and gemma3 only; on the other families \
         (gpt2, gpt_neox, phi3, qwen3, gemma2, olmo2) the harness gives the eager model the sites easyroutine's hooks need without \
         changing what it computes: the same two identity modules around the attention softmax, identity `hookrs_q/k/v` modules \
         that a fused projection's output passes through (split and joined with HF's own layout), and GPT-2's Conv1D output \
         weight transposed to nn.Linear's layout. Interventions on q/k/v are given by layer (`Intervention::QkvHead`). Keys (in order), shapes and values within {RTOL:e} of max(|value|, 1) in float32; families marked `@bfloat16` / `@float16` are the same \
         models and cases exported and hooked in that dtype on both sides, compared relative to each entry's largest magnitude \
         within two units in the last place ({} for bfloat16, {} for float16). {} pass, {} explained deviations, {} fail.\n\n\
         The harness supplies two imports missing from easyroutine's hooked_model.py (`projected_key_vectors_head`, \
         `projected_query_vectors_head`: without them extract_head_keys_projected / extract_head_queries_projected raise NameError).\n\n",
        tolerance("bfloat16"),
        tolerance("float16"),
        tally.pass,
        tally.explained,
        tally.fail
        )
    };
    if !reasons.is_empty() {
        s.push_str("Explained deviations:\n\n");
        for r in &reasons {
            s.push_str(&format!("- {r}\n"));
        }
        s.push('\n');
    }
    s.push_str("| family | case | config | max abs diff | result |\n|---|---|---|---|---|\n");
    for r in &rows {
        s.push_str(r);
        s.push('\n');
    }
    Tensor::write_safetensors(&returned.iter().map(|(k, t)| (k.as_str(), t)).collect::<Vec<_>>(), dir.join("hookrs.safetensors"))?;
    std::fs::write(dir.join("hookrs.keys.json"), serde_json::to_string(&order)?)?; // safetensors sorts its keys
    publish(write.as_deref(), &section, &s)?;
    println!("parity {section}: {tally} (float32 within {RTOL:e} of max(|value|, 1); half precision relative)");
    Ok(tally.ok())
}

