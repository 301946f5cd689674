//! `hookrs tokenize`: the token ids (and string tokens) hookrs gives a text, with the model's
//! tokenizer, exactly as `--text` and `--prompts` do in every other command: what a
//! TransformerLens user gets from `to_tokens` / `to_str_tokens`, and what transformers'
//! `tokenizer(text)` gives (special tokens added by default).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

use crate::inputs;

#[derive(Parser, Debug)]
pub struct Args {
    /// A TorchScript model exported by `cargo xtask export` (its tokenizer lies beside it).
    #[arg(long)]
    pub model: PathBuf,
    /// A text to tokenize (repeat for several).
    #[arg(long)]
    pub text: Vec<String>,
    /// A file of texts: one per line, or JSONL / Parquet with --column.
    #[arg(long, conflicts_with = "text")]
    pub prompts: Option<PathBuf>,
    /// The JSONL field or Parquet column holding each text.
    #[arg(long, default_value = "text")]
    pub column: String,
    /// Tokenize without the special tokens the tokenizer adds by default (its BOS, for example).
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Print one JSON object per text ({"ids": [...], "tokens": [...]}) instead of a listing.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let source = inputs::Source::from_flags(&a.text, a.prompts.as_deref(), None, &a.column, hook_extract::BadLine::Stop).map_err(crate::from_extract)?;
    let stream = source.stream(&a.model, 0, !a.no_special_tokens)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for example in stream {
        let e = example?;
        if a.json {
            writeln!(out, "{}", serde_json::json!({"ids": e.ids, "tokens": e.tokens}))?;
        } else {
            let shown: Vec<String> = e.tokens.unwrap_or_default().iter().map(|t| crate::heatmap::readable_token(t)).collect();
            writeln!(out, "{:?}\n  {}", e.ids, shown.join(" | "))?;
        }
    }
    out.flush()?;
    Ok(())
}
