//! `cargo xtask setup`: the pinned Python venv (torch, transformers, easyroutine) in a per-user
//! cache directory, and the `.libtorch` link that `.cargo/config.toml` points tch at.
//!
//! Each command installs only what it needs: [`setup`] is the venv and the link (every command
//! that runs a model); [`python_package`] builds `import hookrs` into the venv (the Python
//! tests, parity through Python, the Python bench); [`browser`] and [`cargo_deny`] are for CI's
//! tests alone. `cargo xtask setup` by itself installs all of them.
//!
//! Idempotent: a stamp file records the hash of the requirement files that the venv was built
//! from; when it matches and the imports work, setup only re-checks the link and returns.
//! A half-finished venv (interrupted pip, missing interpreter) is repaired, not reported.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{project_root, run};

/// Where the venv and other per-user caches live: `$HOOKRS_HOME`, else
/// `$XDG_CACHE_HOME/hookrs`, else `~/.cache/hookrs`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HOOKRS_HOME") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("hookrs"));
    }
    let home = std::env::var_os("HOME")
        .context("neither HOOKRS_HOME, XDG_CACHE_HOME nor HOME is set: set HOOKRS_HOME to a writable directory")?;
    Ok(PathBuf::from(home).join(".cache").join("hookrs"))
}

/// The Python interpreter of the venv.
pub fn venv_python() -> Result<PathBuf> {
    Ok(cache_dir()?.join("venv").join("bin").join("python"))
}

/// Imports that prove the venv is complete.
const PROBE: &str = "import torch, transformers, tokenizers, safetensors; \
import easyroutine.interpretability.hooks, easyroutine.interpretability.activation_cache; \
from easyroutine.interpretability.module_wrappers.manager import ModuleWrapperManager; \
import os; print(torch.__version__); print(os.path.dirname(torch.__file__))";

/// Everything any command needs (`cargo xtask setup`, and `ci`).
pub fn everything() -> Result<PathBuf> {
    let python = setup()?;
    python_package()?;
    browser()?;
    cargo_deny()?;
    Ok(python)
}

/// The venv and the `.libtorch` link: what every command that builds or runs a model needs.
/// Returns the venv's Python.
pub fn setup() -> Result<PathBuf> {
    let root = project_root();
    let cache = cache_dir()?;
    fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create the cache directory {} (set HOOKRS_HOME to a writable one)", cache.display()))?;
    let venv = cache.join("venv");
    let python = venv.join("bin").join("python");
    let requirements = root.join("xtask/python/requirements.txt");
    let reference = root.join("xtask/python/reference.txt");
    let stamp_want = stamp_of(&[&requirements, &reference])?;
    let stamp_file = venv.join(".hookrs-stamp");

    let healthy = python.exists()
        && fs::read_to_string(&stamp_file).map(|s| s.trim() == stamp_want).unwrap_or(false)
        && probe(&python).is_ok();
    if healthy {
        eprintln!("setup: venv up to date at {}", venv.display());
    } else {
        if !python.exists() || Command::new(&python).arg("-c").arg("pass").status().map(|s| !s.success()).unwrap_or(true) {
            let system_python = find_system_python()?;
            eprintln!("setup: creating venv at {} with {}", venv.display(), system_python);
            if venv.exists() {
                fs::remove_dir_all(&venv).with_context(|| format!("removing the broken venv {}", venv.display()))?;
            }
            run(Command::new(&system_python).args(["-m", "venv"]).arg(&venv)).with_context(|| {
                format!("`{system_python} -m venv` failed: install the venv module (Debian: `apt-get install python3-venv`)")
            })?;
        }
        let _ = fs::remove_file(&stamp_file);
        eprintln!("setup: installing the pinned packages (first time: torch is a few GB, this takes minutes)");
        pip(&python, &["install", "--disable-pip-version-check", "--progress-bar", "off", "-r"], &requirements)?;
        pip(&python, &["install", "--disable-pip-version-check", "--no-deps", "-r"], &reference)?;
        fs::write(&stamp_file, &stamp_want)?;
    }
    let out = probe(&python).context("the venv was installed but its imports fail")?;
    let mut lines = out.lines();
    let version = lines.next().unwrap_or_default().to_string();
    let torch_dir = PathBuf::from(lines.next().unwrap_or_default());
    if !torch_dir.join("lib").is_dir() || !torch_dir.join("include").is_dir() {
        bail!("torch at {} has no lib/ and include/: reinstall with `rm -rf {}` and run setup again", torch_dir.display(), venv.display());
    }
    link(&root.join(".libtorch"), &torch_dir)?;
    eprintln!("setup: torch {version} at {}", torch_dir.display());
    eprintln!("setup: .libtorch -> {}", torch_dir.display());
    Ok(python)
}

/// `import hookrs` in the venv (after [`setup`]).
pub fn python_package() -> Result<()> {
    let python = setup()?;
    let torch_dir = PathBuf::from(probe(&python)?.lines().nth(1).unwrap_or_default());
    install_python_package(&torch_dir)
}

/// The pinned cargo-deny, installed with `cargo install` the first time (a few minutes; then
/// it stays in cargo's bin folder).
pub fn cargo_deny() -> Result<()> {
    const VERSION: &str = "0.20.2";
    let have = Command::new("cargo").args(["deny", "--version"]).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if have.as_deref().is_some_and(|v| v.contains(VERSION)) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deny {VERSION} (once; a few minutes)");
    run(Command::new("cargo").args(["install", "--locked", "cargo-deny", "--version", VERSION])).context("installing cargo-deny failed: check that crates.io is reachable")
}

/// Debian's Chromium, for the headless test of `hookrs view`'s page: found, or installed with
/// apt-get (root; a few hundred MB the first time).
pub fn browser() -> Result<()> {
    let named = std::env::var("HOOKRS_CHROMIUM").unwrap_or_default();
    if let Some(found) = [named.as_str(), "/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().find(|p| !p.is_empty() && Path::new(p).exists()) {
        eprintln!("setup: chromium at {found}");
        return Ok(());
    }
    eprintln!("setup: installing Debian's chromium (headless browser for the `hookrs view` test)");
    let apt = |args: &[&str]| run(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"));
    if apt(&["install", "-y", "-q", "chromium"]).is_err() {
        apt(&["update", "-q"]).and_then(|_| apt(&["install", "-y", "-q", "chromium"])).context(
            "installing chromium with apt-get failed: install Debian's `chromium` package (or set HOOKRS_CHROMIUM to a Chromium binary)",
        )?;
    }
    Ok(())
}

/// `import hookrs` in the venv: builds the extension module (crates/hookrs-py), puts it next
/// to the package's Python sources and points the venv at them with a `.pth` file (an
/// editable install, as `maturin develop` makes; `maturin build` in crates/hookrs-py makes a
/// wheel).
pub fn install_python_package(torch_dir: &Path) -> Result<()> {
    let root = project_root();
    run(crate::cargo().args(["build", "--quiet", "-p", "hookrs-py"])).context("building the hookrs Python extension (crates/hookrs-py) failed")?;
    let built = root.join("target/debug/libhookrs_py.so");
    let package = root.join("crates/hookrs-py/python");
    std::fs::copy(&built, package.join("hookrs/_native.abi3.so")).with_context(|| format!("copying {}", built.display()))?;
    // site-packages is torch's parent
    let site = torch_dir.parent().context("torch has a parent folder")?;
    std::fs::write(site.join("hookrs.pth"), format!("{}\n", package.display()))?;
    eprintln!("setup: import hookrs -> {}", package.display());
    Ok(())
}

fn pip(python: &Path, args: &[&str], file: &Path) -> Result<()> {
    run(Command::new(python).args(["-m", "pip"]).args(args).arg(file)).with_context(|| {
        format!(
            "pip failed installing {}: check that PyPI is reachable; a partial install is repaired by running `cargo xtask setup` again",
            file.display()
        )
    })
}

fn probe(python: &Path) -> Result<String> {
    let out = Command::new(python).args(["-c", PROBE]).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn find_system_python() -> Result<String> {
    let candidates = std::env::var("HOOKRS_PYTHON").map(|p| vec![p]).unwrap_or_else(|_| vec!["python3".into(), "python".into()]);
    for cand in &candidates {
        let ok = Command::new(cand)
            .args(["-c", "import sys, venv; assert sys.version_info >= (3, 9)"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(cand.clone());
        }
    }
    bail!(
        "no usable Python found (tried {}): install Python 3.9-3.13 with its venv module \
         (Debian: `apt-get install python3 python3-venv python3-pip`), or point HOOKRS_PYTHON at one",
        candidates.join(", ")
    )
}

/// A stable content hash (FNV-1a) of the requirement files.
fn stamp_of(files: &[&Path]) -> Result<String> {
    let mut h: u64 = 0xcbf29ce484222325;
    for f in files {
        let bytes = fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    Ok(format!("{h:016x}"))
}

fn link(link: &Path, target: &Path) -> Result<()> {
    if fs::read_link(link).map(|t| t == target).unwrap_or(false) {
        return Ok(());
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("removing the old {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
