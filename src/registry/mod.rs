//! The registry API: the pull side of the OCI distribution spec.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v2/` | 200 `{}` with `Docker-Distribution-API-Version: registry/2.0` (a private registry challenges first: [`auth`]) |
//! | `GET`/`POST /token` | a bearer token, on a private registry ([`token`]) |
//! | `GET`/`HEAD /v2/<name>/manifests/<tag>` | the image for the packages in `<name>`, built on first request |
//! | `GET`/`HEAD /v2/<name>/manifests/sha256:<hex>` | a stored manifest |
//! | `GET`/`HEAD /v2/<name>/blobs/sha256:<hex>` | a layer or config (bytes, or a redirect to them) |
//! | `GET /v2/<name>/tags/list` | the tags that can be pulled |
//! | `GET /v2/<name>/referrers/sha256:<hex>` | the artifacts about a manifest (its SBOM), as an index |
//! | anything that writes | 405 `UNSUPPORTED` |
//! | `GET /` | a landing page: how to pull, the source, builds in progress |
//! | `GET /builds`, `/api/builds` (and `/<image-key>`) | build status ([`builds`]) |
//!
//! Repository names contain slashes, so requests under `/v2/` are routed by
//! splitting the path from the right (`.../manifests/<reference>`); query
//! strings (containerd's `?ns=`) play no part. [`router`] returns the whole
//! API as one value, served by [`serve`] on a listener (local mode, tests).

pub mod auth;
mod blobs;
pub(crate) mod builds;
pub mod error;
mod landing;
pub mod login;
mod manifests;
mod pages;
pub mod token;
mod token_endpoint;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use tokio::net::TcpListener;

use crate::images::Images;
use crate::metrics::Metrics;
use crate::storage::Storage;
pub use error::RegistryError;

pub const API_VERSION_HEADER: HeaderName =
    HeaderName::from_static("docker-distribution-api-version");
pub const DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// What every request handler shares; built once per process.
#[derive(Clone)]
pub struct AppState {
    /// Manifests: served, or built first.
    pub images: Arc<Images>,
    /// Blobs, served straight from storage.
    pub storage: Arc<dyn Storage>,
    /// Credentials, on a private instance.
    pub auth: Option<Arc<auth::Auth>>,
    /// Build status, as every instance wrote it.
    pub builds: Arc<builds::Board>,
    /// This process's counters (shared with its builds, in local mode).
    pub metrics: Arc<Metrics>,
    /// Names requests outside Lambda (which names them itself).
    request_ids: Arc<RequestIds>,
    /// How clients reach this registry, if the operator said
    /// (`NIXERY_PUBLIC_URL`); else each request's Host says.
    public_url: Option<Arc<str>>,
}

impl AppState {
    /// Pull commands and status URLs name `url`, whatever Host a
    /// request came with.
    pub fn with_public_url(mut self, url: &str) -> AppState {
        self.public_url = Some(Arc::from(url));
        self
    }

    /// `scheme://host` of this registry for a client that sent `headers`.
    pub(crate) fn base_url(&self, headers: &axum::http::HeaderMap) -> String {
        match &self.public_url {
            Some(url) => url.to_string(),
            None => pages::base_url(headers),
        }
    }

    /// The status pages judge a build whose status has not changed for
    /// six of these as lost (the dispatcher's rule): the workers'
    /// heartbeat, when it is not the default.
    pub fn with_heartbeat(mut self, heartbeat: std::time::Duration) -> AppState {
        let stale_after = heartbeat * crate::dispatch::status::STALE_HEARTBEATS as u32;
        self.builds = Arc::new(builds::Board::new(self.storage.clone(), stale_after));
        self
    }

    pub fn new(
        images: Arc<Images>,
        storage: Arc<dyn Storage>,
        auth: Option<Arc<auth::Auth>>,
        metrics: Arc<Metrics>,
    ) -> AppState {
        let stale_after = std::time::Duration::from_secs(
            crate::dispatch::status::DEFAULT_HEARTBEAT_SECS
                * crate::dispatch::status::STALE_HEARTBEATS,
        );
        AppState {
            builds: Arc::new(builds::Board::new(storage.clone(), stale_after)),
            images,
            storage,
            auth,
            metrics,
            request_ids: Arc::new(RequestIds::default()),
            public_url: None,
        }
    }
}

/// Request ids of this process: a prefix from its start and a count.
struct RequestIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl Default for RequestIds {
    fn default() -> RequestIds {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        RequestIds {
            prefix: format!("{:x}{:x}", started.as_secs(), std::process::id()),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n}", self.prefix)
    }
}

/// The whole registry API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(landing::page))
        .route("/builds", get(builds::page_list))
        .route("/builds/{key}", get(builds::page_one))
        .route("/builds.js", get(builds::script))
        .route("/api/builds", get(builds::api_list))
        .route("/api/builds/{key}", get(builds::api_one))
        .route("/metrics", get(metrics))
        .route(
            token::PATH,
            get(token_endpoint::endpoint).post(token_endpoint::endpoint),
        )
        .route("/v2", get(base))
        .route("/v2/", get(base))
        .route("/v2/{*rest}", any(v2))
        .fallback(|req: Request| async move {
            RegistryError::NoRoute {
                path: req.uri().path().to_string(),
            }
        })
        .layer(middleware::from_fn_with_state(state.clone(), auth::check))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            common_headers,
        ))
        .with_state(state)
}

/// Serves the router on an already-bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // No Nagle delay: a small response on a kept-alive connection would
    // otherwise wait for the client's delayed ACK (tens of milliseconds).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "TCP_NODELAY not set");
        }
    });
    // The peer's address limits its failed logins (`login`).
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn base() -> Response {
    json_response(b"{}".to_vec())
}

/// `/v2/<name>/<kind>/<reference>`
async fn v2(
    State(state): State<AppState>,
    method: Method,
    req: Request,
) -> Result<Response, RegistryError> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/v2/").unwrap_or(&path);
    let writes = !matches!(method, Method::GET | Method::HEAD);
    let head = method == Method::HEAD;
    let no_route = || RegistryError::NoRoute { path: path.clone() };

    if writes {
        // Push, delete, upload: all refused in the same way.
        return Err(RegistryError::Unsupported {
            method: method.to_string(),
        });
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return manifests::tags(name).await;
    }
    let (front, reference) = rest.rsplit_once('/').ok_or_else(no_route)?;
    let (name, kind) = front.rsplit_once('/').ok_or_else(no_route)?;
    let may_build = auth::may_build(&state, req.extensions().get::<auth::Caller>(), name);
    match kind {
        "manifests" => {
            manifests::get(&state, name, reference, head, may_build, req.headers()).await
        }
        "blobs" => blobs::get(&state, name, reference, head).await,
        "referrers" if !head => {
            manifests::referrers(&state, name, reference, req.uri().query()).await
        }
        _ => Err(no_route()),
    }
}

/// `GET /metrics`: this process's counters in Prometheus text format, on
/// the local server (in Lambda, where each instance counts apart, they go
/// to CloudWatch instead).
async fn metrics(State(state): State<AppState>) -> Result<Response, RegistryError> {
    if state.metrics.writes_emf() {
        return Err(RegistryError::NoRoute {
            path: "/metrics".to_string(),
        });
    }
    let mut response = state.metrics.prometheus_text().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

/// The one log line of a request, written when it is answered, or, if
/// its client leaves first (the server then drops the request's work),
/// when it is dropped: with status 499, as nginx logs a client that
/// closed the connection.
struct RequestLine {
    span: tracing::Span,
    method: Method,
    path: String,
    started: Instant,
    metrics: Arc<Metrics>,
    answered: bool,
}

/// The status logged for a request whose client left before its answer.
pub const CLIENT_LEFT: u16 = 499;

impl RequestLine {
    fn write(&mut self, status: u16, code: Option<&'static str>) {
        self.answered = true;
        let note = (status == CLIENT_LEFT).then_some("the client left before the answer");
        self.span.in_scope(|| {
            tracing::info!(
                method = %self.method,
                path = self.path,
                status,
                code,
                note,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "request"
            )
        });
        self.metrics.request(status, code);
        self.metrics.flush();
    }
}

impl Drop for RequestLine {
    fn drop(&mut self) {
        if !self.answered {
            self.write(CLIENT_LEFT, None);
        }
    }
}

/// Headers on every response, one log line per request, and every line
/// logged while answering it in a span with the request's id (Lambda's
/// own, in Lambda), which the response states as `X-Request-Id`.
async fn common_headers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use lambda_http::RequestExt;
    use tracing::Instrument;
    let id = req
        .lambda_context_ref()
        .map(|context| context.request_id.clone())
        .unwrap_or_else(|| state.request_ids.next());
    let span = tracing::info_span!("request", id = %id);
    let mut line = RequestLine {
        span: span.clone(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        started: Instant::now(),
        metrics: state.metrics.clone(),
        answered: false,
    };
    let mut response = next.run(req).instrument(span).await;
    response
        .headers_mut()
        .insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    // Stated on every response: the Lambda runtime and kept-open client
    // connections (containerd) rely on it. HEAD responses set their own.
    if !response.headers().contains_key(header::CONTENT_LENGTH) {
        if let Some(len) = axum::body::HttpBody::size_hint(response.body()).exact() {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    // No answer is ever to be read as another type than it says.
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let status = response.status().as_u16();
    let code = response.extensions().get::<error::ErrorCode>().map(|c| c.0);
    line.write(status, code);
    response
}

/// A JSON body with its length stated.
fn json_response(body: Vec<u8>) -> Response {
    let len = body.len();
    let mut response = (StatusCode::OK, Body::from(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}
