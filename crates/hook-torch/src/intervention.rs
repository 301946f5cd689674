//! Interventions (ablation and patching with easyroutine's semantics) and activation patching.
//!
//! | easyroutine hook | [`Intervention`] | site |
//! |---|---|---|
//! | `intervention_resid_hook` | [`Intervention::Resid`] | any `[batch, seq, d]` component (`resid_out`, `attn_out`, `mlp_out`, …) |
//! | `intervention_query_key_value_hook` | [`Intervention::QueryKeyValue`] | `q_proj` / `k_proj` / `v_proj` output |
//! | `intervention_query_key_value_hook` by layer | [`Intervention::QkvHead`] | the queries, keys or values of a layer, fused projections included |
//! | `intervention_attn_mat_hook` | [`Intervention::AttentionMatrix`] | the attention pattern of a layer |
//! | `intervention_heads_hook` | [`Intervention::Heads`] | the attention pattern of a layer |
//!
//! Token positions are relative to each example's own tokens (left padding is accounted for).

use std::sync::Arc;

use hook_core::{HeadSelection, HookContext, HookIo, TokenGroups};
use hook_ops::{fused, intervene, Patch, Qkv, QkvLayout};
use tch::Tensor;

use crate::description::ModelDescription;
use crate::error::{Result, TorchError};
use crate::module::{BoxedHook, HookedModule};

/// What an intervention writes.
#[derive(Debug)]
pub enum PatchValue {
    /// Zeros (easyroutine's `"ablation"`).
    Ablation,
    /// These values (shape of the selection).
    Values(Tensor),
}

impl Clone for PatchValue {
    fn clone(&self) -> Self {
        match self {
            PatchValue::Ablation => PatchValue::Ablation,
            PatchValue::Values(t) => PatchValue::Values(t.shallow_clone()),
        }
    }
}

impl PatchValue {
    fn as_patch(&self) -> Patch<'_> {
        match self {
            PatchValue::Ablation => Patch::Ablation,
            PatchValue::Values(t) => Patch::Values(t),
        }
    }
}

/// One intervention.
#[derive(Debug, Clone)]
pub enum Intervention {
    /// Zero or overwrite `[…, positions, :]` of a component's main tensor.
    Resid {
        /// e.g. `model.layers[1].output`.
        component: String,
        /// Token positions (negative from the end).
        positions: Vec<i64>,
        /// What to write: values of shape `[batch, positions, d]`.
        patch: PatchValue,
    },
    /// Zero or overwrite one head (of the tensor's own heads) of `q_proj`/`k_proj`/`v_proj`.
    QueryKeyValue {
        /// e.g. `model.layers[0].self_attn.k_proj.output`.
        component: String,
        /// Token positions.
        positions: Vec<i64>,
        /// The head.
        head: usize,
        /// Values `[batch, positions, head_dim]`.
        patch: PatchValue,
    },
    /// Zero or overwrite one head of a layer's queries, keys or values, on every family: the
    /// site and, for fused projections (GPT-2 `c_attn`, NeoX `query_key_value`, Phi-3
    /// `qkv_proj`), the part of its output come from the model description.
    QkvHead {
        /// The layer.
        layer: usize,
        /// Queries, keys or values.
        which: Qkv,
        /// Token positions.
        positions: Vec<i64>,
        /// The head (a key/value head for keys and values).
        head: usize,
        /// Values `[batch, positions, head_dim]`.
        patch: PatchValue,
    },
    /// Multiply (ablation) or replace the block `q_positions × k_positions` of one head's
    /// attention pattern, optionally re-normalising with a softmax.
    AttentionMatrix {
        /// The layer.
        layer: usize,
        /// Query positions.
        q_positions: Vec<i64>,
        /// Key positions.
        k_positions: Vec<i64>,
        /// The head.
        head: usize,
        /// Factor for ablation (0 removes the block).
        multiplication_value: f64,
        /// [`PatchValue::Ablation`]: multiply the block by `multiplication_value`;
        /// [`PatchValue::Values`]: take the block from this `[q_len, k_len]` pattern.
        patch: PatchValue,
        /// Softmax over keys after the edit.
        apply_softmax: bool,
    },
    /// Zero the attention pattern of these heads (every example of the batch).
    Heads {
        /// The layer.
        layer: usize,
        /// The heads.
        heads: Vec<usize>,
    },
}

fn shift(ps: &[i64], pad: i64) -> Vec<i64> {
    ps.iter().map(|&p| if p >= 0 { p + pad } else { p }).collect()
}

fn err(e: impl std::fmt::Display) -> hook_core::CoreError {
    hook_core::CoreError::Hook { component: String::new(), message: e.to_string() }
}

/// Applies `f` to each example with its own padding offset and stacks the results.
fn per_example(x: &Tensor, pads: &[i64], mut f: impl FnMut(&Tensor, i64, usize) -> hook_ops::Result<Tensor>) -> hook_core::Result<Tensor> {
    if pads.iter().all(|&p| p == pads[0]) {
        return f(x, pads[0], usize::MAX).map_err(err);
    }
    let parts = pads
        .iter()
        .enumerate()
        .map(|(b, &pad)| f(&x.narrow(0, b as i64, 1), pad, b))
        .collect::<hook_ops::Result<Vec<_>>>()
        .map_err(err)?;
    Tensor::f_cat(&parts, 0).map_err(err)
}

/// Rows of a batched patch for example `b` (`usize::MAX`: the whole batch).
fn rows(p: &PatchValue, b: usize) -> PatchValue {
    match (p, b) {
        (PatchValue::Values(t), b) if b != usize::MAX => PatchValue::Values(t.narrow(0, b as i64, 1)),
        (other, _) => other.clone(),
    }
}

impl Intervention {
    /// The component it hooks.
    pub fn component(&self, m: &HookedModule) -> Result<String> {
        Ok(match self {
            Intervention::Resid { component, .. } | Intervention::QueryKeyValue { component, .. } => component.clone(),
            Intervention::AttentionMatrix { layer, .. } | Intervention::Heads { layer, .. } => {
                m.require_description()?.component("attn_matrix_hook_name", *layer)?
            }
            Intervention::QkvHead { layer, which, .. } => m.require_description()?.component(ModelDescription::qkv_template(*which), *layer)?,
        })
    }

    /// The hook that performs it, for a batch with these left-padding offsets.
    pub(crate) fn hook(&self, m: &HookedModule, pads: Arc<Vec<i64>>) -> Result<BoxedHook> {
        let this = self.clone();
        let (layout, fused) = match self {
            Intervention::QueryKeyValue { .. } | Intervention::QkvHead { .. } => {
                let d = m.require_description()?;
                (Some(d.layout()?), d.qkv_layout)
            }
            _ => (None, QkvLayout::Separate),
        };
        Ok(Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
            let x = io.main_tensor()?;
            let out = match &this {
                Intervention::Resid { positions, patch, .. } => {
                    per_example(x, &pads, |t, pad, b| intervene::resid(t, &shift(positions, pad), rows(patch, b).as_patch()))?
                }
                Intervention::QueryKeyValue { positions, head, patch, .. } => {
                    let layout = layout.expect("set for QueryKeyValue");
                    per_example(x, &pads, |t, pad, b| {
                        intervene::query_key_value(t, &layout, &shift(positions, pad), HeadSelection::One(*head), rows(patch, b).as_patch())
                    })?
                }
                Intervention::QkvHead { which, positions, head, patch, .. } => {
                    let layout = layout.expect("set for QkvHead");
                    per_example(x, &pads, |t, pad, b| {
                        let part = fused::qkv_part(t, fused, *which, &layout)?;
                        let edited = intervene::query_key_value(&part, &layout, &shift(positions, pad), HeadSelection::One(*head), rows(patch, b).as_patch())?;
                        fused::replace_qkv_part(t, fused, *which, &layout, &edited)
                    })?
                }
                Intervention::AttentionMatrix { q_positions, k_positions, head, multiplication_value, patch, apply_softmax, .. } => {
                    per_example(x, &pads, |t, pad, _| {
                        intervene::attention_matrix(t, &shift(q_positions, pad), &shift(k_positions, pad), *head, *multiplication_value, patch.as_patch(), *apply_softmax)
                    })?
                }
                Intervention::Heads { heads, .. } => intervene::zero_heads(x, heads).map_err(err)?,
            };
            Ok(Some(out))
        }))
    }
}

impl HookedModule {
    /// A forward pass with interventions; returns the logits.
    pub fn run_with_interventions(&mut self, input_ids: &Tensor, attention_mask: &Tensor, interventions: &[Intervention]) -> Result<Tensor> {
        let (ids, mask) = self.check_inputs(input_ids, attention_mask)?;
        let pads = Arc::new(crate::extract::pads(&mask)?);
        let hooks = interventions.iter().map(|i| Ok((i.component(self)?, i.hook(self, pads.clone())?))).collect::<Result<Vec<_>>>()?;
        tch::no_grad(|| self.run_checked(ids, mask, hooks))
    }

    /// Activation patching: runs `clean` and records `component` at `positions`, then runs
    /// `corrupted` with those clean activations written in, and returns the patched logits
    /// `[batch, seq, vocab]` of the corrupted run. Both prompts are one example each (batch 1),
    /// positions relative to each prompt.
    pub fn patch_activations(
        &mut self,
        clean: (&Tensor, &Tensor),
        corrupted: (&Tensor, &Tensor),
        patches: &[(String, Vec<i64>)],
    ) -> Result<Tensor> {
        for (ids, _) in [clean, corrupted] {
            if ids.dim() != 2 || ids.size()[0] != 1 {
                return Err(TorchError::Input(format!("activation patching takes one prompt per run (input_ids [1, seq]), got {:?}", ids.size())));
            }
        }
        let mut recorded: Vec<Arc<std::sync::Mutex<Option<Tensor>>>> = Vec::new();
        let mut hooks: Vec<(String, BoxedHook)> = Vec::new();
        for (component, positions) in patches {
            let slot = Arc::new(std::sync::Mutex::new(None));
            recorded.push(slot.clone());
            let g = TokenGroups::new(vec![positions.clone()])?;
            hooks.push((
                component.clone(),
                Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                    let x = io.main_tensor()?;
                    let sel = hook_ops::select::flatten(x, -2, &g).map_err(err)?;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(sel);
                    Ok(None)
                }),
            ));
        }
        let _clean_logits = tch::no_grad(|| self.run_with_hooks(clean.0, clean.1, hooks))?;
        let interventions = patches
            .iter()
            .zip(recorded)
            .map(|((component, positions), slot)| {
                let values = slot.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| TorchError::Hook {
                    component: component.clone(),
                    message: "did not fire in the clean run".into(),
                })?;
                Ok(Intervention::Resid { component: component.clone(), positions: positions.clone(), patch: PatchValue::Values(values) })
            })
            .collect::<Result<Vec<_>>>()?;
        self.run_with_interventions(corrupted.0, corrupted.1, &interventions)
    }
}
