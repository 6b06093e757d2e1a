//! A storage that passes every call on to another after a hook has seen
//! it: the one place tests inject a fault into storage, record what a
//! build writes, or run something (a build, a pull) at the moment a given
//! call happens.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use nixery::storage::{Intercepted, MemoryStorage, Op, Storage, StorageError};
//! let storage = Intercepted::new(Arc::new(MemoryStorage::new()), |op, key| match op {
//!     Op::Delete => Err(StorageError::Backend {
//!         key: key.to_string(),
//!         operation: "DeleteObject",
//!         message: "AccessDenied".to_string(),
//!     }),
//!     _ => Ok(()),
//! });
//! storage.put("images/x", "{}".into()).await.unwrap();
//! assert!(storage.delete("images/x").await.is_err());
//! assert!(storage.get("images/x").await.unwrap().is_some());
//! # });
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{Check, Download, ETag, Listed, Staged, Storage, StorageError, Streamed};

/// The calls a hook sees, each with the key (or prefix) it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Head,
    Put,
    PutIfAbsent,
    PutFile,
    ReplaceFile,
    Check,
    Download,
    PlaceStreamed,
    List,
    ListFirst,
    Delete,
    Modified,
}

impl Op {
    /// Whether the call writes an object.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Op::Put | Op::PutIfAbsent | Op::PutFile | Op::ReplaceFile | Op::PlaceStreamed
        )
    }
}

type Hook = Box<dyn Fn(Op, &str) -> BoxFuture<'static, Result<(), StorageError>> + Send + Sync>;

/// `inner`, with a hook run before each call that names a key: an error
/// from the hook is the call's, and the inner storage is not called.
/// Calls that name no key (`local_staging_dir`, `begin_stream`,
/// `discard_streamed`) go straight through.
pub struct Intercepted {
    inner: Arc<dyn Storage>,
    hook: Hook,
}

impl Intercepted {
    /// With a hook that answers at once.
    pub fn new<F>(inner: Arc<dyn Storage>, hook: F) -> Intercepted
    where
        F: Fn(Op, &str) -> Result<(), StorageError> + Send + Sync + 'static,
    {
        Intercepted::new_async(inner, move |op, key| {
            let answer = hook(op, key);
            Box::pin(async move { answer })
        })
    }

    /// With a hook that may wait (run a build, say) before the call goes on.
    pub fn new_async<F>(inner: Arc<dyn Storage>, hook: F) -> Intercepted
    where
        F: Fn(Op, &str) -> BoxFuture<'static, Result<(), StorageError>> + Send + Sync + 'static,
    {
        Intercepted {
            inner,
            hook: Box::new(hook),
        }
    }

    /// The storage calls go on to.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    async fn before(&self, op: Op, key: &str) -> Result<(), StorageError> {
        (self.hook)(op, key).await
    }
}

#[async_trait]
impl Storage for Intercepted {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        self.before(Op::Get, key).await?;
        self.inner.get(key).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        self.before(Op::Head, key).await?;
        self.inner.head(key).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.before(Op::Put, key).await?;
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        self.before(Op::PutIfAbsent, key).await?;
        self.inner.put_if_absent(key, data).await
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        self.before(Op::PutFile, key).await?;
        self.inner.put_file(key, path).await
    }

    async fn replace_file(
        &self,
        key: &str,
        path: &Path,
        damaged: &ETag,
    ) -> Result<(), StorageError> {
        self.before(Op::ReplaceFile, key).await?;
        self.inner.replace_file(key, path, damaged).await
    }

    async fn check(&self, key: &str, size: u64, hex: &str) -> Result<Check, StorageError> {
        self.before(Op::Check, key).await?;
        self.inner.check(key, size, hex).await
    }

    async fn download(&self, key: &str) -> Result<Option<Download>, StorageError> {
        self.before(Op::Download, key).await?;
        self.inner.download(key).await
    }

    fn local_staging_dir(&self) -> Option<PathBuf> {
        self.inner.local_staging_dir()
    }

    async fn begin_stream(&self) -> Result<Option<Streamed>, StorageError> {
        self.inner.begin_stream().await
    }

    async fn place_streamed(
        &self,
        staged: Staged,
        key: &str,
        damaged: Option<&ETag>,
    ) -> Result<bool, StorageError> {
        self.before(Op::PlaceStreamed, key).await?;
        self.inner.place_streamed(staged, key, damaged).await
    }

    async fn discard_streamed(&self, staged: Staged) {
        self.inner.discard_streamed(staged).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        self.before(Op::List, prefix).await?;
        self.inner.list(prefix).await
    }

    async fn list_first(&self, prefix: &str, max: usize) -> Result<Vec<Listed>, StorageError> {
        self.before(Op::ListFirst, prefix).await?;
        self.inner.list_first(prefix, max).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.before(Op::Delete, key).await?;
        self.inner.delete(key).await
    }

    async fn modified(&self, key: &str) -> Result<Option<u64>, StorageError> {
        self.before(Op::Modified, key).await?;
        self.inner.modified(key).await
    }
}
