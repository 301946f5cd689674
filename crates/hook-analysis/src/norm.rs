//! [`FinalNorm`]: a model's final norm applied to any residual with *frozen* statistics — the
//! mean, variance and second moment cached at extraction (`extract_last_layernorm`), as
//! easyroutine's `LogitLens.apply_layernorm` and TransformerLens (`apply_ln_to_stack`) do.

use hook_cache::{ActivationCache, CacheValue};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};

/// RMSNorm or LayerNorm (the description's `layernorm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `x / sqrt(E[x²] + eps) * w` (Gemma: `* (1 + w)`).
    Rms,
    /// `(x - mean) / sqrt(var + eps) * w + b`.
    LayerNorm,
}

/// The final norm's parameters.
#[derive(Debug)]
pub struct FinalNorm {
    /// RMS or LayerNorm.
    pub kind: NormKind,
    /// `[d_model]`.
    pub weight: Tensor,
    /// `[d_model]`, LayerNorm only.
    pub bias: Option<Tensor>,
    /// Epsilon.
    pub eps: f64,
    /// Added to the weight before scaling (1 for Gemma's RMSNorm, else 0).
    pub weight_offset: f64,
}

/// The statistics cached for the final norm's input (`cache["last_layernorm"]`), each
/// `[batch, positions]`.
#[derive(Debug)]
pub struct NormStats {
    /// Mean over the hidden dimension.
    pub mean: Tensor,
    /// Variance over the hidden dimension.
    pub variance: Tensor,
    /// Mean of squares over the hidden dimension.
    pub second_moment: Tensor,
}

impl NormStats {
    /// The `last_layernorm` entry of a cache (extracted with `extract_last_layernorm`).
    pub fn from_cache(cache: &ActivationCache) -> Result<Self> {
        let missing = || AnalysisError::Cache("has no `last_layernorm` entry: extract it (extract_last_layernorm / --extract last_layernorm) to apply the final norm".into());
        let CacheValue::Map(m) = cache.get("last_layernorm").ok_or_else(missing)?.inner() else {
            return Err(AnalysisError::Cache("entry `last_layernorm` is not a map of mean, variance and second_moment".into()));
        };
        let get = |name: &str| -> Result<Tensor> {
            match m.get(name).map(CacheValue::inner) {
                Some(CacheValue::Tensor(t)) => Ok(t.shallow_clone()),
                _ => Err(AnalysisError::Cache(format!("entry `last_layernorm` has no `{name}` tensor"))),
            }
        };
        Ok(NormStats { mean: get("mean")?, variance: get("variance")?, second_moment: get("second_moment")? })
    }

    /// Example `i` only (`[1, positions]`... kept as `[positions]`).
    pub fn row(&self, i: i64) -> Result<NormStats> {
        Ok(NormStats { mean: self.mean.f_get(i)?, variance: self.variance.f_get(i)?, second_moment: self.second_moment.f_get(i)? })
    }
}

impl FinalNorm {
    /// `act` (`[..., positions, d]`) normalized with the frozen statistics (`[..., positions]`).
    /// RMS: computed in float32, cast back to `act`'s dtype, then scaled by the weight (as
    /// easyroutine and HF's RMSNorm do). LayerNorm: in float32, plus the bias — divided by the
    /// number of heads for a per-head contribution (`per_head_bias_share`), so the heads of a
    /// layer sum to one bias.
    ///
    /// ```
    /// use hook_analysis::{FinalNorm, NormKind, NormStats};
    /// use tch::{Device, Kind, Tensor};
    /// let norm = FinalNorm { kind: NormKind::Rms, weight: Tensor::ones([2], (Kind::Float, Device::Cpu)), bias: None, eps: 0.0, weight_offset: 0.0 };
    /// let x = Tensor::from_slice(&[3.0f32, 4.0]).view([1, 1, 2]);
    /// let ms = (x.square().mean_dim(-1, false, Kind::Float)).view([1, 1]);
    /// let stats = NormStats { mean: ms.zeros_like(), variance: ms.zeros_like(), second_moment: ms };
    /// let y = norm.apply(&x, &stats, None).unwrap();
    /// let want = Tensor::from_slice(&[3.0f32, 4.0]).view([1, 1, 2]) / 12.5f64.sqrt();
    /// assert!(y.allclose(&want, 1e-6, 1e-6, false));
    /// ```
    pub fn apply(&self, act: &Tensor, stats: &NormStats, per_head_bias_share: Option<i64>) -> Result<Tensor> {
        let input_kind = act.kind();
        let x = act.f_to_kind(Kind::Float)?;
        let stat_shape = &act.size()[..act.dim().saturating_sub(1)];
        for (name, s) in [("mean", &stats.mean), ("variance", &stats.variance), ("second_moment", &stats.second_moment)] {
            if s.size() != stat_shape {
                return Err(AnalysisError::Input(format!(
                    "last_layernorm {name} has shape {:?}; the activation {:?} needs {stat_shape:?} (extract both at the same token positions)",
                    s.size(),
                    act.size()
                )));
            }
        }
        let weight = self.weight.f_to_device(act.device())?;
        let weight = if self.weight_offset != 0.0 { weight.f_to_kind(Kind::Float)? + self.weight_offset } else { weight };
        Ok(match self.kind {
            NormKind::Rms => {
                let x = x * (stats.second_moment.f_to_kind(Kind::Float)?.f_unsqueeze(-1)? + self.eps).f_rsqrt()?;
                weight * x.f_to_kind(input_kind)?
            }
            NormKind::LayerNorm => {
                let mean = stats.mean.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
                let var = stats.variance.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
                let x = (x - mean) / (var + self.eps).f_sqrt()?;
                let y = weight * x;
                match &self.bias {
                    Some(b) => {
                        let b = b.f_to_device(act.device())?;
                        match per_head_bias_share {
                            Some(h) => y + b / h as f64,
                            None => y + b,
                        }
                    }
                    None => y,
                }
            }
        })
    }
}
