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
//! rewrites its layer record first (see `Builder::store_layer`), so a
//! grace longer than the longest build keeps the new objects and reused
//! layers a running build relies on. A config or manifest a build finds
//! stored and good is not written again (nothing good is overwritten), so
//! it is kept only if something live names it or it is young.
//!
//! Index records (`indexes/`) are image records too. A live manifest's
//! referrers index keeps what it lists.
//!
//! **Sweep.** Expired image records go first (and with them their
//! markers), then referrers indexes of manifests no longer live, then
//! manifests, layer records and blobs nothing live names, then leftovers
//! of `staging/`, `builds/` and `sources/`: everything only
//! once older than `grace`. Right before each delete the object is looked
//! at again (and, for a blob, the layer records that name it): one a build
//! rewrote since the listing, to rely on it, is kept. An object that
//! cannot be looked at or deleted after the image records is kept and
//! reported, and the sweep goes on; an image record that cannot be deleted
//! stops it, since what it names was counted as garbage. A dry run
//! deletes nothing and reports the same.
//!
//! Unlike distribution's `garbage-collect`, nothing is stopped: reads never
//! wait, and a pull of an image collected a moment ago builds it again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::oci::digest::hex_of;
use crate::oci::manifest::{ImageIndex, Manifest, MEDIA_TYPE_INDEX};
use crate::storage::records::{self, ImageRecord, LayerRecord, RecordError};
use crate::storage::{digest_of_key, Listed, Storage, StorageError};

/// The manifests (as hex) the index stored under `key` lists: none if it
/// is gone, and none, reported, if it is not an index.
async fn listed_in(
    storage: &dyn Storage,
    key: &str,
    report: &mut Report,
) -> Result<Vec<String>, StorageError> {
    let Some(bytes) = storage.get(key).await? else {
        return Ok(Vec::new());
    };
    match serde_json::from_slice::<ImageIndex>(&bytes) {
        Ok(index) => Ok(index
            .manifests
            .iter()
            .map(|m| hex_of(&m.digest).to_string())
            .collect()),
        Err(_) => {
            report.unreadable.push(key.to_string());
            Ok(Vec::new())
        }
    }
}

/// Where `served/` markers live: one per image, rewritten when served.
pub fn served_key(image_key: &str) -> String {
    format!("served/{image_key}")
}

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
    /// Objects a build rewrote between the listing and their delete: kept.
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

/// One collection at time `now` (Unix seconds).
pub async fn collect(
    storage: &dyn Storage,
    settings: &GcSettings,
    now: u64,
) -> Result<Report, StorageError> {
    let young = |o: &Listed| now.saturating_sub(o.modified) < settings.grace.as_secs();
    let mut report = Report::default();
    let mut doomed: Vec<Listed> = Vec::new();

    // Images: used recently, or expired.
    let markers: HashMap<String, Listed> = storage
        .list("served/")
        .await?
        .into_iter()
        .map(|o| (o.key.trim_start_matches("served/").to_string(), o))
        .collect();
    let mut live_images = HashSet::new();
    let mut live_manifests = HashSet::new();
    let mut live_indexes = Vec::new();
    // Image records, and the records of multi-platform indexes.
    let mut images = storage.list("images/").await?;
    images.extend(storage.list("indexes/").await?);
    report.scanned += images.len() + markers.len();
    for image in images {
        let name = image
            .key
            .trim_start_matches("images/")
            .trim_start_matches("indexes/")
            .to_string();
        let used = markers
            .get(&name)
            .map_or(image.modified, |m| m.modified.max(image.modified));
        if now.saturating_sub(used) >= settings.unused_for.as_secs() && !young(&image) {
            report.images_expired += 1;
            doomed.push(image);
            continue;
        }
        match records::read::<ImageRecord>(storage, &image.key).await {
            Ok(Some(record)) => {
                live_manifests.insert(hex_of(&record.manifest_digest).to_string());
                // Its SBOM goes with it.
                if let Some(sbom) = &record.sbom {
                    live_manifests.insert(hex_of(sbom).to_string());
                }
                if record.media_type == MEDIA_TYPE_INDEX {
                    live_indexes.push(record.manifest_digest.clone());
                }
            }
            Ok(None) => continue,
            Err(RecordError::Unreadable { .. }) => report.unreadable.push(image.key.clone()),
            Err(RecordError::Storage(e)) => return Err(e),
        }
        live_images.insert(name);
    }
    doomed.extend(
        markers
            .into_iter()
            .filter(|(name, marker)| !live_images.contains(name) && !young(marker))
            .map(|(_, marker)| marker),
    );

    // A live index keeps the manifests it lists, whether or not their own
    // images were pulled lately.
    for digest in live_indexes {
        let key = crate::storage::manifest_key(hex_of(&digest));
        live_manifests.extend(listed_in(storage, &key, &mut report).await?);
    }

    // Referrers indexes go with the manifest they are about, and keep
    // what they list (a live manifest's SBOM, whichever build made it).
    let referrers = storage.list("referrers/").await?;
    report.scanned += referrers.len();
    for listed in referrers {
        let subject = listed.key.trim_start_matches("referrers/");
        if !live_manifests.contains(subject) {
            if !young(&listed) {
                doomed.push(listed);
            }
            continue;
        }
        live_manifests.extend(listed_in(storage, &listed.key, &mut report).await?);
    }

    // Manifests, and the blobs the live ones name.
    let mut live_blobs = HashSet::new();
    let manifests = storage.list("manifests/").await?;
    report.scanned += manifests.len();
    for manifest in manifests {
        let digest = digest_of_key(&manifest.key).unwrap_or_default();
        if !live_manifests.contains(digest) && !young(&manifest) {
            doomed.push(manifest);
            continue;
        }
        let Some(bytes) = storage.get(&manifest.key).await? else {
            continue;
        };
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(parsed) => {
                live_blobs.insert(hex_of(&parsed.config.digest).to_string());
                live_blobs.extend(parsed.layers.iter().map(|l| hex_of(&l.digest).to_string()));
            }
            // An index names manifests only (followed above).
            Err(_) if serde_json::from_slice::<ImageIndex>(&bytes).is_ok() => {}
            Err(_) => report.unreadable.push(manifest.key.clone()),
        }
    }

    // Layer records: a young one keeps its blob (a build is using it); an
    // old one goes with its blob when nothing live names that.
    let layers = storage.list("layers/").await?;
    report.scanned += layers.len();
    let mut old_layers = Vec::new();
    // Blob hex -> the layer records that name it.
    let mut named_by: HashMap<String, Vec<String>> = HashMap::new();
    for layer in layers {
        let record = match records::read::<LayerRecord>(storage, &layer.key).await {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(RecordError::Unreadable { .. }) => {
                // Unusable by any build: collected once old.
                if !young(&layer) {
                    doomed.push(layer);
                }
                continue;
            }
            Err(RecordError::Storage(e)) => return Err(e),
        };
        named_by
            .entry(hex_of(&record.digest).to_string())
            .or_default()
            .push(layer.key.clone());
        if young(&layer) {
            live_blobs.insert(hex_of(&record.digest).to_string());
        } else {
            old_layers.push((layer, hex_of(&record.digest).to_string()));
        }
    }
    doomed.extend(
        old_layers
            .into_iter()
            .filter(|(_, blob)| !live_blobs.contains(blob))
            .map(|(layer, _)| layer),
    );

    let blobs = storage.list("blobs/").await?;
    report.scanned += blobs.len();
    doomed.extend(blobs.into_iter().filter(|blob| {
        let digest = digest_of_key(&blob.key).unwrap_or_default();
        !live_blobs.contains(digest) && !young(blob)
    }));

    // Uploads in flight, build statuses and claims, git answers: all
    // rewritten while in use, so old ones are leftovers.
    for dir in ["staging/", "builds/", "sources/"] {
        let found = storage.list(dir).await?;
        report.scanned += found.len();
        doomed.extend(found.into_iter().filter(|o| !young(o)));
    }

    let fresh = |modified: u64| now.saturating_sub(modified) < settings.grace.as_secs();
    for object in doomed {
        if !settings.dry_run {
            let swept = async {
                let Some(modified) = storage.modified(&object.key).await? else {
                    return Ok(Sweep::Gone);
                };
                let mut rewritten = fresh(modified);
                if !rewritten && object.key.starts_with("blobs/") {
                    let digest = digest_of_key(&object.key).unwrap_or_default();
                    for record in named_by.get(digest).into_iter().flatten() {
                        rewritten |= storage.modified(record).await?.is_some_and(fresh);
                    }
                }
                if rewritten {
                    return Ok(Sweep::Rescued);
                }
                storage.delete(&object.key).await.map(|()| Sweep::Deleted)
            }
            .await;
            match swept {
                Ok(Sweep::Deleted) => {}
                Ok(Sweep::Gone) => continue,
                Ok(Sweep::Rescued) => {
                    report.rescued.push(object.key);
                    continue;
                }
                // What was marked counted on expired image records being
                // gone: one that stays keeps what it names, so stop.
                Err(error)
                    if object.key.starts_with("images/") || object.key.starts_with("indexes/") =>
                {
                    return Err(error)
                }
                // Anything else left behind is garbage that names nothing
                // live: keep it, report it, and go on, so that one object
                // (or a whole prefix) the collection cannot touch does not
                // keep it from reclaiming the rest.
                Err(error) => {
                    tracing::warn!(key = object.key, %error, "could not collect; kept");
                    report.failed.push((object.key, error.to_string()));
                    continue;
                }
            }
        }
        report.deleted.push(object);
    }
    Ok(report)
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
