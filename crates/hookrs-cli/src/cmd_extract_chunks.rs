//! `hookrs extract --out DIR`: the cache streamed to a chunk directory as it is computed.
//!
//! Memory holds one chunk and the reader's queue, whatever the dataset's size. Each chunk is
//! whole batches of consecutive examples in dataset order; batches never straddle a chunk, so a
//! resumed run computes exactly the batches an uninterrupted run computes, and its chunks are
//! bitwise the same. The manifest records what the chunks were computed from (model, input,
//! extraction settings); rerunning into the directory with anything else is refused.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use hook_cache::{ActivationCache, ChunkWriter};
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use indicatif::{ProgressBar, ProgressStyle};
use tch::Device;

use crate::cmd_extract::{batch_groups, Args, ChunkSize};
use crate::inputs::{self, Example, Source};

struct Pending {
    cache: ActivationCache,
    examples: u64,
    batches: Vec<serde_json::Value>,
    string_tokens: Vec<serde_json::Value>,
}

impl Pending {
    fn new() -> Self {
        Pending { cache: ActivationCache::new(), examples: 0, batches: Vec::new(), string_tokens: Vec::new() }
    }
}

/// The extraction settings that decide the chunks' content, as one flat JSON object (so a
/// refused resume names the fields that differ).
fn config_fingerprint(a: &Args, config: &ExtractionConfig, groups: Option<&TokenGroups>, shard: Option<crate::cmd_extract::Shard>) -> Result<String> {
    let mut v = serde_json::to_value(config)?;
    let o = v.as_object_mut().expect("the config is an object");
    o.retain(|_, x| x != &serde_json::Value::Bool(false) && !x.is_null());
    o.insert("token_groups".into(), groups.map(|g| g.to_string()).unwrap_or_else(|| "all".into()).into());
    o.insert("batch_size".into(), a.batch_size.into());
    o.insert("chunk_size".into(), a.chunk_size.clone().into());
    o.insert("sort".into(), (!a.no_sort).into());
    o.insert("special_tokens".into(), (!a.no_special_tokens).into());
    if let Some(t) = a.max_batch_tokens {
        o.insert("max_batch_tokens".into(), t.into());
    }
    if a.cache_dtype != "model" {
        o.insert("cache_dtype".into(), a.cache_dtype.clone().into());
    }
    if let Some(sh) = shard {
        o.insert("shard".into(), format!("{}/{}", sh.index, sh.count).into());
    }
    Ok(serde_json::to_string(&v)?)
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    a: &Args,
    model: &mut HookedModule,
    source: Source,
    config: &ExtractionConfig,
    groups: Option<&TokenGroups>,
    chunk_size: ChunkSize,
    device: Device,
    shard: Option<crate::cmd_extract::Shard>,
) -> Result<()> {
    let (lo, hi) = crate::cmd_extract::shard_range(shard, &source)?;
    let fingerprints = BTreeMap::from([
        ("model".to_string(), crate::cmd_extract::model_fingerprint(&a.model, model)?),
        ("input".to_string(), source.fingerprint()?),
        ("extraction".to_string(), config_fingerprint(a, config, groups, shard)?),
    ]);
    let mut w = ChunkWriter::open(&a.out, fingerprints, a.overwrite)?;
    if let Some(sh) = shard {
        w.set_setting("shard", serde_json::json!({"index": sh.index, "count": sh.count, "first_example": lo, "examples": hi - lo}));
    }
    let done = w.examples_done();
    if w.manifest().complete && done > 0 {
        println!("{} is already complete: {} examples in {} chunks (--overwrite starts over)", a.out.display(), done, w.manifest().chunks.len());
        return Ok(());
    }
    if done > 0 {
        eprintln!("hookrs: resuming {} after {} examples in {} complete chunks", a.out.display(), done, w.manifest().chunks.len());
    }
    let batch_size = a.batch_size as u64;
    let per_chunk: Option<u64> = match chunk_size {
        ChunkSize::Examples(n) => Some(n),
        ChunkSize::Bytes(_) => w.setting("examples_per_chunk").and_then(|v| v.as_u64()),
    };
    let rx = source.stream(&a.model, lo + done, !a.no_special_tokens)?;
    let model_name = model.description().map(|d| d.source.clone()).unwrap_or_else(|| a.model.display().to_string());
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {pos} examples, {per_sec}, {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    let started = Instant::now();
    let (mut n_tokens, mut n_examples, mut n_computed) = (0usize, 0u64, 0usize);
    let mut next = lo + done; // dataset index of the next example
    let mut state = State { w, pending: Pending::new(), per_chunk, chunk_size, groups, model_name, config };
    // GPU runs: each batch's copy to host is queued behind it and waited for once per window
    let to_host = device != Device::Cpu && a.cache_device == "cpu";
    let mut stream = rx.into_iter().take(hi.saturating_sub(lo + done).min(usize::MAX as u64) as usize);
    loop {
        // the next window: the rest of the current chunk (the first batch alone while a byte
        // budget has not been turned into examples yet)
        let room = state.per_chunk.map(|n| n - state.pending.examples).unwrap_or(batch_size);
        let mut window: Vec<Example> = Vec::with_capacity(room.min(1 << 16) as usize);
        for e in stream.by_ref() {
            window.push(e?);
            if window.len() as u64 == room {
                break;
            }
        }
        if window.is_empty() {
            break;
        }
        let lengths: Vec<usize> = window.iter().map(|e| e.ids.len()).collect();
        let mut plan = plan_batches(&lengths, a.batch_size, a.max_batch_tokens, !a.no_sort);
        if groups.is_none() {
            // --tokens all: every position of every prompt of a batch must exist
            plan = plan.iter().flat_map(|b| crate::cmd_extract::same_length_runs(b, |&i| lengths[i]).into_iter().map(<[usize]>::to_vec)).collect();
        }
        let mut parts = Vec::with_capacity(plan.len());
        for idxs in &plan {
            let refs: Vec<&Example> = idxs.iter().map(|&i| &window[i]).collect();
            let (ids, mask) = inputs::pad(&refs, device);
            n_computed += refs.len() * ids.size()[1] as usize;
            let first = next + idxs[0] as u64;
            let g = batch_groups(groups, &refs, (first / batch_size) as usize)?;
            let (_, mut cache) = crate::cmd_extract::run_batch(model, &ids, &mask, &g, config, a)
                .with_context(|| format!("examples {:?}", idxs.iter().map(|&i| next + i as u64).collect::<Vec<_>>()))?;
            crate::cmd_extract::mark_all_tokens(&mut cache, groups, lengths[idxs[0]])?;
            parts.push(if to_host { Part::Copying(hook_torch::transfer::to_host_async(&cache)?) } else { Part::Ready(cache) });
        }
        let mut joined = ActivationCache::new();
        for p in parts {
            let c = match p {
                Part::Ready(c) => c,
                Part::Copying(c) => c.wait()?,
            };
            hook_cache::ragged::cat_ragged(&mut joined, c)?;
        }
        let order: Vec<usize> = plan.iter().flatten().copied().collect();
        let joined = dataset_order(joined, &order)?;
        let record = WindowRecord {
            batches: plan.iter().map(|b| serde_json::json!(b.iter().map(|&i| next + i as u64).collect::<Vec<_>>())).collect(),
            string_tokens: window.iter().map(|e| serde_json::json!(e.tokens)).collect(),
        };
        n_tokens += lengths.iter().sum::<usize>();
        n_examples += window.len() as u64;
        next += window.len() as u64;
        bar.inc(window.len() as u64);
        crate::progress::report(next - lo, (hi != u64::MAX).then(|| hi - lo));
        state.absorb(joined, window.len() as u64, record)?;
        bar.set_message(format!("{} chunks", state.w.manifest().chunks.len()));
    }
    let State { mut w, pending, model_name, .. } = state;
    if pending.examples > 0 {
        flush(&mut w, pending, groups, &model_name, config)?;
    }
    if w.examples_done() == 0 {
        anyhow::bail!("the input holds no examples");
    }
    w.finish()?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} examples ({} this run), {} tokens in {:.2} s: {:.0} tokens/s, padding {:.3} computed/real tokens -> {} ({} chunks)",
        w.examples_done(),
        n_examples,
        n_tokens,
        secs,
        n_tokens as f64 / secs.max(1e-9),
        n_computed as f64 / n_tokens.max(1) as f64,
        a.out.display(),
        w.manifest().chunks.len()
    );
    Ok(())
}

/// A batch's cache: ready, or still being copied to host memory.
enum Part {
    Ready(ActivationCache),
    Copying(hook_torch::transfer::HostCopy),
}

/// One window's bookkeeping: its batches (dataset indices) and string tokens.
struct WindowRecord {
    batches: Vec<serde_json::Value>,
    string_tokens: Vec<serde_json::Value>,
}

/// Batches for examples of these lengths (indices into `lengths`): sorted by length (stable)
/// when `sort`, cut at `batch_size` examples, or at `max_tokens` padded tokens (examples x
/// the longest) when given. Every index appears once; a single example longer than the budget
/// makes a batch of its own.
pub fn plan_batches(lengths: &[usize], batch_size: usize, max_tokens: Option<usize>, sort: bool) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if sort {
        order.sort_by_key(|&i| (lengths[i], i));
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let l = longest.max(lengths[i]);
        let fits = match max_tokens {
            Some(budget) => (cur.len() + 1) * l <= budget,
            None => cur.len() < batch_size,
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

/// Rows of `c` computed in `order` (row r holds example `order[r]`), put back in example
/// order: every tensor whose first axis has one row per example is permuted; the rest (data,
/// per-window values) is kept.
fn dataset_order(c: ActivationCache, order: &[usize]) -> Result<ActivationCache> {
    if order.iter().enumerate().all(|(r, &i)| r == i) {
        return Ok(c);
    }
    let mut pos = vec![0i64; order.len()];
    for (r, &i) in order.iter().enumerate() {
        pos[i] = r as i64;
    }
    let n = order.len() as i64;
    let index = tch::Tensor::from_slice(&pos);
    let mut out = ActivationCache::new();
    for (k, v) in c.iter() {
        let v = v.map_tensors(&mut |t| {
            if t.dim() > 0 && t.size()[0] == n {
                Ok(t.f_index_select(0, &index.to_device(t.device()))?)
            } else {
                Ok(t.shallow_clone())
            }
        })?;
        out.insert(k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::plan_batches;

    #[test]
    fn batches_group_lengths_cover_every_example_once_and_respect_budgets() {
        assert_eq!(plan_batches(&[5, 1, 5, 1], 2, None, true), vec![vec![1, 3], vec![0, 2]]);
        assert_eq!(plan_batches(&[5, 1, 5, 1], 2, None, false), vec![vec![0, 1], vec![2, 3]]);
        // token budget: 2 x 5 = 10 fits, a third 5 would be 15
        assert_eq!(plan_batches(&[5, 5, 5, 1], 100, Some(10), true), vec![vec![3, 0], vec![1, 2]]);
        // one example over the budget is a batch of its own
        assert_eq!(plan_batches(&[50, 1], 8, Some(10), true), vec![vec![1], vec![0]]);
        let lengths: Vec<usize> = (0..97).map(|i| (i * 37) % 23 + 1).collect();
        for (bs, mt) in [(1, None), (8, None), (8, Some(64)), (100, Some(7))] {
            let plan = plan_batches(&lengths, bs, mt, true);
            let mut all: Vec<usize> = plan.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..97).collect::<Vec<_>>());
            for b in &plan {
                let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
                assert!(mt.map_or(b.len() <= bs, |m| b.len() == 1 || b.len() * longest <= m));
            }
        }
    }
}

/// The chunk being filled and where it goes.
struct State<'a> {
    w: ChunkWriter,
    pending: Pending,
    per_chunk: Option<u64>,
    chunk_size: ChunkSize,
    groups: Option<&'a TokenGroups>,
    model_name: String,
    config: &'a ExtractionConfig,
}

impl State<'_> {
    /// Adds a window's (host) cache, in dataset order, to the chunk; writes the chunk when it
    /// is full.
    fn absorb(&mut self, cache: ActivationCache, examples: u64, r: WindowRecord) -> Result<()> {
        let p = &mut self.pending;
        hook_cache::ragged::cat_ragged(&mut p.cache, cache)?;

        p.batches.extend(r.batches);
        p.string_tokens.extend(r.string_tokens);
        p.examples += examples;
        if self.per_chunk.is_none() {
            // bytes: fix the examples per chunk from the first window
            let ChunkSize::Bytes(budget) = self.chunk_size else { unreachable!("examples are known") };
            let per_example = (p.cache.iter().map(|(_, v)| v.nbytes()).sum::<u64>() / p.examples).max(1);
            let n = (budget / per_example).max(1);
            self.per_chunk = Some(n);
            self.w.set_setting("examples_per_chunk", serde_json::json!(n));
        }
        if self.pending.examples >= self.per_chunk.expect("set above") {
            flush(&mut self.w, std::mem::replace(&mut self.pending, Pending::new()), self.groups, &self.model_name, self.config)?;
        }
        Ok(())
    }
}

fn flush(w: &mut ChunkWriter, mut p: Pending, groups: Option<&TokenGroups>, model_name: &str, config: &ExtractionConfig) -> Result<()> {
    let first = w.examples_done();
    p.cache.add_metadata(groups.map(|g| g.to_string()).unwrap_or_else(|| "all".into()), model_name, config, Vec::<String>::new())?;
    p.cache.insert("hookrs_batches", serde_json::json!({"examples": [first, p.examples], "batches": p.batches, "string_tokens": p.string_tokens}));
    p.cache.shrink_to_fit()?;
    w.write_chunk(&p.cache, p.examples)?;
    Ok(())
}
