//! What can go wrong: a job that is not valid (the caller's mistake: the CLI exits 2, Python
//! raises ValueError), or a run that failed (the model, the data or the disk said no).

/// An extraction error.
///
/// ```
/// let e = hook_extract::ExtractError::invalid("batch_size must be at least 1");
/// assert!(e.is_invalid());
/// assert_eq!(e.to_string(), "batch_size must be at least 1");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The job names something that cannot work (a malformed option, options that do not go
    /// together); the message says what was wrong and what would be right.
    #[error("{0}")]
    Invalid(String),
    /// The run failed; the chain of causes says where (which batch, file, line).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl ExtractError {
    /// An [`ExtractError::Invalid`] with this message.
    pub fn invalid(message: impl Into<String>) -> Self {
        ExtractError::Invalid(message.into())
    }

    /// Whether the job itself was at fault (usage), rather than the run.
    pub fn is_invalid(&self) -> bool {
        matches!(self, ExtractError::Invalid(_))
    }
}

impl From<hook_torch::TorchError> for ExtractError {
    fn from(e: hook_torch::TorchError) -> Self {
        ExtractError::Failed(e.into())
    }
}

impl From<hook_cache::CacheError> for ExtractError {
    fn from(e: hook_cache::CacheError) -> Self {
        ExtractError::Failed(e.into())
    }
}

impl From<std::io::Error> for ExtractError {
    fn from(e: std::io::Error) -> Self {
        ExtractError::Failed(e.into())
    }
}

/// `Result` with an [`ExtractError`].
pub type Result<T, E = ExtractError> = std::result::Result<T, E>;
