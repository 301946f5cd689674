//! Chunk directories: a cache written as it is computed, in numbered chunk files, so that an
//! extraction larger than memory streams to disk and a crash loses at most one chunk.
//!
//! ```text
//! out/
//!   manifest.json              format, version, fingerprints, chunks (file, examples, sha256, bytes)
//!   chunk-000000.safetensors   a self-contained cache file of whole batches
//!   chunk-000001.safetensors
//! ```
//!
//! A chunk becomes visible only when it is complete and durable: it is written under a
//! temporary name, synced, renamed, the folder synced, and only then is the manifest replaced
//! the same way. A process killed at any moment leaves the last complete chunk in the
//! manifest and at worst a temporary file, which the next writer removes. Every chunk is read
//! back only after its size and SHA-256 match the manifest.
//!
//! ```
//! use hook_cache::{ActivationCache, ChunkDir, ChunkWriter};
//! use std::collections::BTreeMap;
//! use tch::{Device, Kind, Tensor};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let out = dir.path().join("cache");
//! let prints = BTreeMap::from([("model".to_string(), "m1".to_string())]);
//! let mut w = ChunkWriter::open(&out, prints.clone(), false).unwrap();
//! for i in 0..3 {
//!     let mut c = ActivationCache::new();
//!     c.insert("resid_out_0", Tensor::full([2, 1, 4], i as f64, (Kind::Float, Device::Cpu)));
//!     w.write_chunk(&c, 2).unwrap();
//! }
//! w.finish().unwrap();
//! let all = ChunkDir::open(&out).unwrap().load_all().unwrap();
//! assert_eq!(all.tensor("resid_out_0").unwrap().size(), vec![6, 1, 4]);
//! // the same directory with another model is refused
//! let other = BTreeMap::from([("model".to_string(), "m2".to_string())]);
//! assert!(ChunkWriter::open(&out, other, false).unwrap_err().to_string().contains("model"));
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::ActivationCache;
use crate::error::{CacheError, Result};

/// The manifest's `format` field.
pub const CHUNKS_FORMAT: &str = "hookrs-chunks";
/// The chunk-directory format version this build writes and reads.
pub const CHUNKS_VERSION: u64 = 1;
/// The manifest's file name inside a chunk directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One chunk of a [`ChunkManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// File name inside the directory.
    pub file: String,
    /// Index (in dataset order) of the chunk's first example.
    pub first_example: u64,
    /// How many examples the chunk holds.
    pub examples: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
}

/// `manifest.json` of a chunk directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkManifest {
    /// Always [`CHUNKS_FORMAT`].
    pub format: String,
    /// [`CHUNKS_VERSION`] when written by this build.
    pub version: u64,
    /// What the chunks were computed from (`model`, `config`, `input`, …): a resumed run must
    /// present the same values.
    pub fingerprints: BTreeMap<String, String>,
    /// Settings the writer fixed on its first chunk (e.g. examples per chunk) that a resumed
    /// run must keep so that its chunks are the ones an uninterrupted run writes.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// The complete chunks, in dataset order.
    pub chunks: Vec<ChunkEntry>,
    /// Whether the writer finished.
    pub complete: bool,
}

impl ChunkManifest {
    /// Examples in all chunks.
    pub fn examples(&self) -> u64 {
        self.chunks.iter().map(|c| c.examples).sum()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, hex.
///
/// ```
/// assert_eq!(&hook_cache::chunks::sha256_hex(b"")[..8], "e3b0c442");
/// ```
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Fault injection for crash tests: `HOOKRS_FAULT=chunk-write:K` aborts the process halfway
/// through writing chunk K's temporary file, `chunk-renamed:K` right after chunk K is renamed
/// (before the manifest names it), `manifest-write:K` halfway through the K-th manifest write;
/// `chunk-enospc:K` makes the write of chunk K fail halfway with "No space left on device".
/// Only builds with the `fault-injection` feature (the tests') read it: a release build never
/// aborts on an environment variable.
fn fault(point: &str, k: usize) -> bool {
    cfg!(feature = "fault-injection") && std::env::var("HOOKRS_FAULT").is_ok_and(|f| f == format!("{point}:{k}"))
}

/// Writes `bytes` at `path` durably and atomically (temporary file, sync, rename, folder
/// sync; the temporary file is removed on failure); `fault_point` names the injected faults
/// that apply (tests).
pub(crate) fn write_durable(path: &Path, bytes: &[u8], fault_point: Option<(&str, usize)>) -> Result<()> {
    let io = |source| CacheError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half])?;
        if let Some((p, k)) = fault_point {
            if fault(p, k) {
                f.sync_all()?;
                std::process::abort();
            }
            if p == "chunk-write" && fault("chunk-enospc", k) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
        }
        f.write_all(&bytes[half..])?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(if e.raw_os_error() == Some(28) {
            CacheError::Chunks {
                dir: dir.to_path_buf(),
                reason: format!(
                    "no space left on the device while writing {}: free space (or pass another --out) and rerun the same command to resume; the complete chunks are kept",
                    path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                ),
            }
        } else {
            io(e)
        });
    }
    Ok(())
}

/// Writes a chunk directory, resuming one that an earlier run left incomplete.
#[derive(Debug)]
pub struct ChunkWriter {
    dir: PathBuf,
    manifest: ChunkManifest,
    manifest_writes: usize,
}

impl ChunkWriter {
    /// Opens `dir` for writing. A new or empty directory starts a new cache. A directory with
    /// a manifest resumes after its last complete chunk if its fingerprints equal
    /// `fingerprints`; otherwise it is refused with an error naming what differs, unless
    /// `overwrite`, which deletes its chunks and starts over. A directory holding other files
    /// and no manifest is refused (nothing the user had is deleted).
    pub fn open(dir: impl AsRef<Path>, fingerprints: BTreeMap<String, String>, overwrite: bool) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let io = |source| CacheError::Io { path: dir.clone(), source };
        if dir.exists() && !dir.is_dir() {
            return Err(CacheError::Chunks { dir: dir.clone(), reason: "is a file, not a directory: pass a directory (or a .safetensors file name for one file)".into() });
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let fresh = ChunkManifest { format: CHUNKS_FORMAT.into(), version: CHUNKS_VERSION, fingerprints: fingerprints.clone(), settings: BTreeMap::new(), chunks: Vec::new(), complete: false };
        let mut w = ChunkWriter { dir: dir.clone(), manifest: fresh.clone(), manifest_writes: 0 };
        if manifest_path.exists() {
            let existing = ChunkDir::open(&dir)?;
            if !overwrite {
                for (k, want) in &fingerprints {
                    match existing.manifest.fingerprints.get(k) {
                        Some(had) if had == want => {}
                        had => {
                            let had = had.map(String::as_str).unwrap_or("none");
                            return Err(CacheError::Chunks {
                                dir: dir.clone(),
                                reason: format!(
                                    "holds an extraction with another {k} ({}): write to another directory, or pass --overwrite to start over",
                                    describe_difference(had, want)
                                ),
                            });
                        }
                    }
                }
                // every chunk the manifest names must be intact before we build on it
                for i in 0..existing.manifest.chunks.len() {
                    existing.verify(i)?;
                }
                w.manifest = existing.manifest;
                w.manifest.fingerprints = fingerprints;
            } else {
                for c in &existing.manifest.chunks {
                    let _ = std::fs::remove_file(dir.join(&c.file));
                }
                std::fs::remove_file(&manifest_path).map_err(io)?;
            }
        } else {
            let foreign: Vec<String> = std::fs::read_dir(&dir)
                .map_err(io)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !(n.starts_with('.') && n.ends_with(".tmp")) && !is_chunk_file(n))
                .collect();
            if !foreign.is_empty() {
                return Err(CacheError::Chunks {
                    dir: dir.clone(),
                    reason: format!("is not empty and has no {MANIFEST_FILE} (it holds {}): pass an empty or new directory", foreign.join(", ")),
                });
            }
        }
        // leftovers of a killed writer: temporary files, and chunks the manifest does not name
        let named: Vec<String> = w.manifest.chunks.iter().map(|c| c.file.clone()).collect();
        for e in std::fs::read_dir(&dir).map_err(io)?.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if (n.starts_with('.') && n.ends_with(".tmp")) || (is_chunk_file(&n) && !named.contains(&n)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(w)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest as written so far.
    pub fn manifest(&self) -> &ChunkManifest {
        &self.manifest
    }

    /// Examples already in complete chunks: where a resumed run continues.
    pub fn examples_done(&self) -> u64 {
        self.manifest.examples()
    }

    /// A setting fixed by an earlier run (see [`ChunkManifest::settings`]).
    pub fn setting(&self, key: &str) -> Option<&serde_json::Value> {
        self.manifest.settings.get(key)
    }

    /// Fixes a setting; it is saved with the next manifest write.
    pub fn set_setting(&mut self, key: &str, value: serde_json::Value) {
        self.manifest.settings.insert(key.to_string(), value);
    }

    /// Writes `cache` (the next `examples` examples, in dataset order) as the next chunk,
    /// durably, then records it in the manifest.
    pub fn write_chunk(&mut self, cache: &ActivationCache, examples: u64) -> Result<()> {
        self.manifest.complete = false;
        let index = self.manifest.chunks.len();
        let file = chunk_file_name(index);
        let path = self.dir.join(&file);
        let bytes = cache.to_bytes(&path)?;
        write_durable(&path, &bytes, Some(("chunk-write", index)))?;
        if fault("chunk-renamed", index) {
            std::process::abort();
        }
        let entry = ChunkEntry { file, first_example: self.examples_done(), examples, sha256: sha256_hex(&bytes), bytes: bytes.len() as u64 };
        self.manifest.chunks.push(entry);
        if let Err(e) = self.write_manifest() {
            self.manifest.chunks.pop();
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(())
    }

    /// Marks the directory complete.
    pub fn finish(&mut self) -> Result<()> {
        self.manifest.complete = true;
        self.write_manifest()
    }

    fn write_manifest(&mut self) -> Result<()> {
        let k = self.manifest_writes;
        self.manifest_writes += 1;
        let text = serde_json::to_string_pretty(&self.manifest).expect("manifest serialises");
        write_durable(&self.dir.join(MANIFEST_FILE), text.as_bytes(), Some(("manifest-write", k)))
    }
}

/// `a` against `b`: the fields that differ when both are JSON objects, else both values.
fn describe_difference(had: &str, now: &str) -> String {
    if let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (serde_json::from_str(had), serde_json::from_str(now)) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let diffs: Vec<String> = keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| format!("{k}: {} there, {} now", a.get(k).map(|v| v.to_string()).unwrap_or("none".into()), b.get(k).map(|v| v.to_string()).unwrap_or("none".into())))
            .collect();
        if !diffs.is_empty() {
            return diffs.join("; ");
        }
    }
    format!("{had} there, {now} now")
}

fn chunk_file_name(i: usize) -> String {
    format!("chunk-{i:06}.safetensors")
}

fn is_chunk_file(n: &str) -> bool {
    n.starts_with("chunk-") && n.ends_with(".safetensors")
}

/// A chunk directory opened for reading: chunks are read one at a time, each checked against
/// the manifest's size and SHA-256 first.
#[derive(Debug, Clone)]
pub struct ChunkDir {
    dir: PathBuf,
    manifest: ChunkManifest,
}

impl ChunkDir {
    /// Whether `path` is a directory with a chunk manifest.
    pub fn is_chunk_dir(path: &Path) -> bool {
        path.is_dir() && path.join(MANIFEST_FILE).is_file()
    }

    /// Opens `dir` and checks its manifest (format, version, chunk order and names).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let bad = |reason: String| CacheError::Chunks { dir: dir.clone(), reason };
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                bad(format!("has no {MANIFEST_FILE}: it is not a chunk directory written by `hookrs extract --out DIR/`"))
            } else {
                CacheError::Io { path: path.clone(), source: e }
            }
        })?;
        let head: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("{MANIFEST_FILE} is not valid JSON ({e}): was it edited by hand?")))?;
        if head.get("format").and_then(|f| f.as_str()) != Some(CHUNKS_FORMAT) {
            return Err(bad(format!("{MANIFEST_FILE} has format {:?}, expected \"{CHUNKS_FORMAT}\"", head.get("format"))));
        }
        let version = head.get("version").and_then(|v| v.as_u64()).ok_or_else(|| bad(format!("{MANIFEST_FILE} has no version")))?;
        if version > CHUNKS_VERSION {
            return Err(bad(format!("was written with chunk format version {version}; this hookrs reads versions up to {CHUNKS_VERSION}: upgrade hookrs")));
        }
        let manifest: ChunkManifest = serde_json::from_value(head).map_err(|e| bad(format!("{MANIFEST_FILE} does not match format version {version}: {e}")))?;
        let mut next = 0u64;
        for (i, c) in manifest.chunks.iter().enumerate() {
            if c.file != chunk_file_name(i) {
                return Err(bad(format!("{MANIFEST_FILE}: chunk {i} is named {:?}, expected {:?}", c.file, chunk_file_name(i))));
            }
            if c.first_example != next || c.examples == 0 {
                return Err(bad(format!(
                    "{MANIFEST_FILE}: chunk {i} covers examples {}..{}, expected a non-empty range starting at {next}",
                    c.first_example,
                    c.first_example.saturating_add(c.examples)
                )));
            }
            next = next.saturating_add(c.examples);
        }
        Ok(ChunkDir { dir, manifest })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its manifest.
    pub fn manifest(&self) -> &ChunkManifest {
        &self.manifest
    }

    /// The bytes of chunk `i`, after checking size and SHA-256.
    fn verified_bytes(&self, i: usize) -> Result<Vec<u8>> {
        let c = self.manifest.chunks.get(i).ok_or_else(|| CacheError::Chunks { dir: self.dir.clone(), reason: format!("has no chunk {i} ({} chunks)", self.manifest.chunks.len()) })?;
        let path = self.dir.join(&c.file);
        let bytes = std::fs::read(&path).map_err(|source| CacheError::Io { path: path.clone(), source })?;
        if bytes.len() as u64 != c.bytes {
            return Err(CacheError::Chunks { dir: self.dir.clone(), reason: format!("{} has {} bytes, the manifest says {}: it is truncated or was replaced", c.file, bytes.len(), c.bytes) });
        }
        if sha256_hex(&bytes) != c.sha256 {
            return Err(CacheError::Chunks { dir: self.dir.clone(), reason: format!("{} does not match its SHA-256 in the manifest: it is corrupted", c.file) });
        }
        Ok(bytes)
    }

    /// Checks chunk `i` against the manifest without parsing it.
    pub fn verify(&self, i: usize) -> Result<()> {
        self.verified_bytes(i).map(drop)
    }

    /// Reads chunk `i` (verified).
    pub fn read_chunk(&self, i: usize) -> Result<ActivationCache> {
        let bytes = self.verified_bytes(i)?;
        ActivationCache::from_bytes(&bytes, &self.dir.join(&self.manifest.chunks[i].file))
    }

    /// The chunks in dataset order, read one at a time: memory holds one chunk at once.
    pub fn iter(&self) -> impl Iterator<Item = Result<ActivationCache>> + '_ {
        (0..self.manifest.chunks.len()).map(move |i| self.read_chunk(i))
    }

    /// Every chunk joined into one cache with the cache's aggregation rules (tensors
    /// concatenated on the batch axis). Per-chunk bookkeeping (`hookrs_batches`) is replaced
    /// by one record of the chunks; `metadata` is kept from the first chunk.
    pub fn load_all(&self) -> Result<ActivationCache> {
        let mut all = ActivationCache::new();
        let mut first_meta = None;
        let mut records = Vec::new();
        for c in self.iter() {
            let mut c = c?;
            if let Some(m) = c.remove("metadata") {
                first_meta.get_or_insert(m);
            }
            if let Some(b) = c.remove("hookrs_batches") {
                records.push(b);
            }
            crate::ragged::cat_ragged(&mut all, c)?;
        }
        if let Some(m) = first_meta {
            all.insert("metadata", m);
        }
        let complete = self.manifest.complete;
        all.insert(
            "hookrs_chunks",
            serde_json::json!({"dir": self.dir.display().to_string(), "chunks": self.manifest.chunks.len(), "examples": self.manifest.examples(), "complete": complete}),
        );
        if !complete {
            tracing::warn!(dir = %self.dir.display(), "the chunk directory is incomplete (its writer did not finish): reading the complete chunks");
        }
        Ok(all)
    }
}
