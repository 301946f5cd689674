//! Residual-stream extraction: `save_resid_hook`, `input_embedding_hook`, `embed_hook` and
//! `avg_hook`. Activations are `[batch, seq, d_model]`.

use hook_core::TokenGroups;
use tch::{Kind, Tensor};

use crate::error::{out_of_range, OpsError, Result};
use crate::select;

/// Info string easyroutine stores with averaged residual activations.
pub const AVG_INFO: &str = "Shape: batch avg_over_target_token_position, d_model";

/// `save_resid_hook` (and `input_embedding_hook` without gradients): the selected tokens of
/// `b` along the sequence axis (-2), flattened or one mean per group.
///
/// ```
/// use tch::Tensor;
/// let b = Tensor::randn([1, 6, 4], (tch::Kind::Float, tch::Device::Cpu));
/// let out = hook_ops::resid::resid(&b, &"[(0,1),(5,)]".parse().unwrap(), true).unwrap();
/// assert_eq!(out.size(), vec![1, 2, 4]);
/// ```
pub fn resid(b: &Tensor, groups: &TokenGroups, avg: bool) -> Result<Tensor> {
    select::tokens(b, -2, groups, avg)
}

/// `embed_hook`: one slice per group, `[batch, |group|, d_model]` each.
///
/// easyroutine slices the *last* axis (`b[..., list(group)]`, the hidden axis) — a bug; this
/// slices the token axis, as its docstring says ("the embeddings of the specified tokens").
///
/// ```
/// use tch::Tensor;
/// let b = Tensor::randn([1, 6, 4], (tch::Kind::Float, tch::Device::Cpu));
/// let out = hook_ops::resid::embed_slices(&b, &"[(0,1),(5,)]".parse().unwrap()).unwrap();
/// assert_eq!(out.iter().map(|t| t.size()).collect::<Vec<_>>(), vec![vec![1, 2, 4], vec![1, 1, 4]]);
/// ```
pub fn embed_slices(b: &Tensor, groups: &TokenGroups) -> Result<Vec<Tensor>> {
    let r = select::resolve(b, -2, groups)?;
    r.groups()
        .iter()
        .map(|g| Ok(b.f_index_select(-2, &select::index_tensor(g, b.device()))?))
        .collect()
}

/// `avg_hook`: `[batch, 3, d_model]` = means over the image tokens `1..=last_image_idx`, the
/// text tokens `end_image_idx..`, and all tokens.
///
/// ```
/// use tch::Tensor;
/// let b = Tensor::randn([2, 10, 4], (tch::Kind::Float, tch::Device::Cpu));
/// assert_eq!(hook_ops::resid::image_text_all_means(&b, 4, 6).unwrap().size(), vec![2, 3, 4]);
/// ```
pub fn image_text_all_means(b: &Tensor, last_image_idx: usize, end_image_idx: usize) -> Result<Tensor> {
    if b.dim() != 3 {
        return Err(OpsError::Shape { arg: "activation", got: b.size(), expected: "[batch, seq, d_model]".into() });
    }
    let s = b.size()[1] as usize;
    if last_image_idx == 0 || last_image_idx >= s {
        return Err(out_of_range("last_image_idx", last_image_idx, format!("1..{s} (the image span is 1..=last_image_idx)")));
    }
    if end_image_idx >= s {
        return Err(out_of_range("end_image_idx", end_image_idx, format!("0..{s}")));
    }
    let mean1 = |x: Tensor| -> Result<Tensor> { Ok(x.f_mean_dim(Some(&[1i64][..]), true, None::<Kind>)?) };
    let img = mean1(b.f_narrow(1, 1, last_image_idx as i64)?)?;
    let text = mean1(b.f_narrow(1, end_image_idx as i64, (s - end_image_idx) as i64)?)?;
    let all = mean1(b.shallow_clone())?;
    Ok(Tensor::f_cat(&[img, text, all], 1)?)
}
