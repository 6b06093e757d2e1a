//! Building images: from an [`ImageSpec`] to a stored, servable image.
//!
//! [`Builder`] does the work (Nix, layering, packing, uploading) wherever
//! Nix is; [`Dispatch`] is how the registry gets a build done: in-process
//! ([`local::in_process`]) or through a queue to workers ([`queue::SqsDispatch`]),
//! each behind [`local::SingleFlight`].
//!
//! A build writes, in this order: layer blobs and their records, the
//! customisation layer, the config, the manifest, and last the image record
//! `images/<image-key>`: the commit point. A build that stops anywhere before
//! that leaves no visible image, only reusable layers.

pub mod local;
pub mod queue;
pub mod status;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The time in Unix seconds, as records store it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::customisation::{customise, CustomisationError};
use crate::image::{Arch, ImageSpec};
use crate::layers::{self, Layer};
use crate::manifest::{self, Descriptor, ImageConfig, Manifest};
use crate::nix::{Nix, NixError, ResolveRequest, SourceArg};
use crate::pack::{self, PackError, Packed};
use crate::popularity::Popularity;
use crate::source::Resolved;
use crate::storage::{self, Storage, StorageError};

/// Bumped whenever the bytes of images built from the same inputs change.
const IMAGE_FORMAT: u32 = 1;

/// Everything a build needs to know, and the key it is stored under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    pub image_key: String,
    pub packages: Vec<String>,
    pub system: String,
    pub architecture: String,
    pub source: SourceArg,
    pub layer_budget: usize,
    /// Packages added to every image when the package set has them.
    #[serde(default)]
    pub implicit: Vec<String>,
    /// A stored image built before this time (Unix seconds) is stale: its
    /// source has moved on since.
    #[serde(default)]
    pub not_before: u64,
}

impl BuildRequest {
    /// The request for an image spec: packages (sorted), architecture, the
    /// resolved package source and the implicit packages all go into the key.
    pub fn new(
        spec: &ImageSpec,
        source: &Resolved,
        layer_budget: usize,
        implicit: &[String],
    ) -> BuildRequest {
        let packages: Vec<String> = spec.packages.iter().cloned().collect();
        let image_key = image_key(&packages, spec.arch, &source.arg, layer_budget, implicit);
        BuildRequest {
            image_key,
            packages,
            system: spec.arch.nix_system().to_string(),
            architecture: spec.arch.oci_name().to_string(),
            source: source.arg.clone(),
            layer_budget,
            implicit: implicit.to_vec(),
            not_before: 0,
        }
    }
}

/// The storage key of an image: a hash of everything that decides its bytes.
pub fn image_key(
    packages: &[String],
    arch: Arch,
    source: &SourceArg,
    layer_budget: usize,
    implicit: &[String],
) -> String {
    let canonical = serde_json::json!({
        "format": IMAGE_FORMAT,
        "packages": packages,
        "implicit": implicit,
        "system": arch.nix_system(),
        "source": source,
        "layerBudget": layer_budget,
        "compression": pack::COMPRESSION,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// `images/<image-key>`: a finished image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest_digest: String,
    pub media_type: String,
    pub size: u64,
    pub packages: Vec<String>,
    pub architecture: String,
    /// Unix seconds; only in the record, never in the image.
    pub built_at: u64,
}

/// `layers/<layer-key>`: a layer blob that any image may reuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
    pub media_type: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("unknown packages: {}", .0.join(", "))]
    UnknownPackages(Vec<String>),
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Customisation(#[from] CustomisationError),
    #[error("stored record {key} is unreadable: {source}")]
    Record {
        key: String,
        source: serde_json::Error,
    },
    #[error("build task failed: {0}")]
    Task(String),
    #[error("the queue's {operation} failed: {message}")]
    Queue {
        operation: &'static str,
        message: String,
    },
    #[error("the build failed: {0}")]
    Failed(String),
    #[error("the image is still being built{}", .step.as_ref().map(|s| format!(" (at step {s})")).unwrap_or_default())]
    StillBuilding { step: Option<String> },
}

/// How the registry gets an image built.
#[async_trait]
pub trait Dispatch: Send + Sync + 'static {
    /// Builds the image (or waits for the build already under way) and
    /// returns its record.
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, Arc<BuildError>>;
}

/// Reads a JSON record; `None` if absent.
pub async fn read_record<T: for<'de> Deserialize<'de>>(
    storage: &dyn Storage,
    key: &str,
) -> Result<Option<T>, BuildError> {
    match storage.get(key).await? {
        None => Ok(None),
        Some(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| BuildError::Record {
                    key: key.to_string(),
                    source,
                })
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("records always serialise"))
}

/// The hex part of `sha256:<hex>`.
pub(crate) fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Runs builds with the local Nix, writing to storage.
pub struct Builder {
    nix: Nix,
    storage: Arc<dyn Storage>,
    popularity: Arc<Popularity>,
}

impl Builder {
    pub fn new(nix: Nix, storage: Arc<dyn Storage>, popularity: Arc<Popularity>) -> Builder {
        Builder {
            nix,
            storage,
            popularity,
        }
    }

    /// Builds one image, or returns the record if it is already built.
    pub async fn build(&self, request: &BuildRequest) -> Result<ImageRecord, BuildError> {
        self.build_reporting(request, None).await
    }

    /// [`Builder::build`], telling `progress` each step as it starts.
    pub async fn build_reporting(
        &self,
        request: &BuildRequest,
        progress: Option<&watch::Sender<String>>,
    ) -> Result<ImageRecord, BuildError> {
        let key = storage::image_key(&request.image_key);
        if let Some(record) = read_record::<ImageRecord>(&*self.storage, &key).await? {
            if record.built_at >= request.not_before {
                return Ok(record);
            }
        }
        let started = Instant::now();
        let image = request.image_key.as_str();
        tracing::info!(image, packages = ?request.packages, system = %request.system, "build started");
        let result = self.run(request, progress).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok((record, stats)) => tracing::info!(
                image,
                packages = ?request.packages,
                manifest = %record.manifest_digest,
                layers_new = stats.new,
                layers_reused = stats.reused,
                bytes_uploaded = stats.bytes_new,
                elapsed_ms,
                "build finished"
            ),
            Err(error) => {
                tracing::warn!(image, packages = ?request.packages, %error, elapsed_ms, "build failed")
            }
        }
        result.map(|(record, _)| record)
    }

    async fn run(
        &self,
        request: &BuildRequest,
        progress: Option<&watch::Sender<String>>,
    ) -> Result<(ImageRecord, LayerStats), BuildError> {
        let image = request.image_key.as_str();
        let report = |step: &str| {
            if let Some(progress) = progress {
                progress.send_replace(step.to_string());
            }
        };
        report("resolve");

        let step = Instant::now();
        let resolved = self
            .nix
            .resolve(&ResolveRequest {
                source: request.source.clone(),
                system: request.system.clone(),
                packages: request.packages.clone(),
                implicit: request.implicit.clone(),
            })
            .await?;
        tracing::info!(image, step = "resolve", elapsed_ms = step.elapsed().as_millis() as u64, unknown = ?resolved.unknown);
        if !resolved.unknown.is_empty() {
            return Err(BuildError::UnknownPackages(resolved.unknown));
        }

        report("realise");
        let step = Instant::now();
        self.nix.realise(&resolved.packages).await?;
        tracing::info!(
            image,
            step = "realise",
            elapsed_ms = step.elapsed().as_millis() as u64
        );

        let step = Instant::now();
        let outputs: Vec<String> = resolved
            .packages
            .iter()
            .flat_map(|p| p.paths.iter().cloned())
            .collect();
        let closure = self.nix.closure(&outputs).await?;
        let groups = layers::group(&closure, &outputs, &self.popularity, request.layer_budget);
        tracing::info!(
            image,
            step = "layering",
            elapsed_ms = step.elapsed().as_millis() as u64,
            paths = closure.len(),
            layers = groups.len()
        );

        report("layers");
        let step = Instant::now();
        let (mut descriptors, mut diff_ids, mut stats) = self.store_layers(image, groups).await?;
        tracing::info!(
            image,
            step = "layers",
            elapsed_ms = step.elapsed().as_millis() as u64,
            new = stats.new,
            reused = stats.reused
        );

        let step = Instant::now();
        let paths: Vec<String> = closure.keys().cloned().collect();
        let (custom, packed) = {
            let out = self.scratch_file("custom");
            let out2 = out.clone();
            let (custom, packed) = tokio::task::spawn_blocking(move || {
                let custom = customise(&outputs, &paths)?;
                let packed = pack::pack_tree(&custom.tree, &out2, pack::GZIP_LEVEL)?;
                Ok::<_, BuildError>((custom, packed))
            })
            .await
            .map_err(|e| BuildError::Task(e.to_string()))??;
            let blob = storage::blob_key(hex_of(&packed.digest));
            if self.storage.head(&blob).await? == Some(packed.size) {
                stats.reused += 1;
            } else {
                stats.new += 1;
                stats.bytes_new += packed.size;
            }
            self.storage.put_file(&blob, &out).await?;
            (custom, packed)
        };
        descriptors.push(layer_descriptor(&packed));
        diff_ids.push(packed.diff_id.clone());
        tracing::info!(image, step = "customisation", elapsed_ms = step.elapsed().as_millis() as u64, digest = %packed.digest);

        let config =
            ImageConfig::new(&request.architecture, diff_ids, custom.env, custom.cmd).to_bytes();
        let config_descriptor = Descriptor::of(manifest::MEDIA_TYPE_CONFIG, &config);
        self.storage
            .put(
                &storage::blob_key(hex_of(&config_descriptor.digest)),
                Bytes::from(config),
            )
            .await?;
        let manifest = Manifest::new(config_descriptor, descriptors).to_bytes();
        let manifest_digest = manifest::sha256_digest(&manifest);
        let size = manifest.len() as u64;
        self.storage
            .put(
                &storage::manifest_key(hex_of(&manifest_digest)),
                Bytes::from(manifest),
            )
            .await?;

        let record = ImageRecord {
            manifest_digest,
            media_type: manifest::MEDIA_TYPE_MANIFEST.to_string(),
            size,
            packages: request.packages.clone(),
            architecture: request.architecture.clone(),
            built_at: unix_now(),
        };
        self.storage
            .put(&storage::image_key(image), to_json(&record))
            .await?;
        Ok((record, stats))
    }

    /// Packs (or reuses) every layer, as many at a time as there are cores.
    async fn store_layers(
        &self,
        image: &str,
        groups: Vec<Layer>,
    ) -> Result<(Vec<Descriptor>, Vec<String>, LayerStats), BuildError> {
        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let results: Vec<Result<(LayerRecord, bool), BuildError>> =
            futures_util::stream::iter(groups)
                .map(|layer| self.store_layer(image, layer))
                .buffered(parallel)
                .collect()
                .await;
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut stats = LayerStats::default();
        for result in results {
            let (record, reused) = result?;
            if reused {
                stats.reused += 1;
            } else {
                stats.new += 1;
                stats.bytes_new += record.size;
            }
            descriptors.push(Descriptor {
                media_type: record.media_type,
                digest: record.digest,
                size: record.size,
            });
            diff_ids.push(record.diff_id);
        }
        Ok((descriptors, diff_ids, stats))
    }

    /// One layer: its record if the blob is still there, else pack and upload.
    async fn store_layer(
        &self,
        image: &str,
        layer: Layer,
    ) -> Result<(LayerRecord, bool), BuildError> {
        let key = layer.key(pack::COMPRESSION);
        let record_key = storage::layer_key(&key);
        if let Some(record) = read_record::<LayerRecord>(&*self.storage, &record_key).await? {
            if self
                .storage
                .head(&storage::blob_key(hex_of(&record.digest)))
                .await?
                == Some(record.size)
            {
                return Ok((record, true));
            }
        }
        let started = Instant::now();
        let out = self.scratch_file("layer");
        let out2 = out.clone();
        let paths = layer.paths.clone();
        let packed = tokio::task::spawn_blocking(move || {
            pack::pack_store_paths(&paths, &out2, pack::GZIP_LEVEL)
        })
        .await
        .map_err(|e| BuildError::Task(e.to_string()));
        let packed = match packed {
            Ok(Ok(packed)) => packed,
            Ok(Err(e)) => {
                let _ = tokio::fs::remove_file(&out).await;
                return Err(e.into());
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&out).await;
                return Err(e);
            }
        };
        self.storage
            .put_file(&storage::blob_key(hex_of(&packed.digest)), &out)
            .await?;
        let record = LayerRecord {
            digest: packed.digest.clone(),
            diff_id: packed.diff_id.clone(),
            size: packed.size,
            media_type: manifest::MEDIA_TYPE_LAYER_GZIP.to_string(),
        };
        self.storage.put(&record_key, to_json(&record)).await?;
        tracing::info!(
            image,
            step = "pack",
            layer = %key,
            paths = layer.paths.len(),
            digest = %packed.digest,
            size = packed.size,
            tar_size = packed.tar_size,
            elapsed_ms = started.elapsed().as_millis() as u64
        );
        Ok((record, false))
    }

    /// A fresh path for a file bound for storage.
    fn scratch_file(&self, what: &str) -> std::path::PathBuf {
        let dir = self
            .storage
            .local_staging_dir()
            .unwrap_or_else(std::env::temp_dir);
        dir.join(storage::unique_name(what))
    }
}

fn layer_descriptor(packed: &Packed) -> Descriptor {
    Descriptor {
        media_type: manifest::MEDIA_TYPE_LAYER_GZIP.to_string(),
        digest: packed.digest.clone(),
        size: packed.size,
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct LayerStats {
    new: usize,
    reused: usize,
    bytes_new: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_arch_source_and_packages() {
        let src = SourceArg::Path {
            path: "/pkgs".into(),
        };
        let pk = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let base = image_key(&pk(&["hello"]), Arch::Amd64, &src, 94, &[]);
        assert_eq!(base, image_key(&pk(&["hello"]), Arch::Amd64, &src, 94, &[]));
        assert_ne!(base, image_key(&pk(&["hello"]), Arch::Arm64, &src, 94, &[]));
        assert_ne!(
            base,
            image_key(
                &pk(&["hello"]),
                Arch::Amd64,
                &SourceArg::Path {
                    path: "/other".into()
                },
                94,
                &[]
            )
        );
        assert_ne!(
            base,
            image_key(&pk(&["hello", "jq"]), Arch::Amd64, &src, 94, &[])
        );
        assert_ne!(base, image_key(&pk(&["hello"]), Arch::Amd64, &src, 10, &[]));
        assert_ne!(
            base,
            image_key(&pk(&["hello"]), Arch::Amd64, &src, 94, &pk(&["cacert"]))
        );
        let commit = |rev: &str| SourceArg::Git {
            url: "/r".into(),
            rev: rev.into(),
            git_ref: None,
        };
        assert_ne!(
            image_key(&pk(&["hello"]), Arch::Amd64, &commit("a"), 94, &[]),
            image_key(&pk(&["hello"]), Arch::Amd64, &commit("b"), 94, &[])
        );
    }
}
