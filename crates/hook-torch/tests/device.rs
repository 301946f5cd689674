//! Devices without a GPU: the CUDA backend is loaded when needed, an archive traced on
//! another device runs here, and a missing device is a clear error. The GPU half of these
//! checks is `tests/cuda.rs` (feature `cuda-tests`).

mod common;

use std::path::Path;

use hook_core::TokenGroups;
use hook_torch::{backend, ExtractionConfig, HookedModule, TorchError};
use tch::{Device, IValue};

#[test]
fn binaries_do_not_link_the_cuda_backend_and_load_it_at_init_on_machines_with_a_gpu_driver() {
    // nothing loads it before the program asks: loading a library changes nothing of the process
    let before = backend::cuda_backend_loaded();
    let _m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    assert_eq!(backend::cuda_backend_loaded(), before, "a CPU load must not load the CUDA backend");
    // nor replace libtorch's CPU allocator: the memory guard counts nothing until a program asks
    assert_eq!(hook_torch::memory::cpu_tensor_bytes(), 0, "a load installed the memory guard");
    hook_torch::runtime::init(&hook_torch::runtime::RuntimeOptions { memory_limit: hook_torch::runtime::MemoryLimit::Off, ..hook_torch::runtime::RuntimeOptions::from_env() });
    let lib = Path::new(env!("HOOKRS_LIBTORCH_LIB"));
    let needed = backend::needed_libraries(&std::env::current_exe().unwrap()).expect("the test binary is an ELF file");
    assert!(needed.iter().any(|l| l == "libtorch_cpu.so"), "{needed:?}");
    // ~260 MB of CUDA libraries that a CPU-only run does not need
    assert!(!needed.iter().any(|l| l.starts_with("libtorch_cuda")), "{needed:?}");
    if lib.join("libtorch_cuda.so").exists() && backend::gpu_driver_present() {
        assert!(backend::cuda_backend_loaded(), "a GPU driver is present, yet runtime::init did not load libtorch_cuda.so");
    }
    // on demand: loads (or was loaded), and libtorch's real CUDA hooks answer
    let loaded = backend::load_gpu_backend().expect("the CUDA backend loads");
    assert_eq!(loaded.is_some(), lib.join("libtorch_cuda.so").exists());
    assert_eq!(backend::cuda_backend_loaded(), loaded.is_some());
}

#[test]
fn an_archive_traced_on_cuda_runs_on_the_cpu_with_the_same_logits() {
    let traced_on_gpu = common::model_traced_on("llama", "cuda:0");
    let (ids, mask) = common::inputs();
    // the archive really names cuda: libtorch's own loader cannot run it here
    let plain = tch::CModule::load(&traced_on_gpu).unwrap();
    assert!(plain.forward_is(&[IValue::Tensor(ids.shallow_clone()), IValue::Tensor(mask.shallow_clone())]).is_err());

    let mut m = HookedModule::load(&traced_on_gpu, Device::Cpu).unwrap();
    let constants = m.graph_device_constants().unwrap();
    assert!(!constants.is_empty(), "the llama graphs hold device constants (rotary embedding, causal mask)");
    assert!(constants.iter().all(|d| d == "cpu"), "a graph still names another device: {constants:?}");

    let mut reference = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let want = reference.forward(&ids, &mask).unwrap();
    let got = m.forward(&ids, &mask).unwrap();
    assert!(got.equal(&want), "retargeted logits differ");
    // and hooks work on it
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "attn_pattern"]).unwrap();
    let g: TokenGroups = "[(-1,)]".parse().unwrap();
    let (_, a) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    let (_, b) = reference.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    for (k, v) in b.iter() {
        for (x, y) in v.tensors().iter().zip(a.get(k).unwrap().tensors()) {
            assert!(x.equal(&y), "{k}");
        }
    }
}

#[test]
fn a_cuda_device_that_is_not_there_is_a_clear_error() {
    let n = backend::cuda_device_count();
    let err = HookedModule::load(common::model("llama"), Device::Cuda(n as usize)).unwrap_err();
    assert!(matches!(err, TorchError::Device(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("cuda:{n} is not available")), "{msg}");
    if n == 0 {
        assert!(msg.contains("--device cpu") || msg.contains("not loaded"), "{msg}");
    }
}
