//! [`CacheError`]: what the cache refuses, naming the key and both sides.

use std::path::PathBuf;

use thiserror::Error;

/// Errors of hook-cache.
#[derive(Debug, Error)]
pub enum CacheError {
    /// `cat` of caches whose key sets differ.
    #[error("key mismatch: only in this cache: [{}]; only in the other: [{}] (cat needs the same keys on both sides)", .only_self.join(", "), .only_other.join(", "))]
    KeyMismatch {
        /// Keys only in `self`.
        only_self: Vec<String>,
        /// Keys only in the other cache.
        only_other: Vec<String>,
    },

    /// `cat` of tensors that cannot be joined (dtype or device differ).
    #[error("cannot aggregate `{key}`: this cache holds {this}, the other {other} (convert one side with .to(...) first)")]
    Incompatible {
        /// The key.
        key: String,
        /// dtype/device on this side.
        this: String,
        /// dtype/device on the other side.
        other: String,
    },

    /// A key that is not in the cache.
    #[error("no key `{key}` in the cache{}", hook_core::suggest::closest_suffix("closest keys", .suggestions))]
    NotFound {
        /// The key asked for.
        key: String,
        /// The closest existing keys.
        suggestions: Vec<String>,
    },

    /// An operation the cache's current mode does not allow (deferred mode entered twice).
    #[error("{0}")]
    Mode(String),

    /// A value of the wrong kind for the operation.
    #[error("`{key}`: {message}")]
    WrongKind {
        /// The key.
        key: String,
        /// What was expected and what came.
        message: String,
    },

    /// A user aggregation function failed.
    #[error("aggregating `{key}` failed: {message}")]
    Aggregation {
        /// The key.
        key: String,
        /// What went wrong.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },

    /// A file that is not a valid hookrs cache.
    #[error("{} is not a valid hookrs cache: {reason}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A cache written by a newer hookrs.
    #[error("{} was written with cache format version {found}; this hookrs reads versions up to {supported}: upgrade hookrs to read it", .path.display())]
    NewerVersion {
        /// The file.
        path: PathBuf,
        /// Its format version.
        found: u64,
        /// The newest this build reads.
        supported: u64,
    },

    /// libtorch refused an operation.
    /// A chunk directory that cannot be read, resumed or written.
    #[error("{}: {reason}", .dir.display())]
    Chunks {
        /// The directory.
        dir: PathBuf,
        /// What is wrong, and what would be right.
        reason: String,
    },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The result type of hook-cache.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;
