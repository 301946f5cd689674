//! Loading files that are not good caches: each is an error that says what is wrong.

use hook_cache::{ActivationCache, CacheError};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

fn sample() -> ActivationCache {
    let mut c = ActivationCache::new();
    c.insert("resid_out_0", Tensor::randn([1, 3, 8], (Kind::Float, Device::Cpu)));
    c.add_with_info("pattern_L0H0", Tensor::rand([1, 3, 3], (Kind::Float, Device::Cpu)), "Shape: batch q k");
    c.insert("mapping_index", serde_json::json!({"last": [0]}));
    c
}

fn saved() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    sample().save(&path).unwrap();
    (dir, path)
}

fn err(path: &std::path::Path) -> String {
    ActivationCache::load(path).unwrap_err().to_string()
}

#[test]
fn round_trip_keeps_everything() {
    let (_d, path) = saved();
    let back = ActivationCache::load(&path).unwrap();
    assert_eq!(back.keys().collect::<Vec<_>>(), ["resid_out_0", "pattern_L0H0", "mapping_index"]);
    assert_eq!(back.get("pattern_L0H0").unwrap().info(), Some("Shape: batch q k"));
}

#[test]
fn truncated_file() {
    let (_d, path) = saved();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    assert!(err(&path).contains("is not a valid hookrs cache: not a readable safetensors file"), "{}", err(&path));
}

#[test]
fn corrupted_header() {
    let (_d, path) = saved();
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(8).take(20) {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    assert!(err(&path).contains("not a valid hookrs cache"), "{}", err(&path));
}

#[test]
fn not_a_cache_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "hello").unwrap();
    assert!(err(&path).contains("not a readable safetensors file"));
    let plain = dir.path().join("plain.safetensors");
    Tensor::write_safetensors(&[("x", Tensor::zeros([2], (Kind::Float, Device::Cpu)))], &plain).unwrap();
    assert!(err(&plain).contains("has no `hookrs_cache` manifest: it was not written by hookrs"), "{}", err(&plain));
    let missing = dir.path().join("missing.safetensors");
    assert!(matches!(ActivationCache::load(&missing), Err(CacheError::Io { .. })));
}

/// Rewrites the manifest of a saved cache with `edit`.
fn with_manifest(path: &std::path::Path, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["hookrs_cache"]).unwrap();
    edit(&mut m);
    let tensors = Tensor::read_safetensors(path).unwrap();
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let mut b = vec![0u8; t.numel() * 4];
            t.copy_data_u8(&mut b, t.numel());
            (n.clone(), b, t.size().iter().map(|&x| x as usize).collect())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, s)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("hookrs_cache".to_string(), m.to_string())]);
    std::fs::write(path, safetensors::tensor::serialize(views, &Some(meta)).unwrap()).unwrap();
}

#[test]
fn manifest_that_disagrees_with_the_tensors() {
    let (_d, path) = saved();
    with_manifest(&path, |m| m["entries"][0][1]["tensor"]["shape"] = serde_json::json!([1, 3, 9]));
    assert!(err(&path).contains("tensor \"resid_out_0\" is F32 [1, 3, 8] in the file but F32 [1, 3, 9] in the manifest"), "{}", err(&path));

    let (_d, path) = saved();
    with_manifest(&path, |m| m["entries"][0][1]["tensor"]["name"] = serde_json::json!("nope"));
    assert!(err(&path).contains("the manifest names tensor \"nope\", which the file does not hold"), "{}", err(&path));

    let (_d, path) = saved();
    with_manifest(&path, |m| {
        m["entries"].as_array_mut().unwrap().remove(0);
    });
    assert!(err(&path).contains("the file holds tensors the manifest does not mention: [\"resid_out_0\"]"), "{}", err(&path));
}

#[test]
fn newer_format_version() {
    let (_d, path) = saved();
    with_manifest(&path, |m| m["version"] = serde_json::json!(7));
    let e = err(&path);
    assert!(e.contains("was written with cache format version 7; this hookrs reads versions up to 1: upgrade hookrs"), "{e}");
}

#[test]
fn failed_save_keeps_the_old_file() {
    let (_d, path) = saved();
    let before = std::fs::read(&path).unwrap();
    let mut c = ActivationCache::new();
    c.insert("complex", Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)));
    let e = c.save(&path).unwrap_err().to_string();
    assert!(e.contains("cannot be saved in safetensors"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the previous cache is intact");
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn cat_of_different_dtypes_or_devices_names_the_key() {
    let mut a = sample();
    let mut b = sample();
    b.insert("resid_out_0", Tensor::randn([1, 3, 8], (Kind::Double, Device::Cpu)));
    let e = a.cat(sample()).and_then(|_| a.cat(b)).unwrap_err().to_string();
    assert!(e.contains("cannot aggregate `resid_out_0`: this cache holds Float on Cpu, the other Double on Cpu"), "{e}");
}
