//! The worker side of builds through a queue: [`Worker`] long-polls the
//! queue, runs one build at a time with [`Builder`], keeps the status's
//! heartbeat fresh and the message invisible to other workers while it
//! builds, and deletes the message when the outcome is recorded. A worker
//! that dies leaves the message to reappear for another worker (after the
//! visibility timeout), and no image record: the image record is written
//! last.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::Client;
use tokio::sync::watch;
use tracing::Instrument;

use super::sqs::{git_answer_key, GitAnswer, GitMessage, QueueMessage, LONG_POLL_SECS};
use super::status::{self, BuildStatus, State};
use crate::builder::{build_span, Builder, StepProgress};
use crate::metrics::Metrics;
use crate::source::{GitLookup, GitResolver, LocalGit};
use crate::storage::records::{self, unix_now as now};
use crate::storage::Storage;

/// Takes builds off the queue and runs them.
pub struct Worker {
    builder: Arc<Builder>,
    storage: Arc<dyn Storage>,
    sqs: Client,
    queue_url: String,
    heartbeat: Duration,
    /// Answers git lookups for registries without git.
    git: LocalGit,
    /// Builds, written to the log in embedded metric format.
    metrics: Metrics,
}

impl Worker {
    pub fn new(
        builder: Builder,
        storage: Arc<dyn Storage>,
        sqs: Client,
        queue_url: impl Into<String>,
        heartbeat: Duration,
    ) -> Worker {
        Worker {
            builder: Arc::new(builder),
            storage,
            sqs,
            queue_url: queue_url.into(),
            heartbeat,
            git: LocalGit::default(),
            metrics: Metrics::new(Some(crate::metrics::SERVICE_WORKER)),
        }
    }

    /// Serves the queue until `shutdown` resolves (a build under way is
    /// abandoned then; its message comes back for another worker).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let hidden_for = self.visibility_timeout().await;
        tracing::info!(queue = %self.queue_url, visibility_seconds = hidden_for, "worker started");
        tokio::pin!(shutdown);
        loop {
            let received = tokio::select! {
                _ = &mut shutdown => break,
                received = self.sqs
                    .receive_message()
                    .queue_url(&self.queue_url)
                    .max_number_of_messages(1)
                    .wait_time_seconds(LONG_POLL_SECS)
                    .send() => received,
            };
            let messages = match received {
                Ok(output) => output.messages.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %DisplayErrorContext(&e), "receiving from the queue failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            for message in messages {
                let Some(receipt) = message.receipt_handle else {
                    continue;
                };
                let body = message.body.unwrap_or_default();
                tokio::select! {
                    _ = &mut shutdown => {
                        tracing::info!("worker stopping mid-build; the message will come back");
                        return;
                    }
                    () = self.handle(&body, &receipt, hidden_for) => {}
                }
            }
        }
        tracing::info!("worker stopped");
    }

    async fn delete(&self, receipt: &str) {
        if let Err(e) = self
            .sqs
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            tracing::warn!(error = %DisplayErrorContext(&e), "deleting a message failed; it will come back");
        }
    }

    /// The queue's own visibility timeout, which each heartbeat renews: the
    /// time the template gives a build, so that a slow status write never
    /// lets the message reappear for a second worker. (A dead worker's
    /// build is taken over sooner: waiting pulls claim the next attempt
    /// after six silent heartbeats and send a message of their own.)
    async fn visibility_timeout(&self) -> i32 {
        const FALLBACK: i32 = 900;
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout)
            .send()
            .await;
        let found = attributes.as_ref().ok().and_then(|a| {
            a.attributes()?
                .get(&aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout)?
                .parse::<i32>()
                .ok()
        });
        match (found, attributes) {
            (Some(seconds), _) if seconds > 0 => seconds,
            (_, Err(e)) => {
                tracing::warn!(error = %DisplayErrorContext(&e), fallback = FALLBACK, "reading the queue's visibility timeout failed");
                FALLBACK
            }
            _ => FALLBACK,
        }
    }

    /// One message: build, record the outcome, delete the message.
    async fn handle(&self, body: &str, receipt: &str, hidden_for: i32) {
        let message: QueueMessage = match serde_json::from_str(body) {
            Ok(message) => message,
            Err(build_error) => match serde_json::from_str::<GitMessage>(body) {
                Ok(GitMessage { lookup }) => {
                    self.answer_git(&lookup).await;
                    self.delete(receipt).await;
                    return;
                }
                Err(_) => {
                    // A message (and serde's error, which quotes it) may
                    // hold a source's URL, with its token.
                    let body = crate::source::redact_urls(body);
                    let error = crate::source::redact_urls(&build_error.to_string());
                    tracing::error!(
                        error,
                        body,
                        "dropping a message that is not a build request"
                    );
                    self.delete(receipt).await;
                    return;
                }
            },
        };
        let span = build_span(&message.request);
        self.run_build(message, receipt, hidden_for)
            .instrument(span)
            .await;
    }

    /// One build message: build, record the outcome, delete the message.
    async fn run_build(&self, message: QueueMessage, receipt: &str, hidden_for: i32) {
        let request = &message.request;
        let key = request.image_key.as_str();
        let attempt = message.attempt;
        // A message of an attempt that was taken over (its worker went
        // silent, and a waiting pull claimed the next one) is done with.
        let mut running = BuildStatus::queued(request, attempt);
        if let Ok(Some(current)) = status::read(&*self.storage, key).await {
            if current.attempt > attempt {
                tracing::info!(
                    image = key,
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

        let (progress_tx, progress_rx) = watch::channel(StepProgress::default());
        let heartbeat = self.heartbeat_task(
            key,
            &mut running,
            progress_rx,
            receipt.to_string(),
            hidden_for,
        );
        let outcome = tokio::select! {
            outcome = self.builder.build(request, Some(&progress_tx)) => outcome,
            never = heartbeat => match never {},
        };
        // Where it got to, kept with a failure.
        running.last_progress(&progress_tx.borrow());
        self.metrics.build_outcome(&outcome);

        let outcome = match outcome {
            Ok(built) => Ok(built.stats),
            Err(error) => match error.failure() {
                Some(failure) => {
                    if error.is_internal() {
                        tracing::error!(image = key, %error, "build failed");
                    }
                    Err(failure)
                }
                None => {
                    // Transient: let the message come back and try again.
                    if error.is_disk_full() {
                        tracing::error!(image = key, %error, "this worker's disk is full; the message will be retried");
                    } else {
                        tracing::warn!(image = key, %error, "build interrupted; the message will be retried");
                    }
                    let retry = BuildStatus {
                        state: State::Queued,
                        step: Some(if error.is_disk_full() {
                            "retrying: the worker's disk was full".to_string()
                        } else {
                            "retrying after a storage error".to_string()
                        }),
                        heartbeat: now(),
                        ..running
                    };
                    let _ = status::write_own(&*self.storage, key, &retry).await;
                    return;
                }
            },
        };
        self.metrics.flush();
        let done = running.ended(outcome);
        match status::write_own(&*self.storage, key, &done).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    image = key,
                    attempt,
                    "a later attempt owns this build; its outcome stands"
                )
            }
            Err(error) => {
                tracing::warn!(image = key, %error, "recording the build outcome failed")
            }
        }
        self.delete(receipt).await;
    }

    /// A git lookup for a registry that has no git: answered here, and
    /// the answer stored where the registry looks for it.
    async fn answer_git(&self, lookup: &GitLookup) {
        let result = self.git.resolve(lookup).await;
        tracing::info!(url = %lookup.url, tag = %lookup.tag, ok = result.is_ok(), "git lookup answered");
        let answer = GitAnswer { at: now(), result };
        if let Err(error) = records::write(&*self.storage, &git_answer_key(lookup), &answer).await {
            tracing::warn!(%error, "storing a git lookup's answer failed; the registry will ask again");
        }
    }

    /// While a build runs: the status says how far it is, and is fresh
    /// every interval; the message stays invisible to other workers. Never
    /// returns.
    async fn heartbeat_task(
        &self,
        key: &str,
        running: &mut BuildStatus,
        progress: watch::Receiver<StepProgress>,
        receipt: String,
        hidden_for: i32,
    ) -> Infallible {
        // Two loops on their own clocks: a slow status write never delays
        // keeping the message hidden.
        let status = status::keep_fresh(&*self.storage, key, running, progress, self.heartbeat);
        // Often enough for a queue whose timeout is shorter than a heartbeat.
        let renew_every = self
            .heartbeat
            .min(Duration::from_secs((hidden_for / 2).max(1) as u64));
        let hidden = async {
            loop {
                if let Err(e) = self
                    .sqs
                    .change_message_visibility()
                    .queue_url(&self.queue_url)
                    .receipt_handle(&receipt)
                    .visibility_timeout(hidden_for)
                    .send()
                    .await
                {
                    tracing::warn!(image = key, error = %DisplayErrorContext(&e), "heartbeat: visibility not extended");
                }
                tokio::time::sleep(renew_every).await;
            }
        };
        tokio::join!(status, hidden).0
    }
}
