//! Generation with hooks: greedy or sampled decoding (temperature, top-k, top-p, seeded) with
//! any interventions active at every step and, optionally, a steering vector added to the
//! residual stream of a layer at every generated position.
//!
//! Each step runs the whole sequence again (no KV cache): the exported TorchScript graph is
//! traced without `past_key_values` — transformers' cache is a Python object (`DynamicCache`)
//! that `torch.jit.trace` cannot take as an input or return, and a traced graph fixes the
//! number of layers' cache tensors it was traced with — so a step costs a forward over prompt
//! plus generated tokens (docs/analysis.md gives the measured cost). Without interventions,
//! greedy decoding gives HF `generate`'s tokens on the eager model (`tests/generate.rs`).

use hook_core::{HookContext, HookIo};
use hook_torch::{HookedModule, Intervention};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};

/// How to pick each new token.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How many tokens to add.
    pub max_new_tokens: usize,
    /// 0: greedy (argmax); otherwise the softmax temperature of sampling.
    pub temperature: f64,
    /// Sample among the k most likely tokens only.
    pub top_k: Option<usize>,
    /// Sample among the smallest set of tokens whose probability reaches p (nucleus).
    pub top_p: Option<f64>,
    /// The sampler's seed: the same seed gives the same tokens.
    pub seed: u64,
    /// Stop after this token.
    pub eos: Option<i64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 16, temperature: 0.0, top_k: None, top_p: None, seed: 0, eos: None }
    }
}

/// A vector added to a layer's output residual (`resid_out`) at every generated position.
#[derive(Debug)]
pub struct Steering {
    /// The layer whose output is steered.
    pub layer: usize,
    /// `[d_model]` (e.g. a difference of cached means).
    pub vector: Tensor,
    /// Multiplies the vector.
    pub scale: f64,
}

/// Sampling draws from its own seeded generator, not libtorch's global RNG.
type Rng = hook_core::rng::SplitMix64;

/// The next token from the last position's logits (`[vocab]`).
fn pick(logits: &Tensor, o: &GenerateOptions, rng: &mut Rng) -> Result<i64> {
    if o.temperature <= 0.0 {
        return Ok(logits.f_argmax(-1, false)?.int64_value(&[]));
    }
    let probs = (logits.f_to_kind(Kind::Double)? / o.temperature).f_softmax(-1, Kind::Double)?;
    let (sorted, order) = probs.f_sort(-1, true)?;
    let mut p: Vec<f64> = Vec::try_from(&sorted)?;
    let ids: Vec<i64> = Vec::try_from(&order)?;
    let mut keep = p.len();
    if let Some(k) = o.top_k {
        keep = keep.min(k.max(1));
    }
    if let Some(top_p) = o.top_p {
        let mut acc = 0.0;
        let n = p.iter().position(|&x| {
            acc += x;
            acc >= top_p
        });
        keep = keep.min(n.map(|i| i + 1).unwrap_or(p.len()));
    }
    p.truncate(keep);
    let total: f64 = p.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, x) in p.iter().enumerate() {
        if u < *x {
            return Ok(ids[i]);
        }
        u -= x;
    }
    Ok(ids[keep - 1])
}

/// Generates after `prompt` (token ids); returns the new tokens only. `interventions` are
/// active at every step; `steering` adds its vector at every generated position.
pub fn generate(m: &mut HookedModule, prompt: &[i64], o: &GenerateOptions, interventions: &[Intervention], steering: Option<&Steering>) -> Result<Vec<i64>> {
    if prompt.is_empty() {
        return Err(AnalysisError::Input("the prompt needs at least one token".into()));
    }
    if !(o.temperature >= 0.0) || o.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) || o.top_k == Some(0) {
        return Err(AnalysisError::Input("temperature must be >= 0 (0: greedy), top_p in (0, 1], top_k at least 1".into()));
    }
    let device = m.device();
    let handle = match steering {
        Some(s) => {
            let d = m.require_description()?;
            if s.layer >= d.num_hidden_layers {
                return Err(AnalysisError::Input(format!("steering layer {} is out of range: the model has layers 0..{}", s.layer, d.num_hidden_layers)));
            }
            if s.vector.size() != [d.hidden_size as i64] {
                return Err(AnalysisError::Input(format!("the steering vector has shape {:?}; the residual stream needs [{}]", s.vector.size(), d.hidden_size)));
            }
            let component = d.component("residual_stream_hook_name", s.layer)?;
            let v = (&s.vector * s.scale).to_device(device);
            let start = prompt.len() as i64;
            Some(m.add_hook(&component, move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                let x = io.main_tensor()?;
                let seq = x.size()[1];
                if seq <= start {
                    return Ok(None);
                }
                let added = x.narrow(1, start, seq - start) + v.to_kind(x.kind());
                Ok(Some(Tensor::cat(&[x.narrow(1, 0, start), added], 1)))
            })?)
        }
        None => None,
    };
    let mut rng = Rng::new(o.seed);
    let mut ids: Vec<i64> = prompt.to_vec();
    let result = (|| -> Result<Vec<i64>> {
        let mut new = Vec::with_capacity(o.max_new_tokens);
        for _ in 0..o.max_new_tokens {
            let t = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
            let logits = m.run_with_interventions(&t, &t.ones_like(), interventions)?;
            let next = pick(&logits.get(0).get(-1), o, &mut rng)?;
            ids.push(next);
            new.push(next);
            if o.eos == Some(next) {
                break;
            }
        }
        Ok(new)
    })();
    if let Some(h) = handle {
        m.remove_hook(h);
    }
    result
}
