//! `hookrs patch`: activation patching sweeps over one clean/corrupted pair or a dataset of
//! pairs (hook_analysis::patching).
//!
//! For every layer × position (or layer × head, or layer·head × position) the clean
//! activation is written into the corrupted run; the score is
//! `(m - m_corrupted) / (m_clean - m_corrupted)` with `m` the answer's log-probability over the
//! wrong answer's (the logit difference for one-token answers), averaged over the pairs:
//! 1 = the clean behaviour is fully restored, 0 = no effect.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use hook_analysis::patching::{patch_sweep, Part, PatchPair};
use serde_json::Value;

use crate::{answers, inputs};

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["clean", "clean_ids", "pairs"]))]
pub struct Args {
    #[command(flatten)]
    pub model: inputs::ModelOptions,
    /// The clean prompt.
    #[arg(long, requires = "corrupted")]
    pub clean: Option<String>,
    /// The corrupted prompt (same number of tokens).
    #[arg(long, requires = "clean")]
    pub corrupted: Option<String>,
    /// The clean prompt as token ids, e.g. '[1,5,9]'.
    #[arg(long, requires = "corrupted_ids")]
    pub clean_ids: Option<String>,
    /// The corrupted prompt as token ids.
    #[arg(long, requires = "clean_ids")]
    pub corrupted_ids: Option<String>,
    /// A JSONL file of pairs, one per line: {"clean": …, "corrupted": …, "answer": …, "wrong": …}
    /// (each a text or a list of token ids; answer and wrong default to --answer/--wrong).
    /// Scores are averaged over the pairs, as easyroutine's compute_patching averages.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// The answer: one token or several (then the metric sums their log-probabilities).
    #[arg(long)]
    pub answer: Option<String>,
    /// The wrong answer: one token or several.
    #[arg(long)]
    pub wrong: Option<String>,
    /// What to patch: layers × positions of resid_out, attn_out or mlp_out; layers × heads
    /// (the chosen positions at once); or heads_by_position (layer·head × positions).
    #[arg(long, default_value = "resid_out", value_parser = ["resid_out", "attn_out", "mlp_out", "heads", "heads_by_position"])]
    pub component: String,
    /// Which positions: all, last, or a list such as 0,3,-1 (negative from the end).
    #[arg(long, default_value = "all")]
    pub positions: String,
    #[command(flatten)]
    pub sweep: inputs::SweepArgs,
    #[command(flatten)]
    pub figure: inputs::FigureArgs,
}

/// One pair as read: the ids, and the clean and corrupted string tokens for labels.
struct ReadPair {
    pair: PatchPair,
    clean_tokens: Option<Vec<String>>,
    corrupted_tokens: Option<Vec<String>>,
}

fn read_pairs(a: &Args, tok: Option<&tokenizers::Tokenizer>) -> Result<Vec<ReadPair>> {
    let special = !a.model.no_special_tokens;
    let answer = |obj: Option<&Value>, flag: &str, given: &Option<String>, at: &str| answers::answer_ids(tok, obj, given, flag, at, a.pairs.is_some(), "patch");
    let one = |clean: &Value, corrupted: &Value, ans: Option<&Value>, wrong: Option<&Value>, at: &str| -> Result<ReadPair> {
        let c = answers::tokens_of(tok, clean, special, &format!("{at}clean"))?;
        let x = answers::tokens_of(tok, corrupted, special, &format!("{at}corrupted"))?;
        if c.ids.len() != x.ids.len() {
            bail!(
                "{at}the clean prompt has {} tokens and the corrupted one {}: activation patching needs prompts of one length ({:?} vs {:?})",
                c.ids.len(),
                x.ids.len(),
                c.tokens.unwrap_or_default(),
                x.tokens.unwrap_or_default()
            );
        }
        let pair = PatchPair { clean: c.ids, corrupted: x.ids, answer: answer(ans, "--answer", &a.answer, at)?, wrong: answer(wrong, "--wrong", &a.wrong, at)? };
        Ok(ReadPair { pair, clean_tokens: c.tokens, corrupted_tokens: x.tokens })
    };
    if let Some(path) = &a.pairs {
        return answers::jsonl(path)?
            .into_iter()
            .map(|(line, o)| {
                let at = format!("{}:{line}: ", path.display());
                let get = |k: &str| o.get(k).with_context(|| format!("{at}no \"{k}\" (each line: {{\"clean\": …, \"corrupted\": …, \"answer\": …, \"wrong\": …}})"));
                one(get("clean")?, get("corrupted")?, o.get("answer"), o.get("wrong"), &at)
            })
            .collect();
    }
    let (clean, corrupted) = match (&a.clean, &a.corrupted, &a.clean_ids, &a.corrupted_ids) {
        (Some(c), Some(x), None, None) => (Value::String(c.clone()), Value::String(x.clone())),
        (None, None, Some(c), Some(x)) => (answers::ids_flag("--clean-ids", c)?, answers::ids_flag("--corrupted-ids", x)?),
        _ => return Err(crate::usage!("give the pair as --clean/--corrupted (text) or --clean-ids/--corrupted-ids (token ids), not both")),
    };
    Ok(vec![one(&clean, &corrupted, None, None, "")?])
}

pub fn run(a: Args) -> Result<()> {
    inputs::device(&a.model)?; // a bad --device is a usage error before anything is read
    let positions = answers::positions(&a.positions)?;
    let tok = inputs::tokenizer_for(&a.model.model)?;
    let read = read_pairs(&a, tok.as_ref())?;
    let mut m = inputs::load_model(&a.model)?;
    let (part, each_position) = match a.component.as_str() {
        "attn_out" => (Part::Attn, true),
        "mlp_out" => (Part::Mlp, true),
        "heads" => (Part::Heads, false),
        "heads_by_position" => (Part::Heads, true),
        _ => (Part::Resid, true),
    };
    let pairs: Vec<PatchPair> = read.iter().map(|r| r.pair.clone()).collect();
    let started = std::time::Instant::now();
    let grid = patch_sweep(&mut m, &pairs, part, &positions, each_position, a.sweep.batching())?;
    let sweep_seconds = started.elapsed().as_secs_f64();
    let one_token = pairs.iter().all(|p| p.answer.len() == 1 && p.wrong.len() == 1);
    let values = grid.score();
    // token labels when there is one pair
    let mut col_labels = grid.cols.clone();
    if each_position && read.len() == 1 {
        if let (Some(c), Some(x)) = (&read[0].clean_tokens, &read[0].corrupted_tokens) {
            let at = positions.resolve(c.len())?;
            col_labels = at.iter().map(|&p| (&c[p as usize], &x[p as usize])).map(|(c, x)| if c == x { c.clone() } else { format!("{c}/{x}") }).collect();
        }
    }
    let corrupted = grid.corrupted.unwrap_or(f64::NAN);
    let json = serde_json::json!({
        "sweep_seconds": sweep_seconds,
        "component": a.component, "positions": a.positions,
        "rows": if part == Part::Heads && each_position { "layer.head" } else { "layer" },
        "cols": if part == Part::Heads && !each_position { "head" } else { "position" },
        "row_labels": grid.rows, "col_labels": col_labels, "values": values, "metric_means": grid.values,
        "clean_metric": grid.clean, "corrupted_metric": corrupted, "clean_each": grid.clean_each, "corrupted_each": grid.corrupted_each,
        "pairs": pairs.len(), "score": "(m - m_corrupted) / (m_clean - m_corrupted), on the metric averaged over the pairs",
        "metric": answers::METRIC,
        "answer": a.answer, "wrong": a.wrong, "clean": a.clean, "corrupted": a.corrupted,
    });
    let (json_path, png_path) = a.figure.paths();
    let over = if pairs.len() > 1 { format!(", mean of {} pairs", pairs.len()) } else { String::new() };
    let title = format!("activation patching of {}: share of the {} restored{over}", a.component, answers::metric_name(one_token));
    let x = if part == Part::Heads && !each_position { "head" } else if read.len() == 1 { "position (clean/corrupted token)" } else { "position" };
    let y = if part == Part::Heads && each_position { "layer and head" } else { "layer" };
    let labels = crate::heatmap::Labels { title: &title, x, y, value: "restored (clean = 1)", cells: None };
    crate::heatmap::draw(&values, &grid.rows, &col_labels, labels, &png_path)?;
    crate::write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!(
        "clean {name} {:.4}, corrupted {corrupted:.4}{over}; {} x {} -> {} and {}",
        grid.clean,
        grid.rows.len(),
        grid.cols.len(),
        json_path.display(),
        png_path.display(),
        name = answers::metric_name(one_token)
    );
    Ok(())
}

