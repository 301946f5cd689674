//! Saving and loading caches: one safetensors file holding every tensor, with a JSON manifest
//! in the safetensors header metadata (key [`MANIFEST_KEY`]) that records the structure
//! (lists, tuples, maps, info strings, plain data), each tensor's dtype and shape, and the
//! registered aggregation prefixes. `xtask/python/load_cache.py` reads the same file into a
//! Python dict with only torch and safetensors.
//!
//! Writes are atomic: the file is written next to its final name, synced, then renamed.
//!
//! Manifest (format version 1):
//! ```json
//! {"format": "hookrs-cache", "version": 1,
//!  "entries": [["resid_out_0", {"tensor": {"name": "resid_out_0", "dtype": "F32", "shape": [1, 3, 8]}}],
//!              ["head_keys_L0H0", {"info": {"info": "Shape: …", "value": {"tensor": {…}}}}],
//!              ["mapping_index", {"data": {"last": [0]}}]],
//!  "aggregations": [["mapping_index", "keep_newest"], …]}
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::aggregate::Aggregation;
use crate::cache::ActivationCache;
use crate::error::{CacheError, Result};
use crate::value::CacheValue;

/// The safetensors metadata key that holds the manifest.
pub const MANIFEST_KEY: &str = "hookrs_cache";
/// The manifest format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u64 = 1;
const FORMAT_NAME: &str = "hookrs-cache";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Node {
    Tensor { name: String, dtype: String, shape: Vec<usize> },
    List(Vec<Node>),
    Tuple(Vec<Node>),
    Map(Vec<(String, Node)>),
    Info { info: String, value: Box<Node> },
    Data(serde_json::Value),
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u64,
    entries: Vec<(String, Node)>,
    #[serde(default)]
    aggregations: Vec<(String, String)>,
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

struct Writer {
    tensors: Vec<(String, Bytes)>,
    names: HashSet<String>,
}

impl Writer {
    fn tensor(&mut self, key: &str, path: &str, t: &Tensor) -> Result<Node> {
        let dtype = dtype_of(t.kind())
            .ok_or_else(|| CacheError::WrongKind { key: key.into(), message: format!("dtype {:?} cannot be saved in safetensors", t.kind()) })?;
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let mut name = path.to_string();
        let mut n = 1;
        while !self.names.insert(name.clone()) {
            name = format!("{path}#{n}");
            n += 1;
        }
        let shape: Vec<usize> = t.size().iter().map(|&x| x as usize).collect();
        self.tensors.push((name.clone(), Bytes { dtype, shape: shape.clone(), data }));
        Ok(Node::Tensor { name, dtype: format!("{dtype:?}"), shape })
    }

    fn node(&mut self, key: &str, path: &str, v: &CacheValue) -> Result<Node> {
        Ok(match v {
            CacheValue::Tensor(t) => self.tensor(key, path, t)?,
            CacheValue::List(items) => Node::List(items.iter().enumerate().map(|(i, x)| self.node(key, &format!("{path}/{i}"), x)).collect::<Result<_>>()?),
            CacheValue::Tuple(items) => Node::Tuple(items.iter().enumerate().map(|(i, x)| self.node(key, &format!("{path}/{i}"), x)).collect::<Result<_>>()?),
            CacheValue::Map(m) => Node::Map(m.iter().map(|(k, x)| Ok((k.clone(), self.node(key, &format!("{path}/{k}"), x)?))).collect::<Result<_>>()?),
            CacheValue::Info { value, info } => Node::Info { info: info.clone(), value: Box::new(self.node(key, path, value)?) },
            CacheValue::Data(d) => Node::Data(d.clone()),
        })
    }
}

fn strategy_name(a: &Aggregation) -> Option<&'static str> {
    match a {
        Aggregation::KeepNewest => Some("keep_newest"),
        Aggregation::Flatten => Some("flatten"),
        Aggregation::ConcatStatistics => Some("concat_statistics"),
        Aggregation::Default => Some("default"),
        Aggregation::Custom(_) => None,
    }
}

fn strategy_from(name: &str) -> Option<Aggregation> {
    Some(match name {
        "keep_newest" => Aggregation::KeepNewest,
        "flatten" => Aggregation::Flatten,
        "concat_statistics" => Aggregation::ConcatStatistics,
        "default" => Aggregation::Default,
        _ => return None,
    })
}

/// A safetensors file with no tensor, only `__metadata__` (a cache of plain data). The
/// safetensors crate writes such a header as `{},"__metadata__":…`, which no reader accepts:
/// here it is written as the format says (u64 little-endian header length, the JSON header
/// padded with spaces to a multiple of 8 bytes, no data).
fn header_only(meta: &HashMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::to_string(&serde_json::json!({ "__metadata__": meta })).expect("metadata serialises").into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out
}

impl ActivationCache {
    /// Writes the cache to `path` (safetensors + manifest), atomically.
    ///
    /// Custom aggregation functions cannot be saved; their prefixes are logged and dropped.
    ///
    /// ```
    /// use hook_cache::ActivationCache;
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("cache.safetensors");
    /// let mut c = ActivationCache::new();
    /// c.add_with_info("head_keys_L0H0", tch::Tensor::ones([1, 2, 4], (tch::Kind::Float, tch::Device::Cpu)), "Shape: batch seq_len d_head");
    /// c.insert("mapping_index", serde_json::json!({"last": [0]}));
    /// c.save(&path).unwrap();
    /// let back = ActivationCache::load(&path).unwrap();
    /// assert!(back.same_as(&c));
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_atomic(path, &self.to_bytes(path)?)
    }

    /// The bytes [`ActivationCache::save`] writes (`path` only names the file in errors).
    /// The bytes [`ActivationCache::save`] writes (for pickling, sockets, …).
    ///
    /// ```
    /// let mut c = hook_cache::ActivationCache::new();
    /// c.insert("resid_out_0", tch::Tensor::ones([1, 2], (tch::Kind::Float, tch::Device::Cpu)));
    /// let back = hook_cache::ActivationCache::from_safetensors_bytes(&c.to_safetensors_bytes().unwrap()).unwrap();
    /// assert!(back.same_as(&c));
    /// ```
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        self.to_bytes(Path::new("<bytes>"))
    }

    /// A cache from the bytes [`ActivationCache::to_safetensors_bytes`] gives.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<ActivationCache> {
        Self::from_bytes(bytes, Path::new("<bytes>"))
    }

    pub(crate) fn to_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        let mut w = Writer { tensors: Vec::new(), names: HashSet::new() };
        let entries = self.iter().map(|(k, v)| Ok((k.to_string(), w.node(k, k, v)?))).collect::<Result<Vec<_>>>()?;
        let aggregations = self
            .strategies()
            .iter()
            .filter_map(|(p, a)| match strategy_name(a) {
                Some(n) => Some((p.clone(), n.to_string())),
                None => {
                    tracing::warn!(prefix = p.as_str(), "custom aggregation functions are not saved");
                    None
                }
            })
            .collect();
        let manifest = Manifest { format: FORMAT_NAME.into(), version: FORMAT_VERSION, entries, aggregations };
        let meta = HashMap::from([(MANIFEST_KEY.to_string(), serde_json::to_string(&manifest).expect("manifest serialises"))]);
        if w.tensors.is_empty() {
            return Ok(header_only(&meta));
        }
        let views: Vec<(&str, &Bytes)> = w.tensors.iter().map(|(n, b)| (n.as_str(), b)).collect();
        safetensors::tensor::serialize(views, &Some(meta))
            .map_err(|e| CacheError::Format { path: path.to_path_buf(), reason: format!("serialising failed: {e:?}") })
    }

    /// Reads a cache written by [`ActivationCache::save`] (or by `load_cache.py`'s `save_cache`).
    ///
    /// Truncated or corrupted files, files that are not caches, manifests that disagree with
    /// the tensors, and files of a newer format version are errors that say which.
    pub fn load(path: impl AsRef<Path>) -> Result<ActivationCache> {
        let path = path.as_ref();
        if path.is_dir() {
            return crate::chunks::ChunkDir::open(path)?.load_all();
        }
        let bytes = std::fs::read(path).map_err(|source| CacheError::Io { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses the bytes of a cache file (`path` only names the file in errors).
    pub(crate) fn from_bytes(bytes: &[u8], path: &Path) -> Result<ActivationCache> {
        let bad = |reason: String| CacheError::Format { path: path.to_path_buf(), reason };
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a readable safetensors file ({e:?}); is it truncated or corrupted?")))?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("unreadable header ({e:?})")))?;
        let text = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(MANIFEST_KEY))
            .ok_or_else(|| bad(format!("the safetensors header has no `{MANIFEST_KEY}` manifest: it was not written by hookrs")))?;
        let head: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("the manifest is not valid JSON: {e}")))?;
        if head.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(bad(format!("the manifest's format is {:?}, expected \"{FORMAT_NAME}\"", head.get("format"))));
        }
        let version = head.get("version").and_then(|v| v.as_u64()).ok_or_else(|| bad("the manifest has no version".into()))?;
        if version > FORMAT_VERSION {
            return Err(CacheError::NewerVersion { path: path.to_path_buf(), found: version, supported: FORMAT_VERSION });
        }
        let manifest: Manifest = serde_json::from_value(head).map_err(|e| bad(format!("the manifest does not match format version {version}: {e}")))?;
        let mut used = HashSet::new();
        let mut reader = Reader { st: &st, used: &mut used, path: path.to_path_buf() };
        let mut cache = ActivationCache::new();
        for (key, node) in &manifest.entries {
            let v = reader.value(node)?;
            cache.insert(key.clone(), v);
        }
        let extra: Vec<String> = st.names().into_iter().filter(|n| !used.contains(*n)).cloned().collect();
        if !extra.is_empty() {
            return Err(bad(format!("the file holds tensors the manifest does not mention: {extra:?}")));
        }
        if !manifest.aggregations.is_empty() {
            cache.clear_aggregations();
            for (prefix, name) in manifest.aggregations {
                let a = strategy_from(&name).ok_or_else(|| bad(format!("unknown aggregation strategy {name:?} for prefix {prefix:?}")))?;
                cache.register_aggregation(prefix, a);
            }
        }
        Ok(cache)
    }

    /// Same keys in the same order with [`CacheValue::same_as`] values.
    pub fn same_as(&self, other: &ActivationCache) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|((ka, va), (kb, vb))| ka == kb && va.same_as(vb))
    }
}

struct Reader<'a, 'b> {
    st: &'a SafeTensors<'b>,
    used: &'a mut HashSet<String>,
    path: PathBuf,
}

impl Reader<'_, '_> {
    fn value(&mut self, n: &Node) -> Result<CacheValue> {
        let bad = |reason: String| CacheError::Format { path: self.path.clone(), reason };
        Ok(match n {
            Node::Tensor { name, dtype, shape } => {
                let view = self.st.tensor(name).map_err(|_| bad(format!("the manifest names tensor {name:?}, which the file does not hold")))?;
                if format!("{:?}", view.dtype()) != *dtype || view.shape() != shape.as_slice() {
                    return Err(bad(format!(
                        "tensor {name:?} is {:?} {:?} in the file but {dtype} {shape:?} in the manifest",
                        view.dtype(),
                        view.shape()
                    )));
                }
                let kind = kind_of(view.dtype()).ok_or_else(|| bad(format!("tensor {name:?} has unsupported dtype {:?}", view.dtype())))?;
                let size: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
                self.used.insert(name.clone());
                CacheValue::Tensor(Tensor::f_from_data_size(view.data(), &size, kind)?)
            }
            Node::List(items) => CacheValue::List(items.iter().map(|x| self.value(x)).collect::<Result<_>>()?),
            Node::Tuple(items) => CacheValue::Tuple(items.iter().map(|x| self.value(x)).collect::<Result<_>>()?),
            Node::Map(kv) => CacheValue::Map(kv.iter().map(|(k, x)| Ok((k.clone(), self.value(x)?))).collect::<Result<IndexMap<_, _>>>()?),
            Node::Info { info, value } => CacheValue::Info { value: Box::new(self.value(value)?), info: info.clone() },
            Node::Data(d) => CacheValue::Data(d.clone()),
        })
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path`, and
/// syncs the folder so the rename itself survives a crash. A failure removes the temporary
/// file: nothing half-written is left behind, and whatever `path` held before is untouched.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::chunks::write_durable(path, bytes, None)
}
