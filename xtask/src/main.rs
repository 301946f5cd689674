//! `cargo xtask <command>`: everything the project automates.
//!
//! | command | what it does |
//! |---|---|
//! | `setup` | pinned Python venv (torch 2.13, transformers, easyroutine) + the `.libtorch` link |
//! | `ci` | setup, then every test of the workspace, then every parity run (the README's test command) |
//! | `demo` | setup, then the main job on a built-in tiny model (the README's first command) |
//! | `export …` | export a HF causal LM (or a tiny random one) as TorchScript for hookrs |
//! | `parity [ops\|cache\|models]` | compare against the real easyroutine, write `docs/parity.md` |
//! | `bench [ops\|cache\|models]` | side-by-side benchmarks against easyroutine |
//!
//! xtask must build before setup has run, so it never depends on tch.

mod bench;
mod parity;
mod setup;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <setup|ci|demo|export (--random FAMILY [--seed N] [--config FILE] | SOURCE) --out FILE.pt|parity [ops|cache|models]|bench [ops|cache|models]>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &[String]) -> Result<()> {
    let rest = args.get(1..).unwrap_or(&[]);
    match args.first().map(String::as_str) {
        Some("setup") => setup::setup().map(|_| ()),
        Some("ci") => ci(),
        Some("demo") => demo(),
        Some("parity") => parity(rest),
        Some("export") => export(rest),
        Some("bench") => bench(rest),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

/// The README's test command: setup, all tests, all parity runs.
fn ci() -> Result<()> {
    setup::setup()?;
    run(cargo().args(["test", "--workspace", "--all-targets"]))?;
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    parity(&[])?;
    Ok(())
}

/// The README's first command: setup, then the end-to-end session on a tiny model.
fn demo() -> Result<()> {
    setup::setup()?;
    println!("demo: setup is done. The `hookrs` command is not built yet (issue: the `hookrs` command);");
    println!("demo: until it lands, `cargo xtask ci` runs every test and parity check there is.");
    Ok(())
}

fn parity(which: &[String]) -> Result<()> {
    let all = ["ops", "cache", "models"];
    let chosen: Vec<&str> = if which.is_empty() { all.to_vec() } else { which.iter().map(String::as_str).collect() };
    let python = setup::venv_python()?;
    if !python.exists() {
        setup::setup()?;
    }
    for w in chosen {
        match w {
            "ops" => parity::suite(&python, "ops", "hook-ops")?,
            "cache" => parity::cache(&python)?,
            "models" => parity::suite(&python, "models", "hook-torch")?,
            other => bail!("unknown parity suite `{other}`: expected one of {}", all.join(", ")),
        }
    }
    Ok(())
}

fn bench(which: &[String]) -> Result<()> {
    let python = setup::setup()?;
    let all = ["ops", "cache", "models"];
    let chosen: Vec<&str> = if which.is_empty() { vec!["ops"] } else { which.iter().map(String::as_str).collect() };
    for w in chosen {
        match w {
            "ops" => bench::ops(&python)?,
            "models" => bench::models(&python)?,
            "cache" => run(cargo().args(["bench", "-p", "hook-cache", "--bench", "aggregation"]))?,
            other => bail!("unknown bench suite `{other}`: expected one of {}", all.join(", ")),
        }
    }
    Ok(())
}

/// `cargo xtask export …`: the arguments go to `xtask/python/export.py` unchanged (the
/// command line is a contract: see that script).
fn export(args: &[String]) -> Result<()> {
    let python = setup::setup()?;
    run(Command::new(python).arg(project_root().join("xtask/python/export.py")).args(args)).context("export failed")
}

/// The workspace root (xtask's parent).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(project_root());
    c
}

/// Run a command, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
