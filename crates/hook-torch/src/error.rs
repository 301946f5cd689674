//! [`TorchError`]: what loading, hooking and running a model can refuse.

use std::path::PathBuf;

use thiserror::Error;

/// Errors of hook-torch. The module stays usable after any of them.
#[derive(Debug, Error)]
pub enum TorchError {
    /// The file could not be loaded or instrumented as TorchScript.
    #[error("cannot load {} as a TorchScript module: {reason}", .path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What libtorch said.
        reason: String,
    },

    /// A device this process cannot use.
    #[error("device {0}")]
    Device(String),

    /// A component that the module does not have.
    #[error("no hookable component `{component}`{}", hook_core::suggest::closest_suffix("closest", .suggestions))]
    UnknownComponent {
        /// The name asked for.
        component: String,
        /// The closest existing names.
        suggestions: Vec<String>,
    },

    /// Bad model input (ids, mask, positions).
    #[error("invalid input: {0}")]
    Input(String),

    /// A hook failed or returned something unusable: the site's component, what went wrong,
    /// and the error behind it (an ops or libtorch error) as the source.
    #[error("hook on `{component}` failed: {message}")]
    Hook {
        /// The component.
        component: String,
        /// What went wrong.
        message: String,
        /// The error behind it, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A hook panicked (the forward was aborted; the module is still usable).
    #[error("hook on `{component}` panicked: {message}")]
    HookPanic {
        /// The component.
        component: String,
        /// The panic message.
        message: String,
    },

    /// The model description lacks what an extraction needs.
    #[error("the model description {0}")]
    Description(String),

    /// A path in easyroutine's syntax was malformed.
    #[error(transparent)]
    Core(#[from] hook_core::CoreError),

    /// A hook-ops function refused its input.
    #[error(transparent)]
    Ops(#[from] hook_ops::OpsError),

    /// The cache refused.
    #[error(transparent)]
    Cache(#[from] hook_cache::CacheError),

    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The result type of hook-torch.
pub type Result<T, E = TorchError> = std::result::Result<T, E>;
