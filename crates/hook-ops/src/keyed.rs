//! [`Keyed`]: one cache entry produced by a hook function (key, tensor, optional info string).

use tch::Tensor;

/// One cache entry: easyroutine's `cache[key] = value` or `cache.add_with_info(key, value, info)`.
#[derive(Debug)]
pub struct Keyed {
    /// The cache key, e.g. `head_queries_L0H3`.
    pub key: String,
    /// The value.
    pub value: Tensor,
    /// The info string of `add_with_info`, when easyroutine stores one.
    pub info: Option<&'static str>,
}

impl Keyed {
    /// An entry without info.
    ///
    /// ```
    /// let k = hook_ops::Keyed::new("resid_out_0", tch::Tensor::from(1.0f32));
    /// assert_eq!(k.key, "resid_out_0");
    /// assert!(k.info.is_none());
    /// ```
    pub fn new(key: impl Into<String>, value: Tensor) -> Self {
        Self { key: key.into(), value, info: None }
    }

    /// An entry with an info string.
    pub fn with_info(key: impl Into<String>, value: Tensor, info: &'static str) -> Self {
        Self { key: key.into(), value, info: Some(info) }
    }
}
