//! [`CoreError`]: every way a hook-core rule can refuse its input.

use thiserror::Error;

/// Errors of hook-core. Each message says what was expected and what came.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// The value tree holds no tensor where the main-tensor rule looks for one.
    #[error("no main tensor: {0}")]
    NoMainTensor(String),

    /// A component path could not be parsed.
    #[error("invalid component path `{input}` at character {position}: {message}\n  {input}\n  {caret:>width$}", caret = "^", width = position + 1)]
    InvalidPath {
        /// The text that was parsed.
        input: String,
        /// 0-based character offset of the offending character.
        position: usize,
        /// What was expected there.
        message: String,
    },

    /// A token group list was malformed (empty list, empty group, unparsable text).
    #[error("invalid token groups: {0}")]
    InvalidTokenGroups(String),

    /// A token position does not fit the sequence.
    #[error("token position {position} (group {group}) is out of range for a sequence of length {seq_len}: valid positions are 0..{seq_len} or -{seq_len}..-1")]
    TokenOutOfRange {
        /// The position as given (may be negative).
        position: i64,
        /// Index of the group holding it.
        group: usize,
        /// The sequence length it was resolved against.
        seq_len: usize,
    },

    /// A head index does not exist.
    #[error("head {head} is out of range: the layer has {num_heads} heads (valid: 0..{num_heads} or \"all\")")]
    HeadOutOfRange {
        /// The head asked for.
        head: usize,
        /// How many heads there are.
        num_heads: usize,
    },

    /// A head selection could not be parsed.
    #[error("invalid head selection `{0}`: expected \"all\" or a head index such as 3")]
    InvalidHead(String),

    /// A hook failed. `component` is empty when the error is made inside a hook's body (the
    /// module that ran the hook names the site).
    #[error("hook on `{component}` failed: {message}")]
    Hook {
        /// The component the hook was attached to.
        component: String,
        /// What went wrong.
        message: String,
        /// The error behind it (an ops error, a libtorch error), when there is one.
        #[source]
        cause: Option<Cause>,
    },
}

impl CoreError {
    /// A hook failed because of `cause` (kept as the error's source).
    ///
    /// ```
    /// use std::error::Error;
    /// let io = std::io::Error::other("disk full");
    /// let e = hook_core::CoreError::hook("model.layers[0].mlp.output", io);
    /// assert_eq!(e.to_string(), "hook on `model.layers[0].mlp.output` failed: disk full");
    /// assert_eq!(e.source().unwrap().to_string(), "disk full");
    /// ```
    pub fn hook(component: impl Into<String>, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        let cause: Box<dyn std::error::Error + Send + Sync> = cause.into();
        CoreError::Hook { component: component.into(), message: cause.to_string(), cause: Some(Cause(std::sync::Arc::from(cause))) }
    }

    /// A hook failed, for the reason `message` (no underlying error).
    pub fn hook_message(component: impl Into<String>, message: impl Into<String>) -> Self {
        CoreError::Hook { component: component.into(), message: message.into(), cause: None }
    }
}

/// The error behind a failed hook, kept whole (and shared, so that the error stays `Clone`);
/// two causes are equal when their messages are.
#[derive(Clone, Debug)]
pub struct Cause(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}
