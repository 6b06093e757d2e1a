//! What can go wrong with a binary cache, as one error type: the cache
//! lacks a path, fails to give it (the cache "unavailable"), or gives
//! something a check refuses. [`CacheError::is_unavailable`] says which
//! of the last two; every variant but `Url` names the cache and the path.

use std::io;

use super::narinfo::{NarInfoError, Sha256Hash};
use super::signature::SignatureError;
use super::store_path::StorePath;

/// Why a cache could not give what was asked. Every variant but `Url`
/// names the cache (`cache`, without credentials) and the store path.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("binary cache URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{path} is not in {cache} ({object} not found)")]
    NotFound {
        cache: String,
        path: StorePath,
        object: String,
    },
    #[error("{cache} is unavailable: {object} of {path} failed {attempts} times, last: {reason}")]
    Unavailable {
        cache: String,
        path: StorePath,
        object: String,
        attempts: u32,
        reason: String,
    },
    #[error("{cache} answered HTTP {status} for {object} of {path}")]
    Http {
        cache: String,
        path: StorePath,
        object: String,
        status: u16,
    },
    /// A redirect the client would not follow (see [`super::network::MAX_REDIRECTS`]).
    #[error("{cache}: {object} of {path} redirects where it may not go: {reason}")]
    Redirect {
        cache: String,
        path: StorePath,
        object: String,
        reason: String,
    },
    #[error("{cache}: reading {object} of {path}: {source}")]
    Io {
        cache: String,
        path: StorePath,
        object: String,
        source: io::Error,
    },
    #[error("{cache}: the narinfo of {path} is refused: {source}")]
    NarInfo {
        cache: String,
        path: StorePath,
        source: NarInfoError,
    },
    #[error("{cache}: asked for {path}, the narinfo is for {found}")]
    WrongPath {
        cache: String,
        path: StorePath,
        found: StorePath,
    },
    #[error("{cache}: {source}")]
    Signature {
        cache: String,
        path: StorePath,
        source: SignatureError,
    },
    #[error("{cache}: the closure has more than {limit} paths (at {path})")]
    TooManyPaths {
        cache: String,
        path: StorePath,
        limit: usize,
    },
    #[error("{cache}: the closure's NARs are at least {size} bytes, over the limit of {limit} (at {path})")]
    ClosureTooLarge {
        cache: String,
        path: StorePath,
        size: u64,
        limit: u64,
    },
    #[error("{cache}: the NAR file of {path} is {found} bytes, not the FileSize {expected}")]
    FileSize {
        cache: String,
        path: StorePath,
        expected: u64,
        /// Bytes read; `expected + 1` means "more than expected".
        found: u64,
    },
    #[error("{cache}: the NAR file of {path} has hash {found}, not the FileHash {expected}")]
    FileHash {
        cache: String,
        path: StorePath,
        expected: Sha256Hash,
        found: Sha256Hash,
    },
    #[error("{cache}: the NAR of {path} is {found} bytes, not the NarSize {expected}")]
    NarSize {
        cache: String,
        path: StorePath,
        expected: u64,
        /// Bytes read; `expected + 1` means "more than expected".
        found: u64,
    },
    #[error("{cache}: the NAR of {path} has hash {found}, not the NarHash {expected}")]
    NarHash {
        cache: String,
        path: StorePath,
        expected: Sha256Hash,
        found: Sha256Hash,
    },
    #[error("{cache}: decompressing the NAR of {path} ({compression}): {source}")]
    Decompress {
        cache: String,
        path: StorePath,
        compression: &'static str,
        source: io::Error,
    },
    /// The unsigned FileSize claims more than any compression of a NAR of
    /// the signed NarSize takes (see [`super::reader::max_file_size`]).
    #[error("{cache}: the narinfo of {path} says its NAR file is {file_size} bytes, more than {limit} for a NAR of {nar_size} bytes")]
    FileTooLarge {
        cache: String,
        path: StorePath,
        file_size: u64,
        nar_size: u64,
        limit: u64,
    },
    /// Whoever read the NAR gave up on it ([`super::NarStream::cancel_on`]).
    #[error("{cache}: reading the NAR of {path} was cancelled")]
    Cancelled { cache: String, path: StorePath },
}

impl CacheError {
    /// The cache error inside an `io::Error` that a [`super::NarReader`] returned
    /// (or that a NAR walk reported as its reading error).
    pub fn from_io(error: &io::Error) -> Option<&CacheError> {
        error.get_ref()?.downcast_ref::<CacheError>()
    }

    /// Whether the path is missing from the cache (so another source may
    /// have it), as opposed to the cache failing or lying.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CacheError::NotFound { .. })
    }

    /// Whether the cache failed to give what it has (down, slow, cut off
    /// mid-NAR, or answering an unexpected status), as opposed to lacking
    /// it or sending what a check refused: callers fall back or answer 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CacheError::Unavailable { .. }
                | CacheError::Http { .. }
                | CacheError::Redirect { .. }
                | CacheError::Io { .. }
        )
    }

    /// Whether the reader's own caller stopped it.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, CacheError::Cancelled { .. })
    }
}
