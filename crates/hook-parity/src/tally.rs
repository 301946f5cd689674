//! The verdict of one parity row and the counts of a suite.

/// What one row of a parity table says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// hookrs agrees with easyroutine.
    Pass,
    /// easyroutine has a bug or differs by construction: hookrs agrees with the documented
    /// behaviour, computed independently by the harness; the text says what easyroutine gives.
    Explained(String),
    /// hookrs disagrees: why.
    Fail(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Pass => write!(f, "pass"),
            Verdict::Explained(why) => write!(f, "explained deviation ({why})"),
            Verdict::Fail(why) => write!(f, "FAIL: {why}"),
        }
    }
}

/// The counts of a suite.
///
/// ```
/// use hook_parity::{Tally, Verdict};
/// let mut t = Tally::default();
/// t.count(&Verdict::Pass);
/// t.count(&Verdict::Fail("max diff 1e-3".into()));
/// assert_eq!((t.pass, t.fail), (1, 1));
/// assert!(!t.ok());
/// assert_eq!(t.to_string(), "1 passed, 1 failed, 0 explained deviations");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Rows that agree.
    pub pass: usize,
    /// Explained deviations.
    pub explained: usize,
    /// Rows that disagree.
    pub fail: usize,
}

impl Tally {
    /// Counts one row.
    pub fn count(&mut self, v: &Verdict) {
        match v {
            Verdict::Pass => self.pass += 1,
            Verdict::Explained(_) => self.explained += 1,
            Verdict::Fail(_) => self.fail += 1,
        }
    }

    /// No row failed.
    pub fn ok(&self) -> bool {
        self.fail == 0
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} failed, {} explained deviations", self.pass, self.fail, self.explained)
    }
}
