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

    /// A hook failed.
    #[error("hook on `{component}` failed: {message}")]
    Hook {
        /// The component the hook was attached to.
        component: String,
        /// What went wrong.
        message: String,
    },
}
