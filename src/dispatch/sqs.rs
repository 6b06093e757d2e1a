//! The function side of builds on Nix workers: [`SqsDispatch`] never
//! builds. On a miss it claims the build (see [`super::status`]), sends a
//! [`QueueMessage`] through a [`Queue`], and waits for the image record or
//! a failure in the status record, polling storage with backoff until the
//! build timeout. Pulls that time out get an error saying the build goes
//! on; the next pull finds the image. [`super::worker`] is the other end.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::Client;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::status::{self, decide, Action, BuildStatus, State};
use super::{Dispatch, DispatchError, Service};
use crate::builder::{BuildError, BuildRequest};
use crate::storage::records::{self, unix_now as now, ImageRecord};
use crate::storage::{self, Storage};

/// How long one receive waits for a message (SQS's maximum long poll).
pub(super) const LONG_POLL_SECS: i32 = 20;
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

/// An SQS call that failed, for the log; the puller hears "unavailable".
pub(super) fn queue_error<E, R>(
    operation: &'static str,
    error: aws_sdk_sqs::error::SdkError<E, R>,
) -> DispatchError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    DispatchError::Unavailable {
        service: Service::Queue,
        message: format!("{operation}: {}", DisplayErrorContext(&error)),
    }
}

/// Where build requests go.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    async fn send(&self, message: &QueueMessage) -> Result<(), DispatchError>;
}

/// An SQS queue.
pub struct SqsQueue {
    client: Client,
    url: String,
}

impl SqsQueue {
    pub fn new(client: Client, url: impl Into<String>) -> SqsQueue {
        SqsQueue {
            client,
            url: url.into(),
        }
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send(&self, message: &QueueMessage) -> Result<(), DispatchError> {
        let body = serde_json::to_string(message).expect("a message always serialises");
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| queue_error("SendMessage", e))?;
        Ok(())
    }
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
    queue: Arc<dyn Queue>,
    timings: Timings,
}

impl SqsDispatch {
    pub fn new(storage: Arc<dyn Storage>, queue: Arc<dyn Queue>, timings: Timings) -> SqsDispatch {
        SqsDispatch {
            storage,
            queue,
            timings,
        }
    }

    /// Claims an attempt; `true` if this caller got it and sent the build.
    async fn claim(&self, request: &BuildRequest, attempt: u32) -> Result<bool, DispatchError> {
        let key = &request.image_key;
        let claim = Bytes::from(format!("{{\"claimed_at\":{}}}", now()));
        let storage_error = |e| DispatchError::from(BuildError::Storage(e));
        if !self
            .storage
            .put_if_absent(&status::claim_key(key, attempt), claim)
            .await
            .map_err(storage_error)?
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
        status::write(&*self.storage, key, &queued)
            .await
            .map_err(storage_error)?;
        self.queue
            .send(&QueueMessage {
                request: request.clone(),
                attempt,
            })
            .await?;
        tracing::info!(image = %key, attempt, packages = ?request.packages, "build dispatched");
        Ok(true)
    }

    /// The image record (if current) and the build status, as stored now.
    async fn look(
        &self,
        request: &BuildRequest,
    ) -> Result<(Option<ImageRecord>, Option<BuildStatus>), BuildError> {
        let key = &request.image_key;
        let record: Option<ImageRecord> =
            records::read(&*self.storage, &storage::image_key(key)).await?;
        let status = status::read(&*self.storage, key).await?;
        Ok((
            record.filter(|r| r.is_current(request.not_before)),
            status,
        ))
    }
}

#[async_trait]
impl Dispatch for SqsDispatch {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let key = request.image_key.clone();
        let deadline = Instant::now() + self.timings.build_timeout;
        let mut pause = Duration::from_millis(100);
        let mut step = None;
        let mut errors = 0;
        loop {
            // A failed read while waiting (a record caught mid-write, a
            // storage hiccup) is retried; only a run of them ends the wait.
            let (record, status) = match self.look(&request).await {
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
                Err(error) => return Err(error.into()),
            };
            if let Some(record) = record {
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
                    self.claim(&request, attempt).await?;
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
                        if let Err(error) = status::write(&*self.storage, &key, &failed).await {
                            tracing::warn!(image = %key, %error, "recording the abandoned build failed");
                        }
                    }
                    return Err(DispatchError::Failed(failure));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DispatchError::StillBuilding { step });
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}
