//! Head selection: easyroutine's `head: Union[str, int] = "all"`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{CoreError, Result};

/// Which attention heads a hook reads: all of them, or one.
///
/// ```
/// use hook_core::HeadSelection;
/// assert_eq!(HeadSelection::All.resolve(4).unwrap(), vec![0, 1, 2, 3]);
/// assert_eq!(HeadSelection::One(2).resolve(4).unwrap(), vec![2]);
/// assert!(HeadSelection::One(4).resolve(4).is_err());
/// assert_eq!("all".parse::<HeadSelection>().unwrap(), HeadSelection::All);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HeadSelection {
    /// Every head (`"all"`).
    #[default]
    All,
    /// One head.
    One(usize),
}

impl HeadSelection {
    /// The head indices, checked against `num_heads`.
    pub fn resolve(self, num_heads: usize) -> Result<Vec<usize>> {
        match self {
            HeadSelection::All => Ok((0..num_heads).collect()),
            HeadSelection::One(h) if h < num_heads => Ok(vec![h]),
            HeadSelection::One(h) => Err(CoreError::HeadOutOfRange { head: h, num_heads }),
        }
    }
}

impl fmt::Display for HeadSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadSelection::All => write!(f, "all"),
            HeadSelection::One(h) => write!(f, "{h}"),
        }
    }
}

impl FromStr for HeadSelection {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t == "all" {
            return Ok(HeadSelection::All);
        }
        t.parse::<usize>().map(HeadSelection::One).map_err(|_| CoreError::InvalidHead(s.to_string()))
    }
}

impl From<usize> for HeadSelection {
    fn from(h: usize) -> Self {
        HeadSelection::One(h)
    }
}

impl Serialize for HeadSelection {
    /// `"all"` or an integer, as in easyroutine's configs.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            HeadSelection::All => s.serialize_str("all"),
            HeadSelection::One(h) => s.serialize_u64(*h as u64),
        }
    }
}

impl<'de> Deserialize<'de> for HeadSelection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u64),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::N(n) => Ok(HeadSelection::One(n as usize)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("all", HeadSelection::All)]
    #[case("3", HeadSelection::One(3))]
    #[case(" 0 ", HeadSelection::One(0))]
    fn parses(#[case] s: &str, #[case] h: HeadSelection) {
        assert_eq!(s.parse::<HeadSelection>().unwrap(), h);
    }

    #[rstest]
    #[case("All")]
    #[case("-1")]
    #[case("")]
    #[case("1.5")]
    fn rejects(#[case] s: &str) {
        assert_eq!(s.parse::<HeadSelection>().unwrap_err(), CoreError::InvalidHead(s.into()));
    }

    #[rstest]
    #[case(HeadSelection::All, 3, Ok(vec![0, 1, 2]))]
    #[case(HeadSelection::All, 0, Ok(vec![]))]
    #[case(HeadSelection::One(0), 1, Ok(vec![0]))]
    #[case(HeadSelection::One(8), 8, Err(CoreError::HeadOutOfRange { head: 8, num_heads: 8 }))]
    fn resolve(#[case] h: HeadSelection, #[case] n: usize, #[case] expected: Result<Vec<usize>>) {
        assert_eq!(h.resolve(n), expected);
    }

    #[test]
    fn serde_like_easyroutine() {
        assert_eq!(serde_json::to_string(&HeadSelection::All).unwrap(), "\"all\"");
        assert_eq!(serde_json::to_string(&HeadSelection::One(2)).unwrap(), "2");
        assert_eq!(serde_json::from_str::<HeadSelection>("2").unwrap(), HeadSelection::One(2));
        assert_eq!(serde_json::from_str::<HeadSelection>("\"all\"").unwrap(), HeadSelection::All);
        assert!(serde_json::from_str::<HeadSelection>("\"some\"").is_err());
    }
}
