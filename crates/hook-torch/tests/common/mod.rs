//! Test models: exported once per test run into target/test-models by `xtask/python/export.py`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

static LOCK: Mutex<()> = Mutex::new(());

/// The model families hookrs supports, by their tiny random test models.
pub const FAMILIES: [&str; 10] = ["llama", "gpt2", "gpt_neox", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "qwen3", "olmo2"];

/// The workspace root (the folder holding `xtask/python/export.py`), from whichever crate
/// includes this module.
pub fn root() -> PathBuf {
    let mut d = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !d.join("xtask/python/export.py").exists() && d.pop() {}
    d
}

/// Whether the export at `path` must be made (again): it is missing, or older than the
/// exporter (a change of `export.py` changes the test models).
pub fn stale(path: &std::path::Path) -> bool {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(path), modified(&root().join("xtask/python/export.py"))) {
        (Some(made), Some(exporter)) => made < exporter,
        _ => true,
    }
}

/// The path of the tiny random model of `family`, exported on first use.
pub fn model(family: &str) -> PathBuf {
    let root = root();
    let dir = root.join("target/test-models");
    let path = dir.join(format!("{family}.pt"));
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if stale(&path) {
        let python = std::env::var("HOOKRS_PYTHON_VENV").map(PathBuf::from).unwrap_or_else(|_| venv_python());
        let status = Command::new(&python)
            .arg(root.join("xtask/python/export.py"))
            .args(["--random", family, "--seed", "0", "--out"])
            .arg(&path)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} (run `cargo xtask setup`): {e}", python.display()));
        assert!(status.success(), "exporting the {family} test model failed");
    }
    path
}

/// The tiny random model of `family` exported in `dtype` (`bfloat16`, `float16`).
pub fn model_in(family: &str, dtype: &str) -> PathBuf {
    let root = root();
    let path = root.join("target/test-models").join(format!("{family}@{dtype}.pt"));
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if stale(&path) {
        let status = Command::new(python())
            .arg(root.join("xtask/python/export.py"))
            .args(["--random", family, "--seed", "0", "--dtype", dtype, "--out"])
            .arg(&path)
            .status()
            .expect("the venv's python runs (run `cargo xtask setup`)");
        assert!(status.success(), "exporting the {family} test model in {dtype} failed");
    }
    path
}

/// The project venv's Python (`HOOKRS_PYTHON_VENV` overrides it).
pub fn python() -> PathBuf {
    std::env::var("HOOKRS_PYTHON_VENV").map(PathBuf::from).unwrap_or_else(|_| venv_python())
}

fn venv_python() -> PathBuf {
    let base = std::env::var_os("HOOKRS_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("hookrs")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/hookrs"));
    base.join("venv/bin/python")
}

/// A batch of two examples, the second left-padded by two tokens.
pub fn inputs() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[5i64, 9, 12, 40, 7, 3, 100, 0, 0, 17, 8, 30, 31, 4]).view([2, 7]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([2, 7]);
    (ids, mask.to_kind(Kind::Int64).to_device(Device::Cpu))
}

/// A copy of the `family` test model whose graphs name `device` wherever the export named
/// the cpu (`torch.device("cpu")` in the archive's code), as an export traced on that device
/// would: the CPU-checkable half of "export on a GPU, run anywhere".
pub fn model_traced_on(family: &str, device: &str) -> PathBuf {
    let src = model(family);
    let dst = src.with_file_name(format!("{family}.traced-on-{}.pt", device.replace(':', "-")));
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !dst.exists() {
        let python = std::env::var("HOOKRS_PYTHON_VENV").map(PathBuf::from).unwrap_or_else(|_| venv_python());
        let script = r#"
import sys, zipfile
src, dst, dev = sys.argv[1:4]
n = 0
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst + ".tmp", "w", zipfile.ZIP_STORED) as zout:
    for item in zin.infolist():
        data = zin.read(item.filename)
        if item.filename.endswith(".py"):
            text = data.decode()
            n += text.count('torch.device("cpu")')
            data = text.replace('torch.device("cpu")', 'torch.device("%s")' % dev).encode()
        zout.writestr(item, data)
assert n > 0, "the export holds no cpu device constant"
import os; os.replace(dst + ".tmp", dst)
"#;
        let status = Command::new(&python).args(["-c", script]).arg(&src).arg(&dst).arg(device).status().expect("python runs");
        assert!(status.success(), "rewriting {} failed", src.display());
    }
    dst
}
