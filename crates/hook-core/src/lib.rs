//! # hook-core
//!
//! The part of hookrs that needs no libtorch. Everything here is generic over the tensor
//! type `T`, so the rules can be tested (and reused) without a tensor library.
//!
//! | module | what it holds |
//! |---|---|
//! | [`value`] | [`Value`] and [`HookIo`]: what a hook sees (args, kwargs, output), and the main-tensor rule |
//! | [`component`] | [`ComponentPath`]: `model.layers[3].self_attn.o_proj.output` parsed and printed back |
//! | [`tokens`] | [`TokenGroups`]: ordered groups of positions, resolved against a sequence length |
//! | [`heads`] | [`HeadSelection`]: `all` or one head |
//! | [`suggest`] | closest-name suggestions for error messages |
//! | [`keys`] | cache-key builders (`resid_out_3`, `pattern_L0H1`, …) and their families |
//! | [`hook`] | the [`Hook`] trait and the [`HookContext`] a hook receives |
//! | [`error`] | [`CoreError`], the one error type of this crate |
//!
//! ```
//! use hook_core::{ComponentPath, HookIo, Value};
//!
//! let path: ComponentPath = "model.layers.3.self_attn.output".parse().unwrap();
//! assert_eq!(path.to_string(), "model.layers[3].self_attn.output");
//! assert_eq!(path.layer(), Some(3));
//!
//! // A decoder layer returns a tuple; the main tensor is its first element.
//! let io = HookIo::with_output(vec![], vec![], Value::Tuple(vec![Value::Tensor(1.0_f32), Value::None]));
//! assert_eq!(*io.main_tensor().unwrap(), 1.0);
//! ```

pub mod component;
pub mod error;
pub mod heads;
pub mod hook;
pub mod keys;
pub mod rng;
pub mod suggest;
pub mod tokens;
pub mod value;

pub use component::{ComponentPath, Segment, Site};
pub use error::CoreError;
pub use heads::HeadSelection;
pub use hook::{Hook, HookContext};
pub use tokens::{ResolvedGroups, TokenGroups};
pub use value::{HookIo, MainTensorLocation, Value};

/// The result type of this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
