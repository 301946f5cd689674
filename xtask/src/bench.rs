//! `cargo xtask bench`: easyroutine and hookrs on the same inputs in one run, ratios printed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{cargo, project_root, run};

/// attention_pattern_head block reductions: easyroutine vs hook-ops, G = 1, 4, 16, 32.
pub fn ops(python: &Path) -> Result<()> {
    let root = project_root();
    let dir = root.join("target/bench/ops");
    run(cargo().args(["build", "--quiet", "--release", "-p", "hook-ops", "--example", "bench_ops"]))?;
    eprintln!("bench ops: timing easyroutine (Python double loop; G=32 takes a few seconds per call)...");
    let py = Command::new(python).arg(root.join("xtask/python/bench_ops.py")).arg(&dir).output()?;
    if !py.status.success() {
        bail!("bench_ops.py failed:\n{}", String::from_utf8_lossy(&py.stderr));
    }
    let cases = String::from_utf8(py.stdout)?;
    eprintln!("bench ops: timing hook-ops...");
    let mut child = Command::new(root.join("target/release/examples/bench_ops"))
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting bench_ops")?;
    child.stdin.take().expect("piped").write_all(cases.as_bytes())?;
    let ours = child.wait_with_output()?;
    if !ours.status.success() {
        bail!("bench_ops failed");
    }
    let ours = String::from_utf8(ours.stdout)?;
    println!("| G | mode | easyroutine ms/layer | hookrs ms/layer | speed-up |");
    println!("|---|---|---|---|---|");
    for (a, b) in cases.lines().zip(ours.lines()) {
        let (g, mode, er) = fields(a)?;
        let (_, _, us) = fields(b)?;
        println!("| {g} | {mode} | {er:.3} | {us:.3} | {:.0}x |", er / us);
    }
    Ok(())
}

/// (G, mode, ms) from one JSON line, without a JSON dependency in xtask.
fn fields(line: &str) -> Result<(String, String, f64)> {
    let get = |k: &str| -> Option<&str> {
        let i = line.find(&format!("\"{k}\":"))? + k.len() + 3;
        let rest = line[i..].trim_start();
        let end = rest.find([',', '}'])?;
        Some(rest[..end].trim().trim_matches('"'))
    };
    let g = get("G").context("no G")?.to_string();
    let mode = get("mode").context("no mode")?.to_string();
    let ms: f64 = get("ms").context("no ms")?.parse()?;
    Ok((g, mode, ms))
}

/// Options of `cargo xtask bench models`.
pub struct ModelsOptions {
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    pub batch: usize,
    pub seq: usize,
    /// `bench` (8 layers, d 512), `large` (16 layers, d 2048, 3.5 GB) or a config.json.
    pub config: String,
    /// Fresh processes per load mode (plain, instrumented), alternating.
    pub loads: usize,
    /// Skip easyroutine's side (for a GPU run without it, or a quick look).
    pub easyroutine: bool,
    /// An existing export (or `smollm2`, fetched) instead of a random llama from `config`.
    pub model: Option<String>,
}

impl ModelsOptions {
    pub const USAGE: &'static str = "cargo xtask bench models [--device cpu|cuda|cuda:N] [--batch B] [--seq S] [--config bench|large|FILE.json | --model FILE.pt|smollm2] [--loads N] [--no-easyroutine]";

    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = ModelsOptions { device: "cpu".into(), batch: 4, seq: 128, config: "bench".into(), loads: 3, easyroutine: true, model: None };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut v = || it.next().with_context(|| format!("{a} needs a value: {}", Self::USAGE));
            match a.as_str() {
                "--device" => o.device = v()?.clone(),
                "--batch" => o.batch = v()?.parse().context("--batch: a number")?,
                "--seq" => o.seq = v()?.parse().context("--seq: a number")?,
                "--config" => o.config = v()?.clone(),
                "--model" => o.model = Some(v()?.clone()),
                "--loads" => o.loads = v()?.parse().context("--loads: a number")?,
                "--no-easyroutine" => o.easyroutine = false,
                other => bail!("unknown option {other}: {}", Self::USAGE),
            }
        }
        Ok(o)
    }
}

/// The `source` an export records (its save_pretrained directory, for a real model).
fn export_source(python: &Path, model: &Path) -> Result<std::path::PathBuf> {
    let script = "import json, sys, torch\nx = {'hookrs.json': ''}\ntorch.jit.load(sys.argv[1], _extra_files=x)\nprint(json.loads(x['hookrs.json'])['source'])";
    let out = Command::new(python).args(["-c", script]).arg(model).output()?;
    if !out.status.success() {
        bail!("{} is not a hookrs export: {}", model.display(), String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default());
    }
    Ok(String::from_utf8(out.stdout)?.trim().into())
}

/// `VmRSS`/`VmHWM` fields and times from one `bench_models --load` line.
fn json_num(line: &str, k: &str) -> Result<f64> {
    let i = line.find(&format!("\"{k}\":")).with_context(|| format!("no {k} in {line}"))? + k.len() + 3;
    let rest = line[i..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Ok(rest[..end].trim().parse()?)
}

/// Plain / instrumented / full extraction forward against easyroutine on the same model, and
/// plain against instrumented load (time and peak resident memory, fresh processes).
pub fn models(python: &Path, o: &ModelsOptions) -> Result<()> {
    let root = project_root();
    let dir = root.join("target/bench/models");
    std::fs::create_dir_all(&dir)?;
    let (name, config) = match o.config.as_str() {
        "bench" => ("llama8".to_string(), root.join("xtask/python/configs/bench_llama.json")),
        "large" => ("llama16-d2048".to_string(), root.join("xtask/python/configs/large_llama.json")),
        file => {
            let p = Path::new(file).to_path_buf();
            (format!("custom-{}", p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()), p)
        }
    };
    // --model: an export of any model; easyroutine's side loads the directory it was exported from
    let (name, config, model) = match o.model.as_deref() {
        Some("smollm2") => {
            let model = crate::fetch(python, &["smollm2".to_string()])?;
            ("smollm2".to_string(), model.parent().context("the export lies in a folder")?.join("hf"), model)
        }
        Some(file) => {
            let model = Path::new(file).to_path_buf();
            if !model.is_file() {
                bail!("--model {file}: no such file (an export from `cargo xtask export`, or smollm2)");
            }
            let source = export_source(python, &model)?;
            (model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), source, model)
        }
        None => (name.clone(), config.clone(), dir.join(format!("{name}.pt"))),
    };
    if o.model.is_none() && !config.is_file() {
        bail!("--config {}: no such file (bench, large or a config.json)", o.config);
    }
    if o.model.is_none() && !model.exists() {
        eprintln!("bench models: exporting {} (random llama from {})...", model.display(), config.display());
        run(Command::new(python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--config"]).arg(&config).arg("--out").arg(&model))?;
    }
    run(cargo().args(["build", "--quiet", "--release", "-p", "hook-torch", "--example", "bench_models"]))?;
    let exe = root.join("target/release/examples/bench_models");
    let size_mb = std::fs::metadata(&model)?.len() as f64 / 1e6;

    eprintln!("bench models: loading plain and instrumented, {} fresh processes each, alternating...", o.loads);
    let (mut plain_ms, mut hooked_ms, mut plain_mb, mut hooked_mb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.loads {
        for (mode, ms, mb) in [("plain", &mut plain_ms, &mut plain_mb), ("hooked", &mut hooked_ms, &mut hooked_mb)] {
            let out = Command::new(&exe).arg(&model).args(["--load", mode, "--device", &o.device]).output()?;
            if !out.status.success() {
                bail!("bench_models --load {mode} failed:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            let line = String::from_utf8(out.stdout)?;
            ms.push(json_num(&line, "load_ms")?);
            mb.push((json_num(&line, "peak_rss_kb")? - json_num(&line, "rss_before_kb")?) / 1e3);
        }
    }
    let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);

    eprintln!("bench models: timing hookrs (plain TorchScript, instrumented idle, full extraction)...");
    let (b, s) = (o.batch.to_string(), o.seq.to_string());
    let ours = Command::new(&exe).arg(&model).args(["--device", &o.device, "--batch", &b, "--seq", &s]).output()?;
    if !ours.status.success() {
        bail!("bench_models failed:\n{}", String::from_utf8_lossy(&ours.stderr));
    }
    let ours = String::from_utf8(ours.stdout)?;
    let (plain, idle, full) = (json_num(&ours, "plain_ms")?, json_num(&ours, "idle_ms")?, json_num(&ours, "full_ms")?);

    println!("{name} ({}), B={}, S={}, device {}, 2 threads, model file {size_mb:.0} MB", config.display(), o.batch, o.seq, o.device);
    println!();
    println!("| load | ms (best of {n}) | ratio | peak RSS growth, MB (best of {n}) | / model file |", n = o.loads);
    println!("|---|---|---|---|---|");
    println!("| plain `CModule::load` | {:.0} | 1.00 | {:.0} | {:.2} |", min(&plain_ms), min(&plain_mb), min(&plain_mb) / size_mb);
    println!("| `HookedModule::load` (instrumented) | {:.0} | {:.2}x plain | {:.0} | {:.2} |", min(&hooked_ms), min(&hooked_ms) / min(&plain_ms), min(&hooked_mb), min(&hooked_mb) / size_mb);
    println!();
    println!("| run | ms | ratio |");
    println!("|---|---|---|");
    println!("| hookrs: plain TorchScript forward | {plain:.1} | 1.00 |");
    println!("| hookrs: instrumented, no hooks | {idle:.1} | {:.3}x plain |", idle / plain);
    let full_logits = json_num(&ours, "full_logits_ms")?;
    println!("| hookrs: full extraction ({} entries) with the logits: the same forward as plain | {full_logits:.1} | {:.3}x plain |", json_num(&ours, "keys")?, full_logits / plain);
    println!("| hookrs: full extraction without logits (stops after the last layer, no LM head) | {full:.1} | {:.3}x plain |", full / plain);
    let from_python = python_api_full_ms(python, &model, &b, &s, &o.device, false)?;
    println!("| hookrs from Python: the same `run_with_cache` through `import hookrs` | {from_python:.1} | {:.3}x the Rust call |", from_python / full);
    // the memory guard is opt-in in a library; its cost when a Python user turns it on
    let guarded = python_api_full_ms(python, &model, &b, &s, &o.device, true)?;
    println!("| hookrs from Python with `hookrs.set_memory_limit(\"machine\")` (every CPU allocation through the guard) | {guarded:.1} | {:.3}x without |", guarded / from_python);
    if o.easyroutine {
        eprintln!("bench models: timing easyroutine (eager plain, full extraction)...");
        if !config.exists() {
            bail!("easyroutine's side needs the eager model: {} (the export's source) is not a save_pretrained directory here; pass --no-easyroutine", config.display());
        }
        let seed = if config.is_dir() { "-" } else { "0" };
        let py = Command::new(python).arg(root.join("xtask/python/bench_models.py")).arg(&config).arg(seed).args([&b, &s, &o.device]).output()?;
        if !py.status.success() {
            bail!("bench_models.py failed:\n{}", String::from_utf8_lossy(&py.stderr));
        }
        let theirs = String::from_utf8(py.stdout)?;
        let (eager, er_full) = (json_num(&theirs, "eager_plain_ms")?, json_num(&theirs, "easyroutine_full_ms")?);
        println!("| easyroutine: eager forward | {eager:.1} | 1.00 |");
        println!("| easyroutine: full extraction ({} entries) | {er_full:.1} | {:.3}x eager |", json_num(&theirs, "easyroutine_keys")?, er_full / eager);
        println!("| full extraction (the whole forward on both sides), easyroutine / hookrs | | {:.2}x faster |", er_full / full_logits);
    }
    Ok(())
}

/// The full extraction timed from Python (`xtask/python/bench_python_api.py`) with a release
/// build of the extension, so both sides run optimized Rust: the package is copied to
/// target/bench/python with the release `.so`, ahead of the venv's editable install on
/// PYTHONPATH.
fn python_api_full_ms(python: &Path, model: &Path, batch: &str, seq: &str, device: &str, guard: bool) -> Result<f64> {
    let root = project_root();
    eprintln!("bench models: timing run_with_cache from Python (release build of crates/hookrs-py)...");
    run(cargo().args(["build", "--quiet", "--release", "-p", "hookrs-py"]))?;
    let pkg = root.join("target/bench/python/hookrs");
    std::fs::create_dir_all(&pkg)?;
    std::fs::copy(root.join("crates/hookrs-py/python/hookrs/__init__.py"), pkg.join("__init__.py"))?;
    std::fs::copy(root.join("target/release/libhookrs_py.so"), pkg.join("_native.abi3.so"))?;
    let out = Command::new(python)
        .arg(root.join("xtask/python/bench_python_api.py"))
        .arg(model)
        .args([batch, seq, device, if guard { "on" } else { "off" }])
        .env("PYTHONPATH", root.join("target/bench/python"))
        .output()?;
    if !out.status.success() {
        bail!("bench_python_api.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    json_num(&String::from_utf8(out.stdout)?, "python_full_ms")
}

/// `cargo xtask bench dataset [--prompts N] [--scale K]`: `hookrs extract` end to end against
/// easyroutine's extraction loop on the bench llama (xtask/python/bench_dataset.py).
pub fn dataset(python: &Path, args: &[String]) -> Result<()> {
    let root = project_root();
    let dir = root.join("target/bench/models");
    std::fs::create_dir_all(&dir)?;
    // `--model smollm2`: the real model on real text; otherwise the bench llama on the word list
    let real = args.iter().position(|a| a == "--model").map(|i| args.get(i + 1).cloned());
    let mut rest: Vec<String> = args.to_vec();
    let (model, config, work, hf) = match real {
        Some(Some(name)) if name == "smollm2" => {
            let i = rest.iter().position(|a| a == "--model").expect("found");
            rest.drain(i..i + 2);
            let model = crate::fetch(python, &["smollm2".to_string()])?;
            let hf = model.parent().context("the export lies in a folder")?.join("hf");
            (model, hf.join("config.json"), root.join("target/bench/dataset-smollm2"), Some(hf))
        }
        Some(other) => bail!("bench dataset --model {}: the real model this bench knows is smollm2", other.unwrap_or_default()),
        None => {
            let model = dir.join("llama8.pt");
            let config = root.join("xtask/python/configs/bench_llama.json");
            if !model.exists() {
                run(Command::new(python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--config"]).arg(&config).arg("--out").arg(&model))?;
            }
            (model, config, root.join("target/bench/dataset"), None)
        }
    };
    run(cargo().args(["build", "--quiet", "--release", "-p", "hookrs-cli"]))?;
    let mut cmd = Command::new(python);
    cmd.arg(root.join("xtask/python/bench_dataset.py")).arg(root.join("target/release/hookrs")).arg(&model).arg(&config).arg(&work).args(&rest);
    if let Some(hf) = hf {
        cmd.arg("--hf").arg(hf);
    }
    run(&mut cmd)
}

/// `cargo xtask bench merge [--prompts N]`: the peak RSS of `hookrs merge` of two shards into a
/// chunk directory (bounded: one chunk at a time) and into one file (the whole cache), for N
/// and 8N prompts (default 400) of every token's resid_in, resid_out and attention patterns on
/// the tiny llama. The directory's peak must not grow with the dataset; the file's does.
pub fn merge(python: &Path, args: &[String]) -> Result<()> {
    let root = project_root();
    let n: usize = match args.iter().position(|a| a == "--prompts") {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).context("--prompts needs a number")?,
        None => 400,
    };
    let model = root.join("target/test-models/llama.pt");
    if !model.exists() {
        run(Command::new(python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--out"]).arg(&model))?;
    }
    run(cargo().args(["build", "--quiet", "--release", "-p", "hookrs-cli"]))?;
    let hookrs = root.join("target/release/hookrs");
    let work = root.join("target/bench/merge");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // the peak RSS of a child, as the kernel counts it (getrusage of the children)
    let peak = |argv: &[&std::ffi::OsStr]| -> Result<f64> {
        let code = "import resource, subprocess, sys\nsubprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\nprint(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
        let out = Command::new(python).arg("-c").arg(code).args(argv).output()?;
        if !out.status.success() {
            bail!("{:?} failed:\n{}", argv, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().parse::<f64>()? / 1024.0)
    };
    println!("| prompts | cache on disk | merge into OUT/ (peak RSS) | merge into one file (peak RSS) |");
    println!("|---|---|---|---|");
    for count in [n, 8 * n] {
        let prompts = work.join(format!("prompts{count}.txt"));
        let words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "into", "woods", "near", "rivers", "and", "hills"];
        let text: String = (0..count).map(|i| (0..8 + i % 17).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>().join(" ") + "\n").collect();
        std::fs::write(&prompts, text)?;
        let mut shards = Vec::new();
        for k in 0..2 {
            let out = work.join(format!("shard{count}-{k}/"));
            run(Command::new(&hookrs)
                .args(["extract", "--model"])
                .arg(&model)
                .arg("--prompts")
                .arg(&prompts)
                .args(["--extract", "resid_in,resid_out,attn_pattern", "--tokens", "all", "--chunk-size", "100", "--shard", &format!("{k}/2"), "--out"])
                .arg(&out)
                .stdout(std::process::Stdio::null()))?;
            shards.push(out);
        }
        let bytes: u64 = shards.iter().flat_map(|d| std::fs::read_dir(d).into_iter().flatten()).filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
        let dir_out = work.join(format!("merged{count}/"));
        let file_out = work.join(format!("merged{count}.safetensors"));
        let args = |out: &Path| -> Vec<std::ffi::OsString> { [hookrs.as_os_str(), "merge".as_ref(), out.as_os_str(), shards[0].as_os_str(), shards[1].as_os_str()].iter().map(|s| s.to_os_string()).collect() };
        let d = peak(&args(&dir_out).iter().map(|s| s.as_os_str()).collect::<Vec<_>>())?;
        let f = peak(&args(&file_out).iter().map(|s| s.as_os_str()).collect::<Vec<_>>())?;
        println!("| {count} | {:.1} MB | {d:.0} MB | {f:.0} MB |", bytes as f64 / 1e6);
    }
    Ok(())
}

/// `cargo xtask bench patch`: activation patching on the real SmolLM2 (the demo's IOI pair) of
/// resid_out (layers x positions) and of heads (layers x heads), side by side in one run:
/// `hookrs patch` as it runs by default (cells batched, each layer's batch forked from one
/// corrupted run up to that layer), batched without the shared prefix (`--no-shared-prefix`),
/// and one forward per cell (`--max-batch-tokens 1 --no-shared-prefix`); and plain PyTorch on
/// the eager model (a forward-hook loop, and the cells of each layer batched by hand:
/// `xtask/python/bench_patch.py`), with the grids compared. CPU, 2 threads.
pub fn patch(python: &Path, args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("bench patch takes no options, got `{a}` (usage: cargo xtask bench patch)");
    }
    let root = project_root();
    let model = crate::fetch(python, &["smollm2".to_string()])?;
    let hf = model.parent().context("the export lies in a folder")?.join("hf");
    run(cargo().args(["build", "--quiet", "--release", "-p", "hookrs-cli"]))?;
    let hookrs = root.join("target/release/hookrs");
    let (clean, corrupted) = ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to");
    let ids = |text: &str, special: bool| -> Result<String> {
        let mut c = Command::new(&hookrs);
        c.args(["tokenize", "--json", "--model"]).arg(&model).args(["--text", text]);
        if !special {
            c.arg("--no-special-tokens");
        }
        let out = c.output()?;
        if !out.status.success() {
            bail!("hookrs tokenize failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["ids"].to_string())
    };
    let (clean_ids, corrupted_ids, answer, wrong) = (ids(clean, true)?, ids(corrupted, true)?, ids(" Mary", false)?, ids(" John", false)?);
    let one = |s: &str| -> Result<String> {
        let v: Vec<i64> = serde_json::from_str(s)?;
        if v.len() != 1 {
            bail!("{s}: expected one token");
        }
        Ok(v[0].to_string())
    };
    let (answer, wrong) = (one(&answer)?, one(&wrong)?);
    let work = root.join("target/bench/patch");
    std::fs::create_dir_all(&work)?;
    // (end to end, the sweep alone as the command's JSON reports it, the grid)
    let time_hookrs = |component: &str, budget: &str, shared: bool| -> Result<(f64, f64, Vec<f64>)> {
        let out = work.join(format!("{component}-budget{budget}-{}", if shared { "shared" } else { "whole" }));
        let t = std::time::Instant::now();
        run(Command::new(&hookrs)
            .args(["patch", "--model"])
            .arg(&model)
            .args(["--clean-ids", &clean_ids, "--corrupted-ids", &corrupted_ids, "--answer", " Mary", "--wrong", " John"])
            .args(["--component", component, "--positions", "all", "--max-batch-tokens", budget])
            .args(if shared { &[][..] } else { &["--no-shared-prefix"][..] })
            .arg("--out")
            .arg(&out)
            .env("OMP_NUM_THREADS", "2")
            .stdout(std::process::Stdio::null()))?;
        let secs = t.elapsed().as_secs_f64();
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.with_extension("json"))?)?;
        let sweep = j["sweep_seconds"].as_f64().context("the patch JSON has no sweep_seconds")?;
        let means: Vec<f64> = j["metric_means"].as_array().into_iter().flatten().flat_map(|r| r.as_array().cloned().unwrap_or_default()).filter_map(|v| v.as_f64()).collect();
        Ok((secs, sweep, means))
    };
    for (component, what, rows) in [("resid_out", "resid_out, layers x positions", "the positions"), ("heads", "heads (o_proj input, all positions), layers x heads", "the heads")] {
        eprintln!("bench patch: {what}: hookrs, cells batched, the prefix shared...");
        let (shared, shared_sweep, grid_b) = time_hookrs(component, "4096", true)?;
        eprintln!("bench patch: {what}: hookrs, cells batched, each through the whole model...");
        let (batched, batched_sweep, grid_w) = time_hookrs(component, "4096", false)?;
        eprintln!("bench patch: {what}: hookrs, one forward per cell...");
        let (single, single_sweep, grid_s) = time_hookrs(component, "1", false)?;
        eprintln!("bench patch: {what}: PyTorch on the eager model...");
        let mut py = Command::new(python);
        py.arg(root.join("xtask/python/bench_patch.py")).arg(&hf).args([&clean_ids, &corrupted_ids, &answer, &wrong]);
        if component == "heads" {
            py.arg("heads");
        }
        let py = py.output()?;
        if !py.status.success() {
            bail!("bench_patch.py failed:\n{}", String::from_utf8_lossy(&py.stderr));
        }
        let theirs = String::from_utf8(py.stdout)?;
        let (loop_s, by_layer_s) = (json_num(&theirs, "hook_loop_s")?, json_num(&theirs, "batched_by_layer_s")?);
        let range = grid_s.iter().cloned().fold(f64::MIN, f64::max) - grid_s.iter().cloned().fold(f64::MAX, f64::min);
        let diff = grid_b.iter().zip(&grid_s).chain(grid_w.iter().zip(&grid_s)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!("{what} ({} cells), SmolLM2-135M, CPU, 2 threads", json_num(&theirs, "cells")?);
        println!();
        println!("| run | s, the sweep | hook loop / this | s, end to end (hookrs: the whole command, loading the model and tokenizer and drawing the picture) | hook loop / end to end |");
        println!("|---|---|---|---|---|");
        println!("| PyTorch forward-hook loop (one forward per cell) | {loop_s:.1} | 1.00x | | |");
        println!("| PyTorch, {rows} of a layer batched by hand | {by_layer_s:.1} | {:.2}x | | |", loop_s / by_layer_s);
        for (name, sweep, total) in [
            ("`hookrs patch --max-batch-tokens 1 --no-shared-prefix` (one forward per cell)", single_sweep, single),
            ("`hookrs patch --no-shared-prefix` (cells batched, each through the whole model)", batched_sweep, batched),
            ("`hookrs patch` (the default: cells batched, each layer's batch forked from one corrupted run)", shared_sweep, shared),
        ] {
            println!("| {name} | {sweep:.1} | {:.2}x | {total:.1} | {:.2}x |", loop_s / sweep, loop_s / total);
        }
        println!();
        println!("batched and shared vs one forward per cell: max diff {diff:.2e} of a metric range {range:.3} ({:.1e} relative)", diff / range.max(f64::MIN_POSITIVE));
        // the same grid as PyTorch's (a one-token answer: the log-probability difference is the logit difference)
        let v: serde_json::Value = serde_json::from_str(theirs.trim())?;
        let torch_grid: Vec<f64> = v["grid"].as_array().into_iter().flatten().flat_map(|r| r.as_array().cloned().unwrap_or_default()).filter_map(|x| x.as_f64()).collect();
        if torch_grid.len() != grid_s.len() {
            bail!("hookrs' grid has {} cells, PyTorch's {}", grid_s.len(), torch_grid.len());
        }
        let vs_torch = torch_grid.iter().zip(&grid_s).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!("hookrs vs the PyTorch hook loop: max diff {vs_torch:.2e} ({:.1e} of the range)", vs_torch / range.max(f64::MIN_POSITIVE));
        println!();
    }
    Ok(())
}

/// `cargo xtask bench generate [--model bench|smollm2|both]`: generation with the KV cache,
/// `hookrs generate` against transformers' `generate` on the same model in one run (CPU, 2
/// threads; `xtask/python/bench_generate.py`): tokens/s at batch 1 and 8, the cost of a new
/// token after 16 and 1,024 prompt tokens, peak RSS against the model plus its KV cache, and a
/// steering vector against no hooks. Fails when the greedy tokens differ from transformers'.
pub fn generate(python: &Path, args: &[String]) -> Result<()> {
    let which = match args {
        [] => "both".to_string(),
        [flag, v] if flag == "--model" && ["bench", "smollm2", "both"].contains(&v.as_str()) => v.clone(),
        _ => bail!("usage: cargo xtask bench generate [--model bench|smollm2|both] (got {args:?})"),
    };
    let root = project_root();
    run(cargo().args(["build", "--quiet", "--release", "-p", "hookrs-cli"]))?;
    let hookrs = root.join("target/release/hookrs");
    let script = root.join("xtask/python/bench_generate.py");
    if which != "smollm2" {
        let dir = root.join("target/bench/generate");
        std::fs::create_dir_all(&dir)?;
        let config = root.join("xtask/python/configs/bench_llama.json");
        let model = dir.join("llama8.pt");
        let exporter = std::fs::metadata(root.join("xtask/python/export.py"))?.modified()?;
        if std::fs::metadata(&model).and_then(|m| m.modified()).map_or(true, |made| made < exporter) {
            eprintln!("bench generate: exporting the bench llama...");
            run(Command::new(python).arg(root.join("xtask/python/export.py")).args(["--random", "llama", "--seed", "0", "--config"]).arg(&config).arg("--out").arg(&model))?;
        }
        eprintln!("bench generate: the bench llama...");
        run(Command::new(python).arg(&script).arg(&hookrs).arg(&model).arg("bench llama").arg("--random-config").arg(&config))?;
    }
    if which != "bench" {
        let model = crate::fetch(python, &["smollm2".to_string()])?;
        let hf = model.parent().context("the export lies in a folder")?.join("hf");
        eprintln!("bench generate: SmolLM2-135M...");
        run(Command::new(python).arg(&script).arg(&hookrs).arg(&model).arg("SmolLM2-135M").arg("--hf").arg(&hf))?;
    }
    Ok(())
}
