//! `hookrs merge`: shard caches back into one, in dataset order; or chunk directories, one
//! after another, into one file or (OUT ending in `/`, or an existing directory) into one chunk
//! directory, streamed a chunk at a time so that memory stays bounded whatever the dataset's size.
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

/// Whether `out` names a chunk directory to write: it ends in `/` or is an existing directory.
fn is_dir_out(out: &Path) -> bool {
    out.is_dir() || out.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR)
}

/// The chunk directories in dataset order: shard directories (from `--shard K/N`) sorted and
/// checked to cover every shard once; other directories in the order given.
fn ordered_dirs(inputs: &[PathBuf]) -> Result<Vec<(&PathBuf, hook_cache::ChunkDir)>> {
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
    Ok(dirs)
}

/// Chunk directories into one chunk directory, chunk by chunk (each verified against its
/// manifest's hash, then written as the next chunk): peak memory is one chunk. A run that was
/// interrupted resumes after the chunks it finished.
fn merge_dirs_to_dir(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let dirs = ordered_dirs(inputs)?;
    let mut fingerprints = std::collections::BTreeMap::new();
    fingerprints.insert("merged_from".to_string(), inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    for (k, v) in &dirs[0].1.manifest().fingerprints {
        if k != "shard" {
            fingerprints.insert(k.clone(), v.clone());
        }
    }
    let mut writer = hook_cache::ChunkWriter::open(out, fingerprints, false)?;
    let done = writer.manifest().chunks.len();
    let (mut chunks, mut examples) = (0usize, 0u64);
    for (_, dir) in &dirs {
        for (i, entry) in dir.manifest().chunks.iter().enumerate() {
            if chunks >= done {
                dir.verify(i)?;
                writer.write_chunk(&dir.read_chunk(i)?, entry.examples)?;
            }
            chunks += 1;
            examples += entry.examples;
        }
    }
    writer.finish()?;
    println!("merged {examples} examples in {chunks} chunks from {} chunk directories -> {}", inputs.len(), out.display());
    Ok(())
}

/// Chunk directories into one file.
fn merge_dirs(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let dirs = ordered_dirs(inputs)?;
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
    if dirs > 0 && dirs < inputs.len() {
        bail!(crate::Usage("merge takes shard files (from --shard K/N) or chunk directories, not both".into()));
    }
    if is_dir_out(out) {
        if dirs == 0 {
            bail!(crate::Usage(format!(
                "{} is a directory, but shard files merge into one file: name a file such as merged.safetensors (chunk directories, from `extract --out DIR/`, merge into a directory)",
                out.display()
            )));
        }
        return merge_dirs_to_dir(out, inputs);
    }
    if dirs == inputs.len() {
        return merge_dirs(out, inputs);
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
