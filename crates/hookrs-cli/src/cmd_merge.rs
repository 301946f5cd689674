//! `hookrs merge`: shard caches back into one, in dataset order; or chunk directories, one
//! after another, into one file or (OUT ending in `/`, or an existing directory) into one chunk
//! directory, streamed a chunk at a time so that memory stays bounded whatever the dataset's size.
//!
//! Each shard file records the examples it holds (`hookrs_batches`: its first example and
//! their number), in dataset order; shards are joined in the order of their first examples.
//! Every output is written through hook-extract's sinks, as `hookrs extract` writes it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hook_cache::{ActivationCache, CacheValue};
use hook_extract::{CacheSink, ChunkSink, FileSink, Part};

/// The first example (dataset index) and the number of examples a shard file holds.
fn examples_of(c: &ActivationCache, path: &Path) -> Result<(u64, u64)> {
    let meta = c.get("hookrs_batches").with_context(|| format!("{} has no hookrs_batches record: was it written by `hookrs extract`?", path.display()))?;
    let CacheValue::Data(d) = meta.inner() else { bail!("{}: hookrs_batches is not data", path.display()) };
    match (d["examples"][0].as_u64(), d["examples"][1].as_u64()) {
        (Some(first), Some(n)) => Ok((first, n)),
        _ => bail!("{}: hookrs_batches has no examples range", path.display()),
    }
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
    let mut sink = ChunkSink::as_given(out, fingerprints).map_err(crate::from_extract)?;
    let done = sink.chunks().unwrap_or(0);
    let mut chunks = 0usize;
    for (_, dir) in &dirs {
        for (i, entry) in dir.manifest().chunks.iter().enumerate() {
            if chunks >= done {
                dir.verify(i)?;
                sink.push(Part { cache: dir.read_chunk(i)?, examples: entry.examples, batches: Vec::new(), string_tokens: Vec::new() }).map_err(crate::from_extract)?;
            }
            chunks += 1;
        }
    }
    let w = sink.finish().map_err(crate::from_extract)?;
    println!("merged {} examples in {chunks} chunks from {} chunk directories -> {}", w.examples, inputs.len(), out.display());
    Ok(())
}

/// Chunk directories into one file.
fn merge_dirs(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let dirs = ordered_dirs(inputs)?;
    let mut sink = FileSink::new(out, None);
    let mut meta = None;
    for (_, dir) in &dirs {
        for (i, entry) in dir.manifest().chunks.iter().enumerate() {
            let mut c = dir.read_chunk(i)?;
            c.remove("hookrs_batches");
            if let Some(m) = c.remove("metadata") {
                meta.get_or_insert(m);
            }
            sink.push(Part { cache: c, examples: entry.examples, batches: Vec::new(), string_tokens: Vec::new() }).map_err(crate::from_extract)?;
        }
    }
    if let Some(m) = meta {
        sink.insert("metadata", m.inner().clone());
    }
    let examples: u64 = dirs.iter().map(|(_, d)| d.manifest().examples()).sum();
    sink.insert("hookrs_batches", CacheValue::Data(serde_json::json!({"merged_from": inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), "examples": examples})));
    sink.finish().map_err(crate::from_extract)?;
    println!("merged {examples} examples from {} chunk directories -> {}", inputs.len(), out.display());
    Ok(())
}

/// Shard files, ordered by their first example, checked to neither overlap nor leave a gap.
fn merge_files(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let mut parts: Vec<(u64, u64, &PathBuf, ActivationCache)> = Vec::new();
    for p in inputs {
        let c = ActivationCache::load(p)?;
        let (first, n) = examples_of(&c, p)?;
        parts.push((first, n, p, c));
    }
    parts.sort_by_key(|&(first, ..)| first);
    let (start, mut expect) = (parts[0].0, parts[0].0);
    for &(first, n, p, _) in &parts {
        if first < expect {
            bail!("{} holds examples {first}..{} which another input holds too: merge each shard once", p.display(), first + n);
        }
        if first > expect {
            bail!("examples {expect}..{first} are in none of the inputs: a shard is missing (before {})", p.display());
        }
        expect = first + n;
    }
    let mut sink = FileSink::new(out, None);
    let mut meta = None;
    for (_, n, _, mut c) in parts {
        c.remove("hookrs_batches");
        if let Some(m) = c.remove("metadata") {
            meta.get_or_insert(m);
        }
        sink.push(Part { cache: c, examples: n, batches: Vec::new(), string_tokens: Vec::new() }).map_err(crate::from_extract)?;
    }
    if let Some(m) = meta {
        sink.insert("metadata", m.inner().clone());
    }
    sink.insert("hookrs_batches", CacheValue::Data(serde_json::json!({"merged_from": inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), "examples": [start, expect - start]})));
    sink.finish().map_err(crate::from_extract)?;
    println!("merged examples {start}..{expect} from {} files -> {}", inputs.len(), out.display());
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
    merge_files(out, inputs)
}
