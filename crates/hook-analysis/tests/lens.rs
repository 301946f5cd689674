//! The logit lens read at the last layer is the model's own output: the final norm applied
//! with the cached statistics, then the unembedding, gives the logits — on every family whose
//! logits are not capped after the LM head.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use hook_analysis::{Direction, LogitLens, Metric};
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use tch::{Device, Kind, Tensor};

fn run(family: &str) -> (HookedModule, Tensor, hook_cache::ActivationCache) {
    // every position of both rows (no left padding: positions count each example's own tokens)
    let ids = common::inputs().0;
    let mask = ids.ones_like();
    let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
    let cfg = ExtractionConfig { save_logits: true, ..ExtractionConfig::default().with_flags(&["resid_out", "last_layernorm", "head_out"]).unwrap() };
    let groups = TokenGroups::all(ids.size()[1] as usize).unwrap();
    let (logits, cache) = m.run_with_cache(&ids, &mask, &groups, &cfg).unwrap();
    (m, logits, cache)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1.0);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn the_lens_at_the_last_layer_gives_the_models_logits_on_every_family() {
    for family in ["llama", "mistral", "qwen2", "gemma3", "gpt2", "gpt_neox", "phi3", "qwen3", "olmo2"] {
        let (m, logits, cache) = run(family);
        let lens = LogitLens::from_model(&m).unwrap();
        let last = m.description().unwrap().num_hidden_layers - 1;
        let out = lens.compute(&cache, &format!("resid_out_{last}"), None, true, false, Metric::LogitDiff).unwrap();
        let got = &out[&format!("logit_lens_resid_out_{last}")];
        assert_eq!(got.size(), logits.size(), "{family}");
        let err = max_rel(got, &logits);
        assert!(err < 1e-5, "{family}: the lens at the last layer differs from the logits by {err:e} (relative)");
        // softmax: probabilities
        let p = lens.compute(&cache, &format!("resid_out_{last}"), None, true, true, Metric::LogitDiff).unwrap();
        let sums = p[0].sum_dim_intlist(-1, false, Kind::Float);
        assert!(sums.allclose(&sums.ones_like(), 1e-5, 1e-5, false), "{family}");
    }
}

#[test]
fn directions_give_the_logit_difference_and_accuracy() {
    let (m, logits, cache) = run("llama");
    let lens = LogitLens::from_model(&m).unwrap();
    let dirs = [Direction::Diff(5, 9), Direction::Diff(7, 3)];
    let out = lens.compute(&cache, "resid_out_{i}", Some(&dirs), true, false, Metric::LogitDiff).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["logit_lens_resid_out_0", "logit_lens_resid_out_1"]);
    let diff = &out["logit_lens_resid_out_1"];
    assert_eq!(diff.size(), vec![2, 7]);
    for (i, (a, b)) in [(5, 9), (7, 3)].into_iter().enumerate() {
        let want = logits.get(i as i64).select(-1, a) - logits.get(i as i64).select(-1, b);
        assert!(max_rel(&diff.get(i as i64), &want) < 1e-5, "example {i}");
    }
    let acc = lens.compute(&cache, "resid_out_1", Some(&dirs), true, false, Metric::Accuracy).unwrap();
    let won = (diff.gt(0.0)).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!((acc["logit_lens_resid_out_1"].double_value(&[]) - won).abs() < 1e-6);
    // per-head contributions: a share of the LayerNorm bias each; RMS has none
    let heads = lens.compute(&cache, "head_out_L{i}H{j}", Some(&dirs), true, false, Metric::LogitDiff).unwrap();
    assert_eq!(heads.len(), 2 * 4);
    assert_eq!(heads.keys().next().unwrap(), "logit_lens_head_out_L0H0");
}

#[test]
fn bad_input_is_an_error_that_says_what_would_be_right() {
    let (m, _, cache) = run("llama");
    let lens = LogitLens::from_model(&m).unwrap();
    let err = |r: hook_analysis::Result<_>| r.map(|_: indexmap::IndexMap<String, Tensor>| ()).unwrap_err().to_string();
    assert!(err(lens.compute(&cache, "resid_mid_{i}", None, true, false, Metric::LogitDiff)).contains("no key matching `resid_mid_{i}`"));
    assert!(err(lens.compute(&cache, "resid_out_0", Some(&[Direction::Token(1)]), true, false, Metric::LogitDiff)).contains("give one per example"));
    assert!(err(lens.compute(&cache, "resid_out_0", Some(&[Direction::Token(999), Direction::Token(1)]), true, false, Metric::LogitDiff)).contains("valid ids are 0..256"));
    assert!(err(lens.compute(&cache, "resid_out_0", Some(&[Direction::Token(1), Direction::Token(2)]), true, false, Metric::Accuracy)).contains("(answer, wrong) pairs"));
    let mut no_stats = cache.clone();
    no_stats.remove("last_layernorm");
    assert!(err(lens.compute(&no_stats, "resid_out_0", None, true, false, Metric::LogitDiff)).contains("extract_last_layernorm"));
    // without the norm no statistics are needed
    assert!(lens.compute(&no_stats, "resid_out_0", None, false, false, Metric::LogitDiff).is_ok());
}
