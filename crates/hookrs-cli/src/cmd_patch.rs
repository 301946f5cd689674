//! `hookrs patch`: an activation-patching sweep with the logit-difference metric.
//!
//! For every layer × position (or layer × head) the clean activation is written into the
//! corrupted run; the score is `(ld - ld_corrupted) / (ld_clean - ld_corrupted)` with
//! `ld = logit(answer) - logit(wrong)` at the last position: 1 = the clean behaviour is
//! fully restored, 0 = no effect.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use hook_core::{HookContext, HookIo, TokenGroups};
use hook_torch::{BoxedHook, ExtractionConfig, Intervention, PatchValue};
use tch::Tensor;

use crate::inputs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TorchScript model exported by `cargo xtask export` (with its tokenizer beside it).
    #[arg(long)]
    pub model: PathBuf,
    /// The clean prompt.
    #[arg(long)]
    pub clean: String,
    /// The corrupted prompt (same number of tokens).
    #[arg(long)]
    pub corrupted: String,
    /// The answer token (one token).
    #[arg(long)]
    pub answer: String,
    /// The wrong-answer token (one token).
    #[arg(long)]
    pub wrong: String,
    /// What to patch: layers × positions of resid_out, attn_out or mlp_out, or layers × heads.
    #[arg(long, default_value = "resid_out", value_parser = ["resid_out", "attn_out", "mlp_out", "heads"])]
    pub component: String,
    /// Tokenize without the special tokens the tokenizer adds by default (its BOS, for
    /// example); by default they are added, as `tokenizer(text)` does in transformers.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run the model in this dtype: `model` (the default: the dtype it was exported in),
    /// float32, bfloat16 or float16. A bfloat16 or float16 export converts to any of them; a
    /// float32 export runs only in float32 (export with --dtype for half precision).
    #[arg(long, value_parser = ["model", "float32", "bfloat16", "float16"], default_value = "model")]
    pub dtype: String,
    /// Draw the picture as SVG (PREFIX.svg) instead of PNG.
    #[arg(long)]
    pub svg: bool,
    /// Output prefix: writes RESULT.json and RESULT.png (or .svg).
    #[arg(long)]
    pub out: PathBuf,
}

pub(crate) fn one_token(tok: &tokenizers::Tokenizer, flag: &str, s: &str) -> Result<i64> {
    let e = inputs::encode(tok, s, false)?;
    if e.ids.len() != 1 {
        bail!("{flag} {s:?} is {} tokens ({:?}): it must be exactly one token", e.ids.len(), e.tokens.unwrap_or_default());
    }
    Ok(e.ids[0])
}

fn logit_diff(logits: &Tensor, answer: i64, wrong: i64) -> f64 {
    let last = logits.get(0).get(-1);
    last.double_value(&[answer]) - last.double_value(&[wrong])
}

pub fn run(a: Args) -> Result<()> {
    let device = inputs::device(&a.device)?;
    let tok = inputs::tokenizer_for(&a.model)?.with_context(|| {
        format!("patch needs the model's tokenizer (looked for {:?})", inputs::tokenizer_candidates(&a.model))
    })?;
    let clean = inputs::encode(&tok, &a.clean, !a.no_special_tokens)?;
    let corrupted = inputs::encode(&tok, &a.corrupted, !a.no_special_tokens)?;
    if clean.ids.len() != corrupted.ids.len() {
        bail!(
            "--clean has {} tokens and --corrupted {}: activation patching needs prompts of one length ({:?} vs {:?})",
            clean.ids.len(),
            corrupted.ids.len(),
            clean.tokens.unwrap_or_default(),
            corrupted.tokens.unwrap_or_default()
        );
    }
    let (answer, wrong) = (one_token(&tok, "--answer", &a.answer)?, one_token(&tok, "--wrong", &a.wrong)?);
    let mut m = inputs::load_model(&a.model, device, &a.dtype)?;
    let d = m.require_description()?.clone();
    let (c_ids, c_mask) = inputs::pad(&[&clean], device);
    let (x_ids, x_mask) = inputs::pad(&[&corrupted], device);
    let s = clean.ids.len();
    let ld_clean = logit_diff(&tch::no_grad(|| m.forward(&c_ids, &c_mask))?, answer, wrong);
    let ld_corrupted = logit_diff(&tch::no_grad(|| m.forward(&x_ids, &x_mask))?, answer, wrong);
    if (ld_clean - ld_corrupted).abs() < 1e-9 {
        bail!("the clean and corrupted prompts give the same logit difference ({ld_clean:.4}): there is nothing to restore");
    }
    let score = |ld: f64| (ld - ld_corrupted) / (ld_clean - ld_corrupted);
    let layers = d.num_hidden_layers;
    let mut values = vec![];
    let (cols, col_labels): (usize, Vec<String>);
    if a.component == "heads" {
        // clean per-head outputs: the input of o_proj
        let slots: Vec<Arc<Mutex<Option<Tensor>>>> = (0..layers).map(|_| Arc::new(Mutex::new(None))).collect();
        let hooks = (0..layers)
            .map(|l| {
                let slot = slots[l].clone();
                let hook: BoxedHook = Box::new(move |_: &HookContext<'_>, io: &HookIo<Tensor>| {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(io.main_tensor()?.copy());
                    Ok(None)
                });
                Ok((d.component("attn_o_proj_input_hook_name", l)?, hook))
            })
            .collect::<Result<Vec<_>>>()?;
        let _ = tch::no_grad(|| m.run_with_hooks(&c_ids, &c_mask, hooks))?;
        let nh = d.num_attention_heads;
        for l in 0..layers {
            let clean_l = slots[l].lock().unwrap_or_else(|e| e.into_inner()).take().context("o_proj did not fire")?;
            let per_head = clean_l.view([1, s as i64, nh as i64, d.head_dim as i64]);
            let mut row = vec![];
            for h in 0..nh {
                let iv = Intervention::QueryKeyValue {
                    component: d.component("attn_o_proj_input_hook_name", l)?,
                    positions: (0..s as i64).collect(),
                    head: h,
                    patch: PatchValue::Values(per_head.select(2, h as i64)),
                };
                row.push(score(logit_diff(&m.run_with_interventions(&x_ids, &x_mask, &[iv])?, answer, wrong)));
            }
            values.push(row);
        }
        cols = nh;
        col_labels = (0..nh).map(|h| format!("H{h}")).collect();
    } else {
        let (template, flag) = match a.component.as_str() {
            "attn_out" => ("attn_out_hook_name", "attn_out"),
            "mlp_out" => ("mlp_out_hook_name", "mlp_out"),
            _ => ("residual_stream_hook_name", "resid_out"),
        };
        let cfg = ExtractionConfig { save_logits: false, ..ExtractionConfig::default().with_flags(&[flag])? };
        let (_, cache) = m.run_with_cache(&c_ids, &c_mask, &TokenGroups::all(s)?, &cfg)?;
        for l in 0..layers {
            let key = format!("{flag}_{l}");
            let clean_l = cache.tensor(&key)?;
            let mut row = vec![];
            for p in 0..s as i64 {
                let iv = Intervention::Resid {
                    component: d.component(template, l)?,
                    positions: vec![p],
                    patch: PatchValue::Values(clean_l.narrow(1, p, 1)),
                };
                row.push(score(logit_diff(&m.run_with_interventions(&x_ids, &x_mask, &[iv])?, answer, wrong)));
            }
            values.push(row);
        }
        cols = s;
        col_labels = clean
            .tokens
            .clone()
            .unwrap_or_default()
            .iter()
            .zip(corrupted.tokens.clone().unwrap_or_default())
            .map(|(c, x)| if *c == x { c.clone() } else { format!("{c}/{x}") })
            .collect();
    }
    let row_labels: Vec<String> = (0..layers).map(|l| format!("L{l}")).collect();
    let json = serde_json::json!({
        "component": a.component, "rows": "layer", "cols": if a.component == "heads" { "head" } else { "position" },
        "row_labels": row_labels, "col_labels": col_labels, "values": values,
        "clean_logit_diff": ld_clean, "corrupted_logit_diff": ld_corrupted,
        "metric": "(ld - ld_corrupted) / (ld_clean - ld_corrupted), ld = logit(answer) - logit(wrong) at the last position",
        "answer": a.answer, "wrong": a.wrong, "clean": a.clean, "corrupted": a.corrupted,
    });
    let base = strip(&a.out);
    let json_path = base.with_extension("json");
    let png_path = base.with_extension(if a.svg { "svg" } else { "png" });
    let title = format!("activation patching of {}: share of the logit difference restored", a.component);
    let x = if a.component == "heads" { "head" } else { "position (clean/corrupted token)" };
    let labels = crate::heatmap::Labels { title: &title, x, y: "layer", value: "restored (clean = 1)", cells: None };
    crate::heatmap::draw(&values, &row_labels, &col_labels, labels, &png_path)?;
    crate::write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("clean logit diff {ld_clean:.4}, corrupted {ld_corrupted:.4}; {layers} layers x {cols} -> {} and {}", json_path.display(), png_path.display());
    Ok(())
}

pub(crate) fn strip(p: &Path) -> PathBuf {
    match p.extension().and_then(|e| e.to_str()) {
        Some("json") | Some("png") | Some("svg") => p.with_extension(""),
        _ => p.to_path_buf(),
    }
}
