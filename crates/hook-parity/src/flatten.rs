//! An `ActivationCache` as flat entries: `key`, `key/0`, `key/mean`, … → tensor, in the
//! cache's order (the Python side flattens easyroutine's cache the same way:
//! `xtask/python/harness/flatten.py`).

use hook_cache::{ActivationCache, CacheValue};
use indexmap::IndexMap;
use tch::Tensor;

/// Adds the tensors of `v` under `prefix` (lists and tuples by index, maps by key; info
/// wrappers seen through; plain data left out).
pub fn flatten(prefix: &str, v: &CacheValue, out: &mut IndexMap<String, Tensor>) {
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}/{k}") };
    match v {
        CacheValue::Tensor(t) => {
            out.insert(prefix.to_string(), t.shallow_clone());
        }
        CacheValue::Info { value, .. } => flatten(prefix, value, out),
        CacheValue::List(items) | CacheValue::Tuple(items) => items.iter().enumerate().for_each(|(i, x)| flatten(&join(&i.to_string()), x, out)),
        CacheValue::Map(m) => m.iter().for_each(|(k, x)| flatten(&join(k), x, out)),
        CacheValue::Data(_) => {}
    }
}

/// Every tensor of `c` but `mapping_index` (plain data), flattened.
///
/// ```
/// let mut c = hook_cache::ActivationCache::new();
/// c.insert("resid_out_0", tch::Tensor::zeros([1, 2], (tch::Kind::Float, tch::Device::Cpu)));
/// c.insert("mapping_index", serde_json::json!({"0": [0]}));
/// assert_eq!(hook_parity::flat_cache(&c).keys().collect::<Vec<_>>(), ["resid_out_0"]);
/// ```
pub fn flat_cache(c: &ActivationCache) -> IndexMap<String, Tensor> {
    let mut out = IndexMap::new();
    for (k, v) in c.iter() {
        if k != "mapping_index" {
            flatten(k, v, &mut out);
        }
    }
    out
}
