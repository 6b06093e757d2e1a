//! The local mode's dispatch: the [`Builder`] right here, in this process.
//! Wrap it in [`super::single_flight::SingleFlight`] so that concurrent
//! pulls of one image share one build.
//!
//! The build's status is kept in storage as a worker keeps it
//! ([`status::keep_fresh`]), so that every instance on the same storage
//! shows it; no decision here reads it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::Instrument;

use super::status::{self, BuildStatus};
use super::{Dispatch, DispatchError};
use crate::builder::{build_span, BuildRequest, Builder, StepProgress};
use crate::metrics::Metrics;
use crate::storage::records::ImageRecord;
use crate::storage::Storage;

pub struct InProcess {
    builder: Builder,
    storage: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
    heartbeat: Duration,
}

impl InProcess {
    pub fn new(builder: Builder, storage: Arc<dyn Storage>, metrics: Arc<Metrics>) -> InProcess {
        InProcess {
            builder,
            storage,
            metrics,
            heartbeat: Duration::from_secs(status::DEFAULT_HEARTBEAT_SECS),
        }
    }

    async fn build_reported(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let key = request.image_key.as_str();
        // Attempts count up, so this status is never hidden by an older one.
        let attempt = match status::read(&*self.storage, key).await {
            Ok(Some(previous)) => previous.attempt + 1,
            _ => 1,
        };
        let mut running = BuildStatus::queued(&request, attempt);
        status::note_queued(&*self.storage, key).await;
        let (progress_tx, progress_rx) = watch::channel(StepProgress::default());
        let reporting = status::keep_fresh(
            &*self.storage,
            key,
            &mut running,
            progress_rx,
            self.heartbeat,
        );
        let outcome = tokio::select! {
            outcome = self.builder.build(&request, Some(&progress_tx)) => outcome,
            never = reporting => match never {},
        };
        running.last_progress(&progress_tx.borrow());
        self.metrics.build_outcome(&outcome);
        let (ended, result) = match outcome {
            Ok(built) => (Ok(built.stats), Ok(built.record)),
            Err(error) => match error.failure() {
                Some(failure) => (Err(failure), Err(DispatchError::from(error))),
                // Nothing to remember: the next pull builds it again.
                None => {
                    let error = DispatchError::from(error);
                    let failure = crate::builder::Failure::Build {
                        message: error.to_string(),
                    };
                    (Err(failure), Err(error))
                }
            },
        };
        if let Err(error) = status::write_own(&*self.storage, key, &running.ended(ended)).await {
            tracing::warn!(%error, "recording the build's outcome failed");
        }
        result
    }
}

#[async_trait]
impl Dispatch for InProcess {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let span = build_span(&request);
        self.build_reported(request).instrument(span).await
    }
}
