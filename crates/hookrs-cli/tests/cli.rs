//! The `hookrs` binary, run as a user would: outputs, exit codes and every error message.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hookrs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookrs")).args(args).output().expect("run hookrs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A folder with the tiny llama and its tokenizer.
fn workdir() -> (tempfile::TempDir, PathBuf) {
    let model = common::model("llama");
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("llama.pt");
    std::fs::copy(&model, &m).unwrap();
    std::fs::copy(model.with_file_name("llama.tokenizer.json"), dir.path().join("llama.tokenizer.json")).unwrap();
    (dir, m)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn help_texts() {
    for cmd in [vec!["--help"], vec!["extract", "--help"], vec!["patch", "--help"], vec!["lens", "--help"], vec!["attribute", "--help"], vec!["generate", "--help"], vec!["view", "--help"], vec!["ablate", "--help"]] {
        let o = hookrs(&cmd);
        assert!(o.status.success());
        insta::assert_snapshot!(format!("help_{}", cmd[0].trim_start_matches('-')), stdout(&o));
    }
}

#[test]
fn extract_inspect_plot_and_merge() {
    let (dir, m) = workdir();
    let out = dir.path().join("c.safetensors");
    let o = hookrs(&["extract", "--model", s(&m), "--input-ids", "[[5,9,12,40],[3,4]]", "--extract", "resid_out,attn_pattern", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table: String = stdout(&o).lines().filter(|l| !l.contains("tokens/s")).collect::<Vec<_>>().join("\n");
    insta::assert_snapshot!("extract_summary", table);
    let o = hookrs(&["inspect", s(&out)]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("resid_out_1: Float [2, 1, 64]"), "{}", stdout(&o));
    // shards 0/2 and 1/2 of 3 one-prompt batches, merged, equal the unsharded run
    let ids = "[[5,9,12],[3,4,7],[8,8,1]]";
    let full = dir.path().join("full.safetensors");
    assert!(hookrs(&["extract", "--model", s(&m), "--input-ids", ids, "--extract", "resid_out", "--batch-size", "1", "--out", s(&full)]).status.success());
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    assert!(hookrs(&["extract", "--model", s(&m), "--input-ids", ids, "--extract", "resid_out", "--batch-size", "1", "--shard", "0/2", "--out", s(&a)]).status.success());
    assert!(hookrs(&["extract", "--model", s(&m), "--input-ids", ids, "--extract", "resid_out", "--batch-size", "1", "--shard", "1/2", "--out", s(&b)]).status.success());
    let merged = dir.path().join("m.safetensors");
    let o = hookrs(&["merge", s(&merged), s(&b), s(&a)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = hook_cache::ActivationCache::load(&full).unwrap();
    let g = hook_cache::ActivationCache::load(&merged).unwrap();
    assert!(f.tensor("resid_out_0").unwrap().equal(g.tensor("resid_out_0").unwrap()), "merged in dataset order");
    // a picture with token labels
    let p = dir.path().join("p.safetensors");
    assert!(hookrs(&["extract", "--model", s(&m), "--text", "the cat sat on the mat", "--extract", "attn_pattern", "--tokens", "all", "--out", s(&p)]).status.success());
    let png = dir.path().join("p.png");
    let o = hookrs(&["plot", s(&p), "--key", "pattern_L0H0", "--out", s(&png)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}

#[test]
fn patch_writes_json_and_png() {
    let (dir, m) = workdir();
    let out = dir.path().join("r");
    let o = hookrs(&[
        "patch", "--model", s(&m), "--clean", "mary gave a drink to john", "--corrupted", "john gave a drink to john", "--answer", "mary", "--wrong",
        "john", "--out", s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap()).unwrap();
    let v = j["values"].as_array().unwrap();
    assert_eq!(v.len(), 2);
    // patching the last layer's residual stream at the last position restores the clean run
    let last = v[1].as_array().unwrap().last().unwrap().as_f64().unwrap();
    assert!((last - 1.0).abs() < 1e-4, "{last}");
    assert!(out.with_extension("png").exists());
}

#[test]
fn patch_over_a_dataset_of_pairs_and_ablate_write_their_grids() {
    let (dir, m) = workdir();
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"clean\": \"mary gave a drink to john\", \"corrupted\": \"john gave a drink to john\", \"answer\": \"mary\", \"wrong\": \"john\"}\n\
         {\"clean\": [1, 5, 9, 12, 7, 8], \"corrupted\": [1, 6, 9, 12, 7, 8], \"answer\": [20, 30], \"wrong\": [21]}\n",
    )
    .unwrap();
    let out = dir.path().join("d");
    let o = hookrs(&["patch", "--model", s(&m), "--pairs", s(&pairs), "--component", "heads_by_position", "--positions", "0,-1", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("mean of 2 pairs"), "{}", stdout(&o));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(j["row_labels"].as_array().unwrap().len(), 2 * 4);
    assert_eq!(j["col_labels"], serde_json::json!(["p0", "p-1"]));
    assert_eq!(j["clean_each"].as_array().unwrap().len(), 2);
    // a bad line names its file and line; a pair of two lengths is refused
    std::fs::write(&pairs, "{\"clean\": [1, 2], \"corrupted\": [1, 3], \"answer\": [5], \"wrong\": [6]}\n{\"clean\": [1, 2]}\n").unwrap();
    let o = hookrs(&["patch", "--model", s(&m), "--pairs", s(&pairs), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pairs.jsonl:2: no \"corrupted\""), "{}", stderr(&o));
    let o = hookrs(&["patch", "--model", s(&m), "--clean-ids", "[1,2,3]", "--corrupted-ids", "[1,2]", "--answer", "mary", "--wrong", "john", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("needs prompts of one length"), "{}", stderr(&o));
    let o = hookrs(&["patch", "--model", s(&m), "--clean-ids", "[1,2", "--corrupted-ids", "[1,2]", "--answer", "mary", "--wrong", "john", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = hookrs(&["patch", "--model", s(&m), "--clean", "a b", "--corrupted", "a c", "--answer", "mary", "--wrong", "john", "--positions", "first", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // the batch budget: the same grid one row per forward; 0 is a usage error
    let (one, many) = (dir.path().join("one"), dir.path().join("many"));
    for (budget, o) in [("1", &one), ("4096", &many)] {
        let r = hookrs(&["patch", "--model", s(&m), "--clean", "mary gave a drink", "--corrupted", "john gave a drink", "--answer", "mary", "--wrong", "john", "--max-batch-tokens", budget, "--out", s(o)]);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let grid = |p: &std::path::Path| -> Vec<f64> {
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.with_extension("json")).unwrap()).unwrap();
        j["values"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect()
    };
    let (a, b) = (grid(&one), grid(&many));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{a:?} vs {b:?}");
    let o = hookrs(&["patch", "--model", s(&m), "--clean", "a b", "--corrupted", "a c", "--answer", "mary", "--wrong", "john", "--max-batch-tokens", "0", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("at least 1"), "{}", stderr(&o));

    // ablation: zero and mean, one prompt or a file
    let ab = dir.path().join("ab");
    let o = hookrs(&["ablate", "--model", s(&m), "--text", "mary gave a drink to john", "--answer", "mary", "--wrong", "john", "--component", "attn_out,mlp_out,layer,heads", "--out", s(&ab)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ab.with_extension("json")).unwrap()).unwrap();
    assert_eq!(j["col_labels"], serde_json::json!(["attn_out", "mlp_out", "layer", "H0", "H1", "H2", "H3"]));
    assert!(ab.with_extension("png").exists());
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"text\": \"mary gave a drink to john\", \"answer\": \"mary\", \"wrong\": \"john\"}\n{\"ids\": [1, 5, 9], \"answer\": [20], \"wrong\": [21]}\n").unwrap();
    let o = hookrs(&["ablate", "--model", s(&m), "--prompts", s(&prompts), "--mode", "mean", "--positions", "last", "--svg", "--out", s(&ab)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ab.with_extension("svg").exists());
    let o = hookrs(&["ablate", "--model", s(&m), "--text", "mary", "--out", s(&ab)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ablate needs --answer"), "{}", stderr(&o));
    let o = hookrs(&["ablate", "--model", s(&m), "--text", "mary", "--answer", "a", "--wrong", "b", "--component", "resid_out", "--out", s(&ab)]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn errors_say_what_is_wrong_and_exit_1_at_runtime_or_2_for_usage() {
    let (dir, m) = workdir();
    let out = dir.path().join("never.safetensors");
    let tok = dir.path().join("llama.tokenizer.json");
    // usage: a flag's value that does not parse, or flags that do not go together (exit 2)
    let usage: Vec<(Vec<&str>, &str)> = vec![
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2],[3,]]", "--out", s(&out)], "for '--input-ids <INPUT_IDS>': not a JSON list of lists of token ids: trailing comma at line 1 column 11"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[]", "--out", s(&out)], "--input-ids needs at least one example"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--extract", "resid", "--out", s(&out)], "unknown extraction `resid`; closest: resid_in, resid_mid, resid_out"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--token-groups", "[[0,", "--out", s(&out)], "invalid value '[[0,' for '--token-groups <TOKEN_GROUPS>'"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--shard", "2/2", "--out", s(&out)], "expected 0 <= K < N"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--shard", "a/2", "--out", s(&out)], "K is not a number"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--shard", "half", "--out", s(&out)], "expected K/N"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--chunk-size", "12 parsecs", "--out", s(&out)], "unknown unit"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--batch-size", "0", "--out", s(&out)], "--batch-size must be at least 1"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--device", "gpu", "--out", s(&out)], "expected cpu, cuda or cuda:N"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--text", "a", "--out", s(&out)], "give exactly one of --text, --prompts or --input-ids"),
        (vec!["extract", "--model", s(&m)], "--out"),
    ];
    // runtime: the values parse, but the model, the data or the files say no (exit 1)
    let runtime: Vec<(Vec<&str>, &str)> = vec![
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,999]]", "--out", s(&out)], "token id 999 is out of the vocabulary: valid ids are 0..256"),
        (vec!["extract", "--model", s(&m), "--input-ids", "[[1,2]]", "--token-groups", "[[0,5]]", "--out", s(&out)], "token position 5 (group 0) is out of range"),
        (vec!["extract", "--model", s(&m), "--prompts", "/nonexistent.jsonl", "--out", s(&out)], "no such file"),
        (vec!["plot", s(&out), "--key", "x", "--out", s(&out)], "never.safetensors: No such file"),
        (vec!["sites", s(&tok)], "as a TorchScript module"),
    ];
    for (code, cases) in [(2, usage), (1, runtime)] {
        for (args, want) in cases {
            let o = hookrs(&args);
            assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
            assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
            assert!(!out.exists(), "nothing written under --out on failure");
        }
    }
    // a model without a tokenizer asked for --text
    std::fs::remove_file(dir.path().join("llama.tokenizer.json")).unwrap();
    let o = hookrs(&["extract", "--model", s(&m), "--text", "hello", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--text needs a tokenizer") && stderr(&o).contains("use --input-ids") || stderr(&o).contains("pass token ids with --input-ids"), "{}", stderr(&o));
    let o = hookrs(&["patch", "--model", s(&m), "--clean", "a", "--corrupted", "b", "--answer", "a", "--wrong", "b", "--component", "neurons", "--out", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("[possible values: resid_out, attn_out, mlp_out, heads, heads_by_position]"), "{}", stderr(&o));
}

#[test]
fn the_hookrs_binary_loads_libtorchs_cuda_backend_when_needed_and_reports_devices() {
    let lib = Path::new(env!("HOOKRS_LIBTORCH_LIB"));
    let needed = hook_torch::backend::needed_libraries(Path::new(env!("CARGO_BIN_EXE_hookrs"))).expect("hookrs is an ELF file");
    let has_cuda = lib.join("libtorch_cuda.so").exists();
    // not linked: loaded at start on machines with a GPU driver, else when a CUDA device is named
    assert!(!needed.iter().any(|l| l.starts_with("libtorch_cuda")), "NEEDED: {needed:?}");
    let o = hookrs(&["devices", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let driver = hook_torch::backend::gpu_driver_present();
    assert_eq!(v["gpu_driver"], driver);
    assert_eq!(v["cuda_backend_loaded_at_start"], driver && has_cuda, "{v}");
    assert_eq!(v["cuda_backend"].is_string(), has_cuda, "{v}");
    assert!(v["cuda_backend_error"].is_null(), "{v}");
    if has_cuda {
        // loaded late, yet before libtorch's first CUDA query: its real CUDA hooks answer
        assert!(v["cuda_runtime"].as_i64().is_some_and(|r| r >= 11000), "{v}");
    }
    let mut forced = std::process::Command::new(env!("CARGO_BIN_EXE_hookrs"));
    let o = forced.args(["devices", "--json"]).env("HOOKRS_GPU_BACKEND", "on").output().unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["cuda_backend_loaded_at_start"], has_cuda, "{v}");
    assert_eq!(v["cuda_devices"].as_i64().unwrap(), hook_torch::backend::cuda_device_count());
    if v["cuda_devices"] == 0 {
        let (_dir, m) = workdir();
        let o = hookrs(&["extract", "--model", s(&m), "--input-ids", "[[5,9]]", "--device", "cuda", "--out", "/dev/null"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("cuda:0 is not available"), "{}", stderr(&o));
        if has_cuda {
            assert!(stderr(&o).contains("finds no device"), "{}", stderr(&o));
        }
    }
}

#[test]
fn sites_extract_and_head_patching_on_every_family() {
    for family in ["gpt2", "gpt_neox", "phi3", "qwen3", "gemma2", "olmo2"] {
        let model = common::model(family);
        let m = s(&model);
        let o = hookrs(&["sites", m]);
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        assert!(stdout(&o).contains("attention_matrix_hook"), "{family}: {}", stdout(&o));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.safetensors");
        let o = hookrs(&["extract", "--model", m, "--text", "the cat sat on the mat", "--extract", "resid_out,head_queries,head_out,attn_pattern", "--tokens", "all", "--out", s(&out)]);
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        let o = hookrs(&["inspect", s(&out)]);
        assert!(stdout(&o).contains("head_queries_L1H0: Float [1, 6, 16]"), "{family}: {}", stdout(&o));
        let layers = stdout(&o).lines().filter(|l| l.trim_start().starts_with("resid_out_")).count();
        let r = dir.path().join("r");
        let o = hookrs(&[
            "patch", "--model", m, "--clean", "mary gave a drink to john", "--corrupted", "john gave a drink to john", "--answer", "mary", "--wrong", "john",
            "--component", "heads", "--out", s(&r),
        ]);
        assert!(o.status.success(), "{family}: {}", stderr(&o));
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(r.with_extension("json")).unwrap()).unwrap();
        assert!(layers >= 2, "{family}: {layers} layers");
        assert_eq!(j["values"].as_array().unwrap().len(), layers, "{family}: one row per layer");
    }
    // NeoX has no resid_mid: an error that says why (exit 1, as an unknown extraction)
    let o = hookrs(&["extract", "--model", s(&common::model("gpt_neox")), "--text", "the cat", "--extract", "resid_mid", "--out", "/dev/null/x.safetensors"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("in parallel"), "{}", stderr(&o));
}

#[test]
fn half_precision_exports_extract_in_their_dtype_or_the_one_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gpt2-bf16.pt");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let st = Command::new(common::python())
        .arg(root.join("xtask/python/export.py"))
        .args(["--random", "gpt2", "--dtype", "bfloat16", "--out"])
        .arg(&model)
        .status()
        .unwrap();
    assert!(st.success());
    for (dtype, want) in [("model", "BFloat16"), ("float32", "Float"), ("float16", "Half")] {
        let out = dir.path().join(format!("{dtype}.safetensors"));
        let o = hookrs(&["extract", "--model", s(&model), "--text", "the cat sat", "--extract", "resid_out,last_layernorm", "--cache-dtype", dtype, "--out", s(&out)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = hookrs(&["inspect", s(&out)]);
        assert!(stdout(&o).contains(&format!("resid_out_1: {want} [1, 1, 64]")), "{dtype}: {}", stdout(&o));
    }
    // the model itself converted: --dtype float16 on the bfloat16 export
    let out = dir.path().join("as-f16.safetensors");
    let o = hookrs(&["extract", "--model", s(&model), "--text", "the cat sat", "--extract", "resid_out", "--dtype", "float16", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&hookrs(&["inspect", s(&out)])).contains("resid_out_1: Half [1, 1, 64]"));
    // a float32 export cannot run in half precision: a clear error naming the export flag
    let f32_model = dir.path().join("gpt2-f32.pt");
    let st = Command::new(common::python()).arg(root.join("xtask/python/export.py")).args(["--random", "gpt2", "--out"]).arg(&f32_model).status().unwrap();
    assert!(st.success());
    let o = hookrs(&["extract", "--model", s(&f32_model), "--text", "the cat", "--dtype", "bfloat16", "--out", s(&dir.path().join("y.safetensors"))]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("export it with `--dtype bfloat16`"), "{}", stderr(&o));
    let o = hookrs(&["extract", "--model", s(&model), "--text", "the cat", "--cache-dtype", "f32", "--out", s(&dir.path().join("x.safetensors"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("possible values: model, float32, bfloat16, float16"), "{}", stderr(&o));
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let (dir, m) = workdir();
    let out = dir.path().join("c.safetensors");
    assert!(hookrs(&["extract", "--model", s(&m), "--input-ids", "[[5,9,12,40]]", "--extract", "resid_out,attn_pattern", "--out", s(&out)]).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookrs"))
        .args(["inspect", s(&out)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before hookrs writes
    let o = child.wait_with_output().unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn the_logit_lens_of_a_prompt_ends_at_the_models_own_prediction() {
    let (dir, m) = workdir();
    let prefix = dir.path().join("lens");
    let o = hookrs(&["lens", "--model", s(&m), "--input-ids", "[5,9,12,40,7]", "--out", s(&prefix)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap()).unwrap();
    assert_eq!(v["row_labels"], serde_json::json!(["L0", "L1"]));
    assert!(prefix.with_extension("png").exists());
    // the model's logits at every position, through extract
    let logits_file = dir.path().join("logits.safetensors");
    let o = hookrs(&["extract", "--model", s(&m), "--input-ids", "[[5,9,12,40,7]]", "--tokens", "all", "--extract", "logits", "--out", s(&logits_file)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let logits = hook_cache::ActivationCache::load(&logits_file).unwrap().tensor("logits").unwrap().get(0);
    let (p, top) = logits.softmax(-1, tch::Kind::Float).max_dim(-1, false);
    let last = &v["values"][1];
    for t in 0..5 {
        assert!((last[t].as_f64().unwrap() - p.double_value(&[t as i64])).abs() < 1e-5, "position {t}");
        assert_eq!(v["top_token_ids"][1][t], serde_json::json!(top.int64_value(&[t as i64])), "position {t}");
        assert!(v["top_tokens"][1][t].as_str().is_some_and(|t| !t.is_empty()));
    }
    // --answer/--wrong: the logit difference, which at the last layer is the model's
    let o = hookrs(&["lens", "--model", s(&m), "--text", "the cat sat", "--answer", "cat", "--wrong", "sat", "--out", s(&prefix)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap()).unwrap();
    assert_eq!(v["metric"], "logit_diff");
    assert_eq!(v["col_labels"], serde_json::json!(["the", "cat", "sat"]));
    // usage errors
    let o = hookrs(&["lens", "--model", s(&m), "--input-ids", "[5,", "--out", s(&prefix)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = hookrs(&["lens", "--model", s(&m), "--input-ids", "[5]", "--answer", "cat", "--out", s(&prefix)]);
    assert_eq!(o.status.code(), Some(2));
    let o = hookrs(&["lens", "--model", s(&m), "--input-ids", "[5, 999]", "--out", s(&prefix)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("out of the vocabulary"), "{}", stderr(&o));
}

#[test]
fn attribution_parts_sum_to_the_models_logit_difference() {
    let (dir, m) = workdir();
    let prefix = dir.path().join("attr");
    for heads in [false, true] {
        let mut args = vec!["attribute", "--model", s(&m), "--text", "the cat sat on the", "--answer", "mat", "--wrong", "cat", "--out", s(&prefix)];
        if heads {
            args.push("--heads");
        }
        let o = hookrs(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("embed"), "{}", stdout(&o));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap()).unwrap();
        let (sum, model) = (v["sum"].as_f64().unwrap(), v["model_logit_diff"].as_f64().unwrap());
        assert!((sum - model).abs() < 1e-4 * model.abs().max(1.0), "heads {heads}: {sum} vs {model}");
        assert_eq!(v["values"].as_array().unwrap().len(), 2, "a row per layer");
        assert_eq!(v["col_labels"].as_array().unwrap().len(), if heads { 5 } else { 2 });
        assert!(prefix.with_extension("png").exists());
    }
    let o = hookrs(&["attribute", "--model", s(&m), "--text", "the cat", "--answer", "mat", "--wrong", "cat", "--position", "-9", "--out", s(&prefix)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("out of range"), "{}", stderr(&o));
}

#[test]
fn generate_greedy_sampled_and_steered() {
    let (dir, m) = workdir();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["generate", "--model", s(&m), "--input-ids", "[5,9,12,40,7]", "--max-new-tokens", "6", "--json"];
        args.extend_from_slice(extra);
        let o = hookrs(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    };
    let greedy = run(&[]);
    assert_eq!(greedy["prompt_ids"], serde_json::json!([5, 9, 12, 40, 7]));
    assert_eq!(greedy["new_ids"].as_array().unwrap().len(), 6);
    assert_eq!(run(&[]), greedy, "greedy is deterministic");
    let sampled = run(&["--temperature", "1.5", "--seed", "3"]);
    assert_eq!(run(&["--temperature", "1.5", "--seed", "3"]), sampled, "seeded");
    let steer = dir.path().join("steer.safetensors");
    tch::Tensor::write_safetensors(&[("v", &(tch::Tensor::ones([64], (tch::Kind::Float, tch::Device::Cpu)) * 30.0))], &steer).unwrap();
    let steered = run(&["--steer", s(&steer), "--layer", "0"]);
    assert_ne!(steered["new_ids"], greedy["new_ids"]);
    let o = hookrs(&["generate", "--model", s(&m), "--input-ids", "[5,9]", "--steer", s(&steer), "--layer", "7"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("layers 0..2"), "{}", stderr(&o));
    let o = hookrs(&["generate", "--model", s(&m), "--input-ids", "[5,9]", "--steer", s(&steer)]);
    assert_eq!(o.status.code(), Some(2), "--steer needs --layer");
    let o = hookrs(&["generate", "--model", s(&m), "--input-ids", "[5,999]"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("valid ids are 0..256"), "{}", stderr(&o));
}

#[test]
fn generate_a_file_of_prompts_in_batches_writes_one_line_per_prompt_in_order() {
    let (dir, m) = workdir();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"text\": [5, 9, 12, 40, 7]}\n{\"text\": \"the cat\"}\n{\"text\": [11, 4, 6]}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let o = hookrs(&["generate", "--model", s(&m), "--prompts", s(&prompts), "--out", s(&out), "--batch-size", "2", "--max-new-tokens", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("3 prompts, 15 new tokens"), "{}", stdout(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        // each row of a batch continues as the prompt does alone
        let ids = line["prompt_ids"].to_string();
        let alone = hookrs(&["generate", "--model", s(&m), "--input-ids", &ids, "--max-new-tokens", "5", "--json"]);
        let alone: serde_json::Value = serde_json::from_str(stdout(&alone).trim()).unwrap();
        assert_eq!(alone["new_ids"], line["new_ids"], "{ids}");
        assert!(line["new_text"].is_string(), "the tokenizer decodes the continuation");
    }
    assert_eq!(lines[0]["prompt_ids"], serde_json::json!([5, 9, 12, 40, 7]));
    let o = hookrs(&["generate", "--model", s(&m), "--input-ids", "[5,9]", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "--out without --prompts is a usage error");
    let o = hookrs(&["generate", "--model", s(&m), "--prompts", s(&prompts), "--out", s(&out), "--batch-size", "0"]);
    assert_eq!(o.status.code(), Some(2), "--batch-size 0");
}

#[test]
fn tokenize_gives_what_text_gives_every_other_command() {
    let (dir, m) = workdir();
    let tok = tokenizers::Tokenizer::from_file(m.with_file_name("llama.tokenizer.json")).unwrap();
    let texts = ["the cat sat on the mat", "mary went to the market"];
    let o = hookrs(&["tokenize", "--model", s(&m), "--text", texts[0], "--text", texts[1], "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (line, text) in lines.iter().zip(texts) {
        let want: Vec<u32> = tok.encode(text, true).unwrap().get_ids().to_vec();
        let got: Vec<u32> = serde_json::from_value(line["ids"].clone()).unwrap();
        assert_eq!(got, want, "{text}");
    }
    // the same ids reach the model: extract --text and --input-ids agree
    let ids = format!("[{}]", serde_json::to_string(&lines[0]["ids"]).unwrap());
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    assert!(hookrs(&["extract", "--model", s(&m), "--text", texts[0], "--extract", "resid_out", "--out", s(&a)]).status.success());
    assert!(hookrs(&["extract", "--model", s(&m), "--input-ids", &ids, "--extract", "resid_out", "--out", s(&b)]).status.success());
    let (a, b) = (hook_cache::ActivationCache::load(&a).unwrap(), hook_cache::ActivationCache::load(&b).unwrap());
    assert!(a.tensor("resid_out_1").unwrap().equal(b.tensor("resid_out_1").unwrap()));
    // a model without a tokenizer beside it: a clear error
    let lone = dir.path().join("lone.pt");
    std::fs::copy(&m, &lone).unwrap();
    let o = hookrs(&["tokenize", "--model", s(&lone), "--text", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tokenizer"), "{}", stderr(&o));
}
