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
    hook_torch::runtime::init(&hook_torch::runtime::RuntimeOptions::from_env());
    assert!(backend::gpu_driver_present(), "no GPU driver found (/dev/nvidiactl, /proc/driver/nvidia/version …)");
    assert!(backend::cuda_backend_loaded(), "runtime::init did not load libtorch_cuda.so: see hook_torch::backend");
    assert!(backend::cuda_runtime_version().is_some(), "libtorch answers CUDA queries with its stub");
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
    let host = hook_torch::transfer::to_host_async(&gpu).unwrap().wait().unwrap();
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

#[test]
fn side_stream_copies_overlapping_the_next_batch_give_the_cpu_values() {
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "attn_pattern", "head_out"]).unwrap();
    let g: TokenGroups = "[(0, 1), (-1,)]".parse().unwrap();
    let (ids, mask) = common::inputs();
    let mut cpu = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let mut gpu = HookedModule::load(common::model("llama"), Device::Cuda(0)).unwrap();
    // batches that differ (rolled ids), each copy waited for only after the next forward is
    // queued: the allocator would reuse a freed source's memory for that forward
    let mut pending: Option<(usize, hook_torch::transfer::HostCopy)> = None;
    let mut check = |k: usize, host: hook_cache::ActivationCache| {
        let ids_k = ids.roll([k as i64], [1]);
        let (_, want) = cpu.run_with_cache(&ids_k, &mask, &g, &cfg).unwrap();
        for (key, v) in want.iter() {
            for (a, b) in v.tensors().iter().zip(host.get(key).unwrap().tensors()) {
                assert_eq!(b.device(), Device::Cpu, "{key}");
                assert!(a.allclose(b, 1e-4, 1e-4, false), "batch {k} {key}");
            }
        }
    };
    for k in 0..8 {
        let (_, cache) = gpu.run_with_cache(&ids.roll([k as i64], [1]), &mask, &g, &cfg).unwrap();
        let copy = hook_torch::transfer::to_host_async(&cache).unwrap();
        drop(cache);
        if let Some((j, previous)) = pending.replace((k, copy)) {
            check(j, previous.wait().unwrap());
        }
    }
    let (j, last) = pending.take().unwrap();
    check(j, last.wait().unwrap());
}

#[test]
fn a_cached_step_on_cuda_keeps_its_cache_on_the_device_and_gives_the_cpu_logits() {
    use hook_torch::{KvCache, RunSpec};
    use tch::{Kind, Tensor};
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
    let ids = Tensor::from_slice(&[0i64, 0, 5, 9, 12, 40, 7, 33]).view([2, 4]);
    let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1]).view([2, 4]);
    let mut logits = Vec::new();
    for device in [Device::Cpu, Device::Cuda(0)] {
        let mut m = HookedModule::load(common::model("llama"), device).unwrap();
        let mut cache = KvCache::new(&m, 2, 8).unwrap();
        let first = m.step(&ids, &mask, &mut cache, RunSpec::default()).unwrap().logits.unwrap();
        assert_eq!(cache.keys(0).unwrap().device(), device, "the cache lives on the model's device");
        let next = first.select(1, -1).argmax(-1, true);
        let mask2 = Tensor::cat(&[mask.shallow_clone(), Tensor::ones([2, 1], (Kind::Int64, Device::Cpu))], 1);
        let second = m.step(&next, &mask2, &mut cache, RunSpec::default()).unwrap().logits.unwrap();
        assert_eq!(second.device(), device);
        logits.push(second.to_device(Device::Cpu));
    }
    assert!(logits[0].allclose(&logits[1], 1e-3, 1e-3, false), "cuda step logits differ from the cpu's");
}

#[test]
fn a_fork_on_cuda_gives_the_cpu_logits() {
    use hook_torch::{Fork, Intervention, PatchValue, RunSpec};
    use tch::Tensor;
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
    let ids = Tensor::from_slice(&[5i64, 9, 12, 40, 7]).view([1, 5]);
    let cells: Vec<Vec<Intervention>> =
        (0..3).map(|q| vec![Intervention::Resid { component: "model.layers[1].output".into(), positions: vec![q], patch: PatchValue::Ablation }]).collect();
    let mut logits = Vec::new();
    for device in [Device::Cpu, Device::Cuda(0)] {
        let mut m = HookedModule::load(common::model("llama"), device).unwrap();
        let spec = RunSpec {
            fork: Some(Fork { component: "model.layers[1].input".into(), rows: 3 }),
            row_interventions: &cells,
            logit_positions: Some(vec![-1]),
            ..RunSpec::default()
        };
        let out = m.run(&ids, &ids.ones_like(), spec).unwrap().logits.unwrap();
        assert_eq!((out.device(), out.size()[..2].to_vec()), (device, vec![3, 1]));
        logits.push(out.to_device(Device::Cpu));
    }
    assert!(logits[0].allclose(&logits[1], 1e-3, 1e-3, false), "cuda fork logits differ from the cpu's");
}
