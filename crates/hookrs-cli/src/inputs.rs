//! Prompts and token ids: where they come from (`--text`, `--prompts`, `--input-ids`), the
//! tokenizer beside the model, and left-padded batches.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

/// The tokenizer files looked for beside `model`, in order.
pub fn tokenizer_candidates(model: &Path) -> Vec<PathBuf> {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = model.parent().unwrap_or(Path::new("."));
    vec![dir.join(format!("{stem}.tokenizer.json")), dir.join("tokenizer.json")]
}

/// The tokenizer beside `model`, if there is one.
pub fn tokenizer_for(model: &Path) -> Result<Option<Tokenizer>> {
    for p in tokenizer_candidates(model) {
        if p.is_file() {
            return Tokenizer::from_file(&p).map(Some).map_err(|e| anyhow::anyhow!("cannot read the tokenizer {}: {e}", p.display()));
        }
    }
    Ok(None)
}

fn require_tokenizer(model: &Path, flag: &str) -> Result<Tokenizer> {
    tokenizer_for(model)?.ok_or_else(|| {
        let looked: Vec<String> = tokenizer_candidates(model).iter().map(|p| p.display().to_string()).collect();
        anyhow::anyhow!("{flag} needs a tokenizer, and {} has none (looked for {}): pass token ids with --input-ids '[[1,5,9]]' instead", model.display(), looked.join(", "))
    })
}

/// One example: its token ids and, when a tokenizer made them, its string tokens.
pub struct Example {
    pub ids: Vec<i64>,
    pub tokens: Option<Vec<String>>,
}

/// Tokenizes one text.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Example> {
    let enc = tok.encode(text, false).map_err(|e| anyhow::anyhow!("cannot tokenize {text:?}: {e}"))?;
    if enc.get_ids().is_empty() {
        bail!("the prompt {text:?} has no tokens");
    }
    Ok(Example { ids: enc.get_ids().iter().map(|&i| i as i64).collect(), tokens: Some(enc.get_tokens().to_vec()) })
}

/// Examples from exactly one of the three sources.
pub fn examples(model: &Path, text: &[String], prompts: Option<&Path>, input_ids: Option<&str>) -> Result<Vec<Example>> {
    let given = usize::from(!text.is_empty()) + usize::from(prompts.is_some()) + usize::from(input_ids.is_some());
    if given != 1 {
        bail!("give exactly one of --text, --prompts or --input-ids (got {given})");
    }
    if let Some(json) = input_ids {
        let ids: Vec<Vec<i64>> = serde_json::from_str(json).map_err(|e| {
            anyhow::anyhow!("--input-ids is not a JSON list of lists of token ids: {e} (e.g. '[[1,5,9],[3,4]]')")
        })?;
        if ids.is_empty() || ids.iter().any(Vec::is_empty) {
            bail!("--input-ids needs at least one example, each with at least one token");
        }
        return Ok(ids.into_iter().map(|ids| Example { ids, tokens: None }).collect());
    }
    if !text.is_empty() {
        let tok = require_tokenizer(model, "--text")?;
        return text.iter().map(|t| encode(&tok, t)).collect();
    }
    let path = prompts.expect("counted");
    let tok = require_tokenizer(model, "--prompts")?;
    let body = std::fs::read_to_string(path).with_context(|| format!("reading --prompts {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in body.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let text = if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: not JSON: {e}", path.display(), n + 1))?;
            v.get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| anyhow::anyhow!("{}:{}: a JSONL line needs a string field \"text\"", path.display(), n + 1))?
                .to_string()
        } else {
            line.to_string()
        };
        out.push(encode(&tok, &text)?);
    }
    if out.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(out)
}

/// Left-padded `(ids, mask)` for a batch of examples (pad id 0, mask 0).
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
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_kind(Kind::Int64).to_device(device),
    )
}

/// `cpu`, `cuda`, `cuda:N`. Whether the device is there is checked by `HookedModule::load`,
/// whose error says why not (no backend in this libtorch, no GPU, an index out of range).
pub fn device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Device::Cuda(n)),
            None => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
        },
    }
}
