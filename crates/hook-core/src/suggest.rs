//! "Did you mean" suggestions for names (component paths, cache keys).

/// Levenshtein distance between two strings (by `char`).
///
/// ```
/// assert_eq!(hook_core::suggest::edit_distance("resid_out_1", "resid_out_0"), 1);
/// ```
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Up to `n` of `names` closest to `query`, nearest first; names further than half the
/// longer length are left out.
///
/// ```
/// let names = ["model.layers[0].mlp.output", "model.layers[1].mlp.output", "lm_head.output"];
/// assert_eq!(hook_core::suggest::closest("model.layers[0].mlp.outptu", names, 2), ["model.layers[0].mlp.output", "model.layers[1].mlp.output"]);
/// ```
pub fn closest<'a>(query: &str, names: impl IntoIterator<Item = &'a str>, n: usize) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = names.into_iter().map(|x| (edit_distance(query, x), x)).collect();
    scored.sort();
    scored
        .into_iter()
        .filter(|(d, x)| *d <= x.chars().count().max(query.chars().count()) / 2 + 1)
        .take(n)
        .map(|(_, x)| x.to_string())
        .collect()
}

/// `"; closest: a, b"` for an error message, or nothing when there are no suggestions.
///
/// ```
/// assert_eq!(hook_core::suggest::closest_suffix("closest keys", &["a".to_string()]), "; closest keys: a");
/// assert_eq!(hook_core::suggest::closest_suffix("closest", &[]), "");
/// ```
pub fn closest_suffix(label: &str, names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!("; {label}: {}", names.join(", "))
    }
}
