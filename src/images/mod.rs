//! The image service: the one place that decides whether a pull is served
//! from storage or must wait for a build.
//!
//! [`Images::get_or_build`] takes a parsed name and its tag and
//!
//! 1. resolves the tag against the package source ([`crate::source`]);
//! 2. decides how old an image may be ([`not_before`]: images of moving
//!    sources expire after the tag TTL, pinned ones never);
//! 3. looks up the image record and, if it is missing or stale, has the
//!    image built through the configured [`Dispatch`] (which applies the
//!    same rule, [`ImageRecord::is_current`], on its side);
//! 4. turns the record into the manifest bytes to serve, checked against
//!    their digest.
//!
//! What it served it keeps for a while ([`cache`]), so a warm instance
//! answers a repeated pull by steps 1, 2 and the cache alone.
//!
//! Manifest handlers call this and nothing below it (blobs, which are
//! content-addressed and never built, are read from storage directly).

pub mod cache;
pub(crate) mod declared;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::builder::compress::Compression;
use crate::builder::BuildRequest;
use crate::dispatch::{Dispatch, DispatchError};
use crate::oci::digest::sha256_digest;
use crate::oci::manifest::{
    media_type_of, Descriptor, ImageIndex, Platform, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST,
};
use crate::oci::name::{Arch, ImageSpec};
use crate::source::{SourceError, Sources};
use crate::storage::keys::{
    ImageKey, ImageRecordKey, IndexKey, IndexRecordKey, ManifestKey, ServedKey,
};
use crate::storage::records::{self, unix_now, ImageRecord, RecordError};
use crate::storage::{Storage, StorageError};
use cache::{CacheLimits, ManifestCache};
use declared::Declarations;

/// The most blob digests remembered (about 100 bytes each).
const KNOWN_BLOBS_MAX: usize = 100_000;
/// The most images whose last `served/` marker is remembered.
const SERVED_MAX: usize = 100_000;
const DAY: u64 = 86_400;

/// A manifest ready to send: its bytes, checked against `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub bytes: Bytes,
    pub digest: String,
    pub media_type: String,
    /// Answered from this process's cache, without storage.
    pub cached: bool,
    /// When the image (or index) was built, in Unix seconds (0: unknown).
    pub built_at: u64,
}

/// Why a pull got no manifest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The build of the image with this key did not give it.
    #[error("{error}")]
    Build {
        image_key: ImageKey,
        #[source]
        error: DispatchError,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("manifest {reference} is not known")]
    ManifestUnknown { reference: String },
    #[error("stored manifest {digest} does not match its digest (found {found})")]
    Corrupt { digest: String, found: String },
    #[error("building this image needs credentials")]
    NeedsCredentials,
}

/// A copy of `served` that owns exactly its bytes: what storage returned
/// may be a slice of a larger read buffer, which the cache would keep alive
/// without counting it.
fn kept(served: &Served) -> Served {
    Served {
        bytes: Bytes::copy_from_slice(&served.bytes),
        ..served.clone()
    }
}

/// What settles an image's key besides its name (the defaults are the
/// settings': `crate::config::defaults`).
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// Most layers for the packages (the customisation layer comes on top).
    pub layer_budget: usize,
    /// Packages added to every image when the package set has them.
    pub implicit_packages: Vec<String>,
    /// How layers are compressed.
    pub compression: Compression,
    /// The platforms a name without `arm64` is built for; more than one
    /// gives an image index.
    pub platforms: Vec<Arch>,
    /// Images declared by name (`NIXERY_IMAGES`).
    pub declared: Declarations,
    /// How long, and within how much memory, served manifests are kept.
    pub cache: CacheLimits,
}

/// The key of the index of some platforms' images: a hash of their keys,
/// in order.
fn index_key(requests: &[BuildRequest]) -> IndexKey {
    let keys: Vec<ImageKey> = requests.iter().map(BuildRequest::image_key).collect();
    IndexKey::hash_of(serde_json::json!({ "index": keys }).to_string().as_bytes())
}

/// What an index record says its architecture is: its platforms.
fn images_architectures(platforms: &[Arch]) -> String {
    let names: Vec<&str> = platforms.iter().map(|a| a.oci_name()).collect();
    names.join(",")
}

/// The freshness policy, in one pure function: the oldest build time
/// (Unix seconds) an image may have to be served now. A moving source (a
/// channel, a local path) gives images that expire `ttl` after they were
/// built (an image built at `t` is stale from `t + ttl` on); a pinned one
/// (a commit) gives images that never do. A zero TTL still accepts what
/// was built this very second, so a build's own result is never stale.
pub fn not_before(moving: bool, ttl: Duration, now: u64) -> u64 {
    if moving {
        now.saturating_sub(ttl.as_secs().saturating_sub(1))
    } else {
        0
    }
}

pub struct Images {
    /// Digests of the blobs the manifests this instance served refer to,
    /// with their sizes: they exist, so a blob request for one needs no
    /// storage call.
    known_blobs: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Manifests served lately, by image record key or manifest key.
    cache: ManifestCache,
    /// Image key -> the day (Unix days) this process last wrote its
    /// `served/` marker, which garbage collection reads.
    served_on: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    storage: Arc<dyn Storage>,
    dispatch: Arc<dyn Dispatch>,
    sources: Arc<Sources>,
    settings: ImageSettings,
}

impl Images {
    pub fn new(
        storage: Arc<dyn Storage>,
        dispatch: Arc<dyn Dispatch>,
        sources: Arc<Sources>,
        settings: ImageSettings,
    ) -> Images {
        Images {
            known_blobs: std::sync::Mutex::default(),
            cache: ManifestCache::new(settings.cache),
            served_on: std::sync::Mutex::default(),
            storage,
            dispatch,
            sources,
            settings,
        }
    }

    /// The manifest for `spec` at `tag`: stored and current, or built now
    /// if `may_build` (the caller's permission). A name served for several
    /// platforms gives an image index of one manifest per platform, or, to
    /// a client that takes no index (`accepts_index` false), the first
    /// platform's manifest.
    pub async fn get_or_build(
        &self,
        spec: &ImageSpec,
        tag: &str,
        may_build: bool,
        accepts_index: bool,
    ) -> Result<Served, ImageError> {
        // Resolving a tag may ask the repository: only callers who may
        // build may make it do so.
        let resolved = if may_build {
            self.sources.resolve(tag).await?
        } else {
            match self.sources.resolve_cached(tag) {
                Some(found) => found?,
                None => return Err(ImageError::NeedsCredentials),
            }
        };
        let not_before = not_before(resolved.moving, self.sources.ttl(), unix_now());
        // Never none: the name's own platform when nothing else is set.
        let platforms = if spec.arch_given || self.settings.platforms.is_empty() {
            vec![spec.arch]
        } else {
            self.settings.platforms.clone()
        };
        let requests: Vec<BuildRequest> = platforms
            .iter()
            .map(|&arch| {
                BuildRequest::new(
                    &spec.for_arch(arch),
                    &resolved,
                    self.settings.layer_budget,
                    &self.settings.implicit_packages,
                    self.settings.compression,
                    not_before,
                )
            })
            .collect();
        if requests.len() > 1 && accepts_index {
            return self.index(spec, requests, may_build).await;
        }
        // One platform, or a client that takes no index: the first's image.
        let first = requests.into_iter().next().expect("at least one platform");
        self.image(first, may_build).await
    }

    /// The manifest of one image: from the cache, from storage, or built.
    async fn image(&self, request: BuildRequest, may_build: bool) -> Result<Served, ImageError> {
        let image_key = request.image_key();
        let key = ImageRecordKey::of(&image_key);
        if let Some(served) = self.cached(&key, image_key.as_str(), request.not_before) {
            return Ok(served);
        }
        let stored = records::read::<ImageRecord>(&*self.storage, &key).await?;
        let record = match stored {
            Some(record) if record.is_current(request.not_before) => record,
            _ if !may_build => return Err(ImageError::NeedsCredentials),
            stale => {
                tracing::info!(image = %image_key, name = %request.name, system = %request.system, stale = stale.is_some(), "building");
                self.dispatch
                    .build(request)
                    .await
                    .map_err(|error| ImageError::Build {
                        image_key: image_key.clone(),
                        error,
                    })?
            }
        };
        self.serve_record(&key, image_key.as_str(), record).await
    }

    /// The index of the images of `requests` (one per platform, in the
    /// order of `NIXERY_PLATFORMS`). It is kept like an image: its bytes
    /// under `manifests/`, and a record (`indexes/<index-key>`) that names
    /// it, written after the images it lists exist, which garbage
    /// collection follows to them. It is as old as its oldest image.
    async fn index(
        &self,
        spec: &ImageSpec,
        requests: Vec<BuildRequest>,
        may_build: bool,
    ) -> Result<Served, ImageError> {
        let not_before = requests[0].not_before;
        let index_key = index_key(&requests);
        let key = IndexRecordKey::of(&index_key);
        // Serving the index serves each platform's image: garbage
        // collection keeps them all, so that a client that takes one of
        // them (by the index's digests) finds it.
        for request in &requests {
            self.mark_served(request.image_key().as_str());
        }
        if let Some(served) = self.cached(&key, index_key.as_str(), not_before) {
            return Ok(served);
        }
        if let Some(record) = records::read::<ImageRecord>(&*self.storage, &key).await? {
            if record.is_current(not_before) {
                return self.serve_record(&key, index_key.as_str(), record).await;
            }
        }
        let platforms: Vec<Platform> = requests
            .iter()
            .map(|r| Platform::linux(&r.architecture))
            .collect();
        let images = futures_util::future::try_join_all(
            requests
                .into_iter()
                .map(|request| self.image(request, may_build)),
        )
        .await?;
        let manifests = images
            .iter()
            .zip(platforms)
            .map(|(image, platform)| Descriptor {
                platform: Some(platform),
                ..Descriptor::of(&image.media_type, &image.bytes)
            })
            .collect();
        let bytes = ImageIndex::new(manifests).to_bytes();
        let digest = sha256_digest(&bytes);
        // Content-addressed: one stored already is these bytes (and the
        // function may only create manifests, never replace them). The
        // record about to name it relies on it, stored now or before: a
        // hold, written first, keeps it from a collection that doomed it
        // (see `crate::gc`), and the write then creates it if it is gone.
        let manifest_key = ManifestKey::of_digest(&digest);
        records::hold(&*self.storage, &manifest_key).await?;
        self.storage
            .put_if_absent(&manifest_key, Bytes::from(bytes.clone()))
            .await?;
        let record = ImageRecord {
            manifest_digest: digest,
            media_type: MEDIA_TYPE_INDEX.to_string(),
            size: bytes.len() as u64,
            packages: spec.packages.iter().cloned().collect(),
            architecture: images_architectures(&self.settings.platforms),
            built_at: images.iter().map(|i| i.built_at).min().unwrap_or(0),
            sbom: None,
        };
        records::write(&*self.storage, &key, &record).await?;
        tracing::info!(index = %index_key, digest = %record.manifest_digest, name = %spec.name, "image index stored");
        self.serve_record(&key, index_key.as_str(), record).await
    }

    /// A cached answer for an image (or index) record, noted as served
    /// under `image_key`.
    fn cached(&self, record_key: &str, image_key: &str, not_before: u64) -> Option<Served> {
        let served = self.cache.get(record_key, not_before, Instant::now())?;
        self.mark_served(image_key);
        Some(Served {
            cached: true,
            ..served
        })
    }

    /// The manifest (or index) an image record names, checked, cached and
    /// noted as served.
    async fn serve_record(
        &self,
        record_key: &str,
        image_key: &str,
        record: ImageRecord,
    ) -> Result<Served, ImageError> {
        let served = self
            .manifest(&record.manifest_digest, &record.media_type)
            .await?
            .ok_or_else(|| ImageError::ManifestUnknown {
                reference: record.manifest_digest.clone(),
            })?;
        let served = Served {
            built_at: record.built_at,
            ..served
        };
        self.cache
            .insert(record_key, Some(record), kept(&served), Instant::now());
        self.mark_served(image_key);
        Ok(served)
    }

    /// A stored manifest by its digest (`sha256:<hex>`, already checked).
    pub async fn by_digest(&self, digest: &str) -> Result<Served, ImageError> {
        let key = ManifestKey::of_digest(digest);
        if let Some(served) = self.cache.get(&key, 0, Instant::now()) {
            return Ok(served);
        }
        let served = self
            .manifest(digest, MEDIA_TYPE_MANIFEST)
            .await?
            .ok_or_else(|| ImageError::ManifestUnknown {
                reference: digest.to_string(),
            })?;
        self.cache.insert(&key, None, kept(&served), Instant::now());
        Ok(served)
    }

    /// Reads a manifest (or index) and checks it against its digest; its
    /// media type is what it states, else `media_type`.
    async fn manifest(&self, digest: &str, media_type: &str) -> Result<Option<Served>, ImageError> {
        let Some(bytes) = self.storage.get(&ManifestKey::of_digest(digest)).await? else {
            return Ok(None);
        };
        let found = sha256_digest(&bytes);
        if found != digest {
            return Err(ImageError::Corrupt {
                digest: digest.to_string(),
                found,
            });
        }
        self.remember_blobs(&bytes);
        let media_type = media_type_of(&bytes).unwrap_or_else(|| media_type.to_string());
        Ok(Some(Served {
            bytes,
            digest: digest.to_string(),
            media_type,
            cached: false,
            built_at: 0,
        }))
    }

    /// Records that an image was served, so garbage collection keeps it:
    /// one small write per image per day (per process), in the background.
    fn mark_served(&self, image_key: &str) {
        let today = unix_now() / DAY;
        {
            let mut served_on = self.served_on.lock().expect("never poisoned");
            if served_on.get(image_key) == Some(&today) {
                return;
            }
            if served_on.len() >= SERVED_MAX {
                served_on.clear();
            }
            served_on.insert(image_key.to_string(), today);
        }
        let storage = self.storage.clone();
        let key = ServedKey::of(image_key);
        tokio::spawn(async move {
            let day = Bytes::from(format!("{{\"served_day\":{today}}}"));
            if let Err(error) = storage.put(&key, day).await {
                tracing::warn!(%error, "recording that an image was served failed");
            }
        });
    }

    /// Notes the config and layer digests of a manifest about to be served.
    fn remember_blobs(&self, manifest: &[u8]) {
        let Ok(manifest) = serde_json::from_slice::<crate::oci::manifest::Manifest>(manifest)
        else {
            return;
        };
        let mut known = self.known_blobs.lock().expect("never poisoned");
        if known.len() >= KNOWN_BLOBS_MAX {
            known.clear();
        }
        known.insert(manifest.config.digest, manifest.config.size);
        known.extend(manifest.layers.into_iter().map(|l| (l.digest, l.size)));
    }

    /// The size of a blob a manifest this instance served refers to (it
    /// exists then: an image record is written after its blobs); `None`
    /// for any other blob.
    pub fn known_blob_size(&self, digest: &str) -> Option<u64> {
        self.known_blobs
            .lock()
            .expect("never poisoned")
            .get(digest)
            .copied()
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    pub fn settings(&self) -> &ImageSettings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_sources_expire_and_pinned_ones_do_not() {
        let hour = Duration::from_secs(3600);
        assert_eq!(not_before(false, hour, 10_000), 0);
        assert_eq!(not_before(true, hour, 10_000), 6_401);
        // Built at t with a one-second TTL: stale at t + 1.
        assert_eq!(not_before(true, Duration::from_secs(1), 10_001), 10_001);
        // A TTL longer than the epoch accepts everything.
        assert_eq!(not_before(true, hour, 100), 0);
        // A zero TTL accepts only what was built this second or later.
        assert_eq!(not_before(true, Duration::ZERO, 10_000), 10_000);
    }
}
