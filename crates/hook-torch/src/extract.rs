//! [`ExtractionConfig`] (easyroutine's fields, names and defaults) and
//! [`HookedModule::run_with_cache`]: one forward pass that fills an [`ActivationCache`] with
//! the keys easyroutine would write.
//!
//! Batches may hold several prompts, left-padded: token positions are relative to each
//! example's own tokens (position 0 is its first real token, -1 its last), so every example
//! gets the values it would get run alone.

use std::sync::{Arc, Mutex};

use hook_cache::{ActivationCache, CacheValue};
use hook_core::{keys, HeadSelection, HookContext, HookIo, TokenGroups};
use hook_ops::heads::{self, Projected};
use hook_ops::pattern::{self, RunningPatternAverage};
use hook_ops::{resid, stats, Keyed, PatternAvg, Qkv};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::description::ModelDescription;
use crate::error::{Result, TorchError};
use crate::module::{BoxedHook, HookedModule};

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

/// Left-padding offsets of each example (`seq - sum(mask)`).
pub(crate) fn pads(mask: &Tensor) -> Result<Vec<i64>> {
    let s = mask.size()[1];
    let sums: Vec<i64> = Vec::<i64>::try_from(mask.f_sum_dim_intlist(Some(&[1i64][..]), false, Kind::Int64)?.f_to_device(tch::Device::Cpu)?)?;
    Ok(sums.into_iter().map(|n| s - n).collect())
}

/// Groups with non-negative positions shifted by `pad` (negative ones count from the end,
/// which left padding does not move).
fn shifted(g: &TokenGroups, pad: i64) -> hook_core::Result<TokenGroups> {
    TokenGroups::new(g.groups().iter().map(|grp| grp.iter().map(|&p| if p >= 0 { p + pad } else { p }).collect()).collect())
}

/// Runs `f` on the whole batch when no example is padded differently, else on each example
/// with its shifted groups, and concatenates the entries of the examples along dim 0.
fn per_example(
    x: &Tensor,
    pads: &[i64],
    groups: &[&TokenGroups],
    f: &mut dyn FnMut(&Tensor, &[TokenGroups]) -> hook_ops::Result<Vec<Keyed>>,
) -> hook_ops::Result<Vec<Keyed>> {
    if pads.iter().all(|&p| p == pads[0]) {
        let g: Vec<TokenGroups> = groups.iter().map(|g| shifted(g, pads[0])).collect::<hook_core::Result<_>>()?;
        return f(x, &g);
    }
    let mut parts: Vec<Vec<Keyed>> = Vec::new();
    for (b, &pad) in pads.iter().enumerate() {
        let g: Vec<TokenGroups> = groups.iter().map(|g| shifted(g, pad)).collect::<hook_core::Result<_>>()?;
        parts.push(f(&x.f_narrow(0, b as i64, 1)?, &g)?);
    }
    let first = parts.remove(0);
    first
        .into_iter()
        .enumerate()
        .map(|(i, k)| {
            let mut all = vec![k.value];
            all.extend(parts.iter().map(|p| p[i].value.shallow_clone()));
            Ok(Keyed { key: k.key, value: Tensor::f_cat(&all, 0)?, info: k.info })
        })
        .collect()
}

pub(crate) type SharedCache = Arc<Mutex<ActivationCache>>;

/// Extra options of [`HookedModule::run_with_cache_options`].
#[derive(Default)]
pub struct RunOptions<'a> {
    /// For `avg_over_example`: the running average and this batch's index.
    pub average: Option<(&'a mut RunningPatternAverage, usize)>,
    /// For `keep_gradient`: the vocabulary entry whose last-position logit is differentiated.
    pub vocabulary_index: Option<i64>,
    /// Interventions applied during the extraction.
    pub interventions: &'a [crate::intervention::Intervention],
    /// Stop the forward pass as soon as every hooked site (extraction, interventions, stored
    /// hooks) has fired, instead of running the rest of the model and the LM head. Needs
    /// `save_logits` and `keep_gradient` off (they need the end of the forward); the returned
    /// logits are then an empty tensor (shape `[0]`).
    pub stop_early: bool,
}

fn store(cache: &SharedCache, entries: Vec<Keyed>) {
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    for k in entries {
        let value = k.value.detach();
        match k.info {
            Some(info) => c.add_with_info(k.key, value, info),
            None => {
                c.insert(k.key, value);
            }
        }
    }
}

/// A hook that applies `f` to the main tensor (with the per-example positions) and stores
/// what it returns.
pub(crate) fn extractor(
    cache: &SharedCache,
    pads: &Arc<Vec<i64>>,
    groups: Vec<TokenGroups>,
    mut f: impl FnMut(&Tensor, &[TokenGroups]) -> hook_ops::Result<Vec<Keyed>> + Send + 'static,
) -> BoxedHook {
    let cache = cache.clone();
    let pads = pads.clone();
    Box::new(move |_ctx: &HookContext<'_>, io: &HookIo<Tensor>| {
        let x = io.main_tensor()?;
        let refs: Vec<&TokenGroups> = groups.iter().collect();
        let entries = per_example(x, &pads, &refs, &mut f).map_err(|e| hook_core::CoreError::Hook { component: String::new(), message: e.to_string() })?;
        store(&cache, entries);
        Ok(None)
    })
}

impl HookedModule {
    /// easyroutine's forward with an `ExtractionConfig`: returns the logits `[batch, seq,
    /// vocab]` and the cache (keys as easyroutine writes them, plus `logits` at the selected
    /// positions when `save_logits`, and `mapping_index`: group name → rows of the flattened
    /// token axis).
    ///
    /// `token_groups` are easyroutine's `token_indexes` (positions per example; negative
    /// from the end). Runs without gradient tracking.
    pub fn run_with_cache(
        &mut self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_groups: &TokenGroups,
        config: &ExtractionConfig,
    ) -> Result<(Tensor, ActivationCache)> {
        self.run_with_cache_and_average(input_ids, attention_mask, token_groups, config, None)
    }

    /// [`HookedModule::run_with_cache`] with `avg_over_example`: attention patterns are folded
    /// into `average` (batch `batch_idx` of a running mean) instead of being stored per batch.
    pub fn run_with_cache_and_average(
        &mut self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_groups: &TokenGroups,
        config: &ExtractionConfig,
        average: Option<(&mut RunningPatternAverage, usize)>,
    ) -> Result<(Tensor, ActivationCache)> {
        self.run_with_cache_options(input_ids, attention_mask, token_groups, config, RunOptions { average, ..RunOptions::default() })
    }

    /// [`HookedModule::run_with_cache`] with every option: a running average of patterns
    /// (`avg_over_example`), the vocabulary index whose last-position logit `keep_gradient`
    /// differentiates, and interventions applied during the extraction (before the
    /// extraction hooks of a site, as easyroutine registers them first).
    pub fn run_with_cache_options(
        &mut self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_groups: &TokenGroups,
        config: &ExtractionConfig,
        options: RunOptions<'_>,
    ) -> Result<(Tensor, ActivationCache)> {
        let RunOptions { average, vocabulary_index, interventions, stop_early } = options;
        if stop_early && (config.save_logits || config.keep_gradient) {
            return Err(TorchError::Input(
                "stop_early needs save_logits and keep_gradient off: the logits (and their gradient) come from the end of the forward pass".into(),
            ));
        }
        if config.keep_gradient && (!config.extract_embed || vocabulary_index.is_none()) {
            return Err(TorchError::Input(
                "keep_gradient needs extract_embed and a vocabulary index (RunOptions::vocabulary_index): the gradient of that logit at the last position w.r.t. the input embeddings is stored as input_embeddings_gradients".into(),
            ));
        }
        let d = self.require_description()?.clone();
        let (ids, mask) = self.check_inputs(input_ids, attention_mask)?;
        let seq = ids.size()[1] as usize;
        let pads = Arc::new(pads(&mask)?);
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
        let (layers, heads): (Vec<usize>, Vec<HeadSelection>) = match &config.attn_heads {
            AttnHeads::All => ((0..n_layers).collect(), vec![HeadSelection::All; n_layers]),
            AttnHeads::List(l) => {
                for lh in l {
                    if lh.layer >= n_layers || lh.head >= d.num_attention_heads {
                        return Err(TorchError::Input(format!(
                            "attn_heads has layer {} head {}: the model has layers 0..{n_layers} and heads 0..{}",
                            lh.layer, lh.head, d.num_attention_heads
                        )));
                    }
                }
                (l.iter().map(|x| x.layer).collect(), l.iter().map(|x| HeadSelection::One(x.head)).collect())
            }
        };
        let cache: SharedCache = Arc::new(Mutex::new(ActivationCache::new()));
        let g = token_groups.clone();
        let avg = config.avg;
        let mut hooks: Vec<(String, BoxedHook)> = Vec::new();
        for iv in interventions {
            hooks.push((iv.component(self)?, iv.hook(self, pads.clone())?));
        }
        let comp = |name: &str, l: usize| d.component(name, l);
        let weight = |l: usize| -> Result<(Tensor, Option<Tensor>)> {
            let w = self.parameter(&d.component("attn_out_proj_weight", l)?).ok_or_else(|| TorchError::Description(format!("names no parameter for layer {l}'s o_proj weight")))?;
            let b = self.parameter(&d.component("attn_out_proj_bias", l)?).map(Tensor::shallow_clone);
            Ok((d.o_proj_weight(w), b))
        };
        // q/k/v sites: the part of a fused projection's output, or the whole output
        let fused = d.qkv_layout;
        let part = move |x: &Tensor, which: Qkv| hook_ops::fused::qkv_part(x, fused, which, &layout);
        // `[batch, seq, d]` at the token groups, of the main tensor or (`which`) of its q/k/v part
        let resid_of = |hooks: &mut Vec<(String, BoxedHook)>, template: &str, key: String, layer: usize, which: Option<Qkv>| -> Result<()> {
            let info = avg.then_some(resid::AVG_INFO);
            hooks.push((
                comp(template, layer)?,
                extractor(&cache, &pads, vec![g.clone()], move |x, g| {
                    let x = match which {
                        Some(w) => part(x, w)?,
                        None => x.shallow_clone(),
                    };
                    Ok(vec![Keyed { key: key.clone(), value: resid::resid(&x, &g[0], avg)?, info }])
                }),
            ));
            Ok(())
        };
        let resid_hook = |hooks: &mut Vec<(String, BoxedHook)>, template: &str, key: String, layer: usize| resid_of(hooks, template, key, layer, None);
        // Registration order follows easyroutine's create_hooks, so the keys of one site come in its order.
        for l in 0..n_layers {
            if config.extract_resid_out {
                resid_hook(&mut hooks, "residual_stream_hook_name", keys::resid_out(l), l)?;
            }
        }
        for l in 0..n_layers {
            if config.extract_resid_in {
                resid_hook(&mut hooks, "residual_stream_input_hook_name", keys::resid_in(l), l)?;
            }
        }
        for l in 0..n_layers {
            if config.extract_resid_in_post_layernorm {
                resid_hook(&mut hooks, "residual_stream_input_post_layernorm_hook_name", keys::resid_in_post_layernorm(l), l)?;
            }
        }
        if config.save_input_ids {
            cache.lock().unwrap_or_else(|e| e.into_inner()).insert("input_ids", ids.shallow_clone());
        }
        let embed_leaf: Arc<Mutex<Option<Tensor>>> = Arc::new(Mutex::new(None));
        if config.extract_embed && config.keep_gradient {
            // the embeddings become a leaf that requires grad; the rest of the forward reads it
            let slot = embed_leaf.clone();
            hooks.push((
                comp("embed_tokens", 0)?,
                Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                    let leaf = io.main_tensor()?.detach().set_requires_grad(true);
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(leaf.shallow_clone());
                    Ok(Some(leaf))
                }),
            ));
        } else if config.extract_embed {
            resid_hook(&mut hooks, "embed_tokens", "input_embeddings".into(), 0)?;
        }
        // q/k/v sites, listed in forward order (q, k, v): separate projections fire in that
        // order whatever the registration order, and hooks on one fused site run in
        // registration order, so the cache keys come in the same order on every family.
        for (flag, which, prefix) in [
            (config.extract_head_queries, Qkv::Query, "head_queries_"),
            (config.extract_head_keys, Qkv::Key, "head_keys_"),
            (config.extract_head_values, Qkv::Value, "head_values_"),
        ] {
            if !flag {
                continue;
            }
            for (&l, &h) in layers.iter().zip(&heads) {
                hooks.push((
                    comp(ModelDescription::qkv_template(which), l)?,
                    extractor(&cache, &pads, vec![g.clone()], move |x, g| heads::query_key_value(&part(x, which)?, prefix, l, &layout, &g[0], h, avg)),
                ));
            }
        }
        for (flag, which, prefix) in [
            (config.extract_queries, Qkv::Query, "queries_"),
            (config.extract_keys, Qkv::Key, "keys_"),
            (config.extract_values, Qkv::Value, "values_"),
        ] {
            if flag {
                for l in 0..n_layers {
                    resid_of(&mut hooks, ModelDescription::qkv_template(which), keys::layer_head_free_key(prefix, l), l, Some(which))?;
                }
            }
        }
        if config.extract_head_out {
            for (&l, &h) in layers.iter().zip(&heads) {
                let (w, b) = weight(l)?;
                hooks.push((
                    comp("attn_o_proj_input_hook_name", l)?,
                    extractor(&cache, &pads, vec![g.clone()], move |x, g| heads::head_out(x, "head_out_", l, &layout, &w, b.as_ref(), &g[0], h, avg)),
                ));
            }
        }
        for (flag, template, key) in [
            (config.extract_attn_in, "attn_in_hook_name", keys::attn_in as fn(usize) -> String),
            (config.extract_attn_out, "attn_out_hook_name", keys::attn_out),
            (config.extract_resid_mid, "intermediate_stream_hook_name", keys::resid_mid),
            (config.extract_mlp_out, "mlp_out_hook_name", keys::mlp_out),
        ] {
            if flag {
                for l in 0..n_layers {
                    resid_hook(&mut hooks, template, key(l), l)?;
                }
            }
        }
        if config.extract_last_layernorm {
            hooks.push((
                comp("last_layernorm_hook_name", 0)?,
                extractor(&cache, &pads, vec![g.clone()], move |x, g| {
                    let s = stats::layernorm_statistics(x, &g[0], avg)?;
                    Ok(s.into_iter()
                        .enumerate()
                        .flat_map(|(i, st)| st.into_named().into_iter().map(move |(n, v)| Keyed::new(format!("last_layernorm\u{0}{i}\u{0}{n}"), v)))
                        .collect())
                }),
            ));
        }
        for (flag, which, qkv) in [
            (config.extract_head_queries_projected, Projected::Query, Qkv::Query),
            (config.extract_head_keys_projected, Projected::Key, Qkv::Key),
            (config.extract_head_values_projected, Projected::Value, Qkv::Value),
        ] {
            if !flag {
                continue;
            }
            for (&l, &h) in layers.iter().zip(&heads) {
                let (w, b) = weight(l)?;
                hooks.push((
                    comp(ModelDescription::qkv_template(qkv), l)?,
                    extractor(&cache, &pads, vec![g.clone()], move |x, g| heads::projected_vectors(&part(x, qkv)?, which, l, &layout, &w, b.as_ref(), &g[0], h, avg)),
                ));
            }
        }
        let average = average.map(|(a, i)| (Arc::new(Mutex::new(std::mem::take(a))), i, a));
        if config.extract_attn_pattern {
            match &average {
                Some((state, batch_idx, _)) if config.avg_over_example => {
                    for l in 0..n_layers {
                        let state = state.clone();
                        let batch_idx = *batch_idx;
                        let g = g.clone();
                        let pads = pads.clone();
                        hooks.push((
                            comp("attn_matrix_hook_name", l)?,
                            Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                                let x = io.main_tensor()?;
                                let g = shifted(&g, pads[0])?;
                                if pads.iter().any(|&p| p != pads[0]) {
                                    return Err(hook_core::CoreError::Hook {
                                        component: String::new(),
                                        message: "avg_over_example needs examples of one length in a batch (no padding differences)".into(),
                                    });
                                }
                                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                                s.update_pattern(x, l, &g, batch_idx, None).map_err(|e| hook_core::CoreError::Hook { component: String::new(), message: e.to_string() })?;
                                Ok(None)
                            }),
                        ));
                    }
                }
                _ => {
                    let rows = config.attn_pattern_row_positions.clone();
                    let mode = config.attn_pattern_avg;
                    for (&l, &h) in layers.iter().zip(&heads) {
                        let mut gs = vec![g.clone()];
                        gs.extend(rows.clone());
                        let has_rows = rows.is_some();
                        hooks.push((
                            comp("attn_matrix_hook_name", l)?,
                            extractor(&cache, &pads, gs, move |x, g| pattern::attention_pattern(x, l, &g[0], if has_rows { Some(&g[1]) } else { None }, h, mode)),
                        ));
                    }
                }
            }
        }
        let logits = if config.keep_gradient {
            self.run_checked(ids.shallow_clone(), mask.shallow_clone(), hooks)?
        } else {
            tch::no_grad(|| self.run_checked_until(ids.shallow_clone(), mask.shallow_clone(), hooks, stop_early))?
                .unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, ids.device())))
        };
        if config.keep_gradient {
            let leaf = embed_leaf.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| TorchError::Hook {
                component: d.component("embed_tokens", 0).unwrap_or_default(),
                message: "the embedding site did not fire".into(),
            })?;
            let v = vocabulary_index.expect("checked above");
            if v < 0 || v >= d.vocab_size as i64 {
                return Err(TorchError::Input(format!("vocabulary_index {v} is out of the vocabulary 0..{}", d.vocab_size)));
            }
            // every example's last (real) position; examples do not interact, so one backward
            let target = logits.f_select(1, -1)?.f_select(1, v)?.f_sum(Kind::Float)?;
            let grad = Tensor::f_run_backward(&[target], &[&leaf], false, false)?.remove(0);
            let sel = |t: &Tensor| per_example(t, &pads, &[token_groups], &mut |x, g| Ok(vec![Keyed::new("x", resid::resid(x, &g[0], false)?)]));
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            c.insert("input_embeddings", sel(&leaf.detach())?.remove(0).value);
            c.insert("input_embeddings_gradients", sel(&grad)?.remove(0).value);
        }
        let logits = logits.detach();
        if let Some((state, _, target)) = average {
            *target = std::mem::take(&mut *state.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let mut cache = Arc::try_unwrap(cache).map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).unwrap_or_else(|arc| {
            let c = arc.lock().unwrap_or_else(|e| e.into_inner());
            c.clone()
        });
        fold_statistics(&mut cache, avg);
        if config.save_logits {
            let sel = per_example(&logits, &pads, &[token_groups], &mut |x, g| Ok(vec![Keyed::new("logits", resid::resid(x, &g[0], false)?)]))?;
            store_into(&mut cache, sel);
        }
        let mut mapping = serde_json::Map::new();
        let mut row = 0usize;
        for (i, grp) in token_groups.groups().iter().enumerate() {
            let n = if avg { 1 } else { grp.len() };
            mapping.insert(i.to_string(), serde_json::Value::from((row..row + n).collect::<Vec<_>>()));
            row += n;
        }
        if avg {
            mapping.insert("info".into(), "avg".into());
        }
        cache.insert("mapping_index", serde_json::Value::Object(mapping));
        Ok((logits, cache))
    }
}

fn store_into(cache: &mut ActivationCache, entries: Vec<Keyed>) {
    for k in entries {
        cache.insert(k.key, k.value);
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
