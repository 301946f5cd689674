//! [`OpsError`]: bad arguments to a hook-ops function, each naming the argument, the value
//! that came and what would be valid.

use thiserror::Error;

/// Errors of hook-ops.
#[derive(Debug, Error)]
pub enum OpsError {
    /// An argument is outside its valid range.
    #[error("{arg} = {value} is out of range: valid is {valid}")]
    OutOfRange {
        /// The argument's name.
        arg: &'static str,
        /// The value that came.
        value: String,
        /// The valid range, in words.
        valid: String,
    },

    /// A tensor has the wrong shape.
    #[error("{arg} has shape {got:?}, expected {expected}")]
    Shape {
        /// The argument's name.
        arg: &'static str,
        /// The shape that came.
        got: Vec<i64>,
        /// What was expected, in words.
        expected: String,
    },

    /// Two sizes that must divide each other do not.
    #[error("{arg} = {value} does not divide {other_arg} = {other}: {hint}")]
    NotDivisible {
        /// The divisor's name.
        arg: &'static str,
        /// The divisor.
        value: i64,
        /// The dividend's name.
        other_arg: &'static str,
        /// The dividend.
        other: i64,
        /// What would fit.
        hint: String,
    },

    /// A value that must be there is missing.
    #[error("missing {what}: {hint}")]
    Missing {
        /// What is missing.
        what: String,
        /// How to provide it.
        hint: String,
    },

    /// A rule of hook-core refused (token groups, heads).
    #[error(transparent)]
    Core(#[from] hook_core::CoreError),

    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The result type of hook-ops.
pub type Result<T, E = OpsError> = std::result::Result<T, E>;

pub(crate) fn out_of_range(arg: &'static str, value: impl ToString, valid: impl ToString) -> OpsError {
    OpsError::OutOfRange { arg, value: value.to_string(), valid: valid.to_string() }
}
