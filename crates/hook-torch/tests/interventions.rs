//! Interventions and activation patching on a tiny model.

mod common;

use hook_torch::{HookedModule, Intervention, PatchValue};
use tch::{Device, Kind, Tensor};

#[test]
fn patching_the_last_residual_from_the_clean_run_gives_the_clean_logits() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let clean = Tensor::from_slice(&[5i64, 9, 12, 40, 7]).view([1, 5]);
    let corrupted = Tensor::from_slice(&[5i64, 9, 99, 40, 7]).view([1, 5]);
    let ones = clean.ones_like();
    let clean_logits = m.forward(&clean, &ones).unwrap();
    let corrupted_logits = m.forward(&corrupted, &ones).unwrap();
    assert!(!clean_logits.allclose(&corrupted_logits, 1e-5, 1e-5, false));
    let all: Vec<i64> = (0..5).collect();
    let patched = m
        .patch_activations((&clean, &ones), (&corrupted, &ones), &[("model.layers[1].output".to_string(), all)])
        .unwrap();
    assert!(patched.allclose(&clean_logits, 1e-5, 1e-5, false));
    // patching only position 1 (before the corruption) changes nothing
    let patched = m.patch_activations((&clean, &ones), (&corrupted, &ones), &[("model.layers[0].output".to_string(), vec![1])]).unwrap();
    assert!(patched.allclose(&corrupted_logits, 1e-6, 1e-6, false));
}

#[test]
fn ablations_and_their_errors() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let base = m.forward(&ids, &mask).unwrap();
    let zero_heads = Intervention::Heads { layer: 0, heads: vec![0, 1, 2, 3] };
    let zero_attn = Intervention::Resid { component: "model.layers[0].self_attn.o_proj.input".into(), positions: (0..7).collect(), patch: PatchValue::Ablation };
    let (one, one_mask) = (ids.narrow(0, 0, 1), mask.narrow(0, 0, 1));
    let a = m.run_with_interventions(&one, &one_mask, &[zero_heads.clone()]).unwrap();
    assert!(!a.allclose(&base.narrow(0, 0, 1), 1e-5, 1e-5, false));
    // a zero pattern in every head == a zero input of o_proj (no bias) at every position
    let b = m.run_with_interventions(&one, &one_mask, &[zero_attn]).unwrap();
    assert!(a.allclose(&b, 1e-5, 1e-5, false));
    // batched: the padded example is ablated too
    let ab = m.run_with_interventions(&ids, &mask, &[zero_heads]).unwrap();
    assert!(ab.narrow(0, 0, 1).allclose(&a, 1e-5, 1e-5, false));
    let multiply_one = Intervention::AttentionMatrix { layer: 1, q_positions: vec![3], k_positions: vec![0, 1], head: 2, multiplication_value: 1.0, patch: PatchValue::Ablation, apply_softmax: false };
    assert!(m.run_with_interventions(&ids, &mask, &[multiply_one]).unwrap().allclose(&base, 1e-6, 1e-6, false));
    let bad = Intervention::Resid { component: "model.layers[0].output".into(), positions: vec![1], patch: PatchValue::Values(Tensor::zeros([2, 2, 64], (Kind::Float, Device::Cpu))) };
    let e = m.run_with_interventions(&ids, &mask, &[bad]).unwrap_err().to_string();
    assert!(e.contains("patching_values has shape [1, 2, 64], expected [1, 1, 64]") || e.contains("patching_values has shape [2, 2, 64], expected [2, 1, 64]"), "{e}");
    let e = m
        .run_with_interventions(&ids, &mask, &[Intervention::QueryKeyValue { component: "model.layers[0].self_attn.k_proj.output".into(), positions: vec![0], head: 5, patch: PatchValue::Ablation }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("head 5 is out of range: the layer has 2 heads"), "{e}");
    assert!(m.forward(&ids, &mask).unwrap().equal(&base), "the module is still usable");
}

#[test]
fn qkv_head_names_the_site_and_the_part_on_every_layout() {
    use hook_ops::Qkv;
    let (ids, mask) = common::inputs();
    // separate projections: the same as QueryKeyValue on k_proj
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let by_layer = Intervention::QkvHead { layer: 0, which: Qkv::Key, positions: vec![1, 2], head: 1, patch: PatchValue::Ablation };
    let by_name = Intervention::QueryKeyValue { component: "model.layers[0].self_attn.k_proj.output".into(), positions: vec![1, 2], head: 1, patch: PatchValue::Ablation };
    let a = m.run_with_interventions(&ids, &mask, &[by_layer]).unwrap();
    assert!(a.equal(&m.run_with_interventions(&ids, &mask, &[by_name]).unwrap()));
    assert!(!a.allclose(&m.forward(&ids, &mask).unwrap(), 1e-5, 1e-5, false));
    // fused projections: overwriting a head's queries with what they already are changes
    // nothing; ablating them changes the logits; a bad head is an error naming the range
    for family in ["gpt2", "gpt_neox", "phi3"] {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let base = m.forward(&ids, &mask).unwrap();
        let cfg = hook_torch::ExtractionConfig::default().with_flags(&["head_values"]).unwrap();
        let one = (ids.narrow(0, 0, 1), mask.narrow(0, 0, 1));
        let (_, cache) = m.run_with_cache(&one.0, &one.1, &"[(0, 1, 2, 3, 4, 5, 6)]".parse().unwrap(), &cfg).unwrap();
        // query head 0 reads kv head 0 (Phi-3 has 2 kv heads, GPT-2 and NeoX 4)
        let v = cache.get("head_values_L1H0").unwrap().tensors()[0].shallow_clone();
        let same = Intervention::QkvHead { layer: 1, which: Qkv::Value, positions: (0..7).collect(), head: 0, patch: PatchValue::Values(v) };
        let got = m.run_with_interventions(&one.0, &one.1, &[same]).unwrap();
        assert!(got.allclose(&base.narrow(0, 0, 1), 1e-6, 1e-6, false), "{family}: writing the values back changed the logits");
        let ablate = Intervention::QkvHead { layer: 1, which: Qkv::Value, positions: vec![3], head: 1, patch: PatchValue::Ablation };
        let got = m.run_with_interventions(&ids, &mask, &[ablate]).unwrap();
        assert!(!got.allclose(&base, 1e-5, 1e-5, false), "{family}: the ablation did nothing");
        let bad = Intervention::QkvHead { layer: 0, which: Qkv::Query, positions: vec![0], head: 9, patch: PatchValue::Ablation };
        let e = m.run_with_interventions(&ids, &mask, &[bad]).unwrap_err().to_string();
        assert!(e.contains("head 9 is out of range"), "{family}: {e}");
        assert!(m.forward(&ids, &mask).unwrap().equal(&base), "{family}: still usable");
    }
}

#[test]
fn each_row_of_a_batch_takes_its_own_interventions() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 12, 40, 7]).view([1, 5]);
    let ones = ids.ones_like();
    let site = "model.layers[0].output".to_string();
    let cells: Vec<Vec<Intervention>> = vec![
        vec![],
        vec![Intervention::Resid { component: site.clone(), positions: vec![1], patch: PatchValue::Ablation }],
        vec![
            Intervention::Resid { component: site.clone(), positions: vec![-1], patch: PatchValue::Values(Tensor::full([1, 1, 64], 0.5, (Kind::Float, Device::Cpu))) },
            Intervention::Heads { layer: 1, heads: vec![0, 2] },
        ],
    ];
    let batch = ids.repeat([3, 1]);
    let spec = hook_torch::RunSpec { row_interventions: &cells, ..Default::default() };
    let rows = m.run(&batch, &batch.ones_like(), spec).unwrap().logits.unwrap();
    for (i, cell) in cells.iter().enumerate() {
        let alone = m.run_with_interventions(&ids, &ones, cell).unwrap();
        assert!(rows.get(i as i64).unsqueeze(0).allclose(&alone, 1e-5, 1e-5, false), "row {i}");
    }
    assert!(!rows.get(0).allclose(&rows.get(1), 1e-5, 1e-5, false), "the interventions changed the rows");
    // one list per example, or an error that says so
    let e = m.run(&batch, &batch.ones_like(), hook_torch::RunSpec { row_interventions: &cells[..2], ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("one list per example"), "{e}");
}

/// A fork runs one example up to a layer's input and the rest of the model on one copy per
/// row: on every family it equals the plain batch of copies with the same row interventions,
/// and the kept logit positions equal those positions of the full logits.
#[test]
fn a_fork_equals_the_batch_of_copies_on_every_family() {
    for family in common::FAMILIES {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let d = m.description().unwrap().clone();
        let (l, hidden) = (d.num_hidden_layers - 1, d.hidden_size as i64);
        let ids = Tensor::from_slice(&[5i64, 9, 12, 40, 7, 3]).view([1, 6]);
        let out = |p: &str| d.component(p, l).unwrap();
        let cells: Vec<Vec<Intervention>> = vec![
            vec![],
            vec![Intervention::Resid { component: out("residual_stream_hook_name"), positions: vec![0], patch: PatchValue::Ablation }],
            vec![Intervention::Resid { component: out("mlp_out_hook_name"), positions: vec![-1], patch: PatchValue::Values(Tensor::full([1, 1, hidden], 0.5, (Kind::Float, Device::Cpu))) }],
            vec![Intervention::QueryKeyValue { component: out("attn_o_proj_input_hook_name"), positions: vec![0, 2], head: 1, patch: PatchValue::Ablation }],
        ];
        let batch = ids.repeat([4, 1]);
        let plain = m.run(&batch, &batch.ones_like(), hook_torch::RunSpec { row_interventions: &cells, ..Default::default() }).unwrap().logits.unwrap();
        let fork = Some(hook_torch::Fork { component: out("residual_stream_input_hook_name"), rows: 4 });
        let spec = hook_torch::RunSpec { row_interventions: &cells, fork, logit_positions: Some(vec![0, -1]), ..Default::default() };
        let forked = m.run(&ids, &ids.ones_like(), spec).unwrap().logits.unwrap();
        assert_eq!(forked.size(), [4, 2, d.vocab_size as i64], "{family}");
        let want = plain.index_select(1, &Tensor::from_slice(&[0i64, 5]));
        let scale = want.abs().max().double_value(&[]);
        let worst = (&forked - &want).abs().max().double_value(&[]);
        assert!(worst <= 1e-5 * scale, "{family}: the fork differs from the plain batch by {worst:.2e} (logits up to {scale:.2})");
        for i in 1..4 {
            assert!(!forked.get(0).allclose(&forked.get(i), 1e-5, 1e-5, false), "{family}: row {i}'s intervention changed nothing");
        }
    }
}

#[test]
fn a_fork_refuses_what_it_cannot_do() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 12]).view([1, 3]);
    let fork = |rows| Some(hook_torch::Fork { component: "model.layers[1].input".into(), rows });
    let run = |m: &mut HookedModule, ids: &Tensor, spec: hook_torch::RunSpec<'_>| m.run(ids, &ids.ones_like(), spec).unwrap_err().to_string();
    let two = ids.repeat([2, 1]);
    assert!(run(&mut m, &two, hook_torch::RunSpec { fork: fork(2), ..Default::default() }).contains("input_ids [1, seq]"));
    assert!(run(&mut m, &ids, hook_torch::RunSpec { fork: fork(0), ..Default::default() }).contains("at least one row"));
    let early = vec![vec![], vec![Intervention::Resid { component: "model.layers[0].output".into(), positions: vec![0], patch: PatchValue::Ablation }]];
    let e = run(&mut m, &ids, hook_torch::RunSpec { fork: fork(2), row_interventions: &early, ..Default::default() });
    assert!(e.contains("after the fork's site"), "{e}");
    assert!(run(&mut m, &ids, hook_torch::RunSpec { fork: fork(3), row_interventions: &early, ..Default::default() }).contains("one list per row"));
    let e = run(&mut m, &ids, hook_torch::RunSpec { fork: Some(hook_torch::Fork { component: "model.layers[9].input".into(), rows: 2 }), ..Default::default() });
    assert!(e.contains("model.layers[9].input"), "{e}");
    let e = run(&mut m, &ids, hook_torch::RunSpec { logit_positions: Some(vec![3]), ..Default::default() });
    assert!(e.contains("logit_positions") && e.contains("out of range for a sequence of length 3"), "{e}");
    // the module still runs plainly afterwards
    assert_eq!(m.forward(&ids, &ids.ones_like()).unwrap().size()[..2], [1, 3]);
}
