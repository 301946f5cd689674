//! An archive exported in one half precision runs in the other, or in float32
//! (`HookedModule::to_kind`): its weights and the dtype constants tracing baked into its
//! graphs are converted, and the logits equal the eager HF model converted the same way.

mod common;

use std::path::PathBuf;
use std::process::Command;

use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule, TorchError};
use tch::{Device, Kind, Tensor};

/// The eager HF model `export.py --random FAMILY --seed 0 --dtype FROM` traced, converted
/// with `.to(TO)` and run on `common::inputs()`: its logits, as float32.
fn eager_logits(family: &str, from: &str, to: &str) -> Tensor {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let script = r#"
import sys, torch
sys.path.insert(0, sys.argv[1])
import export
from safetensors.torch import save_file
family, src, dst, out = sys.argv[2:6]
torch.manual_seed(0)
cfg = export.config_for(family, {})
cfg.torchscript, cfg.use_cache = True, False
cfg._attn_implementation = "eager"
model = export.model_for_config(cfg).to(export.DTYPES[src])
model = export.with_mask_positions(model.to(export.DTYPES[dst])).eval()
ids = torch.tensor([[5, 9, 12, 40, 7, 3, 100], [0, 0, 17, 8, 30, 31, 4]])
mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
with torch.no_grad():
    logits = model(ids, mask)[0]
save_file({"logits": logits.float().contiguous()}, out)
"#;
    let st = Command::new(common::python())
        .args(["-c", script])
        .arg(root.join("xtask/python"))
        .args([family, from, to])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "the eager reference failed");
    Tensor::read_safetensors(&out).unwrap().into_iter().next().unwrap().1
}

/// |a - b| <= tol * max(|b|, 1), entrywise (the export's own traced-vs-eager tolerance).
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let got = got.to_kind(Kind::Float);
    assert_eq!(got.size(), want.size(), "{what}");
    let scale = want.abs().max().double_value(&[]).max(1.0);
    let err = (&got - want).abs().max().double_value(&[]);
    assert!(err <= tol * scale, "{what}: max |error| {err} > {tol} x {scale}");
}

#[test]
fn a_bfloat16_export_runs_in_float16_and_float32_like_the_eager_model_converted() {
    let (ids, mask) = common::inputs();
    for (to, kind, name, tol) in [("float16", Kind::Half, "Half", 4.0 * 2f64.powi(-10)), ("float32", Kind::Float, "Float", 1e-5)] {
        let mut m = HookedModule::load(common::model_in("llama", "bfloat16"), Device::Cpu).unwrap();
        assert!(m.graph_dtype_constants().unwrap().iter().any(|d| d == "BFloat16"), "the export bakes in its dtype");
        m.to_kind(kind).unwrap();
        assert_eq!(m.kind(), kind);
        assert_eq!(m.description().unwrap().dtype, to);
        let dtypes = m.graph_dtype_constants().unwrap();
        assert!(!dtypes.iter().any(|d| d == "BFloat16"), "{to}: a graph still names bfloat16: {dtypes:?}");
        assert!(dtypes.iter().any(|d| d == name), "{to}: {dtypes:?}");
        assert!(dtypes.iter().any(|d| d == "Float"), "the norms' float32 upcasts stay: {dtypes:?}");
        let logits = m.forward(&ids, &mask).unwrap();
        assert_eq!(logits.kind(), kind);
        // the left-padded row too: the attention mask's fill value is float16's lowest, not -inf
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{to}: non-finite logits");
        assert_close(&logits, &eager_logits("llama", "bfloat16", to), tol, to);
    }
}

#[test]
fn a_float16_gpt2_runs_in_bfloat16_with_its_mask_constants_converted() {
    // GPT-2 holds torch.finfo(float16).min as a tensor constant and in torch.full
    let (ids, mask) = common::inputs();
    let mut m = HookedModule::load(common::model_in("gpt2", "float16"), Device::Cpu).unwrap();
    m.to_kind(Kind::BFloat16).unwrap();
    assert!(!m.graph_dtype_constants().unwrap().iter().any(|d| d == "Half"));
    let logits = m.forward(&ids, &mask).unwrap();
    assert_eq!(logits.kind(), Kind::BFloat16);
    assert_close(&logits, &eager_logits("gpt2", "float16", "bfloat16"), 4.0 * 2f64.powi(-7), "bfloat16");
}

#[test]
fn extraction_after_conversion_gives_the_new_dtype() {
    let (ids, mask) = common::inputs();
    let mut m = HookedModule::load(common::model_in("llama", "bfloat16"), Device::Cpu).unwrap();
    m.to_kind(Kind::Float).unwrap();
    let g: TokenGroups = "[(-1,)]".parse().unwrap();
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "head_out", "last_layernorm"]).unwrap();
    let (_, cache) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    assert_eq!(cache.tensor("resid_out_0").unwrap().kind(), Kind::Float);
    // float32 reached from bfloat16, after a forward, converts on to float16: each
    // conversion starts from the archive's own graphs, so it equals converting directly
    m.to_kind(Kind::Half).unwrap();
    let mut direct = HookedModule::load(common::model_in("llama", "bfloat16"), Device::Cpu).unwrap();
    direct.to_kind(Kind::Half).unwrap();
    assert_eq!(m.graph_dtype_constants().unwrap(), direct.graph_dtype_constants().unwrap());
    assert!(m.forward(&ids, &mask).unwrap().equal(&direct.forward(&ids, &mask).unwrap()));
    // and bfloat16 -> float16 -> bfloat16 is the original module
    let mut m = HookedModule::load(common::model_in("llama", "bfloat16"), Device::Cpu).unwrap();
    let mut plain = HookedModule::load(common::model_in("llama", "bfloat16"), Device::Cpu).unwrap();
    m.to_kind(Kind::Half).unwrap();
    m.to_kind(Kind::BFloat16).unwrap();
    assert_eq!(m.graph_dtype_constants().unwrap(), plain.graph_dtype_constants().unwrap());
    let w = "model.layers.0.self_attn.o_proj.weight";
    assert_eq!(m.parameter(w).unwrap().kind(), Kind::BFloat16);
    assert_close(&m.forward(&ids, &mask).unwrap(), &plain.forward(&ids, &mask).unwrap().to_kind(Kind::Float), 4.0 * 2f64.powi(-7), "round trip");
}

#[test]
fn a_float32_export_refuses_half_precision_naming_the_export_flag() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let err = m.to_kind(Kind::BFloat16).unwrap_err();
    assert!(matches!(err, TorchError::Input(_)), "{err:?}");
    assert!(err.to_string().contains("--dtype bfloat16"), "{err}");
    // nothing changed: the module still runs in float32
    let (ids, mask) = common::inputs();
    assert_eq!(m.forward(&ids, &mask).unwrap().kind(), Kind::Float);
    assert!(m.to_kind(Kind::Float).is_ok(), "converting to its own dtype is a no-op");
    assert!(m.to_kind(Kind::Int64).unwrap_err().to_string().contains("float32, bfloat16 or float16"));
}

