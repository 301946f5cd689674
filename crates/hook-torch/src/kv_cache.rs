//! [`KvCache`]: the keys and values every layer computed for the tokens seen so far, so that
//! the next tokens run without recomputing the text ([`HookedModule::step`]).
//!
//! Each layer has one buffer of keys and one of values, `[batch, kv_heads, capacity,
//! head_dim]`, on the model's device in its dtype. A step hands the graph the whole buffers
//! (grown first when the new tokens would not fit: doubling, one copy), and the graph writes the
//! new tokens' keys and values after the filled part, in place, attending over a view of it: the
//! past exists once, here (export.py's `PastCache`). The buffers are allocated uninitialised, so
//! memory is only touched as tokens fill them.

use tch::Tensor;

use crate::error::{Result, TorchError};
use crate::module::HookedModule;

/// The cached keys and values of a batch, for [`HookedModule::step`].
///
/// ```no_run
/// use hook_torch::{HookedModule, KvCache, RunSpec};
/// let mut m = HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
/// let mut cache = KvCache::new(&m, 1, 64).unwrap();
/// let prompt = tch::Tensor::from_slice(&[5i64, 6, 7]).view([1, 3]);
/// let out = m.step(&prompt, &prompt.ones_like(), &mut cache, RunSpec::default()).unwrap();
/// let next = out.logits.unwrap().select(1, -1).argmax(-1, true); // [1, 1]
/// let mask = tch::Tensor::ones([1, 4], (tch::Kind::Int64, tch::Device::Cpu));
/// m.step(&next, &mask, &mut cache, RunSpec::default()).unwrap(); // one token, 3 cached
/// assert_eq!(cache.len(), 4);
/// ```
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    batch: i64,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for `batch` rows with room for `capacity` tokens (it grows past that),
    /// shaped by the archive's cached step (its description's `step.cache`).
    pub fn new(m: &HookedModule, batch: usize, capacity: usize) -> Result<Self> {
        let d = m.require_description()?;
        let step = d.step.as_ref().ok_or_else(|| {
            TorchError::Input(format!(
                "{} has no cached step graph (it was exported before hookrs generated with a KV cache): export it again with `cargo xtask export`",
                m.path().display()
            ))
        })?;
        if !step.writes_cache {
            return Err(TorchError::Input(format!(
                "{} was exported by an older export.py, whose cached step returns the keys and values for the caller to copy in: export it again with `cargo xtask export` (its step writes them into the cache in place)",
                m.path().display()
            )));
        }
        if batch == 0 {
            return Err(TorchError::Input("a KV cache needs a batch of at least one row".into()));
        }
        let (kind, device) = (m.kind(), m.device());
        let capacity = capacity.max(1) as i64;
        let alloc = |&[heads, dim]: &[usize; 2]| Tensor::f_empty([batch as i64, heads as i64, capacity, dim as i64], (kind, device));
        let keys = step.cache.iter().map(alloc).collect::<std::result::Result<Vec<_>, _>>()?;
        let values = step.cache.iter().map(alloc).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(KvCache { keys, values, batch: batch as i64, len: 0, capacity })
    }

    /// Tokens cached (per row, padding included).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Nothing cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows of the batch.
    pub fn batch(&self) -> usize {
        self.batch as usize
    }

    /// Tokens the buffers hold before they grow.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Bytes of the buffers (what the cache costs in memory at its capacity).
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }

    /// Bytes of the filled part (`len` tokens of every layer).
    pub fn bytes_used(&self) -> usize {
        (self.bytes() as u128 * self.len as u128 / self.capacity as u128) as usize
    }

    /// Layer `layer`'s cached keys, `[batch, kv_heads, len, head_dim]` (a view).
    pub fn keys(&self, layer: usize) -> Option<Tensor> {
        self.keys.get(layer).map(|k| k.narrow(2, 0, self.len))
    }

    /// Layer `layer`'s cached values, `[batch, kv_heads, len, head_dim]` (a view).
    pub fn values(&self, layer: usize) -> Option<Tensor> {
        self.values.get(layer).map(|v| v.narrow(2, 0, self.len))
    }

    /// The step's past inputs for `new` tokens, every layer's keys then every layer's values:
    /// the whole buffers, grown first to hold `new` more tokens (the graph writes into them).
    pub(crate) fn past(&mut self, new: i64) -> Result<Vec<Tensor>> {
        if self.len + new > self.capacity {
            self.grow((self.len + new).max(2 * self.capacity))?;
        }
        Ok(self.keys.iter().chain(&self.values).map(Tensor::shallow_clone).collect())
    }

    /// Counts a step's new tokens as cached, once their keys and values (views of the buffers
    /// the step wrote, in the order of [`KvCache::past`]) have the shape they must.
    pub(crate) fn append(&mut self, new: &[Tensor]) -> Result<()> {
        let layers = self.keys.len();
        if new.len() != 2 * layers {
            return Err(TorchError::Input(format!("the cached step returned {} key/value tensors, expected {}", new.len(), 2 * layers)));
        }
        let s = new[0].size().get(2).copied().unwrap_or(0);
        if self.len + s > self.capacity {
            return Err(TorchError::Input(format!(
                "the cached step returned {s} new tokens' keys and values, more than the {} its cache had room for",
                self.capacity - self.len
            )));
        }
        for (buf, t) in self.keys.iter().chain(&self.values).zip(new) {
            let want = [self.batch, buf.size()[1], s, buf.size()[3]];
            if t.size() != want {
                return Err(TorchError::Input(format!("the cached step returned keys/values of shape {:?}, expected {want:?}", t.size())));
            }
        }
        self.len += s;
        Ok(())
    }

    /// Moves the cache into buffers of `capacity` tokens.
    fn grow(&mut self, capacity: i64) -> Result<()> {
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let s = buf.size();
            let bigger = Tensor::f_empty([s[0], s[1], capacity, s[3]], (buf.kind(), buf.device()))?;
            bigger.narrow(2, 0, self.len).f_copy_(&buf.narrow(2, 0, self.len))?;
            *buf = bigger;
        }
        self.capacity = capacity;
        Ok(())
    }
}
