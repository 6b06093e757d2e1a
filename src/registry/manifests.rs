//! Manifests by tag (built on demand) and by digest (from storage), and the
//! tag list. GET and HEAD answer with the same headers: `Content-Type`,
//! `Content-Length` and `Docker-Content-Digest` (containerd HEADs by tag,
//! then GETs by that digest). A HEAD by tag joins or starts the one build
//! of its image, like a GET. What to serve is the image service's call
//! ([`crate::images`]); this module only speaks HTTP.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{json_response, AppState, RegistryError, DIGEST_HEADER};
use crate::images::{ImageError, Served};
use crate::oci::digest;
use crate::oci::manifest::{
    ImageIndex, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST,
};
use crate::oci::name::{self, ImageSpec, NameError};
use crate::storage::keys::ReferrersKey;

/// `headers`: the client's, for the host it reached (the build status URL
/// an unfinished or failed build's error gives) and the types it accepts.
pub(super) async fn get(
    state: &AppState,
    name: &str,
    reference: &str,
    head: bool,
    may_build: bool,
    headers: &HeaderMap,
) -> Result<Response, RegistryError> {
    name::validate_name(name).map_err(RegistryError::NameInvalid)?;
    let served = if reference.contains(':') {
        digest::parse(reference)?;
        state.images.by_digest(reference).await?
    } else {
        let spec = match state.images.settings().declared.get(name) {
            Some(declared) => {
                name::validate_tag(reference).map_err(RegistryError::TagInvalid)?;
                Ok(declared.spec(name, reference))
            }
            None => ImageSpec::parse(name, reference),
        };
        let spec = spec.map_err(|e| match e {
            NameError::BadTag { .. } => RegistryError::TagInvalid(e),
            NameError::Empty
            | NameError::TooLong { .. }
            | NameError::BadComponent { .. }
            | NameError::TooManyPackages { .. }
            | NameError::NoPackages { .. } => RegistryError::NameInvalid(e),
        })?;
        let served = state
            .images
            .get_or_build(&spec, reference, may_build, accepts_index(headers))
            .await
            .map_err(|e| match e {
                ImageError::Build { image_key, error } => RegistryError::Build {
                    error,
                    status_url: format!("{}/builds/{image_key}", state.base_url(headers)),
                },
                e => RegistryError::Image(e),
            })?;
        state.metrics.manifest_cache(served.cached);
        served
    };
    Ok(manifest_response(served, head))
}

/// Whether the client takes an image index: it names an index type (OCI's
/// or Docker's), `*/*`, or no type at all.
fn accepts_index(headers: &HeaderMap) -> bool {
    let mut types = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or_default().trim())
        .filter(|t| !t.is_empty())
        .peekable();
    types.peek().is_none()
        || types.any(|t| matches!(t, MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST | "*/*"))
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
    // A tag answers an index or one manifest, by what the client accepts.
    headers.insert(header::VARY, HeaderValue::from_static("accept"));
    if let Ok(value) = HeaderValue::from_str(&served.digest) {
        headers.insert(DIGEST_HEADER, value);
    }
    response
}

/// `GET /v2/<name>/referrers/<digest>` (distribution spec 1.1, "Listing
/// Referrers"): an image index of the artifact manifests whose subject is
/// that manifest (its SBOM), empty if none; `?artifactType=` filters it,
/// which `OCI-Filters-Applied` says.
pub(super) async fn referrers(
    state: &AppState,
    name: &str,
    reference: &str,
    query: Option<&str>,
) -> Result<Response, RegistryError> {
    name::validate_name(name).map_err(RegistryError::NameInvalid)?;
    let hex = digest::parse(reference)?;
    let stored = state.storage.get(&ReferrersKey::of(hex)).await?;
    let mut index = stored
        .and_then(|bytes| serde_json::from_slice::<ImageIndex>(&bytes).ok())
        .unwrap_or_else(|| ImageIndex::new(vec![]));
    let wanted = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "artifactType")
        .map(|(_, value)| value.into_owned());
    if let Some(wanted) = &wanted {
        index
            .manifests
            .retain(|m| m.artifact_type.as_deref() == Some(wanted.as_str()));
    }
    let mut response = json_response(index.to_bytes());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(MEDIA_TYPE_INDEX),
    );
    if wanted.is_some() {
        headers.insert(
            HeaderName::from_static("oci-filters-applied"),
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(response)
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
