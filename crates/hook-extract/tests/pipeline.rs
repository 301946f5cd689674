//! The pipeline as a library: one job, two sinks, the same numbers; options from JSON as
//! Python gives them; progress told to the caller's own listener.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use hook_extract::{ExtractOptions, Progress};

fn options(model: &std::path::Path, out: &std::path::Path, extra: serde_json::Value) -> ExtractOptions {
    let mut v = serde_json::json!({"model": model, "out": out, "extract": ["resid_out", "attn_pattern"], "tokens": "all"});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    ExtractOptions::from_json(&v.to_string()).unwrap()
}

/// 13 prompts of mixed length.
fn ids() -> Vec<Vec<i64>> {
    (0..13).map(|i| (0..(2 + (i * 7) % 9)).map(|t| ((i * 31 + t * 17) % 250) as i64 + 1).collect()).collect()
}

#[test]
fn a_file_and_a_chunk_directory_hold_the_same_rows_with_every_batching_option() {
    let model = common::model("llama");
    let dir = tempfile::tempdir().unwrap();
    let given = serde_json::json!(ids());
    let file = dir.path().join("one.safetensors");
    let chunks = dir.path().join("chunks");
    // the token budget and the file order apply to a single file as well as to a directory
    let batching = serde_json::json!({"input_ids": given, "max_batch_tokens": 24, "no_sort": false});
    let mut seen = Vec::new();
    let mut listen = |done: u64, total: Option<u64>| seen.push((done, total));
    let a = hook_extract::run(options(&model, &file, batching.clone()).validate(|_| None).unwrap(), &mut listen).unwrap();
    assert_eq!((a.examples, a.chunks), (13, None));
    assert_eq!(seen.last(), Some(&(13, Some(13))));
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "progress only grows: {seen:?}");
    let mut extra = batching.clone();
    extra["chunk_size"] = serde_json::json!(5);
    let b = hook_extract::run(options(&model, &chunks, extra).validate(|_| None).unwrap(), &mut hook_extract::Silent).unwrap();
    assert_eq!((b.examples, b.chunks), (13, Some(3)));
    let one = hook_cache::ActivationCache::load(&file).unwrap();
    let dir_cache = hook_cache::ChunkDir::open(&chunks).unwrap().load_all().unwrap();
    for key in ["resid_out_0", "resid_out_1", "pattern_L1H0", "token_lengths"] {
        let (x, y) = (one.tensor(key).unwrap().to_kind(tch::Kind::Double), dir_cache.tensor(key).unwrap().to_kind(tch::Kind::Double));
        assert_eq!(x.size(), y.size(), "{key}");
        let scale = x.abs().max().double_value(&[]).max(1.0);
        let diff = (&x - &y).abs().max().double_value(&[]);
        assert!(diff <= 1e-6 * scale, "{key}: {diff} of {scale}");
    }
    // rows are in dataset order: each example's length is where the input put it
    let lengths: Vec<i64> = Vec::try_from(one.tensor("token_lengths").unwrap().to_kind(tch::Kind::Int64)).unwrap();
    assert_eq!(lengths, ids().iter().map(|x| x.len() as i64).collect::<Vec<_>>());
}

#[test]
fn options_from_json_refuse_unknown_names_and_bad_values_before_anything_runs() {
    let e = ExtractOptions::from_json(r#"{"model": "m.pt", "out": "x.safetensors", "chunksize": 3}"#).unwrap_err();
    assert!(e.is_invalid() && e.to_string().contains("did you mean \"chunk_size\""), "{e}");
    let e = ExtractOptions::from_json(r#"{"model": "m.pt", "out": "x.safetensors", "dtype": "float64"}"#).unwrap_err();
    assert!(e.is_invalid() && e.to_string().contains("float64") && e.to_string().contains("bfloat16"), "{e}");
    let o = ExtractOptions::from_json(r#"{"model": "m.pt", "out": "x.safetensors", "input_ids": [[1]], "batch_size": 0}"#).unwrap();
    assert!(o.validate(|_| None).err().unwrap().to_string().contains("--batch-size must be at least 1"));
    let o = ExtractOptions::from_json(r#"{"model": "m.pt", "out": "x.safetensors", "input_ids": [[1]], "token_groups": [[0]], "tokens": "all"}"#).unwrap();
    assert!(o.validate(|_| None).err().unwrap().is_invalid());
}

/// A listener that counts starts and chunks as well.
#[derive(Default)]
struct Counting {
    started: Vec<(u64, Option<u64>)>,
    chunks: Vec<usize>,
    last: u64,
}

impl Progress for Counting {
    fn start(&mut self, resumed: u64, total: Option<u64>) {
        self.started.push((resumed, total));
    }
    fn advance(&mut self, done: u64, _: Option<u64>) {
        self.last = done;
    }
    fn chunk_written(&mut self, chunks: usize) {
        self.chunks.push(chunks);
    }
}

#[test]
fn a_shard_reports_its_own_total_and_each_chunk_written() {
    let model = common::model("llama");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shard1");
    let o = options(&model, &out, serde_json::json!({"input_ids": ids(), "shard": "1/2", "chunk_size": 2}));
    let mut p = Counting::default();
    let r = hook_extract::run(o.validate(|_| None).unwrap(), &mut p).unwrap();
    // 13 examples in 2 shards: the second holds 6..13
    assert_eq!(p.started, vec![(0, Some(7))]);
    assert_eq!((r.examples, p.last), (7, 7));
    assert_eq!(p.chunks, vec![1, 2, 3]);
    assert_eq!(r.chunks, Some(4));
}
