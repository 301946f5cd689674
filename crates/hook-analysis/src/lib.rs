//! # hook-analysis
//!
//! Analysis researchers run on an [`ActivationCache`](hook_cache::ActivationCache), on top of
//! hook-cache and hook-torch.
//!
//! | module | what it holds |
//! |---|---|
//! | [`lens`] | [`LogitLens`]: easyroutine's `LogitLens.compute` (logits, logit differences, accuracy of intermediate residuals through the final norm and the unembedding) |
//! | [`attribution`] | [`Decomposition`]: the final residual split into embedding, attention (or heads) and MLP parts; direct logit attribution through the frozen final norm |
//! | [`generate`] | [`generate()`](generate::generate): greedy and sampled decoding of batches of prompts with a KV cache, interventions, steering vectors and an extraction of each new token's activations |
//! | [`patching`] | [`patch_sweep`](patching::patch_sweep) and [`ablate_sweep`](patching::ablate_sweep): activation patching and zero/mean ablation over a prompt or a dataset, scored by the answer's log-probability over the wrong answer's (multi-token answers included) |
//! | [`norm`] | [`FinalNorm`]: the model's final norm applied with statistics cached at extraction (`last_layernorm`) |
//! | [`error`] | [`AnalysisError`] |

pub mod attribution;
pub mod error;
pub mod generate;
pub mod lens;
pub mod norm;
pub mod patching;

pub use attribution::Decomposition;
pub use error::{AnalysisError, Result};
pub use generate::{generate, Apply, Edits, GenerateOptions, Generation, Steering, DEFAULT_MAX_PREFILL_TOKENS};
pub use lens::{Direction, LogitLens, Metric};
pub use norm::{FinalNorm, NormKind, NormStats};
