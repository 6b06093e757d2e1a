//! The one way a build runs and reports, wherever it runs (this process
//! in local mode, a worker behind a queue): the build status is kept
//! fresh while the builder works (and anything else the caller must keep
//! up, such as a queue message's visibility, runs beside it), the build is
//! counted, and its end is recorded by the one verdict on its error
//! ([`crate::builder::BuildError::verdict`]).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use super::status::{self, BuildStatus};
use super::{DispatchError, Service};
use crate::builder::{
    BuildError, BuildRequest, Builder, Built, Failure, Retry, StepProgress, Verdict,
};
use crate::metrics::Metrics;
use crate::storage::records::ImageRecord;
use crate::storage::Storage;

/// How a reported build ended.
#[derive(Debug)]
pub enum Ended {
    /// Built, or found stored already: the status says done.
    Built(Built),
    /// The image failed: the status says so, and why.
    Failed { failure: Failure },
    /// The builder failed, not the image: the status is the caller's to
    /// write (`status` is where the build got to).
    Retry {
        error: BuildError,
        retry: Retry,
        status: Box<BuildStatus>,
    },
}

impl Ended {
    /// What the build's pullers get.
    pub fn into_result(self) -> Result<ImageRecord, DispatchError> {
        match self {
            Ended::Built(built) => Ok(built.record),
            Ended::Failed { failure, .. } => Err(DispatchError::Failed(failure)),
            Ended::Retry { error, retry, .. } => Err(DispatchError::Unavailable {
                service: match retry {
                    Retry::Storage => Service::Storage,
                    Retry::DiskFull | Retry::Cancelled | Retry::Elsewhere => Service::Builder,
                },
                message: error.to_string(),
            }),
        }
    }
}

/// Runs `request` on `builder`, with `running` as its status so far,
/// written to `storage` as it goes (every `heartbeat` at least), while
/// `alongside` runs too.
pub async fn build_reported(
    builder: &Builder,
    storage: &dyn Storage,
    metrics: &Metrics,
    heartbeat: Duration,
    request: &BuildRequest,
    mut running: BuildStatus,
    alongside: impl Future<Output = Infallible>,
) -> Ended {
    let key = request.image_key();
    let (progress_tx, progress_rx) = watch::channel(StepProgress::default());
    let outcome = {
        let reporting = async {
            let fresh = status::keep_fresh(storage, &key, &mut running, progress_rx, heartbeat);
            tokio::join!(fresh, alongside).0
        };
        tokio::select! {
            outcome = builder.build(request, Some(&progress_tx)) => outcome,
            never = reporting => match never {},
        }
    };
    // Where it got to, kept with a failure.
    running.last_progress(&progress_tx.borrow());
    metrics.build_outcome(&outcome);
    let (ended, status) = match outcome {
        Ok(built) => {
            let status = running.ended(Ok(built.stats));
            (Ended::Built(built), status)
        }
        Err(error) => match error.verdict() {
            Verdict::Failed { failure, internal } => {
                if internal {
                    tracing::error!(image = %key, %error, "build failed");
                }
                let status = running.ended(Err(failure.clone()));
                (Ended::Failed { failure }, status)
            }
            Verdict::Retry(retry) => {
                if retry == Retry::DiskFull {
                    tracing::error!(image = %key, %error, "the builder's disk is full; the build can be tried again once it has room");
                } else {
                    tracing::warn!(image = %key, %error, %retry, "build interrupted");
                }
                return Ended::Retry {
                    error,
                    retry,
                    status: Box::new(running),
                };
            }
        },
    };
    match status::write_own(storage, &key, &status).await {
        Ok(true) => {}
        Ok(false) => tracing::info!(
            image = %key,
            attempt = status.attempt,
            "a later attempt owns this build; its outcome stands"
        ),
        Err(error) => tracing::warn!(image = %key, %error, "recording the build's outcome failed"),
    }
    ended
}
