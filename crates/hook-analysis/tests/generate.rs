//! Greedy generation equals HF `generate` on the eager model; sampling is seeded; steering and
//! interventions change what is generated and go away afterwards.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use std::process::Command;

use hook_analysis::{generate, GenerateOptions, Steering};
use hook_torch::{HookedModule, Intervention, PatchValue};
use tch::{Device, Kind, Tensor};

const PROMPT: [i64; 5] = [5, 9, 12, 40, 7];

/// HF `generate(do_sample=False)` on the eager model the export was traced from.
fn hf_greedy(family: &str, n: usize) -> Vec<i64> {
    let script = r#"
import sys, json, torch
sys.path.insert(0, sys.argv[1])
import export
family, n = sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
cfg = export.config_for(family, {})
cfg._attn_implementation = "eager"
model = export.model_for_config(cfg).eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
ids = torch.tensor([[5, 9, 12, 40, 7]])
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, min_new_tokens=n)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"#;
    let o = Command::new(common::python()).args(["-c", script]).arg(common::root().join("xtask/python")).args([family, &n.to_string()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim().lines().last().unwrap()).unwrap()
}

#[test]
fn greedy_tokens_equal_hf_generate() {
    for family in ["llama", "gpt2", "gpt_neox", "qwen3"] {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let ours = generate(&mut m, &PROMPT, &GenerateOptions { max_new_tokens: 8, ..Default::default() }, &[], None).unwrap();
        assert_eq!(ours, hf_greedy(family, 8), "{family}");
    }
}

#[test]
fn sampling_is_seeded_and_filters_apply() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let o = GenerateOptions { max_new_tokens: 6, temperature: 1.0, top_k: Some(50), top_p: Some(0.9), seed: 7, eos: None };
    let a = generate(&mut m, &PROMPT, &o, &[], None).unwrap();
    let b = generate(&mut m, &PROMPT, &o, &[], None).unwrap();
    assert_eq!(a, b, "the same seed gives the same tokens");
    let c = generate(&mut m, &PROMPT, &GenerateOptions { seed: 8, max_new_tokens: 24, ..o.clone() }, &[], None).unwrap();
    let d = generate(&mut m, &PROMPT, &GenerateOptions { seed: 9, max_new_tokens: 24, ..o.clone() }, &[], None).unwrap();
    assert_ne!(c, d, "other seeds, other tokens");
    // top_k = 1 is greedy
    let greedy = generate(&mut m, &PROMPT, &GenerateOptions { max_new_tokens: 6, ..Default::default() }, &[], None).unwrap();
    let k1 = generate(&mut m, &PROMPT, &GenerateOptions { top_k: Some(1), ..o.clone() }, &[], None).unwrap();
    assert_eq!(greedy, k1);
    // eos stops
    let stop = generate(&mut m, &PROMPT, &GenerateOptions { max_new_tokens: 6, eos: Some(greedy[1]), ..Default::default() }, &[], None).unwrap();
    assert_eq!(stop, greedy[..2].to_vec());
}

#[test]
fn steering_and_interventions_change_the_tokens_then_go_away() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let o = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    let plain = generate(&mut m, &PROMPT, &o, &[], None).unwrap();
    tch::manual_seed(3);
    let vector = Tensor::randn([64], (Kind::Float, Device::Cpu));
    let steered = generate(&mut m, &PROMPT, &o, &[], Some(&Steering { layer: 0, vector: vector.shallow_clone(), scale: 20.0 })).unwrap();
    assert_ne!(plain, steered, "a large steering vector changes the continuation");
    assert_eq!(plain[0], steered[0], "the first new token is read at the last prompt position, which steering leaves alone");
    let ablate = [Intervention::Resid { component: "model.layers[1].output".into(), positions: vec![-1], patch: PatchValue::Ablation }];
    let ablated = generate(&mut m, &PROMPT, &o, &ablate, None).unwrap();
    assert_ne!(plain, ablated);
    assert_eq!(generate(&mut m, &PROMPT, &o, &[], None).unwrap(), plain, "nothing stays attached");
    // bad input
    let mut bad = |s: Steering| generate(&mut m, &PROMPT, &o, &[], Some(&s)).unwrap_err().to_string();
    assert!(bad(Steering { layer: 9, vector: vector.shallow_clone(), scale: 1.0 }).contains("layers 0..2"));
    assert!(bad(Steering { layer: 0, vector: Tensor::zeros([3], (Kind::Float, Device::Cpu)), scale: 1.0 }).contains("needs [64]"));
    drop(bad);
    assert!(generate(&mut m, &[], &o, &[], None).unwrap_err().to_string().contains("at least one token"));
    assert!(generate(&mut m, &PROMPT, &GenerateOptions { top_p: Some(1.5), temperature: 1.0, ..o.clone() }, &[], None).is_err());
}
