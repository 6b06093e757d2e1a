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

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::build::BuildError;
use crate::image::NameError;
use crate::nix::NixError;
use crate::source::SourceError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid repository name: {0}")]
    NameInvalid(NameError),
    #[error("invalid tag: {0}")]
    TagInvalid(NameError),
    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    DigestInvalid { digest: String },
    #[error("manifest {reference} is not known")]
    ManifestUnknown { reference: String },
    #[error("blob {digest} is not known")]
    BlobUnknown { digest: String },
    #[error("{method} is not supported: this registry is pull-only")]
    Unsupported { method: String },
    #[error("no such endpoint: {path}")]
    NoRoute { path: String },
    #[error(transparent)]
    Build(Arc<BuildError>),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl RegistryError {
    /// Status, spec error code, client-facing message and detail.
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
            DigestInvalid { digest } => (
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                self.to_string(),
                json!({ "digest": digest }),
            ),
            ManifestUnknown { reference } => (
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                self.to_string(),
                json!({ "reference": reference }),
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
            Build(e) => match &**e {
                BuildError::UnknownPackages(names) => (
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    format!("unknown packages: {}", names.join(", ")),
                    json!({ "unknown": names }),
                ),
                BuildError::Nix(NixError::Failed { command, message }) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    format!("building the image failed: {command}: {message}"),
                    Value::Null,
                ),
                BuildError::Nix(NixError::Timeout { command, seconds }) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    format!(
                        "building the image took too long: {command} was stopped after {seconds} s"
                    ),
                    Value::Null,
                ),
                BuildError::Storage(_) => unavailable(),
                BuildError::Failed(message) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    format!("building the image failed: {message}"),
                    Value::Null,
                ),
                BuildError::StillBuilding { .. } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    format!("{e}; the build goes on: pull again in a minute"),
                    Value::Null,
                ),
                BuildError::Queue { .. } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "the build queue is unavailable; try again shortly".to_string(),
                    Value::Null,
                ),
                _ => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "building the image failed on the server; the registry log has the details"
                        .to_string(),
                    Value::Null,
                ),
            },
            Storage(_) => unavailable(),
            Source(SourceError::UnknownRef { tag, .. }) => (
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                self.to_string(),
                json!({ "tag": tag }),
            ),
            Source(SourceError::Git { .. }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the package source could not be read; try again shortly".to_string(),
                Value::Null,
            ),
        }
    }
}

fn unavailable() -> (StatusCode, &'static str, String, Value) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        "the registry's storage is unavailable; try again shortly".to_string(),
        Value::Null,
    )
}

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
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}
