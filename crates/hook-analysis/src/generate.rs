//! Generation with hooks and a KV cache: greedy or sampled decoding (temperature, top-k, top-p,
//! seeded) of batches of prompts of mixed length, with interventions, a steering vector and an
//! extraction active at the steps [`Apply`] names.
//!
//! A batch is left padded and runs once over its prompts (the prefill), then one token per
//! step: [`HookedModule::step`] runs the archive's cached step graph on the new token with
//! every layer's keys and values of the text so far in a [`KvCache`], so a step costs the same
//! after 1,000 tokens as after 10 plus attention over the cache, instead of a forward over the
//! whole text. Each row stops at its own end-of-sequence token or at the token limit; rows that
//! have stopped are fed `pad` until the batch is done, as transformers' `generate` does.
//! Greedy decoding gives transformers' `generate` (with its own KV cache) token for token
//! (`tests/generate.rs`).
//!
//! Hooks see each step's own tokens, as hooks on a transformers model see each forward of its
//! `generate`: the prompt at the prefill, then `[batch, 1, …]` per new token.

use hook_cache::ActivationCache;
use hook_core::{HookContext, HookIo, TokenGroups};
use hook_torch::{BoxedHook, Extraction, ExtractionConfig, HookedModule, Intervention, KvCache, RunSpec};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};

/// The prefill's default piece, in tokens (rows x columns): the attention scores of a piece
/// after 1,024 prompt tokens are 64 x heads x 1,024 floats (2 MB on an 8-head model; twice that
/// at the softmax), so a long prompt's peak memory is the model and its KV cache. Larger pieces
/// prefill faster (256: about 20 % on the 8-layer bench llama) for more memory.
pub const DEFAULT_MAX_PREFILL_TOKENS: usize = 64;

/// How to pick each new token.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How many tokens to add (per prompt, at most).
    pub max_new_tokens: usize,
    /// 0: greedy (argmax); otherwise the softmax temperature of sampling.
    pub temperature: f64,
    /// Sample among the k most likely tokens only.
    pub top_k: Option<usize>,
    /// Sample among the smallest set of tokens whose probability reaches p (nucleus).
    pub top_p: Option<f64>,
    /// The sampler's seed: the same seed gives the same tokens.
    pub seed: u64,
    /// A row stops after this token.
    pub eos: Option<i64>,
    /// The token that left-pads shorter prompts and follows a row that has stopped (it is
    /// masked, so its value does not matter to the other rows).
    pub pad: i64,
    /// Prompts generated side by side in one batch.
    pub batch_size: usize,
    /// At most this many tokens (rows x columns) per forward of the prefill: a long prompt is
    /// fed in pieces of `max_prefill_tokens / batch` columns, each a cached step after the
    /// ones before it, so the prefill's activations (attention scores are `[batch, heads,
    /// piece, prompt]`) stay small beside the model and its KV cache (default
    /// [`DEFAULT_MAX_PREFILL_TOKENS`]). 0: the
    /// whole prompt at once. The prefill is one piece whatever this says when interventions
    /// apply to it (their positions count in the prompt).
    pub max_prefill_tokens: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 16, temperature: 0.0, top_k: None, top_p: None, seed: 0, eos: None, pad: 0, batch_size: 8, max_prefill_tokens: DEFAULT_MAX_PREFILL_TOKENS }
    }
}

/// At which forwards of a generation an edit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// The prefill (the prompt's tokens) only.
    Prompt,
    /// Every new token's step only (the generated tokens, as they are fed back).
    NewTokens,
    /// The prefill and every step.
    All,
}

impl Apply {
    fn at(self, prefill: bool) -> bool {
        match self {
            Apply::Prompt => prefill,
            Apply::NewTokens => !prefill,
            Apply::All => true,
        }
    }
}

/// A vector added to a layer's output residual (`resid_out`) at every position of the forwards
/// `at` names.
#[derive(Debug)]
pub struct Steering {
    /// The layer whose output is steered.
    pub layer: usize,
    /// `[d_model]` (e.g. a difference of cached means).
    pub vector: Tensor,
    /// Multiplies the vector.
    pub scale: f64,
    /// Where it is added ([`Apply::NewTokens`], `hookrs generate`'s default, leaves the prompt
    /// alone: the first new token is then read at the unsteered prompt).
    pub at: Apply,
}

/// What is active while generating besides the model. The default: nothing (and interventions,
/// when given, at every forward).
#[derive(Debug)]
pub struct Edits<'a> {
    /// Interventions, at the forwards `interventions_at` names. Their positions count in each
    /// forward's tokens: the prompt's at the prefill, the one new token's (`0` or `-1`) at a
    /// step.
    pub interventions: &'a [Intervention],
    /// Where the interventions apply (default: [`Apply::All`]).
    pub interventions_at: Apply,
    /// A steering vector.
    pub steering: Option<&'a Steering>,
    /// An extraction of the activations that produced each new token: at the prefill, the
    /// prompt's last position; at each later step, the fed-back token. One cache per new
    /// token, in easyroutine's layout (batch first, one token).
    pub extraction: Option<&'a ExtractionConfig>,
}

impl Default for Edits<'_> {
    fn default() -> Self {
        Edits { interventions: &[], interventions_at: Apply::All, steering: None, extraction: None }
    }
}

/// What [`generate`] returns.
#[derive(Debug, Default)]
pub struct Generation {
    /// The new tokens of each prompt, in order, up to and including its end-of-sequence token.
    pub tokens: Vec<Vec<i64>>,
    /// With an extraction: for each batch, one cache per step (the batch's rows in order; a
    /// row that has stopped keeps going with `pad`, so its later entries are not its text's).
    pub caches: Vec<Vec<ActivationCache>>,
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

/// Checks the options and the steering vector before anything runs.
fn check(m: &HookedModule, prompts: &[Vec<i64>], o: &GenerateOptions, edits: &Edits<'_>) -> Result<()> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(AnalysisError::Input(format!("prompt {i} is empty: every prompt needs at least one token")));
    }
    if !(o.temperature >= 0.0) || o.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) || o.top_k == Some(0) {
        return Err(AnalysisError::Input("temperature must be >= 0 (0: greedy), top_p in (0, 1], top_k at least 1".into()));
    }
    if o.batch_size == 0 {
        return Err(AnalysisError::Input("batch_size must be at least 1".into()));
    }
    let d = m.require_description()?;
    let vocab = d.vocab_size as i64;
    for (what, t) in [("the pad token", Some(o.pad)), ("the eos token", o.eos)] {
        if let Some(t) = t.filter(|&t| t < 0 || t >= vocab) {
            return Err(AnalysisError::Input(format!("{what} {t} is out of the vocabulary: valid ids are 0..{vocab}")));
        }
    }
    if let Some(s) = edits.steering {
        if s.layer >= d.num_hidden_layers {
            return Err(AnalysisError::Input(format!("steering layer {} is out of range: the model has layers 0..{}", s.layer, d.num_hidden_layers)));
        }
        if s.vector.size() != [d.hidden_size as i64] {
            return Err(AnalysisError::Input(format!("the steering vector has shape {:?}; the residual stream needs [{}]", s.vector.size(), d.hidden_size)));
        }
    }
    Ok(())
}

/// The steering vector where it is added: its site and `scale * vector` on the model's device
/// (the hook casts it to the dtype of the activation it edits).
struct Steer {
    at: Apply,
    component: String,
    vector: Tensor,
}

impl Steer {
    fn new(m: &HookedModule, s: &Steering) -> Result<Steer> {
        let component = m.require_description()?.component("residual_stream_hook_name", s.layer)?;
        let vector = (&s.vector * s.scale).f_to_device(m.device())?;
        Ok(Steer { at: s.at, component, vector })
    }

    /// A hook adding the vector to every position.
    fn hook(&self) -> (String, BoxedHook) {
        let v = self.vector.shallow_clone();
        (self.component.clone(), Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
            let x = io.main_tensor()?;
            Ok(Some(x + v.to_kind(x.kind())))
        }))
    }
}

/// Generates after each prompt (token ids), `o.batch_size` prompts at a time; returns the new
/// tokens of each. `edits` are active where they say; nothing stays attached afterwards.
/// `progress` is called with the number of prompts finished after each batch.
///
/// ```no_run
/// use hook_analysis::{generate, Edits, GenerateOptions};
/// let mut m = hook_torch::HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
/// let prompts = vec![vec![5i64, 9, 12], vec![7, 3]];
/// let out = generate(&mut m, &prompts, &GenerateOptions { max_new_tokens: 8, ..Default::default() }, &Edits::default(), &mut |_| {}).unwrap();
/// assert_eq!(out.tokens.len(), 2);
/// ```
pub fn generate(m: &mut HookedModule, prompts: &[Vec<i64>], o: &GenerateOptions, edits: &Edits<'_>, progress: &mut dyn FnMut(usize)) -> Result<Generation> {
    check(m, prompts, o, edits)?;
    let mut rng = Rng::new(o.seed);
    let mut out = Generation::default();
    for chunk in prompts.chunks(o.batch_size) {
        let (tokens, caches) = generate_batch(m, chunk, o, edits, &mut rng)?;
        out.tokens.extend(tokens);
        if edits.extraction.is_some() {
            out.caches.push(caches);
        }
        progress(out.tokens.len());
    }
    Ok(out)
}

/// One batch: the prefill (in pieces of at most `o.max_prefill_tokens` tokens), then a step per
/// new token.
fn generate_batch(m: &mut HookedModule, prompts: &[Vec<i64>], o: &GenerateOptions, edits: &Edits<'_>, rng: &mut Rng) -> Result<(Vec<Vec<i64>>, Vec<ActivationCache>)> {
    let device = m.device();
    let b = prompts.len();
    if o.max_new_tokens == 0 {
        return Ok((vec![Vec::new(); b], Vec::new()));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * longest);
    let mut mask = Vec::with_capacity(b * longest);
    for p in prompts {
        ids.extend(std::iter::repeat_n(o.pad, longest - p.len()).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, longest - p.len()).chain(std::iter::repeat_n(1, p.len())));
    }
    let shape = [b as i64, longest as i64];
    let prompt = Tensor::from_slice(&ids).view(shape).to_device(device);
    let mut mask = Tensor::from_slice(&mask).view(shape).to_device(device);
    let mut cache = KvCache::new(m, b, longest + o.max_new_tokens)?;
    let steer = edits.steering.map(|s| Steer::new(m, s)).transpose()?;
    let last: TokenGroups = "[[-1]]".parse().map_err(|e: hook_core::CoreError| AnalysisError::Input(e.to_string()))?;
    let forward = |m: &mut HookedModule, cache: &mut KvCache, input: &Tensor, mask: &Tensor, prefill: bool, extract: bool| {
        let mut hooks: Vec<(String, BoxedHook)> = Vec::new();
        if let Some(s) = steer.as_ref().filter(|s| s.at.at(prefill)) {
            hooks.push(s.hook());
        }
        let spec = RunSpec {
            hooks,
            interventions: if edits.interventions_at.at(prefill) { edits.interventions } else { &[] },
            extraction: edits.extraction.filter(|_| extract).map(|c| Extraction::new(&last, c)),
            ..RunSpec::default()
        };
        m.step(input, mask, cache, spec)
    };
    let whole = !edits.interventions.is_empty() && edits.interventions_at.at(true);
    let piece = if whole || o.max_prefill_tokens == 0 { longest } else { (o.max_prefill_tokens / b).clamp(1, longest) };
    let mut lo = 0;
    let mut out = loop {
        let n = piece.min(longest - lo);
        let run = forward(m, &mut cache, &prompt.narrow(1, lo as i64, n as i64), &mask.narrow(1, 0, (lo + n) as i64), true, lo + n == longest)?;
        lo += n;
        if lo == longest {
            break run;
        }
    };
    let mut caches = Vec::new();
    let mut new: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    loop {
        if edits.extraction.is_some() {
            caches.push(out.cache);
        }
        let logits = out.logits.ok_or_else(|| AnalysisError::Input("the step returned no logits".into()))?.select(1, -1);
        let mut next = Vec::with_capacity(b);
        for (row, d) in done.iter_mut().enumerate() {
            if *d {
                next.push(o.pad);
                continue;
            }
            let t = pick(&logits.get(row as i64), o, rng)?;
            new[row].push(t);
            *d = o.eos == Some(t) || new[row].len() >= o.max_new_tokens;
            next.push(t);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let input = Tensor::from_slice(&next).view([b as i64, 1]).to_device(device);
        mask = Tensor::cat(&[mask, Tensor::ones([b as i64, 1], (Kind::Int64, device))], 1);
        out = forward(m, &mut cache, &input, &mask, false, true)?;
    }
    Ok((new, caches))
}
