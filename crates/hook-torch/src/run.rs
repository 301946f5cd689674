//! Running the model: [`HookedModule::run`] with a [`RunSpec`] (hooks for this call,
//! interventions, an extraction, early stop, gradients) is the one forward pass; the other
//! ways of running the model are short cuts to it.
//!
//! | call | what it is |
//! |---|---|
//! | [`HookedModule::forward`] | the stored hooks only; the logits |
//! | [`HookedModule::run_with_hooks`] | plus hooks for this call |
//! | [`HookedModule::run_with_interventions`] | plus interventions (no gradients) |
//! | [`HookedModule::run_with_cache`] | an extraction: the logits and the cache |
//! | [`HookedModule::step`] | the next tokens after those in a [`KvCache`] (generation) |
//! | [`HookedModule::patch_activations`] | a clean run recording sites, then a corrupted run with them patched in |
//!
//! At each site the hooks run in this order: the stored ones, the interventions, the hooks of
//! the spec, then the extraction's (so the cache holds what the model computed after every
//! edit, as easyroutine registers interventions first).

use std::sync::{Arc, Mutex};

use hook_cache::ActivationCache;
use hook_core::{HookContext, HookIo, TokenGroups};
use tch::{Kind, Tensor};

use crate::error::{Result, TorchError};
use crate::extract::{Extraction, ExtractionConfig, Plan};
use crate::intervention::{Intervention, PatchValue};
use crate::kv_cache::KvCache;
use crate::module::{BoxedHook, HookedModule};
use crate::reshape::Reshape;
use crate::padding;

/// What one forward pass does besides computing the logits.
///
/// ```no_run
/// use hook_torch::{Extraction, ExtractionConfig, HookedModule, RunSpec};
/// let mut m = HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
/// let ids = tch::Tensor::from_slice(&[5i64, 6, 7]).view([1, 3]);
/// let groups = "[[-1]]".parse().unwrap();
/// let config = ExtractionConfig::default().with_flags(&["resid_out"]).unwrap();
/// let out = m.run(&ids, &ids.ones_like(), RunSpec { extraction: Some(Extraction::new(&groups, &config)), ..RunSpec::default() }).unwrap();
/// assert!(out.cache.contains("resid_out_0"));
/// ```
#[derive(Default)]
pub struct RunSpec<'a> {
    /// Hooks for this call only: (component, hook).
    pub hooks: Vec<(String, BoxedHook)>,
    /// Interventions (positions relative to each example's tokens).
    pub interventions: &'a [Intervention],
    /// Interventions of each row of the batch on its own (empty: none; else one list per
    /// example): many cells of a patching or ablation sweep run as the rows of one forward.
    /// Each row's interventions see that row only (its values have batch size 1), after the
    /// batch-wide `interventions`.
    pub row_interventions: &'a [Vec<Intervention>],
    /// An extraction into the returned cache.
    pub extraction: Option<Extraction<'a>>,
    /// Stop the forward pass as soon as every hooked site has fired, instead of running the
    /// rest of the model and the LM head: the logits are then `None`. An extraction must have
    /// `save_logits` and `keep_gradient` off (they need the end of the forward).
    pub stop_early: bool,
    /// Run with the caller's gradient mode (autograd records the forward, as a plain
    /// `forward` does); otherwise the forward runs without gradient tracking. An extraction
    /// with `keep_gradient` always tracks gradients.
    pub track_gradients: bool,
    /// Run the start of the forward once for many rows ([`Fork`]): `input_ids` holds one
    /// example, which becomes [`Fork::rows`] copies at [`Fork::component`]; each copy takes
    /// its own list of `row_interventions`. `None`: the batch is what `input_ids` holds.
    pub fork: Option<Fork>,
    /// Unembed only these positions of each row (negative from the end; they index the
    /// sequence as given, padding included): the logits are `[batch, positions, vocab]`, and
    /// the unembedding costs that many positions instead of the whole sequence. `None`: every
    /// position. The positions are taken at the unembedding's input (the module of the
    /// description's `unembed_matrix`), after the hooks there. A position outside the
    /// sequence is refused before the forward runs; a cached step refuses them all (it
    /// unembeds its last position only).
    pub logit_positions: Option<Vec<i64>>,
}

/// Where a forward of one example turns into many rows ([`RunSpec::fork`]): the part of the
/// model before `component` runs once, the rest on `rows` copies of its activation there.
///
/// A patching sweep whose cells patch layer `l` forks at layer `l`'s input: the corrupted run
/// up to `l` is the same for every cell, so it runs once, and each cell's row starts there.
/// The copies are made before any hook of the site runs, so hooks and `row_interventions` at
/// `component` see every row. Row interventions at a site before the fork are refused when
/// they fire (there is one row there); batch-wide `interventions` and an extraction are
/// refused with a fork (give the edits per row).
///
/// ```no_run
/// use hook_torch::{HookedModule, Intervention, PatchValue, RunSpec, run::Fork};
/// let mut m = HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
/// let ids = tch::Tensor::from_slice(&[5i64, 6, 7]).view([1, 3]);
/// // three cells, each ablating layer 1's output at one position; layer 0 runs once
/// let cells: Vec<Vec<Intervention>> = (0..3)
///     .map(|q| vec![Intervention::Resid { component: "model.layers[1].output".into(), positions: vec![q], patch: PatchValue::Ablation }])
///     .collect();
/// let fork = Some(Fork { component: "model.layers[1].input".into(), rows: 3 });
/// let out = m.run(&ids, &ids.ones_like(), RunSpec { fork, row_interventions: &cells, logit_positions: Some(vec![-1]), ..RunSpec::default() }).unwrap();
/// assert_eq!(out.logits.unwrap().size()[..2], [3, 1]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    /// The site where the one example becomes `rows` copies (a layer's input, say
    /// `model.layers[3].input`).
    pub component: String,
    /// How many copies (at least 1).
    pub rows: usize,
}

/// What [`HookedModule::run`] returns.
#[derive(Debug)]
pub struct RunOutput {
    /// The logits `[batch, seq, vocab]` (`None` when the forward stopped early).
    pub logits: Option<Tensor>,
    /// What the extraction stored (empty without one).
    pub cache: ActivationCache,
}

impl HookedModule {
    /// The forward pass: checks the inputs (`[batch, seq]` ids and a 0/1 mask, left padding
    /// allowed), runs the stored hooks and everything `spec` asks for, and returns the logits
    /// and the extraction's cache. The module is unchanged afterwards: the hooks of the spec
    /// are gone, the stored ones stay.
    pub fn run(&mut self, input_ids: &Tensor, attention_mask: &Tensor, spec: RunSpec<'_>) -> Result<RunOutput> {
        let (ids, mask) = self.check_inputs(input_ids, attention_mask)?;
        Ok(self.run_checked(ids, mask, None, spec)?.0)
    }

    /// The forward of the next tokens of a text whose earlier tokens are in `cache` (generation
    /// without recomputing the text): `input_ids` `[batch, new]`, `attention_mask` `[batch,
    /// cached + new]` (the whole text's: left padding stays masked), the batch of the cache.
    /// The step's graph writes the new tokens' keys and values into `cache` in place. The
    /// logits are the last new token's, `[batch, 1, vocab]` (what generation reads: a prefill
    /// of a long prompt does not make logits for every position). With an empty cache it is
    /// the prefill; a long prompt can also be fed in pieces, each step after the ones before it.
    ///
    /// Hooks, interventions and extractions see the new tokens only (as hooks on a
    /// transformers model see each forward of its `generate`): a site's activation is `[batch,
    /// new, …]`, positions count from the first new token (negative ones from the last), and
    /// the attention pattern is `[batch, heads, new, cached + new]`. `stop_early` is refused
    /// (the step must reach every layer to fill the cache).
    pub fn step(&mut self, input_ids: &Tensor, attention_mask: &Tensor, cache: &mut KvCache, spec: RunSpec<'_>) -> Result<RunOutput> {
        if spec.stop_early {
            return Err(TorchError::Input("stop_early cannot run a cached step: every layer must run to fill the cache".into()));
        }
        if input_ids.dim() != 2 || attention_mask.dim() != 2 {
            return Err(TorchError::Input(format!(
                "a step takes input_ids [batch, new] and attention_mask [batch, cached + new]; got {:?} and {:?}",
                input_ids.size(),
                attention_mask.size()
            )));
        }
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        let want = [cache.batch() as i64, cache.len() as i64 + s];
        if b != want[0] || attention_mask.size() != want {
            return Err(TorchError::Input(format!(
                "the cache holds {} rows of {} tokens, so {s} new tokens need input_ids [{}, {s}] and attention_mask {want:?}; got {:?} and {:?}",
                want[0],
                cache.len(),
                want[0],
                input_ids.size(),
                attention_mask.size()
            )));
        }
        let ids = self.check_ids(input_ids)?;
        let mask = self.check_mask(attention_mask)?;
        let new_mask = mask.narrow(1, cache.len() as i64, s);
        let past = cache.past(s)?;
        let out = self.run_checked(ids, mask, Some((&past, new_mask)), spec)?;
        drop(past);
        cache.append(&out.1)?;
        Ok(out.0)
    }

    fn run_checked(&mut self, ids: Tensor, mask: Tensor, past: Option<(&[Tensor], Tensor)>, spec: RunSpec<'_>) -> Result<(RunOutput, Vec<Tensor>)> {
        let RunSpec { hooks: scoped, interventions, row_interventions, extraction, stop_early, track_gradients, fork, logit_positions } = spec;
        let mut reshape = Reshape::default();
        if let Some(f) = &fork {
            if past.is_some() {
                return Err(TorchError::Input("a fork runs in a forward, not in a cached step".into()));
            }
            if f.rows == 0 || ids.size()[0] != 1 {
                return Err(TorchError::Input(format!(
                    "a fork turns one example into {} rows: it needs input_ids [1, seq] and at least one row; got input_ids {:?}",
                    f.rows,
                    ids.size()
                )));
            }
            if extraction.is_some() || !interventions.is_empty() {
                return Err(TorchError::Input(
                    "a fork takes its edits per row (row_interventions); batch-wide interventions and an extraction are not supported with one".into(),
                ));
            }
            if !row_interventions.is_empty() && row_interventions.len() != f.rows {
                return Err(TorchError::Input(format!(
                    "row_interventions has {} lists for a fork of {} rows: give one list per row",
                    row_interventions.len(),
                    f.rows
                )));
            }
            reshape.fork = Some((self.site_index(&f.component)?, f.rows as i64));
        }
        if let Some(positions) = logit_positions {
            if positions.is_empty() {
                return Err(TorchError::Input("logit_positions is empty: give at least one position (or None for every position)".into()));
            }
            if past.is_some() {
                return Err(TorchError::Input("logit_positions applies to a forward: a cached step unembeds its last position only".into()));
            }
            let seq = ids.size().get(1).copied().unwrap_or(0) as usize;
            let resolved = hook_core::TokenGroups::singletons(positions)
                .and_then(|g| g.resolve(seq))
                .map_err(|e| TorchError::Input(format!("logit_positions: {e}")))?;
            reshape.keep_positions = Some((self.unembed_input_site()?, resolved));
        }
        if let Some(e) = &extraction {
            if stop_early && (e.config.save_logits || e.config.keep_gradient) {
                return Err(TorchError::Input(
                    "stop_early needs save_logits and keep_gradient off: the logits (and their gradient) come from the end of the forward pass".into(),
                ));
            }
        }
        // positions count in the tokens the sites see: the new ones of a step
        let pads = padding::offsets(past.as_ref().map_or(&mask, |(_, new_mask)| new_mask))?;
        let past = past.map(|(p, _)| p);
        let mut hooks = Vec::with_capacity(interventions.len() + scoped.len());
        for iv in interventions {
            hooks.push((iv.component(self)?, iv.hook(self, pads.clone())?));
        }
        // the copies of a fork share its one example's padding
        let row_pads = match &fork {
            Some(f) => std::sync::Arc::new(vec![pads[0]; f.rows]),
            None => pads.clone(),
        };
        hooks.extend(self.row_hooks(row_interventions, &row_pads)?);
        hooks.extend(scoped);
        let plan = match extraction {
            Some(e) => {
                let (plan, extraction_hooks) = Plan::new(self, &ids, &pads, e)?;
                hooks.extend(extraction_hooks);
                Some(plan)
            }
            None => None,
        };
        let gradients = track_gradients || plan.as_ref().is_some_and(Plan::needs_gradients);
        let out = if gradients {
            self.forward_checked(ids, mask, past, hooks, stop_early, reshape)?
        } else {
            tch::no_grad(|| self.forward_checked(ids, mask, past, hooks, stop_early, reshape))?
        };
        let (logits, new_kv) = match out {
            Some((logits, kv)) => (Some(logits), kv),
            None => (None, Vec::new()),
        };
        match plan {
            Some(plan) => {
                let cache = plan.finish(logits.as_ref())?;
                Ok((RunOutput { logits: logits.map(|l| l.detach()), cache }, new_kv))
            }
            None => Ok((RunOutput { logits, cache: ActivationCache::new() }, new_kv)),
        }
    }

    /// The site of the unembedding's input: the module whose weight is the description's
    /// `unembed_matrix`.
    fn unembed_input_site(&self) -> Result<usize> {
        let d = self.require_description()?;
        let weight = d.component("unembed_matrix", 0)?;
        let module = weight.strip_suffix(".weight").unwrap_or(&weight);
        self.sites()
            .iter()
            .position(|s| s.module == module && s.kind == crate::SiteKind::Input)
            .ok_or_else(|| TorchError::Description(format!("names the unembedding `{weight}`, and the model has no module `{module}` with an input site")))
    }

    /// One hook per component that `rows` (one list of interventions per example) touch: it
    /// applies each row's interventions to that row alone, with the row's padding offset.
    fn row_hooks(&self, rows: &[Vec<Intervention>], pads: &padding::Pads) -> Result<Vec<(String, BoxedHook)>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows.len() != pads.len() {
            return Err(TorchError::Input(format!("row_interventions has {} lists for a batch of {} examples: give one list per example", rows.len(), pads.len())));
        }
        let mut by_component: indexmap::IndexMap<String, Vec<(usize, BoxedHook)>> = indexmap::IndexMap::new();
        for (row, ivs) in rows.iter().enumerate() {
            for iv in ivs {
                let hook = iv.hook(self, std::sync::Arc::new(vec![pads[row]]))?;
                by_component.entry(iv.component(self)?).or_default().push((row, hook));
            }
        }
        Ok(by_component
            .into_iter()
            .map(|(component, mut row_hooks)| {
                let hook: BoxedHook = Box::new(move |ctx: &HookContext<'_>, io: &HookIo<Tensor>| {
                    let x = io.main_tensor()?;
                    let err = |e: tch::TchError| hook_core::CoreError::hook("", e);
                    let mut parts: Vec<Tensor> = (0..x.size()[0]).map(|i| x.f_narrow(0, i, 1)).collect::<std::result::Result<_, _>>().map_err(err)?;
                    let n = parts.len();
                    for (row, hook) in row_hooks.iter_mut() {
                        let part = parts.get(*row).ok_or_else(|| {
                            hook_core::CoreError::hook_message("", format!("row {row}'s intervention is outside the batch of {n} rows here (with a fork, row interventions go after the fork's site)"))
                        })?;
                        if let Some(new) = hook.call(ctx, &HookIo::output_tensor(part.shallow_clone()))? {
                            parts[*row] = new;
                        }
                    }
                    Ok(Some(Tensor::f_cat(&parts, 0).map_err(err)?))
                });
                (component, hook)
            })
            .collect())
    }

    /// A forward pass with the stored hooks; returns the logits `[batch, seq, vocab]`.
    pub fn forward(&mut self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.run_with_hooks(input_ids, attention_mask, Vec::new())
    }

    /// A forward pass with the stored hooks plus `scoped` hooks that apply to this call only.
    pub fn run_with_hooks(&mut self, input_ids: &Tensor, attention_mask: &Tensor, scoped: Vec<(String, BoxedHook)>) -> Result<Tensor> {
        let out = self.run(input_ids, attention_mask, RunSpec { hooks: scoped, track_gradients: true, ..RunSpec::default() })?;
        Ok(out.logits.expect("runs to the end"))
    }

    /// A forward pass with interventions, without gradient tracking; returns the logits.
    pub fn run_with_interventions(&mut self, input_ids: &Tensor, attention_mask: &Tensor, interventions: &[Intervention]) -> Result<Tensor> {
        let out = self.run(input_ids, attention_mask, RunSpec { interventions, ..RunSpec::default() })?;
        Ok(out.logits.expect("runs to the end"))
    }

    /// easyroutine's forward with an `ExtractionConfig`: returns the logits `[batch, seq,
    /// vocab]` and the cache (keys as easyroutine writes them, plus `logits` at the selected
    /// positions when `save_logits`, and `mapping_index`: group name → rows of the flattened
    /// token axis).
    ///
    /// `token_groups` are easyroutine's `token_indexes` (positions per example; negative
    /// from the end). Runs without gradient tracking (but for `keep_gradient`, which needs a
    /// vocabulary index: use [`HookedModule::run`] with [`Extraction::vocabulary_index`]).
    pub fn run_with_cache(
        &mut self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_groups: &TokenGroups,
        config: &ExtractionConfig,
    ) -> Result<(Tensor, ActivationCache)> {
        let out = self.run(input_ids, attention_mask, RunSpec { extraction: Some(Extraction::new(token_groups, config)), ..RunSpec::default() })?;
        Ok((out.logits.unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, self.device()))), out.cache))
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
        let mut recorded: Vec<Arc<Mutex<Option<Tensor>>>> = Vec::new();
        let mut hooks: Vec<(String, BoxedHook)> = Vec::new();
        for (component, positions) in patches {
            let slot = Arc::new(Mutex::new(None));
            recorded.push(slot.clone());
            let g = TokenGroups::new(vec![positions.clone()])?;
            hooks.push((
                component.clone(),
                Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                    let x = io.main_tensor()?;
                    let sel = hook_ops::select::flatten(x, -2, &g).map_err(|e| hook_core::CoreError::hook("", e))?;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(sel);
                    Ok(None)
                }),
            ));
        }
        self.run(clean.0, clean.1, RunSpec { hooks, ..RunSpec::default() })?;
        let interventions = patches
            .iter()
            .zip(recorded)
            .map(|((component, positions), slot)| {
                let values = slot.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| TorchError::Hook {
                    component: component.clone(),
                    message: "did not fire in the clean run".into(),
                    source: None,
                })?;
                Ok(Intervention::Resid { component: component.clone(), positions: positions.clone(), patch: PatchValue::Values(values) })
            })
            .collect::<Result<Vec<_>>>()?;
        self.run_with_interventions(corrupted.0, corrupted.1, &interventions)
    }
}
