//! [`CacheValue`]: everything a cache entry can hold, as in easyroutine's `ActivationCache`.

use std::fmt;

use indexmap::IndexMap;
use tch::{Device, Tensor};

use crate::error::Result;

/// One cache value.
///
/// | easyroutine | here |
/// |---|---|
/// | `torch.Tensor` | [`CacheValue::Tensor`] |
/// | `list` / `tuple` of values | [`CacheValue::List`] / [`CacheValue::Tuple`] |
/// | `dict` of tensors (layernorm statistics) | [`CacheValue::Map`] |
/// | `ValueWithInfo` (`add_with_info`) | [`CacheValue::Info`] |
/// | plain data: `mapping_index`, `metadata`, ints, strings | [`CacheValue::Data`] (JSON) |
pub enum CacheValue {
    /// A tensor.
    Tensor(Tensor),
    /// A list.
    List(Vec<CacheValue>),
    /// A tuple.
    Tuple(Vec<CacheValue>),
    /// A string-keyed map, in insertion order.
    Map(IndexMap<String, CacheValue>),
    /// A value with an info string.
    Info {
        /// The wrapped value.
        value: Box<CacheValue>,
        /// The info string.
        info: String,
    },
    /// Plain data (JSON).
    Data(serde_json::Value),
}

impl CacheValue {
    /// Wraps a value with an info string.
    ///
    /// ```
    /// use hook_cache::CacheValue;
    /// let v = CacheValue::with_info(tch::Tensor::from(1.0f32), "Shape: scalar");
    /// assert_eq!(v.info(), Some("Shape: scalar"));
    /// ```
    pub fn with_info(value: impl Into<CacheValue>, info: impl Into<String>) -> Self {
        CacheValue::Info { value: Box::new(value.into()), info: info.into() }
    }

    /// The tensor, looking through an info wrapper.
    ///
    /// ```
    /// use hook_cache::CacheValue;
    /// let v = CacheValue::with_info(tch::Tensor::from(2.0f32), "x");
    /// assert_eq!(v.tensor().unwrap().double_value(&[]), 2.0);
    /// ```
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            CacheValue::Tensor(t) => Some(t),
            CacheValue::Info { value, .. } => value.tensor(),
            _ => None,
        }
    }

    /// The info string, if this value has one.
    pub fn info(&self) -> Option<&str> {
        match self {
            CacheValue::Info { info, .. } => Some(info),
            _ => None,
        }
    }

    /// The value without its info wrapper.
    pub fn inner(&self) -> &CacheValue {
        match self {
            CacheValue::Info { value, .. } => value.inner(),
            other => other,
        }
    }

    /// A short name of the kind of value, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            CacheValue::Tensor(_) => "tensor",
            CacheValue::List(_) => "list",
            CacheValue::Tuple(_) => "tuple",
            CacheValue::Map(_) => "map",
            CacheValue::Info { .. } => "value with info",
            CacheValue::Data(_) => "data",
        }
    }

    /// Every tensor in the value, depth first.
    ///
    /// ```
    /// use hook_cache::CacheValue;
    /// let v = CacheValue::Tuple(vec![tch::Tensor::from(1.0f32).into(), CacheValue::Data(3.into())]);
    /// assert_eq!(v.tensors().len(), 1);
    /// ```
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut out = Vec::new();
        self.walk(&mut |t| out.push(t));
        out
    }

    fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Tensor)) {
        match self {
            CacheValue::Tensor(t) => f(t),
            CacheValue::List(v) | CacheValue::Tuple(v) => v.iter().for_each(|x| x.walk(f)),
            CacheValue::Map(m) => m.values().for_each(|x| x.walk(f)),
            CacheValue::Info { value, .. } => value.walk(f),
            CacheValue::Data(_) => {}
        }
    }

    /// Bytes held by the tensors of this value (element size × elements).
    ///
    /// ```
    /// use hook_cache::CacheValue;
    /// let v: CacheValue = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu)).into();
    /// assert_eq!(v.nbytes(), 24);
    /// ```
    pub fn nbytes(&self) -> u64 {
        self.tensors().iter().map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum()
    }

    /// The same value with every tensor moved to `device`.
    pub fn to_device(&self, device: Device) -> Result<CacheValue> {
        self.map_tensors(&mut |t| Ok(t.f_to_device(device)?))
    }

    /// The same structure with `f` applied to every tensor.
    pub fn map_tensors(&self, f: &mut impl FnMut(&Tensor) -> Result<Tensor>) -> Result<CacheValue> {
        Ok(match self {
            CacheValue::Tensor(t) => CacheValue::Tensor(f(t)?),
            CacheValue::List(v) => CacheValue::List(v.iter().map(|x| x.map_tensors(f)).collect::<Result<_>>()?),
            CacheValue::Tuple(v) => CacheValue::Tuple(v.iter().map(|x| x.map_tensors(f)).collect::<Result<_>>()?),
            CacheValue::Map(m) => CacheValue::Map(m.iter().map(|(k, x)| Ok((k.clone(), x.map_tensors(f)?))).collect::<Result<_>>()?),
            CacheValue::Info { value, info } => CacheValue::Info { value: Box::new(value.map_tensors(f)?), info: info.clone() },
            CacheValue::Data(d) => CacheValue::Data(d.clone()),
        })
    }

    /// Structural equality with tensors compared by shape, dtype and values (exactly).
    ///
    /// ```
    /// use hook_cache::CacheValue;
    /// let a: CacheValue = tch::Tensor::from_slice(&[1.0f32, 2.0]).into();
    /// assert!(a.same_as(&a.clone()));
    /// assert!(!a.same_as(&CacheValue::List(vec![])));
    /// ```
    pub fn same_as(&self, other: &CacheValue) -> bool {
        match (self, other) {
            (CacheValue::Tensor(a), CacheValue::Tensor(b)) => {
                a.size() == b.size() && a.kind() == b.kind() && a.to_device(Device::Cpu).equal(&b.to_device(Device::Cpu))
            }
            (CacheValue::List(a), CacheValue::List(b)) | (CacheValue::Tuple(a), CacheValue::Tuple(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_as(y))
            }
            (CacheValue::Map(a), CacheValue::Map(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && va.same_as(vb))
            }
            (CacheValue::Info { value: a, info: ia }, CacheValue::Info { value: b, info: ib }) => ia == ib && a.same_as(b),
            (CacheValue::Data(a), CacheValue::Data(b)) => a == b,
            _ => false,
        }
    }
}

impl Clone for CacheValue {
    /// Shallow: tensors share storage (`Tensor::shallow_clone`), like a Python reference.
    fn clone(&self) -> Self {
        match self {
            CacheValue::Tensor(t) => CacheValue::Tensor(t.shallow_clone()),
            CacheValue::List(v) => CacheValue::List(v.clone()),
            CacheValue::Tuple(v) => CacheValue::Tuple(v.clone()),
            CacheValue::Map(m) => CacheValue::Map(m.clone()),
            CacheValue::Info { value, info } => CacheValue::Info { value: value.clone(), info: info.clone() },
            CacheValue::Data(d) => CacheValue::Data(d.clone()),
        }
    }
}

impl fmt::Debug for CacheValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheValue::Tensor(t) => write!(f, "Tensor({:?}, {:?})", t.kind(), t.size()),
            CacheValue::List(v) => f.debug_list().entries(v).finish(),
            CacheValue::Tuple(v) => {
                let mut t = f.debug_tuple("");
                v.iter().for_each(|x| {
                    t.field(x);
                });
                t.finish()
            }
            CacheValue::Map(m) => f.debug_map().entries(m.iter()).finish(),
            CacheValue::Info { value, info } => write!(f, "Info({value:?}, {info:?})"),
            CacheValue::Data(d) => write!(f, "{d}"),
        }
    }
}

impl From<Tensor> for CacheValue {
    fn from(t: Tensor) -> Self {
        CacheValue::Tensor(t)
    }
}

impl From<serde_json::Value> for CacheValue {
    fn from(d: serde_json::Value) -> Self {
        CacheValue::Data(d)
    }
}

/// `dtype on device`, as messages print a tensor's placement.
pub(crate) fn placement(t: &Tensor) -> String {
    format!("{:?} on {:?}", t.kind(), t.device())
}
