//! `hookrs plot`: one cache entry as a heatmap.

use std::path::Path;

use anyhow::{bail, Result};
use hook_cache::ActivationCache;
use tch::Kind;

pub fn run(path: &Path, key: &str, example: i64, out: &Path) -> Result<()> {
    let c = ActivationCache::load(path)?;
    let t = c.tensor(key)?;
    if t.dim() != 3 {
        bail!("`{key}` has shape {:?}: plot draws [batch, rows, cols] entries such as pattern_L0H1", t.size());
    }
    if example < 0 || example >= t.size()[0] {
        bail!("--example {example} is out of range: `{key}` holds examples 0..{}", t.size()[0]);
    }
    let m = t.get(example).to_kind(Kind::Double);
    let (r, k) = (m.size()[0], m.size()[1]);
    let flat: Vec<f64> = Vec::<f64>::try_from(m.flatten(0, -1))?;
    let values: Vec<Vec<f64>> = flat.chunks(k as usize).map(<[f64]>::to_vec).collect();
    let toks = crate::heatmap::recorded_tokens(&c, example as usize);
    let label = |n: i64| -> Vec<String> {
        match &toks {
            Some(tk) => {
                let pos = crate::heatmap::recorded_positions(&c, tk.len()).filter(|p| p.len() == n as usize).unwrap_or_else(|| (0..n as usize).collect());
                pos.iter().map(|&p| tk.get(p).cloned().unwrap_or_else(|| p.to_string())).collect()
            }
            None => (0..n).map(|i| i.to_string()).collect(),
        }
    };
    let title = format!("{key} (example {example})");
    let pattern = key.starts_with("pattern_");
    let labels = crate::heatmap::Labels {
        title: &title,
        x: if pattern { "key position" } else { "column" },
        y: if pattern { "query position" } else { "row" },
        value: if pattern { "attention" } else { "value" },
        cells: None,
    };
    crate::heatmap::draw(&values, &label(r), &label(k), labels, out)?;
    println!("{key}: {r} x {k} -> {}", out.display());
    Ok(())
}
