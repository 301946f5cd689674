//! Left padding: each example's offset in a batch, positions moved by it, and a function run
//! on each example with its own offset. Extraction, interventions and the catalogue's hooks
//! share these, so a position means the same token of an example everywhere.
//!
//! Positions are relative to each example's real tokens: a non-negative position `p` of an
//! example padded by `pad` is column `p + pad` of the batch; a negative one counts from the
//! end, which left padding does not move.

use std::sync::Arc;

use hook_core::TokenGroups;
use hook_ops::Keyed;
use tch::{Kind, Tensor};

use crate::error::Result;

/// The left-padding offsets of the examples of one batch (`seq - sum(mask)` per row), shared
/// by the hooks of one forward.
pub(crate) type Pads = Arc<Vec<i64>>;

/// The offsets of a batch that has no padding: the catalogue's hooks use positions as given.
pub(crate) fn unpadded() -> Pads {
    Arc::new(vec![0])
}

/// Left-padding offsets of each example (`seq - sum(mask)`), from a `[batch, seq]` mask.
pub(crate) fn offsets(mask: &Tensor) -> Result<Pads> {
    let s = mask.size()[1];
    let sums: Vec<i64> = Vec::<i64>::try_from(mask.f_sum_dim_intlist(Some(&[1i64][..]), false, Kind::Int64)?.f_to_device(tch::Device::Cpu)?)?;
    Ok(Arc::new(sums.into_iter().map(|n| s - n).collect()))
}

/// Every example has the same offset (the ops can then run once on the whole batch).
pub(crate) fn uniform(pads: &[i64]) -> bool {
    pads.iter().all(|&p| p == pads[0])
}

/// Positions moved by `pad` (negative ones stay).
pub(crate) fn shift_positions(ps: &[i64], pad: i64) -> Vec<i64> {
    ps.iter().map(|&p| if p >= 0 { p + pad } else { p }).collect()
}

/// Token groups moved by `pad` (negative positions stay).
pub(crate) fn shift_groups(g: &TokenGroups, pad: i64) -> hook_core::Result<TokenGroups> {
    TokenGroups::new(g.groups().iter().map(|grp| shift_positions(grp, pad)).collect())
}

/// Applies `f(x, pad, example)` to the whole batch when every example has the same offset
/// (`example` is then `None`), else to each example's row with its own offset, and
/// concatenates the results along dim 0.
pub(crate) fn each_example_tensor(
    x: &Tensor,
    pads: &[i64],
    mut f: impl FnMut(&Tensor, i64, Option<usize>) -> hook_ops::Result<Tensor>,
) -> hook_ops::Result<Tensor> {
    if uniform(pads) {
        return f(x, pads[0], None);
    }
    let parts = pads.iter().enumerate().map(|(b, &pad)| f(&x.f_narrow(0, b as i64, 1)?, pad, Some(b))).collect::<hook_ops::Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// Runs `f` on the whole batch when every example has the same offset, else on each example
/// with its shifted groups, and concatenates the entries of the examples along dim 0 (entry
/// `i` of every example under entry `i`'s key).
pub(crate) fn each_example_keyed(
    x: &Tensor,
    pads: &[i64],
    groups: &[TokenGroups],
    f: &mut dyn FnMut(&Tensor, &[TokenGroups]) -> hook_ops::Result<Vec<Keyed>>,
) -> hook_ops::Result<Vec<Keyed>> {
    let shifted = |pad: i64| groups.iter().map(|g| shift_groups(g, pad)).collect::<hook_core::Result<Vec<_>>>();
    if uniform(pads) {
        return f(x, &shifted(pads[0])?);
    }
    let mut parts: Vec<Vec<Keyed>> = Vec::new();
    for (b, &pad) in pads.iter().enumerate() {
        parts.push(f(&x.f_narrow(0, b as i64, 1)?, &shifted(pad)?)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_count_the_zeros_of_each_row() {
        let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1]).view([2, 4]);
        assert_eq!(*offsets(&mask).unwrap(), vec![2, 0]);
    }

    #[test]
    fn non_negative_positions_move_and_negative_ones_stay() {
        assert_eq!(shift_positions(&[0, 2, -1], 3), vec![3, 5, -1]);
        let g: TokenGroups = "[[0, 1], [-1]]".parse().unwrap();
        assert_eq!(shift_groups(&g, 2).unwrap().groups(), &[vec![2, 3], vec![-1]]);
    }

    #[test]
    fn one_offset_runs_once_on_the_batch_and_mixed_offsets_run_per_row() {
        let x = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
        let mut calls = Vec::new();
        let y = each_example_tensor(&x, &[1, 1], |t, pad, b| {
            calls.push((pad, b));
            Ok(t.shallow_clone())
        })
        .unwrap();
        assert_eq!(calls, vec![(1, None)]);
        assert_eq!(y.size(), vec![2, 3]);
        calls.clear();
        let y = each_example_tensor(&x, &[0, 2], |t, pad, b| {
            calls.push((pad, b));
            Ok(t * 1.0)
        })
        .unwrap();
        assert_eq!(calls, vec![(0, Some(0)), (2, Some(1))]);
        assert_eq!(Vec::<f32>::try_from(y.view([-1])).unwrap(), vec![0., 1., 2., 3., 4., 5.]);
    }
}
