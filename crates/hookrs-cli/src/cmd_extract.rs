//! `hookrs extract`: prompts in, an easyroutine-style activation cache out.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hook_cache::{ActivationCache, CacheValue};
use hook_core::keys::ParsedKey;
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, HookedModule};
use indexmap::IndexMap;
use indicatif::{ProgressBar, ProgressStyle};

use crate::inputs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TorchScript model exported by `cargo xtask export`.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompts: --text "a b" "c d" or --text "a b" --text "c d"; needs the model's tokenizer.
    #[arg(long, num_args = 1..)]
    pub text: Vec<String>,
    /// A file with one prompt per line, JSONL, or Parquet (what HF `datasets` exports), whose
    /// --column holds a text or a list of token ids (pre-tokenized). Read as a stream,
    /// tokenized on its own thread.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The JSONL field or Parquet column holding each prompt.
    #[arg(long, default_value = "text")]
    pub column: String,
    /// A line of --prompts that cannot be read: stop with its file:line, or skip it.
    #[arg(long, value_enum, default_value = "stop")]
    pub on_bad_line: inputs::BadLine,
    /// Token ids as JSON, one list per example: '[[1,5,9],[3,4,2]]' (unequal lengths are left-padded).
    #[arg(long)]
    pub input_ids: Option<String>,
    /// An ExtractionConfig JSON file with easyroutine's field names.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// What to extract, short form: resid_out,attn_pattern,… (field names without extract_).
    #[arg(long, value_delimiter = ',')]
    pub extract: Vec<String>,
    /// easyroutine token groups as JSON: '[[0,1],[5]]' (negative positions count from the end).
    #[arg(long, conflicts_with = "tokens")]
    pub token_groups: Option<String>,
    /// Shorthand for the token groups: last (the default) or all. With all, prompts of mixed
    /// length are stored with their token axes right-padded with zeros and their lengths in
    /// `token_lengths`.
    #[arg(long, value_parser = ["last", "all"])]
    pub tokens: Option<String>,
    /// Prompts per forward pass (at most, with --max-batch-tokens).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// With a directory --out: cut batches at this many padded tokens (examples x the longest)
    /// instead of at --batch-size examples.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// With a directory --out: batch prompts in file order instead of grouping them by length
    /// (the output is in dataset order either way).
    #[arg(long)]
    pub no_sort: bool,
    /// Tokenize without the special tokens the tokenizer adds by default (its BOS, for
    /// example); by default they are added, as `tokenizer(text)` does in transformers.
    /// Pre-tokenized input (--input-ids, id lists in --prompts) is never changed.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run the model in this dtype: `model` (the default: the dtype it was exported in),
    /// float32, bfloat16 or float16. A bfloat16 or float16 export converts to any of them; a
    /// float32 export runs only in float32 (export with --dtype for half precision).
    #[arg(long, value_parser = ["model", "float32", "bfloat16", "float16"], default_value = "model")]
    pub dtype: String,
    /// Where the cache is gathered: cpu (the default; with --device cuda each batch is copied to
    /// pinned host memory while the next batch runs) or the model's device (keeps it on the GPU).
    #[arg(long, value_parser = ["cpu", "model"], default_value = "cpu")]
    pub cache_device: String,
    /// The dtype of the saved activations: `model` (the default: the model's own dtype, e.g.
    /// bfloat16 for a bfloat16 export), float32, bfloat16 or float16. Integer entries (input
    /// ids) are kept.
    #[arg(long, value_parser = ["model", "float32", "bfloat16", "float16"], default_value = "model")]
    pub cache_dtype: String,
    /// Process shard K of N (K/N): the K-th of N contiguous ranges of examples, to split a
    /// dataset across processes (`hookrs merge` joins them). `auto` reads a Slurm array
    /// (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT) or a Kubernetes
    /// Indexed Job (JOB_COMPLETION_INDEX, with --shard-count).
    #[arg(long)]
    pub shard: Option<String>,
    /// The number of shards for --shard auto under a Kubernetes Indexed Job (its completions).
    #[arg(long)]
    pub shard_count: Option<usize>,
    /// Where to write the cache: FILE.safetensors (one file, written at the end) or a
    /// directory (chunks written as they are computed; rerun the same command to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Chunk size with a directory --out: N examples, or a size such as 256MiB (the default).
    #[arg(long, default_value = "256MiB")]
    pub chunk_size: String,
    /// Run the whole forward pass even when nothing after the last requested site is needed
    /// (by default it stops there; this flag is for comparisons and debugging).
    #[arg(long)]
    pub full_forward: bool,
    /// With a directory --out that holds another extraction: delete it and start over.
    #[arg(long)]
    pub overwrite: bool,
}

/// `--chunk-size`: examples, or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSize {
    Examples(u64),
    Bytes(u64),
}

pub fn parse_chunk_size(s: &str) -> Result<ChunkSize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| crate::usage!("--chunk-size {s:?}: expected a number of examples (e.g. 1000) or a size (e.g. 256MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => return if n == 0 { Err(crate::usage!("--chunk-size must be at least 1 example")) } else { Ok(ChunkSize::Examples(n)) },
        "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(crate::usage!("--chunk-size {s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    let bytes = n.checked_mul(mult).filter(|&b| b > 0).ok_or_else(|| crate::usage!("--chunk-size {s:?}: must be between 1 byte and 2^64"))?;
    Ok(ChunkSize::Bytes(bytes))
}

/// Whether `--out` names one file (today's behaviour) rather than a chunk directory.
fn is_single_file(out: &std::path::Path) -> bool {
    out.extension().is_some_and(|e| e == "safetensors") && !out.is_dir()
}

/// SHA-256 of what identifies a model file cheaply: its size, its description, and its first
/// and last MiB (a multi-GB archive is not hashed whole on every resume).
pub fn model_fingerprint(path: &std::path::Path, model: &HookedModule) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    h.update(serde_json::to_vec(&model.description())?);
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    f.seek(SeekFrom::End(-(buf.len() as i64)))?;
    f.read_exact(&mut buf)?;
    h.update(&buf);
    Ok(format!("sha256:{:x} ({}, {len} bytes)", h.finalize(), path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
}

/// One of `count` contiguous ranges of examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The examples `[lo, hi)` of this shard among `total`.
    pub fn range(&self, total: u64) -> (u64, u64) {
        let (k, n) = (self.index as u128, self.count as u128);
        ((total as u128 * k / n) as u64, (total as u128 * (k + 1) / n) as u64)
    }
}

/// `K/N`, or `auto` from the scheduler's environment (`env` looks a variable up).
pub fn parse_shard(s: &str, shard_count: Option<usize>, env: impl Fn(&str) -> Option<String>) -> Result<Shard> {
    let num = |name: &str, v: String| -> Result<usize> { v.trim().parse().map_err(|_| crate::usage!("--shard auto: {name}={v:?} is not a number")) };
    let (k, n) = if s.trim() == "auto" {
        if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
            let id = num("SLURM_ARRAY_TASK_ID", id)?;
            let min = env("SLURM_ARRAY_TASK_MIN").map(|v| num("SLURM_ARRAY_TASK_MIN", v)).transpose()?.unwrap_or(0);
            let count = env("SLURM_ARRAY_TASK_COUNT")
                .map(|v| num("SLURM_ARRAY_TASK_COUNT", v))
                .transpose()?
                .or(shard_count)
                .ok_or_else(|| crate::usage!("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: pass --shard-count N"))?;
            (id.checked_sub(min).ok_or_else(|| crate::usage!("--shard auto: SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"))?, count)
        } else if let Some(id) = env("JOB_COMPLETION_INDEX") {
            let count = shard_count.ok_or_else(|| crate::usage!("--shard auto under a Kubernetes Indexed Job needs --shard-count N (the job's completions)"))?;
            (num("JOB_COMPLETION_INDEX", id)?, count)
        } else {
            return Err(crate::usage!("--shard auto: neither SLURM_ARRAY_TASK_ID (a Slurm array) nor JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) is set: pass --shard K/N"));
        }
    } else {
        let (k, n) = s.split_once('/').ok_or_else(|| crate::usage!("--shard {s:?}: expected K/N, e.g. 0/4, or auto"))?;
        (k.trim().parse().map_err(|_| crate::usage!("--shard {s:?}: K is not a number"))?, n.trim().parse().map_err(|_| crate::usage!("--shard {s:?}: N is not a number"))?)
    };
    if n == 0 || k >= n {
        return Err(crate::usage!("--shard {s}: expected 0 <= K < N (got K={k}, N={n})"));
    }
    Ok(Shard { index: k, count: n })
}

/// The examples `[lo, hi)` a run covers: all, or its shard's range (which needs the number
/// of examples: a counting pass over the input). An empty shard is an error.
pub fn shard_range(shard: Option<Shard>, source: &inputs::Source) -> Result<(u64, u64)> {
    let Some(sh) = shard else { return Ok((0, u64::MAX)) };
    let total = source.count()?;
    let (lo, hi) = sh.range(total);
    if lo == hi {
        bail!("shard {}/{} gets no examples: the input holds {total} examples for {} shards", sh.index, sh.count, sh.count);
    }
    Ok((lo, hi))
}

/// The token groups of one batch: the given ones, or every position (`--tokens all`: the
/// callers split batches so that their prompts have one length, [`same_length_runs`]).
pub fn batch_groups(groups: Option<&TokenGroups>, batch: &[&inputs::Example], i: usize) -> Result<TokenGroups> {
    match groups {
        Some(g) => Ok(g.clone()),
        None => {
            let len = batch[0].ids.len();
            if batch.iter().any(|e| e.ids.len() != len) {
                bail!("internal: --tokens all got batch {i} of mixed lengths");
            }
            Ok(TokenGroups::all(len)?)
        }
    }
}

/// `batch` cut, in order, into runs of prompts of one length (`--tokens all` needs every
/// position of every prompt of a batch to exist).
pub fn same_length_runs<T>(batch: &[T], len: impl Fn(&T) -> usize) -> Vec<&[T]> {
    batch.chunk_by(|a, b| len(a) == len(b)).collect()
}

/// The cache of a `--tokens all` batch, marked so that batches of other lengths join it
/// (token axes right-padded with zeros, `token_lengths` per example: [`hook_cache::ragged`]).
pub fn mark_all_tokens(cache: &mut hook_cache::ActivationCache, groups: Option<&TokenGroups>, len: usize) -> Result<()> {
    if groups.is_none() {
        hook_cache::ragged::mark(cache, len as i64)?;
    }
    Ok(())
}

/// One batch through `run_with_cache`, stopping the forward early when the logits are not
/// needed (nothing after the last requested site runs).
pub fn run_batch(model: &mut HookedModule, ids: &tch::Tensor, mask: &tch::Tensor, g: &TokenGroups, config: &ExtractionConfig, a: &Args) -> Result<(tch::Tensor, hook_cache::ActivationCache)> {
    let stop_early = !a.full_forward && !config.save_logits && !config.keep_gradient;
    let (logits, cache) = model.run_with_cache_options(ids, mask, g, config, hook_torch::RunOptions { stop_early, ..Default::default() })?;
    let kind = match a.cache_dtype.as_str() {
        "float32" => Some(tch::Kind::Float),
        "bfloat16" => Some(tch::Kind::BFloat16),
        "float16" => Some(tch::Kind::Half),
        _ => None,
    };
    Ok((logits, match kind {
        Some(k) => cache.to_float_kind(k)?,
        None => cache,
    }))
}

pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 {
        return Err(crate::usage!("--batch-size must be at least 1"));
    }
    let device = inputs::device(&a.device)?;
    let shard = match a.shard.as_deref() {
        Some(spec) => Some(parse_shard(spec, a.shard_count, |k| std::env::var(k).ok())?),
        None => None,
    };
    // Logits are saved only when asked for (`--extract logits`, or "save_logits": true in
    // --config): without them the forward stops after the last requested site.
    let (mut config, logits_asked): (ExtractionConfig, bool) = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading --config {}", p.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", p.display()))?;
            let asked = v.get("save_logits") == Some(&serde_json::Value::Bool(true));
            (serde_json::from_value(v).map_err(|e| anyhow::anyhow!("--config {}: {e}", p.display()))?, asked)
        }
        None => (ExtractionConfig::default(), false),
    };
    let flags: Vec<&str> = a.extract.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
    let logits_asked = logits_asked || flags.iter().any(|f| *f == "logits" || *f == "save_logits");
    config = ExtractionConfig { save_logits: logits_asked, ..config }.with_flags(&flags).map_err(|e| crate::usage!("--extract: {e}"))?;
    let source = inputs::Source::from_flags(&a.text, a.prompts.as_deref(), a.input_ids.as_deref(), &a.column, a.on_bad_line)?;
    let chunk_size = parse_chunk_size(&a.chunk_size)?;
    let groups: Option<TokenGroups> = match (&a.token_groups, a.tokens.as_deref()) {
        (Some(j), _) => Some(
            serde_json::from_str(j).map_err(|e| crate::usage!("--token-groups is not a JSON list of lists of positions: {e} (e.g. '[[0,1],[-1]]')"))?,
        ),
        (None, Some("all")) => None,
        _ => Some(TokenGroups::last()),
    };
    let mut model = inputs::load_model(&a.model, device, &a.dtype)?;
    if !is_single_file(&a.out) {
        return crate::cmd_extract_chunks::run(&a, &mut model, source, &config, groups.as_ref(), chunk_size, device, shard);
    }
    let (lo, hi) = shard_range(shard, &source)?;
    let examples: Vec<inputs::Example> = source.stream(&a.model, lo, !a.no_special_tokens)?.into_iter().take((hi - lo) as usize).collect::<Result<_>>()?;
    // batches keyed by their first example's dataset index (merge orders shards by it); with
    // --tokens all, each cut into runs of one length
    let mut batches: Vec<(usize, Vec<&inputs::Example>)> = Vec::new();
    let mut first = lo as usize;
    for c in examples.chunks(a.batch_size) {
        let runs = if groups.is_none() { same_length_runs(c, |e| e.ids.len()) } else { vec![c] };
        for run in runs {
            batches.push((first, run.iter().collect()));
            first += run.len();
        }
    }
    let bar = if batches.len() > 1 { ProgressBar::new(batches.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} batches, {per_sec}, ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let started = Instant::now();
    let mut all = ActivationCache::new();
    let mut n_tokens = 0usize;
    let mut batch_index = Vec::new();
    let mut string_tokens = Vec::new();
    // GPU runs: batch k's cache is copied to host while batch k+1 runs; waited for after it
    let to_host = device != tch::Device::Cpu && a.cache_device == "cpu";
    let mut pending: Option<hook_torch::transfer::HostCopy> = None;
    let (mut done, total) = (0u64, batches.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
    for (i, batch) in &batches {
        let (ids, mask) = inputs::pad(batch, device);
        let g = batch_groups(groups.as_ref(), batch, *i)?;
        let (_, mut cache) = run_batch(&mut model, &ids, &mask, &g, &config, &a).with_context(|| format!("batch {i}"))?;
        mark_all_tokens(&mut cache, groups.as_ref(), batch[0].ids.len())?;
        n_tokens += batch.iter().map(|e| e.ids.len()).sum::<usize>();
        batch_index.push(serde_json::json!([i, batch.len()]));
        string_tokens.extend(batch.iter().map(|e| serde_json::json!(e.tokens)));
        if to_host {
            if let Some(previous) = pending.replace(hook_torch::transfer::to_host_async(&cache)?) {
                hook_cache::ragged::cat_ragged(&mut all, previous.wait()?)?;
            }
        } else {
            hook_cache::ragged::cat_ragged(&mut all, cache)?;
        }
        bar.inc(1);
        done += batch.len() as u64;
        crate::progress::report(done, Some(total));
    }
    if let Some(last) = pending.take() {
        hook_cache::ragged::cat_ragged(&mut all, last.wait()?)?;
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let model_name = model.description().map(|d| d.source.clone()).unwrap_or_else(|| a.model.display().to_string());
    all.add_metadata(groups.as_ref().map(|g| g.to_string()).unwrap_or_else(|| "all".into()), &model_name, &config, Vec::<String>::new())?;
    let (k, n) = shard.map(|s| (s.index, s.count)).unwrap_or((0, 1));
    all.insert("hookrs_batches", serde_json::json!({"shard": [k, n], "examples": [lo, hi - lo], "batches": batch_index, "string_tokens": string_tokens}));
    all.shrink_to_fit()?;
    all.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?; // atomic: no partial file is left
    print!("{}", summary(&all));
    println!(
        "{} prompts, {} tokens in {:.2} s: {:.0} tokens/s -> {}",
        batches.iter().map(|(_, b)| b.len()).sum::<usize>(),
        n_tokens,
        secs,
        n_tokens as f64 / secs.max(1e-9),
        a.out.display()
    );
    Ok(())
}

/// The summary table: key family, count, shape, dtype, bytes.
pub fn summary(c: &ActivationCache) -> String {
    let mut fams: IndexMap<String, (usize, String, String, u64)> = IndexMap::new();
    for (k, v) in c.iter() {
        let fam = match ParsedKey::parse(k) {
            p if p.layer.is_some() => p.family,
            _ => k.to_string(),
        };
        let (shape, dtype) = match v.inner() {
            CacheValue::Tensor(t) => (format!("{:?}", t.size()), format!("{:?}", t.kind())),
            other => (other.kind().to_string(), "-".into()),
        };
        let e = fams.entry(fam).or_insert((0, shape, dtype, 0));
        e.0 += 1;
        e.3 += v.nbytes();
    }
    let mut s = format!("{:<28} {:>5}  {:<20} {:<8} {:>12}\n", "key family", "count", "shape", "dtype", "bytes");
    for (f, (n, shape, dtype, bytes)) in fams {
        s.push_str(&format!("{f:<28} {n:>5}  {shape:<20} {dtype:<8} {bytes:>12}\n"));
    }
    s
}
