//! The function side of builds on Nix workers: [`SqsDispatch`] never
//! builds. On a miss it claims the build (see [`super::status`]), sends a
//! [`QueueMessage`] through a [`Queue`], and waits for the image record or
//! a failure in the status record, polling storage with backoff until the
//! build timeout. Pulls that time out get an error saying the build goes
//! on; the next pull finds the image. [`super::worker`] is the other end.
//!
//! With an assembler ([`SqsDispatch::assembling_with`]: a builder whose
//! source is a binary cache), the pull that wins a claim first assembles
//! the image here, reporting in the build status as a worker would, and
//! sends the build to the queue only if the cache cannot give it.
//!
//! What one instance enqueues is bounded (`NIXERY_MAX_QUEUED_BUILDS`): a
//! build it sent holds one of a fixed number of places until this
//! instance sees a worker take it (or it ends, or the wait does); a claim
//! when every place is held is refused ([`DispatchError::Busy`]) before
//! anything is written or sent.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use tracing::Instrument;

use super::queue::{Queue, QueueMessage};
use super::report::{self, Ended};
use super::status::{self, decide, Action, BuildStatus, Claim, State};
use super::{Dispatch, DispatchError};
use crate::builder::{build_span, BuildError, BuildRequest, Builder, Failure, Step};
use crate::metrics::Metrics;
use crate::storage::keys::{ImageKey, ImageRecordKey};
use crate::storage::records::{self, unix_now as now, ImageRecord, RecordError};
use crate::storage::Storage;

/// The longest pause between two looks at storage while waiting.
const MAX_POLL: Duration = Duration::from_secs(2);

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

impl Timings {
    /// How long a build's heartbeat may stay unchanged before its worker
    /// counts as dead.
    fn stale_after(&self) -> Duration {
        self.heartbeat * status::STALE_HEARTBEATS as u32
    }
}

/// Dispatches builds to workers through the queue.
pub struct SqsDispatch {
    storage: Arc<dyn Storage>,
    queue: Arc<dyn Queue>,
    timings: Timings,
    /// Assembles images from a binary cache here, before any worker.
    assembler: Option<(Builder, Arc<Metrics>)>,
    /// One permit per build this instance may have sent and no worker
    /// has taken yet.
    queued: Arc<Semaphore>,
    max_queued: usize,
}

/// A place in the queue: held from the claim until a worker takes the
/// build.
type Place = OwnedSemaphorePermit;

/// What one pull's wait for a build has seen so far.
struct Waiting {
    deadline: Instant,
    pause: Duration,
    /// The step the build was last seen at.
    step: Option<Step>,
    last_status: Option<BuildStatus>,
    /// Since when the status could not be read.
    unreadable_since: Option<Instant>,
    /// The running build's (attempt, heartbeat) and when this waiter
    /// first saw it: a heartbeat is judged by whether it changes, on this
    /// process's clock, not by the worker's clock.
    observed: Option<(u32, u64, Instant)>,
    /// A claim without a status, and since when this waiter has seen it.
    orphan: Option<(u32, Instant)>,
}

impl Waiting {
    fn new(timeout: Duration) -> Waiting {
        Waiting {
            deadline: Instant::now() + timeout,
            pause: Duration::from_millis(100),
            step: None,
            last_status: None,
            unreadable_since: None,
            observed: None,
            orphan: None,
        }
    }

    /// A status read now, as this waiter judges it (see [`observe`]).
    fn saw(&mut self, status: Option<BuildStatus>) -> Option<BuildStatus> {
        self.unreadable_since = None;
        let status = status.map(|s| observe(s, &mut self.observed));
        if let Some(status) = &status {
            self.last_status = Some(status.clone());
            self.step = status.step.or(self.step);
        }
        status
    }

    /// The status could not be read. A status that stays unreadable for
    /// as long as a dead worker's heartbeat (its writer died mid-write, on
    /// a store without atomic writes) counts as that: the last one seen,
    /// gone silent, so that the next attempt is claimed, which rewrites it.
    fn unreadable(&mut self, stale_after: Duration) -> Option<BuildStatus> {
        let since = *self.unreadable_since.get_or_insert_with(Instant::now);
        let last = self.last_status.as_ref()?;
        (since.elapsed() >= stale_after).then(|| BuildStatus {
            heartbeat: 0,
            ..last.clone()
        })
    }

    fn out_of_time(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Sleeps before the next look, backing off; `false` if the wait is
    /// over.
    async fn pause(&mut self) -> bool {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(self.pause.min(left)).await;
        self.pause = (self.pause * 2).min(MAX_POLL);
        true
    }
}

impl SqsDispatch {
    /// With no bound on what it enqueues (see [`SqsDispatch::queueing_at_most`]).
    pub fn new(storage: Arc<dyn Storage>, queue: Arc<dyn Queue>, timings: Timings) -> SqsDispatch {
        SqsDispatch {
            storage,
            queue,
            timings,
            queued: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            max_queued: Semaphore::MAX_PERMITS,
            assembler: None,
        }
    }

    /// Assembles each claimed image with `builder` first (a builder whose
    /// source is a binary cache), and sends it to the workers only when
    /// the builder passes it on.
    pub fn assembling_with(mut self, builder: Builder, metrics: Arc<Metrics>) -> SqsDispatch {
        self.assembler = Some((builder, metrics));
        self
    }

    /// Assembles the image of a claimed attempt here: `true` if that
    /// settled it (the image, or its failure, is in storage now).
    ///
    /// An assembly has the pull's own time (`build_timeout`, within
    /// Lambda's), never more: one that cannot finish in it, or is
    /// interrupted, is handed to the workers where images may be built,
    /// and otherwise (`only`) ends the attempt with a failure that says to
    /// pull again, so the function never assembles one image over and
    /// over.
    async fn assemble(&self, request: &BuildRequest, queued: BuildStatus) -> bool {
        let Some((builder, metrics)) = &self.assembler else {
            return false;
        };
        let key = request.image_key();
        let assembly = report::build_reported(
            builder,
            &*self.storage,
            metrics,
            self.timings.heartbeat,
            request,
            queued.clone(),
            std::future::pending(),
        );
        let ended = tokio::time::timeout(self.timings.build_timeout, assembly)
            .instrument(build_span(request))
            .await;
        let reason = match ended {
            Ok(Ended::Built(_) | Ended::Failed { .. }) => return true,
            Ok(Ended::Retry { retry, .. }) => retry.to_string(),
            Err(_) => {
                tracing::warn!(image = %key, limit_s = self.timings.build_timeout.as_secs(), "assembly cut short: it outlasted the pull's wait");
                format!(
                    "it did not finish within {} s",
                    self.timings.build_timeout.as_secs()
                )
            }
        };
        if builder.passes_on() {
            tracing::info!(image = %key, reason, "not assembled here; sending the build to the workers");
            // Queued again, for the worker that takes it.
            if let Err(error) = status::write_own(&*self.storage, &key, &queued).await {
                tracing::warn!(image = %key, %error, "recording the hand-over failed");
            }
            return false;
        }
        // Nothing builds where images come from the cache only.
        let failed = queued.ended(Err(Failure::Unassembled { reason }));
        if let Err(error) = status::write_own(&*self.storage, &key, &failed).await {
            tracing::warn!(image = %key, %error, "recording the failed assembly failed");
        }
        true
    }

    /// At most `max` builds sent by this instance and not taken by a
    /// worker yet; a claim beyond them is refused.
    pub fn queueing_at_most(self, max: usize) -> SqsDispatch {
        SqsDispatch {
            queued: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max_queued: max,
            ..self
        }
    }

    /// Claims an attempt; `true` if this caller got it and sent the
    /// build, which then holds `place` (taken here) until a worker takes it.
    async fn claim(
        &self,
        request: &BuildRequest,
        attempt: u32,
        place: &mut Option<Place>,
    ) -> Result<bool, DispatchError> {
        let key = request.image_key();
        let storage_error = |e| DispatchError::from(BuildError::Storage(e));
        // A takeover keeps the place of the attempt it replaces.
        let taken = match place.take() {
            Some(held) => held,
            None => match self.queued.clone().try_acquire_owned() {
                Ok(taken) => taken,
                Err(_) => {
                    tracing::warn!(image = %key, attempt, waiting = self.max_queued, "build refused: this instance's builds fill the queue");
                    return Err(DispatchError::Busy {
                        waiting: self.max_queued,
                    });
                }
            },
        };
        if !status::claim(&*self.storage, &key, attempt)
            .await
            .map_err(storage_error)?
        {
            return Ok(false);
        }
        let queued = BuildStatus::queued(request, attempt);
        status::write(&*self.storage, &key, &queued)
            .await
            .map_err(storage_error)?;
        status::note_queued(&*self.storage, &key).await;
        if self.assemble(request, queued).await {
            return Ok(true);
        }
        self.queue
            .send(&QueueMessage {
                request: request.clone(),
                attempt,
            })
            .await?;
        tracing::info!(image = %key, attempt, packages = ?request.packages, "build dispatched");
        *place = Some(taken);
        Ok(true)
    }

    /// Claims `attempt`, or, if it is taken by an orphan (a claim whose
    /// status never came, older than a dead worker's silence), the next
    /// one, and so on; `true` if it claimed one. `status`: what the
    /// build's status says now.
    /// A claim's age is the larger of what its time says and how long
    /// this waiter has seen it without a status (`orphan`), so that clocks
    /// that disagree cannot keep an orphan alive.
    async fn claim_or_adopt(
        &self,
        request: &BuildRequest,
        attempt: u32,
        status: Option<&BuildStatus>,
        orphan: &mut Option<(u32, Instant)>,
        place: &mut Option<Place>,
    ) -> Result<bool, DispatchError> {
        let stale_after = self.timings.stale_after();
        let key = request.image_key();
        let mut attempt = attempt;
        // Each step needs an orphan at least `stale_after` old: the loop
        // ends at the first claim won or still young.
        while !self.claim(request, attempt, place).await? {
            if status.is_some_and(|s| s.attempt >= attempt) {
                return Ok(false);
            }
            let claim = match status::read_claim(&*self.storage, &key, attempt).await {
                Ok(Some(claim)) => claim,
                // Gone since (collected): claim it again next round.
                Ok(None) => return Ok(false),
                // Unreadable: as old as can be.
                Err(RecordError::Unreadable { .. }) => Claim { claimed_at: 0 },
                Err(RecordError::Storage(e)) => return Err(BuildError::Storage(e).into()),
            };
            let seen_for = match *orphan {
                Some((seen, since)) if seen == attempt => since.elapsed(),
                _ => {
                    *orphan = Some((attempt, Instant::now()));
                    Duration::ZERO
                }
            };
            let age = Duration::from_secs(now().saturating_sub(claim.claimed_at)).max(seen_for);
            if age < stale_after {
                return Ok(false);
            }
            tracing::warn!(image = %key, attempt, "claim without a status (its writer died or failed); claiming the next attempt");
            attempt += 1;
        }
        Ok(true)
    }

    /// The image record (if current) and the build status, as stored now.
    async fn look(
        &self,
        request: &BuildRequest,
        key: &ImageKey,
    ) -> Result<(Option<ImageRecord>, Option<BuildStatus>), BuildError> {
        let record: Option<ImageRecord> =
            records::read(&*self.storage, &ImageRecordKey::of(key)).await?;
        let status = status::read(&*self.storage, key).await?;
        Ok((record.filter(|r| r.is_current(request.not_before)), status))
    }

    /// A build its workers gave up on: said so where every puller looks.
    async fn abandoned(&self, key: &ImageKey, status: Option<BuildStatus>, failure: &Failure) {
        let Some(abandoned) = status.filter(|s| s.state != State::Failed) else {
            return;
        };
        tracing::warn!(image = %key, attempt = abandoned.attempt, "build abandoned by its workers; marking it failed");
        let failed = BuildStatus {
            state: State::Failed,
            failure: Some(failure.clone()),
            heartbeat: now(),
            ..abandoned
        };
        if let Err(error) = status::write(&*self.storage, key, &failed).await {
            tracing::warn!(image = %key, %error, "recording the abandoned build failed");
        }
    }
}

#[async_trait]
impl Dispatch for SqsDispatch {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let key = request.image_key();
        let stale_after = self.timings.stale_after();
        let mut wait = Waiting::new(self.timings.build_timeout);
        // The place in the queue of the build this pull sent, if it did.
        let mut place = None;
        loop {
            // A failed read while waiting (a record caught mid-write, a
            // storage hiccup) is retried until the deadline.
            let (record, status) = match self.look(&request, &key).await {
                Ok((record, status)) => (record, wait.saw(status)),
                Err(error) => {
                    tracing::warn!(image = %key, %error, "reading the build's progress failed; trying again");
                    match wait.unreadable(stale_after) {
                        Some(silent) => (None, Some(silent)),
                        None if wait.out_of_time() => return Err(error.into()),
                        None => {
                            wait.pause().await;
                            continue;
                        }
                    }
                }
            };
            if let Some(record) = record {
                return Ok(record);
            }
            if status.as_ref().is_some_and(|s| s.state != State::Queued) {
                // Taken by a worker (or ended): no longer waiting in the
                // queue.
                place = None;
            }
            let action = decide(
                status.as_ref(),
                now(),
                request.not_before,
                self.timings.heartbeat.as_secs(),
                self.timings.failure_ttl.as_secs(),
            );
            match action {
                Action::Claim(attempt) => {
                    if self
                        .claim_or_adopt(
                            &request,
                            attempt,
                            status.as_ref(),
                            &mut wait.orphan,
                            &mut place,
                        )
                        .await?
                    {
                        // Look again at once: an assembly here may have
                        // settled it, however long it took.
                        continue;
                    }
                }
                Action::Wait => {}
                Action::Fail(failure) => {
                    self.abandoned(&key, status, &failure).await;
                    return Err(DispatchError::Failed(failure));
                }
            }
            if !wait.pause().await {
                return Err(DispatchError::StillBuilding { step: wait.step });
            }
        }
    }
}

/// A queued or running status with its heartbeat restated as this process
/// sees it: as old as the time since it last changed here (a heartbeat
/// first seen now counts as fresh). Other states are kept as they are:
/// their time is when they ended, which only the TTLs read.
fn observe(status: BuildStatus, observed: &mut Option<(u32, u64, Instant)>) -> BuildStatus {
    if !matches!(status.state, State::Queued | State::Running) {
        return status;
    }
    let since = match *observed {
        Some((attempt, heartbeat, since))
            if attempt == status.attempt && heartbeat == status.heartbeat =>
        {
            since
        }
        _ => {
            let since = Instant::now();
            *observed = Some((status.attempt, status.heartbeat, since));
            since
        }
    };
    BuildStatus {
        heartbeat: now().saturating_sub(since.elapsed().as_secs()),
        ..status
    }
}

#[cfg(test)]
mod tests {
    //! The wait loop on virtual time (`start_paused`): minutes of waiting
    //! take no real time, and no SQS server is needed (a [`Queue`] that
    //! records what it is sent stands in for the queue).

    use std::sync::Mutex;

    use super::*;
    use crate::builder::nix::SourceArg;
    use crate::storage::keys::{ClaimKey, StatusKey};
    use crate::storage::{Intercepted, MemoryStorage, Op, StorageError};

    #[derive(Debug, Default)]
    struct Recorded {
        sent: Mutex<Vec<QueueMessage>>,
    }

    #[async_trait]
    impl Queue for Recorded {
        async fn send_body(&self, body: String) -> Result<(), DispatchError> {
            self.sent
                .lock()
                .unwrap()
                .push(serde_json::from_str(&body).unwrap());
            Ok(())
        }
    }

    impl Recorded {
        /// The attempts of the build messages sent, in order.
        fn attempts(&self) -> Vec<u32> {
            self.sent
                .lock()
                .unwrap()
                .iter()
                .map(|m| m.attempt)
                .collect()
        }
    }

    /// Writes the claim of `attempt`, made at `claimed_at`.
    async fn put_claim(storage: &MemoryStorage, attempt: u32, claimed_at: u64) {
        let claim = serde_json::to_vec(&Claim { claimed_at }).unwrap();
        storage
            .put_if_absent(&ClaimKey::of(&request().image_key(), attempt), claim.into())
            .await
            .unwrap();
    }

    fn request() -> BuildRequest {
        BuildRequest {
            packages: vec!["hello".into()],
            system: "x86_64-linux".into(),
            architecture: "amd64".into(),
            source: SourceArg::Path {
                path: "/pkgs".into(),
            },
            layer_budget: 94,
            implicit: vec![],
            not_before: 0,
            compression: Default::default(),
            name: "hello".into(),
            tag: "latest".into(),
            config: None,
        }
    }

    fn timings() -> Timings {
        Timings {
            build_timeout: Duration::from_secs(840),
            heartbeat: Duration::from_secs(10),
            failure_ttl: Duration::from_secs(60),
        }
    }

    fn setup() -> (Arc<MemoryStorage>, Arc<Recorded>, SqsDispatch) {
        let storage = Arc::new(MemoryStorage::new());
        let queue = Arc::new(Recorded::default());
        let dispatch = SqsDispatch::new(storage.clone(), queue.clone(), timings());
        (storage, queue, dispatch)
    }

    fn record() -> ImageRecord {
        ImageRecord {
            manifest_digest: format!("sha256:{}", "a".repeat(64)),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1,
            packages: vec!["hello".into()],
            architecture: "amd64".into(),
            built_at: now(),
            sbom: None,
        }
    }

    /// Writes attempt 1's status with a heartbeat that differs from the
    /// last one, as a worker's does every interval (paused time does not
    /// move the wall clock, so a counter stands in for its ticking). The
    /// counter only grows, even with tests beating at once: waiters judge a
    /// heartbeat by whether it changed, not by its value.
    async fn set_status(storage: &MemoryStorage, state: State, step: Step) {
        static BEATS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let beat = BEATS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        write_status(storage, state, 1, Some(step), now() + beat).await;
    }

    /// Writes the status of `attempt`: `state`, at `step`, last alive at
    /// `heartbeat` by its worker's clock.
    async fn write_status(
        storage: &dyn Storage,
        state: State,
        attempt: u32,
        step: Option<Step>,
        heartbeat: u64,
    ) {
        let written = BuildStatus {
            state,
            attempt,
            step,
            failure: None,
            heartbeat,
            info: Default::default(),
        };
        status::write(storage, &request().image_key(), &written)
            .await
            .unwrap();
    }

    /// Writes the image record, as a worker does last.
    async fn commit_image(storage: &dyn Storage) {
        let key = ImageRecordKey::of(&request().image_key());
        records::write(storage, &key, &record()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn claims_once_sends_once_and_returns_the_record_when_it_appears() {
        let (storage, queue, dispatch) = setup();
        let worker = {
            let storage = storage.clone();
            let queue = queue.clone();
            async move {
                // The worker picks the message up, reports, and commits.
                while queue.sent.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                for _ in 0..12 {
                    set_status(&storage, State::Running, Step::Realising).await;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                commit_image(&*storage).await;
                set_status(&storage, State::Done, Step::Uploading).await;
            }
        };
        let started = Instant::now();
        let (built, ()) = tokio::join!(dispatch.build(request()), worker);
        assert_eq!(built.unwrap(), record());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(120) && waited < Duration::from_secs(125),
            "{waited:?}"
        );
        let sent = queue.sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].attempt, 1);
        assert_eq!(sent[0].request, request());
        // The claim is there, so nobody else can send attempt 1.
        assert!(storage
            .keys()
            .contains(&ClaimKey::of(&request().image_key(), 1).to_string()));
    }

    /// `request()` for other packages: another image.
    fn request_for(package: &str) -> BuildRequest {
        BuildRequest {
            packages: vec![package.into()],
            name: package.into(),
            ..request()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_enqueues_a_bounded_number_of_builds() {
        let (storage, queue, dispatch) = setup();
        let dispatch = Arc::new(dispatch.queueing_at_most(2));
        // Two pulls of new images send their builds, and wait.
        let waiting: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|package| {
                let dispatch = dispatch.clone();
                tokio::spawn(async move { dispatch.build(request_for(package)).await })
            })
            .collect();
        while queue.sent.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A third is refused at once: nothing claimed, nothing sent.
        assert_eq!(
            dispatch.build(request_for("c")).await.unwrap_err(),
            DispatchError::Busy { waiting: 2 }
        );
        assert_eq!(queue.sent.lock().unwrap().len(), 2);
        let c = request_for("c").image_key();
        assert!(
            !storage.keys().iter().any(|k| k.contains(c.as_str())),
            "{:?}",
            storage.keys()
        );
        // A pull of an image already on its way joins it: not refused.
        let joined = tokio::spawn({
            let dispatch = dispatch.clone();
            async move { dispatch.build(request_for("a")).await }
        });
        // Once a worker takes one of them, the next build is sent.
        let a = request_for("a").image_key();
        let running = BuildStatus {
            state: State::Running,
            step: Some(Step::Realising),
            ..BuildStatus::queued(&request_for("a"), 1)
        };
        status::write(&*storage, &a, &running).await.unwrap();
        tokio::time::sleep(MAX_POLL * 2).await;
        assert!(!joined.is_finished(), "the pull that joined a queued build");
        let third = tokio::spawn({
            let dispatch = dispatch.clone();
            async move { dispatch.build(request_for("c")).await }
        });
        while queue.sent.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(queue.sent.lock().unwrap()[2].request, request_for("c"));
        for pull in waiting.into_iter().chain([joined, third]) {
            pull.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_says_still_building_with_the_step() {
        let (storage, queue, dispatch) = setup();
        let reporter = {
            let storage = storage.clone();
            async move {
                // A live worker that never finishes: fresh heartbeats.
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    set_status(&storage, State::Running, Step::Packing).await;
                }
            }
        };
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = dispatch.build(request()) => outcome,
            never = reporter => never,
        };
        assert_eq!(
            outcome.unwrap_err(),
            DispatchError::StillBuilding {
                step: Some(Step::Packing)
            }
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(840) && waited < Duration::from_secs(843),
            "{waited:?}"
        );
        assert_eq!(queue.sent.lock().unwrap().len(), 1);
    }

    /// An assembler on a fake store whose realisations wait while the test
    /// holds its gate: an assembly that takes as long as the test wants.
    fn assembling(
        passing_on: bool,
    ) -> (
        Arc<MemoryStorage>,
        Arc<Recorded>,
        Arc<crate::builder::fake::FakeStore>,
        SqsDispatch,
    ) {
        let (storage, queue, dispatch) = setup();
        let store = Arc::new(crate::builder::fake::FakeStore::default().with_package("hello", &[]));
        let builder = Builder::new(
            store.clone(),
            storage.clone(),
            Arc::new(crate::builder::popularity::Popularity::none()),
            crate::config::default_limits(),
        );
        let builder = if passing_on {
            builder.passing_on()
        } else {
            builder
        };
        let dispatch = dispatch.assembling_with(builder, Arc::new(Metrics::new(None)));
        (storage, queue, store, dispatch)
    }

    #[tokio::test(start_paused = true)]
    async fn an_assembly_that_outlasts_the_pull_goes_to_the_workers_or_ends() {
        // `first`: handed to the workers, queued for them, once.
        let (storage, queue, store, dispatch) = assembling(true);
        let gate = store.gate.write().await;
        let pulled = dispatch.build(request()).await;
        assert!(
            matches!(pulled, Err(DispatchError::StillBuilding { .. })),
            "{pulled:?}"
        );
        assert_eq!(queue.attempts(), vec![1]);
        let status = status::read(&*storage, &request().image_key())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((status.state, status.attempt), (State::Queued, 1));
        drop(gate);

        // `only`: nothing is sent; the attempt ends with a failure that
        // says to pull again, and the next pull (within the failure TTL)
        // is told the same without another assembly.
        let (_storage, queue, store, dispatch) = assembling(false);
        let gate = store.gate.write().await;
        let pulled = dispatch.build(request()).await;
        let Err(DispatchError::Failed(failure)) = pulled else {
            panic!("{pulled:?}");
        };
        assert!(matches!(failure, Failure::Unassembled { .. }), "{failure}");
        assert!(failure.to_string().contains("pull again"), "{failure}");
        assert!(queue.attempts().is_empty());
        let realised = store.realised.load(std::sync::atomic::Ordering::Relaxed);
        let again = dispatch.build(request()).await;
        assert!(matches!(
            again,
            Err(DispatchError::Failed(Failure::Unassembled { .. }))
        ));
        assert_eq!(
            store.realised.load(std::sync::atomic::Ordering::Relaxed),
            realised
        );
        drop(gate);
    }

    #[tokio::test(start_paused = true)]
    async fn a_remembered_failure_is_answered_without_a_build() {
        let (storage, queue, dispatch) = setup();
        let failure = Failure::UnknownPackages {
            names: vec!["nope".into()],
        };
        let failed = BuildStatus {
            state: State::Failed,
            attempt: 1,
            step: None,
            failure: Some(failure.clone()),
            heartbeat: now(),
            info: Default::default(),
        };
        status::write(&*storage, &request().image_key(), &failed)
            .await
            .unwrap();
        assert_eq!(
            dispatch.build(request()).await.unwrap_err(),
            DispatchError::Failed(failure)
        );
        assert!(queue.sent.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_record_is_not_accepted() {
        let (storage, queue, dispatch) = setup();
        let mut old = record();
        old.built_at = 1_000;
        records::write(&*storage, &ImageRecordKey::of(&request().image_key()), &old)
            .await
            .unwrap();
        let mut wants_new = request();
        wants_new.not_before = 2_000;
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), dispatch.build(wants_new)).await;
        assert!(
            outcome.is_err(),
            "a record older than not_before was accepted"
        );
        assert_eq!(
            queue.sent.lock().unwrap().len(),
            1,
            "a rebuild was dispatched"
        );
    }

    /// Storage that fails the first `failures` writes of one key, as a
    /// store that times out or a writer killed mid-write would.
    fn failing_writes(inner: Arc<MemoryStorage>, failing: String, failures: usize) -> Intercepted {
        let failures = std::sync::atomic::AtomicUsize::new(failures);
        Intercepted::new(inner, move |op, key| {
            use std::sync::atomic::Ordering::SeqCst;
            let failing = op == Op::Put
                && key == failing
                && failures
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if failing {
                return Err(StorageError::Io {
                    key: key.to_string(),
                    source: std::io::Error::other("injected: the write timed out"),
                });
            }
            Ok(())
        })
    }

    /// A worker for attempt `attempt`: waits for its message, beats, then
    /// commits the image.
    async fn worker_for(storage: &dyn Storage, queue: &Recorded, attempt: u32) {
        while !queue
            .sent
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.attempt == attempt)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for beat in 0..3 {
            write_status(
                storage,
                State::Running,
                attempt,
                Some(Step::Realising),
                now() + beat,
            )
            .await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        commit_image(storage).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_whose_status_was_never_written_is_adopted() {
        // The first status write fails right after the claim: that pull
        // gets the storage error, and attempt 1 is a claim without status.
        let memory = Arc::new(MemoryStorage::new());
        let status = StatusKey::of(&request().image_key()).to_string();
        let storage = Arc::new(failing_writes(memory.clone(), status, 1));
        let queue = Arc::new(Recorded::default());
        let dispatch = SqsDispatch::new(storage.clone(), queue.clone(), timings());
        let first = dispatch.build(request()).await.unwrap_err();
        assert!(
            matches!(first, DispatchError::Unavailable { .. }),
            "{first:?}"
        );
        assert!(memory
            .keys()
            .contains(&ClaimKey::of(&request().image_key(), 1).to_string()));
        assert!(queue.sent.lock().unwrap().is_empty());

        // The next pull waits out a dead worker's silence, then claims
        // attempt 2, and a worker finishes it.
        let started = Instant::now();
        let (built, ()) = tokio::join!(dispatch.build(request()), worker_for(&*storage, &queue, 2));
        assert_eq!(built.unwrap(), record());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(120),
            "{waited:?}"
        );
        assert_eq!(queue.attempts(), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_young_claim_is_waited_for_not_adopted() {
        let (storage, queue, dispatch) = setup();
        put_claim(&storage, 1, now()).await;
        // Its status arrives 30 s later, within a dead worker's silence.
        let (built, ()) = tokio::join!(dispatch.build(request()), async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            write_status(&*storage, State::Queued, 1, None, now()).await;
            queue
                .send(&QueueMessage {
                    request: request(),
                    attempt: 1,
                })
                .await
                .unwrap();
            worker_for(&*storage, &queue, 1).await;
        });
        assert_eq!(built.unwrap(), record());
        assert_eq!(queue.attempts(), [1], "a live claim was taken over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_older_attempt_over_a_newer_claim_heals() {
        // Attempt 1's late worker overwrote the status after attempt 2 was
        // claimed, and then died too: status says attempt 1, claim 2 is
        // there with no status of its own.
        let (storage, queue, dispatch) = setup();
        for attempt in [1, 2] {
            put_claim(&storage, attempt, now() - 600).await;
        }
        write_status(
            &*storage,
            State::Running,
            1,
            Some(Step::Packing),
            now() - 300,
        )
        .await;
        let (built, ()) = tokio::join!(dispatch.build(request()), worker_for(&*storage, &queue, 3));
        assert_eq!(built.unwrap(), record());
        assert_eq!(queue.attempts(), [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_are_judged_by_change_not_by_the_worker_s_clock() {
        // A worker whose clock is an hour behind, beating every 10 s: alive.
        let (storage, queue, dispatch) = setup();
        put_claim(&storage, 1, now()).await;
        let behind = async {
            for beat in 0..20 {
                let behind = now() - 3600 + beat;
                write_status(&*storage, State::Running, 1, Some(Step::Realising), behind).await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            commit_image(&*storage).await;
        };
        let (built, ()) = tokio::join!(dispatch.build(request()), behind);
        assert_eq!(built.unwrap(), record());
        assert!(
            queue.sent.lock().unwrap().is_empty(),
            "a live worker was taken over"
        );

        // A worker whose clock is an hour ahead, then silent: dead after
        // a minute of silence, not after an hour.
        let (storage, queue, dispatch) = setup();
        put_claim(&storage, 1, now()).await;
        write_status(
            &*storage,
            State::Running,
            1,
            Some(Step::Realising),
            now() + 3600,
        )
        .await;
        let started = Instant::now();
        let (built, ()) = tokio::join!(dispatch.build(request()), worker_for(&*storage, &queue, 2));
        assert_eq!(built.unwrap(), record());
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(queue.attempts(), [2]);
    }
}
