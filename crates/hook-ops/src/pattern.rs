//! Attention patterns: `attention_pattern_head` (slices and block reductions) and the running
//! average of `avg_attention_pattern_head`.
//!
//! Block reductions are computed for every block of every selected head at once:
//! with `R` the `[G1, Sq]` matrix counting how often each query position appears in each row
//! group and `C` the `[Sk, G2]` one for the column groups, the block sums are `R · P · C`
//! (two batched matmuls, accumulated in float64), the means divide by the block sizes, and the
//! uniform-attention baseline of `baseline_ratio` is computed once per partition, not per head.
//! easyroutine loops over row groups × column groups × heads in Python.

use std::fmt;
use std::str::FromStr;

use hook_core::{keys, HeadSelection, ResolvedGroups, TokenGroups};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{out_of_range, OpsError, Result};
use crate::keyed::Keyed;
use crate::select::index_tensor;

/// `attn_pattern_avg`: how each block of the pattern becomes one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternAvg {
    /// No reduction: the pattern rows × columns themselves.
    #[default]
    None,
    /// Mean of each block.
    Mean,
    /// Sum of each block.
    Sum,
    /// Mean of each block divided by the mean a causal uniform attention would give it.
    BaselineRatio,
}

impl fmt::Display for PatternAvg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatternAvg::None => "none",
            PatternAvg::Mean => "mean",
            PatternAvg::Sum => "sum",
            PatternAvg::BaselineRatio => "baseline_ratio",
        })
    }
}

impl FromStr for PatternAvg {
    type Err = OpsError;
    /// ```
    /// assert_eq!("baseline_ratio".parse::<hook_ops::PatternAvg>().unwrap(), hook_ops::PatternAvg::BaselineRatio);
    /// assert!("avg".parse::<hook_ops::PatternAvg>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(PatternAvg::None),
            "mean" => Ok(PatternAvg::Mean),
            "sum" => Ok(PatternAvg::Sum),
            "baseline_ratio" => Ok(PatternAvg::BaselineRatio),
            other => Err(out_of_range("attn_pattern_avg", format!("{other:?}"), "one of \"none\", \"mean\", \"sum\", \"baseline_ratio\"")),
        }
    }
}

fn check_pattern(p: &Tensor) -> Result<(i64, i64, i64, i64)> {
    if p.dim() != 4 {
        return Err(OpsError::Shape { arg: "attention pattern", got: p.size(), expected: "[batch, heads, query_len, key_len]".into() });
    }
    let s = p.size();
    Ok((s[0], s[1], s[2], s[3]))
}

/// `[G, S]` matrix: entry (g, i) counts position i in group g.
fn count_matrix(groups: &ResolvedGroups, len: i64, device: Device) -> Tensor {
    let g = groups.len() as i64;
    let mut m = vec![0f64; (g * len) as usize];
    for (gi, grp) in groups.groups().iter().enumerate() {
        for &i in grp {
            m[gi * len as usize + i] += 1.0;
        }
    }
    Tensor::from_slice(&m).view([g, len]).to_device(device)
}

/// `[G, Σ|g|]` matrix: entry (g, k) is 1 when the k-th flattened position belongs to group g.
fn membership(groups: &ResolvedGroups, device: Device) -> Tensor {
    let g = groups.len();
    let n: usize = groups.sizes().iter().sum();
    let mut m = vec![0f64; g * n];
    for (k, gi) in groups.group_ids().into_iter().enumerate() {
        m[gi * n + k] = 1.0;
    }
    Tensor::from_slice(&m).view([g as i64, n as i64]).to_device(device)
}

/// easyroutine's uniform baseline for each (row group, column group): the mean over rows `i`
/// of `#{j in cols : j <= i} / (i + 1)`.
fn baselines(rows: &ResolvedGroups, cols: &ResolvedGroups) -> Vec<f64> {
    let sorted: Vec<Vec<usize>> = cols
        .groups()
        .iter()
        .map(|g| {
            let mut s = g.clone();
            s.sort_unstable();
            s
        })
        .collect();
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for g1 in rows.groups() {
        for g2 in &sorted {
            let total: f64 = g1.iter().map(|&i| g2.partition_point(|&j| j <= i) as f64 / (i as f64 + 1.0)).sum();
            out.push(total / g1.len() as f64);
        }
    }
    out
}

/// `attention_pattern_head`: entries `pattern_L{layer}H{h}` for the selected heads of a
/// `[batch, heads, query_len, key_len]` pattern.
///
/// - `avg = None`, no `rows`: `[batch, T, T]`, the flattened positions on both axes.
/// - `avg = None` with `rows`: every block `rows[i] × cols[j]` stacked along the row axis
///   (easyroutine's `torch.cat(blocks, dim=1)`; column groups must then have one size).
/// - `Mean` / `Sum` / `BaselineRatio`: `[batch, G1, G2]`, one number per block. Rows default to
///   the column groups, as easyroutine's docstring says (its code ignores the reduction when
///   no row partition is given and returns the flattened slice: listed in docs/parity.md).
///
/// ```
/// use tch::{Kind, Device, Tensor};
/// let p = Tensor::rand([2, 4, 6, 6], (Kind::Float, Device::Cpu)).softmax(-1, Kind::Float);
/// let cols = "[(0,1),(2,3),(4,5)]".parse().unwrap();
/// let out = hook_ops::pattern::attention_pattern(&p, 0, &cols, None, hook_core::HeadSelection::All, hook_ops::PatternAvg::Mean).unwrap();
/// assert_eq!(out.len(), 4);
/// assert_eq!(out[1].key, "pattern_L0H1");
/// assert_eq!(out[1].value.size(), vec![2, 3, 3]);
/// ```
pub fn attention_pattern(
    pattern: &Tensor,
    layer: usize,
    cols: &TokenGroups,
    rows: Option<&TokenGroups>,
    head: HeadSelection,
    avg: PatternAvg,
) -> Result<Vec<Keyed>> {
    let (_b, h, sq, sk) = check_pattern(pattern)?;
    let heads = head.resolve(h as usize)?;
    let dev = pattern.device();
    let cols_r = cols.resolve(sk as usize)?;
    let p = if heads.len() as i64 == h { pattern.shallow_clone() } else { pattern.f_index_select(1, &index_tensor(&heads, dev))? };
    let out: Tensor = match (avg, rows) {
        (PatternAvg::None, None) => {
            let rows_r = cols.resolve(sq as usize)?;
            let picked = crate::select::take(&p, 2, &rows_r.flatten())?;
            crate::select::take(&picked, 3, &cols_r.flatten())?
        }
        (PatternAvg::None, Some(rows)) => {
            let rows_r = rows.resolve(sq as usize)?;
            stacked_blocks(&p, &rows_r, &cols_r)?
        }
        (mode, rows) => {
            let rows_r = rows.unwrap_or(cols).resolve(sq as usize)?;
            block_reduce(&p, &rows_r, &cols_r, mode)?
        }
    };
    heads
        .iter()
        .enumerate()
        .map(|(i, &hh)| Ok(Keyed::new(keys::pattern(layer, hh), out.f_select(1, i as i64)?)))
        .collect()
}

/// `[B, H, Sq, Sk]` → `[B, H, G1, G2]` block means / sums / baseline ratios.
fn block_reduce(p: &Tensor, rows: &ResolvedGroups, cols: &ResolvedGroups, mode: PatternAvg) -> Result<Tensor> {
    let (_, _, sq, sk) = check_pattern(p)?;
    let dev = p.device();
    let c = count_matrix(cols, sk, dev).f_tr()?; // [Sk, G2]
    let n_rows: usize = rows.sizes().iter().sum();
    let sums = if (n_rows as i64) < sq {
        // Few rows: read (and widen to float64) only the selected query rows, Tr = Σ|g1|.
        let picked = p.f_index_select(2, &index_tensor(&rows.flatten(), dev))?.f_to_kind(Kind::Double)?; // [B, H, Tr, Sk]
        membership(rows, dev).f_matmul(&picked.f_matmul(&c)?)? // [G1, Tr] · [B, H, Tr, G2]
    } else {
        count_matrix(rows, sq, dev).f_matmul(&p.f_to_kind(Kind::Double)?.f_matmul(&c)?)? // [G1, Sq] · [B, H, Sq, G2]
    }; // [B, H, G1, G2]
    let (g1, g2) = (rows.len() as i64, cols.len() as i64);
    let reduced = match mode {
        PatternAvg::Sum => sums,
        PatternAvg::Mean | PatternAvg::BaselineRatio => {
            let sizes: Vec<f64> = rows.sizes().iter().flat_map(|&a| cols.sizes().into_iter().map(move |b| (a * b) as f64)).collect();
            sums.f_div(&Tensor::from_slice(&sizes).view([g1, g2]).to_device(dev))?
        }
        PatternAvg::None => unreachable!("handled by the caller"),
    };
    let reduced = reduced.f_to_kind(p.kind())?;
    if mode != PatternAvg::BaselineRatio {
        return Ok(reduced);
    }
    // easyroutine divides the float32 observed mean by a float32 tensor of the baseline.
    let base = Tensor::from_slice(&baselines(rows, cols)).view([g1, g2]).to_kind(p.kind()).to_device(dev);
    Ok(reduced.f_div(&base)?)
}

/// `[B, H, Sq, Sk]` → `[B, H, Σ_(g1,g2) |g1|, w]`: block `g1 × g2` for every pair, in row-group
/// major order, stacked along the row axis (all column groups have width `w`).
fn stacked_blocks(p: &Tensor, rows: &ResolvedGroups, cols: &ResolvedGroups) -> Result<Tensor> {
    let widths = cols.sizes();
    let w = widths[0];
    if let Some(bad) = widths.iter().position(|&x| x != w) {
        return Err(OpsError::Shape {
            arg: "token_indexes",
            got: widths.iter().map(|&x| x as i64).collect(),
            expected: format!(
                "column groups of one size when attn_pattern_avg is \"none\" and a row partition is given (group {bad} has {} positions, group 0 has {w}): the blocks are stacked along the rows",
                widths[bad]
            ),
        });
    }
    let mut row_ix = Vec::new();
    let mut col_ix = Vec::new();
    for g1 in rows.groups() {
        for g2 in cols.groups() {
            for &i in g1 {
                row_ix.push(i);
                col_ix.extend(g2.iter().map(|&j| j as i64));
            }
        }
    }
    let dev = p.device();
    let s = p.size();
    let n = row_ix.len() as i64;
    let picked = p.f_index_select(2, &index_tensor(&row_ix, dev))?; // [B, H, N, Sk]
    let gather_ix = Tensor::from_slice(&col_ix).view([1, 1, n, w as i64]).to_device(dev).f_expand([s[0], s[1], n, w as i64], false)?;
    Ok(picked.f_gather(3, &gather_ix, false)?)
}

/// The state of `avg_attention_pattern_head`: running means keyed `avg_pattern_L{l}H{h}` (and
/// `projected_value_L{l}H{h}` for value-weighted patterns), in insertion order.
#[derive(Debug, Default)]
pub struct RunningPatternAverage {
    entries: IndexMap<String, Tensor>,
}

impl RunningPatternAverage {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The running means.
    pub fn entries(&self) -> &IndexMap<String, Tensor> {
        &self.entries
    }

    /// Takes the running means out.
    pub fn into_entries(self) -> IndexMap<String, Tensor> {
        self.entries
    }

    fn update(&mut self, key: String, new: Tensor, batch_idx: usize) -> Result<()> {
        match self.entries.get_mut(&key) {
            None => {
                self.entries.insert(key, new);
            }
            Some(cur) => {
                if cur.size() != new.size() {
                    return Err(OpsError::Shape {
                        arg: "attention pattern",
                        got: new.size(),
                        expected: format!("{:?}, the shape the running average of {key} started with", cur.size()),
                    });
                }
                *cur = cur.f_add(&new.f_sub(cur)?.f_div_scalar((batch_idx + 1) as f64)?)?;
            }
        }
        Ok(())
    }

    /// `avg_attention_pattern_head` for one batch: for every head, the pattern restricted to the
    /// flattened positions on both axes, folded into the running mean
    /// `cur += (new - cur) / (batch_idx + 1)`.
    ///
    /// With `value_vectors` (one `[batch, key_len, d_model]` tensor per head, easyroutine's
    /// `projected_value_L{l}H{h}` over the whole sequence) it also averages the value-weighted
    /// pattern `a_ij · ‖v_j‖` on the selected rows under `projected_value_L{l}H{h}`.
    /// easyroutine transposes the norm matrix and weights by `‖v_i‖` (the query's value): listed
    /// in docs/parity.md.
    ///
    /// ```
    /// use tch::{Kind, Device, Tensor};
    /// let mut avg = hook_ops::pattern::RunningPatternAverage::new();
    /// let g = "[(0,1,2)]".parse().unwrap();
    /// let p1 = Tensor::ones([1, 2, 3, 3], (Kind::Float, Device::Cpu));
    /// avg.update_pattern(&p1, 0, &g, 0, None).unwrap();
    /// avg.update_pattern(&(p1.zeros_like()), 0, &g, 1, None).unwrap();
    /// assert_eq!(avg.entries()["avg_pattern_L0H1"].double_value(&[0, 0, 0]), 0.5);
    /// ```
    pub fn update_pattern(
        &mut self,
        pattern: &Tensor,
        layer: usize,
        groups: &TokenGroups,
        batch_idx: usize,
        value_vectors: Option<&[Tensor]>,
    ) -> Result<()> {
        let (b, h, sq, sk) = check_pattern(pattern)?;
        let dev = pattern.device();
        let rows = index_tensor(&groups.resolve(sq as usize)?.flatten(), dev);
        let cols = index_tensor(&groups.resolve(sk as usize)?.flatten(), dev);
        if let Some(v) = value_vectors {
            if v.len() as i64 != h {
                return Err(OpsError::Shape { arg: "value_vectors", got: vec![v.len() as i64], expected: format!("one tensor per head ({h})") });
            }
        }
        let sliced = pattern.f_index_select(2, &rows)?;
        let pat = sliced.f_index_select(3, &cols)?;
        for head in 0..h {
            self.update(keys::avg_pattern(layer, head as usize), pat.f_select(1, head)?.f_contiguous()?, batch_idx)?;
            if let Some(values) = value_vectors {
                let v = &values[head as usize];
                if v.dim() != 3 || v.size()[0] != b || v.size()[1] != sk {
                    return Err(OpsError::Shape {
                        arg: "value_vectors",
                        got: v.size(),
                        expected: format!("[batch = {b}, key_len = {sk}, d_model] (projected values over the whole sequence)"),
                    });
                }
                let norms = v.f_norm_scalaropt_dim(2, [-1i64].as_slice(), false)?.f_to_kind(pattern.kind())?; // [B, Sk]
                let weighted = sliced.f_select(1, head)?.f_mul(&norms.f_unsqueeze(1)?)?; // [B, T, Sk]
                self.update(keys::projected_value(layer, head as usize), weighted, batch_idx)?;
            }
        }
        Ok(())
    }
}

/// A `[G1, G2]` check that a partition fits a pattern, for callers that want the error early.
///
/// ```
/// let cols: hook_core::TokenGroups = "[(0,),(9,)]".parse().unwrap();
/// let e = hook_ops::pattern::check_partition(4, 4, &cols, None).unwrap_err();
/// assert!(e.to_string().contains("token position 9"));
/// ```
pub fn check_partition(query_len: usize, key_len: usize, cols: &TokenGroups, rows: Option<&TokenGroups>) -> Result<()> {
    cols.resolve(key_len)?;
    rows.unwrap_or(cols).resolve(query_len)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// easyroutine's double loop, written in Rust: the reference for the vectorised version.
    fn slow(p: &Tensor, rows: &ResolvedGroups, cols: &ResolvedGroups, h: i64, mode: PatternAvg) -> Tensor {
        let mut vals = Vec::new();
        for g1 in rows.groups() {
            for g2 in cols.groups() {
                let blk = p.select(1, h).index_select(1, &index_tensor(g1, Device::Cpu)).index_select(2, &index_tensor(g2, Device::Cpu));
                let v = match mode {
                    PatternAvg::Mean => blk.mean_dim(Some(&[-2i64, -1][..]), false, None::<Kind>),
                    PatternAvg::Sum => blk.sum_dim_intlist(Some(&[-2i64, -1][..]), false, None::<Kind>),
                    PatternAvg::BaselineRatio => {
                        let base: f64 = g1.iter().map(|&i| g2.iter().filter(|&&j| j <= i).count() as f64 / (i + 1) as f64).sum::<f64>() / g1.len() as f64;
                        blk.mean_dim(Some(&[-2i64, -1][..]), false, None::<Kind>) / Tensor::from(base as f32)
                    }
                    PatternAvg::None => unreachable!(),
                };
                vals.push(v.unsqueeze(1));
            }
        }
        Tensor::cat(&vals, 1).view([p.size()[0], rows.len() as i64, cols.len() as i64])
    }

    #[test]
    fn vectorised_blocks_equal_the_double_loop() {
        let p = Tensor::randn([2, 3, 7, 7], (Kind::Float, Device::Cpu)).softmax(-1, Kind::Float);
        let cols: TokenGroups = "[(0,1),(2,),(3,4,6),(5,5)]".parse().unwrap();
        let rows: TokenGroups = "[(6,),(1,2,3)]".parse().unwrap();
        for mode in [PatternAvg::Mean, PatternAvg::Sum, PatternAvg::BaselineRatio] {
            let out = attention_pattern(&p, 2, &cols, Some(&rows), HeadSelection::All, mode).unwrap();
            for (h, e) in out.iter().enumerate() {
                let want = slow(&p, &rows.resolve(7).unwrap(), &cols.resolve(7).unwrap(), h as i64, mode);
                assert!(e.value.allclose(&want, 1e-5, 1e-6, false), "{mode} head {h}");
            }
        }
    }

    #[test]
    fn none_with_rows_stacks_blocks() {
        let p = Tensor::arange(2 * 16, (Kind::Float, Device::Cpu)).view([1, 2, 4, 4]);
        let out = attention_pattern(&p, 0, &"[(0,1),(2,3)]".parse().unwrap(), Some(&"[(3,)]".parse().unwrap()), HeadSelection::One(1), PatternAvg::None).unwrap();
        assert_eq!(out[0].key, "pattern_L0H1");
        assert_eq!(Vec::<f32>::try_from(out[0].value.flatten(0, -1)).unwrap(), vec![28., 29., 30., 31.]);
        let e = attention_pattern(&p, 0, &"[(0,1),(2,)]".parse().unwrap(), Some(&"[(3,)]".parse().unwrap()), HeadSelection::All, PatternAvg::None).unwrap_err();
        assert!(e.to_string().contains("column groups of one size"), "{e}");
    }

    #[test]
    fn bad_input_names_the_argument() {
        let p = Tensor::zeros([1, 2, 4, 4], (Kind::Float, Device::Cpu));
        let g: TokenGroups = "[(0,)]".parse().unwrap();
        let e = attention_pattern(&p, 0, &g, None, HeadSelection::One(2), PatternAvg::Mean).unwrap_err().to_string();
        assert!(e.contains("head 2 is out of range: the layer has 2 heads"), "{e}");
        let e = attention_pattern(&p, 0, &g, Some(&"[(4,)]".parse().unwrap()), HeadSelection::All, PatternAvg::Mean).unwrap_err().to_string();
        assert!(e.contains("token position 4 (group 0) is out of range for a sequence of length 4"), "{e}");
        let e = attention_pattern(&p.view([2, 4, 4]), 0, &g, None, HeadSelection::All, PatternAvg::Mean).unwrap_err().to_string();
        assert!(e.contains("attention pattern has shape [2, 4, 4]"), "{e}");
    }
}
