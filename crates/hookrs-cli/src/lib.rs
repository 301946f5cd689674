//! # hookrs-cli
//!
//! The `hookrs` command (`src/main.rs` is its binary): extraction, activation patching and
//! pictures from the shell. Each command is a thin layer over a library (hook-extract,
//! hook-analysis, hook-cache); as a library, [`run`] runs one command line in-process.
//!
//! | item | what it holds |
//! |---|---|
//! | [`Cli`], [`Command`] | the command line (clap) |
//! | [`run`] | one command line, run |
//! | [`Failure`], [`Usage`] | how a command fails, and its exit code |
//! | `inputs` | the flags the model commands share: `ModelOptions`, `PromptArgs`, `FigureArgs` |
//! | `answers` | answer / wrong tokens and their metric |
//! | `heatmap`, `cmd_view` | pictures: SVG heatmaps, the attention viewer |
//! | `cmd_sites`, `cmd_devices`, `cmd_tokenize`, `cmd_inspect` | looking at a model, a machine, a cache |
//! | `cmd_extract`, `cmd_merge` | extraction and merges (through hook-extract) |
//! | `cmd_lens`, `cmd_attribute`, `cmd_patch`, `cmd_ablate`, `cmd_generate` | analysis (through hook-analysis) |
//! | `cmd_plot` | figures of a saved cache |
//!
//! Exit codes: 0 ok, 2 usage (clap's errors and flag values that do not parse: [`Usage`]),
//! 1 runtime error. Nothing is written under `--out` unless the command succeeded (writes go
//! to a temporary file renamed at the end).

mod answers;
mod heatmap;
mod inputs;
mod cmd_ablate;
mod cmd_devices;
mod cmd_extract;
mod cmd_attribute;
mod cmd_generate;
mod cmd_inspect;
mod cmd_lens;
mod cmd_merge;
mod cmd_patch;
mod cmd_plot;
mod cmd_sites;
mod cmd_tokenize;
mod cmd_view;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Interpretability hooks for TorchScript transformers: read and edit activations, from the shell.
#[derive(Parser, Debug)]
#[command(name = "hookrs", version, about, long_about = None, after_help = "Exit codes: 0 ok; 1 runtime error (the model, the data or a file said no); 2 usage error (a missing or unknown flag, or a flag value that does not parse: bad JSON in --input-ids or --token-groups, a bad --shard, --chunk-size, --device or --extract name).")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Every hookable component, grouped by layer, with the model description.
    Sites {
        /// A TorchScript model exported by `cargo xtask export`.
        model: PathBuf,
        /// Print JSON instead of a listing.
        #[arg(long)]
        json: bool,
    },
    /// The devices this build can run on (CPU, CUDA backend and GPUs), and why not when it cannot.
    Devices {
        /// Print JSON instead of a listing.
        #[arg(long)]
        json: bool,
    },
    /// Run prompts through a model and save the activations (easyroutine cache keys).
    Extract(cmd_extract::Args),
    /// Keys, shapes, dtypes, info strings, metadata and memory of a saved cache.
    Inspect {
        /// A cache file or chunk directory written by `hookrs extract` or hook-cache.
        cache: PathBuf,
    },
    /// Merge shard caches (from `extract --shard K/N`) in dataset order, or chunk directories
    /// (from `extract --out DIR`) one after another, into one file.
    Merge {
        /// The merged cache to write.
        out: PathBuf,
        /// The shard caches, or chunk directories.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// The logit lens of one prompt: per layer and position, the top token and its probability
    /// (or --answer/--wrong's logit difference), as a heatmap PNG and JSON.
    Lens(cmd_lens::Args),
    /// Direct logit attribution of one prompt: what the embedding, each layer's attention (or
    /// head) and MLP add to logit(answer) - logit(wrong), through the frozen final norm.
    Attribute(cmd_attribute::Args),
    /// Continue a prompt (greedy or sampled), optionally steered by a vector added to a layer's
    /// residual stream at every generated position.
    Generate(cmd_generate::Args),
    /// Activation patching sweep over a clean/corrupted pair or a JSONL dataset of pairs, scored
    /// by the answer's log-probability over the wrong answer's (clean = 1, corrupted = 0).
    Patch(cmd_patch::Args),
    /// Zero or mean ablation of each layer's attention, MLP, whole layer or each head, over a
    /// prompt or a JSONL dataset, scored like patch (the change of the metric).
    Ablate(cmd_ablate::Args),
    /// The attention patterns of one example as one self-contained HTML page (no network):
    /// heads of each layer as thumbnails, a pattern grid with hover, tokens coloured by attention.
    View(cmd_view::Args),
    /// The token ids (and string tokens) of texts, with the model's tokenizer, as --text and
    /// --prompts give them to every other command.
    Tokenize(cmd_tokenize::Args),
    /// A heatmap of one cache entry (e.g. an attention pattern), with token labels when known.
    Plot {
        /// The cache file or chunk directory.
        cache: PathBuf,
        /// The key to draw, e.g. pattern_L0H1.
        #[arg(long)]
        key: String,
        /// Which example of the batch.
        #[arg(long, default_value_t = 0)]
        example: i64,
        /// The picture to write: PNG, or SVG when the name ends in .svg.
        #[arg(long)]
        out: PathBuf,
    },
}

/// A failed command: its exit code (2 usage, 1 runtime) and message.
#[derive(Debug)]
pub struct Failure {
    /// 2 for a usage error, 1 for a runtime error.
    pub code: u8,
    /// What went wrong, as the binary prints it after `hookrs: error: ` (clap's own text for
    /// its usage errors, and for `--help` / `--version`, with code 0).
    pub message: String,
    /// clap's error, when clap refused the command line (or answered `--help`).
    pub clap: Option<clap::Error>,
}

/// Runs one command line (`["hookrs", "extract", "--model", ...]`: the first item is the
/// program name) in this process.
///
/// ```
/// let f = hookrs_cli::run(["hookrs", "extract", "--out", "x.safetensors"]).unwrap_err();
/// assert_eq!(f.code, 2);
/// assert!(f.message.contains("--model"));
/// ```
pub fn run<I, T>(args: I) -> Result<(), Failure>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(|e| Failure { code: e.exit_code() as u8, message: e.render().to_string(), clap: Some(e) })?;
    let result = match cli.command {
        Command::Sites { model, json } => cmd_sites::run(&model, json),
        Command::Devices { json } => cmd_devices::run(json),
        Command::Extract(a) => cmd_extract::run(a),
        Command::Inspect { cache } => cmd_inspect::run(&cache),
        Command::Merge { out, inputs } => cmd_merge::run(&out, &inputs),
        Command::Patch(a) => cmd_patch::run(a),
        Command::Ablate(a) => cmd_ablate::run(a),
        Command::Lens(a) => cmd_lens::run(a),
        Command::Attribute(a) => cmd_attribute::run(a),
        Command::Generate(a) => cmd_generate::run(a),
        Command::View(a) => cmd_view::run(a),
        Command::Tokenize(a) => cmd_tokenize::run(a),
        Command::Plot { cache, key, example, out } => cmd_plot::run(&cache, &key, example, &out),
    };
    result.map_err(|e| Failure { code: exit_code(&e), message: describe(&e), clap: None })
}

/// An error and its causes, joined by `: `, leaving out a cause whose text the message before
/// it already holds (errors that print their source, such as an I/O error with its path).
///
/// ```ignore
/// let io = std::io::Error::new(std::io::ErrorKind::Other, "Not a directory");
/// let e = anyhow::Error::new(io).context("out/x: Not a directory");
/// assert_eq!(describe(&e), "out/x: Not a directory");
/// ```
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A malformed command line that clap itself cannot see: a flag's value that does not parse
/// (bad JSON in --input-ids or --token-groups, a bad --shard, --chunk-size or --device, an
/// unknown --extract name) or flags that do not go together. Exits 2, like clap's own usage
/// errors; every other failure exits 1.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `usage!("--shard {s}: ...")`: an [`anyhow::Error`] that exits 2.
#[macro_export]
#[doc(hidden)]
macro_rules! usage {
    ($($t:tt)*) => { anyhow::Error::new($crate::Usage(format!($($t)*))) };
}

/// The exit code of a failed command: 2 for a usage error, 1 otherwise.
#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_not_repeated() {
        let io = std::io::Error::other("Not a directory (os error 20)");
        let e = anyhow::Error::new(io).context("out/x: Not a directory (os error 20)").context("merging");
        assert_eq!(super::describe(&e), "merging: out/x: Not a directory (os error 20)");
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Usage>()) {
        2
    } else {
        1
    }
}

/// A hook-extract error as the CLI reports it: an invalid job is a usage error (exit 2).
pub(crate) fn from_extract(e: hook_extract::ExtractError) -> anyhow::Error {
    match e {
        hook_extract::ExtractError::Invalid(m) => anyhow::Error::new(Usage(m)),
        hook_extract::ExtractError::Failed(e) => e,
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder (atomic rename).
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}
