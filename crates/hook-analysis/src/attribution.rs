//! Residual decomposition and direct logit attribution.
//!
//! [`Decomposition::run`] runs a batch and splits the final residual stream (the final norm's
//! input) at the chosen positions into what built it: the residual entering layer 0 (token,
//! and for GPT-2 position, embeddings; Gemma's scaled embedding), then each layer's attention
//! and MLP additions — read at the sites the description names for them
//! (`attn_resid_add_hook_name`, `mlp_resid_add_hook_name`: the output projections, or the
//! post-norms of Gemma 2/3 and OLMo 2). With `per_head`, each attention addition is split
//! further into its heads (through W_O, as `head_out` does) plus the output projection's bias.
//! The parts sum back to the final residual ([`Decomposition::residual_error`]).
//!
//! [`Decomposition::direct_logit_attribution`] is each part's direct contribution to a logit
//! (difference) through the final norm with its scale frozen at the final residual's value, as
//! TransformerLens's `logit_attrs` does: RMSNorm `(c / rms) ⊙ w · u`, LayerNorm `((c - mean(c))
//! / std) ⊙ w · u` plus the norm's bias `b · u` as a part of its own. The contributions sum to
//! the logit the lens reads at the final residual (the model's logit, before any soft-capping).

use std::sync::{Arc, Mutex};

use hook_core::{HookContext, HookIo};
use hook_torch::{BoxedHook, HookedModule};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::lens::{Direction, LogitLens};
use crate::norm::NormKind;

/// The final residual split into its parts, at some positions.
#[derive(Debug)]
pub struct Decomposition {
    /// Part names: `embed`, `L0 attn`, `L0 mlp`, … (per head: `L0H1`, `L0 attn bias`).
    pub names: Vec<String>,
    /// Each part `[batch, positions, d_model]`, float32.
    pub parts: Vec<Tensor>,
    /// The final residual (the final norm's input) `[batch, positions, d_model]`, float32.
    pub final_resid: Tensor,
    /// The model's logits at the positions `[batch, positions, vocab]`.
    pub logits: Tensor,
}

type Slots = Arc<Mutex<Vec<Option<Tensor>>>>;

fn capture(slots: &Slots, i: usize) -> BoxedHook {
    let slots = slots.clone();
    Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
        let x = io.main_tensor()?.shallow_clone();
        slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(x);
        Ok(None)
    })
}

impl Decomposition {
    /// Runs `ids`/`mask` and decomposes the final residual at `positions` (indices into the
    /// padded sequence, negative from the end: `-1` is every row's last token under left
    /// padding).
    pub fn run(m: &mut HookedModule, ids: &Tensor, mask: &Tensor, positions: &[i64], per_head: bool) -> Result<Self> {
        let d = m.require_description()?.clone();
        let layers = d.num_hidden_layers;
        let t = |name: &str, l: usize| -> Result<String> { Ok(d.component(name, l)?) };
        let add_templates = ["attn_resid_add_hook_name", "mlp_resid_add_hook_name"];
        for a in add_templates {
            if !d.templates.contains_key(a) {
                return Err(AnalysisError::Input(format!("the model description has no `{a}` template: re-export the model with this version's `cargo xtask export`")));
            }
        }
        if per_head && d.templates.get("attn_resid_add_hook_name") != d.templates.get("attn_out_hook_name") {
            return Err(AnalysisError::Input(format!(
                "per-head attribution splits the attention output through W_O, but {} norms the attention output before adding it to the residual (a post-norm): use layer-level parts",
                d.architecture
            )));
        }
        // sites: 0 = resid into layer 0, 1 = final norm input, then per layer attn (or o_proj input), mlp
        let mut sites = vec![t("residual_stream_input_hook_name", 0)?, t("last_layernorm_hook_name", 0)?];
        for l in 0..layers {
            sites.push(if per_head { t("attn_o_proj_input_hook_name", l)? } else { t("attn_resid_add_hook_name", l)? });
            sites.push(t("mlp_resid_add_hook_name", l)?);
        }
        let slots: Slots = Arc::new(Mutex::new((0..sites.len()).map(|_| None).collect()));
        let hooks = sites.iter().enumerate().map(|(i, s)| (s.clone(), capture(&slots, i))).collect();
        let logits = tch::no_grad(|| m.run_with_hooks(ids, mask, hooks))?;
        let got = std::mem::take(&mut *slots.lock().unwrap_or_else(|p| p.into_inner()));
        let seq = ids.size()[1];
        let index = Tensor::from_slice(
            &positions
                .iter()
                .map(|&p| {
                    let q = if p < 0 { seq + p } else { p };
                    if q < 0 || q >= seq {
                        Err(AnalysisError::Input(format!("position {p} is out of range for {seq} tokens: use 0..{seq} or -{seq}..-1")))
                    } else {
                        Ok(q)
                    }
                })
                .collect::<Result<Vec<_>>>()?,
        )
        .to_device(ids.device());
        let at = |i: usize| -> Result<Tensor> {
            let x = got[i].as_ref().ok_or_else(|| AnalysisError::Input(format!("the site `{}` did not run in the forward pass", sites[i])))?;
            Ok(x.f_index_select(1, &index)?.f_to_kind(Kind::Float)?)
        };
        let mut names = vec!["embed".to_string()];
        let mut parts = vec![at(0)?];
        for l in 0..layers {
            if per_head {
                let x = at(2 + 2 * l)?; // o_proj input [B, P, H * dh]
                let w = m.parameter(&t("attn_out_proj_weight", l)?).ok_or_else(|| AnalysisError::Input(format!("no o_proj weight for layer {l}")))?;
                let w = d.o_proj_weight(w).f_to_kind(Kind::Float)?; // [d, H * dh]
                let (h, dh) = (d.num_attention_heads as i64, d.head_dim as i64);
                for head in 0..h {
                    let xs = x.f_narrow(-1, head * dh, dh)?;
                    let ws = w.f_narrow(1, head * dh, dh)?;
                    names.push(format!("L{l}H{head}"));
                    parts.push(xs.f_matmul(&ws.f_transpose(0, 1)?)?);
                }
                if let Some(b) = m.parameter(&t("attn_out_proj_bias", l)?) {
                    names.push(format!("L{l} attn bias"));
                    parts.push(b.f_to_kind(Kind::Float)?.f_expand_as(&parts[0])?);
                }
            } else {
                names.push(format!("L{l} attn"));
                parts.push(at(2 + 2 * l)?);
            }
            names.push(format!("L{l} mlp"));
            parts.push(at(3 + 2 * l)?);
        }
        let logits = logits.f_index_select(1, &index)?;
        Ok(Decomposition { names, parts, final_resid: at(1)?, logits })
    }

    /// `max |Σ parts - final residual|`, relative to the final residual's largest magnitude.
    pub fn residual_error(&self) -> Result<f64> {
        let sum = Tensor::f_stack(&self.parts, 0)?.f_sum_dim_intlist(0, false, Kind::Float)?;
        let scale = self.final_resid.abs().max().double_value(&[]).max(1e-12);
        Ok((sum - &self.final_resid).abs().max().double_value(&[]) / scale)
    }

    /// Each part's direct contribution to the logit along each example's direction, through
    /// the final norm with its scale frozen (see the [module documentation](self)): `(name,
    /// [batch, positions])`, float32, plus `final norm bias` for a LayerNorm.
    pub fn direct_logit_attribution(&self, lens: &LogitLens, directions: &[Direction]) -> Result<Vec<(String, Tensor)>> {
        let batch = self.final_resid.size()[0];
        if directions.len() as i64 != batch {
            return Err(AnalysisError::Input(format!("{} directions for a batch of {batch}: give one per example", directions.len())));
        }
        let dev = self.final_resid.device();
        let dirs = Tensor::f_stack(&directions.iter().map(|d| lens.direction_vector(*d)).collect::<Result<Vec<_>>>()?, 0)?
            .f_to_device(dev)?
            .f_to_kind(Kind::Float)?; // [B, d]
        let norm = &lens.norm;
        let w = (norm.weight.f_to_device(dev)?.f_to_kind(Kind::Float)? + norm.weight_offset).f_view([1, 1, -1])?;
        let x = &self.final_resid;
        let scale = match norm.kind {
            NormKind::Rms => (x.f_square()?.f_mean_dim(-1, true, Kind::Float)? + norm.eps).f_rsqrt()?,
            NormKind::LayerNorm => (x.f_var_correction(-1, 0, true)? + norm.eps).f_rsqrt()?,
        };
        let along = |c: &Tensor| -> Result<Tensor> {
            let c = match norm.kind {
                NormKind::Rms => c.shallow_clone(),
                NormKind::LayerNorm => c - c.f_mean_dim(-1, true, Kind::Float)?,
            };
            // [B, P, d] · [B, 1, d] summed over d
            Ok((c * &scale * &w * dirs.f_unsqueeze(1)?).f_sum_dim_intlist(-1, false, Kind::Float)?)
        };
        let mut out = self.names.iter().zip(&self.parts).map(|(n, c)| Ok((n.clone(), along(c)?))).collect::<Result<Vec<_>>>()?;
        if let (NormKind::LayerNorm, Some(b)) = (norm.kind, &norm.bias) {
            let b = b.f_to_device(dev)?.f_to_kind(Kind::Float)?;
            let per_example = dirs.f_matmul(&b)?; // [B]
            out.push(("final norm bias".into(), per_example.f_unsqueeze(1)?.f_expand([batch, x.size()[1]], false)?.f_contiguous()?));
        }
        Ok(out)
    }
}
