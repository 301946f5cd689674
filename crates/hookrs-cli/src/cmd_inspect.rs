//! `hookrs inspect`: what a saved cache holds.

use std::path::Path;

use anyhow::Result;
use hook_cache::{ActivationCache, CacheValue};

pub fn run(path: &Path) -> Result<()> {
    let c = ActivationCache::load(path)?;
    println!("{}: {} keys, {}", path.display(), c.len(), c.memory_size(None));
    for (k, v) in c.iter() {
        let desc = match v.inner() {
            CacheValue::Tensor(t) => format!("{:?} {:?}", t.kind(), t.size()),
            CacheValue::Data(d) => {
                let s = d.to_string();
                if s.len() > 100 {
                    format!("{}…", &s[..s.char_indices().nth(100).map(|(i, _)| i).unwrap_or(s.len())])
                } else {
                    s
                }
            }
            other => format!("{} of {} tensors", other.kind(), other.tensors().len()),
        };
        let info = v.info().map(|i| format!("  [{i}]")).unwrap_or_default();
        println!("  {k}: {desc}{info}");
    }
    print!("{}", c.memory_report(true));
    Ok(())
}
