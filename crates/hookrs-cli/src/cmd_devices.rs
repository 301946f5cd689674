//! `hookrs devices`: the devices this build of hookrs can run on, and why not when it cannot.

use anyhow::Result;
use hook_torch::backend;

pub fn run(json: bool) -> Result<()> {
    // before anything below loads the backend on demand
    let at_start = backend::cuda_backend_loaded();
    let driver = backend::gpu_driver_present();
    let loaded = backend::load_gpu_backend();
    let count = backend::cuda_device_count();
    let runtime = backend::cuda_runtime_version();
    if json {
        let (path, error) = match &loaded {
            Ok(p) => (p.as_ref().map(|p| p.display().to_string()), None),
            Err(e) => (None, Some(e.clone())),
        };
        println!(
            "{}",
            serde_json::json!({
                "cpu": true, "gpu_driver": driver, "cuda_backend_loaded_at_start": at_start,
                "cuda_backend": path, "cuda_backend_error": error, "cuda_runtime": runtime, "cuda_devices": count,
            })
        );
        return Ok(());
    }
    println!("cpu            available");
    println!("gpu driver     {}", if driver { "present" } else { "none (the CUDA backend is loaded only when --device cuda asks for it)" });
    match &loaded {
        Ok(Some(p)) => println!(
            "cuda backend   {} ({}){}",
            p.display(),
            if at_start { "loaded at start" } else { "loaded on demand" },
            runtime.map(|v| format!(", CUDA runtime {}.{}", v / 1000, v % 1000 / 10)).unwrap_or_default()
        ),
        Ok(None) => println!("cuda backend   not in this libtorch (CPU-only build)"),
        Err(e) => println!("cuda backend   does not load: {e}"),
    }
    match count {
        0 if matches!(loaded, Ok(Some(_))) => println!("cuda devices   none found (no GPU or no driver): use --device cpu"),
        0 => println!("cuda devices   none"),
        n => println!("cuda devices   {n}: --device cuda:0 .. cuda:{}", n - 1),
    }
    Ok(())
}
