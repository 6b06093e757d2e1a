//! How a build's content-addressed objects reach storage: every layer
//! through [`Objects::store_layer`], every other blob and manifest through
//! [`Objects::store_blob`], the SBOM through [`Objects::store_artifact`].
//! So reuse, the check of what is stored, scratch-file clean-up and layer
//! records work the same for every layer and every source of store paths.
//!
//! A build that relies on an object it finds stored tells garbage
//! collection so before it relies on it (see `crate::gc`): a reused layer's
//! record is written again, and any other object found good, which is
//! never written again, gets a hold (`holds/<hex>`). Then it looks once
//! more that the object is there: a collection that doomed it earlier may
//! have deleted it between the check and the record, and it is stored
//! again.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::compress::Compression;
use super::pack::{LayerWriter, PackError, Packed};
use super::BuildError;
use crate::oci::digest::{hex_of, sha256_digest};
use crate::oci::manifest::{self, Descriptor, Manifest};
use crate::storage::keys::{BlobKey, LayerKey, LayerRecordKey, ManifestKey, ReferrersKey};
use crate::storage::records::{self, LayerRecord};
use crate::storage::{self, Check, Storage, StorageError};

/// Where a layer's bytes go while it is packed: a local file, or parts of
/// an upload streamed to the backend (no disk needed).
pub enum Sink {
    File(std::io::BufWriter<std::fs::File>),
    Parts(storage::PartWriter),
}

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::File(file) => file.write(buf),
            Sink::Parts(parts) => parts.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File(file) => file.flush(),
            Sink::Parts(parts) => parts.flush(),
        }
    }
}

impl Sink {
    /// Everything written is where it goes: on disk, or handed to the
    /// upload with the end of the layer (an upload whose writer is dropped
    /// without this is abandoned, see [`storage::Streamed`]).
    fn close(self) -> std::io::Result<()> {
        match self {
            Sink::File(file) => file.into_inner().map_err(|e| e.into_error())?.sync_all(),
            Sink::Parts(parts) => parts.finish(),
        }
    }
}

/// Packs a layer into `sink` with `job`, on this (blocking) thread.
fn pack_into(
    sink: Sink,
    compression: Compression,
    cancelled: Arc<AtomicBool>,
    job: Job,
) -> Result<Packed, PackError> {
    let mut writer = LayerWriter::new(sink, compression)?;
    writer.cancel_on(cancelled);
    job(&mut writer)?;
    let (packed, sink) = writer.finish()?;
    sink.close().map_err(|source| PackError::Io {
        path: PathBuf::from("<layer>"),
        source,
    })?;
    Ok(packed)
}

/// What writes a layer's entries, on a blocking thread.
pub type Job = Box<dyn FnOnce(&mut LayerWriter<Sink>) -> Result<(), PackError> + Send>;

/// What a finished build did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildStats {
    /// From the start of the build (after waiting for a slot) to its record.
    pub elapsed_ms: u64,
    pub layers_new: usize,
    pub layers_reused: usize,
    /// Bytes of the new layers (compressed): what was uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of every layer of the image (compressed).
    pub bytes_total: u64,
    /// Assembled from a binary cache, not built with Nix.
    #[serde(default)]
    pub assembled: bool,
}

impl BuildStats {
    pub(super) fn count(&mut self, record: &LayerRecord, reused: bool) {
        self.bytes_total += record.size;
        if reused {
            self.layers_reused += 1;
        } else {
            self.layers_new += 1;
            self.bytes_uploaded += record.size;
        }
    }
}

/// A blob bound for `blobs/sha256/<hex>` or `manifests/sha256/<hex>`.
enum Blob {
    /// A packed file in scratch space; consumed by storing it.
    File { path: PathBuf, packed: Packed },
    /// A packed layer streamed to the backend, staged there.
    Staged {
        staged: storage::Staged,
        packed: Packed,
    },
    /// Small bytes (an image config, a manifest).
    Bytes { digest: String, bytes: Bytes },
}

/// The writer of one storage's content-addressed objects.
#[derive(Clone)]
pub struct Objects {
    storage: Arc<dyn Storage>,
}

impl Objects {
    pub fn new(storage: Arc<dyn Storage>) -> Objects {
        Objects { storage }
    }

    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// One layer under `key`: its record if the blob is still there, else
    /// `job` writes it (on a blocking thread), the blob is stored and the
    /// record written. `true`: reused. A reused layer's record is written
    /// again, which tells garbage collection that a build relies on its
    /// blob (see `crate::gc`), and the blob is looked at once more.
    pub async fn store_layer(
        &self,
        image: &str,
        key: &LayerKey,
        compression: Compression,
        cancelled: &Arc<AtomicBool>,
        job: Job,
    ) -> Result<(LayerRecord, bool), BuildError> {
        let record_key = LayerRecordKey::of(key);
        if let Some(record) = records::read::<LayerRecord>(&*self.storage, &record_key).await? {
            let blob = BlobKey::of_digest(&record.digest);
            match self
                .storage
                .check(&blob, record.size, hex_of(&record.digest))
                .await?
            {
                Check::Good => {
                    records::write(&*self.storage, &record_key, &record).await?;
                    if self.storage.head(&blob).await?.is_some() {
                        return Ok((record, true));
                    }
                    tracing::warn!(image, layer = %key, digest = %record.digest, "stored layer was collected while this build checked it; packing it again");
                }
                Check::Absent => {}
                Check::Corrupt(_) => {
                    tracing::warn!(image, layer = %key, digest = %record.digest, "stored layer is damaged; packing it again");
                }
            }
        }
        let started = Instant::now();
        let cancelled = cancelled.clone();
        let (packed, blob) = match self.storage.begin_stream().await? {
            // Streamed to the backend as it is packed: no local file.
            Some(streamed) => {
                let upload = tokio::spawn(streamed.upload);
                let sink = Sink::Parts(streamed.writer);
                let packed = tokio::task::spawn_blocking(move || {
                    pack_into(sink, compression, cancelled, job)
                })
                .await;
                let uploaded = |joined: Result<_, tokio::task::JoinError>| {
                    joined.map_err(|e| BuildError::Task(e.to_string()))
                };
                let packed = match packed_or_error(packed) {
                    Ok(packed) => packed,
                    Err(error) => {
                        // The writer went unfinished with the packing
                        // task, so the upload drops what it sent: it is
                        // awaited, never aborted, so that it does.
                        return Err(match (uploaded(upload.await)?, error) {
                            // The upload failed first, and the writer
                            // could not go on: a failure of storage.
                            (Err(failed), BuildError::Pack(PackError::Io { .. }))
                                if !matches!(failed, StorageError::Abandoned { .. }) =>
                            {
                                failed.into()
                            }
                            (Err(_), error) => error,
                            (Ok(staged), error) => {
                                self.storage.discard_streamed(staged).await;
                                error
                            }
                        });
                    }
                };
                let staged = uploaded(upload.await)??;
                let blob = Blob::Staged {
                    staged,
                    packed: packed.clone(),
                };
                (packed, blob)
            }
            None => {
                let out = self.scratch_file("layer");
                let path = out.clone();
                let packed = tokio::task::spawn_blocking(move || {
                    let file = std::fs::File::create(&path).map_err(|source| PackError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    let sink = Sink::File(std::io::BufWriter::with_capacity(256 * 1024, file));
                    pack_into(sink, compression, cancelled, job)
                })
                .await;
                let packed = match packed_or_error(packed) {
                    Ok(packed) => packed,
                    Err(error) => {
                        let _ = tokio::fs::remove_file(&out).await;
                        return Err(error);
                    }
                };
                let blob = Blob::File {
                    path: out,
                    packed: packed.clone(),
                };
                (packed, blob)
            }
        };
        let record = LayerRecord {
            digest: packed.digest.clone(),
            diff_id: packed.diff_id.clone(),
            size: packed.size,
            media_type: compression.media_type().to_string(),
        };
        tracing::info!(
            image,
            layer = %key,
            digest = %packed.digest,
            size = packed.size,
            tar_size = packed.tar_size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "layer packed"
        );
        self.store_blob(&BlobKey::of_digest(&packed.digest), blob)
            .await?;
        records::write(&*self.storage, &record_key, &record).await?;
        Ok((record, false))
    }

    /// Small bytes (a config, an SBOM document) under `blobs/`.
    pub async fn store_small_blob(&self, digest: &str, bytes: Bytes) -> Result<bool, BuildError> {
        let key = BlobKey::of_digest(digest);
        let blob = Blob::Bytes {
            digest: digest.to_string(),
            bytes,
        };
        self.store_blob(&key, blob).await
    }

    /// A manifest (or index) under `manifests/`; its digest.
    pub async fn store_manifest(&self, bytes: Vec<u8>) -> Result<String, BuildError> {
        let digest = sha256_digest(&bytes);
        let key = ManifestKey::of_digest(&digest);
        let blob = Blob::Bytes {
            digest: digest.clone(),
            bytes: Bytes::from(bytes),
        };
        self.store_blob(&key, blob).await?;
        Ok(digest)
    }

    /// An artifact about `subject` (its SBOM): the document as a blob, the
    /// empty config, an artifact manifest naming both and the subject,
    /// and the subject's referrers index listing it. The manifest's digest.
    pub async fn store_artifact(
        &self,
        subject: Descriptor,
        artifact_type: &str,
        document: Vec<u8>,
    ) -> Result<String, BuildError> {
        let empty = Bytes::from_static(manifest::EMPTY_JSON);
        let config = Descriptor::of(manifest::MEDIA_TYPE_EMPTY, &empty);
        let layer = Descriptor::of(artifact_type, &document);
        self.store_small_blob(&config.digest, empty).await?;
        self.store_small_blob(&layer.digest, Bytes::from(document))
            .await?;
        let subject_hex = hex_of(&subject.digest).to_string();
        let artifact = Manifest {
            artifact_type: Some(artifact_type.to_string()),
            subject: Some(subject),
            ..Manifest::new(config, vec![layer])
        }
        .to_bytes();
        let listed = Descriptor {
            artifact_type: Some(artifact_type.to_string()),
            ..Descriptor::of(manifest::MEDIA_TYPE_MANIFEST, &artifact)
        };
        let digest = self.store_manifest(artifact).await?;
        // The newest build's artifact is the one listed: a rebuild of an
        // image (the same manifest) describes it anew.
        let referrers = manifest::ImageIndex::new(vec![listed]).to_bytes();
        self.storage
            .put(&ReferrersKey::of(&subject_hex), Bytes::from(referrers))
            .await?;
        Ok(digest)
    }

    /// The one way a content-addressed object (a layer, a config, a
    /// manifest) reaches storage: kept if the stored object is good,
    /// created if absent, replaced if found corrupt (over that damaged
    /// version only); never overwritten otherwise. `true`: written.
    async fn store_blob(&self, key: &str, blob: Blob) -> Result<bool, BuildError> {
        let (digest, size) = match &blob {
            Blob::File { packed, .. } | Blob::Staged { packed, .. } => {
                (packed.digest.clone(), packed.size)
            }
            Blob::Bytes { digest, bytes } => (digest.clone(), bytes.len() as u64),
        };
        // Small objects take the same way as files, so that every write of
        // a content-addressed key is a conditional one.
        let body = match blob {
            Blob::File { path, .. } => Body::File(path),
            Blob::Staged { staged, .. } => Body::Staged(staged),
            Blob::Bytes { bytes, .. } => {
                let path = self.scratch_file("object");
                if let Err(source) = tokio::fs::write(&path, &bytes).await {
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(StorageError::Io {
                        key: key.to_string(),
                        source,
                    }
                    .into());
                }
                Body::File(path)
            }
        };
        let found = match self.storage.check(key, size, hex_of(&digest)).await {
            Ok(found) => found,
            Err(error) => {
                body.discard(&*self.storage).await;
                return Err(error.into());
            }
        };
        let written = found != Check::Good;
        // Each consumes the file, whatever the outcome. A good object is
        // never written over (storage offers no way to), small or not: it is
        // held instead, and stored again if it went meanwhile.
        match found {
            Check::Good => {
                let held = async {
                    records::hold(&*self.storage, key).await?;
                    self.storage.head(key).await
                };
                match held.await {
                    Ok(Some(_)) => body.discard(&*self.storage).await,
                    Ok(None) => {
                        tracing::warn!(%digest, key, "stored object was collected while this build checked it; writing it again");
                        body.put(&*self.storage, key, None).await?;
                        return Ok(true);
                    }
                    Err(error) => {
                        body.discard(&*self.storage).await;
                        return Err(error.into());
                    }
                }
            }
            Check::Absent => body.put(&*self.storage, key, None).await?,
            Check::Corrupt(damaged) => {
                tracing::warn!(%digest, key, "stored object is damaged; writing it again");
                body.put(&*self.storage, key, Some(&damaged)).await?
            }
        }
        Ok(written)
    }

    /// A fresh path for a file bound for storage (only when the backend
    /// takes no streamed objects).
    fn scratch_file(&self, what: &str) -> PathBuf {
        let dir = self
            .storage
            .local_staging_dir()
            .unwrap_or_else(std::env::temp_dir);
        dir.join(storage::unique_name(what))
    }
}

/// What a content-addressed object is stored from.
enum Body {
    /// A local file, consumed by storing it.
    File(PathBuf),
    /// An object streamed to the backend.
    Staged(storage::Staged),
}

impl Body {
    /// Stores it under `key`: created, or over the `damaged` version.
    async fn put(
        self,
        storage: &dyn Storage,
        key: &str,
        damaged: Option<&storage::ETag>,
    ) -> Result<(), StorageError> {
        match (self, damaged) {
            (Body::File(path), None) => storage.put_file(key, &path).await,
            (Body::File(path), Some(damaged)) => storage.replace_file(key, &path, damaged).await,
            // Placed, or stored by someone else meanwhile (`false`): either
            // way it is there now.
            (Body::Staged(staged), damaged) => {
                storage.place_streamed(staged, key, damaged).await.map(drop)
            }
        }
    }

    /// Drops it, unstored.
    async fn discard(self, storage: &dyn Storage) {
        match self {
            Body::File(path) => {
                let _ = tokio::fs::remove_file(&path).await;
            }
            Body::Staged(staged) => storage.discard_streamed(staged).await,
        }
    }
}

/// What a packing task gave: the layer, or the build's error.
fn packed_or_error(
    joined: Result<Result<Packed, PackError>, tokio::task::JoinError>,
) -> Result<Packed, BuildError> {
    joined
        .map_err(|e| BuildError::Task(e.to_string()))
        .and_then(|packed| {
            packed.map_err(|error| match error {
                // The source cannot give this layer: the build may go to
                // another source.
                PackError::NotHere(reason) => BuildError::NotHere(reason),
                other => BuildError::from(other),
            })
        })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::storage::{Download, ETag, Listed, MemoryStorage, Next, PartWriter, Streamed};

    /// How the fake's upload ends when its writer stops unfinished.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Upload {
        /// Takes every part, like S3.
        Takes,
        /// Fails at its first part, as against a dead endpoint.
        FailsAtItsFirstPart,
    }

    /// Memory storage that takes streamed objects, noting how each
    /// upload ended.
    struct Streaming {
        inner: MemoryStorage,
        upload: Upload,
        ended: Arc<Mutex<Vec<Next>>>,
    }

    impl Streaming {
        fn new(upload: Upload) -> Arc<Streaming> {
            Arc::new(Streaming {
                inner: MemoryStorage::new(),
                upload,
                ended: Arc::default(),
            })
        }
    }

    #[async_trait]
    impl Storage for Streaming {
        async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
            self.inner.get(key).await
        }
        async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
            self.inner.head(key).await
        }
        async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
            self.inner.put(key, data).await
        }
        async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
            self.inner.put_if_absent(key, data).await
        }
        async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
            self.inner.put_file(key, path).await
        }
        async fn replace_file(
            &self,
            key: &str,
            path: &Path,
            damaged: &ETag,
        ) -> Result<(), StorageError> {
            self.inner.replace_file(key, path, damaged).await
        }
        async fn check(&self, key: &str, size: u64, hex: &str) -> Result<Check, StorageError> {
            self.inner.check(key, size, hex).await
        }
        async fn download(&self, key: &str) -> Result<Option<Download>, StorageError> {
            self.inner.download(key).await
        }
        fn local_staging_dir(&self) -> Option<PathBuf> {
            None
        }
        async fn begin_stream(&self) -> Result<Option<Streamed>, StorageError> {
            let (writer, mut parts) = PartWriter::new(1024);
            let (upload, ended) = (self.upload, self.ended.clone());
            let key = "staging/upload".to_string();
            Ok(Some(Streamed {
                writer,
                upload: Box::pin(async move {
                    loop {
                        let next = parts.next().await;
                        let failing = upload == Upload::FailsAtItsFirstPart;
                        match next {
                            Next::Part(_) if failing => {
                                return Err(StorageError::Backend {
                                    key,
                                    operation: "UploadPart",
                                    message: "connection refused".to_string(),
                                })
                            }
                            Next::Part(_) => continue,
                            Next::End => {
                                ended.lock().unwrap().push(next);
                                return Ok(storage::Staged { key, size: 0 });
                            }
                            Next::Abandoned => {
                                // As S3 takes a while to abort an upload.
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                                ended.lock().unwrap().push(next);
                                return Err(StorageError::Abandoned { key });
                            }
                        }
                    }
                }),
            }))
        }
        async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }
        async fn modified(&self, key: &str) -> Result<Option<u64>, StorageError> {
            self.inner.modified(key).await
        }
    }

    /// Writes far more than a part of bytes that do not compress, then
    /// fails as `then` says.
    fn job(then: Result<(), PackError>) -> Job {
        Box::new(move |writer| {
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let noise: Vec<u8> = (0..256 * 1024)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            writer.bytes(Path::new("noise"), 0o444, &noise)?;
            then
        })
    }

    async fn store(storage: Arc<Streaming>, job: Job) -> Result<(LayerRecord, bool), BuildError> {
        let key = LayerKey::hash_of(b"a layer");
        Objects::new(storage)
            .store_layer(
                "test",
                &key,
                Compression::Gzip,
                &Arc::new(AtomicBool::new(false)),
                job,
            )
            .await
    }

    #[tokio::test]
    async fn a_layer_that_fails_to_pack_abandons_its_upload_before_the_build_goes_on() {
        let storage = Streaming::new(Upload::Takes);
        let stored = store(storage.clone(), job(Err(PackError::Cancelled))).await;
        assert!(
            matches!(stored, Err(BuildError::Pack(PackError::Cancelled))),
            "{stored:?}"
        );
        // Awaited to its end, which it took for an abandonment, not the
        // end of the layer (nor was it cut short before it could tell).
        assert_eq!(*storage.ended.lock().unwrap(), vec![Next::Abandoned]);
        assert_eq!(storage.inner.list("layers/").await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn an_upload_that_fails_under_the_packing_is_a_failure_of_storage() {
        let storage = Streaming::new(Upload::FailsAtItsFirstPart);
        let stored = store(storage.clone(), job(Ok(()))).await;
        assert!(
            matches!(
                stored,
                Err(BuildError::Storage(StorageError::Backend { .. }))
            ),
            "{stored:?}"
        );
        assert_eq!(
            stored.unwrap_err().verdict(),
            crate::builder::Verdict::Retry(crate::builder::Retry::Storage)
        );
    }
}
