//! Blobs (layers and configs) by digest. GET answers with the bytes, or a
//! 307 redirect when storage hands out URLs; HEAD answers from storage
//! metadata (a URL presigned for GET does not sign HEAD). A missing blob is
//! 404 `BLOB_UNKNOWN`, never an empty 200, and never the store's own error
//! behind a redirect: before redirecting, a blob no manifest served by this
//! instance names is looked up (one HEAD); a named one is redirected at once.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::io::ReaderStream;

use super::{AppState, RegistryError, DIGEST_HEADER};
use crate::oci::{digest, name};
use crate::storage::keys::BlobKey;
use crate::storage::Download;

pub(super) async fn get(
    state: &AppState,
    name: &str,
    reference: &str,
    head: bool,
) -> Result<Response, RegistryError> {
    name::validate_name(name).map_err(RegistryError::NameInvalid)?;
    let hex = digest::parse(reference)?;
    let key = BlobKey::of(hex);
    let unknown = || RegistryError::BlobUnknown {
        digest: reference.to_string(),
    };

    if head {
        let size = state.storage.head(&key).await?.ok_or_else(unknown)?;
        return Ok(blob_response(Body::empty(), size, reference));
    }
    match state.storage.download(&key).await?.ok_or_else(unknown)? {
        // A URL is handed out without asking storage; a digest that no
        // served manifest names is checked first, so that a missing blob
        // gets this registry's 404, not the store's.
        Download::Url(url) => {
            let size = match state.images.known_blob_size(reference) {
                Some(size) => size,
                None => state.storage.head(&key).await?.ok_or_else(unknown)?,
            };
            state.metrics.blob_sent(size, true);
            let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
            let headers = response.headers_mut();
            if let Ok(location) = HeaderValue::from_str(&url) {
                headers.insert(header::LOCATION, location);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            if let Ok(digest) = HeaderValue::from_str(reference) {
                headers.insert(DIGEST_HEADER, digest);
            }
            Ok(response)
        }
        // Reads as large as the blob, up to 256 KiB: a small blob goes out
        // in one piece, with no large buffer to allocate.
        Download::Stream { size, body } => {
            state.metrics.blob_sent(size, false);
            Ok(blob_response(
                Body::from_stream(ReaderStream::with_capacity(
                    body,
                    size.clamp(1, 256 * 1024) as usize,
                )),
                size,
                reference,
            ))
        }
    }
}

fn blob_response(body: Body, size: u64, digest: &str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(value) = HeaderValue::from_str(digest) {
        headers.insert(DIGEST_HEADER, value);
    }
    response
}
