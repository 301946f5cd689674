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
fn config_fingerprint(a: &Args, config: &ExtractionConfig, groups: Option<&TokenGroups>) -> Result<String> {
    let mut v = serde_json::to_value(config)?;
    let o = v.as_object_mut().expect("the config is an object");
    o.retain(|_, x| x != &serde_json::Value::Bool(false) && !x.is_null());
    o.insert("token_groups".into(), groups.map(|g| g.to_string()).unwrap_or_else(|| "all".into()).into());
    o.insert("batch_size".into(), a.batch_size.into());
    o.insert("chunk_size".into(), a.chunk_size.clone().into());
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
) -> Result<()> {
    let fingerprints = BTreeMap::from([
        ("model".to_string(), crate::cmd_extract::model_fingerprint(&a.model, model)?),
        ("input".to_string(), source.fingerprint()?),
        ("extraction".to_string(), config_fingerprint(a, config, groups)?),
    ]);
    let w = ChunkWriter::open(&a.out, fingerprints, a.overwrite)?;
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
    let rx = source.stream(&a.model, done)?;
    let model_name = model.description().map(|d| d.source.clone()).unwrap_or_else(|| a.model.display().to_string());
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {pos} examples, {per_sec}, {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    let started = Instant::now();
    let (mut n_tokens, mut n_examples) = (0usize, 0u64);
    let mut next = done; // dataset index of the next example
    let mut state = State { w, pending: Pending::new(), per_chunk, chunk_size, batch_size, groups, model_name, config };
    // GPU runs: batch k's copy to host runs while batch k+1 is queued; waited for after that
    let to_host = device != Device::Cpu && a.cache_device == "cpu";
    let mut in_flight: Option<(hook_cache::PendingHostCopy, BatchRecord)> = None;
    let mut stream = rx.into_iter();
    loop {
        // the next batch, cut at the chunk boundary
        let counted = state.pending.examples + in_flight.as_ref().map_or(0, |f| f.1.examples);
        let room = state.per_chunk.map(|n| n - counted).unwrap_or(batch_size).min(batch_size);
        let mut batch: Vec<Example> = Vec::with_capacity(room as usize);
        for e in stream.by_ref() {
            batch.push(e?);
            if batch.len() as u64 == room {
                break;
            }
        }
        if batch.is_empty() {
            break;
        }
        let refs: Vec<&Example> = batch.iter().collect();
        let (ids, mask) = inputs::pad(&refs, device);
        let g = batch_groups(groups, &refs, (next / batch_size) as usize)?;
        let (_, cache) = crate::cmd_extract::run_batch(model, &ids, &mask, &g, config).with_context(|| format!("examples {next}..{}", next + batch.len() as u64))?;
        let record = BatchRecord { first: next, examples: batch.len() as u64, string_tokens: batch.iter().map(|e| serde_json::json!(e.tokens)).collect() };
        n_tokens += batch.iter().map(|e| e.ids.len()).sum::<usize>();
        n_examples += batch.len() as u64;
        next += batch.len() as u64;
        bar.inc(batch.len() as u64);
        if to_host && state.per_chunk.is_some() {
            if let Some((copy, rec)) = in_flight.replace((cache.to_host_async()?, record)) {
                state.absorb(copy.wait(), rec)?;
            }
        } else if to_host {
            state.absorb(cache.to_host_async()?.wait(), record)?; // the first batch fixes the chunk size
        } else {
            state.absorb(cache, record)?;
        }
        bar.set_message(format!("{} chunks", state.w.manifest().chunks.len()));
    }
    if let Some((copy, rec)) = in_flight.take() {
        state.absorb(copy.wait(), rec)?;
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
        "{} examples ({} this run), {} tokens in {:.2} s: {:.0} tokens/s -> {} ({} chunks)",
        w.examples_done(),
        n_examples,
        n_tokens,
        secs,
        n_tokens as f64 / secs.max(1e-9),
        a.out.display(),
        w.manifest().chunks.len()
    );
    Ok(())
}

/// One batch's bookkeeping.
struct BatchRecord {
    first: u64,
    examples: u64,
    string_tokens: Vec<serde_json::Value>,
}

/// The chunk being filled and where it goes.
struct State<'a> {
    w: ChunkWriter,
    pending: Pending,
    per_chunk: Option<u64>,
    chunk_size: ChunkSize,
    batch_size: u64,
    groups: Option<&'a TokenGroups>,
    model_name: String,
    config: &'a ExtractionConfig,
}

impl State<'_> {
    /// Adds a batch's (host) cache to the chunk; writes the chunk when it is full.
    fn absorb(&mut self, cache: ActivationCache, r: BatchRecord) -> Result<()> {
        let p = &mut self.pending;
        p.cache.cat(cache)?;
        p.batches.push(serde_json::json!([r.first, r.examples]));
        p.string_tokens.extend(r.string_tokens);
        p.examples += r.examples;
        if self.per_chunk.is_none() {
            // bytes: fix the examples per chunk from the first batch, a multiple of the batch size
            let ChunkSize::Bytes(budget) = self.chunk_size else { unreachable!("examples are known") };
            let per_example = (p.cache.iter().map(|(_, v)| v.nbytes()).sum::<u64>() / p.examples).max(1);
            let n = ((budget / per_example) / self.batch_size).max(1) * self.batch_size;
            self.per_chunk = Some(n);
            self.w.set_setting("examples_per_chunk", serde_json::json!(n));
        }
        if Some(self.pending.examples) == self.per_chunk {
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
