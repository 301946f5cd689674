//! Statistics: `compute_statistics` and the layernorm statistics of `layernom_hook`.

use hook_core::TokenGroups;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::select::{self, norm_dim};

/// Mean, variance (`E[x²] − E[x]²`) and second moment along a dimension.
#[derive(Debug)]
pub struct Statistics {
    /// `E[x]`.
    pub mean: Tensor,
    /// `E[x²] − E[x]²` (easyroutine's formula, not the two-pass one).
    pub variance: Tensor,
    /// `E[x²]`.
    pub second_moment: Tensor,
}

impl Statistics {
    /// The three statistics under easyroutine's names, in its order.
    pub fn into_named(self) -> [(&'static str, Tensor); 3] {
        [("mean", self.mean), ("variance", self.variance), ("second_moment", self.second_moment)]
    }
}

/// `compute_statistics(tensor, dim, keepdim)`: like easyroutine, the result is squeezed on the
/// last axis (so with `keepdim` and `dim = -1` the reduced axis is dropped).
///
/// ```
/// use tch::Tensor;
/// let t = Tensor::from_slice(&[1.0f32, 3.0]).view([1, 2]);
/// let s = hook_ops::stats::compute_statistics(&t, -1, true).unwrap();
/// assert_eq!(s.mean.double_value(&[0]), 2.0);
/// assert_eq!(s.variance.double_value(&[0]), 1.0);
/// assert_eq!(s.second_moment.double_value(&[0]), 5.0);
/// ```
pub fn compute_statistics(t: &Tensor, dim: i64, keepdim: bool) -> Result<Statistics> {
    let d = norm_dim(dim, t.dim(), "dim")?;
    let dims = [d];
    // half precision accumulates in float32 (E[x^2] - E[x]^2 cancels badly in bfloat16); the
    // results come back in the activations' dtype
    let half = matches!(t.kind(), Kind::Half | Kind::BFloat16);
    let x = if half { t.f_to_kind(Kind::Float)? } else { t.shallow_clone() };
    let mean = x.f_mean_dim(Some(&dims[..]), keepdim, None::<Kind>)?;
    let second_moment = x.f_pow_tensor_scalar(2)?.f_mean_dim(Some(&dims[..]), keepdim, None::<Kind>)?;
    let variance = second_moment.f_sub(&mean.f_pow_tensor_scalar(2)?)?;
    let back = |x: Tensor| -> Result<Tensor> { Ok(if half { x.f_to_kind(t.kind())? } else { x }) };
    let (mean, second_moment, variance) = (back(mean)?, back(second_moment)?, back(variance)?);
    let squeeze = |x: Tensor| -> Result<Tensor> {
        // torch's squeeze(-1) is a no-op when the last axis is not of size 1.
        if x.dim() > 0 && x.size()[x.dim() - 1] == 1 {
            Ok(x.f_squeeze_dim(-1)?)
        } else {
            Ok(x)
        }
    };
    Ok(Statistics { mean: squeeze(mean)?, variance: squeeze(variance)?, second_moment: squeeze(second_moment)? })
}

/// `layernom_hook`: statistics over the hidden axis of the selected tokens of `b`
/// (`[batch, seq, d_model]`), each of shape `[batch, tokens]`.
///
/// With `avg = false` one set for the flattened positions. With `avg = true` one set per group
/// (easyroutine computes those and then overwrites them with the flattened set: a bug, listed
/// in docs/parity.md).
///
/// ```
/// use tch::Tensor;
/// let b = Tensor::randn([2, 5, 8], (tch::Kind::Float, tch::Device::Cpu));
/// let g = "[(0,1),(4,)]".parse().unwrap();
/// let flat = hook_ops::stats::layernorm_statistics(&b, &g, false).unwrap();
/// assert_eq!(flat.len(), 1);
/// assert_eq!(flat[0].mean.size(), vec![2, 3]);
/// let per_group = hook_ops::stats::layernorm_statistics(&b, &g, true).unwrap();
/// assert_eq!(per_group[1].variance.size(), vec![2, 1]);
/// ```
pub fn layernorm_statistics(b: &Tensor, groups: &TokenGroups, avg: bool) -> Result<Vec<Statistics>> {
    let r = select::resolve(b, -2, groups)?;
    if avg {
        r.groups()
            .iter()
            .map(|g| {
                let sel = b.f_index_select(-2, &select::index_tensor(g, b.device()))?;
                compute_statistics(&sel, -1, true)
            })
            .collect()
    } else {
        Ok(vec![compute_statistics(&select::flatten_resolved(b, -2, &r)?, -1, true)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn bfloat16_statistics_accumulate_in_float32() {
        // a large mean and a small spread: E[x^2] - E[x]^2 in bfloat16 would be all rounding
        let x = (Tensor::randn([4, 256], (Kind::Float, Device::Cpu)) * 0.5 + 10.0).to_kind(Kind::BFloat16);
        let s = compute_statistics(&x, -1, true).unwrap();
        assert_eq!(s.variance.kind(), Kind::BFloat16);
        let want = compute_statistics(&x.to_kind(Kind::Float), -1, true).unwrap().variance;
        let rel = ((s.variance.to_kind(Kind::Float) - &want).abs() / &want).max().double_value(&[]);
        assert!(rel < 1e-2, "relative error {rel}");
    }
}
