//! Manifests this instance served, kept in memory so that a warm instance
//! answers a repeated pull with no storage call.
//!
//! An entry is what a storage read gave, after its digest was checked:
//! the manifest bytes, and for a pull by tag the image record that named
//! them. It is answered again while
//!
//! - it is younger than the cache's lifetime (an hour by default), so that
//!   an instance never serves for long what garbage collection, which
//!   removes only images unused for far longer, may have taken away; and
//! - for a pull by tag, its record is still current by the pull's own
//!   freshness rule ([`ImageRecord::is_current`]), so an image of a moving
//!   source expires here exactly when it does in storage.
//!
//! Memory is bounded by bytes: the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Served;
use crate::storage::records::ImageRecord;

/// What an entry costs besides its key and manifest bytes (the record, the
/// digest and media type, the map's own overhead), roughly.
const ENTRY_OVERHEAD: usize = 512;

/// How long entries live and how much memory they may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Zero keeps nothing.
    pub ttl: Duration,
    pub max_bytes: usize,
}

#[derive(Debug)]
pub struct ManifestCache {
    limits: CacheLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Keys in insertion order, with the generation they were inserted as
    /// (a key replaced since has a newer one in `entries`).
    order: VecDeque<(String, u64)>,
    bytes: usize,
    generation: u64,
}

#[derive(Debug)]
struct Entry {
    served: Served,
    /// The record a pull by tag found; `None` for a pull by digest.
    record: Option<ImageRecord>,
    stored_at: Instant,
    cost: usize,
    generation: u64,
}

impl ManifestCache {
    pub fn new(limits: CacheLimits) -> ManifestCache {
        ManifestCache {
            limits,
            inner: Mutex::default(),
        }
    }

    /// The manifest under `key`, if it may be served to a pull that
    /// accepts nothing built before `not_before`.
    pub fn get(&self, key: &str, not_before: u64, now: Instant) -> Option<Served> {
        let mut inner = self.inner.lock().expect("never poisoned");
        let entry = inner.entries.get(key)?;
        let young = now.saturating_duration_since(entry.stored_at) < self.limits.ttl;
        let current = entry
            .record
            .as_ref()
            .is_none_or(|record| record.is_current(not_before));
        if young && current {
            return Some(entry.served.clone());
        }
        inner.remove(key);
        None
    }

    /// Keeps `served` under `key`, with the record that named it if any.
    pub fn insert(&self, key: &str, record: Option<ImageRecord>, served: Served, now: Instant) {
        let cost = key.len()
            + served.bytes.len()
            + record
                .as_ref()
                .map_or(0, |r| r.packages.iter().map(String::len).sum::<usize>())
            + ENTRY_OVERHEAD;
        if self.limits.ttl.is_zero() || cost > self.limits.max_bytes {
            return;
        }
        let mut inner = self.inner.lock().expect("never poisoned");
        inner.remove(key);
        inner.generation += 1;
        let generation = inner.generation;
        inner.order.push_back((key.to_string(), generation));
        inner.bytes += cost;
        inner.entries.insert(
            key.to_string(),
            Entry {
                served,
                record,
                stored_at: now,
                cost,
                generation,
            },
        );
        while inner.bytes > self.limits.max_bytes {
            let Some((oldest, generation)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&oldest).map(|e| e.generation) == Some(generation) {
                inner.remove(&oldest);
            }
        }
    }

    /// Bytes the entries take, by the cache's own count.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("never poisoned").bytes
    }
}

impl Inner {
    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes -= entry.cost;
        }
        // Keys removed out of order stay in `order` until they reach its
        // front; do not let them pile up when the same keys churn.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(key, generation)| {
                entries.get(key).map(|e| e.generation) == Some(*generation)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn served(text: &str) -> Served {
        Served {
            bytes: Bytes::from(text.to_string()),
            digest: format!("sha256:{text}"),
            media_type: "m".to_string(),
            cached: false,
            built_at: 0,
        }
    }

    fn record(built_at: u64) -> ImageRecord {
        ImageRecord {
            manifest_digest: "sha256:x".to_string(),
            media_type: "m".to_string(),
            size: 1,
            packages: vec!["hello".to_string()],
            architecture: "amd64".to_string(),
            built_at,
            sbom: None,
        }
    }

    fn cache(ttl: u64, max_bytes: usize) -> ManifestCache {
        ManifestCache::new(CacheLimits {
            ttl: Duration::from_secs(ttl),
            max_bytes,
        })
    }

    #[test]
    fn entries_live_for_the_ttl_only() {
        let cache = cache(3600, 1 << 20);
        let t0 = Instant::now();
        cache.insert("a", None, served("a"), t0);
        assert_eq!(
            cache.get("a", 0, t0 + Duration::from_secs(3599)),
            Some(served("a"))
        );
        assert_eq!(cache.get("a", 0, t0 + Duration::from_secs(3600)), None);
        // Gone, not just hidden: its bytes are given back.
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn a_record_answers_only_pulls_it_is_current_for() {
        let cache = cache(3600, 1 << 20);
        let t0 = Instant::now();
        cache.insert("tag", Some(record(1_000)), served("m"), t0);
        assert!(cache.get("tag", 0, t0).is_some());
        assert!(cache.get("tag", 1_000, t0).is_some());
        // The source moved on: the stale entry goes.
        assert!(cache.get("tag", 1_001, t0).is_none());
        assert!(cache.get("tag", 0, t0).is_none());
    }

    #[test]
    fn memory_is_bounded_by_bytes_oldest_first() {
        let one = "k0".len() + 2 + ENTRY_OVERHEAD;
        let cache = cache(3600, 3 * one);
        let t0 = Instant::now();
        for i in 0..5 {
            cache.insert(&format!("k{i}"), None, served(&format!("m{i}")), t0);
            assert!(cache.bytes() <= 3 * one);
        }
        assert!(cache.get("k0", 0, t0).is_none());
        assert!(cache.get("k1", 0, t0).is_none());
        for i in 2..5 {
            assert!(cache.get(&format!("k{i}"), 0, t0).is_some(), "k{i}");
        }
        // Replacing a key does not count it twice, nor evict it early.
        cache.insert("k4", None, served("m5"), t0);
        assert_eq!(cache.bytes(), 3 * one);
        assert_eq!(cache.get("k4", 0, t0), Some(served("m5")));
        // Churning the same keys keeps the bookkeeping small.
        for round in 0..1_000 {
            cache.insert("k2", None, served(&format!("{:02}", round % 100)), t0);
        }
        assert!(cache.inner.lock().unwrap().order.len() < 200);
    }

    #[test]
    fn zero_ttl_or_huge_entries_are_not_kept() {
        let t0 = Instant::now();
        let off = cache(0, 1 << 20);
        off.insert("a", None, served("a"), t0);
        assert_eq!(off.get("a", 0, t0), None);
        let small = cache(3600, 100);
        small.insert("a", None, served("a"), t0);
        assert_eq!(small.get("a", 0, t0), None);
        assert_eq!(small.bytes(), 0);
    }
}
