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

use hook_core::{HeadSelection, HookContext, HookIo};
use hook_ops::{fused, intervene, Patch, Qkv, QkvLayout};
use tch::Tensor;

use crate::description::ModelDescription;
use crate::error::Result;
use crate::module::{BoxedHook, HookedModule};
use crate::padding::{self, shift_positions, Pads};

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

/// The JSON form of an intervention (the CLI's, Python's dicts, the parity cases'), with
/// `"kind"` naming the variant; a missing required field or an unknown one is an error that
/// names it. `patch` is `null` or `"ablation"` (absent: ablation); values to patch in are
/// tensors, set on the parsed [`Intervention`] with [`Intervention::with_patch`].
///
/// ```
/// use hook_torch::Intervention;
/// let iv: Intervention = serde_json::from_str(r#"{"kind": "qkv", "which": "keys", "layer": 1, "head": 0, "positions": [-1]}"#).unwrap();
/// assert!(matches!(iv, Intervention::QkvHead { layer: 1, head: 0, .. }));
/// // a typo is refused, not read as layer 0
/// let e = serde_json::from_str::<Intervention>(r#"{"kind": "heads", "layr": 2, "heads": [0]}"#).unwrap_err();
/// assert!(e.to_string().contains("layr"), "{e}");
/// ```
impl<'de> serde::Deserialize<'de> for Intervention {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::Deserialize;
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Which {
            #[serde(alias = "query", alias = "q")]
            Queries,
            #[serde(alias = "key", alias = "k")]
            Keys,
            #[serde(alias = "value", alias = "v")]
            Values,
        }
        /// `null` or `"ablation"`: the values of a patch are tensors, not JSON.
        #[derive(Default)]
        struct Ablation;
        impl<'de> Deserialize<'de> for Ablation {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                match Option::<String>::deserialize(d)? {
                    None => Ok(Ablation),
                    Some(s) if s == "ablation" => Ok(Ablation),
                    Some(s) => Err(serde::de::Error::custom(format!("patch {s:?}: expected \"ablation\" or null (values to patch in are tensors, given apart)"))),
                }
            }
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Resid {
            component: String,
            positions: Vec<i64>,
            #[serde(default)]
            #[allow(dead_code)]
            patch: Ablation,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct QkvForm {
            layer: usize,
            which: Which,
            positions: Vec<i64>,
            head: usize,
            #[serde(default)]
            #[allow(dead_code)]
            patch: Ablation,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Attn {
            layer: usize,
            head: usize,
            q_positions: Vec<i64>,
            k_positions: Vec<i64>,
            #[serde(default)]
            multiplication_value: f64,
            #[serde(default)]
            apply_softmax: bool,
            #[serde(default)]
            #[allow(dead_code)]
            patch: Ablation,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Heads {
            layer: usize,
            heads: Vec<usize>,
        }
        #[derive(Deserialize)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        enum Form {
            Resid(Resid),
            Qkv(QkvForm),
            Attn(Attn),
            Heads(Heads),
        }
        Ok(match Form::deserialize(d)? {
            Form::Resid(r) => Intervention::Resid { component: r.component, positions: r.positions, patch: PatchValue::Ablation },
            Form::Qkv(q) => Intervention::QkvHead {
                layer: q.layer,
                which: match q.which {
                    Which::Queries => Qkv::Query,
                    Which::Keys => Qkv::Key,
                    Which::Values => Qkv::Value,
                },
                positions: q.positions,
                head: q.head,
                patch: PatchValue::Ablation,
            },
            Form::Attn(a) => Intervention::AttentionMatrix {
                layer: a.layer,
                q_positions: a.q_positions,
                k_positions: a.k_positions,
                head: a.head,
                multiplication_value: a.multiplication_value,
                patch: PatchValue::Ablation,
                apply_softmax: a.apply_softmax,
            },
            Form::Heads(h) => Intervention::Heads { layer: h.layer, heads: h.heads },
        })
    }
}

impl Intervention {
    /// The same intervention writing `values` instead of zeros (for
    /// [`Intervention::AttentionMatrix`]: taking its block from the `values` pattern).
    /// [`Intervention::Heads`] zeroes heads and takes no values: it is returned as it is.
    ///
    /// ```
    /// use hook_torch::{Intervention, PatchValue};
    /// let iv: Intervention = serde_json::from_str(r#"{"kind": "resid", "component": "model.layers[0].output", "positions": [0]}"#).unwrap();
    /// let iv = iv.with_patch(PatchValue::Values(tch::Tensor::zeros([1, 1, 8], (tch::Kind::Float, tch::Device::Cpu))));
    /// assert!(matches!(iv, Intervention::Resid { patch: PatchValue::Values(_), .. }));
    /// ```
    pub fn with_patch(mut self, value: PatchValue) -> Self {
        match &mut self {
            Intervention::Resid { patch, .. }
            | Intervention::QueryKeyValue { patch, .. }
            | Intervention::QkvHead { patch, .. }
            | Intervention::AttentionMatrix { patch, .. } => *patch = value,
            Intervention::Heads { .. } => {}
        }
        self
    }
}

fn err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> hook_core::CoreError {
    hook_core::CoreError::hook("", e)
}

/// Applies `f` to each example with its own padding offset (`example`: `None` for the whole
/// batch when every example has the same offset) and stacks the results.
fn per_example(x: &Tensor, pads: &[i64], f: impl FnMut(&Tensor, i64, Option<usize>) -> hook_ops::Result<Tensor>) -> hook_core::Result<Tensor> {
    padding::each_example_tensor(x, pads, f).map_err(err)
}

/// The rows of a batched patch for `example` (`None`: the whole batch).
fn rows(p: &PatchValue, example: Option<usize>) -> hook_ops::Result<PatchValue> {
    Ok(match (p, example) {
        (PatchValue::Values(t), Some(b)) => PatchValue::Values(t.f_narrow(0, b as i64, 1)?),
        (other, _) => other.clone(),
    })
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
    pub(crate) fn hook(&self, m: &HookedModule, pads: Pads) -> Result<BoxedHook> {
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
                    per_example(x, &pads, |t, pad, b| intervene::resid(t, &shift_positions(positions, pad), rows(patch, b)?.as_patch()))?
                }
                Intervention::QueryKeyValue { positions, head, patch, .. } => {
                    let layout = layout.expect("set for QueryKeyValue");
                    per_example(x, &pads, |t, pad, b| {
                        intervene::query_key_value(t, &layout, &shift_positions(positions, pad), HeadSelection::One(*head), rows(patch, b)?.as_patch())
                    })?
                }
                Intervention::QkvHead { which, positions, head, patch, .. } => {
                    let layout = layout.expect("set for QkvHead");
                    per_example(x, &pads, |t, pad, b| {
                        let part = fused::qkv_part(t, fused, *which, &layout)?;
                        let edited = intervene::query_key_value(&part, &layout, &shift_positions(positions, pad), HeadSelection::One(*head), rows(patch, b)?.as_patch())?;
                        fused::replace_qkv_part(t, fused, *which, &layout, &edited)
                    })?
                }
                Intervention::AttentionMatrix { q_positions, k_positions, head, multiplication_value, patch, apply_softmax, .. } => {
                    per_example(x, &pads, |t, pad, _| {
                        intervene::attention_matrix(t, &shift_positions(q_positions, pad), &shift_positions(k_positions, pad), *head, *multiplication_value, patch.as_patch(), *apply_softmax)
                    })?
                }
                Intervention::Heads { heads, .. } => intervene::zero_heads(x, heads).map_err(err)?,
            };
            Ok(Some(out))
        }))
    }
}
