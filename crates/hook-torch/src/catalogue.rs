//! easyroutine's hook catalogue as ready hooks: each function takes hooks.py's parameters and
//! returns a hook to attach with [`HookedModule::add_boxed_hook`](crate::HookedModule::add_boxed_hook) (or
//! pass as a scoped hook) that writes into a shared [`ActivationCache`], using the same
//! hook-ops functions as `run_with_cache`. Positions are used as given (no padding offsets).
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use hook_cache::ActivationCache;
//! use hook_torch::{catalogue, HookedModule};
//!
//! let mut m = HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
//! let cache = Arc::new(Mutex::new(ActivationCache::new()));
//! let groups = "[(-1,)]".parse().unwrap();
//! m.add_boxed_hook("model.layers[1].output", catalogue::save_resid_hook(&cache, "resid_out_1", groups, false)).unwrap();
//! ```

use std::sync::{Arc, Mutex};

use hook_cache::ActivationCache;
use hook_core::{HeadSelection, HookContext, HookIo, TokenGroups};
use hook_ops::heads::{self, Projected};
use hook_ops::pattern::{self, RunningPatternAverage};
use hook_ops::{resid, stats, HeadLayout, Keyed, PatternAvg};
use tch::Tensor;

use crate::extract::extractor;
use crate::module::BoxedHook;

/// The cache the catalogue's hooks write into.
pub type SharedCache = Arc<Mutex<ActivationCache>>;

fn unpadded() -> Arc<Vec<i64>> {
    Arc::new(vec![0])
}

/// `save_resid_hook`: the selected tokens (or one mean per group with `avg`) under `cache_key`.
pub fn save_resid_hook(cache: &SharedCache, cache_key: &str, token_indexes: TokenGroups, avg: bool) -> BoxedHook {
    let key = cache_key.to_string();
    let info = avg.then_some(resid::AVG_INFO);
    extractor(cache, &unpadded(), vec![token_indexes], move |x, g| Ok(vec![Keyed { key: key.clone(), value: resid::resid(x, &g[0], avg)?, info }]))
}

/// `input_embedding_hook` without gradients: the same as [`save_resid_hook`].
pub fn input_embedding_hook(cache: &SharedCache, cache_key: &str, token_indexes: TokenGroups, avg: bool) -> BoxedHook {
    save_resid_hook(cache, cache_key, token_indexes, avg)
}

/// `embed_hook`: one `[batch, |group|, d]` slice per group under `cache_key/i` entries of a tuple.
pub fn embed_hook(cache: &SharedCache, cache_key: &str, token_indexes: TokenGroups) -> BoxedHook {
    let cache = cache.clone();
    let key = cache_key.to_string();
    Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
        let parts = resid::embed_slices(io.main_tensor()?, &token_indexes).map_err(hook_err)?;
        let value = hook_cache::CacheValue::Tuple(parts.into_iter().map(|t| t.detach().into()).collect());
        cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), value);
        Ok(None)
    })
}

/// `layernom_hook`: mean / variance / second moment of the selected tokens under `cache_key`
/// (a list of them, one per group, with `avg`).
pub fn layernorm_hook(cache: &SharedCache, cache_key: &str, token_indexes: TokenGroups, avg: bool) -> BoxedHook {
    let c = cache.clone();
    let key = cache_key.to_string();
    Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
        let all = stats::layernorm_statistics(io.main_tensor()?, &token_indexes, avg).map_err(hook_err)?;
        let maps: Vec<hook_cache::CacheValue> = all
            .into_iter()
            .map(|s| hook_cache::CacheValue::Map(s.into_named().into_iter().map(|(k, v)| (k.to_string(), v.detach().into())).collect()))
            .collect();
        let value = if avg { hook_cache::CacheValue::List(maps) } else { maps.into_iter().next().expect("one set without avg") };
        c.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), value);
        Ok(None)
    })
}

/// `query_key_value_hook`: per-head `[batch, tokens, head_dim]` entries `{cache_key}L{layer}H{h}`.
pub fn query_key_value_hook(
    cache: &SharedCache,
    cache_key: &'static str,
    token_indexes: TokenGroups,
    layer: usize,
    layout: HeadLayout,
    head: HeadSelection,
    avg: bool,
) -> BoxedHook {
    extractor(cache, &unpadded(), vec![token_indexes], move |x, g| heads::query_key_value(x, cache_key, layer, &layout, &g[0], head, avg))
}

/// `head_out_hook` on the input of `o_proj`: each head's W_O contribution `{cache_key}L{layer}H{h}`.
#[allow(clippy::too_many_arguments)]
pub fn head_out_hook(
    cache: &SharedCache,
    cache_key: &'static str,
    token_indexes: TokenGroups,
    layer: usize,
    layout: HeadLayout,
    o_proj_weight: Tensor,
    o_proj_bias: Option<Tensor>,
    head: HeadSelection,
    avg: bool,
) -> BoxedHook {
    extractor(cache, &unpadded(), vec![token_indexes], move |x, g| {
        heads::head_out(x, cache_key, layer, &layout, &o_proj_weight, o_proj_bias.as_ref(), &g[0], head, avg)
    })
}

/// `projected_{value,key,query}_vectors_head`: `projected_{value,key,query}_L{layer}H{h}`.
#[allow(clippy::too_many_arguments)]
pub fn projected_vectors_hook(
    cache: &SharedCache,
    which: Projected,
    token_indexes: TokenGroups,
    layer: usize,
    layout: HeadLayout,
    out_proj_weight: Tensor,
    out_proj_bias: Option<Tensor>,
    head: HeadSelection,
    avg: bool,
) -> BoxedHook {
    extractor(cache, &unpadded(), vec![token_indexes], move |x, g| {
        heads::projected_vectors(x, which, layer, &layout, &out_proj_weight, out_proj_bias.as_ref(), &g[0], head, avg)
    })
}

/// `attention_pattern_head` on an attention-matrix site: `pattern_L{layer}H{h}`.
pub fn attention_pattern_hook(
    cache: &SharedCache,
    token_indexes: TokenGroups,
    layer: usize,
    head: HeadSelection,
    attn_pattern_avg: PatternAvg,
    attn_pattern_row_partition: Option<TokenGroups>,
) -> BoxedHook {
    let has_rows = attn_pattern_row_partition.is_some();
    let mut groups = vec![token_indexes];
    groups.extend(attn_pattern_row_partition);
    extractor(cache, &unpadded(), groups, move |x, g| pattern::attention_pattern(x, layer, &g[0], if has_rows { Some(&g[1]) } else { None }, head, attn_pattern_avg))
}

/// `avg_attention_pattern_head`: folds this batch's patterns into a running average.
pub fn avg_attention_pattern_hook(state: Arc<Mutex<RunningPatternAverage>>, token_indexes: TokenGroups, layer: usize, batch_idx: usize) -> BoxedHook {
    Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.update_pattern(io.main_tensor()?, layer, &token_indexes, batch_idx, None).map_err(hook_err)?;
        Ok(None)
    })
}

/// `avg_hook`: image / text / all means under `avg_{cache_key}`.
pub fn avg_hook(cache: &SharedCache, cache_key: &str, last_image_idx: usize, end_image_idx: usize) -> BoxedHook {
    let c = cache.clone();
    let key = format!("avg_{cache_key}");
    Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
        let v = resid::image_text_all_means(io.main_tensor()?, last_image_idx, end_image_idx).map_err(hook_err)?;
        c.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), v.detach());
        Ok(None)
    })
}

fn hook_err(e: hook_ops::OpsError) -> hook_core::CoreError {
    hook_core::CoreError::Hook { component: String::new(), message: e.to_string() }
}
