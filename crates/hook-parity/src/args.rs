//! The runners' command line: `parity_SUITE CASE_DIR [--write FILE] [--section NAME]`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

/// A runner's arguments.
///
/// ```
/// let a = hook_parity::Args::parse("models", ["cases", "--write", "docs/parity.md"].map(String::from)).unwrap();
/// assert_eq!(a.dir, std::path::PathBuf::from("cases"));
/// assert_eq!(a.section, "models");
/// assert!(hook_parity::Args::parse("models", ["cases", "--wrte", "x"].map(String::from)).is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    /// The folder the Python side wrote the cases into.
    pub dir: PathBuf,
    /// The markdown file whose section gets the table.
    pub write: Option<PathBuf>,
    /// The section's name (the suite's name unless `--section` says another: `real`).
    pub section: String,
}

impl Args {
    /// Parses `args` (without the program name) of the runner of `suite`.
    pub fn parse(suite: &str, args: impl IntoIterator<Item = String>) -> Result<Self> {
        let usage = format!("usage: parity_{suite} CASE_DIR [--write FILE] [--section NAME]");
        let mut it = args.into_iter();
        let (mut dir, mut write, mut section) = (None, None, suite.to_string());
        while let Some(a) = it.next() {
            match a.as_str() {
                "--write" => write = Some(PathBuf::from(it.next().ok_or_else(|| anyhow!("--write needs a file\n{usage}"))?)),
                "--section" => section = it.next().ok_or_else(|| anyhow!("--section needs a name\n{usage}"))?,
                f if f.starts_with('-') => bail!("unknown flag {f}\n{usage}"),
                _ if dir.is_some() => bail!("one case folder only, got another: {a}\n{usage}"),
                _ => dir = Some(PathBuf::from(a)),
            }
        }
        Ok(Args { dir: dir.ok_or_else(|| anyhow!("no case folder\n{usage}"))?, write, section })
    }

    /// The arguments of this process.
    pub fn from_env(suite: &str) -> Result<Self> {
        Self::parse(suite, std::env::args().skip(1))
    }
}
