//! `hookrs devices`: the devices this build of hookrs can run on, and why not when it cannot.

use anyhow::Result;
use hook_torch::backend;

pub fn run(json: bool) -> Result<()> {
    let exe = std::env::current_exe().ok();
    let needed = exe.as_deref().and_then(backend::needed_libraries).unwrap_or_default();
    let linked = needed.iter().any(|l| l.starts_with("libtorch_cuda"));
    let loaded = backend::cuda_backend_loaded();
    let count = backend::cuda_device_count();
    if json {
        println!(
            "{}",
            serde_json::json!({"cpu": true, "cuda_backend_linked": linked, "cuda_backend_loaded": loaded, "cuda_devices": count})
        );
        return Ok(());
    }
    println!("cpu            available");
    println!("cuda backend   {}", if loaded { "loaded (libtorch_cuda.so)" } else if linked { "linked but not loaded" } else { "not in this libtorch (CPU-only build)" });
    match count {
        0 if loaded => println!("cuda devices   none found (no GPU or no driver): use --device cpu"),
        0 => println!("cuda devices   none"),
        n => println!("cuda devices   {n}: --device cuda:0 .. cuda:{}", n - 1),
    }
    Ok(())
}
