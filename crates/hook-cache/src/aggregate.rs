//! Aggregation across batches: how `cat` joins the value a cache holds for a key with the
//! value of the next batch.
//!
//! | easyroutine | here | rule |
//! |---|---|---|
//! | `just_old` (`mapping_index`) | [`Aggregation::KeepNewest`] | the newest value |
//! | `sublist` (`offset`, `token_dict`) | [`Aggregation::Flatten`] | one flat list |
//! | `aggregate_last_layernorm` | [`Aggregation::ConcatStatistics`] | each statistic concatenated on dim 0 |
//! | `default_aggregation` | [`Aggregation::Default`] | tensors: cat dim 0, else stack, else a list; lists append; tuples become lists; info values aggregate their inner value; else `+`, else a list |
//! | a user function | [`Aggregation::Custom`] | |
//!
//! Tensor concatenation is amortised: the first `cat` of a key allocates a buffer with room to
//! grow (doubling) and later batches are copied into it, so aggregating N batches costs O(N)
//! copies in total instead of the O(N²) of `torch.cat([old, new])` per batch. The cache
//! stores a view of the filled part; [`crate::ActivationCache::shrink_to_fit`] drops the slack.

use std::fmt;
use std::sync::Arc;

use tch::Tensor;

use crate::error::{CacheError, Result};
use crate::value::{placement, CacheValue};

/// A user aggregation: `(old or None, new) -> aggregated`, or a message saying why not.
pub type AggregateFn = dyn Fn(Option<CacheValue>, CacheValue) -> std::result::Result<CacheValue, String> + Send + Sync;

/// An aggregation strategy.
#[derive(Clone)]
pub enum Aggregation {
    /// Keep the newest value (`just_old`).
    KeepNewest,
    /// Flatten old and new into one list (`sublist`).
    Flatten,
    /// Concatenate each statistic of a map along dim 0 (`aggregate_last_layernorm`).
    ConcatStatistics,
    /// easyroutine's `default_aggregation`.
    Default,
    /// A user function.
    Custom(Arc<AggregateFn>),
}

impl fmt::Debug for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Aggregation::KeepNewest => "KeepNewest",
            Aggregation::Flatten => "Flatten",
            Aggregation::ConcatStatistics => "ConcatStatistics",
            Aggregation::Default => "Default",
            Aggregation::Custom(_) => "Custom",
        })
    }
}

impl Aggregation {
    /// A strategy from a closure.
    ///
    /// ```
    /// use hook_cache::{Aggregation, CacheValue};
    /// let keep_first = Aggregation::custom(|old, new| Ok(old.unwrap_or(new)));
    /// assert!(matches!(keep_first, Aggregation::Custom(_)));
    /// ```
    pub fn custom(f: impl Fn(Option<CacheValue>, CacheValue) -> std::result::Result<CacheValue, String> + Send + Sync + 'static) -> Self {
        Aggregation::Custom(Arc::new(f))
    }

    /// Aggregates `new` into `old` for `key`. `buffer` is the growth buffer of the key's tensor.
    pub(crate) fn apply(&self, key: &str, old: Option<CacheValue>, new: CacheValue, buffer: &mut Option<Tensor>) -> Result<CacheValue> {
        match self {
            Aggregation::KeepNewest => {
                *buffer = None;
                Ok(new)
            }
            Aggregation::Flatten => {
                *buffer = None;
                let mut all = Vec::new();
                if let Some(old) = old {
                    extend_py_list(&mut all, old);
                }
                extend_py_list(&mut all, new);
                Ok(list_of(all))
            }
            Aggregation::ConcatStatistics => {
                *buffer = None;
                concat_statistics(key, old, new)
            }
            Aggregation::Default => default_aggregation(key, old, new, buffer),
            Aggregation::Custom(f) => {
                *buffer = None;
                f(old, new).map_err(|message| CacheError::Aggregation { key: key.to_string(), message })
            }
        }
    }
}

/// A Python list's items: a [`CacheValue::List`] or a JSON array.
fn py_list_items(v: CacheValue) -> std::result::Result<Vec<CacheValue>, CacheValue> {
    match v {
        CacheValue::List(items) => Ok(items),
        CacheValue::Data(serde_json::Value::Array(a)) => Ok(a.into_iter().map(CacheValue::Data).collect()),
        other => Err(other),
    }
}

fn extend_py_list(all: &mut Vec<CacheValue>, v: CacheValue) {
    match py_list_items(v) {
        Ok(items) => all.extend(items),
        Err(single) => all.push(single),
    }
}

/// A Python list of `items`: plain JSON when every item is data, else a [`CacheValue::List`].
pub(crate) fn list_of(items: Vec<CacheValue>) -> CacheValue {
    if !items.is_empty() && items.iter().all(|x| matches!(x, CacheValue::Data(_))) {
        return CacheValue::Data(serde_json::Value::Array(
            items.into_iter().map(|x| if let CacheValue::Data(d) = x { d } else { unreachable!() }).collect(),
        ));
    }
    CacheValue::List(items)
}

fn concat_statistics(key: &str, old: Option<CacheValue>, new: CacheValue) -> Result<CacheValue> {
    let Some(old) = old else { return Ok(new) };
    let (CacheValue::Map(old), CacheValue::Map(new)) = (old, new) else {
        return Err(CacheError::WrongKind { key: key.into(), message: "both values must be maps of statistics (mean, variance, …)".into() });
    };
    let mut out = indexmap::IndexMap::new();
    for (k, n) in new {
        let v = match old.get(&k) {
            None => n,
            Some(o) => {
                let (CacheValue::Tensor(o), CacheValue::Tensor(n)) = (o, &n) else {
                    return Err(CacheError::WrongKind { key: format!("{key}/{k}"), message: "statistics must be tensors".into() });
                };
                if o.size().last() != n.size().last() {
                    return Err(CacheError::WrongKind {
                        key: format!("{key}/{k}"),
                        message: format!("tensor shape mismatch: {:?} vs {:?} (the last axis must agree)", o.size(), n.size()),
                    });
                }
                check_placement(&format!("{key}/{k}"), o, n)?;
                CacheValue::Tensor(Tensor::f_cat(&[o, n], 0)?)
            }
        };
        out.insert(k, v);
    }
    Ok(CacheValue::Map(out))
}

pub(crate) fn check_placement(key: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.kind() != b.kind() || a.device() != b.device() {
        return Err(CacheError::Incompatible { key: key.to_string(), this: placement(a), other: placement(b) });
    }
    Ok(())
}

fn default_aggregation(key: &str, old: Option<CacheValue>, new: CacheValue, buffer: &mut Option<Tensor>) -> Result<CacheValue> {
    let Some(old) = old else {
        *buffer = None;
        return Ok(new);
    };
    match (old, new) {
        (CacheValue::Tensor(a), CacheValue::Tensor(b)) => join_tensors(key, &a, &b, buffer),
        (CacheValue::Info { value: a, info }, CacheValue::Info { value: b, .. }) => {
            Ok(CacheValue::Info { value: Box::new(default_aggregation(key, Some(*a), *b, buffer)?), info })
        }
        (old, new) => {
            *buffer = None;
            match py_list_items(old) {
                Ok(mut items) => {
                    extend_py_list(&mut items, new);
                    Ok(list_of(items))
                }
                Err(CacheValue::Tuple(t)) => Ok(match new {
                    CacheValue::List(l) => {
                        let mut items = vec![CacheValue::Tuple(t)];
                        items.extend(l);
                        CacheValue::List(items)
                    }
                    other => CacheValue::List(vec![CacheValue::Tuple(t), other]),
                }),
                Err(CacheValue::Data(a)) => Ok(match new {
                    CacheValue::Data(b) => plus(a, b),
                    other => CacheValue::List(vec![CacheValue::Data(a), other]),
                }),
                Err(old) => Ok(CacheValue::List(vec![old, new])),
            }
        }
    }
}

/// Python's `old + new` on plain data, or `[old, new]` where Python's `+` raises.
fn plus(a: serde_json::Value, b: serde_json::Value) -> CacheValue {
    use serde_json::Value as J;
    match (&a, &b) {
        (J::Number(x), J::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => J::from(i + j).into(),
            _ => J::from(x.as_f64().unwrap_or(f64::NAN) + y.as_f64().unwrap_or(f64::NAN)).into(),
        },
        (J::String(x), J::String(y)) => J::String(format!("{x}{y}")).into(),
        _ => CacheValue::List(vec![CacheValue::Data(a), CacheValue::Data(b)]),
    }
}

/// `torch.cat([a, b], 0)`, else `torch.stack`, else `[a, b]`, with the amortised buffer.
fn join_tensors(key: &str, a: &Tensor, b: &Tensor, buffer: &mut Option<Tensor>) -> Result<CacheValue> {
    check_placement(key, a, b)?;
    let (sa, sb) = (a.size(), b.size());
    if !sa.is_empty() && sa.len() == sb.len() && sa[1..] == sb[1..] {
        return Ok(CacheValue::Tensor(append(a, b, buffer)?));
    }
    *buffer = None;
    if sa == sb {
        tracing::warn!(key, ?sa, "cat failed for 0-d tensors; stacking");
        return Ok(CacheValue::Tensor(Tensor::f_stack(&[a, b], 0)?));
    }
    tracing::warn!(key, ?sa, ?sb, "cat and stack failed; switching to list aggregation");
    Ok(CacheValue::List(vec![CacheValue::Tensor(a.shallow_clone()), CacheValue::Tensor(b.shallow_clone())]))
}

/// Appends `b` to `a` along dim 0. When `a` is the filled front of `buffer` and there is room,
/// `b` is copied in place; otherwise a buffer of twice the needed rows is allocated.
fn append(a: &Tensor, b: &Tensor, buffer: &mut Option<Tensor>) -> Result<Tensor> {
    let (na, nb) = (a.size()[0], b.size()[0]);
    let fits = buffer.as_ref().is_some_and(|buf| {
        buf.data_ptr() == a.data_ptr() && buf.size()[1..] == a.size()[1..] && buf.size()[0] >= na + nb && a.is_contiguous()
    });
    if !fits {
        let mut shape = a.size();
        shape[0] = ((na + nb) * 2).max(1);
        let buf = Tensor::f_empty(&shape, (a.kind(), a.device()))?;
        buf.f_narrow(0, 0, na)?.f_copy_(a)?;
        *buffer = Some(buf);
    }
    let buf = buffer.as_ref().expect("set above");
    buf.f_narrow(0, na, nb)?.f_copy_(b)?;
    Ok(buf.f_narrow(0, 0, na + nb)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::{Device, Kind};

    fn t(rows: i64) -> Tensor {
        Tensor::arange(rows * 2, (Kind::Float, Device::Cpu)).view([rows, 2])
    }

    #[test]
    fn appends_are_amortised_and_correct() {
        let mut buf = None;
        let mut acc = t(1);
        let mut reallocs = 0;
        let mut last_ptr = 0usize;
        for i in 0..100 {
            let v = Aggregation::Default.apply("k", Some(CacheValue::Tensor(acc)), CacheValue::Tensor(t(1) + i as f64), &mut buf).unwrap();
            acc = v.tensor().unwrap().shallow_clone();
            let p = buf.as_ref().unwrap().data_ptr() as usize;
            if p != last_ptr {
                reallocs += 1;
                last_ptr = p;
            }
        }
        assert_eq!(acc.size(), vec![101, 2]);
        assert!(reallocs <= 8, "{reallocs} reallocations for 100 appends");
        assert_eq!(acc.double_value(&[100, 1]), 100.0);
        assert_eq!(acc.double_value(&[0, 1]), 1.0);
    }

    #[test]
    fn default_rules() {
        let mut b = None;
        let agg = |old: CacheValue, new: CacheValue, b: &mut Option<Tensor>| Aggregation::Default.apply("k", Some(old), new, b).unwrap();
        // tensors with different trailing shapes: a list
        let v = agg(t(1).into(), Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)).into(), &mut b);
        assert!(matches!(v, CacheValue::List(ref l) if l.len() == 2));
        // 0-d tensors: stacked
        let v = agg(Tensor::from(1.0f32).into(), Tensor::from(2.0f32).into(), &mut b);
        assert_eq!(v.tensor().unwrap().size(), vec![2]);
        // tuples become lists
        let tup = || CacheValue::Tuple(vec![t(1).into()]);
        assert!(matches!(agg(tup(), tup(), &mut b), CacheValue::List(ref l) if l.len() == 2));
        // info values aggregate their inner value and keep the first info
        let v = agg(CacheValue::with_info(t(1), "a"), CacheValue::with_info(t(2), "b"), &mut b);
        assert_eq!((v.info(), v.tensor().unwrap().size()), (Some("a"), vec![3, 2]));
        // data: + where Python has it, else a list
        assert!(agg(json!(1).into(), json!(2).into(), &mut b).same_as(&json!(3).into()));
        assert!(agg(json!([1]).into(), json!(2).into(), &mut b).same_as(&json!([1, 2]).into()));
        assert!(agg(json!({"a": 1}).into(), json!({"b": 2}).into(), &mut b).same_as(&CacheValue::List(vec![json!({"a": 1}).into(), json!({"b": 2}).into()])));
    }

    #[test]
    fn dtype_mismatch_is_an_error_naming_both_sides() {
        let e = Aggregation::Default
            .apply("resid_out_0", Some(t(1).into()), t(1).to_kind(Kind::Double).into(), &mut None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "cannot aggregate `resid_out_0`: this cache holds Float on Cpu, the other Double on Cpu (convert one side with .to(...) first)");
    }

    #[test]
    fn statistics_concatenate() {
        let m = |r: i64| {
            CacheValue::Map([("mean".to_string(), CacheValue::Tensor(t(r))), ("variance".into(), CacheValue::Tensor(t(r)))].into_iter().collect())
        };
        let v = Aggregation::ConcatStatistics.apply("last_layernorm", Some(m(1)), m(2), &mut None).unwrap();
        let CacheValue::Map(map) = v else { panic!() };
        assert_eq!(map["variance"].tensor().unwrap().size(), vec![3, 2]);
        let bad = CacheValue::Map([("mean".to_string(), CacheValue::Tensor(Tensor::zeros([1, 5], (Kind::Float, Device::Cpu))))].into_iter().collect());
        let e = Aggregation::ConcatStatistics.apply("last_layernorm", Some(m(1)), bad, &mut None).unwrap_err().to_string();
        assert!(e.contains("tensor shape mismatch: [1, 2] vs [1, 5]"), "{e}");
    }
}
