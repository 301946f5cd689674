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
use hook_ops::fused::{self, QkvLayout};
use hook_ops::heads::{self, Projected};
use hook_ops::pattern::{self, RunningPatternAverage};
use hook_ops::{resid, stats, HeadLayout, Keyed, PatternAvg, Qkv};
use tch::Tensor;

use crate::module::BoxedHook;
use crate::padding::{self, unpadded, Pads};

/// The cache the catalogue's hooks write into.
pub type SharedCache = Arc<Mutex<ActivationCache>>;

/// The part of a site's output a hook reads: the whole tensor, or the queries, keys or values
/// of a fused projection (GPT-2 `c_attn`, NeoX `query_key_value`, Phi-3 `qkv_proj`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part {
    pub(crate) fused: QkvLayout,
    pub(crate) which: Qkv,
    pub(crate) layout: HeadLayout,
}

fn part_of(x: &Tensor, part: Option<Part>) -> hook_ops::Result<Tensor> {
    match part {
        Some(p) => fused::qkv_part(x, p.fused, p.which, &p.layout),
        None => Ok(x.shallow_clone()),
    }
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

/// A hook that applies `f` to the main tensor (each example with its own padding offset, the
/// groups moved by it) and stores what it returns.
pub(crate) fn extractor(
    cache: &SharedCache,
    pads: &Pads,
    groups: Vec<TokenGroups>,
    mut f: impl FnMut(&Tensor, &[TokenGroups]) -> hook_ops::Result<Vec<Keyed>> + Send + 'static,
) -> BoxedHook {
    let cache = cache.clone();
    let pads = pads.clone();
    Box::new(move |_ctx: &HookContext<'_>, io: &HookIo<Tensor>| {
        let x = io.main_tensor()?;
        let entries = padding::each_example_keyed(x, &pads, &groups, &mut f).map_err(hook_err)?;
        store(&cache, entries);
        Ok(None)
    })
}

/// [`save_resid_hook`] on a padded batch, of the whole main tensor or of its q/k/v `part`.
pub(crate) fn resid_padded(cache: &SharedCache, pads: &Pads, key: String, groups: TokenGroups, avg: bool, part: Option<Part>) -> BoxedHook {
    let info = avg.then_some(resid::AVG_INFO);
    extractor(cache, pads, vec![groups], move |x, g| Ok(vec![Keyed { key: key.clone(), value: resid::resid(&part_of(x, part)?, &g[0], avg)?, info }]))
}

/// [`query_key_value_hook`] on a padded batch, of the whole main tensor or of its q/k/v `part`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_key_value_padded(
    cache: &SharedCache,
    pads: &Pads,
    prefix: &'static str,
    groups: TokenGroups,
    layer: usize,
    part: Option<Part>,
    layout: HeadLayout,
    head: HeadSelection,
    avg: bool,
) -> BoxedHook {
    extractor(cache, pads, vec![groups], move |x, g| heads::query_key_value(&part_of(x, part)?, prefix, layer, &layout, &g[0], head, avg))
}

/// [`head_out_hook`] on a padded batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_out_padded(
    cache: &SharedCache,
    pads: &Pads,
    prefix: &'static str,
    groups: TokenGroups,
    layer: usize,
    layout: HeadLayout,
    o_proj: (Tensor, Option<Tensor>),
    head: HeadSelection,
    avg: bool,
) -> BoxedHook {
    let (w, b) = o_proj;
    extractor(cache, pads, vec![groups], move |x, g| heads::head_out(x, prefix, layer, &layout, &w, b.as_ref(), &g[0], head, avg))
}

/// [`projected_vectors_hook`] on a padded batch, of the q/k/v `part` of the site's output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn projected_padded(
    cache: &SharedCache,
    pads: &Pads,
    which: Projected,
    groups: TokenGroups,
    layer: usize,
    part: Option<Part>,
    layout: HeadLayout,
    out_proj: (Tensor, Option<Tensor>),
    head: HeadSelection,
    avg: bool,
) -> BoxedHook {
    let (w, b) = out_proj;
    extractor(cache, pads, vec![groups], move |x, g| heads::projected_vectors(&part_of(x, part)?, which, layer, &layout, &w, b.as_ref(), &g[0], head, avg))
}

/// [`attention_pattern_hook`] on a padded batch.
pub(crate) fn attention_pattern_padded(
    cache: &SharedCache,
    pads: &Pads,
    groups: TokenGroups,
    layer: usize,
    head: HeadSelection,
    mode: PatternAvg,
    rows: Option<TokenGroups>,
) -> BoxedHook {
    let has_rows = rows.is_some();
    let mut gs = vec![groups];
    gs.extend(rows);
    extractor(cache, pads, gs, move |x, g| pattern::attention_pattern(x, layer, &g[0], if has_rows { Some(&g[1]) } else { None }, head, mode))
}

/// `save_resid_hook`: the selected tokens (or one mean per group with `avg`) under `cache_key`.
pub fn save_resid_hook(cache: &SharedCache, cache_key: &str, token_indexes: TokenGroups, avg: bool) -> BoxedHook {
    resid_padded(cache, &unpadded(), cache_key.to_string(), token_indexes, avg, None)
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
    query_key_value_padded(cache, &unpadded(), cache_key, token_indexes, layer, None, layout, head, avg)
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
    head_out_padded(cache, &unpadded(), cache_key, token_indexes, layer, layout, (o_proj_weight, o_proj_bias), head, avg)
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
    projected_padded(cache, &unpadded(), which, token_indexes, layer, None, layout, (out_proj_weight, out_proj_bias), head, avg)
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
    attention_pattern_padded(cache, &unpadded(), token_indexes, layer, head, attn_pattern_avg, attn_pattern_row_partition)
}

/// `avg_attention_pattern_head`: folds this batch's patterns into a running average.
pub fn avg_attention_pattern_hook(state: Arc<Mutex<RunningPatternAverage>>, token_indexes: TokenGroups, layer: usize, batch_idx: usize) -> BoxedHook {
    avg_attention_pattern_padded(state, &unpadded(), token_indexes, layer, batch_idx)
}

/// [`avg_attention_pattern_hook`] on a batch: the examples must share one padding offset
/// (easyroutine's running average takes one pattern shape per batch).
pub(crate) fn avg_attention_pattern_padded(state: Arc<Mutex<RunningPatternAverage>>, pads: &Pads, token_indexes: TokenGroups, layer: usize, batch_idx: usize) -> BoxedHook {
    let pads = pads.clone();
    Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
        if !padding::uniform(&pads) {
            return Err(hook_core::CoreError::hook_message("", "avg_over_example needs examples of one length in a batch (no padding differences)"));
        }
        let g = padding::shift_groups(&token_indexes, pads[0])?;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.update_pattern(io.main_tensor()?, layer, &g, batch_idx, None).map_err(hook_err)?;
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
    hook_core::CoreError::hook("", e)
}
