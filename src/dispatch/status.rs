//! Build status records (`builds/<image-key>`) and the claims that make one
//! build per image (`builds/<image-key>.<attempt>`).
//!
//! Whoever creates the claim object for attempt `n` (a conditional write:
//! only one can) owns that attempt: it writes the status, and a worker
//! runs the build and keeps the status's heartbeat fresh. Everybody else
//! reads the status and waits. When the heartbeat goes silent (the worker
//! died), the next attempt may be claimed, up to a limit; a failed build is
//! remembered for the failure TTL, then may be tried again.
//!
//! [`decide`] is the whole policy, as a pure function.
//!
//! Faults heal by themselves:
//! - a claim whose status never came (its writer died, or the write
//!   failed) is an orphan once older than a dead worker's silence, and the
//!   next attempt is claimed ([`Claim`]);
//! - a worker still holding an older attempt's message never overwrites a
//!   later attempt's status ([`write_own`]), and drops such a message;
//! - liveness is judged by whether the heartbeat changes, on the waiter's
//!   own clock, so a worker whose clock is off neither dies early nor
//!   lives forever.

use std::convert::Infallible;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use crate::builder::Failure;
use crate::builder::{BuildRequest, BuildStats, Step, StepProgress};
use crate::storage::keys::{ClaimKey, ImageKey, Parsed, RecentKey, StatusKey, RECENT_PREFIX};
use crate::storage::records::{self, unix_now, unix_now_ms, RecordError};
use crate::storage::{Storage, StorageError};

/// How often a build's status is refreshed, by default.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// A build whose heartbeat is this many intervals old is presumed dead.
pub const STALE_HEARTBEATS: u64 = 6;
/// Attempts of one image (workers that died on it) before it is failed.
pub const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
}

/// `builds/<image-key>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildStatus {
    pub state: State,
    pub attempt: u32,
    /// The step a running build is at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Unix seconds of the last sign of life (or of the failure).
    pub heartbeat: u64,
    /// What the build is, for people watching it.
    #[serde(flatten)]
    pub info: BuildInfo,
}

/// The part of a build's status that is there to be read by people (the
/// build pages and `/api/builds`): no decision depends on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The name and tag of the pull that started this attempt.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tag: String,
    /// Unix milliseconds: when the build was asked for, and when its
    /// first step started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// How far it got: the step, its counts, the log's last lines (kept
    /// when it fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<StepProgress>,
    /// What a finished build did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<BuildStats>,
}

impl BuildStatus {
    /// A build of `request` just asked for: queued as `attempt`.
    pub fn queued(request: &BuildRequest, attempt: u32) -> BuildStatus {
        BuildStatus {
            state: State::Queued,
            attempt,
            step: None,
            failure: None,
            heartbeat: unix_now(),
            info: BuildInfo {
                name: request.name.clone(),
                tag: request.tag.clone(),
                queued_at: Some(unix_now_ms()),
                ..BuildInfo::default()
            },
        }
    }

    /// Takes the build's last progress: a change within the write interval
    /// may not have been written yet.
    pub fn last_progress(&mut self, progress: &StepProgress) {
        if progress.step.is_some() {
            self.info.progress = Some(progress.clone());
        }
    }

    /// The status of the build once it ended: done, with what it did, or
    /// failed, with why and how far it got.
    pub fn ended(self, outcome: Result<Option<BuildStats>, Failure>) -> BuildStatus {
        let (state, failure, stats, progress) = match outcome {
            Ok(stats) => (State::Done, None, stats, None),
            Err(failure) => (State::Failed, Some(failure), None, self.info.progress),
        };
        BuildStatus {
            state,
            failure,
            heartbeat: unix_now(),
            info: BuildInfo {
                stats,
                progress,
                ..self.info
            },
            ..self
        }
    }
}

/// The least time between two status writes of one build.
const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps a build's status fresh while it runs: written when its progress
/// changes (at most once a [`MIN_WRITE_INTERVAL`], so within a second of
/// a change) and every `heartbeat` regardless, never over a later attempt's ([`write_own`]).
/// `status` is the build's status so far, kept up to date here. Never
/// returns: dropped when the build ends.
pub async fn keep_fresh(
    storage: &dyn Storage,
    key: &ImageKey,
    status: &mut BuildStatus,
    mut progress: watch::Receiver<StepProgress>,
    heartbeat: Duration,
) -> Infallible {
    loop {
        let now = progress.borrow_and_update().clone();
        if now.step.is_some() {
            status.state = State::Running;
            status.step = now.step;
            status.info.started_at.get_or_insert_with(unix_now_ms);
            status.info.progress = Some(now);
        }
        status.heartbeat = unix_now();
        match write_own(storage, key, status).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    attempt = status.attempt,
                    "heartbeat: a later attempt owns this build; not overwriting its status"
                )
            }
            Err(error) => tracing::warn!(%error, "heartbeat: status not written"),
        }
        match tokio::time::timeout(heartbeat, progress.changed()).await {
            Ok(Ok(())) => tokio::time::sleep(MIN_WRITE_INTERVAL.min(heartbeat)).await,
            // Nothing reports any more: a heartbeat now and then still.
            Ok(Err(_)) => tokio::time::sleep(heartbeat).await,
            Err(_) => {}
        }
    }
}

/// What a claim object holds: when it was made (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub claimed_at: u64,
}

/// Writes the claim of `attempt`, unless there is one: `true` if this
/// caller made it.
pub async fn claim(
    storage: &dyn Storage,
    image_key: &ImageKey,
    attempt: u32,
) -> Result<bool, StorageError> {
    let claim = Claim {
        claimed_at: unix_now(),
    };
    let claim = bytes::Bytes::from(serde_json::to_vec(&claim).expect("a claim always serialises"));
    storage
        .put_if_absent(&ClaimKey::of(image_key, attempt), claim)
        .await
}

/// Reads the claim of `attempt`.
pub async fn read_claim(
    storage: &dyn Storage,
    image_key: &ImageKey,
    attempt: u32,
) -> Result<Option<Claim>, RecordError> {
    records::read(storage, &ClaimKey::of(image_key, attempt)).await
}

/// Reads `builds/<image-key>`; `None` if no build was ever claimed.
pub async fn read(
    storage: &dyn Storage,
    image_key: &ImageKey,
) -> Result<Option<BuildStatus>, RecordError> {
    records::read(storage, &StatusKey::of(image_key)).await
}

/// Writes `builds/<image-key>`.
pub async fn write(
    storage: &dyn Storage,
    image_key: &ImageKey,
    status: &BuildStatus,
) -> Result<(), StorageError> {
    records::write(storage, &StatusKey::of(image_key), status).await
}

/// Writes `builds/<image-key>` unless a later attempt owns the build now
/// (its status names a higher attempt): a worker presumed dead that comes
/// back must not hide its successor. `false`: superseded, nothing written.
/// A status that cannot be read is overwritten.
pub async fn write_own(
    storage: &dyn Storage,
    image_key: &ImageKey,
    status: &BuildStatus,
) -> Result<bool, StorageError> {
    match read(storage, image_key).await {
        Ok(Some(current)) if current.attempt > status.attempt => Ok(false),
        Err(RecordError::Storage(error)) => Err(error),
        _ => write(storage, image_key, status).await.map(|()| true),
    }
}

/// Notes that a build of `image_key` was just asked for, under a key that
/// sorts newest first (`builds/recent/<9999999999999 - ms>-<image-key>`),
/// so that [`recent`] finds the latest builds with one bounded listing,
/// however many statuses there are. Garbage collection removes old notes
/// with the statuses. A failed note is logged: it only hides the build
/// from the lists.
pub async fn note_queued(storage: &dyn Storage, image_key: &ImageKey) {
    let key = RecentKey::of(image_key, unix_now_ms());
    if let Err(error) = storage.put(&key, bytes::Bytes::from_static(b"{}")).await {
        tracing::warn!(%error, "noting a build for the build lists failed");
    }
}

/// The statuses of the builds asked for last (at most `limit`, each
/// once), newest first, with their image keys: one listing of at most
/// four times `limit` notes ([`note_queued`]), then the statuses. Those
/// that cannot be read are left out (logged).
pub async fn recent(
    storage: &dyn Storage,
    limit: usize,
) -> Result<Vec<(ImageKey, BuildStatus)>, StorageError> {
    use futures_util::StreamExt;
    let notes = storage.list_first(RECENT_PREFIX, limit * 4).await?;
    let mut keys: Vec<ImageKey> = Vec::with_capacity(limit);
    for note in notes {
        let Some(Parsed::Recent(key)) = Parsed::of(&note.key) else {
            continue;
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
        if keys.len() == limit {
            break;
        }
    }
    let read = futures_util::stream::iter(keys)
        .map(|key| async move { (read(storage, &key).await, key) })
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    let mut found = Vec::with_capacity(read.len());
    for (status, key) in read {
        match status {
            Ok(Some(status)) => found.push((key, status)),
            Ok(None) => {}
            Err(RecordError::Storage(error)) => return Err(error),
            Err(error) => tracing::warn!(image = %key, %error, "a build status cannot be read"),
        }
    }
    Ok(found)
}

/// What a puller waiting for an image should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Try to claim this attempt and dispatch the build.
    Claim(u32),
    /// A build is under way (or just finished): look again shortly.
    Wait,
    /// The build failed recently: report it.
    Fail(Failure),
}

/// The policy. `status` is what `builds/<key>` says (if anything); an image
/// built before `not_before` is stale and must be built again; `now` and
/// the timings are in seconds.
pub fn decide(
    status: Option<&BuildStatus>,
    now: u64,
    not_before: u64,
    heartbeat_secs: u64,
    failure_ttl: u64,
) -> Action {
    let Some(status) = status else {
        return Action::Claim(1);
    };
    let age = now.saturating_sub(status.heartbeat);
    match status.state {
        State::Done if !records::is_current(status.heartbeat, not_before) => {
            Action::Claim(status.attempt + 1)
        }
        State::Done => Action::Wait,
        State::Failed if age < failure_ttl => {
            Action::Fail(status.failure.clone().unwrap_or(Failure::Build { message: "the build failed".into() }))
        }
        State::Failed => Action::Claim(status.attempt + 1),
        State::Queued | State::Running if age < heartbeat_secs * STALE_HEARTBEATS => Action::Wait,
        State::Queued | State::Running if status.attempt >= MAX_ATTEMPTS => Action::Fail(Failure::Build {
            message: format!(
                "the build was abandoned {} times (its worker stopped answering); it is in the dead-letter queue for inspection",
                status.attempt
            ),
        }),
        State::Queued | State::Running => Action::Claim(status.attempt + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: State, attempt: u32, heartbeat: u64) -> BuildStatus {
        BuildStatus {
            state,
            attempt,
            step: None,
            failure: None,
            heartbeat,
            info: BuildInfo::default(),
        }
    }

    #[test]
    fn the_policy() {
        let (hb, ttl) = (10, 60);
        assert_eq!(decide(None, 1000, 0, hb, ttl), Action::Claim(1));
        // A live build is waited for; a silent one is taken over ...
        assert_eq!(
            decide(Some(&status(State::Running, 1, 990)), 1000, 0, hb, ttl),
            Action::Wait
        );
        assert_eq!(
            decide(Some(&status(State::Queued, 1, 1000 - 59)), 1000, 0, hb, ttl),
            Action::Wait
        );
        assert_eq!(
            decide(
                Some(&status(State::Running, 1, 1000 - 60)),
                1000,
                0,
                hb,
                ttl
            ),
            Action::Claim(2)
        );
        // ... until it has been abandoned too often.
        assert!(matches!(
            decide(
                Some(&status(State::Running, MAX_ATTEMPTS, 0)),
                1000,
                0,
                hb,
                ttl
            ),
            Action::Fail(_)
        ));
        // Failures are remembered for the TTL, then retried.
        let mut failed = status(State::Failed, 1, 990);
        failed.failure = Some(Failure::UnknownPackages {
            names: vec!["nope".into()],
        });
        assert_eq!(
            decide(Some(&failed), 1000, 0, hb, ttl),
            Action::Fail(Failure::UnknownPackages {
                names: vec!["nope".into()]
            })
        );
        assert_eq!(decide(Some(&failed), 1100, 0, hb, ttl), Action::Claim(2));
        // Done: the image record is what counts, unless it is stale.
        assert_eq!(
            decide(Some(&status(State::Done, 1, 0)), 1000, 0, hb, ttl),
            Action::Wait
        );
        assert_eq!(
            decide(Some(&status(State::Done, 1, 500)), 1000, 900, hb, ttl),
            Action::Claim(2)
        );
    }

    #[test]
    fn records_round_trip() {
        let mut s = status(State::Failed, 2, 7);
        s.failure = Some(Failure::Build {
            message: "builder failed".into(),
        });
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(r#""state":"failed""#) && json.contains(r#""kind":"build""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<BuildStatus>(&json).unwrap(), s);
    }

    #[tokio::test]
    async fn an_older_attempt_never_overwrites_a_newer_one() {
        let storage = crate::storage::MemoryStorage::new();
        let key = ImageKey::parse(&"a".repeat(64)).unwrap();
        let newer = status(State::Running, 2, 100);
        assert!(write_own(&storage, &key, &newer).await.unwrap());
        // The worker of attempt 1 comes back: its writes are refused.
        let late = status(State::Failed, 1, 200);
        assert!(!write_own(&storage, &key, &late).await.unwrap());
        assert_eq!(read(&storage, &key).await.unwrap(), Some(newer));
        // Its own attempt and later ones write; so does anyone over an
        // unreadable status.
        let done = status(State::Done, 2, 300);
        assert!(write_own(&storage, &key, &done).await.unwrap());
        storage
            .put(&StatusKey::of(&key), bytes::Bytes::from_static(b"{half"))
            .await
            .unwrap();
        assert!(write_own(&storage, &key, &late).await.unwrap());
        assert_eq!(read(&storage, &key).await.unwrap(), Some(late));
    }
}
