//! The job: [`ExtractOptions`] as a user writes them (the `hookrs extract` flags, or the
//! keywords of Python's `hookrs.extract`: one list of options for both), and the
//! [`ExtractJob`] they validate into.

use std::path::PathBuf;

use hook_core::TokenGroups;
use hook_torch::ExtractionConfig;
use serde::{Deserialize, Serialize};

use crate::batch::BatchPlan;
use crate::shard::Shard;
use crate::source::{BadLine, Source};
use crate::{ExtractError, Result};

/// The dtype a model runs in, or a cache is stored in: `model` is the dtype the model was
/// exported in (for a cache, the model's own dtype).
///
/// ```
/// use hook_extract::Dtype;
/// assert_eq!(Dtype::Bfloat16.kind(), Some(tch::Kind::BFloat16));
/// assert_eq!(Dtype::Model.kind(), None);
/// assert_eq!(serde_json::from_str::<Dtype>("\"float16\"").unwrap(), Dtype::Float16);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    // (no doc comments on the variants: `--help` lists their names on one line)
    #[default]
    #[allow(missing_docs)]
    Model,
    #[allow(missing_docs)]
    Float32,
    #[allow(missing_docs)]
    Bfloat16,
    #[allow(missing_docs)]
    Float16,
}

impl Dtype {
    /// The tensor kind, or `None` for [`Dtype::Model`].
    pub fn kind(self) -> Option<tch::Kind> {
        match self {
            Dtype::Model => None,
            Dtype::Float32 => Some(tch::Kind::Float),
            Dtype::Bfloat16 => Some(tch::Kind::BFloat16),
            Dtype::Float16 => Some(tch::Kind::Half),
        }
    }

    /// The name (`float16`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Model => "model",
            Dtype::Float32 => "float32",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float16 => "float16",
        }
    }
}

/// Which token positions are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Tokens {
    /// The last token of each prompt.
    Last,
    /// Every token; prompts of mixed length are right-padded with zeros, their lengths in
    /// `token_lengths`.
    All,
}

/// Where the cache is gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum CacheDevice {
    /// Host memory (with a GPU model, each batch is copied while the next one runs).
    #[default]
    Cpu,
    /// The model's device.
    Model,
}

/// `chunk_size`: examples per chunk, or bytes per chunk.
///
/// ```
/// use hook_extract::ChunkSize;
/// assert_eq!("256MiB".parse::<ChunkSize>().unwrap(), ChunkSize::Bytes(256 << 20));
/// assert_eq!("1000".parse::<ChunkSize>().unwrap(), ChunkSize::Examples(1000));
/// assert_eq!(ChunkSize::Bytes(256 << 20).to_string(), "256MiB");
/// assert!("12 parsecs".parse::<ChunkSize>().unwrap_err().to_string().contains("unknown unit"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSize {
    /// This many examples.
    Examples(u64),
    /// About this many bytes (the examples per chunk are fixed from the first batch).
    Bytes(u64),
}

impl Default for ChunkSize {
    fn default() -> Self {
        ChunkSize::Bytes(256 << 20)
    }
}

impl std::str::FromStr for ChunkSize {
    type Err = ExtractError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |m: String| ExtractError::Invalid(m);
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad(format!("--chunk-size {s:?}: expected a number of examples (e.g. 1000) or a size (e.g. 256MiB)")))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" => return if n == 0 { Err(bad("--chunk-size must be at least 1 example".into())) } else { Ok(ChunkSize::Examples(n)) },
            "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => return Err(bad(format!("--chunk-size {s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"))),
        };
        let bytes = n.checked_mul(mult).filter(|&b| b > 0).ok_or_else(|| bad(format!("--chunk-size {s:?}: must be between 1 byte and 2^64")))?;
        Ok(ChunkSize::Bytes(bytes))
    }
}

impl std::fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ChunkSize::Examples(n) => write!(f, "{n}"),
            ChunkSize::Bytes(b) => match [(30, "GiB"), (20, "MiB"), (10, "KiB")].into_iter().find(|&(s, _)| b % (1 << s) == 0) {
                Some((s, unit)) => write!(f, "{}{unit}", b >> s),
                None => write!(f, "{b}B"),
            },
        }
    }
}

impl Serialize for ChunkSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ChunkSize {
    /// A size (`"256MiB"`) or a number of examples (`1000` or `"1000"`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(0) => Err(serde::de::Error::custom("chunk_size must be at least 1 example")),
            Raw::N(n) => Ok(ChunkSize::Examples(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Token ids, one list per example (`[[1,5,9],[3,4]]`; unequal lengths are left-padded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdLists(pub Vec<Vec<i64>>);

impl std::str::FromStr for IdLists {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        serde_json::from_str(s).map(IdLists).map_err(|e| format!("not a JSON list of lists of token ids: {e} (e.g. '[[1,5,9],[3,4]]')"))
    }
}

/// Token groups as a list of lists, or as text (`"[[0,1],[-1]]"`, `"[(0,1),(-1,)]"`).
fn token_groups_either<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<TokenGroups>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Lists(Vec<Vec<i64>>),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Text(s)) => s.parse::<TokenGroups>().map(Some).map_err(|e| serde::de::Error::custom(format!("token_groups: {e}"))),
        Some(Raw::Lists(l)) => TokenGroups::try_from(l).map(Some).map_err(|e| serde::de::Error::custom(format!("token_groups: {e}"))),
    }
}

#[cfg(feature = "clap")]
fn parse_token_groups(s: &str) -> std::result::Result<TokenGroups, String> {
    s.parse::<TokenGroups>().map_err(|e| e.to_string())
}

/// The model a command runs: its file, device, dtype and how text is tokenized. Every
/// command of `hookrs` that loads a model takes these (`--model`, `--device`, `--dtype`,
/// `--no-special-tokens`).
///
/// ```
/// let m: hook_extract::ModelOptions = serde_json::from_str(r#"{"model": "m.pt", "dtype": "bfloat16"}"#).unwrap();
/// assert_eq!(m.device, "cpu");
/// assert_eq!(m.dtype, hook_extract::Dtype::Bfloat16);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default)]
pub struct ModelOptions {
    /// A TorchScript model exported by `cargo xtask export`.
    #[cfg_attr(feature = "clap", arg(long))]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[cfg_attr(feature = "clap", arg(long, default_value = "cpu"))]
    pub device: String,
    /// Run the model in this dtype: `model` (the default: the dtype it was exported in),
    /// float32, bfloat16 or float16. A bfloat16 or float16 export converts to any of them; a
    /// float32 export runs only in float32 (export with --dtype for half precision).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Dtype::Model))]
    pub dtype: Dtype,
    /// Tokenize without the special tokens the tokenizer adds by default (its BOS, for
    /// example); by default they are added, as `tokenizer(text)` does in transformers.
    /// Pre-tokenized input (token ids) is never changed.
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_special_tokens: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { model: PathBuf::new(), device: "cpu".into(), dtype: Dtype::Model, no_special_tokens: false }
    }
}

impl ModelOptions {
    /// The device, parsed (an unknown name is [`ExtractError::Invalid`]).
    pub fn device(&self) -> Result<tch::Device> {
        hook_torch::backend::parse_device(&self.device).map_err(|_| ExtractError::invalid(format!("--device {:?}: expected cpu, cuda or cuda:N", self.device)))
    }

    /// Loads and instruments the model on its device, in its dtype.
    pub fn load(&self) -> Result<hook_torch::HookedModule> {
        if self.model.as_os_str().is_empty() {
            return Err(ExtractError::invalid("no model given: pass --model FILE.pt (an export of `cargo xtask export`)"));
        }
        let mut m = hook_torch::HookedModule::load(&self.model, self.device()?)?;
        if let Some(kind) = self.dtype.kind() {
            m.to_kind(kind)?;
        }
        Ok(m)
    }
}

/// Every option of an extraction, as written: the `hookrs extract` flags (with the `clap`
/// feature) and the keywords of Python's `hookrs.extract` (through serde, which refuses a
/// name it does not know: [`ExtractOptions::from_json`]). [`ExtractOptions::validate`] turns
/// them into an [`ExtractJob`].
///
/// ```
/// let o = hook_extract::ExtractOptions::from_json(r#"{"model": "m.pt", "out": "c.safetensors", "input_ids": [[1, 2]], "batch_size": 4}"#).unwrap();
/// assert_eq!(o.batch_size, 4);
/// let e = hook_extract::ExtractOptions::from_json(r#"{"model": "m.pt", "batchsize": 4}"#).unwrap_err();
/// assert!(e.to_string().contains("batchsize") && e.to_string().contains("batch_size"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default)]
pub struct ExtractOptions {
    #[cfg_attr(feature = "clap", command(flatten))]
    #[serde(flatten)]
    pub model: ModelOptions,
    /// Prompts: --text "a b" "c d" or --text "a b" --text "c d"; needs the model's tokenizer.
    #[cfg_attr(feature = "clap", arg(long, num_args = 1..))]
    pub text: Vec<String>,
    /// A file with one prompt per line, JSONL, or Parquet (what HF `datasets` exports), whose
    /// --column holds a text or a list of token ids (pre-tokenized). Read as a stream,
    /// tokenized on its own thread.
    #[cfg_attr(feature = "clap", arg(long))]
    pub prompts: Option<PathBuf>,
    /// The JSONL field or Parquet column holding each prompt.
    #[cfg_attr(feature = "clap", arg(long, default_value = "text"))]
    pub column: String,
    /// A line of --prompts that cannot be read: stop with its file:line, or skip it.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = BadLine::Stop))]
    pub on_bad_line: BadLine,
    /// Token ids as JSON, one list per example: '[[1,5,9],[3,4,2]]' (unequal lengths are left-padded).
    #[cfg_attr(feature = "clap", arg(long))]
    pub input_ids: Option<IdLists>,
    /// An ExtractionConfig JSON file with easyroutine's field names.
    #[cfg_attr(feature = "clap", arg(long))]
    pub config: Option<PathBuf>,
    /// What to extract, short form: resid_out,attn_pattern,… (field names without extract_).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    pub extract: Vec<String>,
    /// easyroutine token groups as JSON: '[[0,1],[5]]' (negative positions count from the end).
    #[cfg_attr(feature = "clap", arg(long, conflicts_with = "tokens", value_parser = parse_token_groups))]
    #[serde(deserialize_with = "token_groups_either")]
    pub token_groups: Option<TokenGroups>,
    /// Shorthand for the token groups: last (the default) or all. With all, prompts of mixed
    /// length are stored with their token axes right-padded with zeros and their lengths in
    /// `token_lengths`.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub tokens: Option<Tokens>,
    /// Prompts per forward pass (at most, with --max-batch-tokens).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Cut batches at this many padded tokens (examples x the longest) instead of at
    /// --batch-size examples.
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_batch_tokens: Option<usize>,
    /// Batch prompts in file order instead of grouping them by length (the output is in
    /// dataset order either way).
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_sort: bool,
    /// Where the cache is gathered: cpu (the default; with --device cuda each batch is copied to
    /// pinned host memory while the next batch runs) or the model's device (keeps it on the GPU).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = CacheDevice::Cpu))]
    pub cache_device: CacheDevice,
    /// The dtype of the saved activations: `model` (the default: the model's own dtype, e.g.
    /// bfloat16 for a bfloat16 export), float32, bfloat16 or float16. Integer entries (input
    /// ids) are kept.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Dtype::Model))]
    pub cache_dtype: Dtype,
    /// Process shard K of N (K/N): the K-th of N contiguous ranges of examples, to split a
    /// dataset across processes (`hookrs merge` joins them). `auto` reads a Slurm array
    /// (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT) or a Kubernetes
    /// Indexed Job (JOB_COMPLETION_INDEX, with --shard-count).
    #[cfg_attr(feature = "clap", arg(long))]
    pub shard: Option<String>,
    /// The number of shards for --shard auto under a Kubernetes Indexed Job (its completions).
    #[cfg_attr(feature = "clap", arg(long))]
    pub shard_count: Option<usize>,
    /// Where to write the cache: FILE.safetensors (one file, written at the end) or a
    /// directory (chunks written as they are computed; rerun the same command to resume).
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: PathBuf,
    /// Chunk size with a directory --out: N examples, or a size such as 256MiB (the default).
    #[cfg_attr(feature = "clap", arg(long, default_value = "256MiB", value_parser = |s: &str| s.parse::<ChunkSize>().map_err(|e| e.to_string())))]
    pub chunk_size: ChunkSize,
    /// Run the whole forward pass even when nothing after the last requested site is needed
    /// (by default it stops there; this flag is for comparisons and debugging).
    #[cfg_attr(feature = "clap", arg(long))]
    pub full_forward: bool,
    /// With a directory --out that holds another extraction: delete it and start over.
    #[cfg_attr(feature = "clap", arg(long))]
    pub overwrite: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            model: ModelOptions::default(),
            text: Vec::new(),
            prompts: None,
            column: "text".into(),
            on_bad_line: BadLine::Stop,
            input_ids: None,
            config: None,
            extract: Vec::new(),
            token_groups: None,
            tokens: None,
            batch_size: 8,
            max_batch_tokens: None,
            no_sort: false,
            cache_device: CacheDevice::Cpu,
            cache_dtype: Dtype::Model,
            shard: None,
            shard_count: None,
            out: PathBuf::new(),
            chunk_size: ChunkSize::default(),
            full_forward: false,
            overwrite: false,
        }
    }
}

impl ExtractOptions {
    /// Options from a JSON object of option names (Python's keywords); a name that is not an
    /// option is [`ExtractError::Invalid`], naming the options there are.
    pub fn from_json(json: &str) -> Result<Self> {
        let given: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|e| ExtractError::invalid(format!("the options are not a JSON object: {e}")))?;
        let known = match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(o)) => o.keys().cloned().collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        if let Some(bad) = given.keys().find(|k| !known.contains(k)) {
            let near = hook_core::suggest::closest(bad, known.iter().map(String::as_str), 1);
            let hint = near.first().map(|n| format!(" (did you mean {n:?}?)")).unwrap_or_default();
            return Err(ExtractError::invalid(format!("unknown option {bad:?}{hint}; the options are {}", known.join(", "))));
        }
        serde_json::from_value(serde_json::Value::Object(given)).map_err(|e| ExtractError::invalid(format!("bad option: {e}")))
    }

    /// Checks the options and reads what they name (the `--config` file, the shard from the
    /// environment `env`): the job to run. Nothing is loaded or written yet.
    pub fn validate(&self, env: impl Fn(&str) -> Option<String>) -> Result<ExtractJob> {
        if self.batch_size == 0 {
            return Err(ExtractError::invalid("--batch-size must be at least 1"));
        }
        if self.max_batch_tokens == Some(0) {
            return Err(ExtractError::invalid("--max-batch-tokens must be at least 1"));
        }
        if self.out.as_os_str().is_empty() {
            return Err(ExtractError::invalid("no output given: pass --out FILE.safetensors (one file) or --out DIR/ (a resumable chunk directory)"));
        }
        self.model.device()?;
        let shard = self.shard.as_deref().map(|s| Shard::parse(s, self.shard_count, &env)).transpose()?;
        // Logits are saved only when asked for (`--extract logits`, or "save_logits": true in
        // --config): without them the forward stops after the last requested site.
        let (config, logits_asked): (ExtractionConfig, bool) = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading --config {}: {e}", p.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", p.display()))?;
                let asked = v.get("save_logits") == Some(&serde_json::Value::Bool(true));
                (serde_json::from_value(v).map_err(|e| anyhow::anyhow!("--config {}: {e}", p.display()))?, asked)
            }
            None => (ExtractionConfig::default(), false),
        };
        let flags: Vec<&str> = self.extract.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
        let logits_asked = logits_asked || flags.iter().any(|f| *f == "logits" || *f == "save_logits");
        let config = ExtractionConfig { save_logits: logits_asked, ..config }.with_flags(&flags).map_err(|e| ExtractError::invalid(format!("--extract: {e}")))?;
        let source = Source::from_flags(&self.text, self.prompts.as_deref(), self.input_ids.as_ref().map(|i| i.0.as_slice()), &self.column, self.on_bad_line)?;
        let groups = match (&self.token_groups, self.tokens) {
            (Some(_), Some(_)) => return Err(ExtractError::invalid("give --token-groups or --tokens, not both")),
            (Some(g), None) => Some(g.clone()),
            (None, Some(Tokens::All)) => None,
            (None, _) => Some(TokenGroups::last()),
        };
        Ok(ExtractJob {
            model: self.model.clone(),
            source,
            config,
            groups,
            plan: BatchPlan { batch_size: self.batch_size, max_batch_tokens: self.max_batch_tokens, sort: !self.no_sort },
            special_tokens: !self.model.no_special_tokens,
            cache_device: self.cache_device,
            cache_dtype: self.cache_dtype,
            shard,
            out: self.out.clone(),
            chunk_size: self.chunk_size,
            full_forward: self.full_forward,
            overwrite: self.overwrite,
        })
    }
}

/// A validated extraction: what to run, over which examples, into which output.
/// [`crate::run`] runs it.
pub struct ExtractJob {
    /// The model, its device and dtype.
    pub model: ModelOptions,
    /// The examples.
    pub source: Source,
    /// What to extract (easyroutine's `ExtractionConfig`).
    pub config: ExtractionConfig,
    /// The token positions kept; `None`: every token.
    pub groups: Option<TokenGroups>,
    /// How examples are grouped into forward passes.
    pub plan: BatchPlan,
    /// Add the tokenizer's special tokens.
    pub special_tokens: bool,
    /// Where the cache is gathered.
    pub cache_device: CacheDevice,
    /// The dtype of the saved activations.
    pub cache_dtype: Dtype,
    /// This process's share of the examples.
    pub shard: Option<Shard>,
    /// A `.safetensors` file, or a chunk directory.
    pub out: PathBuf,
    /// Chunk size, for a chunk directory.
    pub chunk_size: ChunkSize,
    /// Run the forward to the end even when the logits are not needed.
    pub full_forward: bool,
    /// Replace another extraction in the chunk directory.
    pub overwrite: bool,
}

impl ExtractJob {
    /// Whether the output is one file (rather than a chunk directory): `--out` ends in
    /// `.safetensors` and is not a directory.
    pub fn single_file(&self) -> bool {
        self.out.extension().is_some_and(|e| e == "safetensors") && !self.out.is_dir()
    }

    /// The settings that decide the output's content, as one flat JSON object (a refused
    /// resume names the fields that differ).
    pub fn settings_fingerprint(&self) -> Result<String> {
        let mut v = serde_json::to_value(&self.config).map_err(anyhow::Error::from)?;
        let o = v.as_object_mut().expect("the config is an object");
        o.retain(|_, x| x != &serde_json::Value::Bool(false) && !x.is_null());
        o.insert("token_groups".into(), self.groups.as_ref().map(|g| g.to_string()).unwrap_or_else(|| "all".into()).into());
        o.insert("batch_size".into(), self.plan.batch_size.into());
        o.insert("chunk_size".into(), self.chunk_size.to_string().into());
        o.insert("sort".into(), self.plan.sort.into());
        o.insert("special_tokens".into(), self.special_tokens.into());
        if let Some(t) = self.plan.max_batch_tokens {
            o.insert("max_batch_tokens".into(), t.into());
        }
        if self.cache_dtype != Dtype::Model {
            o.insert("cache_dtype".into(), self.cache_dtype.name().into());
        }
        if let Some(sh) = self.shard {
            o.insert("shard".into(), format!("{}/{}", sh.index, sh.count).into());
        }
        Ok(serde_json::to_string(&v).map_err(anyhow::Error::from)?)
    }
}
