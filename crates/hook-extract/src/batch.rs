//! Batches: which examples run together (grouped by length, bounded by examples or padded
//! tokens), their left-padded tensors, and the rows put back in dataset order afterwards.

use hook_cache::ActivationCache;
use tch::{Device, Kind, Tensor};

use crate::source::Example;
use crate::Result;

/// How examples are grouped into forward passes.
///
/// ```
/// let p = hook_extract::BatchPlan { batch_size: 2, max_batch_tokens: None, sort: true };
/// assert_eq!(p.plan(&[5, 1, 5, 1]), vec![vec![1, 3], vec![0, 2]]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    /// Examples per batch, at most (without `max_batch_tokens`).
    pub batch_size: usize,
    /// Cut batches at this many padded tokens (examples x the longest) instead.
    pub max_batch_tokens: Option<usize>,
    /// Group examples of similar length (a stable sort) to pad less.
    pub sort: bool,
}

impl BatchPlan {
    /// Batches for examples of these lengths (indices into `lengths`): sorted by length
    /// (stable) when `sort`, cut at `batch_size` examples, or at `max_batch_tokens` padded
    /// tokens when given. Every index appears once; a single example longer than the budget
    /// makes a batch of its own.
    pub fn plan(&self, lengths: &[usize]) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        if self.sort {
            order.sort_by_key(|&i| (lengths[i], i));
        }
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut longest = 0;
        for i in order {
            let l = longest.max(lengths[i]);
            let fits = match self.max_batch_tokens {
                Some(budget) => (cur.len() + 1) * l <= budget,
                None => cur.len() < self.batch_size,
            };
            if !cur.is_empty() && !fits {
                out.push(std::mem::take(&mut cur));
                longest = 0;
            }
            longest = longest.max(lengths[i]);
            cur.push(i);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

/// `batch` cut, in order, into runs of one length (every position of every prompt of a
/// batch must exist when every token is extracted).
///
/// ```
/// assert_eq!(hook_extract::batch::same_length_runs(&[3, 3, 4, 3], |&l| l).len(), 3);
/// ```
pub fn same_length_runs<T>(batch: &[T], len: impl Fn(&T) -> usize) -> Vec<&[T]> {
    batch.chunk_by(|a, b| len(a) == len(b)).collect()
}

/// Left-padded `(ids, mask)` for a batch of examples (pad id 0, mask 0), on `device`.
///
/// ```
/// use hook_extract::Example;
/// let (a, b) = (Example { ids: vec![7], tokens: None }, Example { ids: vec![1, 2], tokens: None });
/// let (ids, mask) = hook_extract::batch::pad(&[&a, &b], tch::Device::Cpu);
/// assert_eq!(Vec::<i64>::try_from(ids.flatten(0, 1)).unwrap(), vec![0, 7, 1, 2]);
/// assert_eq!(Vec::<i64>::try_from(mask.flatten(0, 1)).unwrap(), vec![0, 1, 1, 1]);
/// ```
pub fn pad(batch: &[&Example], device: Device) -> (Tensor, Tensor) {
    let s = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * s);
    let mut mask = Vec::with_capacity(batch.len() * s);
    for e in batch {
        let p = s - e.ids.len();
        ids.extend(std::iter::repeat_n(0i64, p).chain(e.ids.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, p).chain(std::iter::repeat_n(1i64, e.ids.len())));
    }
    let shape = [batch.len() as i64, s as i64];
    (Tensor::from_slice(&ids).view(shape).to_device(device), Tensor::from_slice(&mask).view(shape).to_kind(Kind::Int64).to_device(device))
}

/// Rows of `c` computed in `order` (row r holds example `order[r]`), put back in example
/// order: every tensor whose first axis has one row per example is permuted; the rest (data,
/// per-window values) is kept.
pub fn dataset_order(c: ActivationCache, order: &[usize]) -> Result<ActivationCache> {
    if order.iter().enumerate().all(|(r, &i)| r == i) {
        return Ok(c);
    }
    let mut pos = vec![0i64; order.len()];
    for (r, &i) in order.iter().enumerate() {
        pos[i] = r as i64;
    }
    let n = order.len() as i64;
    let index = Tensor::from_slice(&pos);
    let mut out = ActivationCache::new();
    for (k, v) in c.iter() {
        let v = v.map_tensors(&mut |t| if t.dim() > 0 && t.size()[0] == n { Ok(t.f_index_select(0, &index.to_device(t.device()))?) } else { Ok(t.shallow_clone()) })?;
        out.insert(k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::BatchPlan;

    fn plan(lengths: &[usize], batch_size: usize, max_batch_tokens: Option<usize>, sort: bool) -> Vec<Vec<usize>> {
        BatchPlan { batch_size, max_batch_tokens, sort }.plan(lengths)
    }

    #[test]
    fn batches_group_lengths_cover_every_example_once_and_respect_budgets() {
        assert_eq!(plan(&[5, 1, 5, 1], 2, None, true), vec![vec![1, 3], vec![0, 2]]);
        assert_eq!(plan(&[5, 1, 5, 1], 2, None, false), vec![vec![0, 1], vec![2, 3]]);
        // token budget: 2 x 5 = 10 fits, a third 5 would be 15
        assert_eq!(plan(&[5, 5, 5, 1], 100, Some(10), true), vec![vec![3, 0], vec![1, 2]]);
        // one example over the budget is a batch of its own
        assert_eq!(plan(&[50, 1], 8, Some(10), true), vec![vec![1], vec![0]]);
        let lengths: Vec<usize> = (0..97).map(|i| (i * 37) % 23 + 1).collect();
        for (bs, mt) in [(1, None), (8, None), (8, Some(64)), (100, Some(7))] {
            let p = plan(&lengths, bs, mt, true);
            let mut all: Vec<usize> = p.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..97).collect::<Vec<_>>());
            for b in &p {
                let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
                assert!(mt.map_or(b.len() <= bs, |m| b.len() == 1 || b.len() * longest <= m));
            }
        }
    }
}
