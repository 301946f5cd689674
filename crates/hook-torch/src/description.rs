//! [`ModelDescription`]: the facts `xtask/python/export.py` stores in the archive
//! (`hookrs.json`): architecture, sizes, and easyroutine's component templates.

use std::collections::BTreeMap;

use hook_ops::{HeadLayout, Qkv, QkvLayout};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, TorchError};

/// What the exporter knows about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    /// e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// e.g. `llama`.
    #[serde(default)]
    pub family: String,
    /// Where the weights came from (`random:llama:seed=0`, a path, a hub name).
    #[serde(default)]
    pub source: String,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// easyroutine's `ModelConfig` names, e.g. `residual_stream_hook_name` →
    /// `model.layers[{}].output`.
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    /// How queries, keys and values sit in the outputs the `head_{query,key,value}_hook_name`
    /// templates name (fused in GPT-2, GPT-NeoX, Phi-3).
    #[serde(default)]
    pub qkv_layout: QkvLayout,
    /// How the attention output projection stores its weight.
    #[serde(default)]
    pub o_proj_weight_layout: WeightLayout,
    /// `RMS` or `LayerNorm`: the kind of the model's norms (the final one included).
    #[serde(default = "rms")]
    pub layernorm_type: String,
    /// Attention and MLP read the same residual (GPT-NeoX's parallel residual).
    #[serde(default)]
    pub parallel_attn_mlp: bool,
    /// Templates the family does not have, each with the reason (NeoX: no resid_mid).
    #[serde(default)]
    pub unavailable: BTreeMap<String, String>,
    /// The dtype of the weights and activations: `float32`, `bfloat16` or `float16` (the
    /// export's `--dtype`, or what [`HookedModule::to_kind`](crate::HookedModule::to_kind)
    /// converted it to).
    #[serde(default = "float32")]
    pub dtype: String,
    /// The final norm's epsilon.
    #[serde(default = "eps")]
    pub layernorm_eps: f64,
    /// What the final RMSNorm adds to its weight before scaling: 1 for Gemma (`x * (1 + w)`),
    /// 0 elsewhere.
    #[serde(default)]
    pub norm_weight_offset: f64,
    /// Gemma 2's tanh cap on the logits (`cap * tanh(logits / cap)`), when the model has one.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// The archive's cached step (generation with a KV cache), when it has one.
    #[serde(default)]
    pub step: Option<StepDescription>,
}

/// The cached step graph of an archive: `step(input_ids, attention_mask, k_0.., v_0..)` returns
/// the logits of the new tokens and their keys and values (see [`KvCache`](crate::KvCache)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDescription {
    /// The method's name in the archive (`step`).
    pub method: String,
    /// `[kv_heads, head_dim]` of each layer's keys and values.
    pub cache: Vec<[usize; 2]>,
    /// The step takes each layer's whole buffers `[batch, kv_heads, capacity, head_dim]` and
    /// writes the new tokens' keys and values into them in place (description version 5 on;
    /// [`KvCache`](crate::KvCache) refuses older steps, which returned them to be copied in).
    #[serde(default)]
    pub writes_cache: bool,
}

fn eps() -> f64 {
    1e-5
}

fn float32() -> String {
    "float32".into()
}

/// The model dtypes by their torch names, as the exporter and `--dtype` flags write them.
pub const MODEL_DTYPES: &[(&str, tch::Kind)] =
    &[("float32", tch::Kind::Float), ("bfloat16", tch::Kind::BFloat16), ("float16", tch::Kind::Half)];

/// The kind of a model dtype name (`bfloat16` → `Kind::BFloat16`).
///
/// ```
/// assert_eq!(hook_torch::description::kind_of("float16"), Some(tch::Kind::Half));
/// assert_eq!(hook_torch::description::kind_of("int8"), None);
/// ```
pub fn kind_of(name: &str) -> Option<tch::Kind> {
    MODEL_DTYPES.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

/// The torch name of a model dtype (`Kind::Half` → `float16`).
///
/// ```
/// assert_eq!(hook_torch::description::dtype_name(tch::Kind::BFloat16), Some("bfloat16"));
/// ```
pub fn dtype_name(kind: tch::Kind) -> Option<&'static str> {
    MODEL_DTYPES.iter().find(|(_, k)| *k == kind).map(|(n, _)| *n)
}

fn rms() -> String {
    "RMS".into()
}

/// How a projection's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// `nn.Linear`: `[out_features, in_features]`.
    #[default]
    OutIn,
    /// GPT-2's `Conv1D`: `[in_features, out_features]`.
    InOut,
}

impl ModelDescription {
    /// Parses the JSON the exporter wrote.
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| TorchError::Description(format!("(hookrs.json) is not valid: {e}")))
    }

    /// The template named `name` with `{}` replaced by `layer`.
    ///
    /// ```
    /// let d = hook_torch::ModelDescription {
    ///     architecture: "LlamaForCausalLM".into(), family: "llama".into(), source: String::new(),
    ///     num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, hidden_size: 64, vocab_size: 256,
    ///     templates: [("residual_stream_hook_name".to_string(), "model.layers[{}].output".to_string())].into(),
    ///     ..hook_torch::ModelDescription::default()
    /// };
    /// assert_eq!(d.component("residual_stream_hook_name", 1).unwrap(), "model.layers[1].output");
    /// assert!(d.component("nope", 0).is_err());
    /// ```
    pub fn component(&self, name: &str, layer: usize) -> Result<String> {
        if let Some(why) = self.unavailable.get(name) {
            return Err(TorchError::Input(format!("{} has no `{name}`: {why}", self.architecture)));
        }
        let t = self.templates.get(name).ok_or_else(|| {
            TorchError::Description(format!("has no component template `{name}` (it has: {})", self.templates.keys().cloned().collect::<Vec<_>>().join(", ")))
        })?;
        Ok(t.replace("{}", &layer.to_string()))
    }

    /// The attention layout.
    pub fn layout(&self) -> Result<HeadLayout> {
        Ok(HeadLayout::new(self.num_attention_heads as i64, self.num_key_value_heads as i64, self.head_dim as i64)?)
    }

    /// The template naming the output that holds `which` (`head_query_hook_name`, …).
    pub fn qkv_template(which: Qkv) -> &'static str {
        match which {
            Qkv::Query => "head_query_hook_name",
            Qkv::Key => "head_key_hook_name",
            Qkv::Value => "head_value_hook_name",
        }
    }

    /// The attention output projection's weight as `[d_model, heads * head_dim]` (nn.Linear's
    /// layout, whatever the model stores).
    pub fn o_proj_weight(&self, stored: &Tensor) -> Tensor {
        match self.o_proj_weight_layout {
            WeightLayout::OutIn => stored.shallow_clone(),
            WeightLayout::InOut => stored.transpose(0, 1),
        }
    }
}

impl Default for ModelDescription {
    /// An empty description (no templates, zero sizes): a base for struct-update syntax.
    fn default() -> Self {
        Self {
            architecture: String::new(),
            family: String::new(),
            source: String::new(),
            num_hidden_layers: 0,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            head_dim: 0,
            hidden_size: 0,
            vocab_size: 0,
            templates: BTreeMap::new(),
            qkv_layout: QkvLayout::Separate,
            o_proj_weight_layout: WeightLayout::OutIn,
            layernorm_type: rms(),
            parallel_attn_mlp: false,
            unavailable: BTreeMap::new(),
            dtype: float32(),
            layernorm_eps: eps(),
            norm_weight_offset: 0.0,
            final_logit_softcapping: None,
            step: None,
        }
    }
}
