//! `nixery gc`: mark and sweep of the storage, safe while the registry
//! serves and builds.
//!
//! **Mark.** An image is live if it was served (its `served/<image-key>`
//! marker, written at most once a day per process) or built within
//! `unused_for`; a live image's record names its manifest, which names its
//! config and layers, and its SBOM artifact; a live index's record names
//! the index, which names the platforms' manifests. Anything written
//! within `grace` is live too, with
//! what it names: a build under way writes its blobs, layer records and
//! manifest before its image record, and a build that reuses a layer
//! rewrites its layer record first (see `Objects::store_layer`), so a
//! grace longer than the longest build keeps the new objects and reused
//! layers a running build relies on. A config or manifest a build finds
//! stored and good is not written again (nothing good is overwritten):
//! the build writes a hold on it instead (`holds/<hex>`; see
//! `Objects::store_blob`), as the registry does on an index manifest it
//! composes, and a young hold keeps what it names like a young layer
//! record keeps its blob.
//!
//! Index records (`indexes/`) are image records too; serving an index
//! marks each of its platforms' images served, so they stay live with it.
//! A live manifest's referrers index keeps what it lists.
//!
//! **Sweep.** Expired image records go first (and with them their
//! markers), then referrers indexes of manifests no longer live, then
//! manifests, layer records and blobs nothing live names, then leftovers
//! of `staging/`, `builds/` and `sources/`, and old holds: everything
//! only once older than `grace`. Right before each delete the object is
//! looked at again (and its hold, and, for a blob, the layer records that
//! name it): one a build rewrote or held since the listing, to rely on
//! it, is kept. An object that cannot be looked at or deleted after the
//! image records is kept and reported, and the sweep goes on; an image
//! record that cannot be deleted stops it, since what it names was
//! counted as garbage. A dry run deletes nothing and reports the same.
//!
//! Unlike distribution's `garbage-collect`, nothing is stopped: reads never
//! wait, and a pull of an image collected a moment ago builds it again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::oci::digest::hex_of;
use crate::oci::manifest::{ImageIndex, Manifest, MEDIA_TYPE_INDEX};
use crate::storage::keys::{HoldKey, ManifestKey, Parsed, Prefix};
use crate::storage::records::{self, ImageRecord, LayerRecord, RecordError};
use crate::storage::{Listed, Storage, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcSettings {
    /// Images neither served nor built for this long lose their record.
    pub unused_for: Duration,
    /// Nothing younger than this is deleted.
    pub grace: Duration,
    pub dry_run: bool,
}

/// What a collection found and deleted (or would delete, in a dry run).
#[derive(Debug, Default)]
pub struct Report {
    /// Objects looked at.
    pub scanned: usize,
    /// Image records of unused images.
    pub images_expired: usize,
    /// Every object deleted, in the order it was.
    pub deleted: Vec<Listed>,
    /// Records that could not be read, kept (with what they name unknown).
    pub unreadable: Vec<String>,
    /// Objects a build rewrote or held between the listing and their
    /// delete: kept.
    pub rescued: Vec<String>,
    /// Objects that could not be looked at again or deleted (a storage
    /// error, such as a role without the right), with the error: kept,
    /// and the collection went on with the rest.
    pub failed: Vec<(String, String)>,
}

impl Report {
    pub fn bytes(&self) -> u64 {
        self.deleted.iter().map(|o| o.size).sum()
    }
}

/// One collection at time `now` (Unix seconds): the passes, in order.
pub async fn collect(
    storage: &dyn Storage,
    settings: &GcSettings,
    now: u64,
) -> Result<Report, StorageError> {
    let mut gc = Collection {
        storage,
        settings,
        now,
        report: Report::default(),
        doomed: Vec::new(),
        live_manifests: HashSet::new(),
        live_indexes: Vec::new(),
        live_blobs: HashSet::new(),
        named_by: HashMap::new(),
    };
    gc.images().await?;
    gc.holds().await?;
    gc.indexes().await?;
    gc.referrers().await?;
    gc.manifests().await?;
    gc.layers().await?;
    gc.blobs().await?;
    gc.leftovers().await?;
    gc.sweep().await?;
    Ok(gc.report)
}

/// A collection under way: what is live so far, and what is doomed.
struct Collection<'a> {
    storage: &'a dyn Storage,
    settings: &'a GcSettings,
    now: u64,
    report: Report,
    doomed: Vec<Listed>,
    /// Manifests (hex) that live images, indexes and referrers name.
    live_manifests: HashSet<String>,
    /// Digests of live indexes, whose manifests they keep.
    live_indexes: Vec<String>,
    /// Blobs (hex) that live manifests and young layer records name.
    live_blobs: HashSet<String>,
    /// Blob hex -> the layer records that name it.
    named_by: HashMap<String, Vec<String>>,
}

impl Collection<'_> {
    /// Whether an object was written within the grace period.
    fn young(&self, object: &Listed) -> bool {
        self.fresh(object.modified)
    }

    fn fresh(&self, modified: u64) -> bool {
        self.now.saturating_sub(modified) < self.settings.grace.as_secs()
    }

    async fn list(&mut self, prefix: Prefix) -> Result<Vec<Listed>, StorageError> {
        let listed = self.storage.list(prefix.as_str()).await?;
        self.report.scanned += listed.len();
        Ok(listed)
    }

    /// Image and index records: used recently (served or built), or
    /// expired, with their `served/` markers.
    async fn images(&mut self) -> Result<(), StorageError> {
        let markers: HashMap<String, Listed> = self
            .list(Prefix::Served)
            .await?
            .into_iter()
            .filter_map(|o| match Parsed::of(&o.key) {
                Some(Parsed::Served(name)) => Some((name, o)),
                _ => None,
            })
            .collect();
        let mut images = self.list(Prefix::Images).await?;
        images.extend(self.list(Prefix::Indexes).await?);
        let mut live_images = HashSet::new();
        for image in images {
            let name = match Parsed::of(&image.key) {
                Some(Parsed::ImageRecord(key)) => key.to_string(),
                Some(Parsed::IndexRecord(key)) => key.to_string(),
                _ => continue,
            };
            let used = markers
                .get(&name)
                .map_or(image.modified, |m| m.modified.max(image.modified));
            let unused = self.now.saturating_sub(used) >= self.settings.unused_for.as_secs();
            if unused && !self.young(&image) {
                self.report.images_expired += 1;
                self.doomed.push(image);
                continue;
            }
            match records::read::<ImageRecord>(self.storage, &image.key).await {
                Ok(Some(record)) => {
                    self.live_manifests
                        .insert(hex_of(&record.manifest_digest).to_string());
                    // Its SBOM goes with it.
                    if let Some(sbom) = &record.sbom {
                        self.live_manifests.insert(hex_of(sbom).to_string());
                    }
                    if record.media_type == MEDIA_TYPE_INDEX {
                        self.live_indexes.push(record.manifest_digest.clone());
                    }
                }
                Ok(None) => continue,
                Err(RecordError::Unreadable { .. }) => {
                    self.report.unreadable.push(image.key.clone())
                }
                Err(RecordError::Storage(e)) => return Err(e),
            }
            live_images.insert(name);
        }
        for (name, marker) in markers {
            if !live_images.contains(&name) && !self.young(&marker) {
                self.doomed.push(marker);
            }
        }
        Ok(())
    }

    /// Holds: a young one keeps the blob or manifest it names (a build or
    /// the registry relies on it), with what that names; old ones go.
    async fn holds(&mut self) -> Result<(), StorageError> {
        for hold in self.list(Prefix::Holds).await? {
            let Some(Parsed::Hold(hex)) = Parsed::of(&hold.key) else {
                continue;
            };
            if self.young(&hold) {
                self.live_manifests.insert(hex.clone());
                self.live_blobs.insert(hex);
            } else {
                self.doomed.push(hold);
            }
        }
        Ok(())
    }

    /// A live index keeps the manifests it lists, whether or not their own
    /// images were pulled lately.
    async fn indexes(&mut self) -> Result<(), StorageError> {
        for digest in std::mem::take(&mut self.live_indexes) {
            let listed = self.listed_in(&ManifestKey::of_digest(&digest)).await?;
            self.live_manifests.extend(listed);
        }
        Ok(())
    }

    /// Referrers indexes go with the manifest they are about, and keep
    /// what they list (a live manifest's SBOM, whichever build made it).
    async fn referrers(&mut self) -> Result<(), StorageError> {
        for listed in self.list(Prefix::Referrers).await? {
            let Some(Parsed::Referrers(subject)) = Parsed::of(&listed.key) else {
                continue;
            };
            if !self.live_manifests.contains(&subject) {
                if !self.young(&listed) {
                    self.doomed.push(listed);
                }
                continue;
            }
            let named = self.listed_in(&listed.key).await?;
            self.live_manifests.extend(named);
        }
        Ok(())
    }

    /// Manifests, and the blobs the live ones name.
    async fn manifests(&mut self) -> Result<(), StorageError> {
        for manifest in self.list(Prefix::Manifests).await? {
            let digest = match Parsed::of(&manifest.key) {
                Some(Parsed::Manifest(hex)) => hex,
                _ => String::new(),
            };
            if !self.live_manifests.contains(&digest) && !self.young(&manifest) {
                self.doomed.push(manifest);
                continue;
            }
            let Some(bytes) = self.storage.get(&manifest.key).await? else {
                continue;
            };
            match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(parsed) => {
                    self.live_blobs
                        .insert(hex_of(&parsed.config.digest).to_string());
                    self.live_blobs
                        .extend(parsed.layers.iter().map(|l| hex_of(&l.digest).to_string()));
                }
                // An index names manifests only (followed above).
                Err(_) if serde_json::from_slice::<ImageIndex>(&bytes).is_ok() => {}
                Err(_) => self.report.unreadable.push(manifest.key.clone()),
            }
        }
        Ok(())
    }

    /// Layer records: a young one keeps its blob (a build is using it); an
    /// old one goes with its blob when nothing live names that.
    async fn layers(&mut self) -> Result<(), StorageError> {
        let mut old_layers = Vec::new();
        for layer in self.list(Prefix::Layers).await? {
            let record = match records::read::<LayerRecord>(self.storage, &layer.key).await {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(RecordError::Unreadable { .. }) => {
                    // Unusable by any build: collected once old.
                    if !self.young(&layer) {
                        self.doomed.push(layer);
                    }
                    continue;
                }
                Err(RecordError::Storage(e)) => return Err(e),
            };
            let blob = hex_of(&record.digest).to_string();
            self.named_by
                .entry(blob.clone())
                .or_default()
                .push(layer.key.clone());
            if self.young(&layer) {
                self.live_blobs.insert(blob);
            } else {
                old_layers.push((layer, blob));
            }
        }
        for (layer, blob) in old_layers {
            if !self.live_blobs.contains(&blob) {
                self.doomed.push(layer);
            }
        }
        Ok(())
    }

    /// Blobs nothing live names.
    async fn blobs(&mut self) -> Result<(), StorageError> {
        for blob in self.list(Prefix::Blobs).await? {
            let live = match Parsed::of(&blob.key) {
                Some(Parsed::Blob(hex)) => self.live_blobs.contains(&hex),
                _ => false,
            };
            if !live && !self.young(&blob) {
                self.doomed.push(blob);
            }
        }
        Ok(())
    }

    /// Uploads in flight, build statuses and claims, git answers: all
    /// rewritten while in use, so old ones are leftovers.
    async fn leftovers(&mut self) -> Result<(), StorageError> {
        for prefix in [Prefix::Staging, Prefix::Builds, Prefix::Sources] {
            for object in self.list(prefix).await? {
                if !self.young(&object) {
                    self.doomed.push(object);
                }
            }
        }
        Ok(())
    }

    /// Deletes what was doomed, each looked at again right before: one a
    /// build rewrote or held since the listing (or, for a blob, whose layer
    /// record it rewrote) is kept.
    async fn sweep(&mut self) -> Result<(), StorageError> {
        for object in std::mem::take(&mut self.doomed) {
            if !self.settings.dry_run {
                match self.sweep_one(&object.key).await {
                    Ok(Sweep::Deleted) => {}
                    Ok(Sweep::Gone) => continue,
                    Ok(Sweep::Rescued) => {
                        self.report.rescued.push(object.key);
                        continue;
                    }
                    // What was marked counted on expired image records
                    // being gone: one that stays keeps what it names, so
                    // stop.
                    Err(error)
                        if matches!(
                            Parsed::of(&object.key),
                            Some(Parsed::ImageRecord(_) | Parsed::IndexRecord(_))
                        ) =>
                    {
                        return Err(error)
                    }
                    // Anything else left behind is garbage that names
                    // nothing live: keep it, report it, and go on, so that
                    // one object (or a whole prefix) the collection cannot
                    // touch does not keep it from reclaiming the rest.
                    Err(error) => {
                        tracing::warn!(key = object.key, %error, "could not collect; kept");
                        self.report.failed.push((object.key, error.to_string()));
                        continue;
                    }
                }
            }
            self.report.deleted.push(object);
        }
        Ok(())
    }

    /// One doomed object, looked at again and deleted unless rewritten.
    async fn sweep_one(&self, key: &str) -> Result<Sweep, StorageError> {
        let Some(modified) = self.storage.modified(key).await? else {
            return Ok(Sweep::Gone);
        };
        let mut rewritten = self.fresh(modified);
        let parsed = Parsed::of(key);
        if let (false, Some(Parsed::Blob(hex) | Parsed::Manifest(hex))) = (rewritten, &parsed) {
            rewritten |= self
                .storage
                .modified(&HoldKey::of(hex))
                .await?
                .is_some_and(|m| self.fresh(m));
        }
        if let (false, Some(Parsed::Blob(hex))) = (rewritten, &parsed) {
            for record in self.named_by.get(hex).into_iter().flatten() {
                rewritten |= self
                    .storage
                    .modified(record)
                    .await?
                    .is_some_and(|m| self.fresh(m));
            }
        }
        if rewritten {
            return Ok(Sweep::Rescued);
        }
        self.storage.delete(key).await?;
        Ok(Sweep::Deleted)
    }

    /// The manifests (as hex) the index stored under `key` lists: none if
    /// it is gone, and none, reported, if it is not an index.
    async fn listed_in(&mut self, key: &str) -> Result<Vec<String>, StorageError> {
        let Some(bytes) = self.storage.get(key).await? else {
            return Ok(Vec::new());
        };
        match serde_json::from_slice::<ImageIndex>(&bytes) {
            Ok(index) => Ok(index
                .manifests
                .iter()
                .map(|m| hex_of(&m.digest).to_string())
                .collect()),
            Err(_) => {
                self.report.unreadable.push(key.to_string());
                Ok(Vec::new())
            }
        }
    }
}

/// What became of one object the collection meant to delete.
enum Sweep {
    Deleted,
    /// Gone already.
    Gone,
    /// Rewritten since the listing, by a build relying on it.
    Rescued,
}

/// Parses a duration: a number with a unit (`30d`, `12h`, `90m`, `45s`) or
/// plain seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => value.split_at(at),
        None => (value, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration (like 30d, 12h, 90m or 45s)"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{value:?}: the unit must be s, m, h or d")),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{value:?} is too long"))
}

#[cfg(test)]
mod beside_builds;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        for bad in ["", "d", "1w", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
