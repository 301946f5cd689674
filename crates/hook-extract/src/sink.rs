//! Where a cache goes: [`FileSink`] (one `.safetensors` file, written atomically at the end)
//! or [`ChunkSink`] (a chunk directory written as it fills, resumable). The extraction loop
//! and `hookrs merge` both write through a [`CacheSink`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hook_cache::{ActivationCache, CacheValue, ChunkWriter};
use hook_core::TokenGroups;
use hook_torch::ExtractionConfig;
use indexmap::IndexMap;

use crate::job::ChunkSize;
use crate::shard::Shard;
use crate::Result;

/// Consecutive examples' activations, in dataset order, with their bookkeeping.
pub struct Part {
    /// One row per example (host memory, or the model's device).
    pub cache: ActivationCache,
    /// How many examples.
    pub examples: u64,
    /// The batches that computed them (dataset indices), for `hookrs_batches`.
    pub batches: Vec<serde_json::Value>,
    /// Each example's string tokens (null without a tokenizer).
    pub string_tokens: Vec<serde_json::Value>,
}

/// What the extraction stamps on each written cache: easyroutine's `metadata` entry and the
/// `hookrs_batches` record. A merge writes caches that already carry theirs.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// The token positions kept (`None`: every token).
    pub groups: Option<TokenGroups>,
    /// The model's name (its source).
    pub model_name: String,
    /// What was extracted.
    pub config: ExtractionConfig,
    /// The shard and its first example.
    pub shard: Option<Shard>,
    /// The dataset index of the first example written.
    pub first_example: u64,
}

impl Stamp {
    fn apply(&self, c: &mut ActivationCache, first: u64, examples: u64, batches: Vec<serde_json::Value>, string_tokens: Vec<serde_json::Value>) -> Result<()> {
        c.add_metadata(self.groups.as_ref().map(|g| g.to_string()).unwrap_or_else(|| "all".into()), &self.model_name, &self.config, Vec::<String>::new())?;
        let mut record = serde_json::json!({"examples": [first, examples], "batches": batches, "string_tokens": string_tokens});
        if let Some(sh) = self.shard {
            record["shard"] = serde_json::json!([sh.index, sh.count]);
        }
        c.insert("hookrs_batches", record);
        Ok(())
    }
}

/// What a sink wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Examples in the output (with those of earlier, resumed runs).
    pub examples: u64,
    /// Chunks, for a chunk directory.
    pub chunks: Option<usize>,
    /// Per key family: count, shape, dtype and bytes (for a single file; [`summary`]).
    pub table: Option<String>,
}

/// How many examples the next part should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Any number (a single file: the whole run is planned at once, for the least padding).
    Any,
    /// Exactly this many, or fewer at the end of the input (the rest of a chunk).
    Examples(u64),
    /// One batch's worth (a byte budget that the first part turns into examples).
    OneBatch,
}

/// A destination for caches of consecutive examples.
pub trait CacheSink {
    /// Examples already in the output (a resumed chunk directory); the run starts after them.
    fn examples_done(&self) -> u64 {
        0
    }
    /// Whether the output is already complete (a finished chunk directory).
    fn complete(&self) -> bool {
        false
    }
    /// How many examples the next part should hold (the rest of the current chunk, so that
    /// batches never straddle chunks, and a resumed run computes the batches an
    /// uninterrupted run computes).
    fn room(&self) -> Room;
    /// Chunks written so far, for a chunk directory.
    fn chunks(&self) -> Option<usize> {
        None
    }
    /// Adds the next examples.
    fn push(&mut self, part: Part) -> Result<()>;
    /// Writes what is left and marks the output complete.
    fn finish(&mut self) -> Result<Written>;
}

/// One `.safetensors` file, written at the end (through a temporary file: no partial file is
/// left on failure).
///
/// ```no_run
/// use hook_extract::{CacheSink, FileSink, Part};
/// let mut sink = FileSink::new("out.safetensors", None);
/// sink.push(Part { cache: hook_cache::ActivationCache::new(), examples: 0, batches: vec![], string_tokens: vec![] }).unwrap();
/// sink.finish().unwrap();
/// ```
pub struct FileSink {
    path: PathBuf,
    stamp: Option<Stamp>,
    cache: ActivationCache,
    examples: u64,
    batches: Vec<serde_json::Value>,
    string_tokens: Vec<serde_json::Value>,
    extra: Vec<(String, CacheValue)>,
}

impl FileSink {
    /// A sink writing `path`, stamping it when `stamp` is given.
    pub fn new(path: impl AsRef<Path>, stamp: Option<Stamp>) -> Self {
        FileSink { path: path.as_ref().to_path_buf(), stamp, cache: ActivationCache::new(), examples: 0, batches: Vec::new(), string_tokens: Vec::new(), extra: Vec::new() }
    }

    /// An entry written as is at the end (a merge's `metadata` and `hookrs_batches`).
    pub fn insert(&mut self, key: &str, value: impl Into<CacheValue>) {
        self.extra.push((key.to_string(), value.into()));
    }
}

impl CacheSink for FileSink {
    fn room(&self) -> Room {
        Room::Any
    }

    fn push(&mut self, part: Part) -> Result<()> {
        hook_cache::ragged::cat_ragged(&mut self.cache, part.cache)?;
        self.examples += part.examples;
        self.batches.extend(part.batches);
        self.string_tokens.extend(part.string_tokens);
        Ok(())
    }

    fn finish(&mut self) -> Result<Written> {
        let mut c = std::mem::take(&mut self.cache);
        if let Some(s) = &self.stamp {
            s.apply(&mut c, s.first_example, self.examples, std::mem::take(&mut self.batches), std::mem::take(&mut self.string_tokens))?;
        }
        for (k, v) in self.extra.drain(..) {
            c.insert(&k, v);
        }
        c.shrink_to_fit()?;
        c.save(&self.path).map_err(|e| anyhow::Error::from(e).context(format!("writing {}", self.path.display())))?;
        Ok(Written { examples: self.examples, chunks: None, table: Some(summary(&c)) })
    }
}

/// A chunk directory ([`hook_cache::ChunkWriter`]), written a chunk at a time: memory holds
/// one chunk. Chunks hold whole parts; with [`ChunkSink::open`] a chunk is cut every
/// `chunk_size` (examples, or bytes turned into examples from the first part); with
/// [`ChunkSink::as_given`] each part is one chunk.
pub struct ChunkSink {
    writer: ChunkWriter,
    stamp: Option<Stamp>,
    chunk_size: Option<ChunkSize>,
    per_chunk: Option<u64>,
    pending: Option<Part>,
}

impl ChunkSink {
    /// Opens (or resumes) the directory `dir` for an extraction with these fingerprints (a
    /// resume with others is refused; `overwrite` starts over), and these `settings` recorded
    /// in its manifest.
    pub fn open(dir: impl AsRef<Path>, fingerprints: BTreeMap<String, String>, overwrite: bool, chunk_size: ChunkSize, stamp: Option<Stamp>, settings: Vec<(&str, serde_json::Value)>) -> Result<Self> {
        let mut writer = ChunkWriter::open(dir, fingerprints, overwrite)?;
        for (k, v) in settings {
            writer.set_setting(k, v);
        }
        let per_chunk = match chunk_size {
            ChunkSize::Examples(n) => Some(n),
            ChunkSize::Bytes(_) => writer.setting("examples_per_chunk").and_then(|v| v.as_u64()),
        };
        Ok(ChunkSink { writer, stamp, chunk_size: Some(chunk_size), per_chunk, pending: None })
    }

    /// Opens (or resumes) `dir`, writing each part pushed as one chunk, unstamped (a merge of
    /// chunk directories).
    pub fn as_given(dir: impl AsRef<Path>, fingerprints: BTreeMap<String, String>) -> Result<Self> {
        Ok(ChunkSink { writer: ChunkWriter::open(dir, fingerprints, false)?, stamp: None, chunk_size: None, per_chunk: None, pending: None })
    }

    fn flush(&mut self) -> Result<()> {
        let Some(mut p) = self.pending.take() else { return Ok(()) };
        if let Some(s) = &self.stamp {
            s.apply(&mut p.cache, self.writer.examples_done(), p.examples, p.batches, p.string_tokens)?;
        }
        p.cache.shrink_to_fit()?;
        self.writer.write_chunk(&p.cache, p.examples)?;
        Ok(())
    }
}

impl CacheSink for ChunkSink {
    fn chunks(&self) -> Option<usize> {
        Some(self.writer.manifest().chunks.len())
    }

    fn examples_done(&self) -> u64 {
        self.writer.examples_done()
    }

    fn complete(&self) -> bool {
        self.writer.manifest().complete
    }

    fn room(&self) -> Room {
        let held = self.pending.as_ref().map_or(0, |p| p.examples);
        match self.per_chunk {
            Some(n) => Room::Examples(n.saturating_sub(held).max(1)),
            None if self.chunk_size.is_some() => Room::OneBatch,
            None => Room::Any,
        }
    }

    fn push(&mut self, part: Part) -> Result<()> {
        let Some(chunk_size) = self.chunk_size else {
            self.pending = Some(part);
            return self.flush();
        };
        let p = match self.pending.take() {
            None => part,
            Some(mut p) => {
                hook_cache::ragged::cat_ragged(&mut p.cache, part.cache)?;
                p.examples += part.examples;
                p.batches.extend(part.batches);
                p.string_tokens.extend(part.string_tokens);
                p
            }
        };
        if self.per_chunk.is_none() {
            // bytes: fix the examples per chunk from the first part
            let ChunkSize::Bytes(budget) = chunk_size else { unreachable!("examples are known") };
            let per_example = (p.cache.iter().map(|(_, v)| v.nbytes()).sum::<u64>() / p.examples.max(1)).max(1);
            let n = (budget / per_example).max(1);
            self.per_chunk = Some(n);
            self.writer.set_setting("examples_per_chunk", serde_json::json!(n));
        }
        let full = p.examples >= self.per_chunk.expect("set above");
        self.pending = Some(p);
        if full {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Written> {
        self.flush()?;
        self.writer.finish()?;
        Ok(Written { examples: self.writer.examples_done(), chunks: self.chunks(), table: None })
    }
}

/// The summary table of a cache: key family, count, shape, dtype, bytes.
///
/// ```
/// let mut c = hook_cache::ActivationCache::new();
/// c.insert("resid_out_0", tch::Tensor::zeros([2, 4], (tch::Kind::Float, tch::Device::Cpu)));
/// c.insert("resid_out_1", tch::Tensor::zeros([2, 4], (tch::Kind::Float, tch::Device::Cpu)));
/// let t = hook_extract::sink::summary(&c);
/// assert!(t.lines().nth(1).unwrap().starts_with("resid_out"));
/// assert!(t.contains("    2  [2, 4]"));
/// ```
pub fn summary(c: &ActivationCache) -> String {
    let mut fams: IndexMap<String, (usize, String, String, u64)> = IndexMap::new();
    for (k, v) in c.iter() {
        let fam = match hook_core::keys::ParsedKey::parse(k) {
            p if p.layer.is_some() => p.family,
            _ => k.to_string(),
        };
        let (shape, dtype) = match v.inner() {
            CacheValue::Tensor(t) => (format!("{:?}", t.size()), format!("{:?}", t.kind())),
            other => (other.kind().to_string(), "-".into()),
        };
        let e = fams.entry(fam).or_insert((0, shape, dtype, 0));
        e.0 += 1;
        e.3 += v.nbytes();
    }
    let mut s = format!("{:<28} {:>5}  {:<20} {:<8} {:>12}\n", "key family", "count", "shape", "dtype", "bytes");
    for (f, (n, shape, dtype, bytes)) in fams {
        s.push_str(&format!("{f:<28} {n:>5}  {shape:<20} {dtype:<8} {bytes:>12}\n"));
    }
    s
}
