//! A user's `save_pretrained` directory of each family with a layout of its own (GPT-2 with its
//! tied embeddings, GPT-NeoX, Phi-3) exports with `export.py DIR`, loads, and extracts per-head
//! quantities and patterns the way the tiny random exports do.

mod common;

use std::path::PathBuf;
use std::process::Command;

use hook_torch::{ExtractionConfig, HookedModule};
use tch::Device;

/// `save_pretrained` of a tiny `family` model with tied input/output embeddings (as GPT-2 and
/// most real checkpoints have), exported from that directory.
fn exported_from_directory(family: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/test-models/pretrained").join(family);
    let out = dir.with_extension("pt");
    if !out.exists() {
        let script = format!(
            "import sys; sys.path.insert(0, {py:?}); import export, torch; torch.manual_seed(3)\n\
             m = export.model_for_config(export.config_for({family:?}, {{'tie_word_embeddings': True}}))\n\
             m.save_pretrained({dir:?})",
            py = root.join("xtask/python").to_string_lossy(),
            dir = dir.to_string_lossy(),
        );
        assert!(Command::new(common::python()).args(["-c", &script]).status().unwrap().success(), "save_pretrained of {family}");
        let status = Command::new(common::python()).arg(root.join("xtask/python/export.py")).arg(&dir).arg("--out").arg(&out).status().unwrap();
        assert!(status.success(), "export.py {}", dir.display());
    }
    out
}

#[test]
fn save_pretrained_directories_export_and_extract() {
    for family in ["gpt2", "gpt_neox", "phi3"] {
        let mut m = HookedModule::load(exported_from_directory(family), Device::Cpu).unwrap();
        let d = m.description().unwrap().clone();
        assert_eq!(d.family, family);
        // tied embeddings: the unembedding is still a named parameter
        let unembed = d.component("unembed_matrix", 0).unwrap();
        assert_eq!(m.parameter(&unembed).map(|t| t.size()), Some(vec![d.vocab_size as i64, d.hidden_size as i64]), "{family}: {unembed}");
        let (ids, mask) = common::inputs();
        let cfg = ExtractionConfig::default().with_flags(&["head_queries", "head_keys", "head_out", "attn_out", "attn_pattern"]).unwrap();
        let (_, cache) = m.run_with_cache(&ids, &mask, &"[(0, 1, 2, 3, 4)]".parse().unwrap(), &cfg).unwrap();
        for l in 0..d.num_hidden_layers {
            // the heads' W_O contributions (each with bias / heads) add up to the attention output:
            // the fused split and GPT-2's transposed Conv1D weight are right
            let heads: Vec<tch::Tensor> = (0..d.num_attention_heads).map(|h| cache.get(&format!("head_out_L{l}H{h}")).unwrap().tensors()[0].shallow_clone()).collect();
            let sum = tch::Tensor::stack(&heads, 0).sum_dim_intlist(0, false, tch::Kind::Float);
            let attn_out = cache.get(&format!("attn_out_{l}")).unwrap().tensors()[0].shallow_clone();
            let d_max = (&sum - &attn_out).abs().max().double_value(&[]) / attn_out.abs().max().double_value(&[]).max(1.0);
            assert!(d_max < 1e-5, "{family} layer {l}: heads sum to attn_out within {d_max}");
            let q = cache.get(&format!("head_queries_L{l}H0")).unwrap().tensors()[0].size();
            assert_eq!(q, vec![2, 5, d.head_dim as i64], "{family}");
            let p = cache.get(&format!("pattern_L{l}H0")).unwrap().tensors()[0].shallow_clone();
            assert!(p.min().double_value(&[]) >= 0.0 && p.max().double_value(&[]) <= 1.0, "{family}: a pattern holds probabilities");
        }
    }
}

#[test]
fn a_graph_that_tracing_cannot_express_is_refused_at_export_naming_the_module() {
    // an MLP whose output depends on the sequence length through Python control flow: the
    // trace freezes one branch
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = format!(
        r#"import sys; sys.path.insert(0, {py:?})
import export, torch
from transformers.models.llama import modeling_llama as ml
cfg = export.config_for("llama", {{}}); cfg._attn_implementation = "eager"; cfg.torchscript = True; cfg.use_cache = False
m = export.model_for_config(cfg)
class Branchy(ml.LlamaMLP):
    def forward(self, x):
        y = super().forward(x)
        return y if x.shape[1] < 8 else -y
for layer in m.model.layers:
    layer.mlp.__class__ = Branchy
export.trace(export.with_mask_positions(m), 256)
"#,
        py = root.join("xtask/python").to_string_lossy()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("branchy.py"); // a file, so the module's source can be found
    std::fs::write(&file, script).unwrap();
    let o = Command::new(common::python()).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("the traced graph is not right for every input") && err.contains("Branchy (e.g. model.layers.0.mlp)"), "{err}");
}

#[test]
fn a_gguf_the_loader_cannot_read_is_refused_naming_its_architecture() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    // a well-formed GGUF of an architecture transformers 4.51's GGUF loader does not read
    let script = format!(
        "import gguf, numpy as np\nw = gguf.GGUFWriter({path:?}, 'gemma3')\nw.add_block_count(1)\n\
         w.add_tensor('token_embd.weight', np.zeros((4, 8), dtype=np.float32))\n\
         w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()",
        path = gguf.to_string_lossy()
    );
    assert!(Command::new(common::python()).args(["-c", &script]).status().unwrap().success());
    let export = |source: &std::path::Path| {
        let o = Command::new(common::python()).arg(root.join("xtask/python/export.py")).arg(source).arg("--out").arg(dir.path().join("m.pt")).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // by file, and by the directory holding it
    for source in [gguf.clone(), dir.path().to_path_buf()] {
        let (ok, err) = export(&source);
        assert!(!ok);
        assert!(err.contains("holds a 'gemma3' model") && err.contains("hookrs supports gemma2, gpt2, llama, mistral, phi3, qwen2"), "{err}");
    }
    // not a GGUF at all
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, "not a gguf").unwrap();
    let (ok, err) = export(&bad);
    assert!(!ok && err.contains("is not a readable GGUF file"), "{err}");
    // two in one directory: name one
    let (ok, err) = export(dir.path());
    assert!(!ok && err.contains("holds 2 .gguf files"), "{err}");
    assert!(!dir.path().join("m.pt").exists(), "nothing is written");
}
