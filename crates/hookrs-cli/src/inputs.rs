//! The flags every model command shares, parsed once: the model ([`ModelOptions`], from
//! hook-extract: `--model`, `--device`, `--dtype`, `--no-special-tokens`), one prompt
//! ([`PromptArgs`]: `--text` or `--input-ids`) and a figure ([`FigureArgs`]: `--out`, `--svg`).

use std::path::PathBuf;

use anyhow::{Context, Result};
pub use hook_extract::source::{encode, tokenizer_candidates, tokenizer_for};
pub use hook_extract::batch::pad;
pub use hook_extract::{Example, ModelOptions, Source};

/// One prompt: `--text` (tokenized with the model's tokenizer) or `--input-ids`.
#[derive(clap::Args, Debug, Clone)]
pub struct PromptArgs {
    /// The prompt.
    #[arg(long, conflicts_with = "input_ids")]
    pub text: Option<String>,
    /// The prompt as token ids: a JSON list (`[1,5,9]`, or `[[1,5,9]]`).
    #[arg(long)]
    pub input_ids: Option<String>,
}

/// A picture and its numbers: `--out PREFIX` writes PREFIX.json and PREFIX.png (or .svg).
#[derive(clap::Args, Debug, Clone)]
pub struct FigureArgs {
    /// Draw the picture as SVG (PREFIX.svg) instead of PNG.
    #[arg(long)]
    pub svg: bool,
    /// Output prefix: writes PREFIX.json and PREFIX.png (or .svg).
    #[arg(long)]
    pub out: PathBuf,
}

impl FigureArgs {
    /// `--out` without the extension a user may have typed (`out/lens.png` → `out/lens`): the
    /// prefix of the `.json` and picture files.
    pub fn prefix(&self) -> PathBuf {
        match self.out.extension().and_then(|e| e.to_str()) {
            Some("json") | Some("png") | Some("svg") => self.out.with_extension(""),
            _ => self.out.clone(),
        }
    }

    /// The two files it writes: `PREFIX.json` and `PREFIX.png` (or `PREFIX.svg` with `--svg`).
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        let base = self.prefix();
        (base.with_extension("json"), base.with_extension(if self.svg { "svg" } else { "png" }))
    }
}

/// How a patching or ablation sweep batches its cells: `--max-batch-tokens`, `--no-shared-prefix`.
#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// The cells of the sweep run as the rows of batched forwards of at most this many tokens
    /// (at least one row each): results equal one forward per cell up to float rounding.
    #[arg(long, default_value_t = hook_analysis::patching::DEFAULT_BATCH_TOKENS, value_parser = positive)]
    pub max_batch_tokens: usize,
    /// Run every cell through the whole model. By default the cells that edit layer l share
    /// one run of the prompt up to layer l, and only the positions the metric reads are
    /// unembedded (the same numbers up to float rounding; 1.7x to 1.9x faster on SmolLM2).
    #[arg(long)]
    pub no_shared_prefix: bool,
}

impl SweepArgs {
    /// The batching these flags ask for.
    pub fn batching(&self) -> hook_analysis::patching::Batching {
        hook_analysis::patching::Batching { max_tokens: self.max_batch_tokens, share_prefix: !self.no_shared_prefix }
    }
}

/// The model's options, with a bad `--device` or `--dtype` as a usage error.
pub fn load_model(m: &ModelOptions) -> Result<hook_torch::HookedModule> {
    m.load().map_err(crate::from_extract)
}

/// The device of `--device` (a usage error when it does not parse).
pub fn device(m: &ModelOptions) -> Result<tch::Device> {
    m.device().map_err(crate::from_extract)
}

/// One prompt from `--text` (tokenized with the model's tokenizer) or `--input-ids` (`[1,5,9]`
/// or `[[1,5,9]]`), for the commands that take a single prompt (lens, attribute, generate,
/// ablate). A malformed or missing value is a usage error.
pub fn single_prompt(m: &ModelOptions, tok: Option<&tokenizers::Tokenizer>, p: &PromptArgs) -> Result<Example> {
    let (model, special) = (&m.model, !m.no_special_tokens);
    match (p.text.as_deref(), p.input_ids.as_deref()) {
        (Some(t), None) => {
            let tok = tok.with_context(|| format!("--text needs the model's tokenizer (looked for {:?}); pass --input-ids instead", tokenizer_candidates(model)))?;
            encode(tok, t, special)
        }
        (None, Some(j)) => {
            let v: serde_json::Value = serde_json::from_str(j).map_err(|e| crate::usage!("--input-ids is not a JSON list of token ids: {e} (e.g. '[1,5,9]')"))?;
            let flat = match v {
                serde_json::Value::Array(a) if a.len() == 1 && a[0].is_array() => a[0].clone(),
                other => other,
            };
            let ids: Vec<i64> = serde_json::from_value(flat).map_err(|e| crate::usage!("--input-ids must be one prompt's token ids, e.g. '[1,5,9]': {e}"))?;
            if ids.is_empty() {
                return Err(crate::usage!("--input-ids needs at least one token"));
            }
            let tokens = tok.map(|t| ids.iter().map(|&i| u32::try_from(i).ok().and_then(|i| t.id_to_token(i)).unwrap_or_else(|| i.to_string())).collect());
            Ok(Example { ids, tokens })
        }
        _ => Err(crate::usage!("give the prompt with --text or --input-ids")),
    }
}

/// The id of `s`, which must be exactly one token (`--answer`, `--wrong`).
pub fn one_token(tok: &tokenizers::Tokenizer, flag: &str, s: &str) -> Result<i64> {
    let e = encode(tok, s, false)?;
    if e.ids.len() != 1 {
        anyhow::bail!("{flag} {s:?} is {} tokens ({:?}): it must be exactly one token", e.ids.len(), e.tokens.unwrap_or_default());
    }
    Ok(e.ids[0])
}

/// A count of at least 1 (`--max-batch-tokens`): 0 is a usage error that says so.
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}: expected a whole number such as 4096")),
    }
}
