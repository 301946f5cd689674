//! `hookrs ablate`: zero or mean ablation of each layer's attention, MLP, whole layer or each
//! head, over one prompt or a dataset, scored like `patch` (hook_analysis::patching).

use std::path::PathBuf;

use anyhow::{Context, Result};
use hook_analysis::patching::{ablate_sweep, Ablation, Part, Prompt};
use serde_json::Value;

use crate::{answers, inputs};

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["text", "input_ids", "prompts"]))]
pub struct Args {
    #[command(flatten)]
    pub model: inputs::ModelOptions,
    #[command(flatten)]
    pub prompt: inputs::PromptArgs,
    /// A JSONL file of prompts, one per line: {"text": … (or "ids": [...]), "answer": …, "wrong": …}
    /// (answer and wrong default to --answer/--wrong). Results are averaged over the prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The answer: one token or several (then the metric sums their log-probabilities).
    #[arg(long)]
    pub answer: Option<String>,
    /// The wrong answer: one token or several.
    #[arg(long)]
    pub wrong: Option<String>,
    /// What to ablate in each layer, one column each (heads: one column per head).
    #[arg(long, value_delimiter = ',', default_value = "attn_out,mlp_out", value_parser = ["attn_out", "mlp_out", "layer", "heads"])]
    pub component: Vec<String>,
    /// zero: replace by zeros; mean: by the activation's mean over every token of the prompts.
    #[arg(long, default_value = "zero", value_parser = ["zero", "mean"])]
    pub mode: String,
    /// Which positions are ablated (all at once): all, last, or a list such as 0,3,-1.
    #[arg(long, default_value = "all")]
    pub positions: String,
    #[command(flatten)]
    pub sweep: inputs::SweepArgs,
    #[command(flatten)]
    pub figure: inputs::FigureArgs,
}

fn read_prompts(a: &Args, tok: Option<&tokenizers::Tokenizer>) -> Result<Vec<Prompt>> {
    let special = !a.model.no_special_tokens;
    let answer = |obj: Option<&Value>, flag: &str, given: &Option<String>, at: &str| answers::answer_ids(tok, obj, given, flag, at, a.prompts.is_some(), "ablate");
    if let Some(path) = &a.prompts {
        return answers::jsonl(path)?
            .into_iter()
            .map(|(line, o)| {
                let at = format!("{}:{line}: ", path.display());
                let prompt = o.get("text").or_else(|| o.get("ids")).with_context(|| format!("{at}no \"text\" or \"ids\" (each line: {{\"text\": …, \"answer\": …, \"wrong\": …}})"))?;
                let ids = answers::tokens_of(tok, prompt, special, &format!("{at}prompt"))?.ids;
                Ok(Prompt { ids, answer: answer(o.get("answer"), "--answer", &a.answer, &at)?, wrong: answer(o.get("wrong"), "--wrong", &a.wrong, &at)? })
            })
            .collect();
    }
    let ids = inputs::single_prompt(&a.model, tok, &a.prompt)?.ids;
    Ok(vec![Prompt { ids, answer: answer(None, "--answer", &a.answer, "")?, wrong: answer(None, "--wrong", &a.wrong, "")? }])
}

pub fn run(a: Args) -> Result<()> {
    inputs::device(&a.model)?; // a bad --device is a usage error before anything is read
    let positions = answers::positions(&a.positions)?;
    let tok = inputs::tokenizer_for(&a.model.model)?;
    let prompts = read_prompts(&a, tok.as_ref())?;
    let mut m = inputs::load_model(&a.model)?;
    let parts: Vec<Part> = a
        .component
        .iter()
        .map(|c| match c.as_str() {
            "attn_out" => Part::Attn,
            "mlp_out" => Part::Mlp,
            "layer" => Part::Layer,
            _ => Part::Heads,
        })
        .collect();
    let mode = if a.mode == "mean" { Ablation::Mean } else { Ablation::Zero };
    let started = std::time::Instant::now();
    let grid = ablate_sweep(&mut m, &prompts, &parts, mode, &positions, a.sweep.batching())?;
    let sweep_seconds = started.elapsed().as_secs_f64();
    let one_token = prompts.iter().all(|p| p.answer.len() == 1 && p.wrong.len() == 1);
    let values = grid.score();
    let json = serde_json::json!({
        "sweep_seconds": sweep_seconds,
        "component": a.component, "mode": a.mode, "positions": a.positions,
        "rows": "layer", "cols": "ablated part",
        "row_labels": grid.rows, "col_labels": grid.cols, "values": values, "metric_means": grid.values,
        "clean_metric": grid.clean, "clean_each": grid.clean_each, "prompts": prompts.len(),
        "score": "m_ablated - m_clean, on the metric averaged over the prompts (negative: the part helped the answer)",
        "metric": answers::METRIC,
        "mean": "mode mean: each activation's mean over every token of the prompts (per layer; per head for heads)",
    });
    let (json_path, png_path) = a.figure.paths();
    let over = if prompts.len() > 1 { format!(", mean of {} prompts", prompts.len()) } else { String::new() };
    let name = answers::metric_name(one_token);
    let title = format!("{} ablation: change of the {name} (clean {:.3}){over}", a.mode, grid.clean);
    let labels = crate::heatmap::Labels { title: &title, x: "ablated part", y: "layer", value: "ablated - clean", cells: None };
    crate::heatmap::draw(&values, &grid.rows, &grid.cols, labels, &png_path)?;
    crate::write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("clean {name} {:.4}{over}; {} ablation of {} x {} -> {} and {}", grid.clean, a.mode, grid.rows.len(), grid.cols.len(), json_path.display(), png_path.display());
    Ok(())
}
