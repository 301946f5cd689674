//! Where a runner's table goes: its section of a markdown file, and its exit code.

use std::path::Path;
use std::process::ExitCode;

/// Replaces the `<!-- parity:NAME -->` … `<!-- /parity:NAME -->` section of the markdown file
/// at `path` with `## NAME` and `body` (appends it when absent), atomically (a temporary file
/// renamed over it).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("parity.md");
/// hook_parity::write_section(&p, "ops", "old\n").unwrap();
/// hook_parity::write_section(&p, "ops", "new\n").unwrap();
/// let text = std::fs::read_to_string(&p).unwrap();
/// assert!(text.contains("new") && !text.contains("old"));
/// ```
pub fn write_section(path: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let start = format!("<!-- parity:{name} -->");
    let end = format!("<!-- /parity:{name} -->");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Parity with easyroutine 1.1.5\n".to_string());
    let block = format!("{start}\n## {name}\n\n{body}{end}");
    let new = match (old.find(&start), old.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &old[..a], block, &old[b + end.len()..]),
        _ => format!("{}\n\n{}\n", old.trim_end(), block),
    };
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, new)?;
    std::fs::rename(tmp, path)
}

/// What every runner does with its table: prints it and, with `--write FILE`, puts it in
/// FILE's `section` (saying so on stderr).
pub fn publish(write: Option<&Path>, section: &str, table: &str) -> std::io::Result<()> {
    println!("{table}");
    if let Some(path) = write {
        write_section(path, section, table)?;
        eprintln!("parity {section}: wrote {}", path.display());
    }
    Ok(())
}

/// The exit code of a runner: success when every row passed or is explained; an error is
/// printed with the suite's name.
pub fn exit_code(name: &str, r: anyhow::Result<bool>) -> ExitCode {
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("parity {name}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
