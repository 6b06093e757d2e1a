//! The build queue: its messages, and its two ends as traits, so that
//! what the function sends and what a worker receives can be tested
//! without a queue server.
//!
//! | end | trait | SQS | used by |
//! |---|---|---|---|
//! | sending | [`Queue`] | [`SqsQueue`] ([`BySystem`] routes by system) | the function ([`super::sqs`], [`super::git`]) |
//! | receiving | [`Inbox`] | [`SqsInbox`] | [`super::worker`] |

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::Client;
use serde::{Deserialize, Serialize};

use super::{DispatchError, Service};
use crate::builder::BuildRequest;
use crate::source::GitLookup;

/// How long one receive waits for a message (SQS's maximum long poll).
pub const LONG_POLL_SECS: i32 = 20;

/// The body of a queue message that asks for a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMessage {
    pub request: BuildRequest,
    pub attempt: u32,
}

/// The body of a queue message that asks a worker a git question (for a
/// registry without `git`, such as the Lambda function).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitMessage {
    pub lookup: GitLookup,
}

/// An SQS client for AWS or for any SQS-compatible endpoint.
pub async fn sqs_client(endpoint: Option<&str>) -> Client {
    // Each try lasts longer than the long poll, so a receive is not cut short.
    Client::new(
        &crate::aws::sdk_config(endpoint, Duration::from_secs(LONG_POLL_SECS as u64 + 10), 3).await,
    )
}

/// An SQS call that failed, for the log; the puller hears "unavailable".
fn queue_error<E, R>(
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

/// Where build requests (and git lookups) go.
#[async_trait]
pub trait Queue: Send + Sync + std::fmt::Debug + 'static {
    /// Sends one message body.
    async fn send_body(&self, body: String) -> Result<(), DispatchError>;

    /// Sends a build request.
    async fn send(&self, message: &QueueMessage) -> Result<(), DispatchError> {
        self.send_body(serde_json::to_string(message).expect("a message always serialises"))
            .await
    }
}

/// Build requests to the queue of their system's workers (aarch64-linux
/// builds to arm64 workers), everything else to the default queue.
#[derive(Debug)]
pub struct BySystem {
    default: Arc<dyn Queue>,
    systems: Vec<(String, Arc<dyn Queue>)>,
}

impl BySystem {
    pub fn new(default: Arc<dyn Queue>) -> BySystem {
        BySystem {
            default,
            systems: Vec::new(),
        }
    }

    /// Sends builds for `system` to `queue`.
    pub fn with(mut self, system: &str, queue: Arc<dyn Queue>) -> BySystem {
        self.systems.push((system.to_string(), queue));
        self
    }
}

#[async_trait]
impl Queue for BySystem {
    async fn send_body(&self, body: String) -> Result<(), DispatchError> {
        self.default.send_body(body).await
    }

    async fn send(&self, message: &QueueMessage) -> Result<(), DispatchError> {
        let queue = self
            .systems
            .iter()
            .find(|(system, _)| *system == message.request.system)
            .map_or(&self.default, |(_, queue)| queue);
        queue.send(message).await
    }
}

/// An SQS queue, to send to.
#[derive(Debug)]
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
    async fn send_body(&self, body: String) -> Result<(), DispatchError> {
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

/// A message taken from the queue, hidden from other receivers until its
/// visibility timeout passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub body: String,
    /// What deleting it, or keeping it hidden, names it by.
    pub receipt: String,
}

/// A failed call to the queue, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InboxError(pub String);

/// Where a worker takes its messages from.
#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// What it is, for the log (the queue's URL).
    fn name(&self) -> &str;

    /// The queue's own visibility timeout in seconds, if it says.
    async fn visibility_timeout(&self) -> Result<Option<i32>, InboxError>;

    /// Waits (a long poll) for at most one message.
    async fn receive(&self) -> Result<Option<Received>, InboxError>;

    /// Done with a message: it never comes back.
    async fn delete(&self, receipt: &str) -> Result<(), InboxError>;

    /// Keeps a message hidden from other receivers for `seconds` more.
    async fn keep_hidden(&self, receipt: &str, seconds: i32) -> Result<(), InboxError>;
}

/// An SQS queue, to receive from.
#[derive(Debug, Clone)]
pub struct SqsInbox {
    client: Client,
    url: String,
}

impl SqsInbox {
    pub fn new(client: Client, url: impl Into<String>) -> SqsInbox {
        SqsInbox {
            client,
            url: url.into(),
        }
    }
}

fn inbox_error<E, R>(operation: &str, error: aws_sdk_sqs::error::SdkError<E, R>) -> InboxError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    InboxError(format!("{operation}: {}", DisplayErrorContext(&error)))
}

#[async_trait]
impl Inbox for SqsInbox {
    fn name(&self) -> &str {
        &self.url
    }

    async fn visibility_timeout(&self) -> Result<Option<i32>, InboxError> {
        use aws_sdk_sqs::types::QueueAttributeName;
        let attributes = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .send()
            .await
            .map_err(|e| inbox_error("GetQueueAttributes", e))?;
        Ok(attributes
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::VisibilityTimeout))
            .and_then(|v| v.parse::<i32>().ok()))
    }

    async fn receive(&self) -> Result<Option<Received>, InboxError> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(1)
            .wait_time_seconds(LONG_POLL_SECS)
            .send()
            .await
            .map_err(|e| inbox_error("ReceiveMessage", e))?;
        Ok(output
            .messages
            .unwrap_or_default()
            .into_iter()
            .find_map(|message| {
                Some(Received {
                    receipt: message.receipt_handle?,
                    body: message.body.unwrap_or_default(),
                })
            }))
    }

    async fn delete(&self, receipt: &str) -> Result<(), InboxError> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| inbox_error("DeleteMessage", e))?;
        Ok(())
    }

    async fn keep_hidden(&self, receipt: &str, seconds: i32) -> Result<(), InboxError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|e| inbox_error("ChangeMessageVisibility", e))?;
        Ok(())
    }
}
