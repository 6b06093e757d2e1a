//! Object storage: the one place images live.
//!
//! Everything is content-addressed in one bucket (or one directory, in local
//! mode), under these keys:
//!
//! | key | what | written |
//! |---|---|---|
//! | `blobs/sha256/<hex>` | layers and image configs | after the digest is known |
//! | `manifests/sha256/<hex>` | manifest bytes, exactly as served | after its blobs |
//! | `layers/<layer-key>` | layer record: digest, diff_id, size, media type | after the layer blob |
//! | `images/<image-key>` | image record: manifest digest, media type, source, build time | last: the commit point |
//! | `indexes/<index-key>` | record of a multi-platform index (like an image record) | by the registry, after the images it lists |
//! | `referrers/<hex>` | the referrers index of a manifest: its SBOM artifact | by the build, before the image record |
//! | `builds/<image-key>` | build status | while building |
//! | `builds/recent/<inverted-ms>-<image-key>` | that a build was asked for (newest sort first) | when it is queued |
//! | `served/<image-key>` | that the image was pulled (for `nixery gc`) | at most once a day per process |
//! | `sources/<lookup-hash>` | a worker's answer to a git lookup (for a registry without git) | by the worker |
//! | `holds/<hex>` | that a build relies on the blob or manifest `<hex>`, stored before and not written again (for `nixery gc`) | by a build, or the registry composing an index, when it finds the object stored |
//! | `attrs/<revision>/<system>/{head,00..ff,popularity}` | a revision's attribute index (names to store paths, in 256 zstd shards), for assembling from a binary cache | by `nixery index` or an index job, head last |
//! | `attrs/<revision>/<system>/claim` | that an index job was asked for | by the pull that asks |
//! | `staging/...` | uploads in flight | anything left here is garbage |
//!
//! Nothing is visible under `blobs/`, `manifests/` or `images/` unless it is
//! complete: objects are written under `staging/` and moved into place, and
//! an image record is written only after everything it points to. A crash
//! leaves at most garbage in `staging/`.
//!
//! Every key is made (and read back) by [`keys`], one type per kind. For
//! example, an image `shell/hello` is found by reading `images/<image-key>`
//! ([`keys::ImageRecordKey`] of `BuildRequest::image_key`), which names
//! `manifests/sha256/<d>`, whose layers are `blobs/sha256/<d1>`, ...

pub mod fs;
pub mod intercepted;
pub mod keys;
pub mod memory;
pub mod records;
pub mod s3;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;

pub use fs::FsStorage;
pub use intercepted::{Intercepted, Op};
pub use memory::MemoryStorage;
pub use s3::S3Storage;

/// A failure of the storage backend, with the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O on {key}: {source}")]
    Io { key: String, source: std::io::Error },
    #[error("invalid storage key {key:?}")]
    InvalidKey { key: String },
    /// Larger than the backend can hold: trying again cannot help.
    #[error("{key} would hold {size} bytes, over the storage's limit of {limit} bytes")]
    TooLarge { key: String, size: u64, limit: u64 },
    #[error("storage {operation} on {key}: {message}")]
    Backend {
        key: String,
        operation: &'static str,
        message: String,
    },
    /// A file handed to [`Storage::put_file`] or [`Storage::replace_file`]
    /// is not what its key names: refused, nothing written.
    #[error("{key}: the file's sha256 is {found}, not the one its key names; not stored")]
    NotItsDigest { key: String, found: String },
    /// The object a replacement was to go over is no longer the one
    /// [`Storage::check`] found (repaired, rewritten or deleted since).
    #[error("{key} changed since it was found damaged; not replaced")]
    Changed { key: String },
    /// The writer of a [`Streamed`] object stopped before its end (its
    /// packing failed, or was cancelled): the upload was dropped, and
    /// nothing is left of it.
    #[error("{key}: the writer stopped before the end; the upload was dropped")]
    Abandoned { key: String },
}

/// What an object in storage turned out to be, against the size and
/// digest it should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Absent,
    /// Present and verified: the right size, and the right digest (a file
    /// or memory is hashed; on S3 the digest recorded when it was
    /// uploaded, from the bytes uploaded, is compared).
    Good,
    /// Present, but not known to be what it should be: truncated,
    /// replaced, damaged, or (on S3) with no digest recorded at upload,
    /// which is treated as damaged so that a build replaces it with a
    /// verified upload instead of reading it back to hash it every time.
    /// The [`ETag`] names this very version of the object, the only one
    /// [`Storage::replace_file`] may replace.
    Corrupt(ETag),
}

/// One version of a stored object, as [`Storage::check`] found it: S3's
/// ETag; on the filesystem the file's identity (device, inode, size,
/// change time); in memory a hash of the bytes. Only a backend makes one,
/// so a replacement can only ever go over an object found damaged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(String);

impl ETag {
    pub(crate) fn new(tag: impl Into<String>) -> ETag {
        ETag(tag.into())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// An object being written whose key (its digest) is known only once it
/// is written, streamed to the backend as it is made: memory holds a few
/// parts at most, and no local file is needed (the Lambda function's case).
/// The bytes go into [`Streamed::writer`] (on a blocking thread); the
/// backend's upload ([`Streamed::upload`]) runs meanwhile. It ends with the
/// object staged only once the writer is [finished](PartWriter::finish);
/// then [`Storage::place_streamed`] moves it into place. A writer dropped
/// before that (packing failed, the build was cancelled) abandons the
/// object: the upload drops what it sent and ends with
/// [`StorageError::Abandoned`], leaving nothing behind. So the upload is
/// always awaited, never aborted: aborting it would leave its parts
/// unaccounted for.
pub struct Streamed {
    pub writer: PartWriter,
    pub upload: futures_util::future::BoxFuture<'static, Result<Staged, StorageError>>,
}

/// A streamed object, uploaded whole under a `staging/` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub key: String,
    pub size: u64,
}

/// What a [`PartWriter`] hands its upload: a part, or the end of the
/// object. Without the end, a closed channel means the writer gave up.
enum Message {
    Part(Bytes),
    End,
}

/// A blocking writer that hands what it is given to an upload in parts of
/// a fixed size, waiting while the upload is behind (so memory is bounded).
/// Only [`PartWriter::finish`] ends the object; dropped unfinished, it
/// abandons it ([`Next::Abandoned`]).
pub struct PartWriter {
    part: Vec<u8>,
    part_size: usize,
    parts: tokio::sync::mpsc::Sender<Message>,
}

/// The upload's end of a [`PartWriter`].
pub struct Parts {
    received: tokio::sync::mpsc::Receiver<Message>,
}

/// What came next from a [`PartWriter`].
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Part(Bytes),
    /// The writer finished: the parts so far are the whole object.
    End,
    /// The writer was dropped unfinished: what it sent is not the object.
    Abandoned,
}

impl Parts {
    pub async fn next(&mut self) -> Next {
        match self.received.recv().await {
            Some(Message::Part(bytes)) => Next::Part(bytes),
            Some(Message::End) => Next::End,
            None => Next::Abandoned,
        }
    }
}

impl PartWriter {
    /// A writer and the receiving end of its parts, of `part_size` bytes
    /// (the last one shorter).
    pub fn new(part_size: usize) -> (PartWriter, Parts) {
        let (parts, received) = tokio::sync::mpsc::channel(1);
        let writer = PartWriter {
            part: Vec::with_capacity(part_size),
            part_size,
            parts,
        };
        (writer, Parts { received })
    }

    fn send(&mut self, message: Message) -> std::io::Result<()> {
        self.parts
            .blocking_send(message)
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }

    fn send_part(&mut self) -> std::io::Result<()> {
        let part = std::mem::replace(&mut self.part, Vec::with_capacity(self.part_size));
        self.send(Message::Part(Bytes::from(part)))
    }

    /// Sends what is left and the end of the object; the upload then
    /// completes.
    pub fn finish(mut self) -> std::io::Result<()> {
        if !self.part.is_empty() {
            self.send_part()?;
        }
        self.send(Message::End)
    }
}

impl std::io::Write for PartWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.part_size - self.part.len());
        self.part.extend_from_slice(&buf[..n]);
        if self.part.len() == self.part_size {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a client gets the bytes of an object.
pub enum Download {
    /// A short-lived URL the client is redirected to.
    Url(String),
    /// The bytes themselves, streamed by the registry.
    Stream {
        size: u64,
        body: Pin<Box<dyn AsyncRead + Send>>,
    },
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Download::Url(url) => f.debug_tuple("Url").field(url).finish(),
            Download::Stream { size, .. } => f.debug_struct("Stream").field("size", size).finish(),
        }
    }
}

#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Reads a small object whole (records, manifests); `None` if absent.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError>;

    /// The size of an object; `None` if absent.
    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError>;

    /// Writes a small object, replacing any earlier one atomically.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError>;

    /// Writes a small object only if none exists; `false` if one did.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError>;

    /// Moves a finished local file into place under a content-addressed
    /// `key` (`blobs/sha256/<hex>`, `manifests/sha256/<hex>`; any other is
    /// [`StorageError::InvalidKey`]). The bytes are hashed as they are read
    /// to be stored, and a file whose sha256 is not the key's is refused
    /// ([`StorageError::NotItsDigest`]); on S3 that hash is what is
    /// recorded as the object's digest. Keys name their content, so this
    /// only creates: an object already under `key` is kept and the file
    /// not uploaded (check it first with [`Storage::check`]). The file is
    /// consumed: it is gone afterwards, whatever the outcome.
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError>;

    /// [`Storage::put_file`] over the damaged object `damaged` names (what
    /// [`Storage::check`] found): the one case where a content-addressed
    /// object is replaced, and only that version of it. If the object is
    /// another by now (repaired, rewritten, deleted), nothing is written:
    /// [`StorageError::Changed`]. A good object is never replaced.
    async fn replace_file(
        &self,
        key: &str,
        path: &Path,
        damaged: &ETag,
    ) -> Result<(), StorageError>;

    /// Whether the object under `key` has `size` bytes and the sha256
    /// `hex`. Every backend checks the size and the digest: a local file
    /// or memory is hashed; S3 compares the digest recorded when the
    /// object was uploaded, and calls an object without one damaged.
    async fn check(&self, key: &str, size: u64, hex: &str) -> Result<Check, StorageError>;

    /// How a client downloads the object: `None` if absent. A backend that
    /// hands out URLs answers without a request of its own, so it returns a
    /// URL even for an absent object (the URL then answers 404).
    async fn download(&self, key: &str) -> Result<Option<Download>, StorageError>;

    /// A local directory where files bound for [`Storage::put_file`] can be
    /// written so the move costs nothing, if the backend has one.
    fn local_staging_dir(&self) -> Option<PathBuf>;

    /// Starts a [`Streamed`] object, where the backend takes one (S3);
    /// `None`: write a local file and [`Storage::put_file`] it.
    async fn begin_stream(&self) -> Result<Option<Streamed>, StorageError> {
        Ok(None)
    }

    /// Moves a streamed object into place under `key` (which names its
    /// digest, computed by the writer from the bytes it streamed): created
    /// if absent, or put over the `damaged` version found by
    /// [`Storage::check`], never over anything else; then the staged copy
    /// is deleted. `false`: the precondition failed (the object was
    /// stored meanwhile, or changed), and nothing was written.
    async fn place_streamed(
        &self,
        staged: Staged,
        key: &str,
        damaged: Option<&ETag>,
    ) -> Result<bool, StorageError> {
        let _ = (staged, damaged);
        Err(StorageError::Backend {
            key: key.to_string(),
            operation: "place_streamed",
            message: "this backend takes no streamed objects".to_string(),
        })
    }

    /// Deletes a streamed object that is not to be placed.
    async fn discard_streamed(&self, staged: Staged) {
        let _ = self.delete(&staged.key).await;
    }

    /// Every object under `prefix` (a directory of the layout, such as
    /// `blobs/`: a valid key followed by `/`), in no particular order.
    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError>;

    /// The first `max` objects under `prefix` in key order: on S3, one
    /// request however many there are.
    async fn list_first(&self, prefix: &str, max: usize) -> Result<Vec<Listed>, StorageError> {
        let mut listed = self.list(prefix).await?;
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        listed.truncate(max);
        Ok(listed)
    }

    /// Deletes an object; an absent one is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// When an object was last written (Unix seconds); `None` if absent.
    /// Needs no right to read the object (on S3 it is a listing), so that
    /// garbage collection can ask it of everything it may delete.
    async fn modified(&self, key: &str) -> Result<Option<u64>, StorageError>;
}

/// An object found by [`Storage::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// When it was last written, in Unix seconds.
    pub modified: u64,
}

/// Checks a prefix for [`Storage::list`]: a valid key and a `/`.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), StorageError> {
    match prefix.strip_suffix('/') {
        Some(dir) => check_key(dir),
        None => Err(StorageError::InvalidKey {
            key: prefix.to_string(),
        }),
    }
}

/// A name no other call makes, in this process or another sharing the same
/// storage: `<what>-<pid>-<nanoseconds>-<counter>`. For staged uploads and
/// scratch files.
pub fn unique_name(what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{what}-{}-{nanos}-{n}", std::process::id())
}

/// Where images are stored. Its `Debug` (logged at start) shows an
/// endpoint URL without user info or query.
#[derive(Clone, PartialEq, Eq)]
pub enum StorageConfig {
    Filesystem {
        root: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: String,
        endpoint: Option<String>,
        presign_ttl: std::time::Duration,
    },
    /// In this process's memory, gone when it exits.
    Memory,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageConfig::Filesystem { root } => {
                f.debug_struct("Filesystem").field("root", root).finish()
            }
            StorageConfig::S3 {
                bucket,
                prefix,
                endpoint,
                presign_ttl,
            } => f
                .debug_struct("S3")
                .field("bucket", bucket)
                .field("prefix", prefix)
                .field(
                    "endpoint",
                    &endpoint.as_deref().map(crate::source::redact_urls),
                )
                .field("presign_ttl", presign_ttl)
                .finish(),
            StorageConfig::Memory => f.write_str("Memory"),
        }
    }
}

impl StorageConfig {
    /// The endpoint of an S3-compatible server, if one is configured
    /// (other `s3://` URLs are read from it too).
    pub fn s3_endpoint(&self) -> Option<&str> {
        match self {
            StorageConfig::S3 { endpoint, .. } => endpoint.as_deref(),
            StorageConfig::Filesystem { .. } | StorageConfig::Memory => None,
        }
    }
}

/// Opens the configured backend. Clients are built here, once per process.
pub async fn open(config: &StorageConfig) -> Result<Arc<dyn Storage>, StorageError> {
    Ok(match config {
        StorageConfig::Filesystem { root } => Arc::new(FsStorage::open(root)?),
        StorageConfig::S3 {
            bucket,
            prefix,
            endpoint,
            presign_ttl,
        } => {
            let client = S3Storage::client(endpoint.as_deref()).await;
            Arc::new(S3Storage::new(client, bucket.clone(), prefix, *presign_ttl))
        }
        StorageConfig::Memory => Arc::new(MemoryStorage::new()),
    })
}

/// The hex digest a content-addressed key names (`blobs/sha256/<hex>`,
/// `manifests/sha256/<hex>`), if it is one (see [`keys::Parsed`]).
pub fn digest_of_key(key: &str) -> Option<&str> {
    match keys::Parsed::of(key)? {
        keys::Parsed::Blob(_) | keys::Parsed::Manifest(_) => Some(&key[key.len() - 64..]),
        _ => None,
    }
}

/// The digest a content-addressed key names, for writes of files; any
/// other key is refused.
pub(crate) fn claimed_digest(key: &str) -> Result<&str, StorageError> {
    check_key(key)?;
    digest_of_key(key).ok_or_else(|| StorageError::InvalidKey {
        key: key.to_string(),
    })
}

/// [`StorageError::NotItsDigest`] unless `found` is the digest `key` names.
pub(crate) fn is_its_digest(key: &str, found: &str) -> Result<(), StorageError> {
    match digest_of_key(key) {
        Some(hex) if hex == found => Ok(()),
        _ => Err(StorageError::NotItsDigest {
            key: key.to_string(),
            found: found.to_string(),
        }),
    }
}

/// The sha256 (hex) of a local file, read on a blocking thread.
pub async fn hash_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        let mut file = std::fs::File::open(path)?;
        let mut hash = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hash)?;
        Ok(hex::encode(hash.finalize()))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Keys are made by this crate from hex digests and fixed prefixes; this
/// guards the filesystem backend against anything else.
pub(crate) fn check_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey {
            key: key.to_string(),
        })
    }
}
