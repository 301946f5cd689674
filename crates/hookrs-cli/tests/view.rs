//! `hookrs view`: the HTML attention viewer, rendered in headless Chromium (Debian's
//! `chromium`, installed by `cargo xtask setup`) and checked against the cache's numbers.

#[path = "../../hook-torch/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hook_cache::{ActivationCache, CacheValue};

fn hookrs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookrs")).args(args).output().expect("run hookrs")
}

fn chromium() -> PathBuf {
    let candidates = [std::env::var("HOOKRS_CHROMIUM").unwrap_or_default(), "/usr/bin/chromium".into(), "/usr/bin/chromium-browser".into()];
    candidates
        .iter()
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("no Chromium: `cargo xtask setup` installs Debian's chromium (or set HOOKRS_CHROMIUM)")
}

/// Chromium, headless, with a fresh profile and without its background connections.
fn headless(profile: &Path, args: &[&str]) -> Output {
    let o = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium");
    assert!(o.status.success(), "chromium failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn cache_with_patterns(dir: &Path) -> PathBuf {
    let model = common::model("llama");
    let m = dir.join("llama.pt");
    std::fs::copy(&model, &m).unwrap();
    std::fs::copy(model.with_file_name("llama.tokenizer.json"), dir.join("llama.tokenizer.json")).unwrap();
    let out = dir.join("p.safetensors");
    let o = hookrs(&["extract", "--model", m.to_str().unwrap(), "--text", "the cat sat on the mat", "--extract", "attn_pattern", "--tokens", "all", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn string_tokens(c: &ActivationCache) -> Vec<String> {
    let CacheValue::Data(d) = c.get("hookrs_batches").unwrap().inner() else { panic!("no hookrs_batches") };
    d["string_tokens"][0].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

/// Text as Chromium's DOM serialiser writes it in a text node.
fn html_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\u{a0}', "&nbsp;")
}

#[test]
fn the_page_renders_every_head_and_the_hovered_weight_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_patterns(dir.path());
    let page = dir.path().join("view.html");
    let o = hookrs(&["view", cache.to_str().unwrap(), "--out", page.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    // self-contained: nothing is fetched
    for needle in ["src=\"http", "href=\"http", "src='http", "@import", "<link"] {
        assert!(!html.contains(needle), "the page refers to something outside itself: {needle}");
    }

    let c = ActivationCache::load(&cache).unwrap();
    let toks = string_tokens(&c);
    let n = toks.len();
    let heads = c.keys().filter(|k| k.starts_with("pattern_L1H")).count();
    assert!(n >= 4 && heads >= 2, "{n} tokens, {heads} heads");
    let (q, k) = (n - 1, 1);
    let v = c.tensor("pattern_L1H1").unwrap().double_value(&[0, q as i64, k as i64]);

    // layer 1, head 1 selected and the cell (q, k) hovered, through the page's address
    let url = format!("file://{}#layer=1&head=1&query={q}&key={k}", page.display());
    let dom = String::from_utf8(headless(&dir.path().join("profile"), &["--dump-dom", &url]).stdout).unwrap();
    assert_eq!(dom.matches("class=\"thumb").count(), heads, "one thumbnail per head of layer 1");
    assert_eq!(dom.matches("class=\"thumb selected\" data-head=\"1\"").count(), 1);
    assert_eq!(dom.matches("<td class=\"cell").count(), n * n, "an n x n grid");
    assert_eq!(dom.matches("class=\"cell hover\"").count(), 1);
    assert_eq!(dom.matches("<span class=\"tok").count(), n);
    let info = format!(
        "L1H1 | query {} [{q}] -&gt; key {} [{k}]: {v:.4}",
        html_text(&serde_json::to_string(&toks[q]).unwrap()),
        html_text(&serde_json::to_string(&toks[k]).unwrap())
    );
    assert!(dom.contains(&info), "the hover text `{info}` is not in the page:\n{}", &dom[dom.find("id=\"info\"").unwrap_or(0)..][..300.min(dom.len())]);
    // the tokens are coloured by the hovered query's attention: every key position has a colour
    let row_weights = dom.matches("title=\"attention from ").count();
    assert_eq!(row_weights, n);

    // and it draws: a screenshot of the page is a real picture
    let shot = dir.path().join("view.png");
    headless(&dir.path().join("profile2"), &[&format!("--screenshot={}", shot.display()), "--window-size=1000,700", &url]);
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(png.len() > 10_000, "the screenshot is nearly empty ({} bytes)", png.len());
}

#[test]
fn a_cache_without_patterns_or_a_wrong_example_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_patterns(dir.path());
    let page = dir.path().join("v.html");
    let o = hookrs(&["view", cache.to_str().unwrap(), "--example", "3", "--out", page.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--example 3"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = hookrs(&["view", cache.to_str().unwrap(), "--layers", "7", "--out", page.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only for layers [0, 1]"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!page.exists(), "nothing is written on failure");

    let m = dir.path().join("llama.pt");
    let resid = dir.path().join("r.safetensors");
    assert!(hookrs(&["extract", "--model", m.to_str().unwrap(), "--input-ids", "[[5,9,12]]", "--extract", "resid_out", "--out", resid.to_str().unwrap()]).status.success());
    let o = hookrs(&["view", resid.to_str().unwrap(), "--out", page.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds no attention patterns"), "{}", String::from_utf8_lossy(&o.stderr));
}
