// Shared by the parity runners (included with `include!`): replaces the
// `<!-- parity:NAME -->` … `<!-- /parity:NAME -->` section of a markdown file, atomically.
pub fn write_section(path: &std::path::Path, name: &str, body: &str) -> std::io::Result<()> {
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

/// The exit code of a parity runner: success when every row passed or is explained.
pub fn exit_code(name: &str, r: anyhow::Result<bool>) -> std::process::ExitCode {
    match r {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("parity {name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
