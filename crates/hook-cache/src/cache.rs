//! [`ActivationCache`]: an insertion-ordered map of [`CacheValue`]s with easyroutine's
//! dictionary surface, aggregation across batches (`cat`, deferred mode), `map_to_dict` and
//! metadata.

use std::ops::Add;

use hook_core::keys::ParsedKey;
use indexmap::IndexMap;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::aggregate::{check_placement, Aggregation};
use crate::error::{CacheError, Result};
use crate::value::CacheValue;

/// The key families easyroutine's `valid_keys` lists; other keys are accepted and logged.
const KNOWN_FAMILIES: &[&str] = &[
    "resid_out", "resid_in", "resid_mid", "resid_in_post_layernorm", "attn_in", "attn_out", "mlp_out", "avg_attn_pattern",
    "avg_pattern", "pattern", "head_values", "head_keys", "head_queries", "head_out", "values", "keys", "queries",
    "projected_value", "projected_key", "projected_query", "input_ids", "input_embeddings", "mapping_index", "last_layernorm",
    "token_dict", "logits", "metadata", "offset",
];

/// One key's value plus the growth buffer of its aggregated tensor (the value is a view of the
/// buffer's filled front; later batches are copied in behind it).
#[derive(Debug)]
struct Slot {
    value: CacheValue,
    buffer: Option<Tensor>,
}

impl Clone for Slot {
    /// The clone shares the values but not the buffer: two caches appending into one buffer
    /// would overwrite each other's rows. The clone's next `cat` allocates its own.
    fn clone(&self) -> Self {
        Slot { value: self.value.clone(), buffer: None }
    }
}

/// easyroutine's `ActivationCache`.
///
/// ```
/// use hook_cache::{ActivationCache, CacheValue};
/// use tch::{Kind, Device, Tensor};
///
/// let batch = |x: f64| {
///     let mut c = ActivationCache::new();
///     c.insert("resid_out_0", Tensor::full([1, 2, 4], x, (Kind::Float, Device::Cpu)));
///     c.insert("mapping_index", serde_json::json!({"last": [0]}));
///     c
/// };
/// let mut all = ActivationCache::new();
/// for i in 0..3 {
///     all.cat(batch(i as f64)).unwrap();
/// }
/// assert_eq!(all.tensor("resid_out_0").unwrap().size(), vec![3, 2, 4]);
/// assert_eq!(all.keys().collect::<Vec<_>>(), ["resid_out_0", "mapping_index"]);
/// ```
#[derive(Clone, Debug)]
pub struct ActivationCache {
    entries: IndexMap<String, Slot>,
    strategies: Vec<(String, Aggregation)>,
    deferred: Option<Vec<ActivationCache>>,
}

impl Default for ActivationCache {
    fn default() -> Self {
        Self::new()
    }
}

impl ActivationCache {
    /// An empty cache with easyroutine's built-in aggregations registered: `mapping_index`
    /// keeps the newest, `offset` and `token_dict` flatten, `last_layernorm` concatenates.
    pub fn new() -> Self {
        Self {
            entries: IndexMap::new(),
            strategies: vec![
                ("mapping_index".into(), Aggregation::KeepNewest),
                ("offset".into(), Aggregation::Flatten),
                ("last_layernorm".into(), Aggregation::ConcatStatistics),
                ("token_dict".into(), Aggregation::Flatten),
            ],
            deferred: None,
        }
    }

    // ---- the dictionary surface ------------------------------------------------------------

    /// `cache[key] = value`. Keys outside easyroutine's known families are accepted and
    /// logged at debug level.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<CacheValue>) -> Option<CacheValue> {
        let key = key.into();
        if !KNOWN_FAMILIES.contains(&ParsedKey::parse(&key).family.as_str()) {
            tracing::debug!(key, "key outside easyroutine's known families; could be a user-defined key");
        }
        self.entries.insert(key, Slot { value: value.into(), buffer: None }).map(|s| s.value)
    }

    /// `add_with_info`: stores `value` wrapped with an info string.
    ///
    /// ```
    /// let mut c = hook_cache::ActivationCache::new();
    /// c.add_with_info("head_keys_L0H0", tch::Tensor::from(1.0f32), "Shape: batch seq_len d_head");
    /// assert_eq!(c.get("head_keys_L0H0").unwrap().info(), Some("Shape: batch seq_len d_head"));
    /// ```
    pub fn add_with_info(&mut self, key: impl Into<String>, value: impl Into<CacheValue>, info: impl Into<String>) {
        self.insert(key, CacheValue::with_info(value, info));
    }

    /// `add_metadata`: stores `metadata` = target token positions, model name, extraction
    /// config and interventions (anything serde can write).
    pub fn add_metadata(
        &mut self,
        target_token_positions: impl Serialize,
        model_name: &str,
        extraction_config: impl Serialize,
        interventions: impl Serialize,
    ) -> Result<()> {
        let j = |v: &dyn erased::Ser| v.to_json();
        let meta = serde_json::json!({
            "target_token_positions": j(&target_token_positions)?,
            "model_name": model_name,
            "extraction_config": j(&extraction_config)?,
            "interventions": j(&interventions)?,
        });
        self.insert("metadata", meta);
        Ok(())
    }

    /// `cache[key]`, or `None`.
    pub fn get(&self, key: &str) -> Option<&CacheValue> {
        self.entries.get(key).map(|s| &s.value)
    }

    /// `cache[key]`, or an error naming the closest keys.
    ///
    /// ```
    /// let mut c = hook_cache::ActivationCache::new();
    /// c.insert("resid_out_0", tch::Tensor::from(1.0f32));
    /// let e = c.require("resid_out_1").unwrap_err().to_string();
    /// assert_eq!(e, "no key `resid_out_1` in the cache; closest keys: resid_out_0");
    /// ```
    pub fn require(&self, key: &str) -> Result<&CacheValue> {
        self.get(key).ok_or_else(|| CacheError::NotFound { key: key.into(), suggestions: self.closest(key) })
    }

    /// The tensor under `key` (looking through an info wrapper), or an error.
    pub fn tensor(&self, key: &str) -> Result<&Tensor> {
        let v = self.require(key)?;
        v.tensor().ok_or_else(|| CacheError::WrongKind { key: key.into(), message: format!("expected a tensor, found a {}", v.kind()) })
    }

    /// `cache.get(key, default)`.
    pub fn get_or<'a>(&'a self, key: &str, default: &'a CacheValue) -> &'a CacheValue {
        self.get(key).unwrap_or(default)
    }

    /// `del cache[key]`.
    pub fn remove(&mut self, key: &str) -> Option<CacheValue> {
        self.entries.shift_remove(key).map(|s| s.value)
    }

    /// `key in cache`.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Keys in insertion order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// `(key, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &CacheValue)> {
        self.entries.iter().map(|(k, s)| (k.as_str(), &s.value))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `cache.update(other)`: other's values win; new keys go last.
    pub fn update(&mut self, other: &ActivationCache) {
        for (k, v) in other.iter() {
            self.insert(k, v.clone());
        }
    }

    /// `self + other`: a new cache with self's entries updated by other's.
    pub fn merged(&self, other: &ActivationCache) -> ActivationCache {
        let mut out = ActivationCache { entries: IndexMap::new(), strategies: ActivationCache::new().strategies, deferred: None };
        out.update(self);
        out.update(other);
        out
    }

    /// `cache.to(device)`: every tensor moved. On error nothing is changed.
    pub fn to(&mut self, device: Device) -> Result<()> {
        let moved: Vec<CacheValue> = self.entries.values().map(|s| s.value.to_device(device)).collect::<Result<_>>()?;
        for (slot, v) in self.entries.values_mut().zip(moved) {
            *slot = Slot { value: v, buffer: None };
        }
        Ok(())
    }

    /// `cache.cpu()`.
    pub fn cpu(&mut self) -> Result<()> {
        self.to(Device::Cpu)
    }

    /// The same cache with every tensor replaced by `f(tensor)`, visited in a fixed order
    /// (entries in insertion order, and inside each value depth first). Non-tensor values are
    /// kept. The building block of conversions such as [`to_float_kind`](Self::to_float_kind)
    /// or a copy to host memory.
    ///
    /// ```
    /// use hook_cache::ActivationCache;
    /// use tch::{Device, Kind, Tensor};
    /// let mut c = ActivationCache::new();
    /// c.insert("resid_out_0", Tensor::ones([1, 2], (Kind::Float, Device::Cpu)));
    /// let doubled = c.map_tensors(|t| Ok(t * 2)).unwrap();
    /// assert_eq!(doubled.tensor("resid_out_0").unwrap().sum(Kind::Float).double_value(&[]), 4.0);
    /// ```
    pub fn map_tensors(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<ActivationCache> {
        let mut out = self.clone();
        for slot in out.entries.values_mut() {
            slot.value = slot.value.map_tensors(&mut f)?;
        }
        Ok(out)
    }

    /// The same cache with every floating-point tensor converted to `kind` (integer tensors,
    /// such as input ids, are kept as they are): a bfloat16 model's activations saved as
    /// float32, for example.
    ///
    /// ```
    /// use hook_cache::ActivationCache;
    /// use tch::{Device, Kind, Tensor};
    /// let mut c = ActivationCache::new();
    /// c.insert("resid_out_0", Tensor::ones([1, 2], (Kind::BFloat16, Device::Cpu)));
    /// c.insert("input_ids", Tensor::from_slice(&[3i64, 4]));
    /// let f = c.to_float_kind(Kind::Float).unwrap();
    /// assert_eq!(f.tensor("resid_out_0").unwrap().kind(), Kind::Float);
    /// assert_eq!(f.tensor("input_ids").unwrap().kind(), Kind::Int64);
    /// ```
    pub fn to_float_kind(&self, kind: Kind) -> Result<ActivationCache> {
        self.map_tensors(|t| Ok(if t.is_floating_point() && t.kind() != kind { t.f_to_kind(kind)? } else { t.shallow_clone() }))
    }

    /// Drops the slack of aggregation buffers (each aggregated tensor becomes a compact copy).
    pub fn shrink_to_fit(&mut self) -> Result<()> {
        for slot in self.entries.values_mut() {
            if slot.buffer.take().is_some() {
                slot.value = slot.value.map_tensors(&mut copy)?;
            }
        }
        Ok(())
    }

    // ---- aggregation -----------------------------------------------------------------------

    /// `register_aggregation(prefix, strategy)`: keys starting with `prefix` aggregate with
    /// `strategy`. The first registered prefix that matches wins; registering a prefix again
    /// replaces its strategy in place.
    pub fn register_aggregation(&mut self, prefix: impl Into<String>, strategy: Aggregation) {
        let prefix = prefix.into();
        tracing::debug!(prefix, ?strategy, "registering aggregation strategy");
        match self.strategies.iter_mut().find(|(p, _)| *p == prefix) {
            Some(slot) => slot.1 = strategy,
            None => self.strategies.push((prefix, strategy)),
        }
    }

    /// `remove_aggregation(prefix)`.
    pub fn remove_aggregation(&mut self, prefix: &str) {
        self.strategies.retain(|(p, _)| p != prefix);
    }

    /// The registered `(prefix, strategy)` pairs, in match order.
    pub fn strategies(&self) -> &[(String, Aggregation)] {
        &self.strategies
    }

    /// Removes every registered strategy (all keys then use the default).
    pub fn clear_aggregations(&mut self) {
        self.strategies.clear();
    }

    /// The strategy for `key`.
    pub fn aggregation_for(&self, key: &str) -> &Aggregation {
        strategy_for(&self.strategies, key)
    }

    /// `cat(other)`: aggregates another batch into this cache.
    ///
    /// - In deferred mode the batch is kept and aggregated when the mode ends.
    /// - An empty cache takes each value through its aggregator (`aggregator(None, value)`).
    /// - Otherwise the key sets must be equal, and tensors must share dtype and device; both
    ///   are checked before anything changes, so a refused `cat` leaves the cache as it was.
    pub fn cat(&mut self, other: ActivationCache) -> Result<()> {
        if let Some(pending) = self.deferred.as_mut() {
            pending.push(other);
            return Ok(());
        }
        if self.entries.is_empty() {
            for (key, slot) in other.entries {
                let mut buffer = None;
                let v = self.aggregation_for(&key).clone().apply(&key, None, slot.value, &mut buffer)?;
                self.entries.insert(key, Slot { value: v, buffer });
            }
            return Ok(());
        }
        let mut only_self: Vec<String> = self.entries.keys().filter(|k| !other.entries.contains_key(*k)).cloned().collect();
        let mut only_other: Vec<String> = other.entries.keys().filter(|k| !self.entries.contains_key(*k)).cloned().collect();
        if !only_self.is_empty() || !only_other.is_empty() {
            only_self.sort();
            only_other.sort();
            return Err(CacheError::KeyMismatch { only_self, only_other });
        }
        for (key, slot) in &self.entries {
            let theirs = &other.entries[key].value;
            if let (Some(a), Some(b)) = (slot.value.tensor(), theirs.tensor()) {
                check_placement(key, a, b)?;
            }
        }
        let mut other = other.entries;
        for (key, slot) in self.entries.iter_mut() {
            let new = other.shift_remove(key).expect("key sets checked").value;
            let strategy = strategy_for(&self.strategies, key);
            let old = std::mem::replace(&mut slot.value, CacheValue::Data(serde_json::Value::Null));
            let mut buffer = slot.buffer.take();
            match strategy.apply(key, Some(old.clone()), new, &mut buffer) {
                Ok(v) => {
                    slot.value = v;
                    slot.buffer = buffer;
                }
                Err(e) => {
                    slot.value = old;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// `with cache.deferred_mode():` — batches given to `cat` inside `f` are collected and
    /// aggregated once `f` returns Ok. If `f` fails, the collected batches are dropped.
    ///
    /// ```
    /// let mut all = hook_cache::ActivationCache::new();
    /// all.deferred_mode(|c| {
    ///     for _ in 0..3 {
    ///         let mut b = hook_cache::ActivationCache::new();
    ///         b.insert("logits", tch::Tensor::zeros([1, 5], (tch::Kind::Float, tch::Device::Cpu)));
    ///         c.cat(b)?;
    ///     }
    ///     assert!(c.is_empty()); // nothing aggregated yet
    ///     Ok(())
    /// }).unwrap();
    /// assert_eq!(all.tensor("logits").unwrap().size(), vec![3, 5]);
    /// ```
    pub fn deferred_mode<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let original = self.deferred.replace(Vec::new());
        let out = f(self);
        let pending = std::mem::replace(&mut self.deferred, original).unwrap_or_default();
        let r = out?;
        for batch in pending {
            self.cat(batch)?;
        }
        Ok(r)
    }

    /// Enters deferred mode without a closure (for bindings whose context managers have an
    /// enter and an exit, such as Python's `with cache.deferred_mode():`). Pair it with
    /// [`finish_deferred`](Self::finish_deferred); deferred mode does not nest.
    ///
    /// ```
    /// use hook_cache::ActivationCache;
    /// use tch::{Device, Kind, Tensor};
    /// let mut all = ActivationCache::new();
    /// all.start_deferred().unwrap();
    /// for _ in 0..2 {
    ///     let mut b = ActivationCache::new();
    ///     b.insert("logits", Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)));
    ///     all.cat(b).unwrap();
    /// }
    /// assert!(all.start_deferred().is_err(), "no nesting");
    /// all.finish_deferred().unwrap();
    /// assert_eq!(all.tensor("logits").unwrap().size(), vec![2, 3]);
    /// ```
    pub fn start_deferred(&mut self) -> Result<()> {
        if self.deferred.is_some() {
            return Err(CacheError::Mode("the cache is already in deferred mode (it does not nest)".into()));
        }
        self.deferred = Some(Vec::new());
        Ok(())
    }

    /// Leaves deferred mode: aggregates the batches collected since
    /// [`start_deferred`](Self::start_deferred). Outside deferred mode it does nothing.
    pub fn finish_deferred(&mut self) -> Result<()> {
        for batch in self.deferred.take().unwrap_or_default() {
            self.cat(batch)?;
        }
        Ok(())
    }

    // ---- views -----------------------------------------------------------------------------

    /// `map_to_dict(key)`: for each entry `name -> positions` of `mapping_index`, the columns
    /// `cache[key][:, positions]`, squeezed.
    pub fn map_to_dict(&self, key: &str) -> Result<IndexMap<String, Tensor>> {
        let t = self.tensor(key)?;
        let mi = self.require("mapping_index")?;
        let CacheValue::Data(serde_json::Value::Object(map)) = mi.inner() else {
            return Err(CacheError::WrongKind { key: "mapping_index".into(), message: format!("expected a map of name -> positions, found a {}", mi.kind()) });
        };
        let mut out = IndexMap::new();
        for (name, positions) in map {
            let ix: Vec<i64> = match positions {
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_i64()).collect(),
                serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
                _ => continue, // e.g. "info": "avg"
            };
            let sel = t.f_index_select(1, &Tensor::from_slice(&ix).to_device(t.device()))?;
            out.insert(name.clone(), sel.f_squeeze()?);
        }
        Ok(out)
    }

    /// Up to three keys closest to `key`.
    fn closest(&self, key: &str) -> Vec<String> {
        hook_core::suggest::closest(key, self.entries.keys().map(String::as_str), 3)
    }
}

/// The first registered strategy whose prefix starts `key`, else the default.
fn strategy_for<'a>(strategies: &'a [(String, Aggregation)], key: &str) -> &'a Aggregation {
    strategies.iter().find(|(p, _)| key.starts_with(p.as_str())).map(|(_, s)| s).unwrap_or(&Aggregation::Default)
}

fn copy(t: &Tensor) -> Result<Tensor> {
    let mut y = t.f_empty_like()?;
    y.f_copy_(t)?;
    Ok(y)
}

impl Add for &ActivationCache {
    type Output = ActivationCache;
    /// `self + other` (see [`ActivationCache::merged`]).
    fn add(self, other: &ActivationCache) -> ActivationCache {
        self.merged(other)
    }
}

/// Serialising `impl Serialize` arguments without making `add_metadata` generic over three
/// more type parameters at every call site.
mod erased {
    use crate::error::{CacheError, Result};

    pub trait Ser {
        fn to_json(&self) -> Result<serde_json::Value>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> Result<serde_json::Value> {
            serde_json::to_value(self).map_err(|e| CacheError::WrongKind { key: "metadata".into(), message: e.to_string() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::Kind;

    fn t(rows: i64) -> Tensor {
        Tensor::ones([rows, 2], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn a_clone_does_not_share_the_growth_buffer() {
        let batch = |x: f64| {
            let mut c = ActivationCache::new();
            c.insert("k", t(1) * x);
            c
        };
        let mut a = ActivationCache::new();
        a.cat(batch(1.0)).unwrap();
        a.cat(batch(2.0)).unwrap();
        let mut b = a.clone();
        a.cat(batch(3.0)).unwrap();
        b.cat(batch(4.0)).unwrap();
        assert_eq!(a.tensor("k").unwrap().double_value(&[2, 0]), 3.0);
        assert_eq!(b.tensor("k").unwrap().double_value(&[2, 0]), 4.0);
    }

    #[test]
    fn key_mismatch_names_both_sides_and_changes_nothing() {
        let mut a = ActivationCache::new();
        a.insert("x", t(1));
        a.insert("y", t(1));
        a.cat(ActivationCache::new()).ok(); // empty other: key mismatch
        let mut b = ActivationCache::new();
        b.insert("x", t(1));
        b.insert("z", t(1));
        let e = a.cat(b).unwrap_err().to_string();
        assert_eq!(e, "key mismatch: only in this cache: [y]; only in the other: [z] (cat needs the same keys on both sides)");
        assert_eq!(a.tensor("x").unwrap().size(), vec![1, 2]);
    }

    #[test]
    fn dtype_mismatch_in_cat_leaves_cache_unchanged() {
        let mut a = ActivationCache::new();
        a.insert("a", t(1));
        a.insert("b", t(1));
        let mut b = ActivationCache::new();
        b.insert("a", t(1));
        b.insert("b", t(1).to_kind(Kind::Half));
        let e = a.cat(b).unwrap_err().to_string();
        assert!(e.contains("cannot aggregate `b`: this cache holds Float on Cpu, the other Half on Cpu"), "{e}");
        assert_eq!(a.tensor("a").unwrap().size(), vec![1, 2], "key a must not have been aggregated");
    }

    #[test]
    fn update_merge_remove_order() {
        let mut a = ActivationCache::new();
        a.insert("k1", json!(1));
        a.insert("k2", json!(2));
        let mut b = ActivationCache::new();
        b.insert("k3", json!(3));
        b.insert("k1", json!(10));
        let m = &a + &b;
        assert_eq!(m.keys().collect::<Vec<_>>(), ["k1", "k2", "k3"]);
        assert!(m.get("k1").unwrap().same_as(&json!(10).into()));
        a.remove("k1");
        assert_eq!(a.keys().collect::<Vec<_>>(), ["k2"]);
        assert!(a.get_or("nope", &json!(0).into()).same_as(&json!(0).into()));
    }

    #[test]
    fn deferred_failure_drops_pending() {
        let mut a = ActivationCache::new();
        let r: Result<()> = a.deferred_mode(|c| {
            let mut b = ActivationCache::new();
            b.insert("x", t(1));
            c.cat(b)?;
            Err(CacheError::WrongKind { key: "x".into(), message: "stop".into() })
        });
        assert!(r.is_err());
        assert!(a.is_empty());
        let mut b = ActivationCache::new();
        b.insert("x", t(1));
        a.cat(b).unwrap();
        assert_eq!(a.len(), 1, "deferred mode ended");
    }

    #[test]
    fn map_to_dict_uses_mapping_index() {
        let mut c = ActivationCache::new();
        c.insert("resid_out_0", Tensor::arange(6, (Kind::Float, Device::Cpu)).view([1, 3, 2]));
        c.insert("mapping_index", json!({"last": [2], "first": [0, 1], "info": "avg"}));
        let d = c.map_to_dict("resid_out_0").unwrap();
        assert_eq!(d.keys().collect::<Vec<_>>(), ["last", "first"]);
        assert_eq!(d["last"].size(), vec![2]);
        assert_eq!(d["first"].size(), vec![2, 2]);
    }

    #[test]
    fn custom_and_removed_aggregations() {
        let mut c = ActivationCache::new();
        c.register_aggregation("logits", Aggregation::custom(|old, new| Ok(old.unwrap_or(new))));
        c.remove_aggregation("mapping_index");
        for i in 0..2 {
            let mut b = ActivationCache::new();
            b.insert("logits", t(1) * i as f64);
            b.insert("mapping_index", json!({"last": [i]}));
            c.cat(b).unwrap();
        }
        assert_eq!(c.tensor("logits").unwrap().double_value(&[0, 0]), 0.0);
        assert!(matches!(c.get("mapping_index").unwrap(), CacheValue::List(l) if l.len() == 2));
    }
}
