//! [`LogitLens`]: easyroutine's `LogitLens.compute` — read intermediate residuals (or head
//! contributions) as logits through the model's final norm (with the statistics cached at
//! extraction) and its unembedding.
//!
//! Semantics follow `easyroutine/interpretability/tools/logit_lens.py` (1.1.5):
//! - keys: a literal key, or a pattern with placeholders (`resid_out_{i}`,
//!   `head_out_L{i}H{j}`) matched against the cache and sorted by their numbers;
//! - results are keyed `logit_lens_{key}`;
//! - without directions: logits `[batch, positions, vocab]` (`apply_softmax`: probabilities);
//! - with directions (a token, or a pair `(a, b)` for `unembed[a] - unembed[b]`, one per
//!   example), [`Metric::LogitDiff`]: `[batch, positions]` float32; [`Metric::Accuracy`]: the
//!   fraction of examples whose first token beats the second, a float32 scalar.
//!
//! Where hookrs differs from easyroutine (see docs/analysis.md): LayerNorm adds its bias once
//! per hidden unit (easyroutine's `bias.unsqueeze(-1)` broadcasts it into a `[d, d]` matrix
//! and fails on most shapes); Gemma's RMSNorm scales by `1 + weight` (easyroutine uses
//! `weight`); accuracy over several positions counts every (example, position) (easyroutine
//! compares tensors with `>` and fails).

use hook_cache::ActivationCache;
use hook_torch::HookedModule;
use indexmap::IndexMap;
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::norm::{FinalNorm, NormKind, NormStats};

/// A logit direction: one token's unembedding, or the difference of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `unembed[t]`.
    Token(i64),
    /// `unembed[a] - unembed[b]`.
    Diff(i64, i64),
}

/// What to compute along the directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// The activation's logit along each example's direction.
    LogitDiff,
    /// The fraction of (example, position) pairs whose first token's logit beats the second's.
    Accuracy,
}

/// The logit lens of a model: its unembedding and final norm.
#[derive(Debug)]
pub struct LogitLens {
    /// `[vocab, d_model]` (the LM head's weight).
    pub unembed: Tensor,
    /// The final norm.
    pub norm: FinalNorm,
    /// Attention heads (a head's share of the LayerNorm bias).
    pub num_heads: i64,
}

impl LogitLens {
    /// The lens of a loaded model: its LM head weight and final norm, named by the
    /// description (`unembed_matrix`, `last_layernorm`, `layernorm_type`, `layernorm_eps`,
    /// `norm_weight_offset`).
    pub fn from_model(m: &HookedModule) -> Result<Self> {
        let d = m.require_description()?;
        let template = |name: &str| {
            d.templates.get(name).cloned().ok_or_else(|| AnalysisError::Input(format!("the model description has no `{name}` template: re-export the model")))
        };
        let param = |name: &str| {
            m.parameter(name).map(Tensor::shallow_clone).ok_or_else(|| AnalysisError::Input(format!("the model has no parameter `{name}` (from its description)")))
        };
        let unembed = param(&template("unembed_matrix")?)?;
        let norm_path = template("last_layernorm")?;
        let kind = match d.layernorm_type.as_str() {
            "RMS" => NormKind::Rms,
            "LayerNorm" => NormKind::LayerNorm,
            other => return Err(AnalysisError::Input(format!("layernorm_type {other:?}: expected RMS or LayerNorm"))),
        };
        let norm = FinalNorm {
            kind,
            weight: param(&format!("{norm_path}.weight"))?,
            bias: m.parameter(&format!("{norm_path}.bias")).map(Tensor::shallow_clone),
            eps: d.layernorm_eps,
            weight_offset: d.norm_weight_offset,
        };
        Ok(LogitLens { unembed, norm, num_heads: d.num_attention_heads as i64 })
    }

    /// The cache keys a pattern names, sorted by their numbers (`resid_out_{i}` →
    /// `resid_out_0, resid_out_1, …, resid_out_10`); a key without placeholders must exist.
    ///
    /// ```
    /// use hook_cache::ActivationCache;
    /// let mut c = ActivationCache::new();
    /// for k in ["resid_out_10", "resid_out_2", "resid_in_0"] {
    ///     c.insert(k, tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)));
    /// }
    /// assert_eq!(hook_analysis::LogitLens::keys(&c, "resid_out_{i}").unwrap(), ["resid_out_2", "resid_out_10"]);
    /// ```
    pub fn keys(cache: &ActivationCache, pattern: &str) -> Result<Vec<String>> {
        if !pattern.contains('{') {
            return if cache.contains(pattern) {
                Ok(vec![pattern.to_string()])
            } else {
                Err(AnalysisError::Cache(format!("has no key `{pattern}`")))
            };
        }
        // literal pieces between placeholders; each placeholder matches one or more digits
        let mut pieces = Vec::new();
        let mut rest = pattern;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').map(|c| open + c).ok_or_else(|| AnalysisError::Input(format!("key pattern `{pattern}`: unclosed `{{`")))?;
            pieces.push(&rest[..open]);
            rest = &rest[close + 1..];
        }
        pieces.push(rest);
        let matches = |k: &str| -> Option<Vec<u64>> {
            let mut s = k.strip_prefix(pieces[0])?;
            let mut numbers = Vec::new();
            for piece in &pieces[1..] {
                let digits = s.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return None;
                }
                numbers.push(s[..digits].parse().ok()?);
                s = s[digits..].strip_prefix(piece)?;
            }
            s.is_empty().then_some(numbers)
        };
        let mut found: Vec<(Vec<u64>, String)> = cache.keys().filter_map(|k| matches(k).map(|n| (n, k.to_string()))).collect();
        if found.is_empty() {
            return Err(AnalysisError::Cache(format!("has no key matching `{pattern}`")));
        }
        found.sort();
        Ok(found.into_iter().map(|(_, k)| k).collect())
    }

    /// The direction's vector in the unembedding (`[d_model]`); an error for a token id out of
    /// the vocabulary.
    pub fn direction_vector(&self, d: Direction) -> Result<Tensor> {
        self.direction(d)
    }

    fn direction(&self, d: Direction) -> Result<Tensor> {
        let vocab = self.unembed.size()[0];
        let row = |t: i64| {
            if t < 0 || t >= vocab {
                return Err(AnalysisError::Input(format!("token id {t} is out of the vocabulary: valid ids are 0..{vocab}")));
            }
            Ok(self.unembed.f_get(t)?)
        };
        Ok(match d {
            Direction::Token(t) => row(t)?,
            Direction::Diff(a, b) => row(a)? - row(b)?,
        })
    }

    /// easyroutine's `LogitLens.compute(activations, target_key, token_directions, apply_norm,
    /// apply_softmax, metric)`: see the [module documentation](self).
    pub fn compute(
        &self,
        cache: &ActivationCache,
        target_key: &str,
        directions: Option<&[Direction]>,
        apply_norm: bool,
        apply_softmax: bool,
        metric: Metric,
    ) -> Result<IndexMap<String, Tensor>> {
        let stats = if apply_norm { Some(NormStats::from_cache(cache)?) } else { None };
        let mut out = IndexMap::new();
        for key in Self::keys(cache, target_key)? {
            let act = cache.tensor(&key).map_err(|e| AnalysisError::Cache(e.to_string()))?;
            if act.dim() != 3 {
                return Err(AnalysisError::Input(format!("`{key}` has shape {:?}: the logit lens reads [batch, positions, d_model] entries", act.size())));
            }
            let per_head = key.contains("head").then_some(self.num_heads);
            let norm = |x: &Tensor, s: Option<&NormStats>| -> Result<Tensor> {
                match s {
                    Some(s) => self.norm.apply(x, s, per_head),
                    None => Ok(x.shallow_clone()),
                }
            };
            let unembed = self.unembed.f_to_device(act.device())?;
            let value = match directions {
                None => {
                    let x = norm(act, stats.as_ref())?;
                    let logits = x.f_matmul(&unembed.f_to_kind(x.kind())?.f_transpose(0, 1)?)?;
                    if apply_softmax {
                        logits.f_softmax(-1, logits.kind())?
                    } else {
                        logits
                    }
                }
                Some(dirs) => {
                    let (batch, positions) = (act.size()[0], act.size()[1]);
                    if dirs.len() as i64 != batch {
                        return Err(AnalysisError::Input(format!("{} token directions for a batch of {batch}: give one per example", dirs.len())));
                    }
                    let mut rows = Vec::with_capacity(dirs.len());
                    let mut wins = 0i64;
                    for (i, d) in dirs.iter().enumerate() {
                        let s = stats.as_ref().map(|s| s.row(i as i64)).transpose()?;
                        let x = norm(&act.f_get(i as i64)?, s.as_ref())?;
                        match (metric, d) {
                            (Metric::LogitDiff, _) => {
                                let v = self.direction(*d)?.f_to_device(x.device())?.f_to_kind(x.kind())?;
                                rows.push(x.f_matmul(&v)?.f_to_kind(Kind::Float)?);
                            }
                            (Metric::Accuracy, Direction::Diff(a, b)) => {
                                let a = x.f_matmul(&self.direction(Direction::Token(*a))?.f_to_device(x.device())?.f_to_kind(x.kind())?)?;
                                let b = x.f_matmul(&self.direction(Direction::Token(*b))?.f_to_device(x.device())?.f_to_kind(x.kind())?)?;
                                wins += a.f_gt_tensor(&b)?.f_sum(Kind::Int64)?.int64_value(&[]);
                            }
                            (Metric::Accuracy, Direction::Token(_)) => {
                                return Err(AnalysisError::Input("the accuracy metric compares two tokens: give (answer, wrong) pairs".into()));
                            }
                        }
                    }
                    match metric {
                        Metric::LogitDiff => Tensor::f_stack(&rows, 0)?,
                        Metric::Accuracy => Tensor::from(wins as f32 / (batch * positions) as f32),
                    }
                }
            };
            out.insert(format!("logit_lens_{key}"), value);
        }
        Ok(out)
    }
}
