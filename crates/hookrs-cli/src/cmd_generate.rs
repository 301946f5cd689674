//! `hookrs generate`: continue a prompt, greedy or sampled, optionally steered (a vector added
//! to a layer's residual stream at every generated position).

use std::path::PathBuf;

use anyhow::{Context, Result};
use hook_analysis::{generate, GenerateOptions, Steering};

use crate::inputs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: inputs::ModelOptions,
    #[command(flatten)]
    pub prompt: inputs::PromptArgs,
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
    /// Stop after this token id.
    #[arg(long)]
    pub eos: Option<i64>,
    /// A steering vector: a safetensors file holding one tensor of d_model values (e.g. a
    /// difference of cached means), added to --layer's output at every generated position.
    #[arg(long, requires = "layer")]
    pub steer: Option<PathBuf>,
    /// The layer whose output --steer is added to.
    #[arg(long, requires = "steer")]
    pub layer: Option<usize>,
    /// Multiplies the steering vector.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub scale: f64,
    /// Print JSON: the prompt's and the new tokens' ids, and their text when a tokenizer is known.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    inputs::device(&a.model)?; // a bad --device is a usage error before anything is read
    let tok = inputs::tokenizer_for(&a.model.model)?;
    let prompt = inputs::single_prompt(&a.model, tok.as_ref(), &a.prompt)?.ids;
    let mut m = inputs::load_model(&a.model)?;
    let vocab = m.require_description()?.vocab_size as i64;
    if let Some(bad) = prompt.iter().find(|&&t| t < 0 || t >= vocab) {
        anyhow::bail!("token id {bad} is out of the vocabulary: valid ids are 0..{vocab}");
    }
    let steering = match (&a.steer, a.layer) {
        (Some(path), Some(layer)) => {
            let tensors = tch::Tensor::read_safetensors(path).with_context(|| format!("reading --steer {}", path.display()))?;
            let [(_, t)] = <[_; 1]>::try_from(tensors).map_err(|v: Vec<_>| anyhow::anyhow!("--steer {}: expected one tensor, found {}", path.display(), v.len()))?;
            Some(Steering { layer, vector: t.flatten(0, -1).to_kind(tch::Kind::Float), scale: a.scale })
        }
        _ => None,
    };
    let o = GenerateOptions { max_new_tokens: a.max_new_tokens, temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed, eos: a.eos };
    let new = generate(&mut m, &prompt, &o, &[], steering.as_ref())?;
    let decode = |ids: &[i64]| tok.as_ref().and_then(|t| t.decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).ok());
    if a.json {
        let v = serde_json::json!({"prompt_ids": prompt, "new_ids": new, "prompt_text": decode(&prompt), "new_text": decode(&new)});
        println!("{}", serde_json::to_string(&v)?);
    } else {
        match (decode(&prompt), decode(&new)) {
            (Some(p), Some(n)) => println!("{p}[{n}]"),
            _ => println!("{prompt:?} -> {new:?}"),
        }
    }
    Ok(())
}
