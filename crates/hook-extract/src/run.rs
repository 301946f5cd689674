//! The batch loop: examples streamed in windows (the rest of a chunk, or the whole run for a
//! single file), each window planned into batches, each batch run with hooks, the rows put
//! back in dataset order and pushed to the sink.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use hook_cache::ActivationCache;
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};

use crate::batch::{dataset_order, pad, same_length_runs};
use crate::job::{CacheDevice, Dtype, ExtractJob};
use crate::sink::{CacheSink, ChunkSink, FileSink, Part, Room, Stamp};
use crate::source::Example;
use crate::{ExtractError, Progress, Result};

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Where the output is.
    pub out: PathBuf,
    /// The output was already complete: nothing ran.
    pub already_complete: bool,
    /// Examples that an earlier, interrupted run had written (the run resumed after them).
    pub resumed_after: u64,
    /// Examples in the output.
    pub examples: u64,
    /// Examples computed by this run.
    pub examples_run: u64,
    /// Their tokens.
    pub tokens: u64,
    /// Tokens the model computed, padding included.
    pub computed_tokens: u64,
    /// Wall time of the batch loop.
    pub seconds: f64,
    /// Chunks, for a chunk directory.
    pub chunks: Option<usize>,
    /// The output's key families (a single file).
    pub table: Option<String>,
}

/// Runs an extraction: loads the model, streams the examples through it in batches and
/// writes the cache to the job's output, telling `progress` as examples complete.
///
/// ```no_run
/// let options = hook_extract::ExtractOptions::from_json(
///     r#"{"model": "llama.pt", "out": "cache/", "prompts": "data.jsonl", "extract": ["resid_out"]}"#,
/// ).unwrap();
/// let job = options.validate(|k| std::env::var(k).ok()).unwrap();
/// let report = hook_extract::run(job, &mut |done: u64, total: Option<u64>| eprintln!("{done}/{total:?}")).unwrap();
/// println!("{} examples, {:.0} tokens/s", report.examples, report.tokens as f64 / report.seconds);
/// ```
pub fn run(job: ExtractJob, progress: &mut dyn Progress) -> Result<Report> {
    let mut model = job.model.load()?;
    run_with(&mut model, job, progress)
}

/// [`run`] with a model already loaded (its path in `job.model.model` names it in the
/// output's fingerprint).
pub fn run_with(model: &mut HookedModule, job: ExtractJob, progress: &mut dyn Progress) -> Result<Report> {
    let device = job.model.device()?;
    let (lo, hi) = match job.shard {
        None => (0, u64::MAX),
        Some(sh) => {
            let total = job.source.count()?;
            let (lo, hi) = sh.range(total);
            if lo == hi {
                return Err(anyhow::anyhow!("shard {}/{} gets no examples: the input holds {total} examples for {} shards", sh.index, sh.count, sh.count).into());
            }
            (lo, hi)
        }
    };
    let model_name = model.description().map(|d| d.source.clone()).unwrap_or_else(|| job.model.model.display().to_string());
    let stamp = Stamp { groups: job.groups.clone(), model_name, config: job.config.clone(), shard: job.shard, first_example: lo };
    let mut sink: Box<dyn CacheSink> = if job.single_file() {
        Box::new(FileSink::new(&job.out, Some(stamp)))
    } else {
        let fingerprints = BTreeMap::from([
            ("model".to_string(), model_fingerprint(&job.model.model, model)?),
            ("input".to_string(), job.source.fingerprint()?),
            ("extraction".to_string(), job.settings_fingerprint()?),
        ]);
        let settings = job.shard.map(|sh| ("shard", serde_json::json!({"index": sh.index, "count": sh.count, "first_example": lo, "examples": hi - lo})));
        Box::new(ChunkSink::open(&job.out, fingerprints, job.overwrite, job.chunk_size, Some(stamp), settings.into_iter().collect())?)
    };
    let done = sink.examples_done();
    let total = if hi != u64::MAX { Some(hi - lo) } else { job.source.known_len() };
    if sink.complete() && done > 0 {
        return Ok(Report { out: job.out, already_complete: true, resumed_after: done, examples: done, examples_run: 0, tokens: 0, computed_tokens: 0, seconds: 0.0, chunks: sink.chunks(), table: None });
    }
    progress.start(done, total);
    let mut stream = job.source.stream(&job.model.model, lo + done, job.special_tokens)?.into_iter().take(hi.saturating_sub(lo + done).min(usize::MAX as u64) as usize);
    let started = Instant::now();
    let (mut tokens, mut computed, mut run_examples) = (0u64, 0u64, 0u64);
    let mut next = lo + done; // dataset index of the next example
    let batch = Batcher { config: &job.config, groups: job.groups.as_ref(), stop_early: !job.full_forward && !job.config.save_logits && !job.config.keep_gradient, cache_dtype: job.cache_dtype };
    // GPU runs: each batch's copy to host memory runs while the next batch computes
    let to_host = device != tch::Device::Cpu && job.cache_device == CacheDevice::Cpu;
    loop {
        let room = match sink.room() {
            Room::Any => u64::MAX,
            Room::Examples(n) => n,
            Room::OneBatch => job.plan.batch_size as u64,
        };
        let mut window: Vec<Example> = Vec::new();
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
        let mut plan = job.plan.plan(&lengths);
        if job.groups.is_none() {
            // every token: every position of every prompt of a batch must exist
            plan = plan.iter().flat_map(|b| same_length_runs(b, |&i| lengths[i]).into_iter().map(<[usize]>::to_vec)).collect();
        }
        let mut joined = ActivationCache::new();
        let mut copying: Option<hook_torch::transfer::HostCopy> = None;
        let mut window_done = 0u64;
        for idxs in &plan {
            let refs: Vec<&Example> = idxs.iter().map(|&i| &window[i]).collect();
            let (ids, mask) = pad(&refs, device);
            computed += (refs.len() as u64) * ids.size()[1] as u64;
            let cache = batch.run(model, &ids, &mask, lengths[idxs[0]]).with_context(|| format!("examples {:?}", idxs.iter().map(|&i| next + i as u64).collect::<Vec<_>>()))?;
            if to_host {
                if let Some(previous) = copying.replace(hook_torch::transfer::to_host_async(&cache)?) {
                    hook_cache::ragged::cat_ragged(&mut joined, previous.wait()?)?;
                }
            } else {
                hook_cache::ragged::cat_ragged(&mut joined, cache)?;
            }
            window_done += idxs.len() as u64;
            progress.advance(next - lo + window_done, total);
        }
        if let Some(last) = copying.take() {
            hook_cache::ragged::cat_ragged(&mut joined, last.wait()?)?;
        }
        let order: Vec<usize> = plan.iter().flatten().copied().collect();
        let part = Part {
            cache: dataset_order(joined, &order)?,
            examples: window.len() as u64,
            batches: plan.iter().map(|b| serde_json::json!(b.iter().map(|&i| next + i as u64).collect::<Vec<_>>())).collect(),
            string_tokens: window.iter().map(|e| serde_json::json!(e.tokens)).collect(),
        };
        tokens += lengths.iter().sum::<usize>() as u64;
        run_examples += window.len() as u64;
        next += window.len() as u64;
        let before = sink.chunks();
        sink.push(part)?;
        if let Some(n) = sink.chunks().filter(|&n| Some(n) != before) {
            progress.chunk_written(n);
        }
    }
    if sink.examples_done() + run_examples == 0 {
        return Err(anyhow::anyhow!("the input holds no examples").into());
    }
    let written = sink.finish()?;
    Ok(Report {
        out: job.out,
        already_complete: false,
        resumed_after: done,
        examples: written.examples,
        examples_run: run_examples,
        tokens,
        computed_tokens: computed,
        seconds: started.elapsed().as_secs_f64(),
        chunks: written.chunks,
        table: written.table,
    })
}

/// One batch through `run_with_cache`.
struct Batcher<'a> {
    config: &'a ExtractionConfig,
    groups: Option<&'a TokenGroups>,
    stop_early: bool,
    cache_dtype: Dtype,
}

impl Batcher<'_> {
    /// The batch's cache: the forward stops early when the logits are not needed (nothing
    /// after the last requested site runs); with every token, marked so that batches of other
    /// lengths join it ([`hook_cache::ragged`]).
    fn run(&self, model: &mut HookedModule, ids: &tch::Tensor, mask: &tch::Tensor, len: usize) -> Result<ActivationCache> {
        let groups = match self.groups {
            Some(g) => g.clone(),
            None => TokenGroups::all(len).map_err(anyhow::Error::from)?,
        };
        let spec = hook_torch::RunSpec { extraction: Some(hook_torch::Extraction::new(&groups, self.config)), stop_early: self.stop_early, ..Default::default() };
        let cache = model.run(ids, mask, spec)?.cache;
        let mut cache = match self.cache_dtype.kind() {
            Some(k) => cache.to_float_kind(k)?,
            None => cache,
        };
        if self.groups.is_none() {
            hook_cache::ragged::mark(&mut cache, len as i64)?;
        }
        Ok(cache)
    }
}

/// SHA-256 of what identifies a model file cheaply: its size, its description, and its first
/// and last MiB (a multi-GB archive is not hashed whole on every resume).
pub fn model_fingerprint(path: &Path, model: &HookedModule) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    h.update(serde_json::to_vec(&model.description()).map_err(anyhow::Error::from)?);
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    f.seek(SeekFrom::End(-(buf.len() as i64)))?;
    f.read_exact(&mut buf)?;
    h.update(&buf);
    Ok(format!("sha256:{:x} ({}, {len} bytes)", h.finalize(), path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
}

impl From<hook_core::CoreError> for ExtractError {
    fn from(e: hook_core::CoreError) -> Self {
        ExtractError::Failed(e.into())
    }
}
