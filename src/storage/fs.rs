//! Filesystem storage: the key layout of [`crate::storage`] as files under a
//! root directory. Used in local mode, where blobs are streamed by the
//! registry itself (there is nothing to presign).
//!
//! Every object is written under `staging/` first, flushed to disk, then
//! renamed (or linked) to its key, and the directory entry is flushed too:
//! a crash or power loss leaves the old object or the new one under a key,
//! never a partial one, and nothing once reported written is lost.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

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
    /// Blobs whose digest was checked before serving: path -> (size,
    /// modification time) then. A blob changed since is checked again.
    verified: std::sync::Mutex<std::collections::HashMap<PathBuf, (u64, std::time::SystemTime)>>,
    /// Held while a damaged object is replaced.
    replacing: tokio::sync::Mutex<()>,
}

/// The most blobs remembered as verified (then the memory starts over).
const VERIFIED_MAX: usize = 65_536;

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
            verified: std::sync::Mutex::default(),
            replacing: tokio::sync::Mutex::default(),
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

    /// Whether a blob about to be served is the one its key names; a blob
    /// once found good is not hashed again until it changes. `data`: the
    /// whole blob, when it was read already.
    async fn verified(
        &self,
        key: &str,
        path: &Path,
        meta: &std::fs::Metadata,
        data: Option<&[u8]>,
    ) -> bool {
        let Some(hex) = digest_of_key(key) else {
            return true;
        };
        let stamp = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
        if self.verified.lock().expect("never poisoned").get(path) == Some(&stamp) {
            return true;
        }
        let found = match data {
            Some(data) => Ok(crate::oci::digest::sha256_hex(data)),
            None => hash_file(path).await,
        };
        match found {
            Ok(found) if found == hex => {
                let mut verified = self.verified.lock().expect("never poisoned");
                if verified.len() >= VERIFIED_MAX {
                    verified.clear();
                }
                verified.insert(path.to_path_buf(), stamp);
                true
            }
            Ok(found) => {
                tracing::error!(
                    key,
                    found,
                    "stored blob does not match its digest; not serving it"
                );
                false
            }
            Err(error) => {
                tracing::error!(key, %error, "stored blob unreadable; not serving it");
                false
            }
        }
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
        // A damaged blob is never served: to the client it does not exist,
        // and the next build that needs it writes it again.
        if !self.verified(key, &path, &meta, whole.as_deref()).await {
            return Ok(None);
        }
        let size = meta.len();
        let body: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> = match whole {
            // The bytes that were checked are the bytes served.
            Some(data) => Box::pin(std::io::Cursor::new(data)),
            None => Box::pin(tokio::fs::File::from_std(file)),
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
