//! A researcher's session across every crate: a model exported from Python, instrumented
//! (hook-torch), a dataset extracted by the `hookrs extract` command into a chunk directory
//! (hookrs-cli, run in-process), the cache read back in Rust (hook-cache) and in Python
//! (`load_cache.py`), analysed (hook-analysis), and patched.

#[path = "../crates/hook-torch/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

use hook_analysis::{LogitLens, Metric};
use hook_cache::ActivationCache;
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule, Intervention, PatchValue};
use tch::{Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn export_extract_read_back_analyse_and_patch() {
    let model = common::model("llama");
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let ids: Vec<Vec<i64>> = (0..6).map(|i| (0..4 + i % 3).map(|t| 5 + ((t * 7 + i * 3) % 200) as i64).collect()).collect();
    std::fs::write(&prompts, ids.iter().map(|x| serde_json::json!({ "ids": x }).to_string() + "\n").collect::<String>()).unwrap();
    let out = dir.path().join("cache");

    // 1. the CLI, in-process: a streamed chunk directory, two examples per chunk
    let m = model.to_string_lossy().to_string();
    let (p, o) = (prompts.to_string_lossy().to_string(), out.to_string_lossy().to_string());
    hookrs_cli::run([
        "hookrs", "extract", "--model", &m, "--prompts", &p, "--column", "ids", "--extract", "resid_out,last_layernorm,logits", "--token-groups", "[[-1]]",
        "--chunk-size", "2", "--batch-size", "2", "--out", &o,
    ])
    .unwrap_or_else(|f| panic!("extract failed ({}): {}", f.code, f.message));
    let cache = ActivationCache::load(&out).unwrap();
    assert_eq!(cache.tensor("resid_out_1").unwrap().size(), vec![6, 1, 64]);

    // 2. the same numbers as the Rust API, example by example
    let mut hooked = HookedModule::load(&model, Device::Cpu).unwrap();
    let cfg = ExtractionConfig { save_logits: true, ..ExtractionConfig::default().with_flags(&["resid_out", "last_layernorm"]).unwrap() };
    for (i, x) in ids.iter().enumerate() {
        let t = Tensor::from_slice(x).view([1, -1]);
        let (_, one) = hooked.run_with_cache(&t, &t.ones_like(), &TokenGroups::last(), &cfg).unwrap();
        let want = one.tensor("resid_out_1").unwrap();
        let got = cache.tensor("resid_out_1").unwrap().get(i as i64).unsqueeze(0);
        assert!(got.allclose(want, 1e-5, 1e-5, false), "example {i}");
    }

    // 3. Python reads the chunk directory to the same values
    let check = format!(
        "import sys; sys.path.insert(0, {:?}); from load_cache import load_cache; c = load_cache({:?}); import torch; print(float(c['resid_out_1'].sum()))",
        root().join("xtask/python").to_string_lossy(),
        out.to_string_lossy()
    );
    let py = Command::new(common::python()).args(["-c", &check]).output().unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let py_sum: f64 = String::from_utf8_lossy(&py.stdout).trim().parse().unwrap();
    let rust_sum = cache.tensor("resid_out_1").unwrap().sum(tch::Kind::Double).double_value(&[]);
    assert!((py_sum - rust_sum).abs() < 1e-3 * rust_sum.abs().max(1.0), "{py_sum} vs {rust_sum}");

    // 4. the logit lens at the last layer is the model's prediction (the logits extracted)
    let lens = LogitLens::from_model(&hooked).unwrap();
    let read = lens.compute(&cache, "resid_out_1", None, true, false, Metric::LogitDiff).unwrap();
    let logits = cache.tensor("logits").unwrap();
    let last = read["logit_lens_resid_out_1"].squeeze_dim(1);
    // the logits at every example's last token (the batch is left-padded)
    for i in 0..ids.len() as i64 {
        let want = logits.get(i).get(-1);
        assert!(last.get(i).allclose(&want, 1e-4, 1e-4, false), "example {i}");
    }

    // 5. patching the last token's residual at layer 0 with another run's changes the output
    let t = Tensor::from_slice(&ids[0]).view([1, -1]);
    let plain = hooked.forward(&t, &t.ones_like()).unwrap();
    let patch = cache.tensor("resid_out_0").unwrap().get(3).unsqueeze(0);
    let patched = hooked
        .run_with_interventions(&t, &t.ones_like(), &[Intervention::Resid { component: "model.layers[0].output".into(), positions: vec![-1], patch: PatchValue::Values(patch) }])
        .unwrap();
    assert!(!patched.equal(&plain));
    assert!(hooked.forward(&t, &t.ones_like()).unwrap().equal(&plain), "the intervention lasted one forward");
}
