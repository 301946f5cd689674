//! Component paths in easyroutine's syntax.
//!
//! `model.layers[3].self_attn.o_proj.output` names the output of a submodule;
//! `….input` its first input; a bare path (`model.layers[3]`) the module itself.
//! `layers.3` and `layers[3]` are the same path; [`ComponentPath`]'s `Display` prints the
//! bracket form, and [`ComponentPath::module_path`] the dotted form of torch's `named_modules()`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

/// One step of a module path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Segment {
    /// An attribute name (`self_attn`).
    Name(String),
    /// An index into a module list (`[3]` or `.3`).
    Index(usize),
}

/// Which side of a module call a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Site {
    /// The module's first input (a hook that runs before it).
    Input,
    /// The module's output.
    Output,
}

impl Site {
    /// The suffix used in paths.
    ///
    /// ```
    /// assert_eq!(hook_core::Site::Input.as_str(), "input");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Site::Input => "input",
            Site::Output => "output",
        }
    }
}

/// A parsed component path: module segments plus an optional `.input` / `.output` site.
///
/// ```
/// use hook_core::{ComponentPath, Site};
/// let p: ComponentPath = "model.layers[3].self_attn.o_proj.output".parse().unwrap();
/// assert_eq!(p.site(), Some(Site::Output));
/// assert_eq!(p.module_path(), "model.layers.3.self_attn.o_proj");
/// assert_eq!(p, "model.layers.3.self_attn.o_proj.output".parse().unwrap());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentPath {
    segments: Vec<Segment>,
    site: Option<Site>,
}

impl ComponentPath {
    /// Builds a path from parts.
    ///
    /// ```
    /// use hook_core::{ComponentPath, Segment, Site};
    /// let p = ComponentPath::new(vec![Segment::Name("model".into()), Segment::Name("norm".into())], Some(Site::Output));
    /// assert_eq!(p.to_string(), "model.norm.output");
    /// ```
    pub fn new(segments: Vec<Segment>, site: Option<Site>) -> Self {
        Self { segments, site }
    }

    /// Parses a path; same as `str::parse`.
    ///
    /// ```
    /// use hook_core::ComponentPath;
    /// let err = ComponentPath::parse("model.layers[x]").unwrap_err();
    /// assert!(err.to_string().contains("character 13"));
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        s.parse()
    }

    /// The module segments (without the site).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The site, if the path ends in `.input` or `.output`.
    pub fn site(&self) -> Option<Site> {
        self.site
    }

    /// The same module with another site.
    ///
    /// ```
    /// use hook_core::{ComponentPath, Site};
    /// let p = ComponentPath::parse("model.layers[0]").unwrap().with_site(Some(Site::Input));
    /// assert_eq!(p.to_string(), "model.layers[0].input");
    /// ```
    pub fn with_site(mut self, site: Option<Site>) -> Self {
        self.site = site;
        self
    }

    /// The first module-list index in the path: the layer for `model.layers[3]…`.
    ///
    /// ```
    /// use hook_core::ComponentPath;
    /// assert_eq!(ComponentPath::parse("model.layers[7].mlp").unwrap().layer(), Some(7));
    /// assert_eq!(ComponentPath::parse("model.norm").unwrap().layer(), None);
    /// ```
    pub fn layer(&self) -> Option<usize> {
        self.segments.iter().find_map(|s| match s {
            Segment::Index(i) => Some(*i),
            Segment::Name(_) => None,
        })
    }

    /// The dotted module path as torch's `named_modules()` prints it.
    ///
    /// ```
    /// use hook_core::ComponentPath;
    /// assert_eq!(ComponentPath::parse("model.layers[2].mlp.input").unwrap().module_path(), "model.layers.2.mlp");
    /// ```
    pub fn module_path(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Name(n) => n.clone(),
                Segment::Index(i) => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Builds a path from a dotted torch module path and a site.
    ///
    /// ```
    /// use hook_core::{ComponentPath, Site};
    /// let p = ComponentPath::from_module_path("model.layers.0.self_attn", Some(Site::Output)).unwrap();
    /// assert_eq!(p.to_string(), "model.layers[0].self_attn.output");
    /// ```
    pub fn from_module_path(path: &str, site: Option<Site>) -> Result<Self> {
        let mut p: ComponentPath = path.parse()?;
        if p.site.is_some() {
            // A module literally named `input`/`output` at the end of a module path.
            let s = p.site.take().expect("checked");
            p.segments.push(Segment::Name(s.as_str().into()));
        }
        p.site = site;
        Ok(p)
    }
}

impl fmt::Display for ComponentPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.segments.iter().enumerate() {
            match s {
                Segment::Name(n) if i == 0 => write!(f, "{n}")?,
                Segment::Name(n) => write!(f, ".{n}")?,
                Segment::Index(ix) => write!(f, "[{ix}]")?,
            }
        }
        if let Some(site) = self.site {
            if self.segments.is_empty() {
                write!(f, "{}", site.as_str())?;
            } else {
                write!(f, ".{}", site.as_str())?;
            }
        }
        Ok(())
    }
}

impl FromStr for ComponentPath {
    type Err = CoreError;

    fn from_str(input: &str) -> Result<Self> {
        let err = |position: usize, message: &str| CoreError::InvalidPath {
            input: input.to_string(),
            position,
            message: message.to_string(),
        };
        let chars: Vec<char> = input.chars().collect();
        if chars.is_empty() {
            return Err(err(0, "expected a module name such as `model`, found an empty path"));
        }
        let mut segments = Vec::new();
        let mut i = 0;
        // `expect_name` is true at the start and after a dot.
        let mut expect_name = true;
        while i < chars.len() {
            let c = chars[i];
            if expect_name {
                let start = i;
                if c.is_ascii_digit() {
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                    let text: String = chars[start..i].iter().collect();
                    let ix = text.parse::<usize>().map_err(|_| err(start, "index is too large"))?;
                    segments.push(Segment::Index(ix));
                } else if c.is_alphabetic() || c == '_' {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                    segments.push(Segment::Name(chars[start..i].iter().collect()));
                } else {
                    return Err(err(i, &format!("expected a module name or an index, found `{c}`")));
                }
                expect_name = false;
                continue;
            }
            match c {
                '.' => {
                    if i + 1 == chars.len() {
                        return Err(err(i, "the path ends with `.`: expected a name after it"));
                    }
                    expect_name = true;
                    i += 1;
                }
                '[' => {
                    let start = i + 1;
                    let mut j = start;
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    if j == start {
                        return Err(err(start.min(chars.len()), "expected a non-negative integer index inside `[...]`"));
                    }
                    if j >= chars.len() || chars[j] != ']' {
                        return Err(err(j.min(chars.len()), "expected `]` to close the index"));
                    }
                    let text: String = chars[start..j].iter().collect();
                    let ix = text.parse::<usize>().map_err(|_| err(start, "index is too large"))?;
                    segments.push(Segment::Index(ix));
                    i = j + 1;
                }
                other => return Err(err(i, &format!("expected `.` or `[`, found `{other}`"))),
            }
        }
        let site = match segments.last() {
            Some(Segment::Name(n)) if n == "input" => Some(Site::Input),
            Some(Segment::Name(n)) if n == "output" => Some(Site::Output),
            _ => None,
        };
        if site.is_some() {
            segments.pop();
        }
        Ok(ComponentPath { segments, site })
    }
}

impl Serialize for ComponentPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ComponentPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("model.layers[3].self_attn.o_proj.output")]
    #[case("model.layers[3].self_attn.o_proj.input")]
    #[case("model.layers[3]")]
    #[case("model.embed_tokens.output")]
    #[case("model.norm")]
    #[case("lm_head.output")]
    #[case("model.layers[0].self_attn.attention_matrix_hook.output")]
    #[case("model.layers[10][2].x")]
    #[case("output")]
    fn round_trips(#[case] s: &str) {
        let p: ComponentPath = s.parse().unwrap();
        assert_eq!(p.to_string(), s);
        assert_eq!(p.to_string().parse::<ComponentPath>().unwrap(), p);
    }

    #[rstest]
    #[case("model.layers.3.mlp.output", "model.layers[3].mlp.output")]
    #[case("model.layers.12", "model.layers[12]")]
    #[case("model.layers.0.self_attn", "model.layers[0].self_attn")]
    fn dotted_index_equals_bracket(#[case] dotted: &str, #[case] bracket: &str) {
        let a: ComponentPath = dotted.parse().unwrap();
        let b: ComponentPath = bracket.parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), bracket);
    }

    #[rstest]
    #[case("", 0, "empty path")]
    #[case(".model", 0, "found `.`")]
    #[case("model..norm", 6, "found `.`")]
    #[case("model.", 5, "ends with `.`")]
    #[case("model.layers[", 13, "non-negative integer")]
    #[case("model.layers[x]", 13, "non-negative integer")]
    #[case("model.layers[-1]", 13, "non-negative integer")]
    #[case("model.layers[3", 14, "`]`")]
    #[case("model.layers[3]x", 15, "expected `.` or `[`")]
    #[case("model layers", 5, "expected `.` or `[`")]
    #[case("model.la-yers", 8, "expected `.` or `[`")]
    #[case("model.layers[99999999999999999999999]", 13, "too large")]
    fn errors_point_at_the_character(#[case] s: &str, #[case] pos: usize, #[case] fragment: &str) {
        match s.parse::<ComponentPath>().unwrap_err() {
            CoreError::InvalidPath { position, message, .. } => {
                assert_eq!(position, pos, "{message}");
                assert!(message.contains(fragment), "{message}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn error_display_draws_a_caret() {
        let e = "model.layers[x]".parse::<ComponentPath>().unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines[1], "  model.layers[x]");
        assert_eq!(lines[2], "               ^");
    }

    #[rstest]
    #[case("model.layers[3].self_attn.output", Some(3), Some(Site::Output), "model.layers.3.self_attn")]
    #[case("model.layers[3].input", Some(3), Some(Site::Input), "model.layers.3")]
    #[case("model.norm", None, None, "model.norm")]
    fn accessors(#[case] s: &str, #[case] layer: Option<usize>, #[case] site: Option<Site>, #[case] module: &str) {
        let p: ComponentPath = s.parse().unwrap();
        assert_eq!(p.layer(), layer);
        assert_eq!(p.site(), site);
        assert_eq!(p.module_path(), module);
        assert_eq!(ComponentPath::from_module_path(module, site).unwrap(), p);
    }

    #[test]
    fn module_named_output_stays_a_module_in_from_module_path() {
        let p = ComponentPath::from_module_path("bert.attention.output", Some(Site::Input)).unwrap();
        assert_eq!(p.to_string(), "bert.attention.output.input");
        assert_eq!(p.module_path(), "bert.attention.output");
    }

    #[test]
    fn serde_as_string() {
        let p: ComponentPath = "model.layers.1.mlp.output".parse().unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, "\"model.layers[1].mlp.output\"");
        assert_eq!(serde_json::from_str::<ComponentPath>(&j).unwrap(), p);
        assert!(serde_json::from_str::<ComponentPath>("\"a..b\"").is_err());
    }
}
