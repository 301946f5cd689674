//! Token-group selection, the step every extraction hook shares: take the positions of every
//! group in order (*flatten*, `avg=False`) or one mean row per group (`avg=True`,
//! `torch.mean(slice, dim, keepdim=True)` concatenated).
//!
//! Both copy only the selected rows (`index_select`), never the whole activation.

use hook_core::{ResolvedGroups, TokenGroups};
use tch::{Device, Kind, Tensor};

use crate::error::{out_of_range, Result};

/// Normalises a possibly negative `dim` of a tensor with `ndim` dimensions.
pub(crate) fn norm_dim(dim: i64, ndim: usize, arg: &'static str) -> Result<i64> {
    let n = ndim as i64;
    let d = if dim < 0 { dim + n } else { dim };
    if d < 0 || d >= n {
        return Err(out_of_range(arg, dim, format!("-{n}..{n} for a tensor with {n} dimensions")));
    }
    Ok(d)
}

/// A 1-D int64 index tensor on `device`.
pub(crate) fn index_tensor(ix: &[usize], device: Device) -> Tensor {
    let v: Vec<i64> = ix.iter().map(|&i| i as i64).collect();
    Tensor::from_slice(&v).to_device(device)
}

/// Resolves `groups` against the length of `t` along `dim`.
///
/// ```
/// use hook_core::TokenGroups;
/// use tch::Tensor;
/// let t = Tensor::zeros([1, 5, 2], (tch::Kind::Float, tch::Device::Cpu));
/// let g: TokenGroups = "[(-1,)]".parse().unwrap();
/// assert_eq!(hook_ops::select::resolve(&t, 1, &g).unwrap().flatten(), vec![4]);
/// ```
pub fn resolve(t: &Tensor, dim: i64, groups: &TokenGroups) -> Result<ResolvedGroups> {
    let d = norm_dim(dim, t.dim(), "dim")?;
    Ok(groups.resolve(t.size()[d as usize] as usize)?)
}

/// The positions of every group, in order, along `dim` (`b[..., flatten_indexes, :]`).
///
/// ```
/// use hook_core::TokenGroups;
/// use tch::Tensor;
/// let t = Tensor::arange(6, (tch::Kind::Float, tch::Device::Cpu)).view([1, 6, 1]);
/// let g: TokenGroups = "[(1,3),(4,)]".parse().unwrap();
/// let s = hook_ops::select::flatten(&t, 1, &g).unwrap();
/// assert_eq!(Vec::<f32>::try_from(s.flatten(0, -1)).unwrap(), vec![1.0, 3.0, 4.0]);
/// ```
pub fn flatten(t: &Tensor, dim: i64, groups: &TokenGroups) -> Result<Tensor> {
    let r = resolve(t, dim, groups)?;
    flatten_resolved(t, dim, &r)
}

/// [`flatten`] with groups already resolved against `t`.
pub fn flatten_resolved(t: &Tensor, dim: i64, groups: &ResolvedGroups) -> Result<Tensor> {
    let d = norm_dim(dim, t.dim(), "dim")?;
    take(t, d, &groups.flatten())
}

/// A fresh copy of `t` at positions `ix` along `d`. A run of consecutive positions (the common
/// `all tokens` / `last k tokens` case) is a strided copy, several times faster than the
/// gather of `index_select`.
pub(crate) fn take(t: &Tensor, d: i64, ix: &[usize]) -> Result<Tensor> {
    let run = !ix.is_empty() && ix.windows(2).all(|w| w[1] == w[0] + 1);
    if run {
        let part = t.f_narrow(d, ix[0] as i64, ix.len() as i64)?;
        let mut out = part.f_empty_like()?;
        out.f_copy_(&part)?;
        return Ok(out);
    }
    Ok(t.f_index_select(d, &index_tensor(ix, t.device()))?)
}

/// One mean per group along `dim`, the group axis kept in place of the token axis.
///
/// ```
/// use hook_core::TokenGroups;
/// use tch::Tensor;
/// let t = Tensor::arange(6, (tch::Kind::Float, tch::Device::Cpu)).view([1, 6, 1]);
/// let g: TokenGroups = "[(1,3),(4,)]".parse().unwrap();
/// let s = hook_ops::select::group_mean(&t, 1, &g).unwrap();
/// assert_eq!(s.size(), vec![1, 2, 1]);
/// assert_eq!(Vec::<f32>::try_from(s.flatten(0, -1)).unwrap(), vec![2.0, 4.0]);
/// ```
pub fn group_mean(t: &Tensor, dim: i64, groups: &TokenGroups) -> Result<Tensor> {
    let r = resolve(t, dim, groups)?;
    group_mean_resolved(t, dim, &r)
}

/// [`group_mean`] with groups already resolved against `t`.
pub fn group_mean_resolved(t: &Tensor, dim: i64, groups: &ResolvedGroups) -> Result<Tensor> {
    let d = norm_dim(dim, t.dim(), "dim")?;
    let dev = t.device();
    if groups.len() == 1 {
        let sel = t.f_index_select(d, &index_tensor(&groups.groups()[0], dev))?;
        return Ok(sel.f_mean_dim(Some(&[d][..]), true, None::<Kind>)?);
    }
    // Segment mean: gather every selected row once, sum rows into their group, divide.
    let sel = t.f_index_select(d, &index_tensor(&groups.flatten(), dev))?;
    let mut shape = t.size();
    shape[d as usize] = groups.len() as i64;
    let sums = Tensor::f_zeros(&shape, (sel.kind(), dev))?.f_index_add(d, &index_tensor(&groups.group_ids(), dev), &sel)?;
    let mut count_shape = vec![1i64; t.dim()];
    count_shape[d as usize] = groups.len() as i64;
    let sizes: Vec<f64> = groups.sizes().iter().map(|&s| s as f64).collect();
    let counts = Tensor::from_slice(&sizes).to_kind(sel.kind()).to_device(dev).view(count_shape.as_slice());
    Ok(sums.f_div(&counts)?)
}

/// `avg ? group_mean : flatten`, the choice every easyroutine extraction hook makes.
///
/// ```
/// use hook_core::TokenGroups;
/// use tch::Tensor;
/// let t = Tensor::ones([2, 4, 3], (tch::Kind::Float, tch::Device::Cpu));
/// let g: TokenGroups = "[(0,1),(2,3)]".parse().unwrap();
/// assert_eq!(hook_ops::select::tokens(&t, -2, &g, false).unwrap().size(), vec![2, 4, 3]);
/// assert_eq!(hook_ops::select::tokens(&t, -2, &g, true).unwrap().size(), vec![2, 2, 3]);
/// ```
pub fn tokens(t: &Tensor, dim: i64, groups: &TokenGroups, avg: bool) -> Result<Tensor> {
    if avg {
        group_mean(t, dim, groups)
    } else {
        flatten(t, dim, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpsError;
    use hook_core::CoreError;

    fn seq(b: i64, s: i64, d: i64) -> Tensor {
        Tensor::arange(b * s * d, (Kind::Float, Device::Cpu)).view([b, s, d])
    }

    #[test]
    fn group_mean_matches_per_group_loop() {
        let t = Tensor::randn([3, 9, 5], (Kind::Float, Device::Cpu));
        let g: TokenGroups = "[(0,4,8),(2,),(1,1,3)]".parse().unwrap();
        let got = group_mean(&t, 1, &g).unwrap();
        let want = Tensor::cat(
            &g.groups()
                .iter()
                .map(|grp| {
                    let ix: Vec<i64> = grp.clone();
                    t.index_select(1, &Tensor::from_slice(&ix)).mean_dim(Some(&[1i64][..]), true, None::<Kind>)
                })
                .collect::<Vec<_>>(),
            1,
        );
        assert!(got.allclose(&want, 1e-6, 1e-6, false));
    }

    #[test]
    fn flatten_is_a_copy_not_a_view() {
        let t = seq(1, 4, 2);
        let s = flatten(&t, 1, &"[(0,1)]".parse().unwrap()).unwrap();
        let _ = t.shallow_clone().fill_(7.0);
        assert_eq!(s.double_value(&[0, 0, 0]), 0.0);
    }

    #[test]
    fn errors_name_the_position() {
        let t = seq(1, 4, 2);
        let e = flatten(&t, 1, &"[(0,4)]".parse().unwrap()).unwrap_err();
        assert!(matches!(e, OpsError::Core(CoreError::TokenOutOfRange { position: 4, seq_len: 4, .. })));
        let e = flatten(&t, 3, &"[(0,)]".parse().unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "dim = 3 is out of range: valid is -3..3 for a tensor with 3 dimensions");
    }
}
