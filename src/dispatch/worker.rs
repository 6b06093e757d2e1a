//! The worker side of builds through a queue: [`Worker`] takes messages
//! from an [`Inbox`] (SQS's, in production), runs one build at a time
//! through the one build-and-report flow ([`report::build_reported`]),
//! keeps the message invisible to other workers while it builds, and
//! deletes it when the outcome is recorded. A worker that dies leaves the
//! message to reappear for another worker (after the visibility timeout),
//! and no image record: the image record is written last.
//!
//! A message is data from the queue, so it decides nothing it should not:
//! the image's key is computed from the request it carries
//! ([`BuildRequest::image_key`]), and its `not_before` is clamped to this
//! worker's clock.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::git::{git_answer_key, GitAnswer};
use super::queue::{GitMessage, Inbox, QueueMessage, Received};
use super::report::{self, Ended};
use super::status::{self, BuildStatus, State};
use crate::assembly::attrs::Catalog;
use crate::assembly::jobs::{make_index, IndexMessage, IndexRequest};
use crate::builder::nix::Nix;
use crate::builder::{build_span, Builder, Step, StepProgress};
use crate::metrics::Metrics;
use crate::source::{GitLookup, GitResolver, LocalGit};
use crate::storage::records::{self, unix_now as now};

/// A queue whose visibility timeout cannot be read is taken to have this.
const FALLBACK_VISIBILITY: i32 = 900;

/// Takes builds off the queue and runs them.
pub struct Worker {
    builder: Arc<Builder>,
    inbox: Arc<dyn Inbox>,
    heartbeat: Duration,
    /// Answers git lookups for registries without git.
    git: Arc<dyn GitResolver>,
    /// Builds, written to the log in embedded metric format.
    metrics: Metrics,
    /// Makes the attribute indexes asked for, if it can.
    indexer: Option<(Nix, Arc<Catalog>)>,
}

impl Worker {
    pub fn new(builder: Builder, inbox: Arc<dyn Inbox>, heartbeat: Duration) -> Worker {
        Worker {
            builder: Arc::new(builder),
            inbox,
            heartbeat,
            git: Arc::new(LocalGit::default()),
            metrics: Metrics::new(Some(crate::metrics::SERVICE_WORKER)),
            indexer: None,
        }
    }

    /// Makes the attribute indexes asked for through the queue, with
    /// `nix`, into `catalog`.
    pub fn indexing_with(mut self, nix: Nix, catalog: Arc<Catalog>) -> Worker {
        self.indexer = Some((nix, catalog));
        self
    }

    /// Serves the queue until `shutdown` resolves (a build under way is
    /// abandoned then; its message comes back for another worker).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let hidden_for = self.visibility_timeout().await;
        tracing::info!(queue = %self.inbox.name(), visibility_seconds = hidden_for, "worker started");
        tokio::pin!(shutdown);
        loop {
            let received = tokio::select! {
                _ = &mut shutdown => break,
                received = self.inbox.receive() => received,
            };
            let message = match received {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, "receiving from the queue failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    tracing::info!("worker stopping mid-build; the message will come back");
                    return;
                }
                () = self.handle(&message, hidden_for) => {}
            }
        }
        tracing::info!("worker stopped");
    }

    async fn delete(&self, receipt: &str) {
        if let Err(error) = self.inbox.delete(receipt).await {
            tracing::warn!(%error, "deleting a message failed; it will come back");
        }
    }

    /// The queue's own visibility timeout, which each heartbeat renews: the
    /// time the template gives a build, so that a slow status write never
    /// lets the message reappear for a second worker. (A dead worker's
    /// build is taken over sooner: waiting pulls claim the next attempt
    /// after six silent heartbeats and send a message of their own.)
    async fn visibility_timeout(&self) -> i32 {
        match self.inbox.visibility_timeout().await {
            Ok(Some(seconds)) if seconds > 0 => seconds,
            Ok(_) => FALLBACK_VISIBILITY,
            Err(error) => {
                tracing::warn!(%error, fallback = FALLBACK_VISIBILITY, "reading the queue's visibility timeout failed");
                FALLBACK_VISIBILITY
            }
        }
    }

    /// One message: a build, a git lookup or an index job; anything else
    /// is dropped.
    pub async fn handle(&self, message: &Received, hidden_for: i32) {
        let body = &message.body;
        let build: QueueMessage = match serde_json::from_str(body) {
            Ok(build) => build,
            Err(build_error) => {
                let index = serde_json::from_str::<IndexMessage>(body);
                match serde_json::from_str::<GitMessage>(body) {
                    Ok(GitMessage { lookup }) => self.answer_git(&lookup).await,
                    Err(_) if index.is_ok() => {
                        let IndexMessage { index } = index.expect("checked");
                        self.make_index(&index, &message.receipt, hidden_for).await
                    }
                    Err(_) => {
                        // A message (and serde's error, which quotes it)
                        // may hold a source's URL, with its token.
                        let body = crate::source::redact_urls(body);
                        let error = crate::source::redact_urls(&build_error.to_string());
                        tracing::error!(
                            error,
                            body,
                            "dropping a message that is not a build request"
                        )
                    }
                }
                self.delete(&message.receipt).await;
                return;
            }
        };
        let span = build_span(&build.request);
        self.run_build(build, &message.receipt, hidden_for)
            .instrument(span)
            .await;
    }

    /// One build message: build, record the outcome, delete the message.
    async fn run_build(&self, message: QueueMessage, receipt: &str, hidden_for: i32) {
        let QueueMessage {
            mut request,
            attempt,
        } = message;
        // A time to come from the queue is this worker's clock at most.
        request.not_before = request.not_before.min(now());
        let storage = self.builder.storage();
        let key = request.image_key();
        // A message of an attempt that was taken over (its worker went
        // silent, and a waiting pull claimed the next one) is done with.
        let mut running = BuildStatus::queued(&request, attempt);
        if let Ok(Some(current)) = status::read(storage, &key).await {
            if current.attempt > attempt {
                tracing::info!(
                    image = %key,
                    attempt,
                    current = current.attempt,
                    "dropping the message of a superseded attempt"
                );
                self.delete(receipt).await;
                return;
            }
            // When it was asked for is the registry's to say.
            running.info.queued_at = current.info.queued_at.or(running.info.queued_at);
        }
        let ended = report::build_reported(
            &self.builder,
            storage,
            &self.metrics,
            self.heartbeat,
            &request,
            running,
            self.keep_hidden(receipt, hidden_for),
        )
        .await;
        self.metrics.flush();
        if let Ended::Retry { retry, status, .. } = ended {
            // The builder's fault: the message comes back, for this worker
            // or another, once its visibility runs out.
            let retrying = BuildStatus {
                state: State::Queued,
                step: Some(Step::Retrying),
                heartbeat: now(),
                info: status::BuildInfo {
                    progress: Some(StepProgress {
                        step: Some(Step::Retrying),
                        detail: Some(retry.to_string()),
                        ..StepProgress::default()
                    }),
                    ..status.info.clone()
                },
                ..*status
            };
            if let Err(error) = status::write_own(storage, &key, &retrying).await {
                tracing::warn!(%error, "recording the retry failed");
            }
            return;
        }
        self.delete(receipt).await;
    }

    /// An index job: the attribute index of a revision, made with Nix
    /// while the message stays hidden (it is long for nixpkgs).
    async fn make_index(&self, request: &IndexRequest, receipt: &str, hidden_for: i32) {
        let Some((nix, catalog)) = &self.indexer else {
            tracing::warn!("dropping an index job: this worker makes no indexes");
            return;
        };
        let made = tokio::select! {
            made = make_index(nix, catalog, request) => made,
            never = self.keep_hidden(receipt, hidden_for) => match never {},
        };
        if let Err(error) = made {
            tracing::warn!(%error, system = %request.system, "making an attribute index failed");
        }
    }

    /// A git lookup for a registry that has no git: answered here, and
    /// the answer stored where the registry looks for it.
    async fn answer_git(&self, lookup: &GitLookup) {
        let result = self.git.resolve(lookup).await;
        tracing::info!(url = %lookup.url, tag = %lookup.tag, ok = result.is_ok(), "git lookup answered");
        let answer = GitAnswer { at: now(), result };
        let key = git_answer_key(lookup);
        if let Err(error) = records::write(self.builder.storage(), &key, &answer).await {
            tracing::warn!(%error, "storing a git lookup's answer failed; the registry will ask again");
        }
    }

    /// While a build runs, the message stays invisible to other workers,
    /// renewed on this loop's own clock (a slow status write never delays
    /// it). Never returns.
    async fn keep_hidden(&self, receipt: &str, hidden_for: i32) -> Infallible {
        // Often enough for a queue whose timeout is shorter than a heartbeat.
        let renew_every = self
            .heartbeat
            .min(Duration::from_secs((hidden_for / 2).max(1) as u64));
        loop {
            if let Err(error) = self.inbox.keep_hidden(receipt, hidden_for).await {
                tracing::warn!(%error, "heartbeat: visibility not extended");
            }
            tokio::time::sleep(renew_every).await;
        }
    }
}

#[cfg(test)]
mod tests;
