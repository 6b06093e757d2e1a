//! In-memory storage: the key layout of [`crate::storage`] as a map held in
//! RAM. For tests of the router and dispatch that need no processes, bucket
//! or directory, and for throwaway local runs. Everything is forgotten when
//! the process exits.
//!
//! It behaves like the filesystem backend: keys are checked the same way,
//! writes are atomic (there is no `staging/`: an object appears whole under
//! the lock or not at all), and blobs are streamed by the registry itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::records::unix_now;
use super::{
    check_key, check_prefix, claimed_digest, is_its_digest, Check, Download, ETag, Listed, Storage,
    StorageError,
};

#[derive(Debug, Default)]
pub struct MemoryStorage {
    /// Key -> (bytes, Unix seconds written).
    objects: Mutex<BTreeMap<String, (Bytes, u64)>>,
    /// Storage operations answered (what a remote store would bill).
    calls: std::sync::atomic::AtomicU64,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    /// Every key present, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    /// Removes an object; `true` if there was one.
    pub fn remove(&self, key: &str) -> bool {
        self.map().remove(key).is_some()
    }

    /// How many storage operations were answered ([`Storage`] calls;
    /// `keys` and `remove` do not count).
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The map, for one storage operation.
    fn objects(&self) -> MutexGuard<'_, BTreeMap<String, (Bytes, u64)>> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.map()
    }

    /// The map, even if a panicking thread poisoned the lock: every change
    /// is a single map operation, so the map is never left half-changed.
    fn map(&self) -> MutexGuard<'_, BTreeMap<String, (Bytes, u64)>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A version of an object in memory: the hash of its bytes.
fn etag_of(data: &[u8]) -> ETag {
    ETag::new(crate::oci::digest::sha256_hex(data))
}

/// A file's bytes, if they are what `key` names.
async fn read_verified(key: &str, file: &Path) -> Result<Bytes, StorageError> {
    let data = tokio::fs::read(file).await.map_err(|e| io(key, e))?;
    is_its_digest(key, &crate::oci::digest::sha256_hex(&data))?;
    Ok(Bytes::from(data))
}

fn io(key: &str, source: std::io::Error) -> StorageError {
    StorageError::Io {
        key: key.to_string(),
        source,
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        check_key(key)?;
        Ok(self.objects().get(key).map(|(data, _)| data.clone()))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        check_key(key)?;
        Ok(self.objects().get(key).map(|(data, _)| data.len() as u64))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        check_key(key)?;
        self.objects().insert(key.to_string(), (data, unix_now()));
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        check_key(key)?;
        let mut objects = self.objects();
        if objects.contains_key(key) {
            return Ok(false);
        }
        objects.insert(key.to_string(), (data, unix_now()));
        Ok(true)
    }

    async fn put_file(&self, key: &str, file: &Path) -> Result<(), StorageError> {
        let result = async {
            claimed_digest(key)?;
            // Content-addressed: an object already in place is kept, so the
            // file need not even be read.
            if self.objects().contains_key(key) {
                return Ok(());
            }
            let data = read_verified(key, file).await?;
            // Another writer may have got there while the file was read.
            self.objects()
                .entry(key.to_string())
                .or_insert((data, unix_now()));
            Ok(())
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
            claimed_digest(key)?;
            let data = read_verified(key, file).await?;
            let mut objects = self.objects();
            match objects.get(key) {
                Some((found, _)) if etag_of(found) == *damaged => {
                    objects.insert(key.to_string(), (data, unix_now()));
                    Ok(())
                }
                _ => Err(StorageError::Changed {
                    key: key.to_string(),
                }),
            }
        }
        .await;
        let _ = tokio::fs::remove_file(file).await;
        result
    }

    async fn check(&self, key: &str, size: u64, hex: &str) -> Result<Check, StorageError> {
        check_key(key)?;
        let Some(data) = self.objects().get(key).map(|(data, _)| data.clone()) else {
            return Ok(Check::Absent);
        };
        let found = crate::oci::digest::sha256_hex(&data);
        Ok(if data.len() as u64 == size && found == hex {
            Check::Good
        } else {
            Check::Corrupt(ETag::new(found))
        })
    }

    async fn download(&self, key: &str) -> Result<Option<Download>, StorageError> {
        check_key(key)?;
        let Some(data) = self.objects().get(key).map(|(data, _)| data.clone()) else {
            return Ok(None);
        };
        Ok(Some(Download::Stream {
            size: data.len() as u64,
            body: Box::pin(std::io::Cursor::new(data)),
        }))
    }

    fn local_staging_dir(&self) -> Option<PathBuf> {
        None
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        check_prefix(prefix)?;
        Ok(self
            .objects()
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, (data, modified))| Listed {
                key: key.clone(),
                size: data.len() as u64,
                modified: *modified,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        self.objects().remove(key);
        Ok(())
    }

    async fn modified(&self, key: &str) -> Result<Option<u64>, StorageError> {
        check_key(key)?;
        Ok(self.objects().get(key).map(|(_, modified)| *modified))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn put_if_absent_has_exactly_one_winner() {
        let storage = Arc::new(MemoryStorage::new());
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32u8)
            .map(|i| {
                let storage = storage.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let won = storage
                        .put_if_absent("builds/k", Bytes::from(vec![i]))
                        .await
                        .unwrap();
                    (i, won)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let (i, won) = task.await.unwrap();
            if won {
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "winners: {winners:?}");
        let stored = storage.get("builds/k").await.unwrap().unwrap();
        assert_eq!(stored.as_ref(), &[winners[0]]);
        assert_eq!(storage.keys(), ["builds/k"]);
    }

    #[tokio::test]
    async fn put_file_consumes_the_file_even_when_the_key_exists() {
        let dir = tempfile::tempdir().unwrap();
        let storage = MemoryStorage::new();
        let key = crate::storage::keys::BlobKey::of(&crate::oci::digest::sha256_hex(b"original"))
            .to_string();

        let first = dir.path().join("first");
        std::fs::write(&first, b"original").unwrap();
        storage.put_file(&key, &first).await.unwrap();
        assert!(!first.exists(), "put_file must consume its file");

        // Already there: kept, and the file is not even read.
        let again = dir.path().join("again");
        std::fs::write(&again, b"different bytes").unwrap();
        storage.put_file(&key, &again).await.unwrap();
        assert!(!again.exists(), "put_file must consume its file");
        assert_eq!(storage.get(&key).await.unwrap().unwrap(), "original");

        // An invalid key, or one that names no digest, is refused, and the
        // file is still consumed.
        for bad_key in ["../escape", "images/x", "blobs/sha256/aa"] {
            let bad = dir.path().join("bad");
            std::fs::write(&bad, b"x").unwrap();
            assert!(matches!(
                storage.put_file(bad_key, &bad).await,
                Err(StorageError::InvalidKey { .. })
            ));
            assert!(!bad.exists(), "put_file must consume its file");
        }

        // A missing file is an error and writes nothing.
        let missing =
            crate::storage::keys::BlobKey::of(&crate::oci::digest::sha256_hex(b"missing"))
                .to_string();
        assert!(matches!(
            storage
                .put_file(&missing, &dir.path().join("missing"))
                .await,
            Err(StorageError::Io { .. })
        ));
        assert_eq!(storage.keys(), [key]);
    }

    #[tokio::test]
    async fn download_streams_the_bytes() {
        let storage = MemoryStorage::new();
        assert!(storage.download("blobs/sha256/cc").await.unwrap().is_none());
        storage
            .put("blobs/sha256/cc", Bytes::from_static(b"streamed"))
            .await
            .unwrap();
        let Some(Download::Stream { size, mut body }) =
            storage.download("blobs/sha256/cc").await.unwrap()
        else {
            panic!("no stream")
        };
        let mut bytes = Vec::new();
        body.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(size, 8);
        assert_eq!(bytes, b"streamed");
        assert!(storage.local_staging_dir().is_none());
        assert!(storage.remove("blobs/sha256/cc"));
        assert!(storage.keys().is_empty());
    }
}
