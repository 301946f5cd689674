//! [`ModelDescription`]: the facts `xtask/python/export.py` stores in the archive
//! (`hookrs.json`): architecture, sizes, and easyroutine's component templates.

use std::collections::BTreeMap;

use hook_ops::HeadLayout;
use serde::{Deserialize, Serialize};

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
    /// };
    /// assert_eq!(d.component("residual_stream_hook_name", 1).unwrap(), "model.layers[1].output");
    /// assert!(d.component("nope", 0).is_err());
    /// ```
    pub fn component(&self, name: &str, layer: usize) -> Result<String> {
        let t = self.templates.get(name).ok_or_else(|| {
            TorchError::Description(format!("has no component template `{name}` (it has: {})", self.templates.keys().cloned().collect::<Vec<_>>().join(", ")))
        })?;
        Ok(t.replace("{}", &layer.to_string()))
    }

    /// The attention layout.
    pub fn layout(&self) -> Result<HeadLayout> {
        Ok(HeadLayout::new(self.num_attention_heads as i64, self.num_key_value_heads as i64, self.head_dim as i64)?)
    }
}
