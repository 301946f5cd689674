//! The shape edits a forward makes for hookrs itself (a user's hook must keep its site's
//! shape): a fork of one example into many rows ([`crate::run::Fork`]) and the positions the
//! unembedding keeps ([`crate::RunSpec::logit_positions`]).

use hook_core::ResolvedGroups;
use tch::Tensor;

/// Where a forward changes shape, by site index.
#[derive(Debug, Default)]
pub(crate) struct Reshape {
    /// At this site, before its hooks: its one row becomes this many.
    pub fork: Option<(usize, i64)>,
    /// At this site, after its hooks: only these positions (axis 1) go on, resolved against
    /// the input's length before the forward runs.
    pub keep_positions: Option<(usize, ResolvedGroups)>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_fork_copies_one_row_and_refuses_more() {
        let x = Tensor::arange(6, (tch::Kind::Float, Device::Cpu)).view([1, 3, 2]);
        let y = fork(&x, 4).unwrap();
        assert_eq!(y.size(), [4, 3, 2]);
        assert!(y.get(3).equal(&x.get(0)));
        assert!(fork(&y, 2).unwrap_err().contains("one row"));
    }

    #[test]
    fn only_the_named_sites_are_touched() {
        let last = hook_core::TokenGroups::last().resolve(4).unwrap();
        let r = Reshape { fork: Some((3, 2)), keep_positions: Some((7, last)) };
        assert!(r.touches(3) && r.touches(7) && !r.touches(4));
        assert!(!Reshape::default().touches(0));
    }
}
