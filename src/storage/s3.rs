//! S3 storage: the key layout of [`crate::storage`] in one bucket, under an
//! optional prefix.
//!
//! * Small objects (records, manifests, configs) are single PUTs, which S3
//!   makes visible atomically.
//! * Files (layers) are uploaded straight to their content address, in
//!   parts when they are large; S3 shows an object only once its upload is
//!   complete, and a crash leaves only an unfinished multipart upload, which
//!   a lifecycle rule aborts. The upload is conditional: `If-None-Match: *`
//!   creates (an object already there wins), `If-Match: <etag>` replaces
//!   only the object found corrupt. So a policy that allows content-addressed
//!   writes only with one of these headers (the template's) lets nothing
//!   overwrite a good blob. The blob's sha256 is kept as object metadata
//!   for [`Storage::check`].
//! * Conditional creates of records use `If-None-Match: *` (412 means "exists").
//! * Downloads are presigned GET URLs: answering a blob GET makes no S3 call.
//!
//! Transient errors are retried by the SDK's standard retry policy; the
//! client has connect and per-attempt timeouts, so a dead endpoint becomes
//! an error, never a hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{check_key, check_prefix, Check, Download, Listed, Storage, StorageError};

/// Files larger than this are uploaded in parts of this size.
pub const PART_SIZE: u64 = 16 * 1024 * 1024;
/// Parts uploaded at the same time.
const PARALLEL_PARTS: usize = 4;
/// S3's limits: parts in one upload, and the size of one object.
const MAX_PARTS: u64 = 10_000;
const MAX_OBJECT: u64 = 5 << 40;

/// The part size for an upload of `size` bytes: [`PART_SIZE`], or larger
/// (in whole MiB) where that would take more than S3's 10,000 parts, so
/// that any object S3 can hold (5 TiB) can be uploaded.
fn part_size(size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    PART_SIZE.max(size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB)
}

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    presign_ttl: Duration,
}

fn s3_error<E, R>(key: &str, operation: &'static str, error: SdkError<E, R>) -> StorageError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    StorageError::Backend {
        key: key.to_string(),
        operation,
        message: DisplayErrorContext(&error).to_string(),
    }
}

fn status<E, R: HttpStatus>(error: &SdkError<E, R>) -> Option<u16> {
    error.raw_response().map(HttpStatus::status_code)
}

/// The HTTP status of a raw SDK response.
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl S3Storage {
    /// `prefix` may be empty; slashes around it do not matter.
    pub fn new(
        client: Client,
        bucket: impl Into<String>,
        prefix: &str,
        presign_ttl: Duration,
    ) -> S3Storage {
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        S3Storage {
            client,
            bucket: bucket.into(),
            prefix,
            presign_ttl,
        }
    }

    /// A client for AWS, or for any S3-compatible server at `endpoint`
    /// (path-style addressing). Region and credentials come from the
    /// standard AWS chain.
    pub async fn client(endpoint: Option<&str>) -> Client {
        // A 16 MiB part has two minutes per try.
        let sdk = crate::aws::sdk_config(endpoint, Duration::from_secs(120), 4).await;
        let config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(endpoint.is_some())
            .build();
        Client::from_conf(config)
    }

    fn full(&self, key: &str) -> Result<String, StorageError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// Uploads a local file straight to `key` (S3 shows an object only once
    /// its upload is complete), in parts if it is large, recording its
    /// sha256 (if known) as object metadata for [`Storage::check`]. The
    /// write is conditional: `false` if the precondition failed (the object
    /// exists, or changed since it was found corrupt).
    async fn upload(
        &self,
        key: &str,
        file: &Path,
        size: u64,
        sha256: Option<&str>,
        precondition: &Precondition,
    ) -> Result<bool, StorageError> {
        let (if_none_match, if_match) = match precondition {
            Precondition::Absent => (Some("*".to_string()), None),
            Precondition::Replacing { etag } => (None, Some(etag.clone())),
        };
        if size > MAX_OBJECT {
            return Err(StorageError::TooLarge {
                key: key.to_string(),
                size,
                limit: MAX_OBJECT,
            });
        }
        if size <= PART_SIZE {
            let body = ByteStream::from_path(file)
                .await
                .map_err(|e| StorageError::Io {
                    key: key.to_string(),
                    source: std::io::Error::other(e),
                })?;
            let put = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .set_metadata(digest_metadata(sha256))
                .set_if_none_match(if_none_match)
                .set_if_match(if_match)
                .body(body)
                .send()
                .await;
            return match put {
                Ok(_) => Ok(true),
                Err(e) if status(&e) == Some(412) => Ok(false),
                Err(e) => Err(s3_error(key, "PutObject", e)),
            };
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(digest_metadata(sha256))
            .send()
            .await
            .map_err(|e| s3_error(key, "CreateMultipartUpload", e))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &upload_id, file, size).await;
        match result {
            Ok(parts) => {
                let completed = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .set_if_none_match(if_none_match)
                    .set_if_match(if_match)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await;
                match completed {
                    Ok(_) => Ok(true),
                    Err(e) if status(&e) == Some(412) => {
                        self.abort(key, &upload_id).await;
                        Ok(false)
                    }
                    Err(e) => {
                        self.abort(key, &upload_id).await;
                        Err(s3_error(key, "CompleteMultipartUpload", e))
                    }
                }
            }
            Err(e) => {
                self.abort(key, &upload_id).await;
                Err(e)
            }
        }
    }

    /// Drops an unfinished multipart upload (best effort: the bucket's
    /// lifecycle rule removes what is left).
    async fn abort(&self, key: &str, upload_id: &str) {
        let _ = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        file: &Path,
        size: u64,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let part_size = part_size(size);
        let count = size.div_ceil(part_size);
        let parts: Vec<Result<CompletedPart, StorageError>> = futures_util::stream::iter(0..count)
            .map(|i| async move {
                let offset = i * part_size;
                let length = part_size.min(size - offset);
                let body = ByteStream::read_from()
                    .path(file)
                    .offset(offset)
                    .length(Length::Exact(length))
                    .build()
                    .await
                    .map_err(|e| StorageError::Io {
                        key: key.to_string(),
                        source: std::io::Error::other(e),
                    })?;
                let number = i as i32 + 1;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| s3_error(key, "UploadPart", e))?;
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build())
            })
            .buffered(PARALLEL_PARTS)
            .collect()
            .await;
        parts.into_iter().collect()
    }
}

/// The object metadata that records a blob's digest.
fn digest_metadata(sha256: Option<&str>) -> Option<std::collections::HashMap<String, String>> {
    sha256.map(|hex| {
        std::collections::HashMap::from([(DIGEST_METADATA.to_string(), hex.to_string())])
    })
}

/// `x-amz-meta-sha256`: the digest of a blob, recorded at upload.
const DIGEST_METADATA: &str = "sha256";

/// What a content-addressed write expects to find.
enum Precondition {
    /// Nothing: it creates (`If-None-Match: *`).
    Absent,
    /// The object found corrupt, by its ETag: it repairs (`If-Match`).
    Replacing { etag: String },
}

impl S3Storage {
    /// HeadObject: the object's size, ETag and metadata; `None` if absent.
    async fn head_object(
        &self,
        key: &str,
    ) -> Result<Option<aws_sdk_s3::operation::head_object::HeadObjectOutput>, StorageError> {
        let full = self.full(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(output) => Ok(Some(output)),
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_not_found())
                    || status(&e) == Some(404) =>
            {
                Ok(None)
            }
            Err(e) => Err(s3_error(key, "HeadObject", e)),
        }
    }

    /// Uploads a file to `key` under a precondition; `false` if it failed.
    async fn store_file(
        &self,
        key: &str,
        file: &Path,
        precondition: &Precondition,
    ) -> Result<bool, StorageError> {
        let full = self.full(key)?;
        let size = tokio::fs::metadata(file)
            .await
            .map_err(|source| StorageError::Io {
                key: key.to_string(),
                source,
            })?
            .len();
        self.upload(&full, file, size, super::digest_of_key(key), precondition)
            .await
    }
}

#[async_trait]
impl Storage for S3Storage {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let full = self.full(key)?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(output) => {
                let data = output
                    .body
                    .collect()
                    .await
                    .map_err(|e| StorageError::Backend {
                        key: key.to_string(),
                        operation: "GetObject",
                        message: e.to_string(),
                    })?;
                Ok(Some(data.into_bytes()))
            }
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || status(&e) == Some(404) =>
            {
                Ok(None)
            }
            Err(e) => Err(s3_error(key, "GetObject", e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        Ok(self
            .head_object(key)
            .await?
            .map(|output| output.content_length().unwrap_or(0).max(0) as u64))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let full = self.full(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| s3_error(key, "PutObject", e))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let full = self.full(key)?;
        match self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(412) => Ok(false),
            Err(e) => Err(s3_error(key, "PutObject", e)),
        }
    }

    async fn put_file(&self, key: &str, file: &Path) -> Result<(), StorageError> {
        let result = async {
            // Create only: an object already in place is kept (and one
            // created meanwhile by another writer wins the race).
            if self.head(key).await?.is_some() {
                return Ok(());
            }
            self.store_file(key, file, &Precondition::Absent)
                .await
                .map(drop)
        }
        .await;
        let _ = tokio::fs::remove_file(file).await;
        result
    }

    async fn replace_file(&self, key: &str, file: &Path) -> Result<(), StorageError> {
        let result = async {
            let precondition = match self.head_object(key).await? {
                Some(head) => Precondition::Replacing {
                    etag: head.e_tag().unwrap_or_default().to_string(),
                },
                None => Precondition::Absent,
            };
            if self.store_file(key, file, &precondition).await? {
                Ok(())
            } else {
                Err(StorageError::Backend {
                    key: key.to_string(),
                    operation: "PutObject",
                    message: "the object changed while it was being repaired".to_string(),
                })
            }
        }
        .await;
        let _ = tokio::fs::remove_file(file).await;
        result
    }

    async fn check(&self, key: &str, size: u64, hex: &str) -> Result<Check, StorageError> {
        let Some(head) = self.head_object(key).await? else {
            return Ok(Check::Absent);
        };
        let size_ok = head.content_length().map(|l| l as u64) == Some(size);
        let recorded = head
            .metadata()
            .and_then(|m| m.get(DIGEST_METADATA))
            .map(String::as_str);
        let digest_ok = recorded.is_none_or(|recorded| recorded == hex);
        Ok(if size_ok && digest_ok {
            Check::Good
        } else {
            Check::Corrupt
        })
    }

    async fn download(&self, key: &str) -> Result<Option<Download>, StorageError> {
        let full = self.full(key)?;
        let presigning =
            PresigningConfig::expires_in(self.presign_ttl).map_err(|e| StorageError::Backend {
                key: key.to_string(),
                operation: "presign",
                message: e.to_string(),
            })?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .presigned(presigning)
            .await
            .map_err(|e| s3_error(key, "presign GetObject", e))?;
        Ok(Some(Download::Url(request.uri().to_string())))
    }

    fn local_staging_dir(&self) -> Option<PathBuf> {
        None
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        check_prefix(prefix)?;
        let full = format!("{}{prefix}", self.prefix);
        let mut found = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error(prefix, "ListObjectsV2", e))?;
            for object in page.contents() {
                let Some(key) = object
                    .key()
                    .and_then(|k| k.strip_prefix(self.prefix.as_str()))
                else {
                    continue;
                };
                found.push(Listed {
                    key: key.to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    modified: object.last_modified().map_or(0, |t| t.secs().max(0) as u64),
                });
            }
        }
        Ok(found)
    }

    async fn modified(&self, key: &str) -> Result<Option<u64>, StorageError> {
        Ok(self
            .head_object(key)
            .await?
            .map(|head| head.last_modified().map_or(0, |t| t.secs().max(0) as u64)))
    }

    async fn list_first(&self, prefix: &str, max: usize) -> Result<Vec<Listed>, StorageError> {
        check_prefix(prefix)?;
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .max_keys(max.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| s3_error(prefix, "ListObjectsV2", e))?;
        Ok(page
            .contents()
            .iter()
            .filter_map(|object| {
                let key = object.key()?.strip_prefix(self.prefix.as_str())?;
                Some(Listed {
                    key: key.to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    modified: object.last_modified().map_or(0, |t| t.secs().max(0) as u64),
                })
            })
            .take(max)
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let full = self.full(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| s3_error(key, "DeleteObject", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_that_any_object_fits_in_ten_thousand() {
        assert_eq!(part_size(1), PART_SIZE);
        assert_eq!(part_size(MAX_PARTS * PART_SIZE), PART_SIZE);
        let big = part_size(MAX_PARTS * PART_SIZE + 1);
        assert!(big > PART_SIZE && big.is_multiple_of(1 << 20));
        for size in [100 << 30, 1 << 40, MAX_OBJECT] {
            let part = part_size(size);
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}");
            // S3's largest part is 5 GiB.
            assert!(part <= 5 << 30, "{size}");
        }
    }
}
