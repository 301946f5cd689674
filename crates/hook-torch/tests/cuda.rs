//! The same extraction on a CUDA device gives the CPU values. Needs a GPU: run with
//! `cargo test -p hook-torch --features cuda-tests --test cuda`.
#![cfg(feature = "cuda-tests")]

mod common;

use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use tch::Device;

#[test]
fn cuda_extraction_matches_cpu() {
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "attn_pattern", "head_values", "head_out"]).unwrap();
    let g: TokenGroups = "[(0, 1), (-1,)]".parse().unwrap();
    let (ids, mask) = common::inputs();
    let (_, cpu) = HookedModule::load(common::model("llama"), Device::Cpu).unwrap().run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    let mut m = HookedModule::load(common::model("llama"), Device::Cuda(0)).unwrap();
    let (_, mut gpu) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    gpu.cpu().unwrap();
    for (k, v) in cpu.iter() {
        for (a, b) in v.tensors().iter().zip(gpu.get(k).unwrap().tensors()) {
            assert!(a.allclose(b, 1e-4, 1e-4, false), "{k}");
        }
    }
}
