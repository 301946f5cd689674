//! `hookrs lens`: the logit lens of one prompt — for every layer and position, the token the
//! residual stream predicts (through the final norm and the unembedding) and its probability,
//! or the logit difference of two answer tokens — as a labelled heatmap and JSON.


use anyhow::{Context, Result};
use hook_analysis::{Direction, LogitLens, Metric};
use hook_core::TokenGroups;
use hook_torch::ExtractionConfig;

use crate::inputs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: inputs::ModelOptions,
    #[command(flatten)]
    pub prompt: inputs::PromptArgs,
    /// With --wrong: plot logit(answer) - logit(wrong) instead of the top token (one token each).
    #[arg(long, requires = "wrong")]
    pub answer: Option<String>,
    /// The wrong-answer token (with --answer).
    #[arg(long, requires = "answer")]
    pub wrong: Option<String>,
    #[command(flatten)]
    pub figure: inputs::FigureArgs,
}

pub fn run(a: Args) -> Result<()> {
    let device = inputs::device(&a.model)?;
    let tok = inputs::tokenizer_for(&a.model.model)?;
    let example = inputs::single_prompt(&a.model, tok.as_ref(), &a.prompt)?;
    let pair = match (&a.answer, &a.wrong) {
        (Some(x), Some(y)) => {
            let tok = tok.as_ref().context("--answer/--wrong need the model's tokenizer")?;
            Some((inputs::one_token(tok, "--answer", x)?, inputs::one_token(tok, "--wrong", y)?))
        }
        _ => None,
    };
    let mut m = inputs::load_model(&a.model)?;
    let lens = LogitLens::from_model(&m)?;
    let layers = m.require_description()?.num_hidden_layers;
    let (ids, mask) = inputs::pad(&[&example], device);
    let seq = example.ids.len();
    let config = ExtractionConfig { save_logits: false, ..ExtractionConfig::default().with_flags(&["resid_out", "last_layernorm"])? };
    let (_, cache) = m.run_with_cache(&ids, &mask, &TokenGroups::all(seq)?, &config)?;
    let col_labels: Vec<String> = example.tokens.clone().unwrap_or_else(|| example.ids.iter().map(|i| i.to_string()).collect());
    let row_labels: Vec<String> = (0..layers).map(|l| format!("L{l}")).collect();
    let name = |id: i64| tok.as_ref().and_then(|t| t.id_to_token(id as u32)).unwrap_or_else(|| id.to_string());
    let mut top_ids: Option<Vec<Vec<i64>>> = None;
    let (values, top, title, metric): (Vec<Vec<f64>>, Option<Vec<Vec<String>>>, String, &str) = match pair {
        Some((x, y)) => {
            let out = lens.compute(&cache, "resid_out_{i}", Some(&[Direction::Diff(x, y)]), true, false, Metric::LogitDiff)?;
            let values = out.values().map(|t| Vec::<f64>::try_from(t.get(0).to_kind(tch::Kind::Double))).collect::<Result<Vec<_>, _>>()?;
            (values, None, format!("logit lens: logit({}) - logit({})", a.answer.as_deref().unwrap_or(""), a.wrong.as_deref().unwrap_or("")), "logit_diff")
        }
        None => {
            let out = lens.compute(&cache, "resid_out_{i}", None, true, true, Metric::LogitDiff)?;
            let mut values = Vec::new();
            let mut top = Vec::new();
            let mut ids = Vec::new();
            for probs in out.values() {
                let (p, i) = probs.get(0).max_dim(-1, false);
                values.push(Vec::<f64>::try_from(p.to_kind(tch::Kind::Double))?);
                let i = Vec::<i64>::try_from(i)?;
                top.push(i.iter().copied().map(name).collect());
                ids.push(i);
            }
            top_ids = Some(ids);
            (values, Some(top), "logit lens: probability of the top token".to_string(), "top_token")
        }
    };
    let json = serde_json::json!({
        "model": a.model.model, "metric": metric, "rows": "layer (resid_out)", "cols": "position",
        "row_labels": row_labels, "col_labels": col_labels, "input_ids": example.ids,
        "values": values, "top_tokens": top, "top_token_ids": top_ids, "answer": a.answer, "wrong": a.wrong,
        "semantics": "easyroutine LogitLens.compute: the final norm applied with the final residual's cached statistics (frozen), then the unembedding",
    });
    let (json_path, png_path) = a.figure.paths();
    let value = if metric == "logit_diff" { "logit difference" } else { "probability" };
    let labels = crate::heatmap::Labels { title: &title, x: "position (token)", y: "layer (resid_out)", value, cells: top.as_deref() };
    crate::heatmap::draw(&values, &row_labels, &col_labels, labels, &png_path)?;
    crate::write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("{layers} layers x {seq} positions ({metric}) -> {} and {}", json_path.display(), png_path.display());
    Ok(())
}
