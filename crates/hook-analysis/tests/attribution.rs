//! The final residual splits into parts that sum back to it on every family (post-norm ones
//! included), and their direct logit attributions sum to the model's logit difference.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use hook_analysis::{Decomposition, Direction, LogitLens, Metric};
use hook_torch::HookedModule;
use tch::{Device, Kind};

const FAMILIES: [&str; 10] = ["llama", "mistral", "qwen2", "gemma3", "gpt2", "gpt_neox", "phi3", "qwen3", "gemma2", "olmo2"];

#[test]
fn parts_sum_to_the_final_residual_and_attributions_to_the_logit_difference() {
    let (ids, mask) = common::inputs(); // the second row left-padded: position -1 is its last token
    for family in FAMILIES {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let lens = LogitLens::from_model(&m).unwrap();
        let post_norm = family.starts_with("gemma") || family == "olmo2";
        for per_head in [false, true] {
            let d = match Decomposition::run(&mut m, &ids, &mask, &[-1, -2], per_head) {
                Err(e) if per_head && post_norm => {
                    assert!(e.to_string().contains("post-norm"), "{family}: {e}");
                    continue;
                }
                r => r.unwrap(),
            };
            let err = d.residual_error().unwrap();
            assert!(err < 1e-5, "{family} (per head {per_head}): the parts miss the final residual by {err:e}");
            let layers = m.description().unwrap().num_hidden_layers;
            let heads = m.description().unwrap().num_attention_heads;
            assert_eq!(d.names[0], "embed");
            if !per_head {
                assert_eq!(d.names.len(), 1 + 2 * layers, "{family}");
            } else {
                assert!(d.names.iter().filter(|n| n.contains('H')).count() == layers * heads, "{family}: {:?}", d.names);
            }
            let dirs = [Direction::Diff(5, 9), Direction::Diff(7, 3)];
            let attr = d.direct_logit_attribution(&lens, &dirs).unwrap();
            let total = attr.iter().map(|(_, t)| t.shallow_clone()).reduce(|a, b| a + b).unwrap();
            // the lens at the final residual: the model's logit difference (Gemma 2 caps its logits after)
            for (i, (a, b)) in [(5i64, 9i64), (7, 3)].into_iter().enumerate() {
                let want = if family == "gemma2" {
                    let x = d.final_resid.get(i as i64);
                    let stats = hook_analysis::NormStats {
                        mean: x.mean_dim(-1, false, Kind::Float),
                        variance: x.var_dim(-1, false, false),
                        second_moment: x.square().mean_dim(-1, false, Kind::Float),
                    };
                    let normed = lens.norm.apply(&x, &stats, None).unwrap();
                    normed.matmul(&(lens.unembed.get(a) - lens.unembed.get(b)))
                } else {
                    let l = d.logits.get(i as i64).to_kind(Kind::Float);
                    l.select(-1, a) - l.select(-1, b)
                };
                let got = total.get(i as i64);
                let scale = want.abs().max().double_value(&[]).max(1.0);
                let e = (&got - &want).abs().max().double_value(&[]) / scale;
                assert!(e < 1e-4, "{family} (per head {per_head}) example {i}: attributions sum to {got:?}, the logit difference is {want:?}");
            }
        }
    }
    let _ = Metric::LogitDiff;
}

#[test]
fn bad_positions_and_directions_are_errors() {
    let (ids, mask) = common::inputs();
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let e = Decomposition::run(&mut m, &ids, &mask, &[7], false).unwrap_err().to_string();
    assert!(e.contains("position 7 is out of range for 7 tokens"), "{e}");
    let d = Decomposition::run(&mut m, &ids, &mask, &[-1], false).unwrap();
    let lens = LogitLens::from_model(&m).unwrap();
    assert!(d.direct_logit_attribution(&lens, &[Direction::Token(1)]).unwrap_err().to_string().contains("one per example"));
    assert!(d.direct_logit_attribution(&lens, &[Direction::Token(1), Direction::Token(1000)]).unwrap_err().to_string().contains("valid ids are 0..256"));
}
