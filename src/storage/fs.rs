//! Filesystem storage: the key layout of [`crate::storage`] as files under a
//! root directory. Used in local mode, where blobs are streamed by the
//! registry itself (there is nothing to presign).
//!
//! Every object is written under `staging/` first, flushed to disk, then
//! renamed (or linked) to its key, and the directory entry is flushed too:
//! a crash or power loss leaves the old object or the new one under a key,
//! never a partial one, and nothing once reported written is lost.
//!
//! Blobs are verified every time they are served, because a disk can rot
//! a file without changing its size or times. A small one (a config) is
//! read whole and hashed before a byte goes out. A large one (a layer) is
//! streamed while a verification pass hashes the same file beside it; the
//! stream holds back its last piece until the pass says the file is good,
//! and on a mismatch ends with an error instead, so the client never gets
//! damaged bytes as a complete answer. Reads that start while a pass runs,
//! or while reads that relied on it are still streaming (up to
//! [`PASS_SHARED_FOR`] after it ended), share it: a layer pulled by many
//! clients at once is hashed once, and a read that starts after the others
//! ended hashes the file again. A damaged blob is moved aside to
//! `staging/damaged-<hex>-...` (garbage collection deletes it), so it is
//! unknown from then on and the next build that needs it stores it again.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    check_key, check_prefix, claimed_digest, digest_of_key, hash_file, is_its_digest, unique_name,
    Check, Download, ETag, Listed, Storage, StorageError,
};

const STAGING: &str = "staging";

#[derive(Debug)]
pub struct FsStorage {
    root: PathBuf,
    /// Verification passes of large blobs being served, by file identity
    /// (device, inode, size and times, so a file rewritten in place gets a
    /// pass of its own): alive while the pass runs or a read relying on it
    /// streams.
    passes: std::sync::Mutex<std::collections::HashMap<ETag, std::sync::Weak<Pass>>>,
    /// How many times a blob was hashed to be served.
    hashes: Arc<AtomicU64>,
    /// Held while a damaged object is replaced or moved aside.
    replacing: Arc<tokio::sync::Mutex<()>>,
}

/// One verification pass over a large blob: `None` while it hashes, then
/// whether the file was good and when that was known.
type Verdict = Option<(bool, Instant)>;

/// A verification pass, held by the task that runs it and by every read
/// that relies on it.
#[derive(Debug)]
struct Pass {
    verdict: watch::Receiver<Verdict>,
}

/// How long after a pass ends a read that starts while others still
/// stream may rely on it instead of hashing the file again: so that a
/// blob read without pause is still hashed every few moments.
pub const PASS_SHARED_FOR: Duration = Duration::from_secs(2);

/// Pieces a large blob is streamed in.
const STREAM_PIECE: usize = 256 << 10;

/// Blobs up to this size (configs, small layers) are read whole, in one
/// trip to a blocking thread, and checked in memory; larger ones are
/// streamed from the file. Small, so that slow clients cannot make many
/// large copies stay in memory.
const READ_WHOLE_MAX: u64 = 64 << 10;

impl FsStorage {
    /// Opens (and creates, if needed) a storage root.
    pub fn open(root: impl Into<PathBuf>) -> Result<FsStorage, StorageError> {
        let root = root.into();
        let staging = root.join(STAGING);
        std::fs::create_dir_all(&staging).map_err(|source| StorageError::Io {
            key: staging.display().to_string(),
            source,
        })?;
        Ok(FsStorage {
            root,
            passes: std::sync::Mutex::default(),
            hashes: Arc::default(),
            replacing: Arc::default(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// A fresh file name under `staging/`.
    fn staging_path(&self) -> PathBuf {
        self.root.join(STAGING).join(unique_name("put"))
    }

    /// Moves `file` to `path`, replacing what is there, through staging if
    /// it is on another filesystem.
    async fn move_into_place(
        &self,
        key: &str,
        file: &Path,
        path: &Path,
    ) -> Result<(), StorageError> {
        ensure_parent(path, key).await?;
        sync_file(file).await.map_err(|e| io(key, e))?;
        if tokio::fs::rename(file, path).await.is_err() {
            let staged = self.staging_path();
            tokio::fs::copy(file, &staged)
                .await
                .map_err(|e| io(key, e))?;
            sync_file(&staged).await.map_err(|e| io(key, e))?;
            tokio::fs::rename(&staged, path)
                .await
                .map_err(|e| io(key, e))?;
        }
        sync_parent(path).await.map_err(|e| io(key, e))
    }

    /// How many times a blob was hashed to be served (small ones on every
    /// read; large ones once per verification pass, which reads that
    /// start together share).
    pub fn blob_hashes(&self) -> u64 {
        self.hashes.load(Ordering::Relaxed)
    }

    /// The verification pass a read of this large blob relies on: one
    /// that runs, or that reads still streaming relied on (and ended
    /// lately), or a new one over `file` (the very file the read has open).
    fn pass_for(
        &self,
        key: &str,
        hex: &str,
        file: &std::fs::File,
        meta: &std::fs::Metadata,
    ) -> Arc<Pass> {
        let id = identity(meta);
        let mut passes = self.passes.lock().expect("never poisoned");
        let fresh = |pass: &Arc<Pass>| match *pass.verdict.borrow() {
            None => true,
            Some((_, at)) => at.elapsed() < PASS_SHARED_FOR,
        };
        if let Some(pass) = passes.get(&id).and_then(std::sync::Weak::upgrade) {
            if fresh(&pass) {
                return pass;
            }
        }
        passes.retain(|_, pass| pass.strong_count() > 0);
        let (tell, verdict) = watch::channel(None);
        let pass = Arc::new(Pass { verdict });
        passes.insert(id, Arc::downgrade(&pass));
        let running = pass.clone();
        let checked = file.try_clone();
        let (key, hex, size) = (key.to_string(), hex.to_string(), meta.len());
        let (root, hashes) = (self.root.clone(), self.hashes.clone());
        let (replacing, meta) = (self.replacing.clone(), meta.clone());
        tokio::spawn(async move {
            hashes.fetch_add(1, Ordering::Relaxed);
            let found = match checked {
                Ok(file) => tokio::task::spawn_blocking(move || hash_open_file(&file, size))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|found| found),
                Err(error) => Err(error),
            };
            let good = match found {
                Ok(found) if found == hex => true,
                Ok(found) => {
                    tracing::error!(
                        key,
                        found,
                        "stored blob does not match its digest; moved aside"
                    );
                    let _one_at_a_time = replacing.lock().await;
                    move_aside(&root, &key, &meta).await;
                    false
                }
                Err(error) => {
                    tracing::error!(key, %error, "stored blob unreadable; not serving it");
                    false
                }
            };
            // Let go first: with no read streaming, the next read hashes
            // the file again.
            drop(running);
            let _ = tell.send(Some((good, Instant::now())));
        });
        pass
    }

    /// `data` in a new file under `staging/`, flushed to disk.
    async fn write_staged(&self, key: &str, data: Bytes) -> Result<PathBuf, StorageError> {
        let staged = self.staging_path();
        let path = staged.clone();
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = std::fs::File::create(&path)?;
            file.write_all(&data)?;
            file.sync_all()
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|written| written);
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(io(key, e));
        }
        Ok(staged)
    }
}

/// Which file is under a key: its device, inode, size and times. A file
/// moved into place is another inode, so this names one version of it.
fn identity(meta: &std::fs::Metadata) -> ETag {
    use std::os::unix::fs::MetadataExt;
    ETag::new(format!(
        "{}:{}:{}:{}.{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
}

/// [`StorageError::NotItsDigest`] unless the file is what `key` names.
async fn verify_file(key: &str, file: &Path) -> Result<(), StorageError> {
    let found = hash_file(file).await.map_err(|e| io(key, e))?;
    is_its_digest(key, &found)
}

/// Flushes a file's bytes to disk.
async fn sync_file(path: &Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(path)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

/// Flushes the directory holding `path`, so that a rename or link into it
/// survives a crash.
async fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => sync_file(dir).await,
        None => Ok(()),
    }
}

/// The sha256 of the first `size` bytes of an open file, read with
/// `pread` so that the file's own position (a stream's) is untouched.
fn hash_open_file(file: &std::fs::File, size: u64) -> std::io::Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0; 1 << 20];
    let mut at = 0;
    while at < size {
        let want = buf.len().min((size - at) as usize);
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(std::io::Error::from(ErrorKind::UnexpectedEof));
        }
        hash.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(hash.finalize()))
}

/// Moves a damaged blob out of its key, to `staging/damaged-<hex>-...`,
/// if the file there is still the one found damaged (`meta`). Garbage
/// collection deletes it in time; meanwhile it is there to look at.
async fn move_aside(root: &Path, key: &str, meta: &std::fs::Metadata) {
    let path = root.join(key);
    match tokio::fs::metadata(&path).await {
        Ok(now) if identity(&now) == identity(meta) => {}
        _ => return, // gone, or replaced already
    }
    let hex = digest_of_key(key).unwrap_or("object");
    let aside = root
        .join(STAGING)
        .join(unique_name(&format!("damaged-{hex}")));
    match tokio::fs::rename(&path, &aside).await {
        Ok(()) => {
            let _ = sync_parent(&path).await;
        }
        Err(error) => tracing::error!(key, %error, "moving a damaged blob aside failed"),
    }
}

/// A large blob as a stream of pieces of `file`, `size` bytes in all; the
/// last piece goes out only once `pass` found the file good, and an error
/// goes instead if it did not.
fn verified_stream(
    file: tokio::fs::File,
    size: u64,
    pass: Arc<Pass>,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    use tokio::io::AsyncReadExt;
    let verdict = pass.verdict.clone();
    // The pass is held (`pass`) as long as this stream is.
    let state = (file, size, (verdict, pass), false);
    futures_util::stream::unfold(
        state,
        |(mut file, left, (mut verdict, pass), done)| async move {
            if done || left == 0 {
                return None;
            }
            let mut piece = vec![0; STREAM_PIECE.min(left as usize)];
            let read = match file.read_exact(&mut piece).await {
                Ok(_) => Ok(piece.len() as u64),
                Err(e) => Err(e),
            };
            let left = match read {
                Ok(n) => left - n,
                Err(e) => return Some((Err(e), (file, 0, (verdict, pass), true))),
            };
            if left > 0 {
                return Some((
                    Ok(bytes::Bytes::from(piece)),
                    (file, left, (verdict, pass), false),
                ));
            }
            let good = verdict
                .wait_for(Option::is_some)
                .await
                .is_ok_and(|v| matches!(*v, Some((true, _))));
            let last = if good {
                Ok(bytes::Bytes::from(piece))
            } else {
                Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    "the stored blob does not match its digest",
                ))
            };
            Some((last, (file, 0, (verdict, pass), true)))
        },
    )
}

/// Opens a blob, and reads it whole if it is small.
fn open_for_download(
    path: &Path,
) -> std::io::Result<(std::fs::File, std::fs::Metadata, Option<Vec<u8>>)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > READ_WHOLE_MAX {
        return Ok((file, meta, None));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    (&mut file).take(meta.len()).read_to_end(&mut data)?;
    if data.len() as u64 != meta.len() {
        return Err(std::io::Error::other("blob changed size while being read"));
    }
    Ok((file, meta, Some(data)))
}

fn io(key: &str, source: std::io::Error) -> StorageError {
    StorageError::Io {
        key: key.to_string(),
        source,
    }
}

async fn ensure_parent(path: &Path, key: &str) -> Result<(), StorageError> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io(key, e))?;
    }
    Ok(())
}

#[async_trait]
impl Storage for FsStorage {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        match tokio::fs::read(self.path(key)?).await {
            Ok(data) => Ok(Some(Bytes::from(data))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let staged = self.write_staged(key, data).await?;
        ensure_parent(&path, key).await?;
        if let Err(e) = tokio::fs::rename(&staged, &path).await {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(io(key, e));
        }
        sync_parent(&path).await.map_err(|e| io(key, e))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let path = self.path(key)?;
        let staged = self.write_staged(key, data).await?;
        ensure_parent(&path, key).await?;
        // link(2) fails if the target exists: an atomic create-if-absent.
        let linked = tokio::fs::hard_link(&staged, &path).await;
        let _ = tokio::fs::remove_file(&staged).await;
        match linked {
            Ok(()) => sync_parent(&path)
                .await
                .map(|()| true)
                .map_err(|e| io(key, e)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn put_file(&self, key: &str, file: &Path) -> Result<(), StorageError> {
        let result = async {
            let path = self.path(key)?;
            claimed_digest(key)?;
            // Create only: an object already in place is kept.
            if tokio::fs::try_exists(&path).await.map_err(|e| io(key, e))? {
                return Ok(());
            }
            verify_file(key, file).await?;
            self.move_into_place(key, file, &path).await
        }
        .await;
        let _ = tokio::fs::remove_file(file).await;
        result
    }

    async fn replace_file(
        &self,
        key: &str,
        file: &Path,
        damaged: &ETag,
    ) -> Result<(), StorageError> {
        let result = async {
            let path = self.path(key)?;
            claimed_digest(key)?;
            verify_file(key, file).await?;
            // One replacement at a time in this process, so that the object
            // looked at is the one replaced.
            let _one_at_a_time = self.replacing.lock().await;
            match tokio::fs::metadata(&path).await {
                Ok(meta) if identity(&meta) == *damaged => {}
                Ok(_) => {
                    return Err(StorageError::Changed {
                        key: key.to_string(),
                    })
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(StorageError::Changed {
                        key: key.to_string(),
                    })
                }
                Err(e) => return Err(io(key, e)),
            }
            self.move_into_place(key, file, &path).await
        }
        .await;
        let _ = tokio::fs::remove_file(file).await;
        result
    }

    async fn check(&self, key: &str, size: u64, hex: &str) -> Result<Check, StorageError> {
        let path = self.path(key)?;
        let meta = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Check::Absent),
            Err(e) => return Err(io(key, e)),
        };
        let found = identity(&meta);
        let good = meta.len() == size && hash_file(&path).await.map_err(|e| io(key, e))? == hex;
        Ok(if good {
            Check::Good
        } else {
            Check::Corrupt(found)
        })
    }

    async fn download(&self, key: &str) -> Result<Option<Download>, StorageError> {
        let path = self.path(key)?;
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_for_download(&path))
                .await
                .map_err(|e| io(key, std::io::Error::other(e)))?
        };
        let (file, meta, whole) = match opened {
            Ok(opened) => opened,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(key, e)),
        };
        let size = meta.len();
        let Some(hex) = digest_of_key(key) else {
            let body: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> = match whole {
                Some(data) => Box::pin(std::io::Cursor::new(data)),
                None => Box::pin(tokio::fs::File::from_std(file)),
            };
            return Ok(Some(Download::Stream { size, body }));
        };
        let body: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> = match whole {
            // Small: the bytes that were checked are the bytes served. A
            // damaged one does not exist for the client, and the next
            // build that needs it writes it again.
            Some(data) => {
                self.hashes.fetch_add(1, Ordering::Relaxed);
                let found = crate::oci::digest::sha256_hex(&data);
                if found != hex {
                    tracing::error!(
                        key,
                        found,
                        "stored blob does not match its digest; moved aside"
                    );
                    let _one_at_a_time = self.replacing.lock().await;
                    move_aside(&self.root, key, &meta).await;
                    return Ok(None);
                }
                Box::pin(std::io::Cursor::new(data))
            }
            None => {
                let pass = self.pass_for(key, hex, &file, &meta);
                let stream = verified_stream(tokio::fs::File::from_std(file), size, pass);
                Box::pin(tokio_util::io::StreamReader::new(stream))
            }
        };
        Ok(Some(Download::Stream { size, body }))
    }

    fn local_staging_dir(&self) -> Option<PathBuf> {
        Some(self.root.join(STAGING))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        check_prefix(prefix)?;
        let root = self.root.clone();
        let prefix_owned = prefix.to_string();
        tokio::task::spawn_blocking(move || list_files(&root, &prefix_owned))
            .await
            .map_err(std::io::Error::other)
            .and_then(|listed| listed)
            .map_err(|e| io(prefix, e))
    }

    async fn modified(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(meta) if meta.is_file() => Ok(Some(unix_seconds(&meta))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(key, e)),
        }
    }
}

/// A file's modification time in Unix seconds.
fn unix_seconds(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// The files under `root/prefix`, as keys (`/`-separated, relative to
/// `root`); none if the directory does not exist.
fn list_files(root: &Path, prefix: &str) -> std::io::Result<Vec<Listed>> {
    let mut found = Vec::new();
    let mut dirs = vec![prefix.trim_end_matches('/').to_string()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(root.join(&dir)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let key = format!("{dir}/{name}");
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Removed since it was listed.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                dirs.push(key);
            } else if meta.is_file() {
                found.push(Listed {
                    key,
                    size: meta.len(),
                    modified: unix_seconds(&meta),
                });
            }
        }
    }
    Ok(found)
}
