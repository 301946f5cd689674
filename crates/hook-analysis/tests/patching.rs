//! Patching and ablation sweeps: the metric is what it says (logit difference, summed
//! log-probabilities), patching the last layer's residual restores the clean run, dataset
//! results are the mean of the per-pair ones, and ablations edit what they name.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use hook_analysis::patching::{ablate_sweep, answer_metric, patch_sweep, Ablation, Batching, Part, PatchPair, Positions, Prompt};
use hook_torch::{ExtractionConfig, HookedModule, Intervention, PatchValue};
use tch::{Device, Kind, Tensor};

/// The batch budget of the sweeps under test (the CLI's default).
const B: Batching = Batching { max_tokens: hook_analysis::patching::DEFAULT_BATCH_TOKENS, share_prefix: true };
/// The reference: one plain forward per cell.
const ONE: Batching = Batching::ONE_PER_CELL;

fn model(family: &str) -> HookedModule {
    HookedModule::load(common::model(family), Device::Cpu).unwrap()
}

fn logits(m: &mut HookedModule, ids: &[i64]) -> Tensor {
    let t = Tensor::from_slice(ids).view([1, -1]);
    m.forward(&t, &t.ones_like()).unwrap().get(0).to_kind(Kind::Double)
}

fn pairs() -> Vec<PatchPair> {
    vec![
        PatchPair { clean: vec![1, 5, 9, 12, 7], corrupted: vec![1, 6, 9, 12, 7], answer: vec![20], wrong: vec![21] },
        PatchPair { clean: vec![1, 30, 31, 32, 33], corrupted: vec![1, 30, 40, 32, 33], answer: vec![22], wrong: vec![23] },
    ]
}

#[test]
fn the_metric_is_the_logit_difference_or_the_summed_log_probabilities() {
    let mut m = model("llama");
    let prompt = [1i64, 5, 9, 12];
    let last = logits(&mut m, &prompt).get(-1);
    let ld = answer_metric(&mut m, &prompt, &[20], &[21], &[]).unwrap();
    assert!((ld - (last.double_value(&[20]) - last.double_value(&[21]))).abs() < 1e-9);
    // two-token answer against a one-token wrong answer, by hand
    let with_answer = logits(&mut m, &[1, 5, 9, 12, 20]).log_softmax(-1, Kind::Double);
    let lp_answer = with_answer.double_value(&[3, 20]) + with_answer.double_value(&[4, 30]);
    let lp_wrong = logits(&mut m, &prompt).log_softmax(-1, Kind::Double).double_value(&[3, 21]);
    let got = answer_metric(&mut m, &prompt, &[20, 30], &[21], &[]).unwrap();
    assert!((got - (lp_answer - lp_wrong)).abs() < 1e-6, "{got} vs {}", lp_answer - lp_wrong);
    assert!(answer_metric(&mut m, &prompt, &[], &[21], &[]).unwrap_err().to_string().contains("at least one token"));
}

#[test]
fn patching_the_last_residual_restores_the_clean_run_and_datasets_average() {
    for family in ["llama", "gpt2"] {
        let mut m = model(family);
        let layers = m.description().unwrap().num_hidden_layers;
        let ps = pairs();
        let both = patch_sweep(&mut m, &ps, Part::Resid, &Positions::All, true, B).unwrap();
        assert_eq!((both.rows.len(), both.cols.len()), (layers, 5));
        // the last layer's residual at the last position is everything the logits see
        let last = both.score()[layers - 1][4];
        assert!((last - 1.0).abs() < 1e-4, "{family}: {last}");
        // a dataset's metric is the mean of its pairs'
        let one = patch_sweep(&mut m, &ps[..1], Part::Resid, &Positions::All, true, B).unwrap();
        let two = patch_sweep(&mut m, &ps[1..], Part::Resid, &Positions::All, true, B).unwrap();
        for r in 0..layers {
            for c in 0..5 {
                let mean = (one.values[r][c] + two.values[r][c]) / 2.0;
                assert!((both.values[r][c] - mean).abs() < 1e-9, "{family} [{r}][{c}]");
            }
        }
        assert!((both.clean - (one.clean + two.clean) / 2.0).abs() < 1e-12);
        // positions from the end work across lengths; all positions need one length
        let mut ragged = ps.clone();
        ragged[1] = PatchPair { clean: vec![1, 30, 31, 33], corrupted: vec![1, 40, 31, 33], answer: vec![22], wrong: vec![23] };
        let e = patch_sweep(&mut m, &ragged, Part::Resid, &Positions::All, true, B).unwrap_err();
        assert!(e.to_string().contains("different lengths"), "{e}");
        let g = patch_sweep(&mut m, &ragged, Part::Attn, &Positions::These(vec![-1]), true, B).unwrap();
        assert_eq!(g.cols, ["p-1"]);
    }
}

#[test]
fn head_patching_covers_layers_by_heads_or_heads_by_positions() {
    let mut m = model("llama");
    let d = m.description().unwrap().clone();
    let ps = pairs();
    let g = patch_sweep(&mut m, &ps, Part::Heads, &Positions::All, false, B).unwrap();
    assert_eq!((g.rows.len(), g.cols.len()), (d.num_hidden_layers, d.num_attention_heads));
    let g = patch_sweep(&mut m, &ps, Part::Heads, &Positions::These(vec![0, -1]), true, B).unwrap();
    assert_eq!((g.rows.len(), g.cols.len()), (d.num_hidden_layers * d.num_attention_heads, 2));
    assert_eq!(g.rows[1], "L0H1");
    // a pair whose prompts differ in length is refused, naming the pair
    let bad = [PatchPair { clean: vec![1, 2, 3], corrupted: vec![1, 2], answer: vec![5], wrong: vec![6] }];
    let e = patch_sweep(&mut m, &bad, Part::Resid, &Positions::All, true, B).unwrap_err();
    assert!(e.to_string().contains("pair 0"), "{e}");
}

#[test]
fn ablations_edit_what_they_name() {
    let mut m = model("llama"); // no bias in o_proj: every head zeroed is attn_out zeroed
    let d = m.description().unwrap().clone();
    let prompts = [Prompt { ids: vec![1, 5, 9, 12, 7], answer: vec![20], wrong: vec![21] }];
    let g = ablate_sweep(&mut m, &prompts, &[Part::Attn, Part::Mlp, Part::Layer, Part::Heads], Ablation::Zero, &Positions::All, B).unwrap();
    assert_eq!(g.cols.len(), 3 + d.num_attention_heads);
    let l = d.num_hidden_layers - 1;
    let all_heads: Vec<Intervention> = (0..d.num_attention_heads)
        .map(|h| Intervention::QueryKeyValue {
            component: d.component("attn_o_proj_input_hook_name", l).unwrap(),
            positions: (0..5).collect(),
            head: h,
            patch: PatchValue::Ablation,
        })
        .collect();
    let heads_zeroed = answer_metric(&mut m, &prompts[0].ids, &[20], &[21], &all_heads).unwrap();
    assert!((heads_zeroed - g.values[l][0]).abs() < 1e-5, "all heads zeroed {heads_zeroed} vs attn_out zeroed {}", g.values[l][0]);
    assert!((g.score()[l][0] - (g.values[l][0] - g.clean)).abs() < 1e-12);

    // mean ablation of one prompt: the mean over its positions, by hand
    let g = ablate_sweep(&mut m, &prompts, &[Part::Mlp], Ablation::Mean, &Positions::These(vec![-1]), B).unwrap();
    let t = Tensor::from_slice(&prompts[0].ids).view([1, -1]);
    let cfg = ExtractionConfig { save_logits: false, ..ExtractionConfig::default().with_flags(&["mlp_out"]).unwrap() };
    let (_, cache) = m.run_with_cache(&t, &t.ones_like(), &hook_core::TokenGroups::all(5).unwrap(), &cfg).unwrap();
    let mean = cache.tensor("mlp_out_0").unwrap().mean_dim(&[1i64][..], true, Kind::Float);
    let iv = Intervention::Resid { component: d.component("mlp_out_hook_name", 0).unwrap(), positions: vec![4], patch: PatchValue::Values(mean) };
    let by_hand = answer_metric(&mut m, &prompts[0].ids, &[20], &[21], &[iv]).unwrap();
    assert!((by_hand - g.values[0][0]).abs() < 1e-5, "{by_hand} vs {}", g.values[0][0]);
    assert!(ablate_sweep(&mut m, &prompts, &[Part::Resid], Ablation::Zero, &Positions::All, B).is_err());
}

/// A batched sweep (its cells as the rows of one forward), with and without the shared prefix
/// (each layer's cells forked from one run up to that layer), against one plain forward per
/// cell, on every family, every part, patching and ablation, one-token and multi-token
/// answers: equal within 1e-5 of the metric's range.
#[test]
fn batched_sweeps_equal_one_forward_per_cell() {
    let whole = Batching { share_prefix: false, ..B };
    for family in common::FAMILIES {
        let mut m = model(family);
        let ps = pairs();
        for (part, each) in [(Part::Resid, true), (Part::Attn, true), (Part::Mlp, true), (Part::Heads, false), (Part::Heads, true)] {
            let single = patch_sweep(&mut m, &ps, part, &Positions::All, each, ONE).unwrap();
            for batching in [B, whole] {
                let batched = patch_sweep(&mut m, &ps, part, &Positions::All, each, batching).unwrap();
                assert_close(&batched.values, &single.values, (batched.clean - batched.corrupted.unwrap()).abs(), &format!("{family} patch {part:?} {batching:?}"));
            }
        }
        // a budget smaller than a layer's cells: several forks of one layer, the last one short
        let three = patch_sweep(&mut m, &ps, Part::Resid, &Positions::All, true, Batching { max_tokens: 3 * 5, ..B }).unwrap();
        let single = patch_sweep(&mut m, &ps, Part::Resid, &Positions::All, true, ONE).unwrap();
        assert_close(&three.values, &single.values, (three.clean - three.corrupted.unwrap()).abs(), &format!("{family} three rows a batch"));
        let prompts = [
            Prompt { ids: vec![1, 5, 9, 12, 7], answer: vec![20], wrong: vec![21] },
            Prompt { ids: vec![1, 30, 31, 32], answer: vec![22, 24], wrong: vec![23] },
        ];
        for mode in [Ablation::Zero, Ablation::Mean] {
            let parts = [Part::Attn, Part::Mlp, Part::Layer, Part::Heads];
            let single = ablate_sweep(&mut m, &prompts, &parts, mode, &Positions::All, ONE).unwrap();
            for batching in [B, whole] {
                let batched = ablate_sweep(&mut m, &prompts, &parts, mode, &Positions::All, batching).unwrap();
                let range = batched.values.iter().flatten().chain([&batched.clean]).fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                assert_close(&batched.values, &single.values, range.1 - range.0, &format!("{family} ablate {mode:?} {batching:?}"));
            }
        }
    }
}

/// A patch at the embedding (outside the layers) cannot fork: such cells run through the
/// whole model beside the forked ones, with the same numbers.
#[test]
fn cells_outside_the_layers_run_whole_beside_forked_ones() {
    let mut m = model("llama");
    let d = m.description().unwrap().clone();
    let prompt = [1i64, 5, 9, 12, 7];
    let embed = d.component("embed_tokens", 0).unwrap();
    let cells = vec![
        vec![Intervention::Resid { component: embed, positions: vec![1], patch: PatchValue::Ablation }],
        vec![Intervention::Resid { component: d.component("mlp_out_hook_name", 1).unwrap(), positions: vec![2], patch: PatchValue::Ablation }],
        vec![],
    ];
    let fast = hook_analysis::patching::answer_metrics(&mut m, &prompt, &[20], &[21], &cells, B).unwrap();
    for (i, cell) in cells.iter().enumerate() {
        let alone = answer_metric(&mut m, &prompt, &[20], &[21], cell).unwrap();
        assert!((fast[i] - alone).abs() < 1e-5 * alone.abs().max(1.0), "cell {i}: {} vs {alone}", fast[i]);
    }
    assert!((fast[0] - fast[2]).abs() > 1e-6, "the embedding patch changed the metric");
}

fn assert_close(got: &[Vec<f64>], want: &[Vec<f64>], range: f64, what: &str) {
    assert!(range > 0.0, "{what}: the metric has no range");
    let worst = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst <= 1e-5 * range, "{what}: batched and one forward per cell differ by {worst:.2e} (range {range:.3})");
}

/// The shared prefix is really shared: cells that all patch the last layer leave the layers
/// before it to batches of one row (the plain control forward and the fork's one example),
/// and the last layer sees one row per cell plus the fork's control row; without sharing, the
/// first layer sees every cell.
#[test]
fn a_shared_prefix_runs_the_layers_before_the_patch_once() {
    use std::sync::{Arc, Mutex};
    let mut m = model("llama");
    let d = m.description().unwrap().clone();
    let last = d.num_hidden_layers - 1;
    let prompt = [1i64, 5, 9, 12, 7];
    let cells: Vec<Vec<Intervention>> = (0..4)
        .map(|q| vec![Intervention::Resid { component: d.component("residual_stream_hook_name", last).unwrap(), positions: vec![q], patch: PatchValue::Ablation }])
        .collect();
    let mut seen = Vec::new();
    for layer in [0, last] {
        let rows: Arc<Mutex<Vec<i64>>> = Arc::default();
        let r = rows.clone();
        let hook = move |_: &hook_core::HookContext<'_>, io: &hook_core::HookIo<Tensor>| -> hook_core::Result<Option<Tensor>> {
            r.lock().unwrap().push(io.main_tensor()?.size()[0]);
            Ok(None)
        };
        m.add_hook(&d.component("residual_stream_input_hook_name", layer).unwrap(), hook).unwrap();
        seen.push(rows);
    }
    let shared = hook_analysis::patching::answer_metrics(&mut m, &prompt, &[20], &[21], &cells, B).unwrap();
    let (first, at_last) = (seen[0].lock().unwrap().clone(), seen[1].lock().unwrap().clone());
    assert!(first.iter().all(|&b| b == 1), "the first layer saw batches of {first:?}");
    assert!(at_last.contains(&5), "the last layer saw batches of {at_last:?}, not the 4 cells and the control row");
    seen[0].lock().unwrap().clear();
    let whole = hook_analysis::patching::answer_metrics(&mut m, &prompt, &[20], &[21], &cells, Batching { share_prefix: false, ..B }).unwrap();
    assert_eq!(*seen[0].lock().unwrap(), [4], "without sharing the first layer runs every cell");
    for (a, b) in shared.iter().zip(&whole) {
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}
