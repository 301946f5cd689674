//! [`ExtractionConfig`] (easyroutine's fields, names and defaults) and
//! [`HookedModule::run_with_cache`]: one forward pass that fills an [`ActivationCache`] with
//! the keys easyroutine would write.
//!
//! Batches may hold several prompts, left-padded: token positions are relative to each
//! example's own tokens (position 0 is its first real token, -1 its last), so every example
//! gets the values it would get run alone.
//!
//! Each config flag maps to one of the catalogue's hooks through one table ([`TABLE`]'s rows
//! are in easyroutine's `create_hooks` order, the order of the cache's keys); the forward
//! itself is [`HookedModule::run`](crate::HookedModule::run).

use std::sync::{Arc, Mutex};

use hook_cache::{ActivationCache, CacheValue};
use hook_core::{keys, HeadSelection, HookContext, HookIo, TokenGroups};
use hook_ops::heads::Projected;
use hook_ops::pattern::RunningPatternAverage;
use hook_ops::{resid, stats, Keyed, PatternAvg, Qkv};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::catalogue::{self, Part, SharedCache};
use crate::description::ModelDescription;
use crate::error::{Result, TorchError};
use crate::module::{BoxedHook, HookedModule};
use crate::padding::{self, Pads};

/// One attention head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerHead {
    /// The layer.
    pub layer: usize,
    /// The head.
    pub head: usize,
}

/// easyroutine's `attn_heads`: `"all"` or a list of `{"layer": l, "head": h}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AttnHeads {
    /// Every head of every layer.
    #[default]
    All,
    /// These heads.
    List(Vec<LayerHead>),
}

impl Serialize for AttnHeads {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            AttnHeads::All => s.serialize_str("all"),
            AttnHeads::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for AttnHeads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            L(Vec<LayerHead>),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) if s == "all" => Ok(AttnHeads::All),
            Raw::S(s) => Err(serde::de::Error::custom(format!("attn_heads must be \"all\" or a list of {{\"layer\": l, \"head\": h}}, got {s:?}"))),
            Raw::L(l) => Ok(AttnHeads::List(l)),
        }
    }
}

/// What to extract: easyroutine's `ExtractionConfig`, same field names and defaults.
///
/// ```
/// let c: hook_torch::ExtractionConfig = serde_json::from_str(r#"{"extract_resid_out": true, "attn_heads": [{"layer": 0, "head": 1}]}"#).unwrap();
/// assert!(c.extract_resid_out && c.save_logits);
/// assert!(serde_json::from_str::<hook_torch::ExtractionConfig>(r#"{"extract_resid": true}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExtractionConfig {
    pub extract_embed: bool,
    pub extract_resid_in: bool,
    pub extract_resid_mid: bool,
    pub extract_resid_out: bool,
    pub extract_resid_in_post_layernorm: bool,
    pub extract_attn_pattern: bool,
    pub extract_head_values_projected: bool,
    pub extract_head_keys_projected: bool,
    pub extract_head_queries_projected: bool,
    pub extract_head_keys: bool,
    pub extract_head_values: bool,
    pub extract_head_queries: bool,
    pub extract_values: bool,
    pub extract_keys: bool,
    pub extract_queries: bool,
    pub extract_head_out: bool,
    pub extract_attn_out: bool,
    pub extract_attn_in: bool,
    pub extract_mlp_out: bool,
    pub extract_last_layernorm: bool,
    pub save_input_ids: bool,
    pub avg: bool,
    pub avg_over_example: bool,
    pub attn_heads: AttnHeads,
    pub attn_pattern_avg: PatternAvg,
    pub attn_pattern_row_positions: Option<TokenGroups>,
    pub save_logits: bool,
    pub keep_gradient: bool,
}

impl Default for ExtractionConfig {
    fn default() -> Self {
        Self {
            extract_embed: false,
            extract_resid_in: false,
            extract_resid_mid: false,
            extract_resid_out: false,
            extract_resid_in_post_layernorm: false,
            extract_attn_pattern: false,
            extract_head_values_projected: false,
            extract_head_keys_projected: false,
            extract_head_queries_projected: false,
            extract_head_keys: false,
            extract_head_values: false,
            extract_head_queries: false,
            extract_values: false,
            extract_keys: false,
            extract_queries: false,
            extract_head_out: false,
            extract_attn_out: false,
            extract_attn_in: false,
            extract_mlp_out: false,
            extract_last_layernorm: false,
            save_input_ids: false,
            avg: false,
            avg_over_example: false,
            attn_heads: AttnHeads::All,
            attn_pattern_avg: PatternAvg::None,
            attn_pattern_row_positions: None,
            save_logits: true,
            keep_gradient: false,
        }
    }
}

impl ExtractionConfig {
    /// Sets flags from short names (`resid_out`, `attn_pattern`, … — the field names without
    /// `extract_`; `input_ids`, `logits` for the `save_` ones).
    ///
    /// ```
    /// let c = hook_torch::ExtractionConfig::default().with_flags(&["resid_out", "attn_pattern"]).unwrap();
    /// assert!(c.extract_resid_out && c.extract_attn_pattern);
    /// assert!(hook_torch::ExtractionConfig::default().with_flags(&["resid"]).unwrap_err().to_string().contains("resid_out"));
    /// ```
    pub fn with_flags(self, flags: &[&str]) -> Result<Self> {
        let mut v = serde_json::to_value(&self).expect("config serialises");
        let obj = v.as_object_mut().expect("object");
        for f in flags {
            let key = [format!("extract_{f}"), format!("save_{f}"), f.to_string()]
                .into_iter()
                .find(|k| obj.get(k).is_some_and(|x| x.is_boolean()))
                .ok_or_else(|| {
                    let names: Vec<String> = obj
                        .iter()
                        .filter(|(_, x)| x.is_boolean())
                        .map(|(k, _)| k.trim_start_matches("extract_").trim_start_matches("save_").to_string())
                        .collect();
                    let near = hook_core::suggest::closest(f, names.iter().map(String::as_str), 3);
                    TorchError::Input(format!("unknown extraction `{f}`; closest: {}; all: {}", near.join(", "), names.join(", ")))
                })?;
            obj.insert(key, serde_json::Value::Bool(true));
        }
        Ok(serde_json::from_value(v).expect("same shape"))
    }
}

/// What an extraction run takes besides the inputs: easyroutine's token groups and config,
/// and the options only some flags read. Part of a [`RunSpec`](crate::RunSpec).
///
/// ```
/// let groups = "[[-1]]".parse().unwrap();
/// let config = hook_torch::ExtractionConfig::default().with_flags(&["resid_out"]).unwrap();
/// let e = hook_torch::Extraction::new(&groups, &config);
/// assert!(e.average.is_none() && e.vocabulary_index.is_none());
/// ```
pub struct Extraction<'a> {
    /// easyroutine's `token_indexes` (positions per example; negative from the end).
    pub token_groups: &'a TokenGroups,
    /// What to extract.
    pub config: &'a ExtractionConfig,
    /// For `avg_over_example`: the running average and this batch's index.
    pub average: Option<(&'a mut RunningPatternAverage, usize)>,
    /// For `keep_gradient`: the vocabulary entry whose last-position logit is differentiated.
    pub vocabulary_index: Option<i64>,
}

impl<'a> Extraction<'a> {
    /// An extraction of `config` at `token_groups`, without a running average or a
    /// vocabulary index.
    pub fn new(token_groups: &'a TokenGroups, config: &'a ExtractionConfig) -> Self {
        Extraction { token_groups, config, average: None, vocabulary_index: None }
    }
}

/// What the hooks of one config flag store.
#[derive(Clone, Copy)]
enum Stores {
    /// `[batch, tokens, d]` of the component `template` at every layer, under `key(layer)`.
    Resid(&'static str, fn(usize) -> String),
    /// The same of the queries, keys or values of every layer, under `{prefix}L{layer}`.
    QkvResid(Qkv, &'static str),
    /// `input_ids` (no hook).
    InputIds,
    /// The input embeddings (with `keep_gradient`, a leaf whose gradient is taken after the
    /// forward).
    Embed,
    /// For each selected head: its queries, keys or values, `{prefix}L{l}H{h}`.
    HeadQkv(Qkv, &'static str),
    /// For each selected head: its W_O contribution, `head_out_L{l}H{h}`.
    HeadOut,
    /// Mean / variance / second moment at the input of the last layernorm.
    LastLayernorm,
    /// For each selected head: its queries, keys or values projected through W_O.
    Projected(Projected, Qkv),
    /// For each selected head: its attention pattern (or, with `avg_over_example`, a running
    /// average of it).
    Pattern,
}

type Flag = fn(&ExtractionConfig) -> bool;

/// Each config flag and what its hooks store, in easyroutine's `create_hooks` order.
const TABLE: &[(Flag, Stores)] = &[
    (|c| c.extract_resid_out, Stores::Resid("residual_stream_hook_name", keys::resid_out)),
    (|c| c.extract_resid_in, Stores::Resid("residual_stream_input_hook_name", keys::resid_in)),
    (|c| c.extract_resid_in_post_layernorm, Stores::Resid("residual_stream_input_post_layernorm_hook_name", keys::resid_in_post_layernorm)),
    (|c| c.save_input_ids, Stores::InputIds),
    (|c| c.extract_embed, Stores::Embed),
    // q/k/v sites in forward order (q, k, v): separate projections fire in that order whatever
    // the registration order, and hooks on one fused site run in registration order, so the
    // cache keys come in the same order on every family.
    (|c| c.extract_head_queries, Stores::HeadQkv(Qkv::Query, "head_queries_")),
    (|c| c.extract_head_keys, Stores::HeadQkv(Qkv::Key, "head_keys_")),
    (|c| c.extract_head_values, Stores::HeadQkv(Qkv::Value, "head_values_")),
    (|c| c.extract_queries, Stores::QkvResid(Qkv::Query, "queries_")),
    (|c| c.extract_keys, Stores::QkvResid(Qkv::Key, "keys_")),
    (|c| c.extract_values, Stores::QkvResid(Qkv::Value, "values_")),
    (|c| c.extract_head_out, Stores::HeadOut),
    (|c| c.extract_attn_in, Stores::Resid("attn_in_hook_name", keys::attn_in)),
    (|c| c.extract_attn_out, Stores::Resid("attn_out_hook_name", keys::attn_out)),
    (|c| c.extract_resid_mid, Stores::Resid("intermediate_stream_hook_name", keys::resid_mid)),
    (|c| c.extract_mlp_out, Stores::Resid("mlp_out_hook_name", keys::mlp_out)),
    (|c| c.extract_last_layernorm, Stores::LastLayernorm),
    (|c| c.extract_head_queries_projected, Stores::Projected(Projected::Query, Qkv::Query)),
    (|c| c.extract_head_keys_projected, Stores::Projected(Projected::Key, Qkv::Key)),
    (|c| c.extract_head_values_projected, Stores::Projected(Projected::Value, Qkv::Value)),
    (|c| c.extract_attn_pattern, Stores::Pattern),
];

/// One extraction during a forward: the hooks it adds, and what it does after the forward
/// (gradients, running averages, logits, `mapping_index`).
pub(crate) struct Plan<'a> {
    cache: SharedCache,
    pads: Pads,
    token_groups: &'a TokenGroups,
    config: &'a ExtractionConfig,
    vocabulary_index: Option<i64>,
    embed: Option<(String, Arc<Mutex<Option<Tensor>>>)>,
    average: Option<(Arc<Mutex<RunningPatternAverage>>, &'a mut RunningPatternAverage)>,
    vocab_size: usize,
}

impl<'a> Plan<'a> {
    /// Checks `e` against the model and the batch (`ids`, padded by `pads`) and returns the
    /// plan with the hooks it adds to the forward.
    pub(crate) fn new(m: &HookedModule, ids: &Tensor, pads: &Pads, e: Extraction<'a>) -> Result<(Self, Vec<(String, BoxedHook)>)> {
        let Extraction { token_groups, config, average, vocabulary_index } = e;
        if config.keep_gradient && (!config.extract_embed || vocabulary_index.is_none()) {
            return Err(TorchError::Input(
                "keep_gradient needs extract_embed and a vocabulary index (Extraction::vocabulary_index): the gradient of that logit at the last position w.r.t. the input embeddings is stored as input_embeddings_gradients".into(),
            ));
        }
        let d = m.require_description()?;
        let seq = ids.size()[1] as usize;
        // every position must exist in every example
        for (b, &pad) in pads.iter().enumerate() {
            let len = seq - pad as usize;
            token_groups.resolve(len).map_err(|e| TorchError::Input(format!("example {b} ({len} tokens): {e}")))?;
            if let Some(rows) = &config.attn_pattern_row_positions {
                rows.resolve(len).map_err(|e| TorchError::Input(format!("attn_pattern_row_positions, example {b} ({len} tokens): {e}")))?;
            }
        }
        let layout = d.layout()?;
        let n_layers = d.num_hidden_layers;
        let selected: Vec<(usize, HeadSelection)> = match &config.attn_heads {
            AttnHeads::All => (0..n_layers).map(|l| (l, HeadSelection::All)).collect(),
            AttnHeads::List(l) => {
                for lh in l {
                    if lh.layer >= n_layers || lh.head >= d.num_attention_heads {
                        return Err(TorchError::Input(format!(
                            "attn_heads has layer {} head {}: the model has layers 0..{n_layers} and heads 0..{}",
                            lh.layer, lh.head, d.num_attention_heads
                        )));
                    }
                }
                l.iter().map(|x| (x.layer, HeadSelection::One(x.head))).collect()
            }
        };
        let cache: SharedCache = Arc::new(Mutex::new(ActivationCache::new()));
        let g = token_groups.clone();
        let avg = config.avg;
        let part = |which: Qkv| Part { fused: d.qkv_layout, which, layout };
        let o_proj = |l: usize| -> Result<(Tensor, Option<Tensor>)> {
            let w = m.parameter(&d.component("attn_out_proj_weight", l)?).ok_or_else(|| TorchError::Description(format!("names no parameter for layer {l}'s o_proj weight")))?;
            let b = m.parameter(&d.component("attn_out_proj_bias", l)?).map(Tensor::shallow_clone);
            Ok((d.o_proj_weight(w), b))
        };
        let mut embed = None;
        let mut average = average.map(|(a, i)| (Arc::new(Mutex::new(std::mem::take(a))), i, a));
        let mut hooks: Vec<(String, BoxedHook)> = Vec::new();
        for &(flag, stores) in TABLE {
            if !flag(config) {
                continue;
            }
            match stores {
                Stores::Resid(template, key) => {
                    for l in 0..n_layers {
                        hooks.push((d.component(template, l)?, catalogue::resid_padded(&cache, pads, key(l), g.clone(), avg, None)));
                    }
                }
                Stores::QkvResid(which, prefix) => {
                    for l in 0..n_layers {
                        let key = keys::layer_head_free_key(prefix, l);
                        hooks.push((d.component(ModelDescription::qkv_template(which), l)?, catalogue::resid_padded(&cache, pads, key, g.clone(), avg, Some(part(which)))));
                    }
                }
                Stores::InputIds => {
                    cache.lock().unwrap_or_else(|e| e.into_inner()).insert("input_ids", ids.shallow_clone());
                }
                Stores::Embed if config.keep_gradient => {
                    // the embeddings become a leaf that requires grad; the rest of the forward reads it
                    let slot: Arc<Mutex<Option<Tensor>>> = Arc::new(Mutex::new(None));
                    let s = slot.clone();
                    let component = d.component("embed_tokens", 0)?;
                    hooks.push((
                        component.clone(),
                        Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                            let leaf = io.main_tensor()?.detach().set_requires_grad(true);
                            *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(leaf.shallow_clone());
                            Ok(Some(leaf))
                        }),
                    ));
                    embed = Some((component, slot));
                }
                Stores::Embed => hooks.push((d.component("embed_tokens", 0)?, catalogue::resid_padded(&cache, pads, "input_embeddings".into(), g.clone(), avg, None))),
                Stores::HeadQkv(which, prefix) => {
                    for &(l, h) in &selected {
                        hooks.push((d.component(ModelDescription::qkv_template(which), l)?, catalogue::query_key_value_padded(&cache, pads, prefix, g.clone(), l, Some(part(which)), layout, h, avg)));
                    }
                }
                Stores::HeadOut => {
                    for &(l, h) in &selected {
                        hooks.push((d.component("attn_o_proj_input_hook_name", l)?, catalogue::head_out_padded(&cache, pads, "head_out_", g.clone(), l, layout, o_proj(l)?, h, avg)));
                    }
                }
                Stores::LastLayernorm => {
                    hooks.push((
                        d.component("last_layernorm_hook_name", 0)?,
                        catalogue::extractor(&cache, pads, vec![g.clone()], move |x, g| {
                            let s = stats::layernorm_statistics(x, &g[0], avg)?;
                            Ok(s.into_iter()
                                .enumerate()
                                .flat_map(|(i, st)| st.into_named().into_iter().map(move |(n, v)| Keyed::new(format!("last_layernorm\u{0}{i}\u{0}{n}"), v)))
                                .collect())
                        }),
                    ));
                }
                Stores::Projected(projected, which) => {
                    for &(l, h) in &selected {
                        let site = d.component(ModelDescription::qkv_template(which), l)?;
                        hooks.push((site, catalogue::projected_padded(&cache, pads, projected, g.clone(), l, Some(part(which)), layout, o_proj(l)?, h, avg)));
                    }
                }
                Stores::Pattern => match &mut average {
                    Some((state, batch_idx, _)) if config.avg_over_example => {
                        for l in 0..n_layers {
                            hooks.push((d.component("attn_matrix_hook_name", l)?, catalogue::avg_attention_pattern_padded(state.clone(), pads, g.clone(), l, *batch_idx)));
                        }
                    }
                    _ => {
                        for &(l, h) in &selected {
                            let site = d.component("attn_matrix_hook_name", l)?;
                            hooks.push((site, catalogue::attention_pattern_padded(&cache, pads, g.clone(), l, h, config.attn_pattern_avg, config.attn_pattern_row_positions.clone())));
                        }
                    }
                },
            }
        }
        let plan = Plan {
            cache,
            pads: pads.clone(),
            token_groups,
            config,
            vocabulary_index,
            embed,
            average: average.map(|(state, _, target)| (state, target)),
            vocab_size: d.vocab_size,
        };
        Ok((plan, hooks))
    }

    /// The forward needs gradients (`keep_gradient`).
    pub(crate) fn needs_gradients(&self) -> bool {
        self.config.keep_gradient
    }

    /// The cache, once the forward returned `logits` (`None`: it stopped early): the gradient
    /// of `keep_gradient`, the running average put back, statistics folded, logits at the
    /// selected positions, `mapping_index`.
    pub(crate) fn finish(self, logits: Option<&Tensor>) -> Result<ActivationCache> {
        let Plan { cache, pads, token_groups, config, vocabulary_index, embed, average, vocab_size } = self;
        let select = |t: &Tensor, key: &str| -> Result<Keyed> {
            let mut f = |x: &Tensor, g: &[TokenGroups]| Ok(vec![Keyed::new(key, resid::resid(x, &g[0], false)?)]);
            Ok(padding::each_example_keyed(t, &pads, std::slice::from_ref(token_groups), &mut f)?.remove(0))
        };
        if let Some((component, slot)) = embed {
            let leaf = slot.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| TorchError::Hook {
                component,
                message: "the embedding site did not fire".into(),
                source: None,
            })?;
            let logits = logits.ok_or_else(|| TorchError::Input("keep_gradient needs the logits: the forward stopped early".into()))?;
            let v = vocabulary_index.expect("checked in Plan::new");
            if v < 0 || v >= vocab_size as i64 {
                return Err(TorchError::Input(format!("vocabulary_index {v} is out of the vocabulary 0..{vocab_size}")));
            }
            // every example's last (real) position; examples do not interact, so one backward
            let target = logits.f_select(1, -1)?.f_select(1, v)?.f_sum(Kind::Float)?;
            let grad = Tensor::f_run_backward(&[target], &[&leaf], false, false)?.remove(0);
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            c.insert("input_embeddings", select(&leaf.detach(), "input_embeddings")?.value);
            c.insert("input_embeddings_gradients", select(&grad, "input_embeddings_gradients")?.value);
        }
        if let Some((state, target)) = average {
            *target = std::mem::take(&mut *state.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let mut cache = Arc::try_unwrap(cache).map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).unwrap_or_else(|arc| {
            let c = arc.lock().unwrap_or_else(|e| e.into_inner());
            c.clone()
        });
        fold_statistics(&mut cache, config.avg);
        if config.save_logits {
            let logits = logits.ok_or_else(|| TorchError::Input("save_logits needs the logits: the forward stopped early".into()))?;
            cache.insert("logits", select(&logits.detach(), "logits")?.value);
        }
        let mut mapping = serde_json::Map::new();
        let mut row = 0usize;
        for (i, grp) in token_groups.groups().iter().enumerate() {
            let n = if config.avg { 1 } else { grp.len() };
            mapping.insert(i.to_string(), serde_json::Value::from((row..row + n).collect::<Vec<_>>()));
            row += n;
        }
        if config.avg {
            mapping.insert("info".into(), "avg".into());
        }
        cache.insert("mapping_index", serde_json::Value::Object(mapping));
        Ok(cache)
    }
}

/// Gathers the `last_layernorm\0group\0stat` entries into easyroutine's shape: one map of
/// statistics, or (with `avg`) a list of maps, one per group.
fn fold_statistics(cache: &mut ActivationCache, avg: bool) {
    let keys: Vec<String> = cache.keys().filter(|k| k.starts_with("last_layernorm\u{0}")).map(String::from).collect();
    if keys.is_empty() {
        return;
    }
    let mut groups: Vec<indexmap::IndexMap<String, CacheValue>> = Vec::new();
    for k in keys {
        let v = cache.remove(&k).expect("listed");
        let mut parts = k.split('\u{0}').skip(1);
        let gi: usize = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let name = parts.next().unwrap_or("").to_string();
        while groups.len() <= gi {
            groups.push(indexmap::IndexMap::new());
        }
        groups[gi].insert(name, v);
    }
    let value = if avg { CacheValue::List(groups.into_iter().map(CacheValue::Map).collect()) } else { CacheValue::Map(groups.remove(0)) };
    cache.insert("last_layernorm", value);
}
