//! Generation with the KV cache: greedy tokens equal transformers' `generate` (with its own KV
//! cache) on every family, for a batch of prompts of mixed length and with a steering vector;
//! every step's logits equal a full forward over the whole text; sampling is seeded; each row
//! stops at its own end-of-sequence token; the extraction holds what a full forward holds at
//! each new token; edits go away afterwards; bad input is refused by name.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use std::process::Command;

use hook_analysis::{generate, Apply, Edits, GenerateOptions, Steering};
use hook_torch::{ExtractionConfig, HookedModule, Intervention, KvCache, PatchValue, RunSpec};
use tch::{Device, Kind, Tensor};

use common::FAMILIES;

fn prompts() -> Vec<Vec<i64>> {
    vec![vec![5, 9, 12, 40, 7, 33, 21, 8], vec![11, 4], vec![6, 7, 8, 9, 10]]
}

/// transformers' `generate(do_sample=False)` (its own KV cache) on the eager model the export
/// was traced from, on the left-padded batch of `prompts`; with `steer = (layer, seed, scale)`
/// a forward hook adds `scale * randn(d_model)` (seeded) to that layer's output at every
/// forward.
fn hf_greedy(family: &str, prompts: &[Vec<i64>], n: usize, steer: Option<(usize, u64, f64)>) -> Vec<Vec<i64>> {
    let script = r#"
import sys, json, torch
sys.path.insert(0, sys.argv[1])
import export
family, n, prompts, steer = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
torch.manual_seed(0)
cfg = export.config_for(family, {})
cfg._attn_implementation = "eager"
model = export.model_for_config(cfg).eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
if steer:
    layer, seed, scale = steer
    v = torch.load(sys.argv[6])
    layers = model.get_submodule(export.LAYOUTS[family]["layers"])
    def add(module, args, out):
        if isinstance(out, tuple):
            return (out[0] + scale * v,) + tuple(out[1:])
        return out + scale * v
    layers[layer].register_forward_hook(add)
longest = max(len(p) for p in prompts)
ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, min_new_tokens=n)
print(json.dumps(out[:, longest:].tolist()))
"#;
    let dir = tempfile::tempdir().unwrap();
    let vector = dir.path().join("v.pt");
    let mut cmd = Command::new(common::python());
    cmd.args(["-c", script]).arg(common::root().join("xtask/python")).args([family, &n.to_string(), &serde_json::to_string(prompts).unwrap()]);
    match steer {
        Some((layer, seed, scale)) => {
            let v = steering_vector(family, seed);
            // a plain list, so the Python side needs no Rust file format
            let py = format!("import torch; torch.save(torch.tensor({:?}), {:?})", Vec::<f32>::try_from(&v).unwrap(), vector.to_str().unwrap());
            assert!(Command::new(common::python()).args(["-c", &py]).status().unwrap().success());
            cmd.arg(serde_json::to_string(&(layer, seed, scale)).unwrap()).arg(&vector);
        }
        None => {
            cmd.arg("null");
        }
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim().lines().last().unwrap()).unwrap()
}

fn steering_vector(family: &str, seed: u64) -> Tensor {
    let m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
    let d = m.require_description().unwrap().hidden_size as i64;
    tch::manual_seed(seed as i64);
    Tensor::randn([d], (Kind::Float, Device::Cpu))
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, ..Default::default() }
}

#[test]
fn greedy_tokens_of_a_mixed_length_batch_equal_hf_generate_on_every_family() {
    for family in FAMILIES {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let ours = generate(&mut m, &prompts(), &greedy(10), &Edits::default(), &mut |_| {}).unwrap();
        assert_eq!(ours.tokens, hf_greedy(family, &prompts(), 10, None), "{family}");
        // one prompt at a time gives the same tokens as the batch
        let alone = generate(&mut m, &prompts(), &GenerateOptions { batch_size: 1, ..greedy(10) }, &Edits::default(), &mut |_| {}).unwrap();
        assert_eq!(alone.tokens, ours.tokens, "{family}: batch of 1");
        // a prefill fed in pieces (6 tokens per forward: 2 columns of the 3 rows; the first
        // piece is all padding in two rows) gives the same tokens as the whole prompt at once
        let pieces = generate(&mut m, &prompts(), &GenerateOptions { max_prefill_tokens: 6, ..greedy(10) }, &Edits::default(), &mut |_| {}).unwrap();
        assert_eq!(pieces.tokens, ours.tokens, "{family}: prefill in pieces");
        let whole = generate(&mut m, &prompts(), &GenerateOptions { max_prefill_tokens: 0, ..greedy(10) }, &Edits::default(), &mut |_| {}).unwrap();
        assert_eq!(whole.tokens, ours.tokens, "{family}: prefill at once");
    }
}

#[test]
fn a_steering_vector_at_every_forward_equals_hf_generate_with_a_forward_hook() {
    for family in ["llama", "gpt2", "gemma2"] {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let steer = Steering { layer: 0, vector: steering_vector(family, 3), scale: 4.0, at: Apply::All };
        let edits = Edits { steering: Some(&steer), ..Edits::default() };
        let ours = generate(&mut m, &prompts(), &greedy(8), &edits, &mut |_| {}).unwrap();
        let plain = generate(&mut m, &prompts(), &greedy(8), &Edits::default(), &mut |_| {}).unwrap();
        assert_ne!(ours.tokens, plain.tokens, "{family}: the vector changes the text");
        assert_eq!(ours.tokens, hf_greedy(family, &prompts(), 8, Some((0, 3, 4.0))), "{family}");
    }
}

/// max |a - b| / max(max |a|, 1)
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let scale = a.abs().max().double_value(&[]).max(1.0);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn every_steps_logits_equal_a_full_forward_over_the_whole_text() {
    for family in FAMILIES {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&[0i64, 0, 0, 5, 9, 12, 40, 7, 33, 21, 8, 11, 4, 6, 7]).view([3, 5]);
        let mask = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([3, 5]);
        let mut cache = KvCache::new(&m, 3, 4).unwrap(); // grows past 4 tokens
        // the prompt in two pieces: 2 tokens (all padding in row 0), then 3 after them
        let first = m.step(&ids.narrow(1, 0, 2), &mask.narrow(1, 0, 2), &mut cache, RunSpec::default()).unwrap().logits.unwrap();
        assert_eq!(first.size(), [3, 1, 256], "{family}: a step's logits are its last token's");
        let full = m.run(&ids.narrow(1, 0, 2), &mask.narrow(1, 0, 2), RunSpec::default()).unwrap().logits.unwrap().narrow(1, -1, 1);
        let d = relative(&full.narrow(0, 1, 2), &first.narrow(0, 1, 2));
        assert!(d < 1e-5, "{family} first piece of the prefill: {d}");
        let first = m.step(&ids.narrow(1, 2, 3), &mask, &mut cache, RunSpec::default()).unwrap().logits.unwrap();
        let full = m.run(&ids, &mask, RunSpec::default()).unwrap().logits.unwrap().narrow(1, -1, 1);
        let d = relative(&full, &first);
        assert!(d < 1e-5, "{family} prefill: {d}");
        let (mut text, mut mask) = (ids, mask);
        let mut logits = first;
        for step in 0..12 {
            let next = logits.select(1, -1).argmax(-1, true);
            text = Tensor::cat(&[text, next.shallow_clone()], 1);
            mask = Tensor::cat(&[mask.shallow_clone(), next.ones_like()], 1);
            logits = m.step(&next, &mask, &mut cache, RunSpec::default()).unwrap().logits.unwrap();
            let full = m.run(&text, &mask, RunSpec::default()).unwrap().logits.unwrap().narrow(1, -1, 1);
            let d = relative(&full, &logits);
            assert!(d < 1e-5, "{family} step {step}: {d} of the largest logit");
        }
        assert_eq!(cache.len(), 17);
    }
}

#[test]
fn sampling_is_seeded_and_each_row_stops_at_its_own_eos() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let o = GenerateOptions { max_new_tokens: 6, temperature: 1.0, top_k: Some(50), top_p: Some(0.9), seed: 7, ..Default::default() };
    let run = |m: &mut HookedModule, o: &GenerateOptions| generate(m, &prompts(), o, &Edits::default(), &mut |_| {}).unwrap().tokens;
    assert_eq!(run(&mut m, &o), run(&mut m, &o), "the same seed gives the same tokens");
    let long = GenerateOptions { max_new_tokens: 24, ..o.clone() };
    assert_ne!(run(&mut m, &GenerateOptions { seed: 8, ..long.clone() }), run(&mut m, &GenerateOptions { seed: 9, ..long }), "other seeds, other tokens");
    // top_k = 1 is greedy
    let plain = run(&mut m, &greedy(6));
    assert_eq!(run(&mut m, &GenerateOptions { top_k: Some(1), ..o.clone() }), plain);
    // a row stops at its eos; the others go on to the limit
    let eos = plain[1][1];
    let stopped = run(&mut m, &GenerateOptions { eos: Some(eos), ..greedy(6) });
    for (row, (got, all)) in stopped.iter().zip(&plain).enumerate() {
        let cut = all.iter().position(|&t| t == eos).map_or(all.len(), |i| i + 1);
        assert_eq!(got, &all[..cut].to_vec(), "row {row}");
    }
    assert_eq!(stopped[1].len(), 2);
    let mut seen = Vec::new();
    generate(&mut m, &prompts(), &GenerateOptions { batch_size: 2, ..greedy(2) }, &Edits::default(), &mut |n| seen.push(n)).unwrap();
    assert_eq!(seen, vec![2, 3], "progress after each batch");
}

#[test]
fn the_extraction_holds_what_a_full_forward_holds_at_each_new_token() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let config = ExtractionConfig::default().with_flags(&["resid_out", "head_values"]).unwrap();
    let edits = Edits { extraction: Some(&config), ..Edits::default() };
    let prompt = vec![vec![5i64, 9, 12, 40, 7]];
    let out = generate(&mut m, &prompt, &greedy(4), &edits, &mut |_| {}).unwrap();
    let steps = &out.caches[0];
    assert_eq!(steps.len(), 4, "one cache per new token");
    let text: Vec<i64> = prompt[0].iter().chain(&out.tokens[0]).copied().collect();
    let groups = "[[-1]]".parse().unwrap();
    for (i, step) in steps.iter().enumerate() {
        // the activations that produced new token i sit at position 4 + i of the text
        let upto = Tensor::from_slice(&text[..5 + i]).view([1, -1]);
        let full = m.run_with_cache(&upto, &upto.ones_like(), &groups, &config).unwrap().1;
        assert_eq!(step.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
        for key in ["resid_out_1", "head_values_L0H1"].iter().filter(|k| full.contains(k)) {
            let (a, b) = (step.tensor(key).unwrap(), full.tensor(key).unwrap());
            assert_eq!(a.size(), b.size(), "{key}");
            assert!(relative(b, a) < 1e-5, "step {i} {key}");
        }
    }
}

#[test]
fn edits_apply_where_they_say_and_go_away_then_bad_input_is_refused() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let o = greedy(8);
    let none = Edits::default();
    let plain = generate(&mut m, &prompts(), &o, &none, &mut |_| {}).unwrap().tokens;
    tch::manual_seed(3);
    let vector = Tensor::randn([64], (Kind::Float, Device::Cpu));
    let steer = |at| Steering { layer: 0, vector: vector.shallow_clone(), scale: 20.0, at };
    let new_only = steer(Apply::NewTokens);
    let steered = generate(&mut m, &prompts(), &o, &Edits { steering: Some(&new_only), ..Edits::default() }, &mut |_| {}).unwrap().tokens;
    assert_ne!(plain, steered, "a large steering vector changes the continuation");
    for (p, s) in plain.iter().zip(&steered) {
        assert_eq!(p[0], s[0], "the first new token is read at the prompt, which new-token steering leaves alone");
    }
    let prompt_only = steer(Apply::Prompt);
    let at_prompt = generate(&mut m, &prompts(), &o, &Edits { steering: Some(&prompt_only), ..Edits::default() }, &mut |_| {}).unwrap().tokens;
    assert_ne!(at_prompt, plain);
    let ablate = [Intervention::Resid { component: "model.layers[1].output".into(), positions: vec![-1], patch: PatchValue::Ablation }];
    let ablated = generate(&mut m, &prompts(), &o, &Edits { interventions: &ablate, interventions_at: Apply::All, ..Edits::default() }, &mut |_| {}).unwrap();
    assert_ne!(plain, ablated.tokens);
    assert_eq!(generate(&mut m, &prompts(), &o, &none, &mut |_| {}).unwrap().tokens, plain, "nothing stays attached");
    // bad input
    let mut bad = |s: Steering| generate(&mut m, &prompts(), &o, &Edits { steering: Some(&s), ..Edits::default() }, &mut |_| {}).unwrap_err().to_string();
    assert!(bad(Steering { layer: 9, ..steer(Apply::All) }).contains("layers 0..2"));
    assert!(bad(Steering { vector: Tensor::zeros([3], (Kind::Float, Device::Cpu)), ..steer(Apply::All) }).contains("needs [64]"));
    drop(bad);
    let mut err = |p: &[Vec<i64>], o: &GenerateOptions| generate(&mut m, p, o, &none, &mut |_| {}).unwrap_err().to_string();
    assert!(err(&[vec![5], vec![]], &o).contains("prompt 1 is empty"));
    assert!(err(&prompts(), &GenerateOptions { top_p: Some(1.5), temperature: 1.0, ..o.clone() }).contains("top_p"));
    assert!(err(&prompts(), &GenerateOptions { batch_size: 0, ..o.clone() }).contains("batch_size"));
    assert!(err(&prompts(), &GenerateOptions { eos: Some(999), ..o.clone() }).contains("eos token 999"));
    assert!(err(&[vec![5, 300]], &o).contains("out of the vocabulary"));
    drop(err);
    // a step whose mask does not cover the cache is refused, naming the shapes
    let mut cache = KvCache::new(&m, 1, 8).unwrap();
    let one = Tensor::from_slice(&[5i64]).view([1, 1]);
    let e = m.step(&one, &Tensor::ones([1, 3], (Kind::Int64, Device::Cpu)), &mut cache, RunSpec::default()).unwrap_err().to_string();
    assert!(e.contains("attention_mask [1, 1]"), "{e}");
}
