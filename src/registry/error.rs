//! Registry errors: every failure a client can see, mapped in one place to
//! an HTTP status and an error code of the distribution spec ("Error Codes"
//! section), with the spec's body:
//!
//! ```json
//! {"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown packages: nope","detail":{"unknown":["nope"]}}]}
//! ```
//!
//! Client mistakes are 4xx. Internal details (paths, I/O errors) are logged
//! here, not sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::builder::Failure;
use crate::dispatch::DispatchError;
use crate::images::ImageError;
use crate::oci::digest::InvalidDigest;
use crate::oci::name::NameError;
use crate::source::SourceError;
use crate::storage::records::RecordError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid repository name: {0}")]
    NameInvalid(NameError),
    #[error("invalid tag: {0}")]
    TagInvalid(NameError),
    #[error(transparent)]
    DigestInvalid(#[from] InvalidDigest),
    #[error("blob {digest} is not known")]
    BlobUnknown { digest: String },
    #[error("{method} is not supported: this registry is pull-only")]
    Unsupported { method: String },
    #[error("no such endpoint: {path}")]
    NoRoute { path: String },
    #[error("authentication required: {reason}")]
    Unauthorized { reason: &'static str },
    /// Too many wrong passwords from one address: come back later.
    #[error("too many failed logins from this address; try again in {retry_after} s")]
    TooManyRequests { retry_after: u64 },
    /// A token request this registry does not answer.
    #[error("no token: {reason}")]
    TokenDenied { reason: &'static str },
    #[error("no build of image {key} is known")]
    BuildUnknown { key: String },
    /// A build that gave no image, with where its status can be watched.
    #[error("{error}")]
    Build {
        error: DispatchError,
        status_url: String,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl RegistryError {
    /// Status, spec error code, client-facing message and detail. Every
    /// variant chooses here; there is no catch-all.
    fn parts(&self) -> (StatusCode, &'static str, String, Value) {
        use RegistryError::*;
        match self {
            NameInvalid(e) => (
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                self.to_string(),
                json!({ "reason": e.to_string() }),
            ),
            TagInvalid(e) => (
                StatusCode::BAD_REQUEST,
                "TAG_INVALID",
                self.to_string(),
                json!({ "reason": e.to_string() }),
            ),
            DigestInvalid(e) => (
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                self.to_string(),
                json!({ "digest": e.digest }),
            ),
            BlobUnknown { digest } => (
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                self.to_string(),
                json!({ "digest": digest }),
            ),
            Unsupported { method } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                self.to_string(),
                json!({ "method": method }),
            ),
            NoRoute { path } => (
                StatusCode::NOT_FOUND,
                "UNSUPPORTED",
                self.to_string(),
                json!({ "path": path }),
            ),
            Unauthorized { .. } => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                self.to_string(),
                Value::Null,
            ),
            TooManyRequests { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                self.to_string(),
                json!({ "retry_after": retry_after }),
            ),
            TokenDenied { .. } => (
                StatusCode::FORBIDDEN,
                "DENIED",
                self.to_string(),
                Value::Null,
            ),
            BuildUnknown { key } => (
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                self.to_string(),
                json!({ "key": key }),
            ),
            // Nothing was built, so there is no status to point to.
            Build {
                error: error @ DispatchError::Busy { .. },
                ..
            } => build_parts(error),
            Build { error, status_url } => {
                let (status, code, message, mut detail) = build_parts(error);
                if detail.is_null() {
                    detail = json!({});
                }
                detail["status_url"] = json!(status_url);
                let message = format!("{message}; build status: {status_url}");
                (status, code, message, detail)
            }
            Image(e) => image_parts(e),
            Storage(_) => unavailable("storage"),
        }
    }
}

fn image_parts(error: &ImageError) -> (StatusCode, &'static str, String, Value) {
    match error {
        ImageError::NeedsCredentials => (
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "this image is not built yet, and building needs credentials".to_string(),
            Value::Null,
        ),
        ImageError::ManifestUnknown { reference } => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            error.to_string(),
            json!({ "reference": reference }),
        ),
        ImageError::Corrupt { digest, .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            format!("the stored manifest {digest} is damaged; the registry log has the details"),
            Value::Null,
        ),
        ImageError::Source(SourceError::UnknownRef { tag, .. }) => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            // The repository's URL stays out: it may carry a token.
            format!("tag {tag:?} is not a branch, tag or commit of the package source"),
            json!({ "tag": tag }),
        ),
        ImageError::Source(SourceError::NotReachable { rev, allowed, .. }) => (
            StatusCode::FORBIDDEN,
            "DENIED",
            format!(
                "revision {rev} is not on a branch or tag of the package source ({allowed}); \
                 this registry builds only those"
            ),
            json!({ "revision": rev }),
        ),
        ImageError::Source(SourceError::Git { .. }) => unavailable("package source"),
        ImageError::Storage(_) | ImageError::Record(RecordError::Storage(_)) => {
            unavailable("storage")
        }
        ImageError::Record(RecordError::Unreadable { .. }) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            "a stored record is damaged; the registry log has the details".to_string(),
            Value::Null,
        ),
        ImageError::Build { error, .. } => build_parts(error),
    }
}

/// The one mapping of a build's outcome to what the puller sees.
fn build_parts(error: &DispatchError) -> (StatusCode, &'static str, String, Value) {
    match error {
        DispatchError::Failed(failure @ Failure::UnknownPackages { names }) => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            failure.to_string(),
            json!({ "unknown": names }),
        ),
        DispatchError::Failed(failure @ Failure::TooLarge { size, limit }) => (
            StatusCode::FORBIDDEN,
            "DENIED",
            failure.to_string(),
            json!({ "size": size, "limit": limit }),
        ),
        // A 4xx, though the fault is not the client's: docker shows the
        // message (and so the status URL) of a 4xx only, and a build that
        // failed fails again until the failure TTL is over.
        DispatchError::Failed(failure @ Failure::Build { .. }) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN",
            failure.to_string(),
            Value::Null,
        ),
        DispatchError::Failed(failure @ Failure::NotInCache { what, cache }) => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            failure.to_string(),
            json!({ "missing": what, "cache": cache }),
        ),
        // The cache's data failed a check: like a failed build, the
        // image's failure (and a 4xx, whose message docker shows).
        DispatchError::Failed(failure @ Failure::CacheRefused { path, cache, .. }) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN",
            failure.to_string(),
            json!({ "path": path, "cache": cache }),
        ),
        DispatchError::Failed(failure @ Failure::CacheUnavailable { cache }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            failure.to_string(),
            json!({ "cache": cache }),
        ),
        DispatchError::Failed(failure @ Failure::Unassembled { .. }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            failure.to_string(),
            Value::Null,
        ),
        DispatchError::Failed(failure @ Failure::Indexing { system }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            failure.to_string(),
            json!({ "system": system }),
        ),
        DispatchError::StillBuilding { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("{error}; the build goes on: pull again in a minute"),
            Value::Null,
        ),
        DispatchError::Unavailable { service, .. } => unavailable(&service.to_string()),
        DispatchError::Busy { waiting } => (
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            format!("too many new images are waiting to be built ({waiting}); nothing was started: pull again in {BUSY_RETRY_AFTER} s"),
            json!({ "waiting": waiting, "retry_after": BUSY_RETRY_AFTER }),
        ),
    }
}

/// Seconds a client refused because the build queue is full is told to
/// wait: a slot frees when a build ends, which takes tens of seconds at
/// least.
pub const BUSY_RETRY_AFTER: u64 = 30;

/// A service the registry depends on failed; the client may retry.
fn unavailable(service: &str) -> (StatusCode, &'static str, String, Value) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        format!("the registry's {service} is unavailable; try again shortly"),
        Value::Null,
    )
}

/// The error code of an error response, for the request's log line and
/// metrics (in the response's extensions).
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code, message, detail) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = %self, code, "request failed");
        }
        let mut error = json!({ "code": code, "message": message });
        if !detail.is_null() {
            error["detail"] = detail;
        }
        let body = serde_json::to_vec(&json!({ "errors": [error] }))
            .expect("error bodies always serialise");
        let mut response = (status, body).into_response();
        response.extensions_mut().insert(ErrorCode(code));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(concat!("Basic realm=\"", "nixery", "\"")),
            );
        }
        // An error is about this moment (and may name the host asked).
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let retry_after = match (&self, status) {
            (RegistryError::TooManyRequests { retry_after }, _) => Some(*retry_after),
            // The build queue is full.
            (_, StatusCode::TOO_MANY_REQUESTS) => Some(BUSY_RETRY_AFTER),
            (_, StatusCode::SERVICE_UNAVAILABLE) => Some(5),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
