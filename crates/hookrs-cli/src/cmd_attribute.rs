//! `hookrs attribute`: direct logit attribution of one prompt — how much the embedding, each
//! layer's attention (or each head) and each MLP add directly to logit(answer) - logit(wrong)
//! at a position, through the final norm with its scale frozen. Prints the top parts, writes a
//! layers × parts heatmap and JSON.


use anyhow::{Context, Result};
use hook_analysis::{Decomposition, Direction, LogitLens};

use crate::inputs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: inputs::ModelOptions,
    /// The prompt.
    #[arg(long)]
    pub text: String,
    /// The answer token (one token).
    #[arg(long)]
    pub answer: String,
    /// The wrong-answer token (one token).
    #[arg(long)]
    pub wrong: String,
    /// Split each layer's attention into its heads (through W_O) and the output bias.
    #[arg(long)]
    pub heads: bool,
    /// The position whose logits are attributed (negative from the end).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub position: i64,
    /// How many parts to print, largest |attribution| first.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[command(flatten)]
    pub figure: inputs::FigureArgs,
}

pub fn run(a: Args) -> Result<()> {
    let device = inputs::device(&a.model)?;
    let tok = inputs::tokenizer_for(&a.model.model)?
        .with_context(|| format!("attribute needs the model's tokenizer (looked for {:?})", inputs::tokenizer_candidates(&a.model.model)))?;
    let example = inputs::encode(&tok, &a.text, !a.model.no_special_tokens)?;
    let (answer, wrong) = (inputs::one_token(&tok, "--answer", &a.answer)?, inputs::one_token(&tok, "--wrong", &a.wrong)?);
    let mut m = inputs::load_model(&a.model)?;
    let lens = LogitLens::from_model(&m)?;
    let d = m.require_description()?.clone();
    let (ids, mask) = inputs::pad(&[&example], device);
    let parts = Decomposition::run(&mut m, &ids, &mask, &[a.position], a.heads)?;
    let attr = parts.direct_logit_attribution(&lens, &[Direction::Diff(answer, wrong)])?;
    let value = |t: &tch::Tensor| t.double_value(&[0, 0]);
    let total: f64 = attr.iter().map(|(_, t)| value(t)).sum();
    let logits = parts.logits.get(0).get(0);
    let model_diff = logits.double_value(&[answer]) - logits.double_value(&[wrong]);
    let mut ranked: Vec<(&str, f64)> = attr.iter().map(|(n, t)| (n.as_str(), value(t))).collect();
    ranked.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
    println!("direct logit attribution of logit({}) - logit({}) at position {} ({} parts; sum {total:.4}, model {model_diff:.4}):", a.answer, a.wrong, a.position, attr.len());
    for (n, v) in ranked.iter().take(a.top) {
        println!("  {n:<16} {v:+.4}");
    }
    // layers × (heads | attn) + mlp
    let layers = d.num_hidden_layers;
    let cols: Vec<String> = if a.heads { (0..d.num_attention_heads).map(|h| format!("H{h}")).chain(["mlp".to_string()]).collect() } else { vec!["attn".into(), "mlp".into()] };
    let get = |name: &str| attr.iter().find(|(n, _)| n == name).map(|(_, t)| value(t)).unwrap_or(0.0);
    let values: Vec<Vec<f64>> = (0..layers)
        .map(|l| {
            let mut row: Vec<f64> = if a.heads { (0..d.num_attention_heads).map(|h| get(&format!("L{l}H{h}"))).collect() } else { vec![get(&format!("L{l} attn"))] };
            row.push(get(&format!("L{l} mlp")));
            row
        })
        .collect();
    let row_labels: Vec<String> = (0..layers).map(|l| format!("L{l}")).collect();
    let json = serde_json::json!({
        "model": a.model.model, "text": a.text, "answer": a.answer, "wrong": a.wrong, "position": a.position,
        "tokens": example.tokens, "input_ids": example.ids,
        "parts": attr.iter().map(|(n, t)| serde_json::json!({"name": n, "attribution": value(t)})).collect::<Vec<_>>(),
        "sum": total, "model_logit_diff": model_diff, "residual_error": parts.residual_error()?,
        "rows": "layer", "row_labels": row_labels, "col_labels": cols, "values": values,
        "semantics": "each part's direct contribution to logit(answer) - logit(wrong) through the final norm with its scale frozen (TransformerLens logit_attrs); parts sum to the logit difference before any soft-capping",
    });
    let (json_path, png_path) = a.figure.paths();
    let title = format!("direct logit attribution to logit({}) - logit({}) (embedding {:+.3})", a.answer, a.wrong, get("embed"));
    let labels = crate::heatmap::Labels { title: &title, x: "component", y: "layer", value: "logit difference", cells: None };
    crate::heatmap::draw(&values, &row_labels, &cols, labels, &png_path)?;
    crate::write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("-> {} and {}", json_path.display(), png_path.display());
    Ok(())
}
