//! Function-level parity with easyroutine (run by `cargo xtask parity ops`).
//!
//! Reads the cases written by `xtask/python/parity_ops.py` (inputs, options, expected outputs
//! and, for explained deviations, easyroutine's own outputs), runs the hook-ops function of
//! each case on the same tensors, and compares key sets, shapes and values within
//! [`RTOL`]. Prints the table and, with `--write FILE`, puts it in FILE's `ops` section.
//!
//! Usage: `parity_ops CASE_DIR [--write docs/parity.md]`

use std::collections::HashMap;
use std::process::ExitCode;

use hook_core::{HeadSelection, TokenGroups};
use hook_ops::heads::{self, Projected};
use hook_ops::pattern::{self, RunningPatternAverage};
use hook_ops::{intervene, resid, stats, HeadLayout, Keyed, Patch, PatternAvg};
use hook_parity::{exit_code, publish, Args, Tally, Tol, Verdict};
use indexmap::IndexMap;
use serde_json::Value as Json;
use tch::Tensor;

/// The one tolerance of function-level parity: float32 values must agree to 1e-6 of the entry's
/// largest magnitude, or of 1 when that is smaller.
const RTOL: f64 = 1e-6;

type Outputs = IndexMap<String, Tensor>;

struct Case<'a> {
    opts: &'a Json,
    inputs: HashMap<String, &'a Tensor>,
}

impl Case<'_> {
    fn t(&self, name: &str) -> anyhow::Result<&Tensor> {
        self.inputs.get(name).copied().ok_or_else(|| anyhow::anyhow!("case has no input `{name}`"))
    }
    fn opt_t(&self, name: &str) -> Option<&Tensor> {
        self.inputs.get(name).copied()
    }
    fn i(&self, k: &str) -> anyhow::Result<i64> {
        self.opts[k].as_i64().ok_or_else(|| anyhow::anyhow!("option `{k}` is not an integer"))
    }
    fn b(&self, k: &str) -> anyhow::Result<bool> {
        self.opts[k].as_bool().ok_or_else(|| anyhow::anyhow!("option `{k}` is not a bool"))
    }
    fn f(&self, k: &str) -> anyhow::Result<f64> {
        self.opts[k].as_f64().ok_or_else(|| anyhow::anyhow!("option `{k}` is not a number"))
    }
    fn s(&self, k: &str) -> anyhow::Result<&str> {
        self.opts[k].as_str().ok_or_else(|| anyhow::anyhow!("option `{k}` is not a string"))
    }
    fn groups(&self, k: &str) -> anyhow::Result<TokenGroups> {
        Ok(serde_json::from_value(self.opts[k].clone())?)
    }
    fn positions(&self, k: &str) -> anyhow::Result<Vec<i64>> {
        Ok(serde_json::from_value(self.opts[k].clone())?)
    }
    fn head(&self) -> anyhow::Result<HeadSelection> {
        Ok(serde_json::from_value(self.opts["head"].clone())?)
    }
    fn layout(&self) -> anyhow::Result<HeadLayout> {
        Ok(HeadLayout::new(self.i("num_heads")?, self.i("num_kv_heads")?, self.i("head_dim")?)?)
    }
}

fn keyed(v: Vec<Keyed>) -> Outputs {
    v.into_iter().map(|k| (k.key, k.value)).collect()
}

fn one(key: &str, t: Tensor) -> Outputs {
    IndexMap::from([(key.to_string(), t)])
}

fn run(fn_name: &str, c: &Case) -> anyhow::Result<Outputs> {
    Ok(match fn_name {
        "compute_statistics" => {
            let s = stats::compute_statistics(c.t("x")?, c.i("dim")?, c.b("keepdim")?)?;
            s.into_named().into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        }
        "layernorm" => {
            let avg = c.b("avg")?;
            let all = stats::layernorm_statistics(c.t("b")?, &c.groups("token_indexes")?, avg)?;
            let mut out = Outputs::new();
            for (i, s) in all.into_iter().enumerate() {
                for (k, v) in s.into_named() {
                    let key = if avg { format!("ln/{i}/{k}") } else { format!("ln/{k}") };
                    out.insert(key, v);
                }
            }
            out
        }
        "resid" => one(c.s("key")?, resid::resid(c.t("b")?, &c.groups("token_indexes")?, c.b("avg")?)?),
        "embed" => resid::embed_slices(c.t("b")?, &c.groups("token_indexes")?)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("embed/{i}"), t))
            .collect(),
        "avg_hook" => one(
            "avg_x",
            resid::image_text_all_means(c.t("b")?, c.i("last_image_idx")? as usize, c.i("end_image_idx")? as usize)?,
        ),
        "repeat_kv" => one("out", heads::repeat_kv(c.t("x")?, c.i("n_rep")?)?),
        "query_key_value" => keyed(heads::query_key_value(
            c.t("b")?,
            c.s("prefix")?,
            c.i("layer")? as usize,
            &c.layout()?,
            &c.groups("token_indexes")?,
            c.head()?,
            c.b("avg")?,
        )?),
        "head_out" => {
            let nh = c.i("num_heads")?;
            keyed(heads::head_out(
                c.t("b")?,
                "head_out_",
                c.i("layer")? as usize,
                &HeadLayout::new(nh, nh, c.i("head_dim")?)?,
                c.t("w")?,
                c.opt_t("bias"),
                &c.groups("token_indexes")?,
                c.head()?,
                c.b("avg")?,
            )?)
        }
        "projected" => {
            let which = match c.s("which")? {
                "value" => Projected::Value,
                "key" => Projected::Key,
                _ => Projected::Query,
            };
            keyed(heads::projected_vectors(
                c.t("b")?,
                which,
                c.i("layer")? as usize,
                &c.layout()?,
                c.t("w")?,
                c.opt_t("bias"),
                &c.groups("token_indexes")?,
                c.head()?,
                c.b("avg")?,
            )?)
        }
        "attention_pattern" => {
            let rows: Option<TokenGroups> = serde_json::from_value(c.opts["rows"].clone())?;
            keyed(pattern::attention_pattern(
                c.t("p")?,
                c.i("layer")? as usize,
                &c.groups("token_indexes")?,
                rows.as_ref(),
                c.head()?,
                c.s("attn_pattern_avg")?.parse::<PatternAvg>()?,
            )?)
        }
        "avg_attention_pattern" => {
            let mut state = RunningPatternAverage::new();
            let g = c.groups("token_indexes")?;
            let with_values = c.b("extract_avg_value")?;
            for bi in 0..c.i("batches")? {
                let values: Vec<Tensor> = if with_values {
                    (0..c.i("heads")?).map(|h| c.t(&format!("v{bi}_{h}")).map(|t| t.shallow_clone())).collect::<anyhow::Result<_>>()?
                } else {
                    vec![]
                };
                state.update_pattern(c.t(&format!("p{bi}"))?, c.i("layer")? as usize, &g, bi as usize, with_values.then_some(&values[..]))?;
            }
            state.into_entries()
        }
        "intervene_resid" => {
            let patch = c.opt_t("values").map(Patch::Values).unwrap_or(Patch::Ablation);
            one("out", intervene::resid(c.t("b")?, &c.positions("token_indexes")?, patch)?)
        }
        "intervene_qkv" => {
            let patch = c.opt_t("values").map(Patch::Values).unwrap_or(Patch::Ablation);
            one(
                "out",
                intervene::query_key_value(c.t("b")?, &c.layout()?, &c.positions("token_indexes")?, HeadSelection::One(c.i("head")? as usize), patch)?,
            )
        }
        "intervene_attn" => {
            let patch = c.opt_t("values").map(Patch::Values).unwrap_or(Patch::Ablation);
            one(
                "out",
                intervene::attention_matrix(
                    c.t("p")?,
                    &c.positions("q_positions")?,
                    &c.positions("k_positions")?,
                    c.i("head")? as usize,
                    c.f("multiplication_value")?,
                    patch,
                    c.b("apply_softmax")?,
                )?,
            )
        }
        "intervene_heads" => {
            let heads: Vec<usize> = serde_json::from_value(c.opts["heads"].clone())?;
            one("out", intervene::zero_heads(c.t("p")?, &heads)?)
        }
        "ablate_rows_keep_last" => {
            let pairs: Vec<(usize, i64)> = serde_json::from_value(c.opts["pairs"].clone())?;
            one("out", intervene::ablate_rows_keep_last(c.t("p")?, &pairs)?)
        }
        other => anyhow::bail!("no Rust function for `{other}`"),
    })
}

/// Compares `got` with `want` (keys in order, shapes, values within [`RTOL`]).
fn compare(got: &Outputs, want: &IndexMap<String, &Tensor>) -> (f64, Option<String>) {
    let want: Outputs = want.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    hook_parity::compare(got, &want, Tol { limit: RTOL, floor: 1.0 })
}

fn main() -> ExitCode {
    exit_code("ops", real_main())
}

fn real_main() -> anyhow::Result<bool> {
    let Args { dir, write, section } = Args::from_env("ops")?;
    let manifest: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("cases.safetensors"))?.into_iter().collect();
    let get = |n: &Json| -> anyhow::Result<&Tensor> {
        let n = n.as_str().ok_or_else(|| anyhow::anyhow!("tensor name is not a string"))?;
        tensors.get(n).ok_or_else(|| anyhow::anyhow!("missing tensor {n}"))
    };
    let cases = manifest["cases"].as_array().ok_or_else(|| anyhow::anyhow!("cases.json has no `cases` list"))?;
    let mut rows = Vec::new();
    let mut tally = Tally::default();
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let fn_name = case["fn"].as_str().unwrap_or("?");
        let inputs = case["inputs"].as_object().into_iter().flatten().map(|(k, v)| Ok((k.clone(), get(v)?))).collect::<anyhow::Result<HashMap<_, _>>>()?;
        let expected = case["expected"].as_object().into_iter().flatten().map(|(k, v)| Ok((k.clone(), get(v)?))).collect::<anyhow::Result<IndexMap<_, _>>>()?;
        let c = Case { opts: &case["opts"], inputs };
        let deviation = case["deviation"].as_str();
        let (diff, verdict) = match run(fn_name, &c) {
            Err(e) => (f64::NAN, Verdict::Fail(e.to_string())),
            Ok(got) => match compare(&got, &expected) {
                (d, Some(why)) => (d, Verdict::Fail(why)),
                (d, None) => match deviation {
                    None => (d, Verdict::Pass),
                    Some(_) => {
                        let er = case["easyroutine"].as_object().into_iter().flatten().map(|(k, v)| Ok((k.clone(), get(v)?))).collect::<anyhow::Result<IndexMap<_, _>>>()?;
                        let (erd, _) = compare(&got, &er);
                        let vs = if erd.is_nan() { "different keys/shapes".to_string() } else { format!("{erd:.2e}") };
                        (d, Verdict::Explained(format!("easyroutine differs: {vs}")))
                    }
                },
            },
        };
        tally.count(&verdict);
        rows.push((name.to_string(), fn_name.to_string(), opts_summary(&case["opts"]), diff, verdict, deviation.map(str::to_string)));
    }
    let table = render(&rows, tally);
    publish(write.as_deref(), &section, &table)?;
    println!("parity ops: {tally} (within {RTOL:e} of max(|value|, 1))");
    Ok(tally.ok())
}

fn opts_summary(opts: &Json) -> String {
    let Some(o) = opts.as_object() else { return String::new() };
    o.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "layer" | "key" | "prefix"))
        .map(|(k, v)| format!("{k}={}", v.to_string().replace('"', "")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn render(rows: &[(String, String, String, f64, Verdict, Option<String>)], tally: Tally) -> String {
    let Tally { pass, explained, fail } = tally;
    let mut s = String::new();
    s.push_str(&format!(
        "Function-level parity: each function of easyroutine 1.1.5's hooks.py called directly on the same tensors as the hook-ops function. \
         Tolerance: max abs diff <= {RTOL:e} of max(|value|, 1). {pass} pass, {explained} explained deviations, {fail} fail.\n\n"
    ));
    let mut reasons: Vec<&String> = rows.iter().filter_map(|r| r.5.as_ref()).collect();
    reasons.sort();
    reasons.dedup();
    if !reasons.is_empty() {
        s.push_str("Explained deviations (hookrs is compared with the documented behaviour, computed independently in the Python harness):\n\n");
        for r in reasons {
            s.push_str(&format!("- {r}\n"));
        }
        s.push('\n');
    }
    s.push_str("| case | function | options | max abs diff | result |\n|---|---|---|---|---|\n");
    for (name, f, opts, d, verdict, _) in rows {
        let ds = if d.is_nan() { "-".to_string() } else { format!("{d:.1e}") };
        s.push_str(&format!("| {name} | {f} | {opts} | {ds} | {verdict} |\n"));
    }
    s
}

