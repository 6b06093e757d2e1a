//! One build: from a [`BuildRequest`] to a stored, servable image, with
//! store paths from a [`StorePaths`] source (the local Nix, in this
//! process or on a worker; or a binary cache, in the function).
//!
//! A build is a short sequence of steps, each timed and logged by one
//! helper ([`Builder::step`]) and reported, as a [`Step`], to whoever
//! watches its progress:
//!
//! | step (Nix / binary cache) | what | module |
//! |---|---|---|
//! | `evaluating` / `resolving` | which packages exist, their outputs | [`store`] |
//! | `realising` / — | build (or find) the outputs in the Nix store | [`store`], [`nix`] |
//! | `grouping` / `resolving` | read the closure and group it into layers | [`store`], [`layers`] |
//! | `packing` / `fetching` | write and store each layer not stored yet, several at a time | [`objects`], [`pack`] |
//! | `customising` | the customisation layer (`/bin`, `/etc`, `/tmp`, ...) | [`customisation`] |
//! | `uploading` | config, manifest, SBOM, and last the image record | [`objects`], [`crate::oci::manifest`] |
//!
//! Every object reaches storage through [`objects::Objects`], so reuse,
//! checks and layer records work the same for all. The image record
//! `images/<image-key>` is written last: a build that stops anywhere
//! before that leaves no visible image, only reusable layers.
//!
//! | file | holds |
//! |---|---|
//! | `request.rs` | what a build is asked for, and its image key |
//! | `error.rs` | why a build failed, and the one verdict on it |
//! | `step.rs`, `progress.rs` | the steps and how far a build is |
//! | `store.rs` | where store paths come from (the seam) |
//! | `objects.rs` | how blobs, layers and artifacts reach storage |
//! | `nix.rs`, `layers.rs`, `pack.rs`, `compress.rs`, `customisation.rs`, `popularity.rs`, `sbom.rs` | the parts |

pub mod compress;
pub(crate) mod customisation;
mod error;
pub mod layers;
pub mod nix;
pub(crate) mod objects;
pub mod pack;
pub mod popularity;
pub(crate) mod progress;
mod request;
pub mod sbom;
mod step;
pub(crate) mod store;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::oci::manifest::{self, Descriptor, ImageConfig, Manifest};
use crate::storage::keys::{ImageRecordKey, LayerKey};
use crate::storage::records::{self, unix_now, ImageRecord, LayerRecord};
use crate::storage::Storage;
use compress::Compression;
pub use error::{BuildError, Failure, NotHere, Retry, Verdict};
use layers::Layer;
use nix::{Closure, ResolveRequest};
pub use objects::BuildStats;
use objects::Objects;
use pack::PackError;
use popularity::Popularity;
pub use progress::StepProgress;
pub use request::{build_span, BuildRequest, IMAGE_FORMAT};
pub use step::Step;
use store::{StorePaths, WalkLimits};

/// How often a builder collects its Nix store at most, unless a build
/// filled the disk.
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// The most entries of a customisation layer.
const MAX_CUSTOM_ENTRIES: usize = 200_000;

/// What one process may spend on builds (the defaults are the settings':
/// see `crate::config`).
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

/// Where a build reports how far it is (the build status reads it).
pub type Progress<'a> = Option<&'a watch::Sender<StepProgress>>;

/// A build's result: the image, and what building it took (`None`: a
/// current image was stored already, nothing was built).
#[derive(Debug, Clone)]
pub struct Built {
    pub record: ImageRecord,
    pub stats: Option<BuildStats>,
}

/// Updates the progress, if anyone watches it.
fn report(progress: Progress<'_>, update: impl FnOnce(&mut StepProgress)) {
    if let Some(progress) = progress {
        progress.send_modify(update);
    }
}

/// A layer's record, and whether it was reused; or why it failed.
type StoredLayer = Result<(LayerRecord, bool), BuildError>;

/// Sets a build's cancel flag when the build is dropped (its caller gave
/// up on it), so work on blocking threads stops at its next entry.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs builds with store paths from its sources (the first that can give
/// the image), writing to storage.
pub struct Builder {
    /// Tried in order: a source that cannot give an image
    /// ([`BuildError::NotHere`]) passes it to the next.
    stores: Vec<Arc<dyn StorePaths>>,
    /// When no source can give it: the image goes to another builder
    /// (`true`), or fails.
    elsewhere: bool,
    objects: Objects,
    popularity: Arc<Popularity>,
    limits: BuildLimits,
    /// One permit per build that may run at once.
    slots: tokio::sync::Semaphore,
    /// When the Nix store was last collected by this builder.
    last_collection: std::sync::Mutex<Option<Instant>>,
}

impl Builder {
    pub fn new(
        store: Arc<dyn StorePaths>,
        storage: Arc<dyn Storage>,
        popularity: Arc<Popularity>,
        limits: BuildLimits,
    ) -> Builder {
        Builder {
            stores: vec![store],
            elsewhere: false,
            objects: Objects::new(storage),
            popularity,
            slots: tokio::sync::Semaphore::new(limits.max_builds.max(1)),
            last_collection: std::sync::Mutex::new(None),
            limits,
        }
    }

    /// Tries `store` before the sources it has.
    pub fn trying_first(mut self, store: Arc<dyn StorePaths>) -> Builder {
        self.stores.insert(0, store);
        self
    }

    /// When none of its sources can give an image, says it is to be built
    /// elsewhere ([`Retry::Elsewhere`]) instead of failing.
    pub fn passing_on(mut self) -> Builder {
        self.elsewhere = true;
        self
    }

    /// Whether an image none of its sources can give is to be built
    /// elsewhere (see [`Builder::passing_on`]).
    pub fn passes_on(&self) -> bool {
        self.elsewhere
    }

    pub fn storage(&self) -> &dyn Storage {
        self.objects.storage()
    }

    pub fn limits(&self) -> &BuildLimits {
        &self.limits
    }

    /// Free bytes of the local store's disk, if a source has one.
    fn free_bytes(&self) -> Option<u64> {
        self.stores.iter().find_map(|s| s.free_bytes())
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
        let image = request.image_key();
        self.make_room(false).await;
        if self.slots.available_permits() == 0 {
            tracing::info!(
                %image,
                max_builds = self.limits.max_builds,
                "waiting for a build slot"
            );
        }
        let slot = self.slot().await?;
        // Another pull may have finished this image while this one waited.
        if let Some(record) = self.current_record(request).await? {
            return Ok(stored(record));
        }
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let started = Instant::now();
        tracing::info!(%image, packages = ?request.packages, system = %request.system, "build started");
        let mut result = self.run(request, progress, &cancel.0).await;
        if self.limits.min_free > 0 && result.as_ref().is_err_and(BuildError::is_disk_full) {
            // Room may be had by collecting; if not even then, the image
            // cannot be built here, which is the image's failure.
            tracing::error!(
                %image,
                "the builder's disk filled up; collecting garbage and trying once more"
            );
            drop(slot);
            self.make_room(true).await;
            let _slot = self.slot().await?;
            result = self.run(request, progress, &cancel.0).await;
            if result.as_ref().is_err_and(BuildError::is_disk_full) {
                result = Err(BuildError::NoRoom {
                    free: self.free_bytes().unwrap_or(0),
                });
            }
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok((record, mut stats)) => {
                stats.elapsed_ms = elapsed_ms;
                tracing::info!(
                    %image,
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
                tracing::warn!(%image, packages = ?request.packages, %error, elapsed_ms, "build failed");
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
        if min_free == 0 || self.free_bytes().is_none_or(|free| needed(free).is_none()) {
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
        let Some(max_freed) = self.free_bytes().and_then(needed) else {
            return;
        };
        let started = Instant::now();
        tracing::warn!(
            min_free,
            max_freed,
            "the Nix store's disk is low; collecting garbage before the build"
        );
        let mut collected = Ok(());
        for store in &self.stores {
            collected = collected.and(store.collect_garbage(max_freed).await);
        }
        match collected {
            Ok(()) => tracing::info!(
                free = self.free_bytes().unwrap_or(0),
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
        let key = ImageRecordKey::of(&request.image_key());
        let record = records::read::<ImageRecord>(self.storage(), &key).await?;
        Ok(record.filter(|r| r.is_current(request.not_before)))
    }

    /// The build with each source in turn, until one gives the image.
    async fn run(
        &self,
        request: &BuildRequest,
        progress: Progress<'_>,
        cancelled: &Arc<AtomicBool>,
    ) -> Result<(ImageRecord, BuildStats), BuildError> {
        let mut stores = self.stores.iter().peekable();
        while let Some(store) = stores.next() {
            match self.run_with(&**store, request, progress, cancelled).await {
                Err(BuildError::NotHere(reason)) if stores.peek().is_some() => {
                    tracing::info!(image = %request.image_key(), %reason, "trying the next source of store paths");
                }
                Err(BuildError::NotHere(reason)) if !self.elsewhere => {
                    return Err(BuildError::NoSourceLeft(reason));
                }
                other => return other,
            }
        }
        unreachable!("a builder has a source")
    }

    /// The steps, in order, with store paths from `store`.
    async fn run_with(
        &self,
        store: &dyn StorePaths,
        request: &BuildRequest,
        progress: Progress<'_>,
        cancelled: &Arc<AtomicBool>,
    ) -> Result<(ImageRecord, BuildStats), BuildError> {
        let image = request.image_key().to_string();
        let image = image.as_str();
        let steps = store.steps();
        let resolve = ResolveRequest {
            source: request.source.clone(),
            system: request.system.clone(),
            packages: request.packages.clone(),
            implicit: request.implicit.clone(),
            not_before: request.not_before,
        };
        let outputs = self
            .step(image, progress, steps.resolve, store.resolve(&resolve))
            .await?;
        if let Some(realise) = steps.realise {
            self.step(image, progress, realise, async {
                store
                    .realise(&outputs.packages, progress)
                    .await
                    .map(|()| "")
            })
            .await?;
        }
        let roots: Vec<String> = outputs
            .packages
            .iter()
            .flat_map(|p| p.paths.iter().cloned())
            .collect();
        let (closure, groups) = self
            .step(
                image,
                progress,
                steps.closure,
                self.group(store, &roots, request, progress),
            )
            .await?;
        let (mut layers, mut stats) = self
            .step(
                image,
                progress,
                steps.pack,
                self.store_layers(
                    store,
                    image,
                    groups,
                    &closure,
                    request.compression,
                    progress,
                    cancelled,
                ),
            )
            .await
            .map_err(|error| match error {
                // A source that cannot give a path's contents passes the
                // image on, as when it lacks the path: a binary cache that
                // fails mid-NAR leaves it to Nix (or a worker).
                BuildError::Pack(PackError::NotHere(reason)) => BuildError::NotHere(reason),
                other => other,
            })?;
        let (custom, config) = self
            .step(
                image,
                progress,
                Step::Customising,
                self.customise(
                    store,
                    image,
                    roots,
                    &closure,
                    request.compression,
                    cancelled,
                ),
            )
            .await?;
        stats.count(&custom, config.reused);
        stats.assembled = steps.from_cache;
        layers.push(custom);
        let record = self
            .step(
                image,
                progress,
                Step::Uploading,
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
        step: Step,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        report(progress, |p| p.start(step));
        let started = Instant::now();
        let result = work.await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(out) => {
                tracing::info!(image, %step, elapsed_ms, detail = %out.summary(), "build step")
            }
            Err(error) => {
                tracing::info!(image, %step, elapsed_ms, %error, "build step failed")
            }
        }
        result
    }

    /// The closure of `roots`, checked against the size limit and grouped
    /// into layers.
    async fn group(
        &self,
        store: &dyn StorePaths,
        roots: &[String],
        request: &BuildRequest,
        progress: Progress<'_>,
    ) -> Result<(Closure, Vec<Layer>), BuildError> {
        let limit = self.limits.max_image_size;
        let closure = store.closure(roots, limit, progress).await?;
        let size: u64 = closure.values().map(|p| p.nar_size).sum();
        if size > limit {
            return Err(BuildError::TooLarge { size, limit });
        }
        let groups = layers::group(&closure, roots, &self.popularity, request.layer_budget);
        Ok((closure, groups))
    }

    /// Every layer not stored yet, as many at a time as there are cores.
    #[allow(clippy::too_many_arguments)]
    async fn store_layers(
        &self,
        store: &dyn StorePaths,
        image: &str,
        groups: Vec<Layer>,
        closure: &Closure,
        compression: Compression,
        progress: Progress<'_>,
        cancelled: &Arc<AtomicBool>,
    ) -> Result<(Vec<LayerRecord>, BuildStats), BuildError> {
        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let total = groups.len() as u64;
        report(progress, |p| {
            (p.done, p.total, p.bytes) = (Some(0), Some(total), Some(0));
            p.detail = Some(format!("0 of {total} layers stored"));
        });
        // Unordered, so that a big layer does not hold back the small ones
        // after it; put back in order afterwards.
        let mut results: Vec<(usize, StoredLayer)> =
            futures_util::stream::iter(groups.into_iter().enumerate())
                .map(|(at, layer)| {
                    let key = layer.key(compression.key(), closure);
                    let job = store.pack(layer.paths, closure);
                    async move {
                        let stored = self
                            .objects
                            .store_layer(image, &key, compression, cancelled, job)
                            .await;
                        if let Ok((record, _)) = &stored {
                            report(progress, |p| {
                                let done = p.done.unwrap_or(0) + 1;
                                p.done = Some(done);
                                p.bytes = Some(p.bytes.unwrap_or(0) + record.size);
                                p.detail = Some(format!("{done} of {total} layers stored"));
                            });
                        }
                        (at, stored)
                    }
                })
                .buffer_unordered(parallel)
                .collect()
                .await;
        results.sort_by_key(|(at, _)| *at);
        let mut layers = Vec::with_capacity(results.len());
        let mut stats = BuildStats::default();
        for (_, result) in results {
            let (record, reused) = result?;
            stats.count(&record, reused);
            layers.push(record);
        }
        Ok((layers, stats))
    }

    /// The customisation layer, and the config it implies.
    async fn customise(
        &self,
        store: &dyn StorePaths,
        image: &str,
        roots: Vec<String>,
        closure: &Closure,
        compression: Compression,
        cancelled: &Arc<AtomicBool>,
    ) -> Result<(LayerRecord, CustomConfig), BuildError> {
        let key = customisation_key(&roots, closure, compression);
        let size: u64 = closure.values().map(|p| p.nar_size).sum();
        let limits = WalkLimits {
            max_entries: MAX_CUSTOM_ENTRIES,
            max_bytes: self.limits.max_image_size.saturating_sub(size),
            cancelled: cancelled.clone(),
        };
        // Reading the outputs is cheap; packing is what reuse saves.
        let custom = store.customise(roots, closure, limits).await?;
        let tree = custom.tree;
        let job: objects::Job = Box::new(move |writer| pack::write_tree(writer, &tree));
        let (record, reused) = self
            .objects
            .store_layer(image, &key, compression, cancelled, job)
            .await?;
        let config = CustomConfig {
            env: custom.env,
            cmd: custom.cmd,
            reused,
        };
        Ok((record, config))
    }

    /// The config blob, the manifest, the SBOM (an artifact whose subject
    /// is the manifest, listed in the manifest's referrers), then the
    /// image record.
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
        self.objects
            .store_small_blob(&config_descriptor.digest, Bytes::from(config))
            .await?;
        let manifest = Manifest::new(config_descriptor, descriptors).to_bytes();
        let size = manifest.len() as u64;
        let manifest_digest = self.objects.store_manifest(manifest).await?;
        let built_at = unix_now();
        let subject = Descriptor {
            media_type: manifest::MEDIA_TYPE_MANIFEST.to_string(),
            digest: manifest_digest.clone(),
            size,
            platform: None,
            artifact_type: None,
        };
        let image_key = request.image_key();
        let document = sbom::spdx(&sbom::SbomInput {
            image_name: &request.name,
            image_key: image_key.as_str(),
            manifest_digest: &manifest_digest,
            created: built_at,
            roots,
            closure,
        });
        let sbom = self
            .objects
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
        records::write(self.storage(), &ImageRecordKey::of(&image_key), &record).await?;
        Ok(record)
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
/// requested outputs in order, the closure's paths and what they hold,
/// the compression, and the version of the walk that reads them).
fn customisation_key(roots: &[String], closure: &Closure, compression: Compression) -> LayerKey {
    let closure: Vec<[&str; 2]> = closure
        .iter()
        .map(|(path, info)| [path.as_str(), info.nar_hash.as_str()])
        .collect();
    let canonical = serde_json::json!({
        "layer": "customisation",
        "format": IMAGE_FORMAT,
        "walk": 2,
        "outputs": roots,
        "closure": closure,
        "compression": compression.key(),
    });
    LayerKey::hash_of(canonical.to_string().as_bytes())
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
pub(crate) mod fake;
#[cfg(test)]
pub(crate) mod tests;
