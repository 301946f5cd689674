//! ExtractionConfig JSON (what `--config` reads) and token groups JSON (`--token-groups`),
//! mutated and seeded: each either fails to parse with a message, or parses and runs an
//! extraction on the tiny llama that succeeds or fails cleanly. Never a panic.
//!
//! A fixed number of mutations by default; `HOOKRS_FUZZ_SECS=N` runs for N seconds.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use hook_core::rng::SplitMix64 as Rng;
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use tch::Device;

const CONFIGS: &[&str] = &[
    r#"{"extract_resid_out": true, "extract_attn_pattern": true, "attn_heads": [{"layer": 0, "head": 1}, {"layer": 1, "head": 0}]}"#,
    r#"{"extract_head_out": true, "extract_head_values": true, "attn_heads": "all", "avg": true}"#,
    r#"{"extract_attn_pattern": true, "attn_pattern_avg": "sum", "attn_pattern_row_positions": [[0], [-1]], "attn_heads": "all"}"#,
    r#"{"extract_last_layernorm": true, "extract_resid_mid": true, "save_logits": true, "avg_over_example": true}"#,
];

const GROUPS: &[&str] = &["[[0, 1], [-1]]", "[[0], [1], [2, 3]]", "[[-2, -1]]", "[[3]]"];

const ALPHABET: &[u8] = b"{}[]\":,-0123456789 truefalsnul_abcdehiklmoprsvxyLH9e.";

fn mutate(seed: &str, rng: &mut Rng) -> String {
    let mut b = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(5) {
            0 => b.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
            1 if !b.is_empty() => {
                b.remove(at.min(b.len() - 1));
            }
            2 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = ALPHABET[rng.below(ALPHABET.len())];
            }
            3 if !b.is_empty() => {
                // a digit becomes a large number: layer, head or position out of range
                if let Some(i) = (at..b.len()).find(|&i| b[i].is_ascii_digit()) {
                    b.splice(i..i + 1, b"99999".iter().copied());
                }
            }
            _ => {
                let i = at.min(b.len());
                let other = CONFIGS[rng.below(CONFIGS.len())].as_bytes();
                let j = rng.below(other.len());
                b.splice(i..i, other[j..(j + 12).min(other.len())].iter().copied());
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// A mutation of the JSON's values rather than its bytes: types swapped, numbers made large or
/// negative, keys dropped or invented, lists nested or emptied. It always parses as JSON.
fn mutate_value(seed: &str, rng: &mut Rng) -> String {
    use serde_json::{json, Value};
    fn pick(v: &mut Value, rng: &mut Rng) -> *mut Value {
        let mut at: *mut Value = v;
        for _ in 0..rng.below(4) {
            // SAFETY: `at` points into `v`, which outlives this function's use of it; one live
            // reference at a time.
            let cur = unsafe { &mut *at };
            let next = match cur {
                Value::Object(o) if !o.is_empty() => {
                    let k = o.keys().nth(rng.below(o.len())).cloned().unwrap();
                    o.get_mut(&k).map(|x| x as *mut Value)
                }
                Value::Array(a) if !a.is_empty() => {
                    let i = rng.below(a.len());
                    Some(&mut a[i] as *mut Value)
                }
                _ => None,
            };
            match next {
                Some(n) => at = n,
                None => break,
            }
        }
        at
    }
    let mut v: Value = serde_json::from_str(seed).unwrap();
    for _ in 0..1 + rng.below(3) {
        let target = pick(&mut v, rng);
        // SAFETY: as above: `target` points into `v`, alive and not otherwise borrowed here.
        let t = unsafe { &mut *target };
        *t = match rng.below(9) {
            0 => json!(99999),
            1 => json!(-7),
            2 => json!(null),
            3 => json!("all"),
            4 => json!([[]]),
            5 => json!([{"layer": rng.below(4), "head": rng.below(6)}]),
            6 => json!(1e300),
            7 => json!({"unknown_field": true}),
            _ => json!([t.clone(), t.clone()]),
        };
    }
    if let Value::Object(o) = &mut v {
        if rng.below(3) == 0 && !o.is_empty() {
            let k = o.keys().nth(rng.below(o.len())).cloned().unwrap();
            o.remove(&k);
        }
    }
    v.to_string()
}

fn budget() -> Option<u64> {
    std::env::var("HOOKRS_FUZZ_SECS").ok().and_then(|s| s.parse().ok())
}

#[test]
fn mutated_configs_and_token_groups_parse_and_run_or_fail_cleanly() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    for c in CONFIGS {
        let cfg: ExtractionConfig = serde_json::from_str(c).unwrap();
        let _ = m.run_with_cache(&ids, &mask, &"[[0, 1], [-1]]".parse().unwrap(), &cfg).unwrap();
    }
    let started = Instant::now();
    let mut rng = Rng::new(0xC0F1);
    let (mut n, mut ran, mut refused, mut unparsed, mut mistyped) = (0u64, 0u64, 0u64, 0u64, 0u64);
    while match budget() {
        Some(s) => started.elapsed() < Duration::from_secs(s),
        None => n < 1000,
    } {
        let seed = CONFIGS[rng.below(CONFIGS.len())];
        let config = if rng.below(3) == 0 { mutate(seed, &mut rng) } else { mutate_value(seed, &mut rng) };
        let gseed = GROUPS[rng.below(GROUPS.len())];
        let groups = match rng.below(6) {
            0 => mutate(gseed, &mut rng),
            1 => mutate_value(gseed, &mut rng),
            _ => gseed.to_string(),
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let cfg: ExtractionConfig = match serde_json::from_str(&config) {
                Ok(c) => c,
                Err(e) => return Err(e.to_string()),
            };
            let g: TokenGroups = serde_json::from_str(&groups).map_err(|e| e.to_string())?;
            m.run_with_cache(&ids, &mask, &g, &cfg).map(|_| ()).map_err(|e| e.to_string())
        }));
        match outcome {
            Ok(Ok(())) => ran += 1,
            Ok(Err(msg)) => {
                assert!(!msg.trim().is_empty(), "an empty error for {config} / {groups}");
                let json = serde_json::from_str::<serde_json::Value>(&config).is_ok() && serde_json::from_str::<serde_json::Value>(&groups).is_ok();
                match (json, msg.contains("line") && msg.contains("column")) {
                    (false, _) => unparsed += 1,
                    (true, true) => mistyped += 1,
                    (true, false) => refused += 1,
                }
            }
            Err(_) => panic!("panicked on config {config} with token groups {groups}"),
        }
        n += 1;
    }
    // the module is still usable and gives the same results as a fresh one
    let cfg: ExtractionConfig = serde_json::from_str(CONFIGS[0]).unwrap();
    let g: TokenGroups = "[[0, 1], [-1]]".parse().unwrap();
    let (_, after) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    let (_, fresh) = HookedModule::load(common::model("llama"), Device::Cpu).unwrap().run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    for k in fresh.keys() {
        if let (Ok(a), Ok(b)) = (after.tensor(k), fresh.tensor(k)) {
            assert!(a.equal(b), "{k} differs after the fuzzing");
        }
    }
    eprintln!("fuzz config: {n} mutated configs and token groups: {ran} ran, {refused} refused by the extraction, {mistyped} refused by the config's types, {unparsed} not JSON, 0 panics");
}
