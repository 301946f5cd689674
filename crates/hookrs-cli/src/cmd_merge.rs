//! `hookrs merge`: shard caches back into one, in dataset order; or chunk directories, one
//! after another, into one file.
//!
//! Each shard records its batches (`hookrs_batches`: global batch index and size); tensors
//! whose first axis is the batch are cut back into batches, ordered by global index and joined
//! with the cache's aggregation rules.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hook_cache::{ActivationCache, CacheValue};

fn batches_of(c: &ActivationCache, path: &Path) -> Result<Vec<(usize, i64)>> {
    let meta = c.get("hookrs_batches").with_context(|| format!("{} has no hookrs_batches record: was it written by `hookrs extract`?", path.display()))?;
    let CacheValue::Data(d) = meta.inner() else { bail!("{}: hookrs_batches is not data", path.display()) };
    d["batches"]
        .as_array()
        .map(|a| a.iter().map(|x| (x[0].as_u64().unwrap_or(0) as usize, x[1].as_i64().unwrap_or(0))).collect())
        .with_context(|| format!("{}: hookrs_batches has no batch list", path.display()))
}

/// One batch's slice of a value: tensors cut on dim 0 at `[offset, offset + n)`.
fn slice(v: &CacheValue, offset: i64, n: i64, total: i64) -> Result<CacheValue> {
    Ok(v.map_tensors(&mut |t| {
        if t.dim() > 0 && t.size()[0] == total {
            Ok(t.f_narrow(0, offset, n)?)
        } else {
            Ok(t.shallow_clone())
        }
    })?)
}

/// Chunk directories: shard directories (from `--shard K/N`) in dataset order, checked to
/// cover every shard once; other directories in the order given.
fn merge_dirs(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let mut dirs = inputs.iter().map(|p| Ok((p, hook_cache::ChunkDir::open(p)?))).collect::<Result<Vec<_>>>()?;
    for (p, d) in &dirs {
        if !d.manifest().complete {
            bail!("{} is incomplete (its extraction did not finish): rerun that extraction to complete it first", p.display());
        }
    }
    let shard_of = |d: &hook_cache::ChunkDir| d.manifest().settings.get("shard").cloned();
    let sharded = dirs.iter().filter(|(_, d)| shard_of(d).is_some()).count();
    if sharded > 0 {
        if sharded != dirs.len() {
            bail!("merge takes shard directories or plain chunk directories, not both");
        }
        dirs.sort_by_key(|(_, d)| shard_of(d).and_then(|s| s["first_example"].as_u64()).unwrap_or(0));
        let count = shard_of(&dirs[0].1).and_then(|s| s["count"].as_u64()).unwrap_or(0);
        let indices: Vec<u64> = dirs.iter().filter_map(|(_, d)| shard_of(d).and_then(|s| s["index"].as_u64())).collect();
        let missing: Vec<u64> = (0..count).filter(|k| !indices.contains(k)).collect();
        if !missing.is_empty() || indices.len() as u64 != count {
            bail!("the shard directories are shards {indices:?} of {count}: missing {missing:?} (or one given twice); merge needs each shard once");
        }
        let mut expect = 0;
        for (p, d) in &dirs {
            let s = shard_of(d).unwrap_or_default();
            if s["first_example"].as_u64() != Some(expect) || s["examples"].as_u64() != Some(d.manifest().examples()) {
                bail!("{} holds examples {}.. ({} of them) but the merge expects the shard starting at {expect}: shards of different inputs?", p.display(), s["first_example"], d.manifest().examples());
            }
            expect += d.manifest().examples();
        }
    }
    let mut merged = ActivationCache::new();
    let mut meta = None;
    let mut examples = 0;
    for (_, dir) in &dirs {
        examples += dir.manifest().examples();
        for c in dir.iter() {
            let mut c = c?;
            c.remove("hookrs_batches");
            if let Some(m) = c.remove("metadata") {
                meta.get_or_insert(m);
            }
            hook_cache::ragged::cat_ragged(&mut merged, c)?;
        }
    }
    if let Some(m) = meta {
        merged.insert("metadata", m);
    }
    merged.insert("hookrs_batches", serde_json::json!({"merged_from": inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), "examples": examples}));
    merged.shrink_to_fit()?;
    merged.save(out)?;
    println!("merged {examples} examples from {} chunk directories -> {}", inputs.len(), out.display());
    Ok(())
}

pub fn run(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let dirs = inputs.iter().filter(|p| p.is_dir()).count();
    if dirs == inputs.len() {
        return merge_dirs(out, inputs);
    }
    if dirs > 0 {
        bail!("merge takes shard files (from --shard K/N) or chunk directories, not both");
    }
    let mut parts: Vec<(usize, ActivationCache)> = Vec::new();
    let mut total_batches = 0;
    for p in inputs {
        let c = ActivationCache::load(p)?;
        let batches = batches_of(&c, p)?;
        let total: i64 = batches.iter().map(|b| b.1).sum();
        let mut offset = 0;
        for (gi, n) in batches {
            let mut one = ActivationCache::new();
            for (k, v) in c.iter() {
                if k == "hookrs_batches" || k == "metadata" {
                    continue;
                }
                one.insert(k, slice(v, offset, n, total)?);
            }
            parts.push((gi, one));
            offset += n;
            total_batches += 1;
        }
    }
    parts.sort_by_key(|(gi, _)| *gi);
    if let Some(w) = parts.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("the batch starting at example {} appears in two inputs: merge each shard once", w[0].0);
    }
    let first = ActivationCache::load(&inputs[0])?;
    let mut merged = ActivationCache::new();
    if parts.iter().any(|(_, c)| c.get(hook_cache::ragged::TOKEN_AXES).is_some()) {
        // every token of mixed-length prompts: files padded to different widths
        for (_, c) in parts {
            hook_cache::ragged::cat_ragged(&mut merged, c)?;
        }
    } else {
        merged.deferred_mode(|m| parts.into_iter().try_for_each(|(_, c)| m.cat(c)))?;
    }
    if let Some(meta) = first.get("metadata") {
        merged.insert("metadata", meta.clone());
    }
    merged.insert("hookrs_batches", serde_json::json!({"merged_from": inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), "batches": total_batches}));
    merged.shrink_to_fit()?;
    merged.save(out)?;
    println!("merged {} batches from {} files -> {}", total_batches, inputs.len(), out.display());
    Ok(())
}
