//! Manifests by tag (built on demand) and by digest (from storage), and the
//! tag list. GET and HEAD answer with the same headers: `Content-Type`,
//! `Content-Length` and `Docker-Content-Digest` (containerd HEADs by tag,
//! then GETs by that digest). A HEAD by tag joins or starts the one build
//! of its image, like a GET.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::{json_response, parse_digest, AppState, RegistryError, DIGEST_HEADER};
use crate::build::{hex_of, read_record, unix_now, BuildRequest, ImageRecord};
use crate::image::{self, ImageSpec, NameError};
use crate::manifest::{self, MEDIA_TYPE_MANIFEST};
use crate::storage;

pub(super) async fn get(
    state: &AppState,
    name: &str,
    reference: &str,
    head: bool,
) -> Result<Response, RegistryError> {
    image::validate_name(name).map_err(RegistryError::NameInvalid)?;
    if reference.contains(':') {
        let hex = parse_digest(reference)?;
        let bytes = state
            .storage
            .get(&storage::manifest_key(hex))
            .await?
            .ok_or_else(|| RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            })?;
        return Ok(manifest_response(
            bytes,
            reference,
            MEDIA_TYPE_MANIFEST,
            head,
        ));
    }

    let spec = ImageSpec::parse(name, reference).map_err(|e| match e {
        NameError::BadTag { .. } => RegistryError::TagInvalid(e),
        other => RegistryError::NameInvalid(other),
    })?;
    let resolved = state.sources.resolve(reference).await?;
    let mut request = BuildRequest::new(
        &spec,
        &resolved,
        state.layer_budget,
        &state.implicit_packages,
    );
    let record_key = storage::image_key(&request.image_key);
    let now = unix_now();
    let fresh = |record: &ImageRecord| {
        !resolved.moving || record.built_at + state.sources.ttl().as_secs() > now
    };
    let record = match read_record::<ImageRecord>(&*state.storage, &record_key).await {
        Ok(Some(record)) if fresh(&record) => record,
        Ok(stale) => {
            if stale.is_some() {
                // A moving source: anything built before the TTL is stale.
                request.not_before = (now + 1).saturating_sub(state.sources.ttl().as_secs());
            }
            tracing::info!(image = %request.image_key, spec = %spec, stale = stale.is_some(), "building");
            match state.dispatch.build(request).await {
                Ok(record) => {
                    state.activity.built(&spec, &record);
                    record
                }
                Err(error) => {
                    state.activity.failed(&spec, &error.to_string());
                    return Err(RegistryError::Build(error));
                }
            }
        }
        Err(e) => return Err(RegistryError::Build(std::sync::Arc::new(e))),
    };
    let hex = hex_of(&record.manifest_digest);
    let bytes = state
        .storage
        .get(&storage::manifest_key(hex))
        .await?
        .ok_or_else(|| RegistryError::ManifestUnknown {
            reference: record.manifest_digest.clone(),
        })?;
    Ok(manifest_response(
        bytes,
        &record.manifest_digest,
        &record.media_type,
        head,
    ))
}

fn manifest_response(bytes: Bytes, digest: &str, media_type: &str, head: bool) -> Response {
    debug_assert_eq!(manifest::sha256_digest(&bytes), digest);
    let len = bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media_type).unwrap_or(HeaderValue::from_static(MEDIA_TYPE_MANIFEST)),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(value) = HeaderValue::from_str(digest) {
        headers.insert(DIGEST_HEADER, value);
    }
    response
}

/// Every name can be pulled as `latest`; other tags select a package
/// source revision, which a local package set does not have.
pub(super) async fn tags(name: &str) -> Result<Response, RegistryError> {
    image::validate_name(name).map_err(RegistryError::NameInvalid)?;
    let body = serde_json::json!({ "name": name, "tags": ["latest"] });
    Ok(json_response(
        serde_json::to_vec(&body).expect("tag lists always serialise"),
    ))
}
