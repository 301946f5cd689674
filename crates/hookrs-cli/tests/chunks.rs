//! `hookrs extract --out DIR`: chunk directories that survive being killed at any moment,
//! refuse to mix extractions, and never trust a chunk without its checksum.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn hookrs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookrs")).args(args).output().expect("run hookrs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tiny llama with its tokenizer and `n` prompts of mixed length, in a temp folder.
fn setup(n: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let model = common::model("llama");
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("llama.pt");
    std::fs::copy(&model, &m).unwrap();
    std::fs::copy(model.with_file_name("llama.tokenizer.json"), dir.path().join("llama.tokenizer.json")).unwrap();
    let words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red", "ball", "and", "then"];
    let mut x: u64 = 12345;
    let mut lines = Vec::new();
    for _ in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 2 + (x >> 33) as usize % 20;
        lines.push((0..len).map(|i| words[(x as usize >> (i % 16)) % words.len()]).collect::<Vec<_>>().join(" "));
    }
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    (dir, m, prompts)
}

fn extract_args<'a>(m: &'a Path, prompts: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec!["extract", "--model", s(m), "--prompts", s(prompts), "--extract", "resid_out,attn_pattern", "--batch-size", "4", "--chunk-size", "8", "--out", s(out)]
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())).collect();
    v.sort();
    v
}

#[test]
fn killed_at_any_moment_the_same_command_resumes_to_a_bitwise_identical_result() {
    let (dir, m, prompts) = setup(200);
    let reference = dir.path().join("reference");
    let o = hookrs(&extract_args(&m, &prompts, &reference));
    assert!(o.status.success(), "{}", stderr(&o));
    let want = files(&reference);
    assert_eq!(want.iter().filter(|(n, _)| n.starts_with("chunk-")).count(), 25);

    let out = dir.path().join("out");
    // faults injected inside a chunk write, between a chunk's rename and the manifest update,
    // and inside a manifest update: each run dies by abort, leaving what a SIGKILL leaves
    for fault in ["chunk-write:2", "chunk-renamed:5", "manifest-write:9"] {
        let o = Command::new(env!("CARGO_BIN_EXE_hookrs")).args(extract_args(&m, &prompts, &out)).env("HOOKRS_FAULT", fault).output().unwrap();
        assert!(!o.status.success(), "{fault}: the run should have died");
    }
    // SIGKILL at seeded random moments
    let mut x: u64 = 7;
    for _ in 0..3 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut child = Command::new(env!("CARGO_BIN_EXE_hookrs")).args(extract_args(&m, &prompts, &out)).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(150 + (x >> 33) % 400));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    let o = hookrs(&extract_args(&m, &prompts, &out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(&out), want, "the resumed directory differs from the uninterrupted one");
    // a complete directory is left alone
    let o = hookrs(&extract_args(&m, &prompts, &out));
    assert!(String::from_utf8_lossy(&o.stdout).contains("already complete"));
    // and reads back as one cache equal to a single-file extraction (which batches in file
    // order: other padding, so equal up to float rounding)
    let single = dir.path().join("single.safetensors");
    let mut args = extract_args(&m, &prompts, &single);
    args.truncate(args.len() - 4);
    args.extend(["--out", s(&single)]);
    assert!(hookrs(&args).status.success());
    let a = hook_cache::ActivationCache::load(&out).unwrap();
    let b = hook_cache::ActivationCache::load(&single).unwrap();
    for (k, v) in b.iter() {
        if let Some(t) = v.tensor() {
            assert!(t.allclose(a.tensor(k).unwrap(), 1e-5, 1e-6, false), "{k}");
        }
    }
    let merged = dir.path().join("merged.safetensors");
    let o = hookrs(&["merge", s(&merged), s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hook_cache::ActivationCache::load(&merged).unwrap().tensor("resid_out_1").unwrap().equal(a.tensor("resid_out_1").unwrap()));
    // Python opens the directory lazily and gets the tensors of the merged file
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../xtask/python");
    let script = "import sys, torch; sys.path.insert(0, sys.argv[1]); from load_cache import load_cache\n\
c = load_cache(sys.argv[2]); s = load_cache(sys.argv[3])\n\
assert c.examples == 200 and 'resid_out_1' in c\n\
assert all(torch.equal(c[k], s[k]) for k in s if isinstance(s[k], torch.Tensor)), 'python differs'\n";
    let o = Command::new(common::python()).args(["-c", script]).arg(&root).arg(&out).arg(&merged).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn another_model_config_or_input_is_refused_and_overwrite_starts_over() {
    let (dir, m, prompts) = setup(20);
    let out = dir.path().join("out");
    assert!(hookrs(&extract_args(&m, &prompts, &out)).status.success());
    let mut other = extract_args(&m, &prompts, &out);
    other[6] = "resid_in";
    let o = hookrs(&other);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("extract_resid_in: none there, true now"), "{}", stderr(&o));
    let prompts2 = dir.path().join("other.txt");
    std::fs::write(&prompts2, "the cat\nthe dog\n").unwrap();
    let o = hookrs(&extract_args(&m, &prompts2, &out));
    assert!(stderr(&o).contains("another input"), "{}", stderr(&o));
    other.push("--overwrite");
    let o = hookrs(&other);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hook_cache::ActivationCache::load(&out).unwrap().get("resid_in_0").is_some());
}

#[test]
fn corrupted_truncated_or_edited_chunks_are_never_trusted() {
    let (dir, m, prompts) = setup(20);
    let out = dir.path().join("out");
    assert!(hookrs(&extract_args(&m, &prompts, &out)).status.success());
    let chunk = out.join("chunk-000001.safetensors");
    let good = std::fs::read(&chunk).unwrap();
    let mut bad = good.clone();
    let i = bad.len() - 10;
    bad[i] ^= 0xff;
    std::fs::write(&chunk, &bad).unwrap();
    let o = hookrs(&["inspect", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("chunk-000001.safetensors does not match its SHA-256"), "{}", stderr(&o));
    // resuming over it is refused too
    let o = hookrs(&extract_args(&m, &prompts, &out));
    assert!(stderr(&o).contains("SHA-256"), "{}", stderr(&o));
    std::fs::write(&chunk, &good[..good.len() / 2]).unwrap();
    let o = hookrs(&["inspect", s(&out)]);
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    std::fs::write(&chunk, &good).unwrap();
    let manifest = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("\"first_example\": 8", "\"first_example\": 9", 1)).unwrap();
    let o = hookrs(&["inspect", s(&out)]);
    assert!(stderr(&o).contains("chunk 1 covers examples 9..17, expected a non-empty range starting at 8"), "{}", stderr(&o));
    std::fs::write(&manifest, "{not json").unwrap();
    let o = hookrs(&["inspect", s(&out)]);
    assert!(stderr(&o).contains("not valid JSON"), "{}", stderr(&o));
    // a directory with other files and no manifest is not touched
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let o = hookrs(&extract_args(&m, &prompts, &foreign));
    assert!(stderr(&o).contains("is not empty and has no manifest.json"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(foreign.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn bad_prompt_lines_name_file_and_line_and_can_be_skipped() {
    let (dir, m, _) = setup(1);
    let p = dir.path().join("p.jsonl");
    std::fs::write(&p, "{\"text\": \"the cat\"}\n{\"text\": 5}\n{\"ids\": [3, 4]}\n{\"text\": \"a dog\"}\n").unwrap();
    let out = dir.path().join("out");
    let o = hookrs(&["extract", "--model", s(&m), "--prompts", s(&p), "--extract", "resid_out", "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&format!("{}:2:", p.display())), "{}", stderr(&o));
    let o = hookrs(&["extract", "--model", s(&m), "--prompts", s(&p), "--extract", "resid_out", "--on-bad-line", "skip", "--overwrite", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(hook_cache::ActivationCache::load(&out).unwrap().tensor("resid_out_0").unwrap().size()[0], 2);
    // pre-tokenized: a column of id lists
    let p = dir.path().join("ids.jsonl");
    std::fs::write(&p, "{\"ids\": [3, 4, 5]}\n{\"ids\": [7]}\n").unwrap();
    let out = dir.path().join("ids");
    let o = hookrs(&["extract", "--model", s(&m), "--prompts", s(&p), "--column", "ids", "--extract", "resid_out", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn length_buckets_and_token_budgets_keep_dataset_order_and_values() {
    let (dir, m, prompts) = setup(60);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["extract", "--model", s(&m), "--prompts", s(&prompts), "--extract", "resid_out,attn_pattern", "--chunk-size", "25", "--out", s(&out)];
        args.extend_from_slice(extra);
        let o = hookrs(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let line = String::from_utf8_lossy(&o.stdout).into_owned();
        let padding: f64 = line.split("padding ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        (hook_cache::ActivationCache::load(&out).unwrap(), padding)
    };
    let (file_order, pad_unsorted) = run("unsorted", &["--no-sort", "--batch-size", "8"]);
    let (sorted, pad_sorted) = run("sorted", &["--batch-size", "8"]);
    let (budget, _) = run("budget", &["--max-batch-tokens", "64"]);
    assert!(pad_sorted < pad_unsorted, "buckets should pad less: {pad_sorted} vs {pad_unsorted}");
    for c in [&sorted, &budget] {
        for (k, v) in file_order.iter() {
            if let Some(t) = v.tensor() {
                let u = c.tensor(k).unwrap();
                assert_eq!(t.size(), u.size(), "{k}");
                assert!(t.allclose(u, 1e-5, 1e-5, false), "{k}: bucketed rows are not in dataset order");
            }
        }
    }
}

#[test]
fn four_shard_processes_in_parallel_merge_to_the_one_process_result() {
    let (dir, m, prompts) = setup(50);
    let whole = dir.path().join("whole");
    let o = hookrs(&extract_args(&m, &prompts, &whole));
    assert!(o.status.success(), "{}", stderr(&o));
    // shards 0..3 as a Slurm array would start them (task ids 1..4, min 1), all at once
    let children: Vec<_> = (0..4)
        .map(|k| {
            let out = dir.path().join(format!("shard{k}"));
            let mut args: Vec<String> = extract_args(&m, &prompts, &out).into_iter().map(String::from).collect();
            args.extend(["--shard".into(), "auto".into()]);
            let child = Command::new(env!("CARGO_BIN_EXE_hookrs"))
                .args(&args)
                .env("SLURM_ARRAY_TASK_ID", (k + 1).to_string())
                .env("SLURM_ARRAY_TASK_MIN", "1")
                .env("SLURM_ARRAY_TASK_COUNT", "4")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (out, child)
        })
        .collect();
    let mut outs = Vec::new();
    for (out, child) in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(out);
    }
    let merged = dir.path().join("merged.safetensors");
    // given in any order, merged in dataset order
    let o = hookrs(&["merge", s(&merged), s(&outs[2]), s(&outs[0]), s(&outs[3]), s(&outs[1])]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = hook_cache::ActivationCache::load(&merged).unwrap();
    let b = hook_cache::ActivationCache::load(&whole).unwrap();
    for (k, v) in b.iter() {
        if let Some(t) = v.tensor() {
            let u = a.tensor(k).unwrap();
            assert_eq!(t.size(), u.size(), "{k}");
            // other shard boundaries make other batches (other padding): equal up to rounding
            assert!(t.allclose(u, 1e-5, 1e-6, false), "{k}");
        }
    }
    // into a chunk directory (OUT/), chunk by chunk: the same values as the one-file merge
    let merged_dir = format!("{}/", dir.path().join("merged_dir").display());
    let o = hookrs(&["merge", &merged_dir, s(&outs[3]), s(&outs[1]), s(&outs[0]), s(&outs[2])]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_dir = hook_cache::ChunkDir::open(&merged_dir).unwrap();
    assert!(from_dir.manifest().complete);
    assert_eq!(from_dir.manifest().examples(), 50);
    let from_dir = from_dir.load_all().unwrap();
    for (k, v) in a.iter() {
        if let Some(t) = v.tensor() {
            assert!(t.equal(from_dir.tensor(k).unwrap()), "{k}");
        }
    }
    // run again: it is complete, nothing is rewritten; shard files cannot go into a directory
    let o = hookrs(&["merge", &merged_dir, s(&outs[3]), s(&outs[1]), s(&outs[0]), s(&outs[2])]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hookrs(&["merge", &merged_dir, s(&merged)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("name a file such as merged.safetensors"), "{}", stderr(&o));
    // a missing shard is refused
    let o = hookrs(&["merge", s(&dir.path().join("m2.safetensors")), s(&outs[0]), s(&outs[1]), s(&outs[3])]);
    assert!(stderr(&o).contains("missing [2]"), "{}", stderr(&o));
    // a Kubernetes Indexed Job needs the count
    let out = dir.path().join("k8s");
    let mut args = extract_args(&m, &prompts, &out);
    args.extend(["--shard", "auto"]);
    let o = Command::new(env!("CARGO_BIN_EXE_hookrs")).args(&args).env("JOB_COMPLETION_INDEX", "1").output().unwrap();
    assert!(stderr(&o).contains("needs --shard-count N"), "{}", stderr(&o));
    args.extend(["--shard-count", "4"]);
    let o = Command::new(env!("CARGO_BIN_EXE_hookrs")).args(&args).env("JOB_COMPLETION_INDEX", "1").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(&out).iter().filter(|(n, _)| n.starts_with("chunk-")).count(), files(&outs[1]).iter().filter(|(n, _)| n.starts_with("chunk-")).count());
    let o = hookrs(&["extract", "--model", s(&m), "--prompts", s(&prompts), "--shard", "auto", "--out", s(&dir.path().join("x"))]);
    assert!(stderr(&o).contains("neither SLURM_ARRAY_TASK_ID"), "{}", stderr(&o));
}

#[test]
fn a_full_disk_or_an_impossible_directory_is_a_clear_error_and_loses_nothing() {
    let (dir, m, prompts) = setup(30);
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_hookrs")).args(extract_args(&m, &prompts, &out)).env("HOOKRS_FAULT", "chunk-enospc:2").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no space left on the device while writing chunk-000002.safetensors"), "{}", stderr(&o));
    // the two complete chunks are intact and named; no temporary file is left
    let names: Vec<String> = files(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["chunk-000000.safetensors", "chunk-000001.safetensors", "manifest.json"]);
    let d = hook_cache::ChunkDir::open(&out).unwrap();
    assert_eq!(d.manifest().chunks.len(), 2);
    d.verify(0).unwrap();
    d.verify(1).unwrap();
    // freeing space and rerunning resumes
    let o = hookrs(&extract_args(&m, &prompts, &out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("(14 this run)"), "{}", String::from_utf8_lossy(&o.stdout));
    // --out under a file, and a single-file --out naming a directory
    let o = hookrs(&extract_args(&m, &prompts, &prompts.join("sub")));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Not a directory") || stderr(&o).contains("not a directory"), "{}", stderr(&o));
    let as_dir = dir.path().join("d.safetensors");
    std::fs::create_dir(&as_dir).unwrap();
    std::fs::write(as_dir.join("mine"), "x").unwrap();
    let o = hookrs(&extract_args(&m, &prompts, &as_dir));
    assert_eq!(o.status.code(), Some(1));
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("partial")));
}

#[test]
fn special_tokens_are_added_as_transformers_does_unless_asked_not_to() {
    let (dir, m, _) = setup(1);
    // give the word-level tokenizer a BOS post-processor, as Llama's tokenizer.json has
    let tok_path = dir.path().join("llama.tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[BOS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[BOS]": {"id": "[BOS]", "ids": [1], "tokens": ["[BOS]"]}}
    });
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let first_tokens = |extra: &[&str]| {
        let out = dir.path().join(format!("c{}.safetensors", extra.len()));
        let mut args = vec!["extract", "--model", s(&m), "--text", "the cat", "--extract", "resid_out", "--out", s(&out)];
        args.extend_from_slice(extra);
        let o = hookrs(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let c = hook_cache::ActivationCache::load(&out).unwrap();
        let hook_cache::CacheValue::Data(d) = c.get("hookrs_batches").unwrap().inner().clone() else { panic!() };
        d["string_tokens"][0].clone()
    };
    assert_eq!(first_tokens(&[]), serde_json::json!(["[BOS]", "the", "cat"]));
    assert_eq!(first_tokens(&["--no-special-tokens"]), serde_json::json!(["the", "cat"]));
}

/// A Parquet file with a `text` column (snappy, two row groups), as HF `datasets` writes.
fn write_parquet(path: &Path, texts: &[&str]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(parquet::schema::parser::parse_message_type("message schema { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED INT64 n; }").unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for group in texts.chunks(texts.len().div_ceil(2)) {
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let vals: Vec<ByteArray> = group.iter().map(|t| ByteArray::from(*t)).collect();
        col.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let ns: Vec<i64> = (0..group.len() as i64).collect();
        col.typed::<parquet::data_type::Int64Type>().write_batch(&ns, None, None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

#[test]
fn parquet_prompts_read_like_text_prompts() {
    let (dir, m, _) = setup(1);
    let texts = ["the cat sat", "a big red ball and then", "the dog ran", "on the mat"];
    let pq = dir.path().join("train.parquet");
    write_parquet(&pq, &texts);
    let txt = dir.path().join("train.txt");
    std::fs::write(&txt, texts.join("\n")).unwrap();
    let load = |prompts: &Path, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["extract", "--model", s(&m), "--prompts", s(prompts), "--extract", "resid_out", "--out", s(&out)];
        args.extend_from_slice(extra);
        let o = hookrs(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        hook_cache::ActivationCache::load(&out).unwrap()
    };
    let a = load(&pq, "pq", &[]);
    let b = load(&txt, "txt", &[]);
    assert!(a.tensor("resid_out_1").unwrap().equal(b.tensor("resid_out_1").unwrap()));
    // sharded: the row count comes from the Parquet footer
    let s0 = load(&pq, "pq0", &["--shard", "0/2"]);
    assert_eq!(s0.tensor("resid_out_1").unwrap().size()[0], 2);
    // a column that is not there, or not text
    let o = hookrs(&["extract", "--model", s(&m), "--prompts", s(&pq), "--column", "prompt", "--out", s(&dir.path().join("x"))]);
    assert!(stderr(&o).contains("no column \"prompt\" (it has text, n)"), "{}", stderr(&o));
    let o = hookrs(&["extract", "--model", s(&m), "--prompts", s(&pq), "--column", "n", "--out", s(&dir.path().join("y"))]);
    assert!(stderr(&o).contains("row 1: column \"n\" holds"), "{}", stderr(&o));
}

#[test]
fn every_token_of_prompts_of_mixed_length_is_stored_padded_with_their_lengths() {
    let (dir, m, prompts) = setup(12);
    let lines: Vec<String> = std::fs::read_to_string(&prompts).unwrap().lines().map(String::from).collect();
    let extract = ["--extract", "resid_out,attn_pattern,last_layernorm", "--tokens", "all", "--batch-size", "4"];
    // a chunk directory (chunks of 5 examples: their widths differ), its merge, and one file
    let chunked = dir.path().join("chunked");
    let mut args = vec!["extract", "--model", s(&m), "--prompts", s(&prompts), "--chunk-size", "5", "--out", s(&chunked)];
    args.extend_from_slice(&extract);
    let o = hookrs(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let single = dir.path().join("single.safetensors");
    let mut args = vec!["extract", "--model", s(&m), "--prompts", s(&prompts), "--out", s(&single)];
    args.extend_from_slice(&extract);
    let o = hookrs(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = dir.path().join("merged.safetensors");
    assert!(hookrs(&["merge", s(&merged), s(&chunked)]).status.success());
    let from_dir = hook_cache::ChunkDir::open(&chunked).unwrap().load_all().unwrap();
    let from_single = hook_cache::ActivationCache::load(&single).unwrap();
    let from_merge = hook_cache::ActivationCache::load(&merged).unwrap();
    let lengths = Vec::<i64>::try_from(from_single.tensor("token_lengths").unwrap()).unwrap();
    assert_eq!(lengths.len(), lines.len());
    assert!(lengths.iter().any(|&l| l != lengths[0]), "the prompts have mixed lengths: {lengths:?}");
    let width = *lengths.iter().max().unwrap();
    for c in [&from_dir, &from_single, &from_merge] {
        assert_eq!(Vec::<i64>::try_from(c.tensor("token_lengths").unwrap()).unwrap(), lengths);
        assert_eq!(c.tensor("resid_out_1").unwrap().size(), vec![lines.len() as i64, width, 64]);
        assert_eq!(c.tensor("pattern_L0H0").unwrap().size(), vec![lines.len() as i64, width, width]);
    }
    // each example: its own tokens equal the prompt run alone; the padding is zeros
    for (i, line) in lines.iter().enumerate().step_by(3) {
        let alone = dir.path().join(format!("alone{i}.safetensors"));
        let mut args = vec!["extract", "--model", s(&m), "--text", line.as_str(), "--out", s(&alone)];
        args.extend_from_slice(&extract);
        assert!(hookrs(&args).status.success());
        let alone = hook_cache::ActivationCache::load(&alone).unwrap();
        let n = lengths[i];
        for c in [&from_dir, &from_single, &from_merge] {
            for (key, cut) in [("resid_out_1", vec![n]), ("pattern_L0H0", vec![n, n])] {
                let mut got = c.tensor(key).unwrap().get(i as i64);
                for (ax, &k) in cut.iter().enumerate() {
                    got = got.narrow(ax as i64, 0, k);
                }
                let want = alone.tensor(key).unwrap().get(0);
                assert!(got.allclose(&want, 1e-5, 1e-5, false), "example {i} {key}");
            }
            let row = c.tensor("resid_out_1").unwrap().get(i as i64);
            assert_eq!(row.narrow(0, n, width - n).abs().sum(tch::Kind::Float).double_value(&[]), 0.0, "example {i}: padding is zeros");
        }
    }
    // Python reads the chunk directory lazily and joins chunks of different widths the same way
    let script = format!(
        "import sys; sys.path.insert(0, {py:?}); from load_cache import load_cache\n\
         c = load_cache({dir:?}); r = c['resid_out_1']; ln = c['last_layernorm']['mean']\n\
         print(tuple(r.shape), tuple(ln.shape), c['token_lengths'].tolist())",
        py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../xtask/python").to_string_lossy(),
        dir = chunked.to_string_lossy()
    );
    let o = Command::new(common::python()).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("({}, {width}, 64) ({}, {width}) {:?}", lines.len(), lines.len(), lengths);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.replace(", ", ", ").trim());
}
