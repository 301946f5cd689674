//! Tolerances relative to the size of what they compare, and the comparison of two sets of
//! entries (keys in order, shapes, values).

use indexmap::IndexMap;
use tch::{Kind, Tensor};

/// A bound on `max |got - want| / max(max |want|, floor)`: relative to the entry's largest
/// magnitude, or to `floor` when that is smaller (so values near zero are compared to the
/// floor, not to themselves).
///
/// ```
/// let t = hook_parity::Tol { limit: 1e-6, floor: 1.0 };
/// assert_eq!(t.to_string(), "1.0e-6 of max(|value|, 1)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tol {
    /// The largest relative difference that passes.
    pub limit: f64,
    /// The magnitude below which the difference is taken relative to the floor instead.
    pub floor: f64,
}

impl std::fmt::Display for Tol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1e} of max(|value|, {})", self.limit, self.floor)
    }
}

/// `max |got - want| / max(max |want|, floor)` in float64, where entries that are equal
/// (NaN and NaN, or the same infinity, included: masked attention scores hold -inf) differ by
/// 0 and the scale is the largest *finite* magnitude of `want` (an infinity would hide every
/// difference). 0 for empty tensors; NaN when only one side holds a NaN.
///
/// ```
/// use tch::Tensor;
/// let want = Tensor::from_slice(&[100.0f32, -200.0]);
/// let got = Tensor::from_slice(&[100.0f32, -200.02]);
/// let d = hook_parity::relative_diff(&got, &want, 1.0);
/// assert!((d - 1e-4).abs() < 1e-6, "{d}");
/// ```
pub fn relative_diff(got: &Tensor, want: &Tensor, floor: f64) -> f64 {
    if want.numel() == 0 {
        return 0.0;
    }
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let same = g.eq_tensor(&w).logical_or(&g.isnan().logical_and(&w.isnan()));
    let diff = (&g - &w).abs().masked_fill(&same, 0.0).max().double_value(&[]);
    let finite = w.isfinite();
    let scale = if finite.any().int64_value(&[]) != 0 { w.abs().masked_select(&finite).max().double_value(&[]) } else { 0.0 };
    diff / scale.max(floor)
}

/// Compares two key-ordered sets of entries: the same keys in the same order, the same
/// shapes, and values within `tol`. Returns the worst relative difference (NaN when keys or
/// shapes differ) and why it fails, if it does.
///
/// ```
/// use indexmap::IndexMap;
/// use tch::Tensor;
/// let want = IndexMap::from([("a".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))]);
/// let tol = hook_parity::Tol { limit: 1e-6, floor: 1.0 };
/// assert!(hook_parity::compare(&want, &want, tol).1.is_none());
/// let other = IndexMap::from([("b".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))]);
/// assert!(hook_parity::compare(&other, &want, tol).1.unwrap().contains("keys differ"));
/// ```
pub fn compare(got: &IndexMap<String, Tensor>, want: &IndexMap<String, Tensor>, tol: Tol) -> (f64, Option<String>) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    if gk != wk {
        return (f64::NAN, Some(format!("keys differ: hookrs {gk:?}, expected {wk:?}")));
    }
    let mut worst: f64 = 0.0;
    for (k, w) in want {
        let g = &got[k];
        if g.size() != w.size() {
            return (f64::NAN, Some(format!("{k}: shape {:?}, expected {:?}", g.size(), w.size())));
        }
        let d = relative_diff(g, w, tol.floor);
        worst = if d.is_nan() { d } else { worst.max(d) };
        if worst.is_nan() {
            break;
        }
    }
    if worst.is_nan() || worst > tol.limit {
        return (worst, Some(format!("max diff {worst:.2e} > {tol}")));
    }
    (worst, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_in_the_hundreds_are_compared_relative_to_their_size() {
        let want = Tensor::from_slice(&[300.0f32, -150.0]);
        let got = Tensor::from_slice(&[300.0001f32, -150.0]);
        let tol = Tol { limit: 1e-6, floor: 1.0 };
        let (d, why) = compare(&IndexMap::from([("x".to_string(), got)]), &IndexMap::from([("x".to_string(), want)]), tol);
        assert!(why.is_none() && d < 1e-6, "{d} {why:?}");
    }

    #[test]
    fn equal_infinities_and_nans_agree_and_do_not_hide_other_differences() {
        let want = Tensor::from_slice(&[f64::NEG_INFINITY, f64::NAN, 2.0]);
        assert_eq!(relative_diff(&want, &want, 1.0), 0.0);
        let got = Tensor::from_slice(&[f64::NEG_INFINITY, f64::NAN, 2.5]);
        assert_eq!(relative_diff(&got, &want, 1.0), 0.25);
    }

    #[test]
    fn a_nan_fails_and_a_shape_mismatch_is_named() {
        let tol = Tol { limit: 1e-6, floor: 1.0 };
        let want = IndexMap::from([("x".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))]);
        let nan = IndexMap::from([("x".to_string(), Tensor::from_slice(&[f32::NAN, 2.0]))]);
        assert!(compare(&nan, &want, tol).1.is_some());
        let short = IndexMap::from([("x".to_string(), Tensor::from_slice(&[1.0f32]))]);
        assert!(compare(&short, &want, tol).1.unwrap().contains("shape"));
    }
}
