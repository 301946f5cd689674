//! Seeded mutation fuzzing of what hook-cache reads from disk: cache files (safetensors bytes
//! with hookrs's metadata) and chunk-directory manifests. Every mutated input must load or be
//! refused with an error — never a panic, and never an allocation sized by a claim in the
//! header (a 2^40-element shape must be refused, not allocated). `HOOKRS_FUZZ_SECS` sets the
//! budget (`cargo xtask fuzz cache --secs N`); by default a short fixed number of inputs runs,
//! as in CI.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use hook_cache::chunks::{ChunkDir, ChunkWriter};
use hook_cache::{ActivationCache, CacheValue};
use tch::{Device, Kind, Tensor};

type Rng = hook_core::rng::SplitMix64;

fn sample() -> ActivationCache {
    let mut c = ActivationCache::new();
    c.insert("resid_out_0", Tensor::arange(24, (Kind::Float, Device::Cpu)).view([2, 3, 4]));
    c.add_with_info("head_out_L0H1", Tensor::ones([2, 1, 4], (Kind::Float, Device::Cpu)), "Shape: batch seq d");
    let mut m = indexmap::IndexMap::new();
    m.insert("mean".to_string(), CacheValue::Tensor(Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))));
    c.insert("last_layernorm", CacheValue::Map(m));
    c.insert("pair", CacheValue::Tuple(vec![Tensor::ones([1], (Kind::Int64, Device::Cpu)).into()]));
    c.insert("mapping_index", serde_json::json!({"last": [0], "info": "x"}));
    c
}

/// Header surgery: the JSON header of a safetensors file rewritten with hostile claims.
fn hostile_headers(bytes: &[u8]) -> Vec<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + n]).into_owned();
    let body = &bytes[8 + n..];
    let with = |h: String, body: &[u8]| {
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(body);
        out
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    vec![
        with(header.replace("\"F32\"", "\"F99\""), body),
        with(header.replace("[2,3,4]", "[1099511627776,1,1]"), body),
        with(header.replace("[2,3,4]", "[18446744073709551615,2]"), body),
        with(header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[999999999,", 1), body),
        with(header.replacen("\"data_offsets\":[", "\"data_offsets\":[5,", 1), body),
        with(header.replace("resid_out_0", "head_out_L0H1"), body),
        with(header.replace("\"__metadata__\":{", &format!("\"__metadata__\":{{\"deep\":\"{deep}\",")), body),
        with(header.clone(), &body[..body.len() / 2]),
        with(format!("{{\"x\":{deep}}}"), body),
        {
            let mut b = bytes.to_vec();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        },
        bytes[..4].to_vec(),
        Vec::new(),
    ]
}

fn budget() -> Option<u64> {
    std::env::var("HOOKRS_FUZZ_SECS").ok().and_then(|s| s.parse().ok())
}

#[test]
fn cache_bytes_never_panic_when_mutated() {
    let bytes = sample().to_safetensors_bytes().unwrap();
    assert!(ActivationCache::from_safetensors_bytes(&bytes).is_ok());
    for (i, b) in hostile_headers(&bytes).into_iter().enumerate() {
        let r = catch_unwind(AssertUnwindSafe(|| ActivationCache::from_safetensors_bytes(&b).map(|_| ())));
        assert!(r.is_ok(), "hostile header {i} panicked");
    }
    let started = Instant::now();
    let mut rng = Rng::new(0xCAC4E);
    let mut n = 0u64;
    while match budget() {
        Some(s) => started.elapsed() < Duration::from_secs(s),
        None => n < 3_000,
    } {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(8) {
            if b.is_empty() {
                break;
            }
            match rng.below(4) {
                0 => {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = rng.below(b.len());
                    b[i] = rng.next_u64() as u8;
                }
                2 => b.truncate(rng.below(b.len() + 1)),
                _ => {
                    // bytes inside the header, where the claims are
                    let hdr = 8 + rng.below(u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize);
                    if hdr < b.len() {
                        b[hdr] = b"[]{},:\"0123456789e-F"[rng.below(20)];
                    }
                }
            }
        }
        let r = catch_unwind(AssertUnwindSafe(|| ActivationCache::from_safetensors_bytes(&b).map(|_| ())));
        assert!(r.is_ok(), "a mutated cache panicked the loader (seed state {n})");
        n += 1;
    }
    eprintln!("fuzz cache: {n} mutated files, no panic");
}

#[test]
fn chunk_manifests_never_panic_when_mutated() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ChunkWriter::open(dir.path(), BTreeMap::from([("model".to_string(), "m".to_string())]), false).unwrap();
    w.write_chunk(&sample(), 2).unwrap();
    w.write_chunk(&sample(), 2).unwrap();
    w.finish().unwrap();
    let manifest_path = dir.path().join("manifest.json");
    let good = std::fs::read(&manifest_path).unwrap();
    assert!(ChunkDir::open(dir.path()).unwrap().load_all().is_ok());
    let v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = v.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let mut cases: Vec<Vec<u8>> = vec![
        edit(&|v| v["version"] = serde_json::json!(99)),
        edit(&|v| v["chunks"][0]["examples"] = serde_json::json!(u64::MAX)),
        edit(&|v| v["chunks"][1]["first_example"] = serde_json::json!(0)),
        edit(&|v| v["chunks"][0]["file"] = serde_json::json!("../../etc/passwd")),
        edit(&|v| v["chunks"][0]["sha256"] = serde_json::json!("00")),
        edit(&|v| v["chunks"][0]["bytes"] = serde_json::json!(1u64 << 40)),
        edit(&|v| v["chunks"] = serde_json::json!({"not": "a list"})),
        edit(&|v| v["format"] = serde_json::json!(7)),
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        Vec::new(),
    ];
    let started = Instant::now();
    let mut rng = Rng::new(0x3A41);
    let mut n = 0u64;
    while match budget() {
        Some(s) => started.elapsed() < Duration::from_secs(s),
        None => n < 500,
    } {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            b[i] = b"[]{},:\"0123456789abcdef-"[rng.below(24)];
        }
        cases.push(b);
        n += 1;
    }
    for (i, b) in cases.iter().enumerate() {
        std::fs::write(&manifest_path, b).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| ChunkDir::open(dir.path()).and_then(|d| d.load_all()).map(|_| ())));
        assert!(r.is_ok(), "manifest case {i} panicked the reader");
    }
    eprintln!("fuzz manifest: {} mutated manifests, no panic", cases.len());
}
