//! Index jobs: making the attribute index of a revision with Nix, where
//! Nix is (a worker, the local server, `nixery index`), and asking for one
//! when a pull meets a revision without one ([`IndexJobs`]): at most one
//! job per revision and system at a time, across every instance, by a
//! create-only claim (`attrs/<revision>/<system>/claim`) that a job older
//! than [`CLAIM_TTL`] no longer holds.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::attrs::{revision_of, AttrsError, Catalog, Head};
use crate::builder::nix::{Nix, NixError};
use crate::dispatch::queue::Queue;
use crate::source::SourceArg;
use crate::storage::keys::AttrsClaimKey;
use crate::storage::records::unix_now;
use crate::storage::Storage;

/// How long a claimed index job is waited for before another may run.
pub const CLAIM_TTL: Duration = Duration::from_secs(3600);
/// How deep `nix/index.nix` recurses into sets that ask for it.
pub const MAX_DEPTH: u32 = 3;

/// The body of a queue message that asks a worker for an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexMessage {
    pub index: IndexRequest,
}

/// An index to make: of the package set at `source`, for `system`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRequest {
    pub source: SourceArg,
    pub system: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Attrs(#[from] AttrsError),
}

/// Lists the package set at `source` for `system` with Nix, and stores
/// its attribute index.
pub async fn make_index(
    nix: &Nix,
    catalog: &Catalog,
    request: &IndexRequest,
) -> Result<Head, IndexError> {
    let started = std::time::Instant::now();
    let indexed_at = unix_now();
    let entries = nix
        .list_attributes(&request.source, &request.system, MAX_DEPTH)
        .await?;
    let head = catalog
        .write(&request.source, &request.system, entries, indexed_at)
        .await?;
    tracing::info!(
        revision = %revision_of(&request.source),
        system = %request.system,
        entries = head.entries,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "attribute index stored"
    );
    Ok(head)
}

/// Claims the job of indexing `request`: `true` if this caller got it.
async fn claim(storage: &dyn Storage, request: &IndexRequest) -> bool {
    let key = AttrsClaimKey::of(&revision_of(&request.source), &request.system);
    let now = unix_now();
    let claim = Bytes::from(serde_json::json!({ "claimed_at": now }).to_string());
    match storage.put_if_absent(&key, claim.clone()).await {
        Ok(true) => true,
        Ok(false) => {
            // Taken: by a job that may have died. Past its time, take it
            // over (a race here makes at most a second job).
            let claimed_at = storage
                .get(&key)
                .await
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["claimed_at"].as_u64())
                .unwrap_or(0);
            if now.saturating_sub(claimed_at) < CLAIM_TTL.as_secs() {
                return false;
            }
            storage.put(&key, claim).await.is_ok()
        }
        Err(error) => {
            tracing::warn!(%error, "claiming an index job failed");
            false
        }
    }
}

/// Where a pull that meets a revision without an index asks for one.
#[async_trait]
pub trait IndexJobs: Send + Sync + 'static {
    /// Asks for the index of `source` for `system`, unless a job for it
    /// runs already. Never waits for it.
    async fn request(&self, source: &SourceArg, system: &str);
}

/// Index jobs run by this process, with the local Nix, in the background.
pub struct LocalIndexer {
    nix: Nix,
    catalog: Arc<Catalog>,
    storage: Arc<dyn Storage>,
    running: Arc<Mutex<HashSet<String>>>,
}

impl LocalIndexer {
    pub fn new(nix: Nix, catalog: Arc<Catalog>, storage: Arc<dyn Storage>) -> LocalIndexer {
        LocalIndexer {
            nix,
            catalog,
            storage,
            running: Arc::default(),
        }
    }
}

#[async_trait]
impl IndexJobs for LocalIndexer {
    async fn request(&self, source: &SourceArg, system: &str) {
        let request = IndexRequest {
            source: source.clone(),
            system: system.to_string(),
        };
        let slot = format!("{}/{system}", revision_of(source));
        if !self
            .running
            .lock()
            .expect("never poisoned")
            .insert(slot.clone())
        {
            return;
        }
        if !claim(&*self.storage, &request).await {
            self.running.lock().expect("never poisoned").remove(&slot);
            return;
        }
        let (nix, catalog, running) =
            (self.nix.clone(), self.catalog.clone(), self.running.clone());
        tokio::spawn(async move {
            if let Err(error) = make_index(&nix, &catalog, &request).await {
                tracing::warn!(%error, system = %request.system, "making the attribute index failed");
            }
            running.lock().expect("never poisoned").remove(&slot);
        });
    }
}

/// Index jobs sent to workers through the build queue.
pub struct QueueIndexer {
    queue: Arc<dyn Queue>,
    storage: Arc<dyn Storage>,
}

impl QueueIndexer {
    pub fn new(queue: Arc<dyn Queue>, storage: Arc<dyn Storage>) -> QueueIndexer {
        QueueIndexer { queue, storage }
    }
}

#[async_trait]
impl IndexJobs for QueueIndexer {
    async fn request(&self, source: &SourceArg, system: &str) {
        let request = IndexRequest {
            source: source.clone(),
            system: system.to_string(),
        };
        if !claim(&*self.storage, &request).await {
            return;
        }
        let body = serde_json::to_string(&IndexMessage {
            index: request.clone(),
        })
        .expect("an index request always serialises");
        match self.queue.send_body(body).await {
            Ok(()) => {
                tracing::info!(system, revision = %revision_of(source), "attribute index job queued")
            }
            Err(error) => tracing::warn!(%error, "queueing an index job failed"),
        }
    }
}

/// No index jobs: where indexes are made by `nixery index` alone.
pub struct NoIndexJobs;

#[async_trait]
impl IndexJobs for NoIndexJobs {
    async fn request(&self, _source: &SourceArg, _system: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[tokio::test]
    async fn one_job_per_revision_until_its_claim_is_old() {
        let storage = MemoryStorage::new();
        let request = IndexRequest {
            source: SourceArg::Path {
                path: "/pkgs".into(),
            },
            system: "x86_64-linux".into(),
        };
        assert!(claim(&storage, &request).await);
        assert!(!claim(&storage, &request).await);
        let other = IndexRequest {
            system: "aarch64-linux".into(),
            ..request.clone()
        };
        assert!(claim(&storage, &other).await);
        // A claim from two hours ago is taken over.
        let key = AttrsClaimKey::of(&revision_of(&request.source), &request.system);
        let old = serde_json::json!({ "claimed_at": unix_now() - 7200 }).to_string();
        storage.put(&key, Bytes::from(old)).await.unwrap();
        assert!(claim(&storage, &request).await);
        assert!(!claim(&storage, &request).await);
    }
}
