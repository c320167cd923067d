//! The one error type of every repository: what went wrong with the storage itself. Domain
//! outcomes (a code already used, a check that failed) are typed results, never errors.

/// A storage failure. The text is for the server log only; clients get `503 storage_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The engine cannot take the request now (writer gone, commit failed, database unreachable,
    /// disk full): nothing was acknowledged, the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The engine refused the request for another reason (a constraint, a bad statement).
    #[error("storage engine error: {0}")]
    Engine(String),
    /// Opening or creating the data folder failed.
    #[error("data folder: {0}")]
    Io(#[from] std::io::Error),
}

/// Results of repository calls.
pub type StorageResult<T> = Result<T, StorageError>;
