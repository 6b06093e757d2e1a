//! The local mode's dispatch: the [`Builder`] right here, in this process.
//! Wrap it in [`super::single_flight::SingleFlight`] so that concurrent
//! pulls of one image share one build.
//!
//! The build runs and reports as a worker's does
//! ([`report::build_reported`]), so that every instance on the same
//! storage shows it; no decision here reads the status.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;

use super::report::{self, Ended};
use super::status::{self, BuildStatus};
use super::{Dispatch, DispatchError};
use crate::builder::{build_span, BuildRequest, Builder, Failure};
use crate::metrics::Metrics;
use crate::storage::records::ImageRecord;

pub struct InProcess {
    builder: Builder,
    metrics: Arc<Metrics>,
    heartbeat: Duration,
}

impl InProcess {
    pub fn new(builder: Builder, metrics: Arc<Metrics>) -> InProcess {
        InProcess {
            builder,
            metrics,
            heartbeat: Duration::from_secs(status::DEFAULT_HEARTBEAT_SECS),
        }
    }

    async fn build_reported(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let storage = self.builder.storage();
        let key = request.image_key();
        // Attempts count up, so this status is never hidden by an older one.
        let attempt = match status::read(storage, &key).await {
            Ok(Some(previous)) => previous.attempt + 1,
            _ => 1,
        };
        status::note_queued(storage, &key).await;
        let running = BuildStatus::queued(&request, attempt);
        let ended = report::build_reported(
            &self.builder,
            storage,
            &self.metrics,
            self.heartbeat,
            &request,
            running,
            std::future::pending(),
        )
        .await;
        if let Ended::Retry { retry, status, .. } = &ended {
            // Shown as failed on the build pages; nothing else reads it
            // here, and the next pull builds again.
            let failure = Failure::Build {
                message: format!("{retry}; pulling again tries again"),
            };
            if let Err(error) =
                status::write_own(storage, &key, &status.clone().ended(Err(failure))).await
            {
                tracing::warn!(%error, "recording the build's outcome failed");
            }
        }
        ended.into_result()
    }
}

#[async_trait]
impl Dispatch for InProcess {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let span = build_span(&request);
        self.build_reported(request).instrument(span).await
    }
}
