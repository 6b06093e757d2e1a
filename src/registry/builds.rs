//! Build status for people and scripts, read from storage so that every
//! instance shows every build (`builds/<image-key>`, see
//! [`crate::dispatch::status`]):
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/builds` | `{"builds": [...]}`: builds in progress first, then recent ones |
//! | `GET /api/builds/<image-key>` | one build |
//! | `GET /builds` | a page of them, updating itself while builds run |
//! | `GET /builds/<image-key>` | a page of one build, with its log's last lines |
//!
//! The pages are static HTML and one script (`/builds.js`) that renders
//! what the API says, as text (never markup), and polls it again while
//! anything runs. Listing reads up to [`LIST_LIMIT`] statuses; the list is
//! kept for [`LIST_TTL`], and concurrent requests share one listing, so a
//! flood of page views costs storage one listing a second at most.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::pages::{esc, html_response};
use super::{json_response, AppState, RegistryError};
use crate::builder::Step;
use crate::dispatch::status::{self, BuildStatus, State as BuildState};
use crate::storage::keys::ImageKey;
use crate::storage::records::{rfc3339, unix_now_ms};
use crate::storage::{Storage, StorageError};

/// The most builds listed.
pub const LIST_LIMIT: usize = 50;
/// How long a listing is reused.
const LIST_TTL: Duration = Duration::from_secs(1);

/// One build, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BuildView {
    /// The image key: the build's identity.
    pub key: String,
    /// Its page.
    pub url: String,
    pub name: String,
    pub tag: String,
    /// queued, running, done or failed.
    pub state: &'static str,
    /// The step under way (see `builder::Step`).
    pub step: Option<Step>,
    /// What `done` and `total` count during this step, if anything.
    pub unit: Option<&'static str>,
    /// What runs now ("building hello-2.12 (0 of 1 built, ...)").
    pub detail: Option<String>,
    pub done: Option<u64>,
    pub total: Option<u64>,
    pub bytes: Option<u64>,
    /// RFC 3339, UTC: when its first step started (or it was queued).
    pub started_at: Option<String>,
    pub elapsed_ms: Option<u64>,
    pub error: Option<String>,
    /// The last lines of Nix's log.
    pub log: Vec<String>,
    pub layers_new: Option<usize>,
    pub layers_reused: Option<usize>,
    pub bytes_uploaded: Option<u64>,
    /// Done, and assembled from the binary cache rather than built.
    pub assembled: bool,
    pub attempt: u32,
}

impl BuildView {
    /// `stale_after`: a queued or running build silent for this long has
    /// lost its builder, and is shown as failed.
    pub fn of(
        key: &ImageKey,
        status: BuildStatus,
        now_ms: u64,
        stale_after: Duration,
    ) -> BuildView {
        let info = status.info;
        let progress = info.progress.unwrap_or_default();
        let heartbeat_ms = status.heartbeat.saturating_mul(1000);
        let silent_ms = now_ms.saturating_sub(heartbeat_ms);
        let in_progress = matches!(status.state, BuildState::Queued | BuildState::Running);
        let lost = in_progress && silent_ms > stale_after.as_millis() as u64;
        let (state, error) = match status.state {
            _ if lost => (
                "failed",
                Some(format!(
                    "the build stopped reporting {} s ago (its builder went away); pulling the image again starts it again",
                    silent_ms / 1000
                )),
            ),
            BuildState::Queued => ("queued", None),
            BuildState::Running => ("running", None),
            BuildState::Done => ("done", None),
            BuildState::Failed => (
                "failed",
                Some(
                    status
                        .failure
                        .map_or_else(|| "the build failed".to_string(), |f| f.to_string()),
                ),
            ),
        };
        let started = info.started_at.or(info.queued_at);
        let ended_ms = if in_progress && !lost {
            now_ms
        } else {
            heartbeat_ms
        };
        let elapsed_ms = match &info.stats {
            Some(stats) => Some(stats.elapsed_ms),
            None => started.map(|t| ended_ms.saturating_sub(t)),
        };
        let step = status.step.or(progress.step);
        let live = in_progress && !lost;
        BuildView {
            key: key.to_string(),
            url: format!("/builds/{key}"),
            name: info.name,
            tag: info.tag,
            state,
            step: step.filter(|_| live || state == "failed"),
            unit: step.and_then(Step::unit).filter(|_| live),
            detail: progress.detail.filter(|_| live),
            done: progress.done.filter(|_| live),
            total: progress.total.filter(|_| live),
            bytes: progress.bytes.filter(|_| live),
            started_at: started.map(|ms| rfc3339(ms / 1000)),
            elapsed_ms,
            error,
            log: progress.log,
            layers_new: info.stats.map(|s| s.layers_new),
            layers_reused: info.stats.map(|s| s.layers_reused),
            bytes_uploaded: info.stats.map(|s| s.bytes_uploaded),
            assembled: info.stats.is_some_and(|s| s.assembled),
            attempt: status.attempt,
        }
    }

    pub fn in_progress(&self) -> bool {
        matches!(self.state, "queued" | "running")
    }
}

/// The recent builds of every instance on this storage, as last listed.
pub struct Board {
    storage: Arc<dyn Storage>,
    stale_after: Duration,
    /// The last listing and when it was made; the lock also makes
    /// concurrent requests wait for one listing instead of making their own.
    listed: tokio::sync::Mutex<Option<(Instant, Arc<Vec<BuildView>>)>>,
}

impl Board {
    pub fn new(storage: Arc<dyn Storage>, stale_after: Duration) -> Board {
        Board {
            storage,
            stale_after,
            listed: tokio::sync::Mutex::new(None),
        }
    }

    /// Builds in progress first (newest first), then the others (most
    /// recently ended first).
    pub async fn list(&self) -> Result<Arc<Vec<BuildView>>, StorageError> {
        let mut listed = self.listed.lock().await;
        if let Some((at, views)) = listed.as_ref() {
            if at.elapsed() < LIST_TTL {
                return Ok(views.clone());
            }
        }
        let now_ms = unix_now_ms();
        let mut views: Vec<(u64, BuildView)> = status::recent(&*self.storage, LIST_LIMIT)
            .await?
            .into_iter()
            .map(|(key, status)| {
                let heartbeat = status.heartbeat;
                (
                    heartbeat,
                    BuildView::of(&key, status, now_ms, self.stale_after),
                )
            })
            .collect();
        views.sort_by(|(a_time, a), (b_time, b)| {
            let started = |v: &BuildView| v.started_at.clone();
            b.in_progress()
                .cmp(&a.in_progress())
                .then_with(|| {
                    if a.in_progress() {
                        started(b).cmp(&started(a))
                    } else {
                        b_time.cmp(a_time)
                    }
                })
                .then_with(|| a.key.cmp(&b.key))
        });
        let views = Arc::new(views.into_iter().map(|(_, view)| view).collect());
        *listed = Some((Instant::now(), Arc::clone(&views)));
        Ok(views)
    }

    /// One build, read now.
    pub async fn one(&self, key: &str) -> Result<Option<BuildView>, RegistryError> {
        let Some(key) = ImageKey::parse(key) else {
            return Ok(None);
        };
        let status = status::read(&*self.storage, &key)
            .await
            .map_err(|e| match e {
                crate::storage::records::RecordError::Storage(e) => RegistryError::Storage(e),
                e => RegistryError::Image(e.into()),
            })?;
        Ok(status.map(|s| BuildView::of(&key, s, unix_now_ms(), self.stale_after)))
    }
}

fn unknown(key: &str) -> RegistryError {
    RegistryError::BuildUnknown {
        key: key.chars().take(80).collect(),
    }
}

/// `GET /api/builds`
pub(super) async fn api_list(State(state): State<AppState>) -> Result<Response, RegistryError> {
    let builds = state.builds.list().await?;
    let body = serde_json::json!({ "builds": *builds });
    Ok(no_store(json_response(
        serde_json::to_vec(&body).expect("build views always serialise"),
    )))
}

/// `GET /api/builds/<image-key>`
pub(super) async fn api_one(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, RegistryError> {
    let view = state.builds.one(&key).await?.ok_or_else(|| unknown(&key))?;
    Ok(no_store(json_response(
        serde_json::to_vec(&view).expect("build views always serialise"),
    )))
}

/// `GET /builds`
pub(super) async fn page_list() -> Response {
    page("Builds", "/api/builds", false, "")
}

/// `GET /builds/<image-key>`
pub(super) async fn page_one(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, RegistryError> {
    let view = state.builds.one(&key).await?.ok_or_else(|| unknown(&key))?;
    let title = format!("Build of {}:{}", view.name, view.tag);
    Ok(page(&title, &format!("/api/builds/{key}"), true, &key))
}

/// `GET /builds.js`
pub(super) async fn script() -> Response {
    let mut response = include_str!("builds.js").into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    response
}

/// The page: a place for the script to render `api` into.
fn page(title: &str, api: &str, single: bool, key: &str) -> Response {
    let body = format!(
        "<h1>{title}</h1><p><a href=\"/\">registry</a> · <a href=\"/builds\">all builds</a> · \
         <a href=\"{api}\">as JSON</a></p>\
         <div id=\"builds\" data-api=\"{api}\" data-single=\"{single}\" data-key=\"{key}\">\
         <p>Loading build status...</p></div>\
         <noscript><p>This page needs JavaScript; <a href=\"{api}\">the JSON</a> has the same.</p></noscript>\
         <script src=\"/builds.js\"></script>",
        title = esc(title),
        api = esc(api),
        key = esc(key),
    );
    no_store(html_response(title, &body))
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{BuildStats, Failure, StepProgress};

    fn key() -> ImageKey {
        ImageKey::parse(&"c".repeat(64)).unwrap()
    }
    use crate::dispatch::status::BuildInfo;

    fn status(state: BuildState, heartbeat: u64) -> BuildStatus {
        BuildStatus {
            state,
            attempt: 1,
            step: None,
            failure: None,
            heartbeat,
            info: BuildInfo {
                name: "shell/hello".into(),
                tag: "latest".into(),
                queued_at: Some(1_000_000),
                started_at: Some(1_002_000),
                ..BuildInfo::default()
            },
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_running_build_shows_its_step_and_how_long_it_has_run() {
        let mut running = status(BuildState::Running, 1_010);
        running.step = Some(Step::Realising);
        running.info.progress = Some(StepProgress {
            step: Some(Step::Realising),
            detail: Some("building hello-2.12 (0 of 1 built, 0 of 0 fetched)".into()),
            done: Some(0),
            total: Some(1),
            bytes: None,
            log: vec!["compiling".into()],
        });
        let view = BuildView::of(&key(), running, 1_012_000, MINUTE);
        assert_eq!(view.state, "running");
        assert_eq!(view.step, Some(Step::Realising));
        assert_eq!((view.done, view.total), (Some(0), Some(1)));
        assert_eq!(view.elapsed_ms, Some(10_000));
        assert_eq!(view.started_at.as_deref(), Some("1970-01-01T00:16:42Z"));
        assert_eq!(view.url, format!("/builds/{}", key()));
        assert!(view.in_progress());
    }

    #[test]
    fn a_silent_build_is_shown_as_lost_not_running() {
        let view = BuildView::of(
            &key(),
            status(BuildState::Running, 1_010),
            1_200_000,
            MINUTE,
        );
        assert_eq!(view.state, "failed");
        assert!(view.error.unwrap().contains("stopped reporting 190 s ago"));
        assert_eq!(view.elapsed_ms, Some(8_000));
    }

    #[test]
    fn ended_builds_show_their_outcome() {
        let mut done = status(BuildState::Done, 1_030);
        done.info.stats = Some(BuildStats {
            elapsed_ms: 25_000,
            layers_new: 3,
            layers_reused: 2,
            bytes_uploaded: 1234,
            bytes_total: 5678,
            assembled: false,
        });
        let view = BuildView::of(&key(), done, 2_000_000, MINUTE);
        assert_eq!(view.state, "done");
        assert_eq!(view.elapsed_ms, Some(25_000));
        assert_eq!((view.layers_new, view.layers_reused), (Some(3), Some(2)));
        assert_eq!(view.step, None);
        assert!(!view.assembled);

        let mut failed = status(BuildState::Failed, 1_030);
        failed.failure = Some(Failure::UnknownPackages {
            names: vec!["nope".into()],
        });
        failed.info.progress = Some(StepProgress {
            step: Some(Step::Evaluating),
            log: vec!["error: nope".into()],
            ..StepProgress::default()
        });
        let view = BuildView::of(&key(), failed, 2_000_000, MINUTE);
        assert_eq!(view.state, "failed");
        assert_eq!(view.error.as_deref(), Some("unknown packages: nope"));
        assert_eq!(view.step, Some(Step::Evaluating));
        assert_eq!(view.log, ["error: nope"]);
        assert_eq!(view.elapsed_ms, Some(28_000));
    }
}
