//! # hook-torch
//!
//! Hooks on libtorch TorchScript models, with easyroutine's names and semantics.
//!
//! | module | what it holds |
//! |---|---|
//! | [`module`] | [`HookedModule`]: load + instrument, sites, user hooks, forward |
//! | [`site`] | [`SiteInfo`]: one hookable place (`….input`, `….output`, attention patterns) |
//! | [`description`] | [`ModelDescription`]: the facts and component templates stored by the exporter |
//! | [`catalogue`] | easyroutine's hook functions as ready hooks writing into a shared cache |
//! | [`run`] | [`HookedModule::run`] with a [`RunSpec`]: the one forward pass (a [`Fork`] shares its start among many rows), and its short cuts (`forward`, `run_with_cache`, …) |
//! | [`kv_cache`] | [`KvCache`]: the keys and values of generated text, for [`HookedModule::step`] (generation without recomputing the text) |
//! | [`extract`] | [`ExtractionConfig`] and [`Extraction`]: each config flag's catalogue hook, in easyroutine's order |
//! | `padding` | left padding: each example's offset, positions moved by it |
//! | `reshape` | the shape edits only hookrs makes: a fork of one example into many rows, the positions the unembedding keeps |
//! | [`intervention`] | [`Intervention`]: ablation / patching, and activation patching |
//! | [`error`] | [`TorchError`] |
//! | [`backend`] | libtorch's device backends: loading the CUDA backend when the machine has a GPU |
//! | [`memory`] | the memory guard: live CPU tensors cannot pass a limit (clean error, not the OOM killer) |
//! | [`runtime`] | what a program sets for its whole process at start: the memory guard, the GPU backend |
//! | [`dlpack`] | zero-copy tensor exchange with the Python `torch` in the same process |
//! | [`transfer`] | cache copies from a GPU to host memory on a side stream, beside the next batch |
//! | `script` | the instrumented TorchScript module, owned through the shim (no save/reload) |
//! | `ffi` | the C ABI of the C++ shim (`src/shim/`: one file per job, declared in `hookrs_shim.h`) |
//!
//! How sites are made: see `docs/architecture.md` ("Attaching hooks").

pub mod backend;
pub mod catalogue;
pub mod description;
pub mod dlpack;
pub mod error;
pub mod extract;
mod ffi;
mod script;
pub mod intervention;
pub mod kv_cache;
pub mod memory;
pub mod module;
mod padding;
mod reshape;
pub mod run;
pub mod runtime;
pub mod site;
pub mod transfer;

pub use description::{ModelDescription, StepDescription, WeightLayout};
pub use error::{Result, TorchError};
pub use extract::{AttnHeads, Extraction, ExtractionConfig, LayerHead};
pub use run::{Fork, RunOutput, RunSpec};
pub use intervention::{Intervention, PatchValue};
pub use kv_cache::KvCache;
pub use module::{BoxedHook, HookHandle, HookedModule};
pub use site::{SiteInfo, SiteKind};
