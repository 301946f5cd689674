//! The shape edits a forward makes for hookrs itself (a user's hook must keep its site's
//! shape): a fork of one example into many rows ([`crate::run::Fork`]) and the positions the
//! unembedding keeps ([`crate::RunSpec::logit_positions`]).

use tch::{Device, Tensor};

/// Where a forward changes shape, by site index.
#[derive(Debug, Default)]
pub(crate) struct Reshape {
    /// At this site, before its hooks: its one row becomes this many.
    pub fork: Option<(usize, i64)>,
    /// At this site, after its hooks: only these positions (axis 1) go on.
    pub keep_positions: Option<(usize, Vec<i64>)>,
}

impl Reshape {
    /// Whether site `i` changes shape (it must run even with no hook).
    pub fn touches(&self, i: usize) -> bool {
        self.fork.is_some_and(|(s, _)| s == i) || self.keep_positions.as_ref().is_some_and(|(s, _)| *s == i)
    }
}

/// `rows` copies of a one-row activation, along the batch axis.
pub(crate) fn fork(x: &Tensor, rows: i64) -> Result<Tensor, String> {
    let size = x.size();
    if size.first() != Some(&1) {
        return Err(format!("a fork copies one row, and the activation here is {size:?}"));
    }
    let mut times = vec![1i64; size.len()];
    times[0] = rows;
    x.f_repeat(&times).map_err(|e| e.to_string())
}

/// The positions `positions` (negative from the end) of axis 1 of `x`.
pub(crate) fn keep_positions(x: &Tensor, positions: &[i64]) -> Result<Tensor, String> {
    let seq = *x.size().get(1).ok_or_else(|| format!("the activation {:?} has no positions axis", x.size()))?;
    let at = positions
        .iter()
        .map(|&p| {
            let q = if p < 0 { p + seq } else { p };
            if (0..seq).contains(&q) {
                Ok(q)
            } else {
                Err(format!("logit position {p} is outside a sequence of {seq} tokens (0..{seq}, or -{seq}..-1 from the end)"))
            }
        })
        .collect::<Result<Vec<i64>, String>>()?;
    let index = Tensor::from_slice(&at);
    let index = if x.device() == Device::Cpu { index } else { index.to_device(x.device()) };
    x.f_index_select(1, &index).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fork_copies_one_row_and_refuses_more() {
        let x = Tensor::arange(6, (tch::Kind::Float, Device::Cpu)).view([1, 3, 2]);
        let y = fork(&x, 4).unwrap();
        assert_eq!(y.size(), [4, 3, 2]);
        assert!(y.get(3).equal(&x.get(0)));
        assert!(fork(&y, 2).unwrap_err().contains("one row"));
    }

    #[test]
    fn kept_positions_count_from_either_end() {
        let x = Tensor::arange(10, (tch::Kind::Float, Device::Cpu)).view([1, 5, 2]);
        let y = keep_positions(&x, &[0, -1]).unwrap();
        assert_eq!(Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(), [0.0, 1.0, 8.0, 9.0]);
        assert!(keep_positions(&x, &[5]).unwrap_err().contains("outside a sequence of 5"));
        assert!(keep_positions(&x, &[-6]).is_err());
    }

    #[test]
    fn only_the_named_sites_are_touched() {
        let r = Reshape { fork: Some((3, 2)), keep_positions: Some((7, vec![-1])) };
        assert!(r.touches(3) && r.touches(7) && !r.touches(4));
        assert!(!Reshape::default().touches(0));
    }
}
