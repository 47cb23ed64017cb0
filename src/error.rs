//! The crate's one error type.
//!
//! Every variant that concerns a file carries its path, so the message a user sees names the
//! file and the cause. Key material never appears in an error.

#![forbid(unsafe_code)]

use std::path::PathBuf;

/// Where in a shard an integrity failure was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The shard file.
    pub path: PathBuf,
    /// Tensor name.
    pub tensor: String,
    /// Chunk index within the tensor.
    pub chunk: u64,
}

impl std::fmt::Display for ChunkLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: tensor '{}', chunk {}",
            self.path.display(),
            self.tensor,
            self.chunk
        )
    }
}

/// Everything that can go wrong in ciphershard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed ciphershard shard, manifest or keyring.
    #[error("{path}: malformed {what}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Which structure (header, descriptor, manifest, keyring, ...).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The file uses a format version or cipher this build does not understand.
    #[error("{path}: unsupported {what} '{found}' (this build supports {supported})")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported (version, cipher, key wrap algorithm, dtype).
        what: &'static str,
        /// The value found.
        found: String,
        /// What this build supports.
        supported: String,
    },
    /// No key in the keyring matches the master key given.
    #[error(
        "{path}: wrong key: master key {key_id} cannot open this dataset (it is wrapped for: {available})"
    )]
    WrongKey {
        /// The keyring or shard.
        path: PathBuf,
        /// Id of the key that was tried.
        key_id: String,
        /// Ids of the keys that can open it.
        available: String,
    },
    /// An authentication tag did not verify: the data was tampered with or corrupted.
    #[error(
        "integrity check failed: {0}: the chunk was modified, truncated or moved (no plaintext was released)"
    )]
    Integrity(ChunkLocation),
    /// The shard header or dataset metadata failed authentication.
    #[error("{path}: integrity check failed: {what} was modified")]
    HeaderIntegrity {
        /// The file.
        path: PathBuf,
        /// What failed (shard header, manifest/shard mismatch...).
        what: String,
    },
    /// A key file or key source is unusable.
    #[error("key: {0}")]
    Key(String),
    /// Invalid argument or configuration from the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The requested backend is not available here.
    #[error("backend '{backend}' is not available: {reason}")]
    BackendUnavailable {
        /// Backend name.
        backend: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A GPU backend failed at run time.
    #[error("{backend} backend error: {reason}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What failed and what to do next.
        reason: String,
    },
    /// The loader was stopped or its pipeline shut down.
    #[error("loader stopped: {0}")]
    Stopped(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-structure error on `path`.
    pub fn format(path: impl Into<PathBuf>, what: &'static str, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            what,
            reason: reason.into(),
        }
    }
}

/// Crate result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
