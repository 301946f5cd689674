//! # hook-ops
//!
//! The tensor math of easyroutine's hooks (`easyroutine/interpretability/hooks.py`) as pure
//! functions on [`tch::Tensor`]: they take tensors and options and return tensors or keyed
//! cache entries. No hooking and no cache here; hook-torch wraps them.
//!
//! | module | easyroutine functions |
//! |---|---|
//! | [`select`] | token-group selection shared by every hook (flatten / per-group mean) |
//! | [`stats`] | `compute_statistics`, `layernom_hook` |
//! | [`resid`] | `save_resid_hook`, `input_embedding_hook`, `embed_hook`, `avg_hook` |
//! | [`fused`] | (none: easyroutine has no fused projections) the queries, keys and values inside GPT-2's `c_attn`, NeoX's `query_key_value`, Phi-3's `qkv_proj` |
//! | [`heads`] | `repeat_kv`, `query_key_value_hook`, `head_out_hook`, `projected_*_vectors_head` |
//! | [`pattern`] | `attention_pattern_head`, `avg_attention_pattern_head` |
//! | [`intervene`] | `intervention_*_hook`, `multiply_pattern`, `ablate_pos_keep_self_attn_hook` |
//! | [`error`] | [`OpsError`] |
//!
//! Not ported: `create_dynamic_hook` (deprecated pyvene glue), and `ablate_tokens_hook`,
//! `ablate_images_hook`, `ablate_image_image_hook`, which only raise `NotImplementedError` in
//! easyroutine. Where easyroutine has a bug, the function here does the right thing and says
//! so in its documentation; `docs/parity.md` lists every such deviation.
//!
//! ```
//! use tch::{Kind, Device, Tensor};
//! use hook_core::TokenGroups;
//!
//! let resid = Tensor::randn([1, 6, 8], (Kind::Float, Device::Cpu));
//! let groups: TokenGroups = "[(1, 3), (5,)]".parse().unwrap();
//! let picked = hook_ops::resid::resid(&resid, &groups, false).unwrap();
//! assert_eq!(picked.size(), vec![1, 3, 8]);
//! ```

pub mod error;
pub mod fused;
pub mod heads;
pub mod intervene;
pub mod keyed;
pub mod pattern;
pub mod resid;
pub mod select;
pub mod stats;

pub use error::{OpsError, Result};
pub use fused::{Qkv, QkvLayout};
pub use heads::HeadLayout;
pub use intervene::Patch;
pub use keyed::Keyed;
pub use pattern::PatternAvg;
