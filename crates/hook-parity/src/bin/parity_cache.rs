//! Cache parity with easyroutine (run by `cargo xtask parity cache`).
//!
//! Replays the scenarios of `xtask/python/parity_cache.py` (the same batches, the same
//! operations) on hook-cache and compares: the final state (keys in order, structure, info
//! strings, tensors exactly), whether an operation was refused, and the memory reports.
//! Memory reports are compared with the corrected reports the harness computes; where
//! easyroutine's own report differs the row says so and why.
//!
//! Usage: `parity_cache CASE_DIR [--write docs/parity.md]`

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use hook_cache::{memory::MemoryNode, ActivationCache, CacheValue};
use hook_parity::{exit_code, publish, Args, Tally, Verdict};
use indexmap::IndexMap;
use serde_json::{json, Value as Json};
use tch::Tensor;

const MEMORY_DEVIATIONS: &[(&str, &str)] = &[
    ("sizes", "memory_size prints sizes under 1 kB divided by 1000 with unit \"B\" (0.28 B for 280 bytes); hookrs prints bytes."),
    ("info", "memory_size/memory_tree report values with info (head_*_L*H*, pattern_*) and tuples as 0 B / \"Unknown type\"; hookrs measures them."),
    ("tree", "memory_tree looks map entries up as top-level keys (\"Not present: 0 B\") and gives each list element the size of the whole list; hookrs measures each entry."),
    ("grouped", "memory_tree(grouped_tree=True) raises ValueError when a grouped key holds a value it reports as \"Unknown type\" (any value with info); hookrs groups them, summing exact byte counts."),
];

fn build(spec: &Json, tensors: &HashMap<String, Tensor>) -> anyhow::Result<CacheValue> {
    let o = spec.as_object().ok_or_else(|| anyhow!("spec is not an object: {spec}"))?;
    Ok(if let Some(n) = o.get("t") {
        let n = n.as_str().unwrap_or_default();
        CacheValue::Tensor(tensors.get(n).ok_or_else(|| anyhow!("no tensor {n}"))?.shallow_clone())
    } else if let Some(info) = o.get("info") {
        CacheValue::with_info(build(&o["value"], tensors)?, info.as_str().unwrap_or_default())
    } else if let Some(d) = o.get("data") {
        CacheValue::Data(d.clone())
    } else if let Some(t) = o.get("tuple") {
        CacheValue::Tuple(t.as_array().into_iter().flatten().map(|x| build(x, tensors)).collect::<anyhow::Result<_>>()?)
    } else if let Some(l) = o.get("list") {
        CacheValue::List(l.as_array().into_iter().flatten().map(|x| build(x, tensors)).collect::<anyhow::Result<_>>()?)
    } else if let Some(d) = o.get("dict") {
        CacheValue::Map(d.as_object().into_iter().flatten().map(|(k, x)| Ok((k.clone(), build(x, tensors)?))).collect::<anyhow::Result<IndexMap<_, _>>>()?)
    } else {
        anyhow::bail!("unknown spec {spec}")
    })
}

fn cache_of(batch: &Json, drop: &[String], tensors: &HashMap<String, Tensor>) -> anyhow::Result<ActivationCache> {
    let mut c = ActivationCache::new();
    for (k, v) in batch.as_object().ok_or_else(|| anyhow!("batch is not an object"))? {
        if !drop.contains(k) {
            c.insert(k.clone(), build(v, tensors)?);
        }
    }
    Ok(c)
}

fn strings(v: &Json) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect()
}

/// Replays `ops`; returns the cache and the first refusal, if any.
fn replay(ops: &[Json], batches: &[Json], tensors: &HashMap<String, Tensor>) -> anyhow::Result<(ActivationCache, Option<String>)> {
    let mut c = ActivationCache::new();
    let mut error = None;
    for op in ops {
        let op = op.as_array().ok_or_else(|| anyhow!("op is not a list"))?;
        let kind = op[0].as_str().unwrap_or_default();
        let batch = |i: &Json| -> anyhow::Result<&Json> { batches.get(i.as_u64().unwrap_or(0) as usize).ok_or_else(|| anyhow!("no batch {i}")) };
        let r: hook_cache::Result<()> = match kind {
            "cat" => c.cat(cache_of(batch(&op[1])?, &[], tensors)?),
            "cat_without" => c.cat(cache_of(batch(&op[1])?, &strings(&op[2]), tensors)?),
            "deferred" => {
                let pending = op[1].as_array().into_iter().flatten().map(|i| cache_of(batch(i)?, &[], tensors)).collect::<anyhow::Result<Vec<_>>>()?;
                c.deferred_mode(|c| pending.into_iter().try_for_each(|b| c.cat(b)))
            }
            "remove_aggregation" => {
                c.remove_aggregation(op[1].as_str().unwrap_or_default());
                Ok(())
            }
            "insert_batch" => {
                c.update(&cache_of(batch(&op[1])?, &[], tensors)?);
                Ok(())
            }
            "merge" => {
                c = &c + &cache_of(batch(&op[1])?, &strings(&op[2]), tensors)?;
                Ok(())
            }
            "update" => {
                c.update(&cache_of(batch(&op[1])?, &strings(&op[2]), tensors)?);
                Ok(())
            }
            "delete" => {
                c.remove(op[1].as_str().unwrap_or_default());
                Ok(())
            }
            other => anyhow::bail!("unknown op {other}"),
        };
        if let Err(e) = r {
            error = Some(e.to_string());
        }
    }
    Ok((c, error))
}

/// A Python list of plain data and a JSON array are the same value.
fn canon(v: &CacheValue) -> CacheValue {
    match v {
        CacheValue::List(items) if !items.is_empty() && items.iter().all(|x| matches!(x, CacheValue::Data(_))) => {
            CacheValue::Data(Json::Array(items.iter().map(|x| if let CacheValue::Data(d) = x { d.clone() } else { unreachable!() }).collect()))
        }
        CacheValue::List(items) => CacheValue::List(items.iter().map(canon).collect()),
        CacheValue::Tuple(items) => CacheValue::Tuple(items.iter().map(canon).collect()),
        CacheValue::Map(m) => CacheValue::Map(m.iter().map(|(k, x)| (k.clone(), canon(x))).collect()),
        CacheValue::Info { value, info } => CacheValue::Info { value: Box::new(canon(value)), info: info.clone() },
        other => other.clone(),
    }
}

fn state_diff(ours: &ActivationCache, theirs: &ActivationCache) -> Option<String> {
    let ok: Vec<&str> = ours.keys().collect();
    let tk: Vec<&str> = theirs.keys().collect();
    if ok != tk {
        return Some(format!("keys differ: ours {ok:?}, easyroutine {tk:?}"));
    }
    for (k, v) in ours.iter() {
        let w = theirs.get(k).expect("same keys");
        if !canon(v).same_as(&canon(w)) {
            return Some(format!("`{k}` differs: ours {v:?}, easyroutine {w:?}"));
        }
    }
    None
}

fn tree_json(t: IndexMap<String, MemoryNode>) -> Json {
    serde_json::to_value(t).expect("memory nodes serialise")
}

fn main() -> ExitCode {
    exit_code("cache", real_main())
}

fn real_main() -> anyhow::Result<bool> {
    let Args { dir, write, section } = Args::from_env("cache")?;
    let spec: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("scenarios.json"))?)?;
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("batches.safetensors"))?.into_iter().collect();
    let batches = spec["batches"].as_array().context("no batches")?.clone();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut tally = Tally::default();
    let mut record = |scenario: &str, aspect: &str, verdict: String| {
        // the runner's verdicts carry their own wording ("pass (both refuse: …)")
        tally.count(&if verdict.starts_with("FAIL") {
            Verdict::Fail(verdict.clone())
        } else if verdict.starts_with("explained") {
            Verdict::Explained(verdict.clone())
        } else {
            Verdict::Pass
        });
        rows.push((scenario.to_string(), aspect.to_string(), verdict));
    };
    let mut deviations: Vec<String> = MEMORY_DEVIATIONS.iter().map(|(_, d)| d.to_string()).collect();
    for sc in spec["scenarios"].as_array().context("no scenarios")? {
        let name = sc["name"].as_str().unwrap_or("?");
        let ops = sc["ops"].as_array().cloned().unwrap_or_default();
        let (ours, our_error) = replay(&ops, &batches, &tensors)?;
        // for the Python side: our state, saved, to be read back by load_cache.py
        ours.save(dir.join(format!("{name}.hookrs.safetensors")))?;
        // the state, read back from easyroutine's file through hook-cache's loader
        let theirs = ActivationCache::load(dir.join(format!("{name}.safetensors")))?;
        let deviation = sc["deviation"].as_str();
        if let Some(d) = deviation {
            deviations.push(d.to_string());
        }
        let state_verdict = match state_diff(&ours, &theirs) {
            Some(d) => format!("FAIL: {d}"),
            None if deviation.is_some() => "explained deviation (easyroutine hangs; compared with its documented behaviour)".into(),
            None => "pass".into(),
        };
        record(name, "final state", state_verdict);
        let their_error = sc["error"].as_str();
        let err_verdict = match (&our_error, their_error) {
            (None, None) => "pass (no refusal)".to_string(),
            (Some(o), Some(t)) => format!("pass (both refuse: `{t}` / `{o}`)"),
            (o, t) => format!("FAIL: ours {o:?}, easyroutine {t:?}"),
        };
        record(name, "refusals", err_verdict);

        let mem = &sc["memory"];
        let ours_mem = json!({
            "total": {"ok": ours.memory_size(None)},
            "per_key": ours.keys().map(String::from).chain(["absent_key".to_string()]).map(|k| (k.clone(), json!({"ok": ours.memory_size(Some(&k))}))).collect::<serde_json::Map<_, _>>(),
            "tree": {"ok": tree_json(ours.memory_tree(false))},
            "grouped": {"ok": tree_json(ours.memory_tree(true))},
        });
        for aspect in ["total", "per_key", "tree", "grouped"] {
            let corrected = &mem["corrected"][aspect];
            let er = &mem["easyroutine"][aspect];
            let verdict = if ours_mem[aspect] != *corrected {
                format!("FAIL: ours {}, expected {}", ours_mem[aspect], corrected)
            } else if er != corrected {
                let what = match (er.get("error"), er.get("ok")) {
                    (Some(e), _) => format!("easyroutine raises {}", e.as_str().unwrap_or_default()),
                    (None, Some(v)) => format!("easyroutine says {}", short(v)),
                    (None, None) => {
                        // per key: the first key where easyroutine differs
                        let first = er.as_object().into_iter().flatten().find(|(k, v)| corrected.get(k.as_str()) != Some(*v));
                        match first {
                            Some((k, v)) => format!("easyroutine says {k}: {} where hookrs says {}", short(&v["ok"]), short(&corrected[k.as_str()]["ok"])),
                            None => "easyroutine differs".into(),
                        }
                    }
                };
                format!("explained deviation ({what})")
            } else {
                "pass".into()
            };
            record(name, &format!("memory {aspect}"), verdict);
        }
    }
    deviations.sort();
    deviations.dedup();
    let mut s = format!(
        "Cache parity: easyroutine 1.1.5's ActivationCache and hook-cache replay the same scripted scenarios \
         (inserts of every value kind, cat over three batches with each aggregation strategy, deferred mode, key mismatch, \
         merge, update, delete, memory reports); easyroutine's final state is saved with `xtask/python/load_cache.py` and read \
         back with hook-cache's loader. {} pass, {} explained deviations, {} fail.\n\nExplained deviations:\n\n",
        tally.pass, tally.explained, tally.fail
    );
    for d in &deviations {
        s.push_str(&format!("- {d}\n"));
    }
    s.push_str("\n| scenario | aspect | result |\n|---|---|---|\n");
    for (n, a, v) in &rows {
        s.push_str(&format!("| {n} | {a} | {} |\n", v.replace('|', "\\|")));
    }
    publish(write.as_deref(), &section, &s)?;
    println!("parity cache: {tally}");
    Ok(tally.ok())
}

fn short(v: &Json) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.char_indices().nth(80).map(|(i, _)| i).unwrap_or(s.len())])
    } else {
        s
    }
}

