//! # hook-extract
//!
//! The extraction pipeline, as a library: prompts in, an easyroutine-style activation cache
//! out, over datasets of any size. The `hookrs extract` command and Python's
//! `hookrs.extract` both call it.
//!
//! - [`job`]: [`ExtractOptions`] (the options, as flags or keywords) and the validated
//!   [`ExtractJob`].
//! - [`source`]: where examples come from ([`Source`]: ids, texts, a text/JSONL/Parquet
//!   file) and the tokenizer; a reader thread streams them ahead of the model.
//! - [`shard`]: one of N contiguous ranges of a dataset ([`Shard`]).
//! - [`batch`]: which examples run together ([`BatchPlan`]), padding, dataset order.
//! - [`sink`]: where caches go ([`CacheSink`]: [`FileSink`], [`ChunkSink`]); `hookrs merge`
//!   writes through them too.
//! - [`progress`]: how far a run is, told to the caller's [`Progress`].
//! - [`run()`]: the batch loop.
//! - [`error`]: [`ExtractError`]: an invalid job, or a failed run.
//!
//! ```no_run
//! let job = hook_extract::ExtractOptions::from_json(
//!     r#"{"model": "llama.pt", "out": "cache.safetensors", "text": ["The capital of France is"], "extract": ["resid_out"]}"#,
//! ).unwrap().validate(|_| None).unwrap();
//! let report = hook_extract::run(job, &mut hook_extract::Silent).unwrap();
//! assert_eq!(report.examples, 1);
//! ```

pub mod batch;
pub mod error;
pub mod job;
pub mod progress;
pub mod run;
pub mod shard;
pub mod sink;
pub mod source;

pub use batch::BatchPlan;
pub use error::{ExtractError, Result};
pub use job::{CacheDevice, ChunkSize, Dtype, ExtractJob, ExtractOptions, IdLists, ModelOptions, Tokens};
pub use progress::{Progress, Silent};
pub use run::{run, run_with, Report};
pub use shard::Shard;
pub use sink::{CacheSink, ChunkSink, FileSink, Part, Room, Stamp, Written};
pub use source::{BadLine, Example, Source};
