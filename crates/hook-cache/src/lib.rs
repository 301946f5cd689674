//! # hook-cache
//!
//! The container every extraction fills: [`ActivationCache`], with the semantics of
//! easyroutine's `activation_cache.py` (users move between the two), saved to one
//! safetensors file that Python reads back with `xtask/python/load_cache.py`.
//!
//! | module | what it holds |
//! |---|---|
//! | [`value`] | [`CacheValue`]: tensors, lists, tuples, maps, values with info, plain data |
//! | [`cache`] | [`ActivationCache`]: the dictionary surface, `cat`, deferred mode, `map_to_dict`, metadata |
//! | [`aggregate`] | [`Aggregation`]: how batches are joined, amortised tensor concatenation |
//! | [`memory`] | `memory_size`, `memory_tree` |
//! | [`io`] | save / load (safetensors + JSON manifest, atomic writes) |
//! | [`ragged`] | every token of prompts of different lengths: padded token axes, `token_lengths`, joins of different widths |
//! | [`chunks`] | chunk directories: a cache streamed to disk in checksummed chunks, resumable after a crash |
//! | [`error`] | [`CacheError`] |
//!
//! ```
//! use hook_cache::ActivationCache;
//! use tch::{Kind, Device, Tensor};
//!
//! let mut cache = ActivationCache::new();
//! cache.insert("resid_out_0", Tensor::zeros([1, 4, 8], (Kind::Float, Device::Cpu)));
//! cache.add_with_info("pattern_L0H0", Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu)), "Shape: batch q k");
//! assert_eq!(cache.keys().collect::<Vec<_>>(), ["resid_out_0", "pattern_L0H0"]);
//! assert_eq!(cache.memory_size(None), "192.00 B");
//! ```

pub mod aggregate;
pub mod cache;
pub mod chunks;
pub mod error;
pub mod io;
pub mod memory;
pub mod ragged;
pub mod value;

pub use aggregate::Aggregation;
pub use chunks::{ChunkDir, ChunkEntry, ChunkManifest, ChunkWriter};
pub use cache::ActivationCache;
pub use error::{CacheError, Result};
pub use value::CacheValue;
