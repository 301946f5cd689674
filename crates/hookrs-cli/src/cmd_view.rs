//! `hookrs view`: the attention patterns of one example as one self-contained HTML file
//! (data, script and style inline; no network), in the manner of CircuitsVis's
//! `attention_heads`: a thumbnail per head of the chosen layer, the chosen head's pattern as a
//! grid with the tokens along both sides, and the prompt's tokens coloured by how much the
//! hovered query attends to each.
//!
//! The page's state can be set from its address (`view.html#layer=1&head=0&query=3&key=1`),
//! which selects as a click and a hover would: the headless-browser test uses it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hook_cache::ActivationCache;
use tch::Kind;

#[derive(Parser, Debug)]
pub struct Args {
    /// A cache file or chunk directory with attention patterns (`pattern_L{l}H{h}` keys, from
    /// `hookrs extract --extract attn_pattern --tokens all`).
    pub cache: PathBuf,
    /// Which example of the cache.
    #[arg(long, default_value_t = 0)]
    pub example: i64,
    /// Only these layers, e.g. `0,3,5` (default: every layer the cache holds).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// The HTML file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The example repeats a token sequence of this length (e.g. BOS, then r_1..r_N twice):
    /// print each head's induction score, the mean attention from a token of the second copy to
    /// the token after its first occurrence, best heads first (as TransformerLens's induction
    /// score; an induction head scores near 1, a random one near 1/position).
    #[arg(long, value_name = "N")]
    pub induction_period: Option<usize>,
}

/// Induction score of one pattern (`q x k`, row-major) for a sequence repeated with period `n`:
/// the mean over query positions `p >= n + 1` of `pattern[p][p - n + 1]`, i.e. the
/// queries of the second copy attending to the token after their first occurrence. None when
/// no query has such a key.
///
/// ```ignore
/// // 5 positions, period 2: queries 2..4 should look at keys 1..3
/// let mut p = vec![0.0; 25];
/// for q in 3..5 { p[q * 5 + q - 1] = 1.0; }
/// assert_eq!(induction_score(&p, 5, 2), Some(1.0));
/// ```
pub fn induction_score(pattern: &[f64], positions: usize, n: usize) -> Option<f64> {
    // p >= n + 1: the query's token occurred at p - n >= 1 (position 0 may be a BOS)
    let queries: Vec<usize> = (n + 1..positions).collect();
    if n == 0 || queries.is_empty() {
        return None;
    }
    Some(queries.iter().map(|&p| pattern[p * positions + p + 1 - n]).sum::<f64>() / queries.len() as f64)
}

/// `pattern_L3H7` -> (3, 7).
fn pattern_key(k: &str) -> Option<(usize, usize)> {
    let rest = k.strip_prefix("pattern_L")?;
    let (l, h) = rest.split_once('H')?;
    Some((l.parse().ok()?, h.parse().ok()?))
}

/// A weight as the shortest decimal that reads back as the same f32 (patterns are at most
/// float32; half the text of a full f64), `null` when not finite.
fn weight(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v as f32)
    } else {
        serde_json::Value::Null
    }
}

pub fn run(a: Args) -> Result<()> {
    let c = ActivationCache::load(&a.cache)?;
    let mut heads: BTreeMap<usize, Vec<(usize, String)>> = BTreeMap::new();
    for k in c.keys() {
        if let Some((l, h)) = pattern_key(k) {
            if a.layers.is_empty() || a.layers.contains(&l) {
                heads.entry(l).or_default().push((h, k.to_string()));
            }
        }
    }
    if heads.is_empty() {
        if c.keys().any(|k| pattern_key(k).is_some()) {
            bail!("--layers {:?}: the cache has attention patterns only for layers {:?}", a.layers, {
                let mut ls: Vec<usize> = c.keys().filter_map(pattern_key).map(|(l, _)| l).collect();
                ls.dedup();
                ls
            });
        }
        bail!(
            "{} holds no attention patterns (pattern_L<layer>H<head> keys): extract them with `hookrs extract --extract attn_pattern --tokens all` (or extract_attn_pattern in --config)",
            a.cache.display()
        );
    }
    let mut layers = Vec::new();
    let mut labels: Option<Vec<String>> = None;
    let mut scores: Vec<(f64, usize, usize)> = Vec::new();
    for (l, mut hs) in heads {
        hs.sort();
        let mut out = Vec::new();
        for (h, key) in hs {
            let t = c.tensor(&key)?;
            if t.dim() != 3 {
                bail!("`{key}` has shape {:?}: expected [batch, queries, keys]", t.size());
            }
            if a.example < 0 || a.example >= t.size()[0] {
                bail!("--example {}: `{key}` holds examples 0..{}", a.example, t.size()[0]);
            }
            let m = t.get(a.example).to_kind(Kind::Float).to_kind(Kind::Double);
            let (q, k) = (m.size()[0] as usize, m.size()[1] as usize);
            if q != k {
                bail!("`{key}` is {q} x {k}: the viewer draws square patterns (the same positions as queries and keys)");
            }
            let flat = Vec::<f64>::try_from(m.flatten(0, -1)).context("reading a pattern")?;
            let names = labels.get_or_insert_with(|| token_labels(&c, a.example as usize, q));
            if names.len() != q {
                bail!("`{key}` covers {q} positions, other patterns {}: one token selection per cache", names.len());
            }
            if let Some(n) = a.induction_period {
                if n == 0 || n >= q {
                    bail!(crate::Usage(format!("--induction-period {n}: the example has {q} positions, so the period must be 1..{}", q.saturating_sub(1))));
                }
                if let Some(score) = induction_score(&flat, q, n) {
                    scores.push((score, l, h));
                }
            }
            let rows: Vec<Vec<serde_json::Value>> = flat.chunks(k).map(|r| r.iter().map(|&v| weight(v)).collect()).collect();
            out.push(serde_json::json!({"head": h, "pattern": rows}));
        }
        layers.push(serde_json::json!({"layer": l, "heads": out}));
    }
    let data = serde_json::json!({
        "title": format!("attention patterns of example {} of {}", a.example, a.cache.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()),
        "tokens": labels.unwrap_or_default(),
        "layers": layers,
    });
    // `</` cannot close the script element early
    let json = serde_json::to_string(&data)?.replace("</", "<\\/");
    let html = TEMPLATE.replace("/*DATA*/null", &json);
    crate::write_atomic(&a.out, html.as_bytes())?;
    let n_heads: usize = data["layers"].as_array().map(|ls| ls.iter().map(|l| l["heads"].as_array().map_or(0, Vec::len)).sum()).unwrap_or(0);
    println!("{} layers, {n_heads} heads, {} tokens -> {}", data["layers"].as_array().map_or(0, Vec::len), data["tokens"].as_array().map_or(0, Vec::len), a.out.display());
    if let Some(n) = a.induction_period {
        scores.sort_by(|x, y| y.0.total_cmp(&x.0));
        let top: Vec<String> = scores.iter().take(5).map(|(s, l, h)| format!("L{l}H{h} {s:.3}")).collect();
        println!("induction scores (period {n}), best first: {}", top.join(", "));
    }
    Ok(())
}

/// The string tokens of the positions a pattern covers, or their indices.
fn token_labels(c: &ActivationCache, ex: usize, n: usize) -> Vec<String> {
    match crate::heatmap::recorded_tokens(c, ex) {
        Some(tk) => {
            let pos = crate::heatmap::recorded_positions(c, tk.len()).filter(|p| p.len() == n).unwrap_or_else(|| {
                // left padding: the last n positions are the example's own
                (tk.len().saturating_sub(n)..tk.len()).collect()
            });
            let mut names: Vec<String> = pos.iter().map(|&p| tk.get(p).cloned().unwrap_or_else(|| p.to_string())).collect();
            names.resize_with(n, String::new);
            names
        }
        None => (0..n).map(|i| i.to_string()).collect(),
    }
}

const TEMPLATE: &str = include_str!("view.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn induction_score_reads_the_token_after_the_first_occurrence() {
        // BOS, a, b, a, b: period 2; queries 2..4 attend to keys 1..3
        let n = 5;
        let mut p = vec![0.0; n * n];
        for q in 2..n {
            p[q * n + q - 1] = 1.0;
        }
        assert_eq!(induction_score(&p, n, 2), Some(1.0));
        // a head that attends to itself scores 0
        let diag: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
        assert_eq!(induction_score(&diag, n, 2), Some(0.0));
        assert_eq!(induction_score(&p, n, 0), None);
    }

    #[test]
    fn pattern_keys() {
        assert_eq!(pattern_key("pattern_L3H7"), Some((3, 7)));
        assert_eq!(pattern_key("pattern_L3"), None);
        assert_eq!(pattern_key("resid_out_0"), None);
    }

    #[test]
    fn the_template_has_its_data_slot() {
        assert_eq!(TEMPLATE.matches("/*DATA*/null").count(), 1);
        assert!(!TEMPLATE.contains("http://") && !TEMPLATE.contains("https://"), "the page must not use the network");
    }
}
