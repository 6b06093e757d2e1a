//! Getting a build done: the [`Dispatch`] trait and its implementations.
//!
//! | implementation | where the build runs | used by |
//! |---|---|---|
//! | [`in_process::InProcess`] | this process, with the local Nix | local mode |
//! | [`sqs::SqsDispatch`] | a worker, through an SQS queue | the Lambda function |
//! | [`single_flight::SingleFlight`] | wraps either: one call per image per process (in local mode also a bounded queue, whose builds are dropped if their clients leave before they start) | both |
//!
//! [`worker::Worker`] is the other end of the queue, and [`status`] the
//! shared build status with the claim policy that makes one build per image
//! across processes.
//!
//! Whatever runs the build, it runs through [`report::build_reported`],
//! and a failure reaches the puller as a [`DispatchError`], decided by the
//! one verdict on a [`BuildError`] ([`BuildError::verdict`]).
//!
//! | file | holds |
//! |---|---|
//! | `queue.rs` | the queue's messages, its two ends ([`queue::Queue`], [`queue::Inbox`]) and SQS's |
//! | `git.rs` | git lookups answered by workers, for a registry without git |
//! | `report.rs` | the one build-and-report flow |
//! | `status.rs` | build status, claims and the takeover policy |

pub(crate) mod git;
pub(crate) mod in_process;
pub(crate) mod queue;
pub(crate) mod report;
pub mod single_flight;
pub mod sqs;
pub mod status;
pub mod worker;

use std::fmt;

use async_trait::async_trait;

use crate::builder::{BuildError, BuildRequest, Failure, Retry, Step, Verdict};
use crate::storage::records::ImageRecord;

/// How the image service gets an image built.
#[async_trait]
pub trait Dispatch: Send + Sync + 'static {
    /// Builds the image (or waits for the build already under way) and
    /// returns its record.
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError>;
}

/// A service a build depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Storage,
    Queue,
    /// The machine that builds (its disk is full).
    Builder,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Storage => "storage",
            Service::Queue => "build queue",
            Service::Builder => "builder",
        })
    }
}

/// Why no image came back. Cloned to every puller waiting on one build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// The build failed; its pullers are told why.
    #[error(transparent)]
    Failed(Failure),
    /// The wait ran out; the build goes on.
    #[error("the image is still being built{}", .step.as_ref().map(|s| format!(" (at step {s})")).unwrap_or_default())]
    StillBuilding { step: Option<Step> },
    /// A service the build needs failed; trying again may work. `message`
    /// is for the log only: it is not part of the displayed error.
    #[error("the {service} is unavailable")]
    Unavailable { service: Service, message: String },
    /// As many builds as this process lets wait for their turn are
    /// waiting already (`NIXERY_MAX_QUEUED_BUILDS`): nothing was started,
    /// nothing was queued; trying again later may work.
    #[error("{waiting} builds are waiting to start already; try again later")]
    Busy { waiting: usize },
}

impl From<BuildError> for DispatchError {
    fn from(error: BuildError) -> DispatchError {
        match error.verdict() {
            Verdict::Failed { failure, internal } => {
                if internal {
                    tracing::error!(%error, "build failed");
                }
                DispatchError::Failed(failure)
            }
            Verdict::Retry(retry @ (Retry::DiskFull | Retry::Cancelled | Retry::Elsewhere)) => {
                tracing::error!(%error, %retry, "the build can be tried again");
                DispatchError::Unavailable {
                    service: Service::Builder,
                    message: error.to_string(),
                }
            }
            Verdict::Retry(Retry::Storage) => {
                tracing::warn!(%error, "build interrupted by storage");
                DispatchError::Unavailable {
                    service: Service::Storage,
                    message: error.to_string(),
                }
            }
        }
    }
}
