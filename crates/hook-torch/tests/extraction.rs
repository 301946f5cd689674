//! run_with_cache: batched left-padded inputs give each example what it gets alone, on every
//! family; site catalogues per family; errors for bad positions and missing components.

mod common;

use hook_cache::CacheValue;
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use tch::{Device, Kind, Tensor};

/// Every family `xtask/python/export.py --random` builds.
const FAMILIES: [&str; 10] = ["llama", "mistral", "qwen2", "gemma3", "gpt2", "gpt_neox", "phi3", "qwen3", "gemma2", "olmo2"];

/// Every extraction the model has (GPT-NeoX has no resid_mid).
fn everything(m: &HookedModule) -> ExtractionConfig {
    let mut flags = vec![
        "resid_out", "resid_in", "attn_pattern", "head_queries", "head_keys", "head_values", "attn_out", "mlp_out", "head_out", "last_layernorm",
        "embed", "head_values_projected", "head_keys_projected", "head_queries_projected", "queries", "keys", "values", "attn_in",
        "resid_in_post_layernorm",
    ];
    if !m.description().unwrap().unavailable.contains_key("intermediate_stream_hook_name") {
        flags.push("resid_mid");
    }
    ExtractionConfig::default().with_flags(&flags).unwrap()
}

fn tensors(v: &CacheValue) -> Vec<Tensor> {
    v.tensors().into_iter().map(|t| t.shallow_clone()).collect()
}

#[test]
fn left_padded_batch_equals_each_example_alone() {
    for family in FAMILIES {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let (ids, mask) = common::inputs();
        let groups: TokenGroups = "[(0, 2), (-1,)]".parse().unwrap();
        for avg in [false, true] {
            let cfg = ExtractionConfig { avg, ..everything(&m) };
            let (_, batch) = m.run_with_cache(&ids, &mask, &groups, &cfg).unwrap();
            for b in 0..2i64 {
                let pad = 7 - mask.get(b).sum(Kind::Int64).int64_value(&[]);
                let one_ids = ids.get(b).narrow(0, pad, 7 - pad).unsqueeze(0);
                let (_, alone) = m.run_with_cache(&one_ids, &one_ids.ones_like(), &groups, &cfg).unwrap();
                assert_eq!(batch.keys().collect::<Vec<_>>(), alone.keys().collect::<Vec<_>>());
                for (k, v) in alone.iter() {
                    for (x, y) in tensors(v).iter().zip(tensors(batch.get(k).unwrap())) {
                        let y = y.narrow(0, b, 1);
                        // relative to the entry's largest magnitude (or 1)
                        let d = (x - &y).abs().max().double_value(&[]) / x.abs().max().double_value(&[]).max(1.0);
                        assert!(d < 1e-5, "{family} avg={avg} example {b} key {k}: max diff {d} of max(|value|, 1)");
                    }
                }
            }
        }
    }
}

#[test]
fn site_catalogues() {
    for family in FAMILIES {
        let m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let listing: Vec<String> = m.sites().iter().map(|s| format!("{:?} {}", s.kind, s.component)).collect();
        insta::assert_snapshot!(format!("sites_{family}"), listing.join("\n"));
    }
}

#[test]
fn positions_beyond_the_sequence_are_errors() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let cfg = ExtractionConfig::default().with_flags(&["resid_out"]).unwrap();
    let e = m.run_with_cache(&ids, &mask, &"[(6,)]".parse().unwrap(), &cfg).unwrap_err().to_string();
    assert!(e.contains("example 1 (5 tokens): token position 6 (group 0) is out of range for a sequence of length 5"), "{e}");
    let cfg = ExtractionConfig { attn_heads: hook_torch::AttnHeads::List(vec![hook_torch::LayerHead { layer: 2, head: 0 }]), ..cfg };
    let e = m.run_with_cache(&ids, &mask, &"[(0,)]".parse().unwrap(), &cfg).unwrap_err().to_string();
    assert!(e.contains("attn_heads has layer 2 head 0: the model has layers 0..2 and heads 0..4"), "{e}");
    // still usable
    assert!(m.run_with_cache(&ids, &mask, &"[(0,)]".parse().unwrap(), &ExtractionConfig::default()).is_ok());
}

#[test]
fn catalogue_hooks_give_what_run_with_cache_gives() {
    use hook_torch::catalogue;
    use std::sync::{Arc, Mutex};
    let mut m = HookedModule::load(common::model("qwen2"), Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 12, 40, 7]).view([1, 5]);
    let mask = ids.ones_like();
    let g: TokenGroups = "[(1, 2), (-1,)]".parse().unwrap();
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "head_keys", "attn_pattern", "last_layernorm"]).unwrap();
    let (_, want) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    let layout = m.description().unwrap().layout().unwrap();
    let cache = Arc::new(Mutex::new(hook_cache::ActivationCache::new()));
    m.add_boxed_hook("model.layers[1].output", catalogue::save_resid_hook(&cache, "resid_out_1", g.clone(), false)).unwrap();
    m.add_boxed_hook("model.layers[0].self_attn.k_proj.output", catalogue::query_key_value_hook(&cache, "head_keys_", g.clone(), 0, layout, hook_core::HeadSelection::All, false)).unwrap();
    m.add_boxed_hook("model.layers[1].self_attn.attention_matrix_hook.output", catalogue::attention_pattern_hook(&cache, g.clone(), 1, hook_core::HeadSelection::One(2), hook_ops::PatternAvg::None, None)).unwrap();
    m.add_boxed_hook("model.norm.input", catalogue::layernorm_hook(&cache, "last_layernorm", g.clone(), false)).unwrap();
    let _ = m.forward(&ids, &mask).unwrap();
    let got = cache.lock().unwrap();
    for k in ["resid_out_1", "head_keys_L0H5", "pattern_L1H2", "last_layernorm"] {
        let (a, b) = (tensors(got.get(k).unwrap()), tensors(want.get(k).unwrap()));
        assert_eq!(a.len(), b.len(), "{k}");
        for (x, y) in a.iter().zip(&b) {
            assert!(x.equal(y), "{k}");
        }
    }
}

#[test]
fn a_component_the_family_lacks_is_an_error_that_says_why() {
    let mut m = HookedModule::load(common::model("gpt_neox"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let cfg = ExtractionConfig::default().with_flags(&["resid_mid"]).unwrap();
    let e = m.run_with_cache(&ids, &mask, &"[(0,)]".parse().unwrap(), &cfg).unwrap_err();
    assert!(matches!(e, hook_torch::TorchError::Input(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("GPTNeoXForCausalLM has no `intermediate_stream_hook_name`") && e.contains("in parallel") && e.contains("resid_out"), "{e}");
    assert!(m.run_with_cache(&ids, &mask, &"[(0,)]".parse().unwrap(), &ExtractionConfig::default().with_flags(&["resid_out"]).unwrap()).is_ok());
}

#[test]
fn every_family_describes_its_layout() {
    use hook_ops::QkvLayout;
    use hook_torch::WeightLayout;
    for (family, qkv, o, norm, parallel) in [
        ("llama", QkvLayout::Separate, WeightLayout::OutIn, "RMS", false),
        ("gpt2", QkvLayout::Concat, WeightLayout::InOut, "LayerNorm", false),
        ("gpt_neox", QkvLayout::PerHead, WeightLayout::OutIn, "LayerNorm", true),
        ("phi3", QkvLayout::Concat, WeightLayout::OutIn, "RMS", false),
        ("qwen3", QkvLayout::Separate, WeightLayout::OutIn, "RMS", false),
    ] {
        let m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let d = m.description().unwrap();
        assert_eq!((d.qkv_layout, d.o_proj_weight_layout, d.layernorm_type.as_str(), d.parallel_attn_mlp), (qkv, o, norm, parallel), "{family}");
        // every template names a site or a parameter of the module
        let sites: Vec<String> = m.sites().iter().map(|s| s.component.clone()).collect();
        for (name, _) in d.templates.iter() {
            let c = d.component(name, 0).unwrap();
            let ok = sites.contains(&c) || m.parameter(&c).is_some() || name == "last_layernorm" || name == "attn_out_proj_bias";
            assert!(ok, "{family}: {name} = {c} names nothing in the module");
        }
    }
}

/// The shape each extraction promises for every token of a `[B, T]` batch, from the model's
/// description: `None` for keys this test does not know (they fail it, so new keys get a rule).
fn promised_shape(key: &str, d: &hook_torch::ModelDescription, b: i64, t: i64) -> Option<Vec<i64>> {
    let (dm, dh) = (d.hidden_size as i64, d.head_dim as i64);
    let kv = (d.num_key_value_heads * d.head_dim) as i64;
    let q = (d.num_attention_heads * d.head_dim) as i64;
    let prefix = key.rsplit_once('_').map(|(p, _)| p).unwrap_or(key);
    Some(match prefix {
        "resid_in" | "resid_mid" | "resid_out" | "attn_in" | "attn_out" | "mlp_out" | "resid_in_post_layernorm" => vec![b, t, dm],
        "head_queries" | "head_keys" | "head_values" => vec![b, t, dh],
        "head_out" | "projected_query" | "projected_key" | "projected_value" => vec![b, t, dm],
        "pattern" => vec![b, t, t],
        "queries" => vec![b, t, q],
        "keys" | "values" => vec![b, t, kv],
        _ if key == "input_embeddings" || key == "last_layernorm" => vec![b, t, dm],
        _ => return None,
    })
}

#[test]
fn every_site_has_the_shape_its_template_promises_at_every_layer() {
    // tiny models hold every kind of layer their family has (Gemma 2/3 sliding and global,
    // Qwen2 sliding from max_window_layers on): a global Gemma 3 layer once returned the
    // attention mask as its output
    for family in FAMILIES {
        let mut m = HookedModule::load(common::model(family), Device::Cpu).unwrap();
        let d = m.description().unwrap().clone();
        let (ids, _) = common::inputs();
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let (_, cache) = m.run_with_cache(&ids, &ids.ones_like(), &TokenGroups::all(t as usize).unwrap(), &everything(&m)).unwrap();
        let mut layers_seen = std::collections::BTreeSet::new();
        for (k, v) in cache.iter() {
            let Some(x) = v.tensor() else { continue };
            if k == "logits" || k == "token_lengths" {
                continue;
            }
            let want = promised_shape(k, &d, b, t).unwrap_or_else(|| panic!("{family}: no shape rule for `{k}`"));
            assert_eq!(x.size(), want, "{family}: `{k}`");
            if let Some(l) = k.strip_prefix("resid_out_") {
                layers_seen.insert(l.parse::<usize>().unwrap());
            }
        }
        assert_eq!(layers_seen.len(), d.num_hidden_layers, "{family}: a resid_out for every layer");
    }
}
