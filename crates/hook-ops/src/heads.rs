//! Per-head views of attention activations: the head layout, `repeat_kv`, the per-head split
//! of `query_key_value_hook`, and the W_O projections (`head_out_hook`,
//! `projected_{value,key,query}_vectors_head`).
//!
//! Projections and splits work on the selected tokens only: the token selection (a copy of
//! the selected rows, or per-group means) comes first, so the work scales with the tokens
//! asked for, not the sequence. Grouped-query layouts are handled by indexing kv head
//! `h / (num_heads / num_kv_heads)` for head `h`; nothing is materialised by repetition.

use hook_core::{keys, HeadSelection, TokenGroups};
use tch::Tensor;

use crate::error::{OpsError, Result};
use crate::keyed::Keyed;
use crate::select::{self, index_tensor};

/// Info string of `query_key_value_hook` entries.
pub const QKV_INFO: &str = "Shape: batch seq_len d_head";
/// Info string of `head_out_hook` entries.
pub const HEAD_OUT_INFO: &str = "Shape: batch selected_inputs_ids_len, d_model";

/// The attention layout of a layer.
///
/// ```
/// let l = hook_ops::HeadLayout::new(6, 2, 4).unwrap();
/// assert_eq!(l.n_rep(), 3);
/// assert_eq!(l.kv_head_of(4), 1);
/// assert!(hook_ops::HeadLayout::new(6, 4, 4).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads (equal to `num_heads` without grouped-query attention).
    pub num_kv_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
}

impl HeadLayout {
    /// A checked layout: all sizes positive, `num_kv_heads` divides `num_heads`.
    pub fn new(num_heads: i64, num_kv_heads: i64, head_dim: i64) -> Result<Self> {
        for (arg, v) in [("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)] {
            if v <= 0 {
                return Err(crate::error::out_of_range(arg, v, "a positive integer"));
            }
        }
        if num_heads % num_kv_heads != 0 {
            return Err(OpsError::NotDivisible {
                arg: "num_kv_heads",
                value: num_kv_heads,
                other_arg: "num_heads",
                other: num_heads,
                hint: "grouped-query attention needs num_heads to be a multiple of num_kv_heads".into(),
            });
        }
        Ok(Self { num_heads, num_kv_heads, head_dim })
    }

    /// From easyroutine's `num_attention_heads` and `num_key_value_groups` (= heads / kv heads).
    pub fn from_groups(num_heads: i64, num_key_value_groups: i64, head_dim: i64) -> Result<Self> {
        if num_key_value_groups <= 0 || num_heads % num_key_value_groups != 0 {
            return Err(OpsError::NotDivisible {
                arg: "num_key_value_groups",
                value: num_key_value_groups,
                other_arg: "num_heads",
                other: num_heads,
                hint: "num_key_value_groups is num_heads / num_kv_heads".into(),
            });
        }
        Self::new(num_heads, num_heads / num_key_value_groups, head_dim)
    }

    /// Query heads per kv head.
    pub fn n_rep(&self) -> i64 {
        self.num_heads / self.num_kv_heads
    }

    /// The kv head that query head `h` reads.
    pub fn kv_head_of(&self, h: i64) -> i64 {
        h / self.n_rep()
    }

    /// `hidden = num_heads * head_dim`.
    pub fn q_width(&self) -> i64 {
        self.num_heads * self.head_dim
    }
}

/// `repeat_kv`: `[batch, kv_heads, seq, d]` → `[batch, kv_heads * n_rep, seq, d]`, each kv head
/// repeated `n_rep` times in place (`repeat_interleave` on axis 1).
///
/// ```
/// use tch::Tensor;
/// let x = Tensor::arange(2, (tch::Kind::Float, tch::Device::Cpu)).view([1, 2, 1, 1]);
/// let r = hook_ops::heads::repeat_kv(&x, 3).unwrap();
/// assert_eq!(Vec::<f32>::try_from(r.flatten(0, -1)).unwrap(), vec![0., 0., 0., 1., 1., 1.]);
/// ```
pub fn repeat_kv(x: &Tensor, n_rep: i64) -> Result<Tensor> {
    if x.dim() != 4 {
        return Err(OpsError::Shape { arg: "hidden_states", got: x.size(), expected: "[batch, kv_heads, seq, head_dim]".into() });
    }
    if n_rep <= 0 {
        return Err(crate::error::out_of_range("n_rep", n_rep, "a positive integer"));
    }
    if n_rep == 1 {
        return Ok(x.shallow_clone());
    }
    let s = x.size();
    Ok(x.f_unsqueeze(2)?.f_expand([s[0], s[1], n_rep, s[2], s[3]], false)?.f_reshape([s[0], s[1] * n_rep, s[2], s[3]])?)
}

/// Splits `[batch, seq, n*head_dim]` into `[batch, seq, n, head_dim]` and returns `n`.
///
/// ```
/// use tch::Tensor;
/// let x = Tensor::zeros([1, 3, 8], (tch::Kind::Float, tch::Device::Cpu));
/// let (v, n) = hook_ops::heads::split_heads(&x, 2).unwrap();
/// assert_eq!((v.size(), n), (vec![1, 3, 4, 2], 4));
/// assert!(hook_ops::heads::split_heads(&x, 3).is_err());
/// ```
pub fn split_heads(x: &Tensor, head_dim: i64) -> Result<(Tensor, i64)> {
    if x.dim() != 3 {
        return Err(OpsError::Shape { arg: "activation", got: x.size(), expected: "[batch, seq, heads * head_dim]".into() });
    }
    let s = x.size();
    if head_dim <= 0 || s[2] % head_dim != 0 {
        return Err(OpsError::NotDivisible {
            arg: "head_dim",
            value: head_dim,
            other_arg: "the activation width",
            other: s[2],
            hint: "the last axis must be heads * head_dim".into(),
        });
    }
    let n = s[2] / head_dim;
    Ok((x.f_view([s[0], s[1], n, head_dim])?, n))
}

/// The heads in `x` (`n`) must be the query heads or the kv heads of `layout`.
fn check_head_count(n: i64, layout: &HeadLayout) -> Result<()> {
    if n == layout.num_heads || n == layout.num_kv_heads {
        return Ok(());
    }
    Err(OpsError::Shape {
        arg: "activation",
        got: vec![n * layout.head_dim],
        expected: format!(
            "width num_heads*head_dim = {} or num_kv_heads*head_dim = {}",
            layout.num_heads * layout.head_dim,
            layout.num_kv_heads * layout.head_dim
        ),
    })
}

/// For each query head in `heads`, the index of the head of `x` it reads (itself for query
/// tensors, its kv head for key/value tensors).
fn source_heads(n_in_tensor: i64, layout: &HeadLayout, heads: &[usize]) -> Vec<usize> {
    heads
        .iter()
        .map(|&h| if n_in_tensor == layout.num_heads { h } else { layout.kv_head_of(h as i64) as usize })
        .collect()
}

/// Token selection on `[batch, seq, n, d]` along the sequence axis.
fn select_tokens(x: &Tensor, groups: &TokenGroups, avg: bool) -> Result<Tensor> {
    select::tokens(x, 1, groups, avg)
}

/// `query_key_value_hook`: one `[batch, tokens, head_dim]` entry per selected head under
/// `{prefix}L{layer}H{h}` (`prefix` is `head_queries_`, `head_keys_` or `head_values_`).
///
/// Under grouped-query attention, head `h` of a key/value tensor is kv head
/// `h / (num_heads / num_kv_heads)`. easyroutine indexes its repeated tensor with
/// `h // (num_heads // num_key_value_groups)` instead, which gives heads 3–5 of a
/// 6-head / 2-kv-head model kv head 0 (and every head kv head 0 without GQA): listed in
/// docs/parity.md.
///
/// ```
/// use tch::Tensor;
/// let layout = hook_ops::HeadLayout::new(4, 2, 3).unwrap();
/// let k = Tensor::randn([1, 5, 6], (tch::Kind::Float, tch::Device::Cpu)); // 2 kv heads
/// let out = hook_ops::heads::query_key_value(&k, "head_keys_", 0, &layout, &"[(4,)]".parse().unwrap(), hook_core::HeadSelection::All, false).unwrap();
/// assert_eq!(out.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["head_keys_L0H0", "head_keys_L0H1", "head_keys_L0H2", "head_keys_L0H3"]);
/// assert_eq!(out[3].value.size(), vec![1, 1, 3]);
/// assert!(out[2].value.equal(&out[3].value)); // heads 2 and 3 share kv head 1
/// ```
pub fn query_key_value(
    b: &Tensor,
    prefix: &str,
    layer: usize,
    layout: &HeadLayout,
    groups: &TokenGroups,
    head: HeadSelection,
    avg: bool,
) -> Result<Vec<Keyed>> {
    let (x, n) = split_heads(b, layout.head_dim)?;
    check_head_count(n, layout)?;
    let heads = head.resolve(layout.num_heads as usize)?;
    let sel = select_tokens(&x, groups, avg)?; // [B, T, n, d]
    let src = source_heads(n, layout, &heads);
    heads
        .iter()
        .zip(src)
        .map(|(&h, s)| {
            let v = sel.f_select(2, s as i64)?; // a view of the selection (already a copy)
            Ok(Keyed::with_info(keys::head_key(prefix, layer, h), v, QKV_INFO))
        })
        .collect()
}

/// `[batch, tokens, n, d]` × W_O blocks → `[heads.len(), batch, tokens, d_model]` for the query
/// heads `heads`, head `h` reading head `src[h]` of `x`.
fn project_heads(x: &Tensor, layout: &HeadLayout, w_o: &Tensor, heads: &[usize], src: &[usize]) -> Result<Tensor> {
    let d_model = w_o.size()[0];
    let dev = x.device();
    let xs = x.f_index_select(2, &index_tensor(src, dev))?; // [B, T, k, d]
    let (bsz, t, k, d) = (xs.size()[0], xs.size()[1], xs.size()[2], xs.size()[3]);
    // W_O is [d_model, num_heads * head_dim]; W_O.t().view(H, d, d_model) per easyroutine.
    let w = w_o.f_tr()?.f_reshape([layout.num_heads, layout.head_dim, d_model])?.f_index_select(0, &index_tensor(heads, dev))?;
    let lhs = xs.f_permute([2, 0, 1, 3])?.f_reshape([k, bsz * t, d])?;
    Ok(lhs.f_bmm(&w)?.f_reshape([k, bsz, t, d_model])?)
}

/// The shared body of the W_O projections: checks, split into heads (`expected` of them in
/// `b`), token selection, then `[heads.len(), batch, tokens, d_model]` plus `bias`.
#[allow(clippy::too_many_arguments)]
fn selected_projection(
    b: &Tensor,
    expected: (i64, &str),
    layout: &HeadLayout,
    w_o: &Tensor,
    bias: Option<&Tensor>,
    groups: &TokenGroups,
    head: HeadSelection,
    avg: bool,
) -> Result<(Vec<usize>, Tensor)> {
    check_w_o(w_o, bias, layout)?;
    let (x, n) = split_heads(b, layout.head_dim)?;
    if n != expected.0 {
        return Err(OpsError::Shape {
            arg: "activation",
            got: b.size(),
            expected: format!("[batch, seq, {} * head_dim = {}]", expected.1, expected.0 * layout.head_dim),
        });
    }
    let heads = head.resolve(layout.num_heads as usize)?;
    let sel = select_tokens(&x, groups, avg)?;
    let src = source_heads(n, layout, &heads);
    let mut proj = project_heads(&sel, layout, w_o, &heads, &src)?;
    if let Some(bias) = bias {
        proj = proj.f_add(bias)?;
    }
    Ok((heads, proj))
}

fn check_w_o(w_o: &Tensor, bias: Option<&Tensor>, layout: &HeadLayout) -> Result<()> {
    if w_o.dim() != 2 || w_o.size()[1] != layout.q_width() {
        return Err(OpsError::Shape {
            arg: "out_proj_weight",
            got: w_o.size(),
            expected: format!("[d_model, num_heads * head_dim = {}]", layout.q_width()),
        });
    }
    if let Some(b) = bias {
        if b.size() != [w_o.size()[0]] {
            return Err(OpsError::Shape { arg: "out_proj_bias", got: b.size(), expected: format!("[d_model = {}]", w_o.size()[0]) });
        }
    }
    Ok(())
}

/// `head_out_hook`: each head's contribution to the attention output, from the input of
/// `o_proj` (`[batch, seq, num_heads * head_dim]`): `[batch, tokens, d_model]` per head under
/// `{prefix}L{layer}H{h}`, plus `bias / num_heads` so the heads sum to `o_proj`'s output.
///
/// easyroutine adds `o_proj_bias // num_heads` (floor division): listed in docs/parity.md.
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let layout = hook_ops::HeadLayout::new(2, 2, 3).unwrap();
/// let x = Tensor::randn([1, 4, 6], (Kind::Float, Device::Cpu));
/// let w = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
/// let bias = Tensor::randn([5], (Kind::Float, Device::Cpu));
/// let out = hook_ops::heads::head_out(&x, "head_out_", 0, &layout, &w, Some(&bias), &"[(0,1,2,3)]".parse().unwrap(), hook_core::HeadSelection::All, false).unwrap();
/// let total = &out[0].value + &out[1].value;
/// assert!(total.allclose(&x.linear(&w, Some(&bias)), 1e-5, 1e-5, false));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn head_out(
    b: &Tensor,
    prefix: &str,
    layer: usize,
    layout: &HeadLayout,
    w_o: &Tensor,
    bias: Option<&Tensor>,
    groups: &TokenGroups,
    head: HeadSelection,
    avg: bool,
) -> Result<Vec<Keyed>> {
    let bias = bias.map(|b| b.f_div_scalar(layout.num_heads as f64)).transpose()?;
    let (heads, proj) = selected_projection(b, (layout.num_heads, "num_heads"), layout, w_o, bias.as_ref(), groups, head, avg)?;
    Ok(heads.iter().enumerate().map(|(i, &h)| Keyed::with_info(keys::head_key(prefix, layer, h), proj.get(i as i64), HEAD_OUT_INFO)).collect())
}

/// Which vectors `projected_vectors` projects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projected {
    /// `projected_value_vectors_head` → `projected_value_L{l}H{h}`.
    Value,
    /// `projected_key_vectors_head` → `projected_key_L{l}H{h}`.
    Key,
    /// `projected_query_vectors_head` → `projected_query_L{l}H{h}`.
    Query,
}

impl Projected {
    /// The cache-key prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            Projected::Value => "projected_value_",
            Projected::Key => "projected_key_",
            Projected::Query => "projected_query_",
        }
    }
}

/// `projected_{value,key,query}_vectors_head`: the output of `v_proj` / `k_proj` / `q_proj`
/// split into heads (kv heads repeated for GQA) and pushed through each head's W_O block,
/// plus the whole `o_proj` bias (as easyroutine does): `[batch, tokens, d_model]` per head.
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let layout = hook_ops::HeadLayout::new(4, 2, 2).unwrap();
/// let v = Tensor::randn([1, 3, 4], (Kind::Float, Device::Cpu)); // 2 kv heads * 2
/// let w = Tensor::randn([6, 8], (Kind::Float, Device::Cpu));
/// let out = hook_ops::heads::projected_vectors(&v, hook_ops::heads::Projected::Value, 1, &layout, &w, None, &"[(0,1,2)]".parse().unwrap(), hook_core::HeadSelection::One(3), false).unwrap();
/// assert_eq!(out[0].key, "projected_value_L1H3");
/// assert_eq!(out[0].value.size(), vec![1, 3, 6]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn projected_vectors(
    b: &Tensor,
    which: Projected,
    layer: usize,
    layout: &HeadLayout,
    w_o: &Tensor,
    bias: Option<&Tensor>,
    groups: &TokenGroups,
    head: HeadSelection,
    avg: bool,
) -> Result<Vec<Keyed>> {
    let expected = if which == Projected::Query { (layout.num_heads, "num_heads") } else { (layout.num_kv_heads, "num_kv_heads") };
    let (heads, proj) = selected_projection(b, expected, layout, w_o, bias, groups, head, avg)?;
    Ok(heads.iter().enumerate().map(|(i, &h)| Keyed::new(keys::head_key(which.prefix(), layer, h), proj.get(i as i64))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn easyroutine_head_keys_kv_rule(b: &Tensor, layout: &HeadLayout) -> Vec<Tensor> {
        // The correct rule written the slow way: repeat, then index by head.
        let (x, _) = split_heads(b, layout.head_dim).unwrap();
        let rep = repeat_kv(&x.transpose(1, 2), layout.n_rep()).unwrap();
        (0..layout.num_heads).map(|h| rep.select(1, h)).collect()
    }

    #[test]
    fn gqa_keys_follow_repeat_kv() {
        let layout = HeadLayout::new(6, 2, 4).unwrap();
        let k = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let out = query_key_value(&k, "head_keys_", 0, &layout, &"[(0,1,2,3,4)]".parse().unwrap(), HeadSelection::All, false).unwrap();
        let want = easyroutine_head_keys_kv_rule(&k, &layout);
        for (o, w) in out.iter().zip(want) {
            assert!(o.value.equal(&w), "{}", o.key);
        }
    }

    #[test]
    fn bad_layouts_are_named() {
        let e = HeadLayout::new(6, 4, 2).unwrap_err().to_string();
        assert!(e.contains("num_kv_heads = 4 does not divide num_heads = 6"), "{e}");
        let e = HeadLayout::new(0, 1, 2).unwrap_err().to_string();
        assert!(e.contains("num_heads = 0 is out of range"), "{e}");
        let layout = HeadLayout::new(4, 4, 3).unwrap();
        let x = Tensor::zeros([1, 2, 10], (Kind::Float, Device::Cpu));
        let e = query_key_value(&x, "head_queries_", 0, &layout, &"[(0,)]".parse().unwrap(), HeadSelection::All, false).unwrap_err().to_string();
        assert!(e.contains("head_dim = 3 does not divide the activation width = 10"), "{e}");
        let x = Tensor::zeros([1, 2, 12], (Kind::Float, Device::Cpu));
        let e = query_key_value(&x, "head_queries_", 0, &layout, &"[(0,)]".parse().unwrap(), HeadSelection::One(4), false).unwrap_err().to_string();
        assert!(e.contains("head 4 is out of range: the layer has 4 heads"), "{e}");
    }

    #[test]
    fn w_o_shape_is_checked() {
        let layout = HeadLayout::new(2, 2, 2).unwrap();
        let x = Tensor::zeros([1, 2, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([3, 5], (Kind::Float, Device::Cpu));
        let e = head_out(&x, "head_out_", 0, &layout, &w, None, &"[(0,)]".parse().unwrap(), HeadSelection::All, false).unwrap_err().to_string();
        assert!(e.contains("out_proj_weight has shape [3, 5], expected [d_model, num_heads * head_dim = 4]"), "{e}");
    }
}
