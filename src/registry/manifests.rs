//! Manifests by tag (built on demand) and by digest (from storage), and the
//! tag list. GET and HEAD answer with the same headers: `Content-Type`,
//! `Content-Length` and `Docker-Content-Digest` (containerd HEADs by tag,
//! then GETs by that digest). A HEAD by tag joins or starts the one build
//! of its image, like a GET. What to serve is the image service's call
//! ([`crate::images`]); this module only speaks HTTP.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{json_response, AppState, RegistryError, DIGEST_HEADER};
use crate::images::{ImageError, Served};
use crate::oci::digest;
use crate::oci::manifest::MEDIA_TYPE_MANIFEST;
use crate::oci::name::{self, ImageSpec, NameError};

/// `base_url`: this registry as the client reached it, for the build
/// status URL an unfinished or failed build's error gives.
pub(super) async fn get(
    state: &AppState,
    name: &str,
    reference: &str,
    head: bool,
    may_build: bool,
    base_url: &str,
) -> Result<Response, RegistryError> {
    name::validate_name(name).map_err(RegistryError::NameInvalid)?;
    let served = if reference.contains(':') {
        digest::parse(reference)?;
        state.images.by_digest(reference).await?
    } else {
        let spec = ImageSpec::parse(name, reference).map_err(|e| match e {
            NameError::BadTag { .. } => RegistryError::TagInvalid(e),
            NameError::Empty
            | NameError::TooLong { .. }
            | NameError::BadComponent { .. }
            | NameError::TooManyPackages { .. }
            | NameError::NoPackages { .. } => RegistryError::NameInvalid(e),
        })?;
        let served = state
            .images
            .get_or_build(&spec, reference, may_build)
            .await
            .map_err(|e| match e {
                ImageError::Build { image_key, error } => RegistryError::Build {
                    error,
                    status_url: format!("{base_url}/builds/{image_key}"),
                },
                e => RegistryError::Image(e),
            })?;
        state.metrics.manifest_cache(served.cached);
        served
    };
    Ok(manifest_response(served, head))
}

fn manifest_response(served: Served, head: bool) -> Response {
    let len = served.bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(served.bytes)
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&served.media_type)
            .unwrap_or(HeaderValue::from_static(MEDIA_TYPE_MANIFEST)),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(value) = HeaderValue::from_str(&served.digest) {
        headers.insert(DIGEST_HEADER, value);
    }
    response
}

/// Every name can be pulled as `latest`; other tags select a package
/// source revision, which a local package set does not have.
pub(super) async fn tags(name: &str) -> Result<Response, RegistryError> {
    name::validate_name(name).map_err(RegistryError::NameInvalid)?;
    let body = serde_json::json!({ "name": name, "tags": ["latest"] });
    Ok(json_response(
        serde_json::to_vec(&body).expect("tag lists always serialise"),
    ))
}
