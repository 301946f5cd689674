//! The same extraction on a CUDA device gives the CPU values, from an archive traced on the
//! CPU. Needs a GPU: run with `cargo test -p hook-torch --features cuda-tests --test cuda`.
//! The CPU-checkable halves of these checks are in `tests/device.rs`.
#![cfg(feature = "cuda-tests")]

mod common;

use hook_core::TokenGroups;
use hook_torch::{backend, ExtractionConfig, HookedModule};
use tch::Device;

#[test]
fn cuda_is_found() {
    assert!(backend::cuda_backend_loaded(), "libtorch_cuda.so is not loaded: see the hook-build crate");
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
}

#[test]
fn a_cpu_export_runs_on_cuda_with_the_cpu_values() {
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "attn_pattern", "head_values", "head_out"]).unwrap();
    let g: TokenGroups = "[(0, 1), (-1,)]".parse().unwrap();
    let (ids, mask) = common::inputs();
    let (_, cpu) = HookedModule::load(common::model("llama"), Device::Cpu).unwrap().run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    let mut m = HookedModule::load(common::model("llama"), Device::Cuda(0)).unwrap();
    let constants = m.graph_device_constants().unwrap();
    assert!(constants.iter().all(|d| d == "cuda:0"), "{constants:?}");
    let (_, gpu) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    let host = gpu.to_host_async().unwrap().wait();
    for (k, v) in cpu.iter() {
        for (a, b) in v.tensors().iter().zip(host.get(k).unwrap().tensors()) {
            assert_eq!(b.device(), Device::Cpu, "{k}");
            assert!(a.allclose(b, 1e-4, 1e-4, false), "{k}");
        }
    }
}

#[test]
fn a_cuda_export_runs_on_the_cpu_and_on_cuda() {
    let traced = common::model_traced_on("llama", "cuda:0");
    let (ids, mask) = common::inputs();
    let want = HookedModule::load(common::model("llama"), Device::Cpu).unwrap().forward(&ids, &mask).unwrap();
    let on_cpu = HookedModule::load(&traced, Device::Cpu).unwrap().forward(&ids, &mask).unwrap();
    let on_gpu = HookedModule::load(&traced, Device::Cuda(0)).unwrap().forward(&ids, &mask).unwrap().to_device(Device::Cpu);
    assert!(on_cpu.equal(&want));
    assert!(on_gpu.allclose(&want, 1e-4, 1e-4, false));
}
