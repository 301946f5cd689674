//! What `patch` and `ablate` share: prompts and answers given as text or token ids, on the
//! command line or in a JSONL file, the `--positions` flag, and the metric's name.

use std::path::Path;

use anyhow::{bail, Context, Result};
use hook_analysis::patching::Positions;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::inputs::{self, Example};

/// `--positions`: `all`, `last`, or a comma-separated list (`0,3,-1`; negative from the end).
pub fn positions(s: &str) -> Result<Positions> {
    match s.trim() {
        "all" => Ok(Positions::All),
        "last" => Ok(Positions::These(vec![-1])),
        list => list
            .split(',')
            .map(|p| p.trim().parse::<i64>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Positions::These)
            .map_err(|_| crate::usage!("--positions {s:?}: expected all, last, or positions such as 0,3,-1 (negative from the end)")),
    }
}

/// A prompt or answer given as text (tokenized) or as a list of token ids.
pub fn tokens_of(tok: Option<&Tokenizer>, v: &Value, special: bool, what: &str) -> Result<Example> {
    match v {
        Value::String(text) => {
            let tok = tok.with_context(|| format!("{what} is text, and the model has no tokenizer beside it: give token ids instead"))?;
            inputs::encode(tok, text, special).with_context(|| what.to_string())
        }
        Value::Array(items) => {
            let ids = items.iter().map(|x| x.as_i64().filter(|&i| i >= 0)).collect::<Option<Vec<i64>>>();
            match ids {
                Some(ids) if !ids.is_empty() => {
                    let tokens = tok.map(|t| ids_to_tokens(t, &ids));
                    Ok(Example { ids, tokens })
                }
                _ => bail!("{what}: expected a text or a non-empty list of token ids (non-negative integers), got {v}"),
            }
        }
        _ => bail!("{what}: expected a text or a list of token ids, got {v}"),
    }
}

/// An answer's token ids: `obj` (the line's own `"answer"`/`"wrong"` in a JSONL file) or else
/// `given` (the `flag` on the command line). Missing from both, it is an error naming where it
/// belongs (`at` prefixes the file and line): a usage error when no file was read
/// (`from_file` false), since the flag is then the only place it can come from.
pub fn answer_ids(tok: Option<&Tokenizer>, obj: Option<&Value>, given: &Option<String>, flag: &str, at: &str, from_file: bool, command: &str) -> Result<Vec<i64>> {
    let v = match (obj, given) {
        (Some(v), _) => v.clone(),
        (None, Some(s)) => Value::String(s.clone()),
        (None, None) if from_file => bail!("{at}no \"{}\": put it in each line or give {flag}", flag.trim_start_matches('-')),
        (None, None) => return Err(crate::usage!("{command} needs {flag} (text: one or more tokens)")),
    };
    Ok(tokens_of(tok, &v, false, &format!("{at}{flag}"))?.ids)
}

fn ids_to_tokens(tok: &Tokenizer, ids: &[i64]) -> Vec<String> {
    ids.iter().map(|&i| u32::try_from(i).ok().and_then(|i| tok.id_to_token(i)).unwrap_or_else(|| i.to_string())).collect()
}

/// `--clean-ids '[1,5,9]'`-style flags: a JSON list of token ids (usage error otherwise).
pub fn ids_flag(flag: &str, s: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(s).map_err(|e| crate::usage!("{flag} {s:?}: expected a JSON list of token ids such as [1,5,9] ({e})"))?;
    if !v.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|x| x.as_i64().is_some_and(|i| i >= 0))) {
        return Err(crate::usage!("{flag} {s:?}: expected a non-empty JSON list of non-negative token ids such as [1,5,9]"));
    }
    Ok(v)
}

/// The objects of a JSONL file, with their line numbers; a bad line is an error naming it.
pub fn jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => out.push((i + 1, o)),
            Ok(_) => bail!("{}:{}: expected a JSON object per line", path.display(), i + 1),
            Err(e) => bail!("{}:{}: not JSON: {e}", path.display(), i + 1),
        }
    }
    if out.is_empty() {
        bail!("{} holds no lines", path.display());
    }
    Ok(out)
}

/// The metric's name: a logit difference when both answers are one token, else a difference
/// of summed log-probabilities.
pub fn metric_name(one_token: bool) -> &'static str {
    if one_token {
        "logit diff"
    } else {
        "log-prob diff"
    }
}

pub const METRIC: &str = "m = sum log p(answer tokens) - sum log p(wrong tokens) after the prompt (teacher forced); for one-token answers, logit(answer) - logit(wrong) at the last position; averaged over the dataset";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse() {
        assert_eq!(positions("all").unwrap(), Positions::All);
        assert_eq!(positions("last").unwrap(), Positions::These(vec![-1]));
        assert_eq!(positions("0, 3,-1").unwrap(), Positions::These(vec![0, 3, -1]));
        let e = positions("first").unwrap_err();
        assert!(e.chain().any(|c| c.is::<crate::Usage>()));
    }

    #[test]
    fn ids_flags_are_checked() {
        assert!(ids_flag("--clean-ids", "[1,2]").is_ok());
        for bad in ["[]", "[1,-2]", "x", "[[1]]"] {
            assert!(ids_flag("--clean-ids", bad).unwrap_err().chain().any(|c| c.is::<crate::Usage>()), "{bad}");
        }
    }
}
