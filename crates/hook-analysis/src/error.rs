//! [`AnalysisError`]: what an analysis refuses, naming the key or argument and what would be right.

use thiserror::Error;

/// Errors of hook-analysis.
#[derive(Debug, Error)]
pub enum AnalysisError {
    /// A cache entry the analysis needs is missing or has the wrong kind.
    #[error("the cache {0}")]
    Cache(String),
    /// An argument that cannot be used (a token id out of the vocabulary, a metric without
    /// directions, directions for another batch size).
    #[error("{0}")]
    Input(String),
    /// The model lacks what the analysis needs (a description, a parameter).
    #[error(transparent)]
    Model(#[from] hook_torch::TorchError),
    /// libtorch refused an operation.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// `Result` with [`AnalysisError`].
pub type Result<T> = std::result::Result<T, AnalysisError>;
