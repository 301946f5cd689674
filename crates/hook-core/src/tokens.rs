//! Token groups: easyroutine's `token_indexes`, a list of tuples of positions such as
//! `[(1, 3), (4,)]`. Hooks either take every position of every group in order (*flatten*) or
//! reduce each group to one row (*per group*, with `avg=True`).
//!
//! A [`TokenGroups`] holds positions as given (negative ones count from the end, as in Python);
//! [`TokenGroups::resolve`] checks them against a sequence length and gives [`ResolvedGroups`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

/// Ordered groups of token positions, as the user wrote them.
///
/// ```
/// use hook_core::TokenGroups;
/// let g: TokenGroups = "[(1,3),(4,)]".parse().unwrap();
/// let r = g.resolve(6).unwrap();
/// assert_eq!(r.flatten(), vec![1, 3, 4]);
/// assert_eq!(r.groups(), &[vec![1, 3], vec![4]]);
/// assert_eq!(TokenGroups::last().resolve(6).unwrap().flatten(), vec![5]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "Vec<Vec<i64>>", try_from = "Vec<Vec<i64>>")]
pub struct TokenGroups(Vec<Vec<i64>>);

impl TokenGroups {
    /// Groups from positions; fails on an empty list or an empty group.
    ///
    /// ```
    /// use hook_core::TokenGroups;
    /// assert!(TokenGroups::new(vec![vec![0, 1], vec![-1]]).is_ok());
    /// assert!(TokenGroups::new(vec![vec![0], vec![]]).is_err());
    /// ```
    pub fn new(groups: Vec<Vec<i64>>) -> Result<Self> {
        if groups.is_empty() {
            return Err(CoreError::InvalidTokenGroups("no groups: expected at least one group such as [(-1,)]".into()));
        }
        if let Some(i) = groups.iter().position(Vec::is_empty) {
            return Err(CoreError::InvalidTokenGroups(format!(
                "group {i} is empty: every group needs at least one position"
            )));
        }
        Ok(Self(groups))
    }

    /// One group per position: `[(p0,), (p1,), …]`.
    ///
    /// ```
    /// use hook_core::TokenGroups;
    /// assert_eq!(TokenGroups::singletons([2, 5]).unwrap().groups(), &[vec![2], vec![5]]);
    /// ```
    pub fn singletons(positions: impl IntoIterator<Item = i64>) -> Result<Self> {
        Self::new(positions.into_iter().map(|p| vec![p]).collect())
    }

    /// The last token only, `[(-1,)]`.
    pub fn last() -> Self {
        Self(vec![vec![-1]])
    }

    /// Every position of a sequence of length `seq_len`, as one group.
    ///
    /// ```
    /// use hook_core::TokenGroups;
    /// assert_eq!(TokenGroups::all(3).unwrap().groups(), &[vec![0, 1, 2]]);
    /// ```
    pub fn all(seq_len: usize) -> Result<Self> {
        Self::new(vec![(0..seq_len as i64).collect()])
    }

    /// The groups as given.
    pub fn groups(&self) -> &[Vec<i64>] {
        &self.0
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a constructed value; present for API completeness.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every position in order, as given.
    pub fn flatten_raw(&self) -> Vec<i64> {
        self.0.iter().flatten().copied().collect()
    }

    /// Checks every position against `seq_len` and maps negatives to `seq_len + p`.
    ///
    /// ```
    /// use hook_core::TokenGroups;
    /// let g = TokenGroups::new(vec![vec![0, -1]]).unwrap();
    /// assert_eq!(g.resolve(4).unwrap().flatten(), vec![0, 3]);
    /// assert!(g.resolve(0).is_err());
    /// ```
    pub fn resolve(&self, seq_len: usize) -> Result<ResolvedGroups> {
        let n = seq_len as i64;
        let groups = self
            .0
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                g.iter()
                    .map(|&p| {
                        let q = if p < 0 { n + p } else { p };
                        if q < 0 || q >= n {
                            Err(CoreError::TokenOutOfRange { position: p, group: gi, seq_len })
                        } else {
                            Ok(q as usize)
                        }
                    })
                    .collect::<Result<Vec<usize>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ResolvedGroups { groups, seq_len })
    }
}

impl TryFrom<Vec<Vec<i64>>> for TokenGroups {
    type Error = CoreError;
    fn try_from(v: Vec<Vec<i64>>) -> Result<Self> {
        Self::new(v)
    }
}

impl From<TokenGroups> for Vec<Vec<i64>> {
    fn from(g: TokenGroups) -> Self {
        g.0
    }
}

impl fmt::Display for TokenGroups {
    /// Python tuple syntax: `[(1, 3), (4,)]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, g) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            let items: Vec<String> = g.iter().map(i64::to_string).collect();
            if items.len() == 1 {
                write!(f, "({},)", items[0])?;
            } else {
                write!(f, "({})", items.join(", "))?;
            }
        }
        write!(f, "]")
    }
}

impl FromStr for TokenGroups {
    type Err = CoreError;

    /// Accepts Python (`[(1,3),(4,)]`, `[(1,3),4]`) and JSON (`[[1,3],[4]]`) spellings.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |pos: usize, what: &str| {
            CoreError::InvalidTokenGroups(format!("at character {pos} of `{s}`: {what}; expected e.g. [[0, 1], [-1]]"))
        };
        let chars: Vec<(usize, char)> = s.char_indices().collect();
        let pos = |i: usize| chars.get(i).map(|&(p, _)| p).unwrap_or(s.len());
        // `peek` skips whitespace between tokens (never inside a number).
        let peek = |i: &mut usize| {
            while matches!(chars.get(*i), Some((_, c)) if c.is_whitespace()) {
                *i += 1;
            }
            chars.get(*i).map(|&(_, c)| c)
        };
        let mut i = 0;
        if peek(&mut i) != Some('[') {
            return Err(bad(pos(i), "expected `[`"));
        }
        i += 1;
        let mut groups = Vec::new();
        let number = |i: &mut usize| -> Result<i64> {
            peek(i);
            let start = *i;
            if matches!(chars.get(*i), Some((_, '-'))) {
                *i += 1;
            }
            while matches!(chars.get(*i), Some((_, c)) if c.is_ascii_digit()) {
                *i += 1;
            }
            let text: String = chars[start..*i].iter().map(|&(_, c)| c).collect();
            text.parse::<i64>().map_err(|_| bad(pos(start), "expected an integer position"))
        };
        loop {
            match peek(&mut i) {
                Some(']') if groups.is_empty() => {
                    i += 1;
                    break;
                }
                Some(open @ ('(' | '[')) => {
                    let close = if open == '(' { ')' } else { ']' };
                    i += 1;
                    let mut g = Vec::new();
                    while peek(&mut i) != Some(close) {
                        g.push(number(&mut i)?);
                        match peek(&mut i) {
                            Some(',') => i += 1,
                            Some(c) if c == close => {}
                            _ => return Err(bad(pos(i), &format!("expected `,` or `{close}`"))),
                        }
                    }
                    i += 1;
                    groups.push(g);
                }
                Some(_) => groups.push(vec![number(&mut i)?]),
                None => return Err(bad(pos(i), "unexpected end")),
            }
            match peek(&mut i) {
                Some(',') => {
                    i += 1;
                    if peek(&mut i) == Some(']') {
                        i += 1;
                        break;
                    }
                }
                Some(']') => {
                    i += 1;
                    break;
                }
                _ => return Err(bad(pos(i), "expected `,` or `]`")),
            }
        }
        if peek(&mut i).is_some() {
            return Err(bad(pos(i), "unexpected text after the closing `]`"));
        }
        Self::new(groups)
    }
}

/// Token groups checked against a sequence length: every position is in `0..seq_len`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResolvedGroups {
    groups: Vec<Vec<usize>>,
    seq_len: usize,
}

impl ResolvedGroups {
    /// The groups.
    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// The sequence length they were checked against.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Always false (groups are never empty); present for API completeness.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Every position of every group, in order (easyroutine's `flatten_indexes`).
    pub fn flatten(&self) -> Vec<usize> {
        self.groups.iter().flatten().copied().collect()
    }

    /// For each flattened position, the index of its group (for segment reductions).
    ///
    /// ```
    /// use hook_core::TokenGroups;
    /// let r = TokenGroups::new(vec![vec![0, 2], vec![1]]).unwrap().resolve(3).unwrap();
    /// assert_eq!(r.group_ids(), vec![0, 0, 1]);
    /// ```
    pub fn group_ids(&self) -> Vec<usize> {
        self.groups.iter().enumerate().flat_map(|(gi, g)| std::iter::repeat_n(gi, g.len())).collect()
    }

    /// Sizes of the groups.
    pub fn sizes(&self) -> Vec<usize> {
        self.groups.iter().map(Vec::len).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("[(1,3),(4,)]", vec![vec![1, 3], vec![4]])]
    #[case("[(1, 3), 4]", vec![vec![1, 3], vec![4]])]
    #[case("[[0,1],[5]]", vec![vec![0, 1], vec![5]])]
    #[case("[[-1]]", vec![vec![-1]])]
    #[case("[-1, -2]", vec![vec![-1], vec![-2]])]
    #[case("[(0,1,2,),]", vec![vec![0, 1, 2]])]
    fn parses(#[case] s: &str, #[case] expected: Vec<Vec<i64>>) {
        assert_eq!(s.parse::<TokenGroups>().unwrap().groups(), expected.as_slice());
    }

    #[rstest]
    #[case("", "expected `[`")]
    #[case("[]", "no groups")]
    #[case("[()]", "group 0 is empty")]
    #[case("[(1),()]", "group 1 is empty")]
    #[case("[(1,x)]", "expected an integer")]
    #[case("[(1 2)]", "expected `,` or `)`")]
    #[case("[(1,2)", "expected `,` or `]`")]
    #[case("[(1,2)] x", "after the closing")]
    fn parse_errors(#[case] s: &str, #[case] fragment: &str) {
        let e = s.parse::<TokenGroups>().unwrap_err().to_string();
        assert!(e.contains(fragment), "{e}");
    }

    #[test]
    fn display_round_trips() {
        let g: TokenGroups = "[[1,3],[4]]".parse().unwrap();
        assert_eq!(g.to_string(), "[(1, 3), (4,)]");
        assert_eq!(g.to_string().parse::<TokenGroups>().unwrap(), g);
    }

    #[rstest]
    #[case(vec![vec![1, 3], vec![4]], 5, vec![1, 3, 4], vec![0, 0, 1])]
    #[case(vec![vec![-1]], 5, vec![4], vec![0])]
    #[case(vec![vec![-5, 0]], 5, vec![0, 0], vec![0, 0])]
    #[case(vec![vec![2], vec![0, 1]], 3, vec![2, 0, 1], vec![0, 1, 1])]
    fn resolves(#[case] g: Vec<Vec<i64>>, #[case] n: usize, #[case] flat: Vec<usize>, #[case] ids: Vec<usize>) {
        let r = TokenGroups::new(g).unwrap().resolve(n).unwrap();
        assert_eq!(r.flatten(), flat);
        assert_eq!(r.group_ids(), ids);
        assert_eq!(r.seq_len(), n);
    }

    #[rstest]
    #[case(vec![vec![5]], 5, 5, 0)]
    #[case(vec![vec![0], vec![-6]], 5, -6, 1)]
    #[case(vec![vec![0]], 0, 0, 0)]
    fn out_of_range(#[case] g: Vec<Vec<i64>>, #[case] n: usize, #[case] p: i64, #[case] gi: usize) {
        let e = TokenGroups::new(g).unwrap().resolve(n).unwrap_err();
        assert_eq!(e, CoreError::TokenOutOfRange { position: p, group: gi, seq_len: n });
        assert!(e.to_string().contains(&format!("valid positions are 0..{n}")));
    }

    #[test]
    fn serde_is_a_list_of_lists() {
        let g = TokenGroups::new(vec![vec![0, 1], vec![5]]).unwrap();
        assert_eq!(serde_json::to_string(&g).unwrap(), "[[0,1],[5]]");
        assert_eq!(serde_json::from_str::<TokenGroups>("[[0,1],[5]]").unwrap(), g);
        let e = serde_json::from_str::<TokenGroups>("[[0],[]]").unwrap_err().to_string();
        assert!(e.contains("group 1 is empty"), "{e}");
    }
}
