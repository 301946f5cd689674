//! `hookrs generate`: continue a prompt, or every prompt of a file in batches, greedy or
//! sampled, optionally steered (a vector added to a layer's residual stream), with a KV cache
//! ([`hook_analysis::generate`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use hook_analysis::{generate, Apply, Edits, GenerateOptions, Steering};
use hook_extract::{BadLine, Source};
use indicatif::{ProgressBar, ProgressStyle};

use crate::inputs;

/// Where `--steer` is added.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SteerAt {
    /// The prompt's forward only.
    Prompt,
    /// The generated tokens only (the first new token is read at the unsteered prompt).
    New,
    /// The prompt and every generated token.
    All,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: inputs::ModelOptions,
    /// The prompt.
    #[arg(long, conflicts_with_all = ["input_ids", "prompts"])]
    pub text: Option<String>,
    /// The prompt as token ids: a JSON list (`[1,5,9]`, or `[[1,5,9]]`).
    #[arg(long, conflicts_with = "prompts")]
    pub input_ids: Option<String>,
    /// A file of prompts: JSONL (`{"text": ...}` per line, the text or a list of token ids;
    /// another key with --column), a text file (one prompt per line) or Parquet. Needs --out.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The column (JSONL key) holding the prompt text in --prompts.
    #[arg(long, default_value = "text")]
    pub column: String,
    /// Where --prompts' continuations go: JSONL, one line per prompt in order
    /// (`prompt_ids`, `new_ids`, and `prompt_text`, `new_text` when a tokenizer is known).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Prompts generated side by side (left padded, each stopping on its own).
    #[arg(long, default_value_t = 8, value_parser = inputs::positive)]
    pub batch_size: usize,
    /// At most this many tokens (rows x columns) per forward of the prefill: a long prompt is
    /// fed in pieces, so its activations stay small beside the KV cache (0: all at once).
    #[arg(long, default_value_t = hook_analysis::generate::DEFAULT_MAX_PREFILL_TOKENS)]
    pub max_prefill_tokens: usize,
    /// How many tokens to add.
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: usize,
    /// 0 (the default): greedy; otherwise sample at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities reach p.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// The sampler's seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A row stops after this token id.
    #[arg(long)]
    pub eos: Option<i64>,
    /// A steering vector: a safetensors file holding one tensor of d_model values (e.g. a
    /// difference of cached means), added to --layer's output where --steer-at says.
    #[arg(long, requires = "layer")]
    pub steer: Option<PathBuf>,
    /// The layer whose output --steer is added to.
    #[arg(long, requires = "steer")]
    pub layer: Option<usize>,
    /// Multiplies the steering vector.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub scale: f64,
    /// Where the steering vector is added.
    #[arg(long, value_enum, default_value = "new")]
    pub steer_at: SteerAt,
    /// Print JSON: the prompt's and the new tokens' ids, and their text when a tokenizer is known.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    inputs::device(&a.model)?; // a bad --device is a usage error before anything is read
    if a.prompts.is_some() != a.out.is_some() {
        return Err(crate::usage!("--prompts FILE and --out FILE.jsonl go together (one prompt: --text or --input-ids, printed)"));
    }
    let tok = inputs::tokenizer_for(&a.model.model)?;
    let prompts: Vec<Vec<i64>> = match &a.prompts {
        Some(path) => {
            let source = Source::from_flags(&[], Some(path), None, &a.column, BadLine::Stop).map_err(crate::from_extract)?;
            source.stream(&a.model.model, 0, !a.model.no_special_tokens)?.into_iter().map(|e| e.map(|e| e.ids)).collect::<Result<_>>()?
        }
        None => vec![inputs::single_prompt(&a.model, tok.as_ref(), &inputs::PromptArgs { text: a.text.clone(), input_ids: a.input_ids.clone() })?.ids],
    };
    if prompts.is_empty() {
        anyhow::bail!("{} holds no prompts", a.prompts.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
    }
    let mut m = inputs::load_model(&a.model)?;
    let steering = match (&a.steer, a.layer) {
        (Some(path), Some(layer)) => {
            let tensors = tch::Tensor::read_safetensors(path).with_context(|| format!("reading --steer {}", path.display()))?;
            let [(_, t)] = <[_; 1]>::try_from(tensors).map_err(|v: Vec<_>| anyhow::anyhow!("--steer {}: expected one tensor, found {}", path.display(), v.len()))?;
            let at = match a.steer_at {
                SteerAt::Prompt => Apply::Prompt,
                SteerAt::New => Apply::NewTokens,
                SteerAt::All => Apply::All,
            };
            Some(Steering { layer, vector: t.flatten(0, -1).to_kind(tch::Kind::Float), scale: a.scale, at })
        }
        _ => None,
    };
    let o = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        eos: a.eos,
        pad: 0,
        batch_size: a.batch_size,
        max_prefill_tokens: a.max_prefill_tokens,
    };
    let edits = Edits { steering: steering.as_ref(), ..Edits::default() };
    let bar = if a.out.is_some() && prompts.len() > 1 { ProgressBar::new(prompts.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} prompts, {per_sec}, ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let started = std::time::Instant::now();
    let made = generate(&mut m, &prompts, &o, &edits, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let decode = |ids: &[i64]| tok.as_ref().and_then(|t| t.decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).ok());
    let line = |p: &[i64], n: &[i64]| serde_json::json!({"prompt_ids": p, "new_ids": n, "prompt_text": decode(p), "new_text": decode(n)});
    if let Some(out) = &a.out {
        // written beside, then moved: an interrupted run leaves no half file under the name
        let tmp = out.with_extension("jsonl.tmp");
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
        for (p, n) in prompts.iter().zip(&made.tokens) {
            writeln!(w, "{}", serde_json::to_string(&line(p, n))?)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
        let tokens: usize = made.tokens.iter().map(Vec::len).sum();
        println!("{} prompts, {tokens} new tokens in {seconds:.3} s ({:.1} tokens/s) -> {}", prompts.len(), tokens as f64 / seconds.max(1e-9), out.display());
        return Ok(());
    }
    let (prompt, new) = (&prompts[0], &made.tokens[0]);
    if a.json {
        println!("{}", serde_json::to_string(&line(prompt, new))?);
    } else {
        match (decode(prompt), decode(new)) {
            (Some(p), Some(n)) => println!("{p}[{n}]"),
            _ => println!("{prompt:?} -> {new:?}"),
        }
    }
    Ok(())
}
