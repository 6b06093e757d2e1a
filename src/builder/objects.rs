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
    /// upload.
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
                let packed = match packed_or_error(packed) {
                    Ok(packed) => packed,
                    Err(error) => {
                        // An unfinished multipart upload: nothing is
                        // visible, and the bucket's lifecycle rule ends it.
                        upload.abort();
                        return Err(error);
                    }
                };
                let staged = upload
                    .await
                    .map_err(|e| BuildError::Task(e.to_string()))??;
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
