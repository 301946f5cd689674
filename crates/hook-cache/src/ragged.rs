//! Caches of every token of prompts of different lengths (`hookrs extract --tokens all` on a
//! mixed-length dataset): entries whose token axes differ from batch to batch.
//!
//! How they are stored: each entry's token axes (axis 1; for attention patterns also axis 2)
//! are right-padded with zeros to the longest prompt of the file or chunk; the entry
//! [`TOKEN_LENGTHS`] (`int64 [examples]`) holds each example's real token count, so example `i`'s
//! values are `x[i, :token_lengths[i]]` (and `[i, :n, :n]` for a pattern); the data entry
//! [`TOKEN_AXES`] (`{key: [axes]}`) names the padded axes, so readers can join files or
//! chunks of different widths ([`cat_ragged`], `load_cache.py`).
//!
//! ```
//! use hook_cache::{ragged, ActivationCache};
//! use tch::{Device, Kind, Tensor};
//!
//! let batch = |len: i64| {
//!     let mut c = ActivationCache::new();
//!     c.insert("resid_out_0", Tensor::ones([1, len, 4], (Kind::Float, Device::Cpu)));
//!     c.insert("pattern_L0H0", Tensor::ones([1, len, len], (Kind::Float, Device::Cpu)));
//!     ragged::mark(&mut c, len).unwrap();
//!     c
//! };
//! let mut all = batch(3);
//! ragged::cat_ragged(&mut all, batch(5)).unwrap();
//! assert_eq!(all.tensor("resid_out_0").unwrap().size(), vec![2, 5, 4]);
//! assert_eq!(all.tensor("pattern_L0H0").unwrap().size(), vec![2, 5, 5]);
//! assert_eq!(Vec::<i64>::try_from(all.tensor(ragged::TOKEN_LENGTHS).unwrap()).unwrap(), vec![3, 5]);
//! // the padding is zeros
//! assert_eq!(all.tensor("resid_out_0").unwrap().double_value(&[0, 4, 0]), 0.0);
//! ```

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::cache::ActivationCache;
use crate::error::Result;
use crate::value::CacheValue;

/// The entry holding each example's real token count.
pub const TOKEN_LENGTHS: &str = "token_lengths";
/// The data entry naming each entry's padded token axes.
pub const TOKEN_AXES: &str = "hookrs_token_axes";

/// Marks the cache of one batch whose examples all have `len` tokens and whose entries hold
/// every token: records which axes are token axes (axis 1 where it has `len` rows; axis 2 too
/// for `pattern_*` keys) and adds [`TOKEN_LENGTHS`].
pub fn mark(cache: &mut ActivationCache, len: i64) -> Result<()> {
    let mut axes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut batch = None;
    for (key, value) in cache.iter() {
        let Some(t) = value.tensors().into_iter().next() else { continue };
        let size = t.size();
        if size.len() < 2 || size[1] != len {
            continue;
        }
        batch.get_or_insert(size[0]);
        let mut a = vec![1];
        if key.starts_with("pattern_") && size.len() > 2 && size[2] == len {
            a.push(2);
        }
        axes.insert(key.to_string(), a);
    }
    if let Some(b) = batch {
        cache.insert(TOKEN_LENGTHS, Tensor::full([b], len, (Kind::Int64, tch::Device::Cpu)));
    }
    cache.insert(TOKEN_AXES, serde_json::to_value(&axes).expect("a map of lists"));
    Ok(())
}

/// The padded token axes of a marked cache (none for an unmarked one).
pub fn token_axes(cache: &ActivationCache) -> BTreeMap<String, Vec<usize>> {
    match cache.get(TOKEN_AXES) {
        Some(CacheValue::Data(v)) => serde_json::from_value(v.clone()).unwrap_or_default(),
        _ => BTreeMap::new(),
    }
}

/// The current width of the token axes (0 when there are none).
pub fn width(cache: &ActivationCache) -> i64 {
    let axes = token_axes(cache);
    let mut w = 0;
    for (key, a) in &axes {
        if let Some(v) = cache.get(key) {
            for t in v.tensors() {
                for &ax in a {
                    if let Some(&s) = t.size().get(ax) {
                        w = w.max(s);
                    }
                }
            }
        }
    }
    w
}

/// Right-pads every token axis of a marked cache with zeros to `width`.
pub fn pad(cache: &mut ActivationCache, width: i64) -> Result<()> {
    for (key, a) in token_axes(cache) {
        let Some(v) = cache.get(&key) else { continue };
        let padded = v.map_tensors(&mut |t| {
            let mut t = t.shallow_clone();
            for &ax in &a {
                let have = t.size().get(ax).copied().unwrap_or(width);
                if have < width {
                    let mut shape = t.size();
                    shape[ax] = width - have;
                    let zeros = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
                    t = Tensor::f_cat(&[t, zeros], ax as i64)?;
                }
            }
            Ok(t)
        })?;
        cache.insert(key, padded);
    }
    Ok(())
}

/// `all.cat(next)` where the two may be padded to different token widths: both are padded to
/// the wider first. Caches without [`TOKEN_AXES`] are joined by a plain [`ActivationCache::cat`].
pub fn cat_ragged(all: &mut ActivationCache, mut next: ActivationCache) -> Result<()> {
    let theirs = token_axes(&next);
    if theirs.is_empty() || all.is_empty() {
        return all.cat(next);
    }
    let mut axes = token_axes(all);
    let w = width(all).max(width(&next));
    pad(all, w)?;
    pad(&mut next, w)?;
    for (k, a) in theirs {
        axes.entry(k).or_insert(a);
    }
    all.remove(TOKEN_AXES);
    next.remove(TOKEN_AXES);
    all.cat(next)?;
    all.insert(TOKEN_AXES, serde_json::to_value(&axes).expect("a map of lists"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn unmarked_caches_join_as_before_and_values_survive_padding() {
        let mut a = ActivationCache::new();
        a.insert("resid_out_0", Tensor::ones([1, 2, 3], (Kind::Float, Device::Cpu)));
        let mut b = ActivationCache::new();
        b.insert("resid_out_0", Tensor::ones([1, 2, 3], (Kind::Float, Device::Cpu)));
        cat_ragged(&mut a, b).unwrap();
        assert_eq!(a.tensor("resid_out_0").unwrap().size(), vec![2, 2, 3]);
        assert!(a.get(TOKEN_AXES).is_none());

        let mk = |len: i64, v: f64| {
            let mut c = ActivationCache::new();
            c.insert("resid_out_0", Tensor::full([2, len, 3], v, (Kind::Float, Device::Cpu)));
            c.insert("last_layernorm", CacheValue::Map([("mean".to_string(), CacheValue::from(Tensor::full([2, len], v, (Kind::Float, Device::Cpu))))].into_iter().collect()));
            mark(&mut c, len).unwrap();
            c
        };
        let mut all = mk(4, 1.0);
        cat_ragged(&mut all, mk(2, 2.0)).unwrap();
        cat_ragged(&mut all, mk(6, 3.0)).unwrap();
        let r = all.tensor("resid_out_0").unwrap();
        assert_eq!(r.size(), vec![6, 6, 3]);
        let lens = Vec::<i64>::try_from(all.tensor(TOKEN_LENGTHS).unwrap()).unwrap();
        assert_eq!(lens, vec![4, 4, 2, 2, 6, 6]);
        for (i, &n) in lens.iter().enumerate() {
            let row = r.get(i as i64);
            assert_eq!(row.narrow(0, 0, n).min().double_value(&[]), [1.0, 1.0, 2.0, 2.0, 3.0, 3.0][i]);
            assert_eq!(row.narrow(0, n, 6 - n).abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
        assert_eq!(all.get("last_layernorm").unwrap().tensors()[0].size(), vec![6, 6]);
        assert_eq!(token_axes(&all).get("resid_out_0"), Some(&vec![1]));
    }
}
