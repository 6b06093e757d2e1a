//! Reading a small file named by URL, whole: `http(s)://`, `file://` or
//! `s3://bucket/key` (with the standard AWS chain, or the configured S3
//! endpoint). Used at start for popularity data.

use std::time::Duration;

use crate::source::redact_urls;

/// The URL (a presigned or tokened one, perhaps) and the client's message
/// (which may quote it) are shown redacted: this error reaches the log.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {}", redact_urls(url), redact_urls(message))]
pub struct FetchError {
    pub url: String,
    pub message: String,
}

/// The bytes at `url`. `s3_endpoint` is the S3-compatible server to use
/// for `s3://` URLs, if not AWS.
pub async fn fetch(url: &str, s3_endpoint: Option<&str>) -> Result<Vec<u8>, FetchError> {
    let fail = |message: String| FetchError {
        url: url.to_string(),
        message,
    };
    if let Some(path) = url.strip_prefix("file://") {
        return tokio::fs::read(path).await.map_err(|e| fail(e.to_string()));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .ok_or_else(|| fail("expected s3://bucket/key".into()))?;
        let client = crate::storage::S3Storage::client(s3_endpoint).await;
        let object = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| fail(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?;
        return Ok(bytes.into_bytes().to_vec());
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("HTTP {}", response.status())));
        }
        return response
            .bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| fail(e.to_string()));
    }
    Err(fail("unsupported URL scheme".into()))
}
