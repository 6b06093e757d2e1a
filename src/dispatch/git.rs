//! Git lookups answered by workers, for a registry that has no `git`
//! (the Lambda runtime has none): [`QueueGit`] asks through the queue
//! ([`GitMessage`]) and reads the answer a worker stores under
//! `sources/<hash of the lookup>` ([`GitAnswer`]); any instance's question
//! fills it for all.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::queue::{GitMessage, Queue};
use crate::oci::digest::sha256_hex;
use crate::source::{kept_for, GitLookup, GitResolver, SourceArg, SourceError};
use crate::storage::keys::GitAnswerKey;
use crate::storage::records::{self, unix_now as now};
use crate::storage::Storage;

/// The longest pause between two looks at storage while waiting.
const MAX_POLL: Duration = Duration::from_secs(2);

/// `sources/<hash of the lookup>`: a worker's answer to a git lookup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitAnswer {
    /// Unix seconds.
    pub at: u64,
    pub result: Result<SourceArg, SourceError>,
}

/// Where the answer to a lookup is stored.
pub fn git_answer_key(lookup: &GitLookup) -> GitAnswerKey {
    let canonical = serde_json::to_vec(lookup).expect("a lookup always serialises");
    GitAnswerKey::of(&sha256_hex(&canonical))
}

/// Git lookups answered by a worker through the queue: the answer is read
/// from storage (any instance's question fills it for all), asked for when
/// missing or too old, and waited for.
pub struct QueueGit {
    storage: Arc<dyn Storage>,
    queue: Arc<dyn Queue>,
    /// How old an answer may be: a name's resolution, and a failure.
    ttl: Duration,
    failure_ttl: Duration,
    /// How long to wait for a worker.
    wait: Duration,
}

impl std::fmt::Debug for QueueGit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGit")
            .field("queue", &self.queue)
            .field("wait", &self.wait)
            .finish()
    }
}

impl QueueGit {
    pub fn new(
        storage: Arc<dyn Storage>,
        queue: Arc<dyn Queue>,
        ttl: Duration,
        failure_ttl: Duration,
        wait: Duration,
    ) -> QueueGit {
        QueueGit {
            storage,
            queue,
            ttl,
            failure_ttl,
            wait,
        }
    }

    /// The stored answer, if one is recent enough.
    async fn answered(&self, key: &GitAnswerKey) -> Option<Result<SourceArg, SourceError>> {
        let answer: GitAnswer = match records::read(&*self.storage, key).await {
            Ok(Some(answer)) => answer,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(%error, %key, "reading a git lookup's answer failed");
                return None;
            }
        };
        let keep = kept_for(&answer.result, self.ttl, self.failure_ttl);
        (answer.at + keep.as_secs() >= now()).then_some(answer.result)
    }
}

#[async_trait]
impl GitResolver for QueueGit {
    async fn resolve(&self, lookup: &GitLookup) -> Result<SourceArg, SourceError> {
        let key = git_answer_key(lookup);
        if let Some(result) = self.answered(&key).await {
            return result;
        }
        let unanswered = |message: String| SourceError::Git {
            url: lookup.url.clone(),
            message,
        };
        let asked = serde_json::to_string(&GitMessage {
            lookup: lookup.clone(),
        })
        .expect("a lookup always serialises");
        self.queue
            .send_body(asked)
            .await
            .map_err(|e| unanswered(e.to_string()))?;
        let asked_at = now();
        let deadline = Instant::now() + self.wait;
        let mut pause = Duration::from_millis(100);
        loop {
            tokio::time::sleep(pause).await;
            if let Ok(Some(answer)) = records::read::<GitAnswer>(&*self.storage, &key).await {
                if answer.at >= asked_at {
                    return answer.result;
                }
            }
            if Instant::now() >= deadline {
                return Err(unanswered(format!(
                    "no worker answered within {} s",
                    self.wait.as_secs()
                )));
            }
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}
