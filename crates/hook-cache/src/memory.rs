//! Memory reports: `memory_size` and `memory_tree` (plain, and grouped by key family).
//!
//! Differences from easyroutine (listed in docs/parity.md): sizes under 1 kB are printed in
//! bytes (easyroutine divides them by 1000 and still says "B"); values with info, tuples,
//! map entries and list elements are measured (easyroutine reports 0 B / "Unknown type" for
//! the first two, looks map entries up as top-level keys, and gives every list element the
//! size of the whole list); groups sum exact byte counts (easyroutine adds rounded strings).

use hook_core::keys::ParsedKey;
use indexmap::IndexMap;

use crate::cache::ActivationCache;
use crate::value::CacheValue;

/// easyroutine's size format: `"1.50 MB"`; decimal units, two decimals.
///
/// ```
/// assert_eq!(hook_cache::memory::format_bytes(512), "512.00 B");
/// assert_eq!(hook_cache::memory::format_bytes(1_500_000), "1.50 MB");
/// ```
pub fn format_bytes(n: u64) -> String {
    let x = n as f64;
    if x > 1e9 {
        format!("{:.2} GB", x / 1e9)
    } else if x > 1e6 {
        format!("{:.2} MB", x / 1e6)
    } else if x > 1e3 {
        format!("{:.2} KB", x / 1e3)
    } else {
        format!("{x:.2} B")
    }
}

/// One node of a memory tree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum MemoryNode {
    /// A formatted size, a group summary such as `"1.20 KB (4 items)"`, or `"Unknown type"`.
    Size(String),
    /// Sizes of a map's entries.
    Map(IndexMap<String, MemoryNode>),
    /// Sizes of a list's elements.
    List(Vec<MemoryNode>),
}

const UNKNOWN: &str = "Unknown type";

fn node(v: &CacheValue) -> MemoryNode {
    match v {
        CacheValue::Tensor(_) => MemoryNode::Size(format_bytes(v.nbytes())),
        CacheValue::Info { value, .. } => node(value),
        CacheValue::Map(m) => MemoryNode::Map(m.iter().map(|(k, x)| (k.clone(), leaf(x))).collect()),
        CacheValue::List(items) | CacheValue::Tuple(items) => MemoryNode::List(items.iter().map(leaf).collect()),
        CacheValue::Data(serde_json::Value::Object(m)) => MemoryNode::Map(m.keys().map(|k| (k.clone(), MemoryNode::Size(UNKNOWN.into()))).collect()),
        CacheValue::Data(serde_json::Value::Array(a)) => MemoryNode::List(a.iter().map(|_| MemoryNode::Size(UNKNOWN.into())).collect()),
        CacheValue::Data(_) => MemoryNode::Size(UNKNOWN.into()),
    }
}

/// Inside maps and lists: tensors get their size, everything else "Unknown type".
fn leaf(v: &CacheValue) -> MemoryNode {
    if v.tensor().is_some() {
        MemoryNode::Size(format_bytes(v.nbytes()))
    } else {
        MemoryNode::Size(UNKNOWN.into())
    }
}

/// The group easyroutine's `grouped_tree` puts a key in, if any.
fn group_of(key: &str) -> Option<String> {
    let p = ParsedKey::parse(key);
    let l = p.layer?;
    let fam = p.family.as_str();
    match (fam, p.head) {
        ("resid_out" | "resid_in" | "resid_mid" | "attn_in" | "attn_out" | "head_out" | "mlp_out", None) if key == format!("{fam}_{l}") => Some(fam.to_string()),
        ("avg_attn_pattern" | "pattern" | "head_values" | "head_keys" | "head_queries", Some(_)) => Some(format!("{fam}_L{l}")),
        ("values" | "keys" | "queries", None) if key == format!("{fam}_L{l}") => Some(key.to_string()),
        _ => None,
    }
}

impl ActivationCache {
    /// Bytes held by one key's tensors, or by the whole cache.
    ///
    /// ```
    /// let mut c = hook_cache::ActivationCache::new();
    /// c.insert("a", tch::Tensor::zeros([10], (tch::Kind::Float, tch::Device::Cpu)));
    /// c.add_with_info("b", tch::Tensor::zeros([5], (tch::Kind::Float, tch::Device::Cpu)), "info");
    /// assert_eq!(c.memory_bytes(None), 60);
    /// assert_eq!(c.memory_bytes(Some("b")), 20);
    /// ```
    pub fn memory_bytes(&self, key: Option<&str>) -> u64 {
        match key {
            Some(k) => self.get(k).map(CacheValue::nbytes).unwrap_or(0),
            None => self.iter().map(|(_, v)| v.nbytes()).sum(),
        }
    }

    /// easyroutine's `memory_size(key)`: a formatted size; `"Not present: 0 B"` for a missing key.
    ///
    /// ```
    /// let c = hook_cache::ActivationCache::new();
    /// assert_eq!(c.memory_size(Some("x")), "Not present: 0 B");
    /// assert_eq!(c.memory_size(None), "0.00 B");
    /// ```
    pub fn memory_size(&self, key: Option<&str>) -> String {
        match key {
            Some(k) if !self.contains(k) => "Not present: 0 B".into(),
            _ => format_bytes(self.memory_bytes(key)),
        }
    }

    /// easyroutine's `memory_tree(grouped_tree)`: per key, its size (maps and lists per
    /// element); grouped, keys of one family (`resid_out_*`, `pattern_L{l}H*`, …) summed into
    /// `"<size> (<n> items)"`.
    ///
    /// ```
    /// use hook_cache::memory::MemoryNode;
    /// let mut c = hook_cache::ActivationCache::new();
    /// for l in 0..3 {
    ///     c.insert(format!("resid_out_{l}"), tch::Tensor::zeros([100], (tch::Kind::Float, tch::Device::Cpu)));
    /// }
    /// let t = c.memory_tree(true);
    /// assert_eq!(t["resid_out"], MemoryNode::Size("1.20 KB (3 items)".into()));
    /// ```
    pub fn memory_tree(&self, grouped: bool) -> IndexMap<String, MemoryNode> {
        let plain: IndexMap<String, MemoryNode> = self.iter().map(|(k, v)| (k.to_string(), node(v))).collect();
        if !grouped {
            return plain;
        }
        let mut groups: IndexMap<String, (u64, usize)> = IndexMap::new();
        let mut out: IndexMap<String, MemoryNode> = IndexMap::new();
        for (k, n) in plain {
            let v = self.get(&k).expect("key from iter");
            match (group_of(&k), &n) {
                (Some(g), MemoryNode::Size(_)) if k != "metadata" && v.tensor().is_some() => {
                    let slot = groups.entry(g.clone()).or_insert((0, 0));
                    slot.0 += v.nbytes();
                    slot.1 += 1;
                    if !out.contains_key(&g) {
                        out.insert(g, MemoryNode::Size(String::new())); // keeps first-seen order
                    }
                }
                _ => {
                    out.insert(k, n);
                }
            }
        }
        for (g, (bytes, count)) in groups {
            out.insert(g, MemoryNode::Size(format!("{} ({count} items)", format_bytes(bytes))));
        }
        out
    }

    /// The report easyroutine prints with `memory_tree(print_tree=True)`.
    pub fn memory_report(&self, grouped: bool) -> String {
        let mut s = String::from("---- Activation Cache Memory Tree - - - -\n");
        s.push_str(&format!("Total size:  {}\n", self.memory_size(None)));
        for (k, v) in self.memory_tree(grouped) {
            s.push_str(&format!("   - {k}: {}\n", render(&v)));
        }
        s
    }
}

/// A node as Python prints it.
pub fn render(n: &MemoryNode) -> String {
    match n {
        MemoryNode::Size(s) => s.clone(),
        MemoryNode::Map(m) => format!("{{{}}}", m.iter().map(|(k, v)| format!("'{k}': {}", quoted(v))).collect::<Vec<_>>().join(", ")),
        MemoryNode::List(l) => format!("[{}]", l.iter().map(quoted).collect::<Vec<_>>().join(", ")),
    }
}

fn quoted(n: &MemoryNode) -> String {
    match n {
        MemoryNode::Size(s) => format!("'{s}'"),
        other => render(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(0, "0.00 B")]
    #[case(999, "999.00 B")]
    #[case(1000, "1000.00 B")]
    #[case(1001, "1.00 KB")]
    #[case(2_500_000, "2.50 MB")]
    #[case(3_000_000_001, "3.00 GB")]
    fn formats(#[case] n: u64, #[case] s: &str) {
        assert_eq!(format_bytes(n), s);
    }

    #[rstest]
    #[case("resid_out_3", Some("resid_out"))]
    #[case("resid_in_post_layernorm_3", None)]
    #[case("pattern_L2H7", Some("pattern_L2"))]
    #[case("head_keys_L0H1", Some("head_keys_L0"))]
    #[case("values_L4", Some("values_L4"))]
    #[case("values_4", None)]
    #[case("projected_value_L0H1", None)]
    #[case("logits", None)]
    fn groups(#[case] key: &str, #[case] g: Option<&str>) {
        assert_eq!(group_of(key).as_deref(), g);
    }
}
