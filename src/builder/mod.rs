//! One build: from a [`BuildRequest`] to a stored, servable image, wherever
//! Nix is (this process in local mode, a worker in AWS).
//!
//! A build is a short sequence of named steps, each timed and logged by one
//! helper ([`Builder::step`]) and reported to whoever watches its progress:
//!
//! | step | what | module |
//! |---|---|---|
//! | `resolve` | evaluate the package set: which packages exist, their outputs | [`nix`] |
//! | `realise` | build (or find) the outputs in the Nix store | [`nix`] |
//! | `group` | read the closure and group it into layers | [`nix`], [`layers`] |
//! | `pack` | pack and store each layer not stored yet, several at a time | [`pack`] |
//! | `customise` | the customisation layer (`/bin`, `/etc`, `/tmp`, ...) | [`customisation`] |
//! | `commit` | config, manifest, and last the image record | [`crate::oci::manifest`] |
//!
//! Every blob reaches storage through [`Builder::store_blob`], and every
//! layer (the customisation layer too) through [`Builder::store_layer`], so
//! reuse, scratch-file clean-up and layer records work the same for all.
//! The image record `images/<image-key>` is written last: a build that stops
//! anywhere before that leaves no visible image, only reusable layers.

pub mod compress;
pub mod customisation;
pub mod layers;
pub mod nix;
pub mod pack;
pub mod popularity;
pub mod progress;
pub mod sbom;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::oci::digest::{hex_of, sha256_digest, sha256_hex};
use crate::oci::manifest::{self, ConfigOverrides, Descriptor, ImageConfig, Manifest};
use crate::oci::name::{Arch, ImageSpec};
use crate::source::Resolved as ResolvedSource;
use crate::storage::records::{self, unix_now, ImageRecord, LayerRecord, RecordError};
use crate::storage::{self, Check, Storage, StorageError};
use compress::Compression;
use customisation::{customise, CustomisationError};
use layers::Layer;
use nix::{Closure, Nix, NixError, ResolveRequest, SourceArg};
use pack::{PackError, Packed};
use popularity::Popularity;
pub use progress::StepProgress;

/// How often a builder collects its Nix store at most, unless a build
/// filled the disk.
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

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
    /// source has moved on since. See [`ImageRecord::is_current`].
    #[serde(default)]
    pub not_before: u64,
    /// How the layers are compressed.
    #[serde(default)]
    pub compression: Compression,
    /// The name and tag the image was first asked for as: shown in its
    /// build status, no part of its key.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tag: String,
    /// What a declared image sets in its config; part of its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigOverrides>,
}

impl BuildRequest {
    /// The request for an image spec: packages (sorted), architecture, the
    /// resolved package source, the implicit packages and the compression
    /// all go into the key.
    pub fn new(
        spec: &ImageSpec,
        source: &ResolvedSource,
        layer_budget: usize,
        implicit: &[String],
        compression: Compression,
        not_before: u64,
    ) -> BuildRequest {
        let packages: Vec<String> = spec.packages.iter().cloned().collect();
        let mut image_key = image_key(
            &packages,
            spec.arch,
            &source.arg,
            layer_budget,
            implicit,
            compression,
        );
        if let Some(config) = &spec.config {
            let declared = serde_json::json!({ "image": image_key, "config": config });
            image_key = sha256_hex(declared.to_string().as_bytes());
        }
        BuildRequest {
            image_key,
            packages,
            system: spec.arch.nix_system().to_string(),
            architecture: spec.arch.oci_name().to_string(),
            source: source.arg.clone(),
            layer_budget,
            implicit: implicit.to_vec(),
            not_before,
            compression,
            name: spec.name.clone(),
            tag: spec.tag.clone(),
            config: spec.config.clone(),
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
    compression: Compression,
) -> String {
    let canonical = serde_json::json!({
        "format": IMAGE_FORMAT,
        "packages": packages,
        "implicit": implicit,
        "system": arch.nix_system(),
        "source": source,
        "layerBudget": layer_budget,
        "compression": compression.key(),
    });
    sha256_hex(canonical.to_string().as_bytes())
}

/// What one process may spend on builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    /// Builds at once; more wait for a slot.
    pub max_builds: usize,
    /// Bytes of uncompressed store paths in one image.
    pub max_image_size: u64,
    /// Free bytes the Nix store's disk should have before a build starts;
    /// below it, unreferenced store paths are collected first (0: never).
    pub min_free: u64,
}

impl Default for BuildLimits {
    fn default() -> BuildLimits {
        BuildLimits {
            max_builds: 2,
            max_image_size: 8 << 30,
            min_free: 0,
        }
    }
}

/// Why a build failed, as the puller is told (and as a worker records it
/// in the build status for every puller to read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    #[error("unknown packages: {}", names.join(", "))]
    UnknownPackages { names: Vec<String> },
    #[error("building the image failed: {message}")]
    Build { message: String },
    #[error("the image would hold {size} bytes of store paths, over this registry's limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
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
    Record(#[from] RecordError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Customisation(#[from] CustomisationError),
    #[error("build task failed: {0}")]
    Task(String),
    #[error("the image would hold {size} bytes of store paths, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// The disk filled up again right after the store was collected.
    #[error("the image does not fit in the builder's disk space ({free} bytes free after collecting garbage)")]
    NoRoom { free: u64 },
}

impl BuildError {
    /// The one place a failed build becomes what its pullers are told.
    /// `None`: the failure is transient (storage went away, the builder's
    /// disk is full) and the build should be tried again rather than
    /// remembered as failed.
    pub fn failure(&self) -> Option<Failure> {
        let internal = || Failure::Build {
            message: "an internal error (the build's log has the details)".to_string(),
        };
        if self.is_disk_full() {
            return None;
        }
        match self {
            BuildError::UnknownPackages(names) => Some(Failure::UnknownPackages {
                names: names.clone(),
            }),
            BuildError::TooLarge { size, limit } => Some(Failure::TooLarge {
                size: *size,
                limit: *limit,
            }),
            BuildError::NoRoom { .. } => Some(Failure::Build {
                message: self.to_string(),
            }),
            BuildError::Nix(NixError::Failed { command, message }) => Some(Failure::Build {
                // Nix quotes fetchers' URLs, which may carry a token.
                message: format!("{command}: {}", crate::source::redact_urls(message)),
            }),
            BuildError::Nix(NixError::Timeout { command, seconds }) => Some(Failure::Build {
                message: format!("{command} was stopped after {seconds} s"),
            }),
            BuildError::Nix(NixError::Spawn { .. } | NixError::Output { .. }) => Some(internal()),
            BuildError::Nix(NixError::DiskFull { .. }) => None,
            // A layer no storage call can ever hold: the image's failure.
            BuildError::Storage(StorageError::TooLarge { .. }) => Some(Failure::Build {
                message: self.to_string(),
            }),
            BuildError::Storage(_) | BuildError::Record(RecordError::Storage(_)) => None,
            BuildError::Record(RecordError::Unreadable { .. })
            | BuildError::Pack(_)
            | BuildError::Customisation(_)
            | BuildError::Task(_) => Some(internal()),
        }
    }
}

impl BuildError {
    /// Whether the builder ran out of disk space (in the Nix store or while
    /// packing): a fault of the machine, never of the image.
    pub fn is_disk_full(&self) -> bool {
        let io_full = |e: &std::io::Error| e.kind() == std::io::ErrorKind::StorageFull;
        match self {
            BuildError::Nix(NixError::DiskFull { .. }) => true,
            BuildError::Pack(PackError::Io { source, .. }) => io_full(source),
            BuildError::Storage(StorageError::Io { source, .. })
            | BuildError::Record(RecordError::Storage(StorageError::Io { source, .. })) => {
                io_full(source)
            }
            _ => false,
        }
    }

    /// Whether this is the server's fault rather than the package set's
    /// (worth an error in the log, not just a warning).
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            BuildError::Nix(NixError::Spawn { .. } | NixError::Output { .. })
                | BuildError::Record(RecordError::Unreadable { .. })
                | BuildError::Pack(_)
                | BuildError::Customisation(_)
                | BuildError::Task(_)
        )
    }
}

/// Where a build reports how far it is (the build status reads it).
pub type Progress<'a> = Option<&'a watch::Sender<StepProgress>>;

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
}

impl BuildStats {
    fn count(&mut self, record: &LayerRecord, reused: bool) {
        self.bytes_total += record.size;
        if reused {
            self.layers_reused += 1;
        } else {
            self.layers_new += 1;
            self.bytes_uploaded += record.size;
        }
    }
}

/// A build's result: the image, and what building it took (`None`: a
/// current image was stored already, nothing was built).
#[derive(Debug, Clone)]
pub struct Built {
    pub record: ImageRecord,
    pub stats: Option<BuildStats>,
}

/// The span every log line of a build is in, so that each names the image.
pub fn build_span(request: &BuildRequest) -> tracing::Span {
    tracing::info_span!("build", image = %request.image_key)
}

/// The name a step shows to people watching a build.
fn step_label(step: &str) -> &'static str {
    match step {
        "resolve" => "evaluating",
        "realise" => "realising",
        "group" => "grouping",
        "pack" => "packing",
        "customise" => "customising",
        "commit" => "uploading",
        _ => "building",
    }
}

/// Updates the progress, if anyone watches it.
fn report(progress: Progress<'_>, update: impl FnOnce(&mut StepProgress)) {
    if let Some(progress) = progress {
        progress.send_modify(update);
    }
}

/// A blob bound for `blobs/sha256/<hex>`.
enum Blob {
    /// A packed file in scratch space; consumed by storing it.
    File { path: PathBuf, packed: Packed },
    /// Small bytes (an image config, a manifest).
    Bytes { digest: String, bytes: Bytes },
}

/// Runs builds with the local Nix, writing to storage.
pub struct Builder {
    nix: Nix,
    storage: Arc<dyn Storage>,
    popularity: Arc<Popularity>,
    limits: BuildLimits,
    /// One permit per build that may run at once.
    slots: tokio::sync::Semaphore,
    /// When the Nix store was last collected by this builder.
    last_collection: std::sync::Mutex<Option<Instant>>,
}

impl Builder {
    pub fn new(nix: Nix, storage: Arc<dyn Storage>, popularity: Arc<Popularity>) -> Builder {
        Builder::with_limits(nix, storage, popularity, BuildLimits::default())
    }

    pub fn with_limits(
        nix: Nix,
        storage: Arc<dyn Storage>,
        popularity: Arc<Popularity>,
        limits: BuildLimits,
    ) -> Builder {
        Builder {
            nix,
            storage,
            popularity,
            slots: tokio::sync::Semaphore::new(limits.max_builds.max(1)),
            last_collection: std::sync::Mutex::new(None),
            limits,
        }
    }

    /// Builds one image, telling `progress` how far it is as it goes; or
    /// returns the stored record if a current one is there already. (The
    /// caller runs it in a span naming the image: see [`build_span`].)
    pub async fn build(
        &self,
        request: &BuildRequest,
        progress: Progress<'_>,
    ) -> Result<Built, BuildError> {
        let stored = |record| Built {
            record,
            stats: None,
        };
        if let Some(record) = self.current_record(request).await? {
            return Ok(stored(record));
        }
        let image = request.image_key.as_str();
        self.make_room(false).await;
        if self.slots.available_permits() == 0 {
            tracing::info!(
                image,
                max_builds = self.limits.max_builds,
                "waiting for a build slot"
            );
        }
        let slot = self.slot().await?;
        // Another pull may have finished this image while this one waited.
        if let Some(record) = self.current_record(request).await? {
            return Ok(stored(record));
        }
        let started = Instant::now();
        tracing::info!(image, packages = ?request.packages, system = %request.system, "build started");
        let mut result = self.run(request, progress).await;
        if self.limits.min_free > 0 && result.as_ref().is_err_and(BuildError::is_disk_full) {
            // Room may be had by collecting; if not even then, the image
            // cannot be built here, which is the image's failure.
            tracing::error!(
                image,
                "the builder's disk filled up; collecting garbage and trying once more"
            );
            drop(slot);
            self.make_room(true).await;
            let _slot = self.slot().await?;
            result = self.run(request, progress).await;
            if result.as_ref().is_err_and(BuildError::is_disk_full) {
                result = Err(BuildError::NoRoom {
                    free: nix::store_free_bytes().unwrap_or(0),
                });
            }
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok((record, mut stats)) => {
                stats.elapsed_ms = elapsed_ms;
                tracing::info!(
                    image,
                    packages = ?request.packages,
                    manifest = %record.manifest_digest,
                    layers_new = stats.layers_new,
                    layers_reused = stats.layers_reused,
                    bytes_uploaded = stats.bytes_uploaded,
                    elapsed_ms,
                    "build finished"
                );
                Ok(Built {
                    record,
                    stats: Some(stats),
                })
            }
            Err(error) => {
                tracing::warn!(image, packages = ?request.packages, %error, elapsed_ms, "build failed");
                Err(error)
            }
        }
    }

    /// One of the build slots (`NIXERY_MAX_BUILDS`), waited for.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BuildError> {
        self.slots
            .acquire()
            .await
            .map_err(|e| BuildError::Task(e.to_string()))
    }

    /// Collects the Nix store if its disk has less than `min_free` bytes
    /// free: at most once every [`COLLECT_EVERY`] unless `forced` (the disk
    /// filled up mid-build). It holds every build slot meanwhile (the
    /// caller holds none), so no build is between realising its paths and
    /// packing them (they are not GC roots then). A failed collection is
    /// logged; the build goes on and may find room.
    async fn make_room(&self, forced: bool) {
        let min_free = self.limits.min_free;
        let needed = |free| nix::bytes_to_collect(free, min_free);
        if min_free == 0 || nix::store_free_bytes().map_or(true, |free| needed(free).is_none()) {
            return;
        }
        let recently = |last: &Option<Instant>| last.is_some_and(|t| t.elapsed() < COLLECT_EVERY);
        if !forced && recently(&self.last_collection.lock().expect("never poisoned")) {
            return;
        }
        let all = self.limits.max_builds.max(1) as u32;
        let Ok(_every_slot) = self.slots.acquire_many(all).await else {
            return;
        };
        *self.last_collection.lock().expect("never poisoned") = Some(Instant::now());
        // Another build may have collected while this one waited.
        let Some(max_freed) = nix::store_free_bytes().ok().and_then(needed) else {
            return;
        };
        let started = Instant::now();
        tracing::warn!(
            min_free,
            max_freed,
            "the Nix store's disk is low; collecting garbage before the build"
        );
        match self.nix.collect_garbage(max_freed).await {
            Ok(()) => tracing::info!(
                free = nix::store_free_bytes().unwrap_or(0),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Nix store collected"
            ),
            Err(error) => tracing::error!(%error, "collecting the Nix store failed"),
        }
    }

    /// The stored record of the requested image, if it is current.
    async fn current_record(
        &self,
        request: &BuildRequest,
    ) -> Result<Option<ImageRecord>, BuildError> {
        let key = storage::image_key(&request.image_key);
        let record = records::read::<ImageRecord>(&*self.storage, &key).await?;
        Ok(record.filter(|r| r.is_current(request.not_before)))
    }

    /// The steps, in order.
    async fn run(
        &self,
        request: &BuildRequest,
        progress: Progress<'_>,
    ) -> Result<(ImageRecord, BuildStats), BuildError> {
        let image = request.image_key.as_str();
        let outputs = self
            .step(image, progress, "resolve", self.resolve(request))
            .await?;
        self.step(image, progress, "realise", async {
            let nix_says = |log: &nix::NixLog| report(progress, |p| log.report(p));
            self.nix
                .realise(&outputs.packages, nix_says)
                .await
                .map(|()| "")
        })
        .await?;
        let roots: Vec<String> = outputs
            .packages
            .iter()
            .flat_map(|p| p.paths.iter().cloned())
            .collect();
        let (closure, groups) = self
            .step(image, progress, "group", self.group(&roots, request))
            .await?;
        let (mut layers, mut stats) = self
            .step(
                image,
                progress,
                "pack",
                self.store_layers(image, groups, request.compression, progress),
            )
            .await?;
        let (custom, config) = self
            .step(
                image,
                progress,
                "customise",
                self.customise(image, roots, &closure, request.compression),
            )
            .await?;
        stats.count(&custom, config.reused);
        layers.push(custom);
        let record = self
            .step(
                image,
                progress,
                "commit",
                self.commit(request, layers, config, &outputs.packages, &closure),
            )
            .await?;
        Ok((record, stats))
    }

    /// Runs one step: reports it, times it, and logs one line for it.
    async fn step<T: StepSummary, E: std::fmt::Display>(
        &self,
        image: &str,
        progress: Progress<'_>,
        name: &'static str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        report(progress, |p| p.start(step_label(name)));
        let started = Instant::now();
        let result = work.await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(out) => {
                tracing::info!(image, step = name, elapsed_ms, detail = %out.summary(), "build step")
            }
            Err(error) => {
                tracing::info!(image, step = name, elapsed_ms, %error, "build step failed")
            }
        }
        result
    }

    /// `resolve`: which packages exist, and their outputs.
    async fn resolve(&self, request: &BuildRequest) -> Result<nix::Resolved, BuildError> {
        let resolved = self
            .nix
            .resolve(&ResolveRequest {
                source: request.source.clone(),
                system: request.system.clone(),
                packages: request.packages.clone(),
                implicit: request.implicit.clone(),
            })
            .await?;
        if !resolved.unknown.is_empty() {
            return Err(BuildError::UnknownPackages(resolved.unknown));
        }
        Ok(resolved)
    }

    /// `group`: the closure of `roots`, grouped into layers.
    async fn group(
        &self,
        roots: &[String],
        request: &BuildRequest,
    ) -> Result<(Closure, Vec<Layer>), BuildError> {
        let closure = self.nix.closure(roots).await?;
        let size: u64 = closure.values().map(|p| p.nar_size).sum();
        if size > self.limits.max_image_size {
            return Err(BuildError::TooLarge {
                size,
                limit: self.limits.max_image_size,
            });
        }
        let groups = layers::group(&closure, roots, &self.popularity, request.layer_budget);
        Ok((closure, groups))
    }

    /// `pack`: every layer, as many at a time as there are cores.
    async fn store_layers(
        &self,
        image: &str,
        groups: Vec<Layer>,
        compression: Compression,
        progress: Progress<'_>,
    ) -> Result<(Vec<LayerRecord>, BuildStats), BuildError> {
        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let total = groups.len() as u64;
        report(progress, |p| {
            (p.done, p.total, p.bytes) = (Some(0), Some(total), Some(0));
            p.detail = Some(format!("0 of {total} layers stored"));
        });
        let results: Vec<Result<(LayerRecord, bool), BuildError>> =
            futures_util::stream::iter(groups)
                .map(|layer| {
                    let key = layer.key(compression.key());
                    let paths = layer.paths;
                    async move {
                        let stored = self
                            .store_layer(image, key, compression, move |out| {
                                pack::pack_store_paths(&paths, out, compression)
                            })
                            .await;
                        if let Ok((record, _)) = &stored {
                            report(progress, |p| {
                                let done = p.done.unwrap_or(0) + 1;
                                p.done = Some(done);
                                p.bytes = Some(p.bytes.unwrap_or(0) + record.size);
                                p.detail = Some(format!("{done} of {total} layers stored"));
                            });
                        }
                        stored
                    }
                })
                .buffered(parallel)
                .collect()
                .await;
        let mut layers = Vec::with_capacity(results.len());
        let mut stats = BuildStats::default();
        for result in results {
            let (record, reused) = result?;
            stats.count(&record, reused);
            layers.push(record);
        }
        Ok((layers, stats))
    }

    /// `customise`: the customisation layer, and the config it implies.
    async fn customise(
        &self,
        image: &str,
        roots: Vec<String>,
        closure: &Closure,
        compression: Compression,
    ) -> Result<(LayerRecord, CustomConfig), BuildError> {
        let paths: Vec<String> = closure.keys().cloned().collect();
        let key = customisation_key(&roots, &paths, compression);
        // Reading the outputs is cheap; packing is what reuse saves.
        let custom = tokio::task::spawn_blocking(move || customise(&roots, &paths))
            .await
            .map_err(|e| BuildError::Task(e.to_string()))??;
        let tree = custom.tree;
        let (record, reused) = self
            .store_layer(image, key, compression, move |out| {
                pack::pack_tree(&tree, out, compression)
            })
            .await?;
        let config = CustomConfig {
            env: custom.env,
            cmd: custom.cmd,
            reused,
        };
        Ok((record, config))
    }

    /// `commit`: the config blob, the manifest, the SBOM (an artifact
    /// whose subject is the manifest, listed in the manifest's referrers),
    /// then the image record.
    async fn commit(
        &self,
        request: &BuildRequest,
        layers: Vec<LayerRecord>,
        custom: CustomConfig,
        roots: &[nix::ResolvedPackage],
        closure: &Closure,
    ) -> Result<ImageRecord, BuildError> {
        let diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
        let descriptors = layers
            .into_iter()
            .map(|l| Descriptor {
                media_type: l.media_type,
                digest: l.digest,
                size: l.size,
                platform: None,
                artifact_type: None,
            })
            .collect();
        let config = ImageConfig::new(&request.architecture, diff_ids, custom.env, custom.cmd);
        let config = match &request.config {
            Some(overrides) => config.with(overrides),
            None => config,
        }
        .to_bytes();
        let config_descriptor = Descriptor::of(manifest::MEDIA_TYPE_CONFIG, &config);
        let config_key = storage::blob_key(hex_of(&config_descriptor.digest));
        self.store_blob(
            &config_key,
            Blob::Bytes {
                digest: config_descriptor.digest.clone(),
                bytes: Bytes::from(config),
            },
        )
        .await?;
        let manifest = Manifest::new(config_descriptor, descriptors).to_bytes();
        let manifest_digest = sha256_digest(&manifest);
        let size = manifest.len() as u64;
        self.store_blob(
            &storage::manifest_key(hex_of(&manifest_digest)),
            Blob::Bytes {
                digest: manifest_digest.clone(),
                bytes: Bytes::from(manifest),
            },
        )
        .await?;
        let built_at = unix_now();
        let subject = Descriptor {
            media_type: manifest::MEDIA_TYPE_MANIFEST.to_string(),
            digest: manifest_digest.clone(),
            size,
            platform: None,
            artifact_type: None,
        };
        let document = sbom::spdx(&sbom::SbomInput {
            image_name: &request.name,
            image_key: &request.image_key,
            manifest_digest: &manifest_digest,
            created: built_at,
            roots,
            closure,
        });
        let sbom = self
            .store_artifact(subject, sbom::MEDIA_TYPE, document)
            .await?;
        let record = ImageRecord {
            manifest_digest,
            media_type: manifest::MEDIA_TYPE_MANIFEST.to_string(),
            size,
            packages: request.packages.clone(),
            architecture: request.architecture.clone(),
            built_at,
            sbom: Some(sbom),
        };
        records::write(
            &*self.storage,
            &storage::image_key(&request.image_key),
            &record,
        )
        .await?;
        Ok(record)
    }

    /// An artifact about `subject` (its SBOM): the document as a blob, the
    /// empty config, an artifact manifest naming both and the subject,
    /// and the subject's referrers index listing it. The manifest's digest.
    async fn store_artifact(
        &self,
        subject: Descriptor,
        artifact_type: &str,
        document: Vec<u8>,
    ) -> Result<String, BuildError> {
        let empty = Bytes::from_static(manifest::EMPTY_JSON);
        let config = Descriptor::of(manifest::MEDIA_TYPE_EMPTY, &empty);
        let layer = Descriptor::of(artifact_type, &document);
        for (descriptor, bytes) in [(&config, empty), (&layer, Bytes::from(document))] {
            let key = storage::blob_key(hex_of(&descriptor.digest));
            let digest = descriptor.digest.clone();
            self.store_blob(&key, Blob::Bytes { digest, bytes }).await?;
        }
        let subject_hex = hex_of(&subject.digest).to_string();
        let artifact = Manifest {
            artifact_type: Some(artifact_type.to_string()),
            subject: Some(subject),
            ..Manifest::new(config, vec![layer])
        }
        .to_bytes();
        let digest = sha256_digest(&artifact);
        let listed = Descriptor {
            artifact_type: Some(artifact_type.to_string()),
            ..Descriptor::of(manifest::MEDIA_TYPE_MANIFEST, &artifact)
        };
        self.store_blob(
            &storage::manifest_key(hex_of(&digest)),
            Blob::Bytes {
                digest: digest.clone(),
                bytes: Bytes::from(artifact),
            },
        )
        .await?;
        // The newest build's artifact is the one listed: a rebuild of an
        // image (the same manifest) describes it anew.
        let referrers = manifest::ImageIndex::new(vec![listed]).to_bytes();
        self.storage
            .put(
                &storage::referrers_key(&subject_hex),
                Bytes::from(referrers),
            )
            .await?;
        Ok(digest)
    }

    /// One layer under `key`: its record if the blob is still there, else
    /// `pack` into a scratch file (on a blocking thread), store the blob and
    /// write the record. `true`: reused. A reused layer's record is written
    /// again, which tells garbage collection that a build relies on its
    /// blob (see `crate::gc`).
    async fn store_layer(
        &self,
        image: &str,
        key: String,
        compression: Compression,
        pack: impl FnOnce(&Path) -> Result<Packed, PackError> + Send + 'static,
    ) -> Result<(LayerRecord, bool), BuildError> {
        let record_key = storage::layer_key(&key);
        if let Some(record) = records::read::<LayerRecord>(&*self.storage, &record_key).await? {
            let blob = storage::blob_key(hex_of(&record.digest));
            match self
                .storage
                .check(&blob, record.size, hex_of(&record.digest))
                .await?
            {
                Check::Good => {
                    records::write(&*self.storage, &record_key, &record).await?;
                    return Ok((record, true));
                }
                Check::Absent => {}
                Check::Corrupt(_) => {
                    tracing::warn!(image, layer = %key, digest = %record.digest, "stored layer is damaged; packing it again");
                }
            }
        }
        let started = Instant::now();
        let out = self.scratch_file("layer");
        let path = out.clone();
        let packed = tokio::task::spawn_blocking(move || pack(&path))
            .await
            .map_err(|e| BuildError::Task(e.to_string()))
            .and_then(|packed| packed.map_err(BuildError::from));
        let packed = match packed {
            Ok(packed) => packed,
            Err(error) => {
                let _ = tokio::fs::remove_file(&out).await;
                return Err(error);
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
            step = "pack",
            layer = %key,
            digest = %packed.digest,
            size = packed.size,
            tar_size = packed.tar_size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "layer packed"
        );
        let blob = storage::blob_key(hex_of(&packed.digest));
        self.store_blob(&blob, Blob::File { path: out, packed })
            .await?;
        records::write(&*self.storage, &record_key, &record).await?;
        Ok((record, false))
    }

    /// The one way a content-addressed object (a layer, a config, a
    /// manifest) reaches storage: kept if the stored object is good,
    /// created if absent, replaced if found corrupt (over that damaged
    /// version only); never overwritten otherwise. `true`: written.
    async fn store_blob(&self, key: &str, blob: Blob) -> Result<bool, BuildError> {
        let (digest, size) = match &blob {
            Blob::File { packed, .. } => (packed.digest.clone(), packed.size),
            Blob::Bytes { digest, bytes } => (digest.clone(), bytes.len() as u64),
        };
        // Small objects take the same way as files, so that every write of
        // a content-addressed key is a conditional one.
        let path = match blob {
            Blob::File { path, .. } => path,
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
                path
            }
        };
        let found = match self.storage.check(key, size, hex_of(&digest)).await {
            Ok(found) => found,
            Err(error) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(error.into());
            }
        };
        let written = found != Check::Good;
        // Each consumes the file, whatever the outcome. A good object is
        // never written over (storage offers no way to), small or not.
        match found {
            Check::Good => {
                let _ = tokio::fs::remove_file(&path).await;
            }
            Check::Absent => self.storage.put_file(key, &path).await?,
            Check::Corrupt(damaged) => {
                tracing::warn!(%digest, key, "stored object is damaged; writing it again");
                self.storage.replace_file(key, &path, &damaged).await?
            }
        }
        Ok(written)
    }

    /// A fresh path for a file bound for storage.
    fn scratch_file(&self, what: &str) -> PathBuf {
        let dir = self
            .storage
            .local_staging_dir()
            .unwrap_or_else(std::env::temp_dir);
        dir.join(storage::unique_name(what))
    }
}

/// What the customisation step adds to the image config.
struct CustomConfig {
    env: Vec<String>,
    cmd: Option<Vec<String>>,
    /// Whether its layer was stored already.
    reused: bool,
}

/// The customisation layer's key: everything its bytes depend on (the
/// requested outputs in order, the closure, the compression).
fn customisation_key(roots: &[String], closure: &[String], compression: Compression) -> String {
    let canonical = serde_json::json!({
        "layer": "customisation",
        "format": IMAGE_FORMAT,
        "outputs": roots,
        "closure": closure,
        "compression": compression.key(),
    });
    sha256_hex(canonical.to_string().as_bytes())
}

/// A step's result, in one log field.
trait StepSummary {
    fn summary(&self) -> String;
}

impl StepSummary for &str {
    fn summary(&self) -> String {
        self.to_string()
    }
}

impl StepSummary for nix::Resolved {
    fn summary(&self) -> String {
        format!("{} packages", self.packages.len())
    }
}

impl StepSummary for (Closure, Vec<Layer>) {
    fn summary(&self) -> String {
        format!("{} paths in {} layers", self.0.len(), self.1.len())
    }
}

impl StepSummary for (Vec<LayerRecord>, BuildStats) {
    fn summary(&self) -> String {
        let stats = &self.1;
        format!(
            "{} new ({} bytes), {} reused",
            stats.layers_new, stats.bytes_uploaded, stats.layers_reused
        )
    }
}

impl StepSummary for (LayerRecord, CustomConfig) {
    fn summary(&self) -> String {
        let reused = if self.1.reused { "reused" } else { "new" };
        format!("{} ({reused})", self.0.digest)
    }
}

impl StepSummary for ImageRecord {
    fn summary(&self) -> String {
        self.manifest_digest.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_arch_source_and_packages() {
        let pk = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        /// Everything an image key is made of.
        #[derive(Clone)]
        struct Inputs {
            packages: Vec<String>,
            arch: Arch,
            source: SourceArg,
            budget: usize,
            implicit: Vec<String>,
            compression: Compression,
        }
        let key = |i: &Inputs| {
            image_key(
                &i.packages,
                i.arch,
                &i.source,
                i.budget,
                &i.implicit,
                i.compression,
            )
        };
        let commit = |rev: &str| SourceArg::Git {
            url: "/r".into(),
            rev: rev.into(),
            git_ref: None,
        };
        let base = Inputs {
            packages: pk(&["hello"]),
            arch: Arch::Amd64,
            source: SourceArg::Path {
                path: "/pkgs".into(),
            },
            budget: 94,
            implicit: vec![],
            compression: Compression::Gzip,
        };
        assert_eq!(key(&base), key(&base.clone()));
        let changes = [
            Inputs {
                arch: Arch::Arm64,
                ..base.clone()
            },
            Inputs {
                source: SourceArg::Path {
                    path: "/other".into(),
                },
                ..base.clone()
            },
            Inputs {
                source: commit("a"),
                ..base.clone()
            },
            Inputs {
                compression: Compression::Zstd,
                ..base.clone()
            },
            Inputs {
                packages: pk(&["hello", "jq"]),
                ..base.clone()
            },
            Inputs {
                budget: 10,
                ..base.clone()
            },
            Inputs {
                implicit: pk(&["cacert"]),
                ..base.clone()
            },
        ];
        let mut keys: Vec<String> = changes.iter().map(key).collect();
        keys.push(key(&base));
        keys.push(key(&Inputs {
            source: commit("b"),
            ..base.clone()
        }));
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "two different inputs share a key"
        );
    }

    #[test]
    fn a_full_disk_is_never_remembered_as_the_image_s_failure() {
        let nix = BuildError::Nix(NixError::DiskFull {
            command: "nix-store",
            message: "No space left on device".into(),
        });
        assert!(nix.is_disk_full());
        assert_eq!(nix.failure(), None);
        let pack = BuildError::Pack(PackError::Io {
            path: "/tmp/layer".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        });
        assert!(pack.is_disk_full());
        assert_eq!(pack.failure(), None);
        let other = BuildError::Pack(PackError::Io {
            path: "/tmp/layer".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert!(!other.is_disk_full());
        assert!(other.failure().is_some());
        // Full again right after collecting: the image does not fit, and
        // that is remembered like any failed build.
        let huge = BuildError::Storage(StorageError::TooLarge {
            key: "blobs/sha256/x".into(),
            size: 6 << 40,
            limit: 5 << 40,
        });
        assert!(huge
            .failure()
            .unwrap()
            .to_string()
            .contains("over the storage's limit"));
        let no_room = BuildError::NoRoom { free: 1234 };
        assert!(!no_room.is_disk_full());
        assert!(no_room
            .failure()
            .unwrap()
            .to_string()
            .contains("1234 bytes free"));
    }

    #[test]
    fn failures_say_what_failed_and_transient_errors_are_not_remembered() {
        let nix = BuildError::Nix(NixError::Failed {
            command: "nix-build",
            message: "builder for hello failed".into(),
        });
        assert_eq!(
            nix.failure().unwrap().to_string(),
            "building the image failed: nix-build: builder for hello failed"
        );
        let unknown = BuildError::UnknownPackages(vec!["nope".into()]);
        assert_eq!(
            unknown.failure(),
            Some(Failure::UnknownPackages {
                names: vec!["nope".into()]
            })
        );
        let storage = BuildError::Storage(StorageError::InvalidKey { key: "k".into() });
        assert_eq!(storage.failure(), None);
        // Internal details stay in the log.
        let task = BuildError::Task("panicked at src/secret/path.rs".into());
        assert!(!task.failure().unwrap().to_string().contains("secret"));
    }

    #[test]
    fn the_customisation_key_follows_its_inputs() {
        let key = |roots: &[&str], closure: &[&str], compression| {
            let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            customisation_key(&v(roots), &v(closure), compression)
        };
        let a = key(&["/nix/store/a"], &["/nix/store/a"], Compression::Gzip);
        assert_eq!(
            a,
            key(&["/nix/store/a"], &["/nix/store/a"], Compression::Gzip)
        );
        assert_ne!(
            a,
            key(
                &["/nix/store/a"],
                &["/nix/store/a", "/nix/store/b"],
                Compression::Gzip
            )
        );
        assert_ne!(
            a,
            key(&["/nix/store/a"], &["/nix/store/a"], Compression::Zstd)
        );
    }
}
