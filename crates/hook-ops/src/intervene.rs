//! Interventions: functions that return an edited copy of an activation (the input is never
//! modified, so a caller keeps what it had when an intervention is refused).
//!
//! | easyroutine | here |
//! |---|---|
//! | `intervention_resid_hook` | [`resid`] |
//! | `intervention_query_key_value_hook` | [`query_key_value`] |
//! | `multiply_pattern` + `intervention_attn_mat_hook` | [`attention_matrix`] |
//! | `intervention_heads_hook` | [`zero_heads`] |
//! | `ablate_pos_keep_self_attn_hook` | [`ablate_rows_keep_last`] |

use hook_core::HeadSelection;
use tch::{Device, Tensor};

use crate::error::{out_of_range, OpsError, Result};
use crate::heads::HeadLayout;
use crate::select::index_tensor;

/// What an intervention writes: zeros (`"ablation"` / `None` in easyroutine), or values.
#[derive(Debug, Clone, Copy)]
pub enum Patch<'a> {
    /// Set the selected entries to zero.
    Ablation,
    /// Copy these values into the selected entries (shape must match the selection).
    Values(&'a Tensor),
}

/// A copy of `x` that autograd sees as a function of `x`.
fn dup(x: &Tensor) -> Result<Tensor> {
    let mut y = x.f_zeros_like()?;
    y.f_copy_(x)?;
    Ok(y)
}

/// Resolves positions (negative from the end) against `len`.
fn positions(arg: &'static str, ps: &[i64], len: i64) -> Result<Vec<usize>> {
    if ps.is_empty() {
        return Err(out_of_range(arg, "[]", "at least one position"));
    }
    ps.iter()
        .map(|&p| {
            let q = if p < 0 { p + len } else { p };
            if q < 0 || q >= len {
                Err(out_of_range(arg, format!("{ps:?} (position {p})"), format!("positions in 0..{len} or -{len}..-1")))
            } else {
                Ok(q as usize)
            }
        })
        .collect()
}

fn check_values(v: &Tensor, want: &[i64], what: &str) -> Result<()> {
    if v.size() != want {
        return Err(OpsError::Shape { arg: "patching_values", got: v.size(), expected: format!("{want:?} ({what})") });
    }
    Ok(())
}

/// Writes `patch` into `x` (a copy) along `dim` at `ix`.
fn put(x: &Tensor, dim: i64, ix: &[usize], patch: Patch<'_>, what: &str) -> Result<Tensor> {
    let idx = index_tensor(ix, x.device());
    match patch {
        Patch::Ablation => Ok(x.f_index_fill(dim, &idx, 0.0)?),
        Patch::Values(v) => {
            let mut want = x.size();
            want[dim as usize] = ix.len() as i64;
            check_values(v, &want, what)?;
            Ok(x.f_index_copy(dim, &idx, &v.f_to_kind(x.kind())?.f_to_device(x.device())?)?)
        }
    }
}

/// `intervention_resid_hook`: zero or overwrite `b[..., positions, :]`.
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let b = Tensor::ones([1, 4, 2], (Kind::Float, Device::Cpu));
/// let out = hook_ops::intervene::resid(&b, &[0, -1], hook_ops::Patch::Ablation).unwrap();
/// assert_eq!(Vec::<f32>::try_from(out.sum_dim_intlist(Some(&[-1i64][..]), false, None::<Kind>).flatten(0, -1)).unwrap(), vec![0., 2., 2., 0.]);
/// assert_eq!(b.double_value(&[0, 0, 0]), 1.0); // the input is untouched
/// ```
pub fn resid(b: &Tensor, token_positions: &[i64], patch: Patch<'_>) -> Result<Tensor> {
    if b.dim() < 2 {
        return Err(OpsError::Shape { arg: "activation", got: b.size(), expected: "[..., seq, d_model]".into() });
    }
    let dim = b.dim() as i64 - 2;
    let ix = positions("token_indexes", token_positions, b.size()[dim as usize])?;
    put(b, dim, &ix, patch, "the activation at the patched positions: [..., positions, d_model]")
}

/// `intervention_query_key_value_hook`: the output of `q_proj` / `k_proj` / `v_proj`
/// (`[batch, seq, n * head_dim]`, `n` the query heads or, under GQA, the kv heads) with the
/// given head(s) zeroed or overwritten at `positions`. Patch values are `[batch, positions,
/// head_dim]` for one head, `[batch, n, positions, head_dim]` for all.
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let layout = hook_ops::HeadLayout::new(4, 2, 2).unwrap();
/// let k = Tensor::ones([1, 3, 4], (Kind::Float, Device::Cpu)); // 2 kv heads
/// let out = hook_ops::intervene::query_key_value(&k, &layout, &[2], hook_core::HeadSelection::One(1), hook_ops::Patch::Ablation).unwrap();
/// assert_eq!(out.sum(tch::Kind::Double).double_value(&[]), 10.0);
/// assert_eq!(out.double_value(&[0, 2, 2]), 0.0);
/// ```
pub fn query_key_value(b: &Tensor, layout: &HeadLayout, token_positions: &[i64], head: HeadSelection, patch: Patch<'_>) -> Result<Tensor> {
    let (x, n) = crate::heads::split_heads(b, layout.head_dim)?; // [B, S, n, d]
    if n != layout.num_heads && n != layout.num_kv_heads {
        return Err(OpsError::Shape {
            arg: "activation",
            got: b.size(),
            expected: format!("width num_heads*head_dim = {} or num_kv_heads*head_dim = {}", layout.q_width(), layout.num_kv_heads * layout.head_dim),
        });
    }
    let ix = positions("token_indexes", token_positions, x.size()[1])?;
    let out = match head {
        HeadSelection::All => {
            let y = x.f_permute([0, 2, 1, 3])?; // [B, n, S, d]
            put(&y, 2, &ix, patch, "[batch, heads, positions, head_dim]")?.f_permute([0, 2, 1, 3])?
        }
        HeadSelection::One(h) => {
            let heads = HeadSelection::One(h).resolve(n as usize)?;
            let y = dup(&x)?;
            let edited = put(&y.f_select(2, heads[0] as i64)?, 1, &ix, patch, "[batch, positions, head_dim]")?;
            y.f_select(2, heads[0] as i64)?.f_copy_(&edited)?;
            y
        }
    };
    Ok(out.f_reshape(b.size())?)
}

/// `multiply_pattern`: `tensor * multiplication_value`.
///
/// ```
/// let t = tch::Tensor::from_slice(&[1.0f32, 2.0]);
/// assert_eq!(hook_ops::intervene::multiply_pattern(&t, 0.5).unwrap().double_value(&[1]), 1.0);
/// ```
pub fn multiply_pattern(t: &Tensor, multiplication_value: f64) -> Result<Tensor> {
    Ok(t.f_mul_scalar(multiplication_value)?)
}

/// `intervention_attn_mat_hook` on a `[batch, heads, q_len, k_len]` attention matrix: the block
/// `q_positions × k_positions` of head `head` is multiplied by `multiplication_value`
/// ([`Patch::Ablation`]) or taken from a `[q_len, k_len]` matrix ([`Patch::Values`]); then, with
/// `apply_softmax`, that head is re-normalised by a softmax over keys. When the matrix has fewer
/// query rows than `q_positions` (generation with a KV cache), only row 0 is edited, as in
/// easyroutine.
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let p = Tensor::ones([1, 2, 3, 3], (Kind::Float, Device::Cpu));
/// let out = hook_ops::intervene::attention_matrix(&p, &[2], &[0, 1], 1, 0.0, hook_ops::Patch::Ablation, false).unwrap();
/// assert_eq!(out.sum(tch::Kind::Double).double_value(&[]), 16.0);
/// ```
pub fn attention_matrix(
    b: &Tensor,
    q_positions: &[i64],
    k_positions: &[i64],
    head: usize,
    multiplication_value: f64,
    patch: Patch<'_>,
    apply_softmax: bool,
) -> Result<Tensor> {
    if b.dim() != 4 {
        return Err(OpsError::Shape { arg: "attention matrix", got: b.size(), expected: "[batch, heads, q_len, k_len]".into() });
    }
    let s = b.size();
    let (h, sq, sk) = (s[1], s[2], s[3]);
    if head as i64 >= h {
        return Err(out_of_range("head", head, format!("0..{h}")));
    }
    let qs: Vec<usize> = if sq < q_positions.len() as i64 { vec![0] } else { positions("q_positions", q_positions, sq)? };
    let ks = positions("k_positions", k_positions, sk)?;
    let dev = b.device();
    let mask = mask_2d(&qs, &ks, sq, sk, dev); // [Sq, Sk] bool
    let y = dup(b)?;
    let mut slot = y.f_select(1, head as i64)?; // [B, Sq, Sk] view into y
    let edited = match patch {
        Patch::Ablation => slot.f_where_self(&mask.f_logical_not()?, &multiply_pattern(&slot, multiplication_value)?)?,
        Patch::Values(v) => {
            check_values(v, &[sq, sk], "[q_len, k_len]: the pattern the block is taken from")?;
            v.f_to_kind(b.kind())?.f_to_device(dev)?.f_where_self(&mask, &slot)?
        }
    };
    let edited = if apply_softmax { edited.f_softmax(-1, edited.kind())? } else { edited };
    slot.f_copy_(&edited)?;
    Ok(y)
}

fn mask_2d(qs: &[usize], ks: &[usize], sq: i64, sk: i64, dev: Device) -> Tensor {
    let mut m = vec![false; (sq * sk) as usize];
    for &q in qs {
        for &k in ks {
            m[q * sk as usize + k] = true;
        }
    }
    Tensor::from_slice(&m).view([sq, sk]).to_device(dev)
}

fn check_heads(b: &Tensor, heads: &[usize]) -> Result<()> {
    if b.dim() != 4 {
        return Err(OpsError::Shape { arg: "attention matrix", got: b.size(), expected: "[batch, heads, q_len, k_len]".into() });
    }
    let h = b.size()[1];
    if let Some(&bad) = heads.iter().find(|&&x| x as i64 >= h) {
        return Err(out_of_range("head", bad, format!("0..{h}")));
    }
    Ok(())
}

/// `intervention_heads_hook`: the attention of the given heads set to zero, in every example
/// of the batch (easyroutine zeroes batch element 0 only: listed in docs/parity.md).
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let p = Tensor::ones([2, 3, 2, 2], (Kind::Float, Device::Cpu));
/// let out = hook_ops::intervene::zero_heads(&p, &[0, 2]).unwrap();
/// assert_eq!(out.sum(tch::Kind::Double).double_value(&[]), 8.0);
/// ```
pub fn zero_heads(b: &Tensor, heads: &[usize]) -> Result<Tensor> {
    check_heads(b, heads)?;
    Ok(b.f_index_fill(1, &index_tensor(heads, b.device()), 0.0)?)
}

/// `ablate_pos_keep_self_attn_hook`: for each `(head, position)`, the attention of query
/// `position` to every key but the last set to zero, in every example of the batch
/// (easyroutine: batch element 0 only; listed in docs/parity.md).
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let p = Tensor::ones([1, 1, 3, 3], (Kind::Float, Device::Cpu));
/// let out = hook_ops::intervene::ablate_rows_keep_last(&p, &[(0, 2)]).unwrap();
/// assert_eq!(out.sum(tch::Kind::Double).double_value(&[]), 7.0);
/// ```
pub fn ablate_rows_keep_last(b: &Tensor, head_positions: &[(usize, i64)]) -> Result<Tensor> {
    let heads: Vec<usize> = head_positions.iter().map(|&(h, _)| h).collect();
    check_heads(b, &heads)?;
    let (sq, sk) = (b.size()[2], b.size()[3]);
    let y = dup(b)?;
    for &(h, p) in head_positions {
        let q = positions("pos_token_to_ablate", &[p], sq)?[0];
        if sk > 1 {
            let _ = y.f_select(1, h as i64)?.f_select(1, q as i64)?.f_narrow(-1, 0, sk - 1)?.f_fill_(0.0)?;
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn resid_patch_shape_is_checked() {
        let b = Tensor::zeros([2, 5, 3], (Kind::Float, Device::Cpu));
        let v = Tensor::ones([2, 2, 3], (Kind::Float, Device::Cpu));
        let out = resid(&b, &[1, 3], Patch::Values(&v)).unwrap();
        assert_eq!(out.sum(tch::Kind::Double).double_value(&[]), 12.0);
        let e = resid(&b, &[1], Patch::Values(&v)).unwrap_err().to_string();
        assert!(e.contains("patching_values has shape [2, 2, 3], expected [2, 1, 3]"), "{e}");
        let e = resid(&b, &[5], Patch::Ablation).unwrap_err().to_string();
        assert!(e.contains("token_indexes = [5] (position 5) is out of range: valid is positions in 0..5"), "{e}");
    }

    #[test]
    fn attention_matrix_patch_and_softmax() {
        let p = Tensor::zeros([2, 2, 3, 3], (Kind::Float, Device::Cpu));
        let v = Tensor::ones([3, 3], (Kind::Float, Device::Cpu)) * 5.0;
        let out = attention_matrix(&p, &[0, 1], &[1], 0, 1.0, Patch::Values(&v), false).unwrap();
        assert_eq!(out.sum(tch::Kind::Double).double_value(&[]), 2.0 * 2.0 * 5.0);
        let out = attention_matrix(&p, &[0], &[0], 1, 1.0, Patch::Ablation, true).unwrap();
        assert!((out.double_value(&[0, 1, 2, 2]) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(out.double_value(&[0, 0, 2, 2]), 0.0);
        let e = attention_matrix(&p, &[0], &[0], 2, 1.0, Patch::Ablation, false).unwrap_err().to_string();
        assert!(e.contains("head = 2 is out of range: valid is 0..2"), "{e}");
        let e = attention_matrix(&p, &[0], &[0], 0, 1.0, Patch::Values(&Tensor::ones([2, 3], (Kind::Float, Device::Cpu))), false).unwrap_err().to_string();
        assert!(e.contains("expected [3, 3]"), "{e}");
    }

    #[test]
    fn generation_rule_edits_row_zero() {
        let p = Tensor::ones([1, 1, 1, 4], (Kind::Float, Device::Cpu));
        let out = attention_matrix(&p, &[2, 3], &[0], 0, 0.0, Patch::Ablation, false).unwrap();
        assert_eq!(out.double_value(&[0, 0, 0, 0]), 0.0);
        assert_eq!(out.sum(tch::Kind::Double).double_value(&[]), 3.0);
    }
}
