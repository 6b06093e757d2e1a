//! The JSON records kept beside the content-addressed objects: what an image
//! is (`images/<image-key>`), what a reusable layer is
//! (`layers/<layer-key>`), that a build relies on a stored object
//! (`holds/<hex>`), and how they are read and written.
//!
//! Records are small, written whole, and read whole. A record that does not
//! parse is an error naming its key, never a silent miss.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::keys::HoldKey;
use super::{Storage, StorageError};

/// The time in Unix seconds, as records store it.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The time in Unix milliseconds.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 in UTC, `1970-01-01T00:00:00Z`, from Unix seconds
/// (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
    /// The digest of the image's SBOM artifact manifest, which garbage
    /// collection keeps with it (none for indexes and older images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
}

/// Whether something made at `at` (Unix seconds) is recent enough for a
/// pull that accepts nothing made before `not_before` (0 accepts
/// anything). The image service decides `not_before`; builders and
/// dispatchers ask only this, of records and of build statuses.
pub fn is_current(at: u64, not_before: u64) -> bool {
    at >= not_before
}

impl ImageRecord {
    /// [`is_current`] of this image's build time.
    pub fn is_current(&self, not_before: u64) -> bool {
        is_current(self.built_at, not_before)
    }
}

/// `layers/<layer-key>`: a layer blob that any image may reuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
    pub media_type: String,
}

/// `holds/<hex>`: a build (or the registry composing an index) relies on
/// a stored blob or manifest that it found there and did not write
/// (content-addressed objects are never rewritten when good). Garbage
/// collection reads only when the hold was written: a young hold keeps
/// the object, as a young layer record keeps its blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The key of the object held.
    pub object: String,
    /// When (Unix seconds), for people reading it.
    pub held_at: u64,
}

/// Writes (or rewrites) the hold on the content-addressed object `key`.
pub async fn hold(storage: &dyn Storage, key: &str) -> Result<(), StorageError> {
    let hold_key = HoldKey::on(key).ok_or_else(|| StorageError::InvalidKey {
        key: key.to_string(),
    })?;
    let hold = Hold {
        object: key.to_string(),
        held_at: unix_now(),
    };
    write(storage, &hold_key, &hold).await
}

/// A record that is there but cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// serde's message quotes what it could not read, which may be a
    /// source's URL (`sources/` answers): shown redacted.
    #[error("stored record {key} is unreadable: {}", crate::source::redact_urls(&source.to_string()))]
    Unreadable {
        key: String,
        source: serde_json::Error,
    },
}

/// Reads a JSON record; `None` if absent.
pub async fn read<T: DeserializeOwned>(
    storage: &dyn Storage,
    key: &str,
) -> Result<Option<T>, RecordError> {
    match storage.get(key).await? {
        None => Ok(None),
        Some(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RecordError::Unreadable {
                    key: key.to_string(),
                    source,
                })
        }
    }
}

/// A record's bytes.
fn to_json<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("records always serialise"))
}

/// Writes (or replaces) a JSON record.
pub async fn write<T: Serialize>(
    storage: &dyn Storage,
    key: &str,
    value: &T,
) -> Result<(), StorageError> {
    storage.put(key, to_json(value)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_is_built_at_against_not_before() {
        let record = ImageRecord {
            manifest_digest: "sha256:00".into(),
            media_type: "m".into(),
            size: 1,
            packages: vec![],
            architecture: "amd64".into(),
            built_at: 100,
            sbom: None,
        };
        assert!(record.is_current(0));
        assert!(record.is_current(100));
        assert!(!record.is_current(101));
    }
}
