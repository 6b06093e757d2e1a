//! Filesystem storage: the key layout of [`crate::storage`] as files under a
//! root directory. Used in local mode, where blobs are streamed by the
//! registry itself (there is nothing to presign).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{check_key, unique_name, Download, Storage, StorageError};

const STAGING: &str = "staging";

#[derive(Debug)]
pub struct FsStorage {
    root: PathBuf,
}

impl FsStorage {
    /// Opens (and creates, if needed) a storage root.
    pub fn open(root: impl Into<PathBuf>) -> Result<FsStorage, StorageError> {
        let root = root.into();
        let staging = root.join(STAGING);
        std::fs::create_dir_all(&staging).map_err(|source| StorageError::Io {
            key: staging.display().to_string(),
            source,
        })?;
        Ok(FsStorage { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// A fresh file name under `staging/`.
    fn staging_path(&self) -> PathBuf {
        self.root.join(STAGING).join(unique_name("put"))
    }

    async fn write_staged(&self, key: &str, data: &[u8]) -> Result<PathBuf, StorageError> {
        let staged = self.staging_path();
        tokio::fs::write(&staged, data)
            .await
            .map_err(|e| io(key, e))?;
        Ok(staged)
    }
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
        let staged = self.write_staged(key, &data).await?;
        ensure_parent(&path, key).await?;
        if let Err(e) = tokio::fs::rename(&staged, &path).await {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(io(key, e));
        }
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let path = self.path(key)?;
        let staged = self.write_staged(key, &data).await?;
        ensure_parent(&path, key).await?;
        // link(2) fails if the target exists: an atomic create-if-absent.
        let linked = tokio::fs::hard_link(&staged, &path).await;
        let _ = tokio::fs::remove_file(&staged).await;
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn put_file(&self, key: &str, file: &Path) -> Result<(), StorageError> {
        let path = match self.path(key) {
            Ok(path) => path,
            Err(e) => {
                let _ = tokio::fs::remove_file(file).await;
                return Err(e);
            }
        };
        let result = async {
            // Content-addressed: an object already in place has these bytes.
            if tokio::fs::try_exists(&path).await.map_err(|e| io(key, e))? {
                return Ok(());
            }
            ensure_parent(&path, key).await?;
            if tokio::fs::rename(file, &path).await.is_ok() {
                return Ok(());
            }
            // Another filesystem: copy into staging, then move into place.
            let staged = self.staging_path();
            tokio::fs::copy(file, &staged)
                .await
                .map_err(|e| io(key, e))?;
            tokio::fs::rename(&staged, &path)
                .await
                .map_err(|e| io(key, e))
        }
        .await;
        let _ = tokio::fs::remove_file(file).await;
        result
    }

    async fn download(&self, key: &str) -> Result<Option<Download>, StorageError> {
        let file = match tokio::fs::File::open(self.path(key)?).await {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(key, e)),
        };
        let size = file.metadata().await.map_err(|e| io(key, e))?.len();
        Ok(Some(Download::Stream {
            size,
            body: Box::pin(file),
        }))
    }

    fn local_staging_dir(&self) -> Option<PathBuf> {
        Some(self.root.join(STAGING))
    }
}
