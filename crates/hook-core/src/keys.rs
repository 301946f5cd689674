//! Cache keys as easyroutine spells them, built and taken apart.
//!
//! Three shapes exist: per layer (`resid_out_3`), per layer and head (`pattern_L0H1`,
//! `head_queries_L2H5`), and per layer without head (`values_L4`). Anything else (`logits`,
//! `input_ids`, `mapping_index`, user keys) is a plain key.
//!
//! ```
//! use hook_core::keys::{self, ParsedKey};
//! assert_eq!(keys::resid_out(3), "resid_out_3");
//! assert_eq!(keys::pattern(0, 1), "pattern_L0H1");
//! let k = ParsedKey::parse("head_values_L2H7");
//! assert_eq!((k.family.as_str(), k.layer, k.head), ("head_values", Some(2), Some(7)));
//! assert_eq!(k.group(), "head_values_L2");
//! ```

/// `{family}_{layer}`: `resid_out_3`.
pub fn layer_key(family: &str, layer: usize) -> String {
    format!("{family}_{layer}")
}

/// `{prefix}L{layer}H{head}` where the prefix carries its own underscore (`pattern_`), as in
/// easyroutine's `f"{cache_key}L{layer}H{head_idx}"`.
pub fn head_key(prefix: &str, layer: usize, head: usize) -> String {
    format!("{prefix}L{layer}H{head}")
}

/// `{prefix}L{layer}`: `values_L4`.
pub fn layer_head_free_key(prefix: &str, layer: usize) -> String {
    format!("{prefix}L{layer}")
}

macro_rules! per_layer {
    ($($(#[$m:meta])* $name:ident => $fam:literal),* $(,)?) => {$(
        $(#[$m])*
        pub fn $name(layer: usize) -> String { layer_key($fam, layer) }
    )*};
}
macro_rules! per_head {
    ($($(#[$m:meta])* $name:ident => $prefix:literal),* $(,)?) => {$(
        $(#[$m])*
        pub fn $name(layer: usize, head: usize) -> String { head_key($prefix, layer, head) }
    )*};
}

per_layer! {
    /// `resid_out_{l}`: output of decoder layer `l`.
    resid_out => "resid_out",
    /// `resid_in_{l}`: input of decoder layer `l`.
    resid_in => "resid_in",
    /// `resid_mid_{l}`: residual stream between attention and MLP.
    resid_mid => "resid_mid",
    /// `resid_in_post_layernorm_{l}`: input of attention after the input layernorm.
    resid_in_post_layernorm => "resid_in_post_layernorm",
    /// `attn_in_{l}`: input of the attention module.
    attn_in => "attn_in",
    /// `attn_out_{l}`: output of the attention module.
    attn_out => "attn_out",
    /// `mlp_out_{l}`: output of the MLP.
    mlp_out => "mlp_out",
}

per_head! {
    /// `pattern_L{l}H{h}`: attention pattern.
    pattern => "pattern_",
    /// `avg_pattern_L{l}H{h}`: running average of the attention pattern.
    avg_pattern => "avg_pattern_",
    /// `head_queries_L{l}H{h}`.
    head_queries => "head_queries_",
    /// `head_keys_L{l}H{h}`.
    head_keys => "head_keys_",
    /// `head_values_L{l}H{h}`.
    head_values => "head_values_",
    /// `head_out_L{l}H{h}`: one head's W_O-projected output.
    head_out => "head_out_",
    /// `projected_value_L{l}H{h}`.
    projected_value => "projected_value_",
    /// `projected_key_L{l}H{h}`.
    projected_key => "projected_key_",
    /// `projected_query_L{l}H{h}`.
    projected_query => "projected_query_",
}

/// A key taken apart: family, layer and head where the key has them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParsedKey {
    /// `resid_out`, `pattern`, `head_values`, `values`, or the whole key for plain keys.
    pub family: String,
    /// The layer, for per-layer keys.
    pub layer: Option<usize>,
    /// The head, for per-head keys.
    pub head: Option<usize>,
}

impl ParsedKey {
    /// Parses any key; never fails (unknown shapes are plain keys).
    ///
    /// ```
    /// use hook_core::keys::ParsedKey;
    /// assert_eq!(ParsedKey::parse("resid_out_12").layer, Some(12));
    /// assert_eq!(ParsedKey::parse("values_L3").family, "values");
    /// assert_eq!(ParsedKey::parse("logits").family, "logits");
    /// ```
    pub fn parse(key: &str) -> Self {
        if let Some((prefix, l, h)) = split_lh(key) {
            let family = prefix.strip_suffix('_').unwrap_or(prefix).to_string();
            return ParsedKey { family, layer: Some(l), head: h };
        }
        if let Some((fam, num)) = key.rsplit_once('_') {
            if !fam.is_empty() && !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(l) = num.parse() {
                    return ParsedKey { family: fam.to_string(), layer: Some(l), head: None };
                }
            }
        }
        ParsedKey { family: key.to_string(), layer: None, head: None }
    }

    /// The group a memory report puts this key in: the family for per-layer keys
    /// (`resid_out`), family and layer for per-head keys (`pattern_L0`), the key otherwise.
    pub fn group(&self) -> String {
        match (self.layer, self.head) {
            (Some(l), Some(_)) => format!("{}_L{l}", self.family),
            _ => self.family.clone(),
        }
    }
}

/// Splits `prefixL{l}H{h}` or `prefixL{l}`.
fn split_lh(key: &str) -> Option<(&str, usize, Option<usize>)> {
    let lpos = key.rfind('L')?;
    let (prefix, rest) = key.split_at(lpos);
    if prefix.is_empty() || !prefix.ends_with('_') {
        return None;
    }
    let rest = &rest[1..];
    let (lnum, hnum) = match rest.split_once('H') {
        Some((l, h)) => (l, Some(h)),
        None => (rest, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(lnum) || hnum.is_some_and(|h| !digits(h)) {
        return None;
    }
    Some((prefix, lnum.parse().ok()?, match hnum {
        Some(h) => Some(h.parse().ok()?),
        None => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(resid_out(0), "resid_out_0")]
    #[case(resid_in(1), "resid_in_1")]
    #[case(resid_mid(2), "resid_mid_2")]
    #[case(resid_in_post_layernorm(3), "resid_in_post_layernorm_3")]
    #[case(attn_in(4), "attn_in_4")]
    #[case(attn_out(5), "attn_out_5")]
    #[case(mlp_out(6), "mlp_out_6")]
    #[case(pattern(0, 1), "pattern_L0H1")]
    #[case(avg_pattern(10, 11), "avg_pattern_L10H11")]
    #[case(head_queries(1, 2), "head_queries_L1H2")]
    #[case(head_keys(1, 2), "head_keys_L1H2")]
    #[case(head_values(1, 2), "head_values_L1H2")]
    #[case(head_out(1, 2), "head_out_L1H2")]
    #[case(projected_value(1, 2), "projected_value_L1H2")]
    #[case(projected_key(1, 2), "projected_key_L1H2")]
    #[case(projected_query(1, 2), "projected_query_L1H2")]
    #[case(layer_head_free_key("values_", 4), "values_L4")]
    fn builders(#[case] got: String, #[case] want: &str) {
        assert_eq!(got, want);
    }

    #[rstest]
    #[case("resid_out_3", "resid_out", Some(3), None, "resid_out")]
    #[case("resid_in_post_layernorm_11", "resid_in_post_layernorm", Some(11), None, "resid_in_post_layernorm")]
    #[case("pattern_L0H1", "pattern", Some(0), Some(1), "pattern_L0")]
    #[case("head_queries_L12H31", "head_queries", Some(12), Some(31), "head_queries_L12")]
    #[case("values_L4", "values", Some(4), None, "values")]
    #[case("logits", "logits", None, None, "logits")]
    #[case("input_ids", "input_ids", None, None, "input_ids")]
    #[case("mapping_index", "mapping_index", None, None, "mapping_index")]
    #[case("last_layernorm", "last_layernorm", None, None, "last_layernorm")]
    #[case("my_L", "my_L", None, None, "my_L")]
    #[case("x_LxH1", "x_LxH1", None, None, "x_LxH1")]
    #[case("_3", "_3", None, None, "_3")]
    fn parses(
        #[case] key: &str,
        #[case] family: &str,
        #[case] layer: Option<usize>,
        #[case] head: Option<usize>,
        #[case] group: &str,
    ) {
        let k = ParsedKey::parse(key);
        assert_eq!((k.family.as_str(), k.layer, k.head), (family, layer, head));
        assert_eq!(k.group(), group);
    }
}
