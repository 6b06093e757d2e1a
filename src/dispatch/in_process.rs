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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::builder::fake::FakeStore;
    use crate::builder::popularity::Popularity;
    use crate::builder::tests::request;
    use crate::builder::BuildLimits;
    use crate::storage::keys::RECENT_PREFIX;
    use crate::storage::{MemoryStorage, Storage};

    /// The local mode's dispatch over a fake store, as `App` wires it,
    /// with at most eight builds waiting.
    fn local(
        store: Arc<FakeStore>,
        storage: Arc<MemoryStorage>,
        max_builds: usize,
    ) -> Arc<dyn Dispatch> {
        let limits = BuildLimits {
            max_builds,
            ..crate::config::default_limits()
        };
        let builder = Builder::new(store, storage, Arc::new(Popularity::none()), limits);
        crate::app::local_dispatch(builder, Arc::new(Metrics::new(None)), 8)
    }

    #[tokio::test]
    async fn a_flood_of_abandoned_pulls_neither_queues_builds_nor_fills_the_build_list() {
        let flood: Vec<String> = (0..40).map(|i| format!("flood{i}")).collect();
        let mut store = FakeStore::default().with_package("busybox", &[]);
        for name in flood.iter().map(String::as_str).chain(["legit"]) {
            store = store.with_package(name, &["busybox"]);
        }
        let store = Arc::new(store);
        let storage = Arc::new(MemoryStorage::new());
        let dispatch = local(store.clone(), storage.clone(), 1);

        // Builds take as long as the test holds the gate. 40 pulls of
        // new images, each given up by its client after 0.2 s.
        let gate = store.gate.write().await;
        let pulls = flood.iter().map(|name| {
            tokio::time::timeout(Duration::from_millis(200), dispatch.build(request(&[name])))
        });
        let flooded = futures_util::future::join_all(pulls).await;
        // One build starts, eight wait for its slot (the queue's bound in
        // this test), and the rest are refused at once.
        let refused = flooded
            .iter()
            .filter(|o| matches!(o, Ok(Err(DispatchError::Busy { .. }))))
            .count();
        let given_up = flooded.iter().filter(|o| o.is_err()).count();
        assert_eq!((given_up, refused), (9, 31), "{flooded:?}");

        // A legitimate pull of a new image, once the one build that
        // started is done, is the next to build.
        let legit = tokio::spawn({
            let dispatch = dispatch.clone();
            async move { dispatch.build(request(&["legit"])).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(gate);
        tokio::time::timeout(Duration::from_secs(10), legit)
            .await
            .expect("the legitimate build waited behind abandoned ones")
            .unwrap()
            .expect("the legitimate build");
        assert_eq!(
            store.realised.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "builds started: the first of the flood (it had started when its client left) and the legitimate one"
        );
        let noted = storage.list(RECENT_PREFIX).await.unwrap();
        assert_eq!(noted.len(), 2, "the build list: {noted:?}");
        for name in &flood[1..] {
            let key = request(&[name]).image_key();
            assert_eq!(status::read(&*storage, &key).await.unwrap(), None, "{name}");
        }
    }
}
