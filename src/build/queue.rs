//! Builds on Nix workers through an SQS queue.
//!
//! The function side ([`SqsDispatch`]) never builds: on a miss it claims the
//! build (see [`super::status`]), sends a [`QueueMessage`], and waits for
//! the image record or a failure in the status record, polling storage with
//! backoff until the build timeout. Pulls that time out get an error saying
//! the build goes on; the next pull finds the image.
//!
//! The worker side ([`Worker`]) long-polls the queue, runs one build at a
//! time with [`Builder`], keeps the status's heartbeat fresh and the
//! message invisible to other workers while it builds, and deletes the
//! message when the outcome is recorded. A worker that dies leaves the
//! message to reappear for another worker (after the visibility timeout),
//! and no image record: the image record is written last.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::Client;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::status::{self, decide, Action, BuildStatus, Failure, State};
use super::{
    read_record, unix_now as now, BuildError, BuildRequest, Builder, Dispatch, ImageRecord,
};
use crate::nix::NixError;
use crate::storage::{self, Storage};

/// How long one receive waits for a message (SQS's maximum long poll).
const LONG_POLL_SECS: i32 = 20;
/// The longest pause between two looks at storage while waiting.
const MAX_POLL: Duration = Duration::from_secs(2);
/// Failed reads in a row that end a wait (each is already retried by the SDK).
const MAX_READ_ERRORS: u32 = 5;

/// The body of a queue message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMessage {
    pub request: BuildRequest,
    pub attempt: u32,
}

/// An SQS client for AWS or for any SQS-compatible endpoint.
pub async fn sqs_client(endpoint: Option<&str>) -> Client {
    // Each try lasts longer than the long poll, so a receive is not cut short.
    Client::new(
        &crate::aws::sdk_config(endpoint, Duration::from_secs(LONG_POLL_SECS as u64 + 10), 3).await,
    )
}

fn queue_error<
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
>(
    operation: &'static str,
    error: aws_sdk_sqs::error::SdkError<E, R>,
) -> BuildError {
    BuildError::Queue {
        operation,
        message: DisplayErrorContext(&error).to_string(),
    }
}

async fn write_status(
    storage: &dyn Storage,
    image_key: &str,
    status: &BuildStatus,
) -> Result<(), BuildError> {
    let bytes = Bytes::from(serde_json::to_vec(status).expect("a status always serialises"));
    storage
        .put(&status::status_key(image_key), bytes)
        .await
        .map_err(BuildError::from)
}

/// Timings of the hand-off between function and workers.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How long a pull waits for a build.
    pub build_timeout: Duration,
    /// How often a worker shows it is alive; silence for
    /// [`status::STALE_HEARTBEATS`] intervals means it died.
    pub heartbeat: Duration,
    /// How long a failed build is remembered.
    pub failure_ttl: Duration,
}

/// Dispatches builds to workers through the queue.
pub struct SqsDispatch {
    storage: Arc<dyn Storage>,
    sqs: Client,
    queue_url: String,
    timings: Timings,
}

impl SqsDispatch {
    pub fn new(
        storage: Arc<dyn Storage>,
        sqs: Client,
        queue_url: impl Into<String>,
        timings: Timings,
    ) -> SqsDispatch {
        SqsDispatch {
            storage,
            sqs,
            queue_url: queue_url.into(),
            timings,
        }
    }

    /// Claims an attempt; `true` if this caller got it and sent the build.
    async fn claim(&self, request: &BuildRequest, attempt: u32) -> Result<bool, BuildError> {
        let key = &request.image_key;
        let claim = Bytes::from(format!("{{\"claimed_at\":{}}}", now()));
        if !self
            .storage
            .put_if_absent(&status::claim_key(key, attempt), claim)
            .await?
        {
            return Ok(false);
        }
        let queued = BuildStatus {
            state: State::Queued,
            attempt,
            step: None,
            failure: None,
            heartbeat: now(),
        };
        write_status(&*self.storage, key, &queued).await?;
        let body = serde_json::to_string(&QueueMessage {
            request: request.clone(),
            attempt,
        })
        .expect("a message always serialises");
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| queue_error("SendMessage", e))?;
        tracing::info!(image = %key, attempt, packages = ?request.packages, "build dispatched");
        Ok(true)
    }
}

#[async_trait]
impl Dispatch for SqsDispatch {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, Arc<BuildError>> {
        let key = request.image_key.clone();
        let deadline = Instant::now() + self.timings.build_timeout;
        let mut pause = Duration::from_millis(100);
        let mut step = None;
        let mut errors = 0;
        loop {
            // A failed read while waiting (a record caught mid-write, a
            // storage hiccup) is retried; only a run of them ends the wait.
            let looked = async {
                let record: Option<ImageRecord> =
                    read_record(&*self.storage, &storage::image_key(&key)).await?;
                let status: Option<BuildStatus> =
                    read_record(&*self.storage, &status::status_key(&key)).await?;
                Ok::<_, BuildError>((record, status))
            }
            .await;
            let (record, status) = match looked {
                Ok(found) => {
                    errors = 0;
                    found
                }
                Err(error) if errors < MAX_READ_ERRORS => {
                    errors += 1;
                    tracing::warn!(image = %key, %error, "reading the build's progress failed; trying again");
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(error) => return Err(Arc::new(error)),
            };
            if let Some(record) = record.filter(|r| r.built_at >= request.not_before) {
                return Ok(record);
            }
            step = status.as_ref().and_then(|s| s.step.clone()).or(step);
            let action = decide(
                status.as_ref(),
                now(),
                request.not_before,
                self.timings.heartbeat.as_secs(),
                self.timings.failure_ttl.as_secs(),
            );
            match action {
                Action::Claim(attempt) => {
                    self.claim(&request, attempt).await.map_err(Arc::new)?;
                }
                Action::Wait => {}
                Action::Fail(failure) => {
                    if let Some(abandoned) = status.filter(|s| s.state != State::Failed) {
                        // Given up on here: say so where every puller looks.
                        tracing::warn!(image = %key, attempt = abandoned.attempt, "build abandoned by its workers; marking it failed");
                        let failed = BuildStatus {
                            state: State::Failed,
                            failure: Some(failure.clone()),
                            heartbeat: now(),
                            ..abandoned
                        };
                        if let Err(error) = write_status(&*self.storage, &key, &failed).await {
                            tracing::warn!(image = %key, %error, "recording the abandoned build failed");
                        }
                    }
                    return Err(Arc::new(match failure {
                        Failure::UnknownPackages { names } => BuildError::UnknownPackages(names),
                        Failure::Build { message } => BuildError::Failed(message),
                    }));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Arc::new(BuildError::StillBuilding { step }));
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}

/// Takes builds off the queue and runs them.
pub struct Worker {
    builder: Arc<Builder>,
    storage: Arc<dyn Storage>,
    sqs: Client,
    queue_url: String,
    heartbeat: Duration,
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
        }
    }

    /// Serves the queue until `shutdown` resolves (a build under way is
    /// abandoned then; its message comes back for another worker).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), BuildError> {
        tracing::info!(queue = %self.queue_url, "worker started");
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
                        return Ok(());
                    }
                    () = self.handle(&body, &receipt) => {}
                }
            }
        }
        tracing::info!("worker stopped");
        Ok(())
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

    /// One message: build, record the outcome, delete the message.
    async fn handle(&self, body: &str, receipt: &str) {
        let message: QueueMessage = match serde_json::from_str(body) {
            Ok(message) => message,
            Err(error) => {
                tracing::error!(%error, body, "dropping a message that is not a build request");
                self.delete(receipt).await;
                return;
            }
        };
        let request = &message.request;
        let key = request.image_key.as_str();
        let attempt = message.attempt;

        let (step_tx, step_rx) = watch::channel(String::from("starting"));
        let heartbeat = self.heartbeat_task(key.to_string(), attempt, step_rx, receipt.to_string());
        let outcome = tokio::select! {
            outcome = self.builder.build_reporting(request, Some(&step_tx)) => outcome,
            never = heartbeat => match never {},
        };

        let failure = match outcome {
            Ok(_) => None,
            Err(BuildError::UnknownPackages(names)) => Some(Failure::UnknownPackages { names }),
            Err(BuildError::Nix(NixError::Failed { command, message })) => Some(Failure::Build {
                message: format!("{command}: {message}"),
            }),
            Err(BuildError::Nix(NixError::Timeout { command, seconds })) => Some(Failure::Build {
                message: format!("{command} was stopped after {seconds} s"),
            }),
            Err(error @ (BuildError::Storage(_) | BuildError::Queue { .. })) => {
                // Transient: let the message come back and try again.
                tracing::warn!(image = key, %error, "build interrupted; the message will be retried");
                let retry = BuildStatus {
                    state: State::Queued,
                    attempt,
                    step: Some(format!("retrying: {error}")),
                    failure: None,
                    heartbeat: now(),
                };
                let _ = write_status(&*self.storage, key, &retry).await;
                return;
            }
            Err(error) => {
                tracing::error!(image = key, %error, "build failed");
                Some(Failure::Build {
                    message: "the build failed on the worker; its log has the details".into(),
                })
            }
        };
        let state = if failure.is_some() {
            State::Failed
        } else {
            State::Done
        };
        let done = BuildStatus {
            state,
            attempt,
            step: None,
            failure,
            heartbeat: now(),
        };
        if let Err(error) = write_status(&*self.storage, key, &done).await {
            tracing::warn!(image = key, %error, "recording the build outcome failed");
        }
        self.delete(receipt).await;
    }

    /// Every interval: the status says "running, at step X, now", and the
    /// message stays invisible to other workers. Never returns.
    async fn heartbeat_task(
        &self,
        key: String,
        attempt: u32,
        step: watch::Receiver<String>,
        receipt: String,
    ) -> Infallible {
        let hidden_for = (self.heartbeat.as_secs() * status::STALE_HEARTBEATS) as i32;
        loop {
            let current = step.borrow().clone();
            let running = BuildStatus {
                state: State::Running,
                attempt,
                step: Some(current),
                failure: None,
                heartbeat: now(),
            };
            if let Err(error) = write_status(&*self.storage, &key, &running).await {
                tracing::warn!(image = %key, %error, "heartbeat: status not written");
            }
            if let Err(e) = self
                .sqs
                .change_message_visibility()
                .queue_url(&self.queue_url)
                .receipt_handle(&receipt)
                .visibility_timeout(hidden_for)
                .send()
                .await
            {
                tracing::warn!(image = %key, error = %DisplayErrorContext(&e), "heartbeat: visibility not extended");
            }
            tokio::time::sleep(self.heartbeat).await;
        }
    }
}
