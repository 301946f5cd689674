//! Activation patching and ablation sweeps over one prompt or a dataset, scored by how much
//! the model prefers an answer over a wrong answer.
//!
//! The metric of a run is `Σ log p(answer) − Σ log p(wrong)`: the log-probabilities of each
//! continuation's tokens given the prompt (and the continuation's earlier tokens, teacher
//! forced). For one-token answers that is `logit(answer) − logit(wrong)` at the last position,
//! easyroutine's and TransformerLens's logit difference. Over a dataset the metric is averaged,
//! as easyroutine's `compute_patching` averages its logit differences over the batch.
//!
//! * [`patch_sweep`]: for each layer × position (or layer × head, or layer·head × position) the
//!   clean run's activation is written into the corrupted run; [`Grid::score`] normalises the
//!   mean metric to `(m − corrupted) / (clean − corrupted)`: 1 restores the clean behaviour.
//! * [`ablate_sweep`]: each layer's attention, MLP, whole block or each head is zeroed or set
//!   to its mean over the dataset's tokens at the chosen positions; the grid holds the mean
//!   metric, to compare with [`Grid::clean`].
//!
//! ```no_run
//! use hook_analysis::patching::{patch_sweep, Batching, Part, PatchPair, Positions};
//! use hook_torch::HookedModule;
//!
//! let mut m = HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
//! let pairs = [PatchPair { clean: vec![1, 5, 9, 7], corrupted: vec![1, 5, 8, 7], answer: vec![9], wrong: vec![8] }];
//! let grid = patch_sweep(&mut m, &pairs, Part::Resid, &Positions::All, true, Batching::default()).unwrap();
//! println!("{:?}", grid.score());      // layers x positions, 1 = clean behaviour restored
//! ```

use std::sync::{Arc, Mutex};

use hook_core::{HookContext, HookIo, TokenGroups};
use hook_torch::{BoxedHook, ExtractionConfig, HookedModule, Intervention, ModelDescription, PatchValue, RunSpec};
use tch::{Device, Kind, Tensor};

use crate::error::{AnalysisError, Result};

/// A prompt and the two continuations its metric compares (token ids).
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// The prompt.
    pub ids: Vec<i64>,
    /// The continuation the model should prefer (one or more tokens).
    pub answer: Vec<i64>,
    /// The continuation it should not.
    pub wrong: Vec<i64>,
}

/// A clean and a corrupted prompt of one length, with the answer and wrong answer of the clean
/// prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchPair {
    /// The clean prompt: where the activations come from.
    pub clean: Vec<i64>,
    /// The corrupted prompt: where they are written.
    pub corrupted: Vec<i64>,
    /// The clean prompt's answer.
    pub answer: Vec<i64>,
    /// The wrong answer (often the corrupted prompt's answer).
    pub wrong: Vec<i64>,
}

/// What a sweep patches or ablates, per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The residual stream after the layer (`resid_out`).
    Resid,
    /// The attention block's output (`attn_out`).
    Attn,
    /// The MLP's output (`mlp_out`).
    Mlp,
    /// Attention and MLP outputs together: the whole layer (ablation only).
    Layer,
    /// Each head's output, before the output projection (`attn_o_proj_input`).
    Heads,
}

impl Part {
    /// The name the CLI and the JSON use.
    pub fn name(self) -> &'static str {
        match self {
            Part::Resid => "resid_out",
            Part::Attn => "attn_out",
            Part::Mlp => "mlp_out",
            Part::Layer => "layer",
            Part::Heads => "heads",
        }
    }

    fn template(self) -> &'static str {
        match self {
            Part::Resid => "residual_stream_hook_name",
            Part::Attn => "attn_out_hook_name",
            Part::Mlp => "mlp_out_hook_name",
            Part::Heads => "attn_o_proj_input_hook_name",
            Part::Layer => unreachable!("a layer is its attention and MLP parts"),
        }
    }
}

/// Which token positions a sweep touches.
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    /// Every position of the prompt.
    All,
    /// These positions (negative from the end of each prompt).
    These(Vec<i64>),
}

impl Positions {
    /// The positions in a prompt of `len` tokens, as indices from its start.
    ///
    /// ```
    /// use hook_analysis::patching::Positions;
    /// assert_eq!(Positions::These(vec![0, -1]).resolve(5).unwrap(), vec![0, 4]);
    /// assert!(Positions::These(vec![7]).resolve(5).is_err());
    /// ```
    pub fn resolve(&self, len: usize) -> Result<Vec<i64>> {
        match self {
            Positions::All => Ok((0..len as i64).collect()),
            Positions::These(ps) => ps
                .iter()
                .map(|&p| {
                    let q = if p < 0 { p + len as i64 } else { p };
                    if (0..len as i64).contains(&q) {
                        Ok(q)
                    } else {
                        Err(AnalysisError::Input(format!("position {p} is outside a prompt of {len} tokens (0..{len}, or -{len}..-1 from the end)")))
                    }
                })
                .collect(),
        }
    }
}

/// A sweep's result: the mean metric per cell, with the unpatched means to compare with.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Row names (`L0`, or `L0H1` for heads by position).
    pub rows: Vec<String>,
    /// Column names (`H0`, `attn_out`, or positions as `p3`).
    pub cols: Vec<String>,
    /// The metric averaged over the dataset, rows × cols.
    pub values: Vec<Vec<f64>>,
    /// The mean metric of the clean (unpatched, unablated) runs.
    pub clean: f64,
    /// The mean metric of the corrupted runs (patching only).
    pub corrupted: Option<f64>,
    /// The clean metric of each prompt or pair, in order.
    pub clean_each: Vec<f64>,
    /// The corrupted metric of each pair (patching only).
    pub corrupted_each: Vec<f64>,
}

impl Grid {
    /// Patching: `(m − corrupted) / (clean − corrupted)` per cell (1 = clean behaviour
    /// restored, 0 = no effect). Ablation: `m − clean` (the change the ablation causes).
    pub fn score(&self) -> Vec<Vec<f64>> {
        let f = |m: f64| match self.corrupted {
            Some(x) => (m - x) / (self.clean - x),
            None => m - self.clean,
        };
        self.values.iter().map(|r| r.iter().map(|&m| f(m)).collect()).collect()
    }
}

fn ids_tensor(ids: &[i64], device: Device) -> (Tensor, Tensor) {
    let t = Tensor::from_slice(ids).view([1, ids.len() as i64]).to_device(device);
    let mask = Tensor::ones([1, ids.len() as i64], (Kind::Int64, device));
    (t, mask)
}

/// The default bound on the tokens of one batched forward of a sweep (`--max-batch-tokens`):
/// a sweep's cells run as the rows of batches of at most this many tokens.
pub const DEFAULT_BATCH_TOKENS: usize = 4096;

/// How a sweep runs its cells.
///
/// The cells run as the rows of batched forwards of at most `max_tokens` tokens (at least
/// one row each). With `share_prefix`, the cells that edit layer `l` (and nothing before it)
/// share a batch whose forward runs the unedited prompt once up to layer `l`'s input and forks
/// there into one row per cell ([`hook_torch::Fork`]): a cell costs the layers from `l` on,
/// not the whole model. Only the positions the metric reads are unembedded. Both equal one
/// plain forward per cell ([`Batching::ONE_PER_CELL`]) up to the rounding of batched matrix
/// products.
///
/// ```
/// use hook_analysis::patching::Batching;
/// let b = Batching::default();
/// assert_eq!((b.max_tokens, b.share_prefix), (4096, true));
/// assert_eq!(Batching::ONE_PER_CELL.max_tokens, 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// At most this many tokens in one forward (rows × prompt length).
    pub max_tokens: usize,
    /// Run the unedited prompt once up to the layer a batch's cells edit.
    pub share_prefix: bool,
}

impl Batching {
    /// One plain forward per cell: the reference the fast paths are checked against.
    pub const ONE_PER_CELL: Batching = Batching { max_tokens: 1, share_prefix: false };
}

impl Default for Batching {
    fn default() -> Self {
        Batching { max_tokens: DEFAULT_BATCH_TOKENS, share_prefix: true }
    }
}

/// `Σ log p(answer) − Σ log p(wrong)` after `prompt`, with `interventions` active (their
/// positions index the prompt; the continuations are appended after it).
///
/// ```no_run
/// # let mut m = hook_torch::HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
/// let ld = hook_analysis::patching::answer_metric(&mut m, &[1, 5, 9], &[7], &[8], &[]).unwrap();
/// ```
pub fn answer_metric(m: &mut HookedModule, prompt: &[i64], answer: &[i64], wrong: &[i64], interventions: &[Intervention]) -> Result<f64> {
    Ok(answer_metrics(m, prompt, answer, wrong, &[interventions.to_vec()], Batching::ONE_PER_CELL)?[0])
}

/// One forward of a sweep: the prompt (or the prompt and a continuation), the positions whose
/// logits the metric reads, and how to read them.
struct MetricRun<'a> {
    ids: Vec<i64>,
    /// The continuation scored (teacher forced), or `None`: the logit difference at the end.
    cont: Option<&'a [i64]>,
    sign: f64,
}

/// [`answer_metric`] of many cells of a sweep at once: `cells[i]` holds the interventions of
/// cell `i`, run as [`Batching`] says, each row with its own interventions
/// ([`RunSpec::row_interventions`](hook_torch::RunSpec::row_interventions)).
///
/// With `share_prefix`, the first shared batch also runs a row without interventions, which
/// must give the plain forward's metric (within 1e-4 of its size): if a model's graph does not
/// survive the fork (a batch size fixed inside it), the call runs every cell without sharing
/// instead, so the numbers stay right.
///
/// ```no_run
/// # let mut m = hook_torch::HookedModule::load("llama.pt", tch::Device::Cpu).unwrap();
/// use hook_analysis::patching::Batching;
/// use hook_torch::{Intervention, PatchValue};
/// let cells: Vec<Vec<Intervention>> = (0..3)
///     .map(|q| vec![Intervention::Resid { component: "model.layers[0].output".into(), positions: vec![q], patch: PatchValue::Ablation }])
///     .collect();
/// let each = hook_analysis::patching::answer_metrics(&mut m, &[1, 5, 9], &[7], &[8], &cells, Batching::default()).unwrap();
/// assert_eq!(each.len(), 3);
/// ```
pub fn answer_metrics(m: &mut HookedModule, prompt: &[i64], answer: &[i64], wrong: &[i64], cells: &[Vec<Intervention>], batching: Batching) -> Result<Vec<f64>> {
    if prompt.is_empty() || answer.is_empty() || wrong.is_empty() {
        return Err(AnalysisError::Input("the prompt, the answer and the wrong answer each need at least one token".into()));
    }
    // one run for one-token answers (the logit difference at the last position); else the
    // answer's and the wrong answer's continuations, teacher forced (sign +1 and -1)
    let runs: Vec<MetricRun<'_>> = if answer.len() == 1 && wrong.len() == 1 {
        vec![MetricRun { ids: prompt.to_vec(), cont: None, sign: 1.0 }]
    } else {
        [(answer, 1.0), (wrong, -1.0)]
            .into_iter()
            .map(|(c, sign)| MetricRun { ids: prompt.iter().chain(&c[..c.len() - 1]).copied().collect(), cont: Some(c), sign })
            .collect()
    };
    let forks = if batching.share_prefix { fork_layers(m, cells)? } else { vec![None; cells.len()] };
    let mut out = vec![0.0; cells.len()];
    for run in &runs {
        let each = if forks.iter().any(Option::is_some) {
            match run_forked(m, run, answer, wrong, cells, &forks, batching.max_tokens)? {
                Some(each) => each,
                None => run_plain(m, run, answer, wrong, cells, batching.max_tokens, false)?,
            }
        } else {
            run_plain(m, run, answer, wrong, cells, batching.max_tokens, batching.share_prefix)?
        };
        for (o, v) in out.iter_mut().zip(each) {
            *o += run.sign * v;
        }
    }
    Ok(out)
}

/// The layer each cell forks at: the first layer its interventions touch (`None` when one of
/// them is outside the layers, or the model has no description).
fn fork_layers(m: &HookedModule, cells: &[Vec<Intervention>]) -> Result<Vec<Option<usize>>> {
    if m.description().is_none() {
        return Ok(vec![None; cells.len()]);
    }
    cells
        .iter()
        .map(|ivs| {
            let mut first: Option<usize> = None;
            for iv in ivs {
                let site = m.site_index(&iv.component(m)?)?;
                match m.sites()[site].layer {
                    Some(l) => first = Some(first.map_or(l, |f| f.min(l))),
                    None => return Ok(None),
                }
            }
            Ok(first)
        })
        .collect()
}

/// The positions of a run's logits that its metric reads: the last one, or those predicting
/// the continuation.
fn read_positions(run: &MetricRun<'_>) -> Vec<i64> {
    match run.cont {
        None => vec![-1],
        Some(c) => (0..c.len() as i64).map(|i| (run.ids.len() - c.len()) as i64 + i).collect(),
    }
}

/// The metric of each row from `logits` `[rows, positions, vocab]` (the positions of
/// [`read_positions`]).
fn metric_of_rows(logits: &Tensor, run: &MetricRun<'_>, answer: &[i64], wrong: &[i64]) -> Result<Vec<f64>> {
    let logits = logits.to_kind(Kind::Double);
    let k = logits.size()[0];
    Ok(match run.cont {
        None => {
            let last = logits.select(1, -1);
            Vec::<f64>::try_from(last.select(1, answer[0]) - last.select(1, wrong[0]))?
        }
        Some(c) => {
            let lp = logits.narrow(1, logits.size()[1] - c.len() as i64, c.len() as i64).log_softmax(-1, Kind::Double);
            let index = Tensor::from_slice(c).view([1, -1, 1]).expand([k, c.len() as i64, 1], false).to_device(lp.device());
            Vec::<f64>::try_from(lp.gather(2, &index, false).sum_dim_intlist(&[1i64, 2][..], false, Kind::Double))?
        }
    })
}

/// Every cell as a row of batched forwards of the whole model (`keep_positions`: unembed only
/// the positions the metric reads).
fn run_plain(m: &mut HookedModule, run: &MetricRun<'_>, answer: &[i64], wrong: &[i64], cells: &[Vec<Intervention>], max_tokens: usize, keep_positions: bool) -> Result<Vec<f64>> {
    let device = m.device();
    let len = run.ids.len() as i64;
    let rows = (max_tokens / run.ids.len()).max(1);
    let mut out = Vec::with_capacity(cells.len());
    for group in cells.chunks(rows) {
        let k = group.len() as i64;
        let t = Tensor::from_slice(&run.ids).view([1, len]).repeat([k, 1]).to_device(device);
        let mask = Tensor::ones([k, len], (Kind::Int64, device));
        let logit_positions = keep_positions.then(|| read_positions(run));
        let spec = RunSpec { row_interventions: group, logit_positions, ..RunSpec::default() };
        let logits = m.run(&t, &mask, spec)?.logits.ok_or_else(|| AnalysisError::Input("the forward stopped before the logits".into()))?;
        out.extend(metric_of_rows(&logits, run, answer, wrong)?);
    }
    Ok(out)
}

/// The cells that fork at one layer, as batches that run the prompt once up to that layer's
/// input ([`hook_torch::Fork`]); cells that cannot fork run plain. `None` when the first forked
/// batch's control row (no interventions) disagrees with the plain forward: the model's graph
/// does not survive a fork, and the caller runs every cell plain.
fn run_forked(m: &mut HookedModule, run: &MetricRun<'_>, answer: &[i64], wrong: &[i64], cells: &[Vec<Intervention>], forks: &[Option<usize>], max_tokens: usize) -> Result<Option<Vec<f64>>> {
    let d = m.require_description()?.clone();
    let device = m.device();
    let len = run.ids.len() as i64;
    let rows = (max_tokens / run.ids.len()).max(1);
    let ids = Tensor::from_slice(&run.ids).view([1, len]).to_device(device);
    let mask = Tensor::ones([1, len], (Kind::Int64, device));
    let mut out = vec![0.0; cells.len()];
    // cells by the layer they fork at, in order
    let mut by_layer: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    let mut plain: Vec<usize> = Vec::new();
    for (i, f) in forks.iter().enumerate() {
        match f {
            Some(l) => by_layer.entry(*l).or_default().push(i),
            None => plain.push(i),
        }
    }
    let mut control: Option<f64> = Some(run_plain(m, run, answer, wrong, &[Vec::new()], 1, false)?[0]);
    for (layer, members) in by_layer {
        let component = d.component("residual_stream_input_hook_name", layer)?;
        for group in members.chunks(rows) {
            let mut row_ivs: Vec<Vec<Intervention>> = group.iter().map(|&i| cells[i].clone()).collect();
            if control.is_some() {
                row_ivs.push(Vec::new());
            }
            let fork = Some(hook_torch::Fork { component: component.clone(), rows: row_ivs.len() });
            let spec = RunSpec { row_interventions: &row_ivs, fork, logit_positions: Some(read_positions(run)), ..RunSpec::default() };
            let logits = match m.run(&ids, &mask, spec) {
                Ok(out) => out.logits.ok_or_else(|| AnalysisError::Input("the forward stopped before the logits".into()))?,
                // the first fork of the call: a graph that cannot fork runs plain (which
                // reports any error of the cells themselves)
                Err(_) if control.is_some() => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut each = metric_of_rows(&logits, run, answer, wrong)?;
            if let Some(want) = control.take() {
                let got = each.pop().unwrap_or(f64::NAN);
                if !((got - want).abs() <= 1e-4 * want.abs().max(1.0)) {
                    return Ok(None);
                }
            }
            for (&i, v) in group.iter().zip(each) {
                out[i] = v;
            }
        }
    }
    if !plain.is_empty() {
        let rest: Vec<Vec<Intervention>> = plain.iter().map(|&i| cells[i].clone()).collect();
        for (&i, v) in plain.iter().zip(run_plain(m, run, answer, wrong, &rest, max_tokens, true)?) {
            out[i] = v;
        }
    }
    Ok(Some(out))
}

/// Each head's output (the input of the attention's output projection) of every layer, as
/// `[1, seq, heads, head_dim]`.
fn head_outputs(m: &mut HookedModule, d: &ModelDescription, ids: &[i64]) -> Result<Vec<Tensor>> {
    let layers = d.num_hidden_layers;
    let slots: Vec<Arc<Mutex<Option<Tensor>>>> = (0..layers).map(|_| Arc::new(Mutex::new(None))).collect();
    let hooks = (0..layers)
        .map(|l| {
            let slot = slots[l].clone();
            let hook: BoxedHook = Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(io.main_tensor()?.copy());
                Ok(None)
            });
            Ok((d.component(Part::Heads.template(), l)?, hook))
        })
        .collect::<Result<Vec<_>>>()?;
    let (t, mask) = ids_tensor(ids, m.device());
    let _ = tch::no_grad(|| m.run_with_hooks(&t, &mask, hooks))?;
    let (nh, hd) = (d.num_attention_heads as i64, d.head_dim as i64);
    slots
        .iter()
        .map(|s| {
            let t = s.lock().unwrap_or_else(|e| e.into_inner()).take();
            let t = t.ok_or_else(|| AnalysisError::Input("the attention output projection did not run".into()))?;
            Ok(t.view([1, ids.len() as i64, nh, hd]))
        })
        .collect()
}

/// The outputs of `part` (not heads) of every layer, `[1, seq, d]`.
fn part_outputs(m: &mut HookedModule, part: Part, ids: &[i64]) -> Result<Vec<Tensor>> {
    let d = m.require_description()?.clone();
    let cfg = ExtractionConfig { save_logits: false, ..ExtractionConfig::default().with_flags(&[part.name()])? };
    let (t, mask) = ids_tensor(ids, m.device());
    let all = TokenGroups::all(ids.len()).map_err(|e| AnalysisError::Input(e.to_string()))?;
    let (_, cache) = m.run_with_cache(&t, &mask, &all, &cfg)?;
    (0..d.num_hidden_layers)
        .map(|l| Ok(cache.tensor(&format!("{}_{l}", part.name())).map_err(|e| AnalysisError::Cache(e.to_string()))?.shallow_clone()))
        .collect()
}

fn check_pair(p: &PatchPair, i: usize) -> Result<()> {
    if p.clean.len() != p.corrupted.len() {
        return Err(AnalysisError::Input(format!(
            "pair {i}: the clean prompt has {} tokens and the corrupted one {}: activation patching needs prompts of one length",
            p.clean.len(),
            p.corrupted.len()
        )));
    }
    Ok(())
}

/// Activation patching over `pairs`: the clean activations of `part` written into the
/// corrupted runs, one cell at a time, the metric averaged over the pairs.
///
/// * [`Part::Resid`], [`Part::Attn`], [`Part::Mlp`]: layers × each position of `positions`.
/// * [`Part::Heads`]: layers × heads with `positions` patched at once, or with
///   `each_position`, layer·head × each position.
///
/// With `each_position` and [`Positions::All`] every pair must have the same length (the
/// columns are positions); negative positions (`-1` = the last) work across lengths.
///
/// The cells of a pair run as `batching` says ([`Batching`], [`answer_metrics`]): the cells
/// of one layer share the corrupted run up to that layer.
pub fn patch_sweep(m: &mut HookedModule, pairs: &[PatchPair], part: Part, positions: &Positions, each_position: bool, batching: Batching) -> Result<Grid> {
    if pairs.is_empty() {
        return Err(AnalysisError::Input("no pairs to patch".into()));
    }
    if part == Part::Layer {
        return Err(AnalysisError::Input("patching takes resid_out, attn_out, mlp_out or heads (a whole layer is resid_out)".into()));
    }
    let each_position = each_position || part != Part::Heads;
    for (i, p) in pairs.iter().enumerate() {
        check_pair(p, i)?;
    }
    let cols_per_pair: Vec<Vec<i64>> = pairs.iter().map(|p| positions.resolve(p.clean.len())).collect::<Result<_>>()?;
    if each_position && cols_per_pair.iter().any(|c| c.len() != cols_per_pair[0].len()) {
        return Err(AnalysisError::Input(format!(
            "the pairs have different lengths ({:?} tokens): patch every position only on pairs of one length, or choose positions (e.g. -1 for the last)",
            pairs.iter().map(|p| p.clean.len()).collect::<Vec<_>>()
        )));
    }
    let d = m.require_description()?.clone();
    let (layers, nh) = (d.num_hidden_layers, d.num_attention_heads);
    let (rows, cols): (Vec<String>, Vec<String>) = match (part, each_position) {
        (Part::Heads, false) => ((0..layers).map(|l| format!("L{l}")).collect(), (0..nh).map(|h| format!("H{h}")).collect()),
        (Part::Heads, true) => (
            (0..layers).flat_map(|l| (0..nh).map(move |h| format!("L{l}H{h}"))).collect(),
            position_names(positions, &cols_per_pair[0]),
        ),
        _ => ((0..layers).map(|l| format!("L{l}")).collect(), position_names(positions, &cols_per_pair[0])),
    };
    let mut sums = vec![vec![0.0; cols.len()]; rows.len()];
    let (mut clean_each, mut corrupted_each) = (Vec::new(), Vec::new());
    for (p, ps) in pairs.iter().zip(&cols_per_pair) {
        clean_each.push(answer_metric(m, &p.clean, &p.answer, &p.wrong, &[])?);
        corrupted_each.push(answer_metric(m, &p.corrupted, &p.answer, &p.wrong, &[])?);
        // every cell of this pair: where its metric goes, and its interventions
        let mut at_cell: Vec<(usize, usize)> = Vec::new();
        let mut cells: Vec<Vec<Intervention>> = Vec::new();
        if part == Part::Heads {
            let clean = head_outputs(m, &d, &p.clean)?;
            for l in 0..layers {
                let component = d.component(Part::Heads.template(), l)?;
                for h in 0..nh {
                    let per_head = clean[l].select(2, h as i64);
                    let spans: Vec<Vec<i64>> = if each_position { ps.iter().map(|&q| vec![q]).collect() } else { vec![ps.clone()] };
                    for (c, at) in spans.into_iter().enumerate() {
                        let values = per_head.index_select(1, &Tensor::from_slice(&at).to_device(per_head.device()));
                        cells.push(vec![Intervention::QueryKeyValue { component: component.clone(), positions: at, head: h, patch: PatchValue::Values(values) }]);
                        at_cell.push(if each_position { (l * nh + h, c) } else { (l, h) });
                    }
                }
            }
        } else {
            let clean = part_outputs(m, part, &p.clean)?;
            for l in 0..layers {
                let component = d.component(part.template(), l)?;
                for (c, &q) in ps.iter().enumerate() {
                    cells.push(vec![Intervention::Resid { component: component.clone(), positions: vec![q], patch: PatchValue::Values(clean[l].narrow(1, q, 1)) }]);
                    at_cell.push((l, c));
                }
            }
        }
        let metrics = answer_metrics(m, &p.corrupted, &p.answer, &p.wrong, &cells, batching)?;
        for ((r, c), v) in at_cell.into_iter().zip(metrics) {
            sums[r][c] += v;
        }
    }
    let n = pairs.len() as f64;
    let clean = clean_each.iter().sum::<f64>() / n;
    let corrupted = corrupted_each.iter().sum::<f64>() / n;
    if (clean - corrupted).abs() < 1e-9 {
        return Err(AnalysisError::Input(format!(
            "the clean and corrupted prompts give the same mean metric ({clean:.4}): there is nothing to restore"
        )));
    }
    Ok(Grid {
        rows,
        cols,
        values: sums.into_iter().map(|r| r.into_iter().map(|v| v / n).collect()).collect(),
        clean,
        corrupted: Some(corrupted),
        clean_each,
        corrupted_each,
    })
}

fn position_names(positions: &Positions, resolved: &[i64]) -> Vec<String> {
    match positions {
        Positions::All => resolved.iter().map(|p| format!("p{p}")).collect(),
        Positions::These(ps) => ps.iter().map(|p| format!("p{p}")).collect(),
    }
}

/// How an ablation replaces an activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ablation {
    /// By zeros.
    Zero,
    /// By its mean over every token of the dataset's prompts.
    Mean,
}

/// Ablation over `prompts`: for each layer and each of `parts` (attention, MLP, the whole
/// layer, or each head), the activation at `positions` is zeroed or replaced by its dataset
/// mean, one cell at a time; the grid holds the mean metric (rows: layers; columns: the parts,
/// or the heads).
///
/// The cells of a prompt run as `batching` says ([`Batching`], [`answer_metrics`]): the cells
/// of one layer share the clean run up to that layer.
pub fn ablate_sweep(m: &mut HookedModule, prompts: &[Prompt], parts: &[Part], mode: Ablation, positions: &Positions, batching: Batching) -> Result<Grid> {
    if prompts.is_empty() {
        return Err(AnalysisError::Input("no prompts to ablate".into()));
    }
    if parts.is_empty() || parts.contains(&Part::Resid) {
        return Err(AnalysisError::Input("ablation takes attn_out, mlp_out, layer or heads".into()));
    }
    let d = m.require_description()?.clone();
    let (layers, nh) = (d.num_hidden_layers, d.num_attention_heads);
    let mut cols = Vec::new();
    for &p in parts {
        if p == Part::Heads {
            cols.extend((0..nh).map(|h| format!("H{h}")));
        } else {
            cols.push(p.name().to_string());
        }
    }
    // dataset means, per layer: [d] for attention and MLP outputs, [heads, head_dim] for heads
    let mut means: std::collections::HashMap<(Part, usize), Tensor> = Default::default();
    if mode == Ablation::Mean {
        let needed: Vec<Part> = parts.iter().flat_map(|&p| if p == Part::Layer { vec![Part::Attn, Part::Mlp] } else { vec![p] }).collect();
        let tokens: f64 = prompts.iter().map(|p| p.ids.len() as f64).sum();
        for part in needed {
            if means.keys().any(|(p, _)| *p == part) {
                continue;
            }
            for p in prompts {
                let outs = if part == Part::Heads { head_outputs(m, &d, &p.ids)? } else { part_outputs(m, part, &p.ids)? };
                for (l, t) in outs.into_iter().enumerate() {
                    let s = t.to_kind(Kind::Double).sum_dim_intlist(&[0i64, 1][..], false, Kind::Double);
                    let e = means.entry((part, l)).or_insert_with(|| s.zeros_like());
                    *e += s;
                }
            }
            for ((p, _), t) in means.iter_mut() {
                if *p == part {
                    *t = &*t / tokens;
                }
            }
        }
    }
    let mut sums = vec![vec![0.0; cols.len()]; layers];
    let mut clean_each = Vec::new();
    for pr in prompts {
        clean_each.push(answer_metric(m, &pr.ids, &pr.answer, &pr.wrong, &[])?);
        let at = positions.resolve(pr.ids.len())?;
        let n = at.len() as i64;
        let value = |part: Part, l: usize, shape: &[i64], kind: Kind| -> PatchValue {
            match mode {
                Ablation::Zero => PatchValue::Ablation,
                Ablation::Mean => PatchValue::Values(means[&(part, l)].to_kind(kind).expand(shape, false).contiguous()),
            }
        };
        let kind = m.kind();
        let mut at_cell: Vec<(usize, usize)> = Vec::new();
        let mut cells: Vec<Vec<Intervention>> = Vec::new();
        for l in 0..layers {
            let mut c = 0;
            for &part in parts {
                let resid = |p: Part| -> Result<Intervention> {
                    Ok(Intervention::Resid { component: d.component(p.template(), l)?, positions: at.clone(), patch: value(p, l, &[1, n, d.hidden_size as i64], kind) })
                };
                match part {
                    Part::Heads => {
                        for h in 0..nh {
                            let patch = match mode {
                                Ablation::Zero => PatchValue::Ablation,
                                Ablation::Mean => PatchValue::Values(means[&(Part::Heads, l)].get(h as i64).to_kind(kind).expand([1, n, d.head_dim as i64], false).contiguous()),
                            };
                            cells.push(vec![Intervention::QueryKeyValue { component: d.component(Part::Heads.template(), l)?, positions: at.clone(), head: h, patch }]);
                            at_cell.push((l, c));
                            c += 1;
                        }
                    }
                    Part::Layer => {
                        cells.push(vec![resid(Part::Attn)?, resid(Part::Mlp)?]);
                        at_cell.push((l, c));
                        c += 1;
                    }
                    p => {
                        cells.push(vec![resid(p)?]);
                        at_cell.push((l, c));
                        c += 1;
                    }
                }
            }
        }
        let metrics = answer_metrics(m, &pr.ids, &pr.answer, &pr.wrong, &cells, batching)?;
        for ((r, c), v) in at_cell.into_iter().zip(metrics) {
            sums[r][c] += v;
        }
    }
    let n = prompts.len() as f64;
    Ok(Grid {
        rows: (0..layers).map(|l| format!("L{l}")).collect(),
        cols,
        values: sums.into_iter().map(|r| r.into_iter().map(|v| v / n).collect()).collect(),
        clean: clean_each.iter().sum::<f64>() / n,
        corrupted: None,
        clean_each,
        corrupted_each: Vec::new(),
    })
}
