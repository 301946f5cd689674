//! Fused attention projections: where the queries, keys and values sit in the output of one
//! projection that computes all three (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`, Phi-3's
//! `qkv_proj`), so that every per-head op sees the same `[batch, seq, heads * head_dim]` tensor
//! it sees on a model with separate `q_proj` / `k_proj` / `v_proj`.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! use hook_ops::fused::{qkv_part, replace_qkv_part, Qkv, QkvLayout};
//! use hook_ops::HeadLayout;
//!
//! let layout = HeadLayout::new(2, 1, 2).unwrap(); // q: 4 wide, k and v: 2 wide each
//! let x = Tensor::arange(8, (Kind::Float, Device::Cpu)).view([1, 1, 8]);
//! let k = qkv_part(&x, QkvLayout::Concat, Qkv::Key, &layout).unwrap();
//! assert_eq!(Vec::<f32>::try_from(k.flatten(0, -1)).unwrap(), vec![4.0, 5.0]);
//! let y = replace_qkv_part(&x, QkvLayout::Concat, Qkv::Key, &layout, &k.zeros_like()).unwrap();
//! assert_eq!(y.sum(Kind::Float).double_value(&[]), 28.0 - 9.0);
//! ```

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{OpsError, Result};
use crate::HeadLayout;

/// Which of the three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Qkv {
    /// The queries.
    Query,
    /// The keys.
    Key,
    /// The values.
    Value,
}

impl Qkv {
    fn index(self) -> i64 {
        match self {
            Qkv::Query => 0,
            Qkv::Key => 1,
            Qkv::Value => 2,
        }
    }
}

/// How queries, keys and values are laid out on the last axis of the projection output that
/// the model description names for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkvLayout {
    /// Three projections (`q_proj`, `k_proj`, `v_proj`): each output is the whole tensor.
    #[default]
    Separate,
    /// One projection, `[q | k | v]`: `num_heads * head_dim` query columns, then
    /// `num_kv_heads * head_dim` key and as many value columns (GPT-2 `c_attn`, Phi-3 `qkv_proj`).
    Concat,
    /// One projection, per head `[q_h | k_h | v_h]` (GPT-NeoX `query_key_value`: the output is
    /// viewed as `[…, heads, 3 * head_dim]` and split on the last axis); needs as many key/value
    /// heads as query heads.
    PerHead,
}

fn widths(layout: &HeadLayout) -> [i64; 3] {
    let kv = layout.num_kv_heads * layout.head_dim;
    [layout.num_heads * layout.head_dim, kv, kv]
}

/// The expected width of the fused output and a view of the part, as `[…, width]`.
fn part_view(x: &Tensor, fused: QkvLayout, which: Qkv, layout: &HeadLayout) -> Result<Tensor> {
    let size = x.size();
    let last = *size.last().ok_or_else(|| OpsError::Shape { arg: "activation", got: size.clone(), expected: "[…, width]".into() })?;
    let w = widths(layout);
    let total: i64 = w.iter().sum();
    if last != total {
        return Err(OpsError::Shape {
            arg: "activation",
            got: size,
            expected: format!("a fused q/k/v projection output of width {total} (queries {} + keys {} + values {})", w[0], w[1], w[2]),
        });
    }
    // (callers return before this for separate projections: there is nothing to split)
    match fused {
        QkvLayout::Concat => {
            let start: i64 = w[..which.index() as usize].iter().sum();
            Ok(x.f_narrow(-1, start, w[which.index() as usize])?)
        }
        QkvLayout::PerHead | QkvLayout::Separate => {
            if layout.num_kv_heads != layout.num_heads {
                return Err(OpsError::Shape {
                    arg: "activation",
                    got: size,
                    expected: "a per-head fused q/k/v layout with as many key/value heads as query heads".into(),
                });
            }
            let mut shape = size[..size.len() - 1].to_vec();
            shape.extend([layout.num_heads, 3, layout.head_dim]);
            Ok(x.f_view(shape.as_slice())?.f_select(-2, which.index())?)
        }
    }
}

/// The queries, keys or values in `x`, the output of the projection the description names for
/// them: `[…, heads * head_dim]` (kv heads for keys and values), as `q_proj` / `k_proj` /
/// `v_proj` would give them. With [`QkvLayout::Separate`] that is `x` itself.
pub fn qkv_part(x: &Tensor, fused: QkvLayout, which: Qkv, layout: &HeadLayout) -> Result<Tensor> {
    if fused == QkvLayout::Separate {
        return Ok(x.shallow_clone());
    }
    let v = part_view(x, fused, which, layout)?;
    let mut shape = v.size();
    if fused == QkvLayout::PerHead {
        let n = shape.len();
        shape.truncate(n - 2);
        shape.push(layout.num_heads * layout.head_dim);
    }
    Ok(v.f_reshape(shape.as_slice())?)
}

/// `x` with its queries, keys or values replaced by `part` (shaped as [`qkv_part`] returns
/// them); `x` itself is left untouched. With [`QkvLayout::Separate`] that is `part`.
pub fn replace_qkv_part(x: &Tensor, fused: QkvLayout, which: Qkv, layout: &HeadLayout, part: &Tensor) -> Result<Tensor> {
    if fused == QkvLayout::Separate {
        return Ok(part.shallow_clone());
    }
    let mut out = x.f_zeros_like()?;
    out.f_copy_(x)?;
    let mut view = part_view(&out, fused, which, layout)?;
    let target = view.size();
    let want: i64 = target.iter().product();
    if part.numel() as i64 != want {
        return Err(OpsError::Shape { arg: "part", got: part.size(), expected: format!("{want} elements, as qkv_part returns") });
    }
    view.f_copy_(&part.f_reshape(target.as_slice())?)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn per_head_split_matches_neox() {
        // NeoX: view [B, S, H, 3*d], chunk(3, -1)
        let layout = HeadLayout::new(2, 2, 3).unwrap();
        let x = Tensor::randn([2, 4, 18], (Kind::Float, Device::Cpu));
        let parts = x.view([2, 4, 2, 9]).chunk(3, -1);
        for (i, which) in [Qkv::Query, Qkv::Key, Qkv::Value].into_iter().enumerate() {
            let got = qkv_part(&x, QkvLayout::PerHead, which, &layout).unwrap();
            assert!(got.equal(&parts[i].reshape([2, 4, 6])), "{which:?}");
        }
    }

    #[test]
    fn replace_round_trips_and_leaves_the_rest() {
        let layout = HeadLayout::new(4, 2, 2).unwrap();
        for fused in [QkvLayout::Concat] {
            let x = Tensor::randn([1, 3, 16], (Kind::Float, Device::Cpu));
            let v = qkv_part(&x, fused, Qkv::Value, &layout).unwrap();
            assert_eq!(v.size(), vec![1, 3, 4]);
            let y = replace_qkv_part(&x, fused, Qkv::Value, &layout, &(&v + 1.0)).unwrap();
            assert!(qkv_part(&y, fused, Qkv::Value, &layout).unwrap().equal(&(&v + 1.0)));
            assert!(qkv_part(&y, fused, Qkv::Query, &layout).unwrap().equal(&qkv_part(&x, fused, Qkv::Query, &layout).unwrap()));
        }
        let layout = HeadLayout::new(2, 2, 2).unwrap();
        let x = Tensor::randn([1, 3, 12], (Kind::Float, Device::Cpu));
        let k = qkv_part(&x, QkvLayout::PerHead, Qkv::Key, &layout).unwrap();
        let y = replace_qkv_part(&x, QkvLayout::PerHead, Qkv::Key, &layout, &k.zeros_like()).unwrap();
        assert_eq!(qkv_part(&y, QkvLayout::PerHead, Qkv::Key, &layout).unwrap().abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(qkv_part(&y, QkvLayout::PerHead, Qkv::Value, &layout).unwrap().equal(&qkv_part(&x, QkvLayout::PerHead, Qkv::Value, &layout).unwrap()));
    }

    #[test]
    fn wrong_widths_are_named() {
        let layout = HeadLayout::new(4, 2, 2).unwrap();
        let x = Tensor::zeros([1, 3, 15], (Kind::Float, Device::Cpu));
        let e = qkv_part(&x, QkvLayout::Concat, Qkv::Key, &layout).unwrap_err().to_string();
        assert!(e.contains("width 16") && e.contains("queries 8"), "{e}");
        let e = qkv_part(&Tensor::zeros([1, 3, 16], (Kind::Float, Device::Cpu)), QkvLayout::PerHead, Qkv::Key, &layout).unwrap_err().to_string();
        assert!(e.contains("as many key/value heads"), "{e}");
        let e = replace_qkv_part(&Tensor::zeros([1, 3, 16], (Kind::Float, Device::Cpu)), QkvLayout::Concat, Qkv::Key, &layout, &Tensor::zeros([5], (Kind::Float, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("12 elements"), "{e}");
    }
}
