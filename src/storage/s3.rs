//! S3 storage: the key layout of [`crate::storage`] in one bucket, under an
//! optional prefix.
//!
//! * Small objects (records, manifests, configs) are single PUTs, which S3
//!   makes visible atomically.
//! * Files (layers) are uploaded straight to their content address, in
//!   parts when they are large; S3 shows an object only once its upload is
//!   complete, and a crash leaves only an unfinished multipart upload, which
//!   a lifecycle rule aborts. The bytes are hashed as they are read for
//!   upload: a file that is not what its key names is never completed, and
//!   the sha256 kept as object metadata (`x-amz-meta-sha256`, for
//!   [`Storage::check`]) is the hash of the bytes sent. The upload is
//!   conditional: `If-None-Match: *` creates (an object already there
//!   wins); `If-Match: <etag>` replaces only the version `check` found
//!   damaged, by its ETag. This code never writes over a good object; the
//!   template's policy allows content-addressed writes only with one of
//!   these headers, so no upload without them succeeds either.
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
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::{check_key, check_prefix, Check, Download, ETag, Listed, Storage, StorageError};

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

    /// Uploads a local file straight to `full` (S3 shows an object only
    /// once its upload is complete), in parts if it is large. The bytes
    /// are hashed as they are read to be sent, and the upload is never
    /// completed unless they are what `key` names; that hash is recorded
    /// as object metadata for [`Storage::check`]. The write is
    /// conditional: `false` if the precondition failed (the object
    /// exists, or is not the version found damaged).
    async fn upload(
        &self,
        key: &str,
        full: &str,
        file: &Path,
        precondition: &Precondition<'_>,
    ) -> Result<bool, StorageError> {
        let io = |source: std::io::Error| StorageError::Io {
            key: key.to_string(),
            source,
        };
        let size = tokio::fs::metadata(file).await.map_err(io)?.len();
        within_max_object(key, size)?;
        let (if_none_match, if_match) = precondition.headers();
        if size <= PART_SIZE {
            // The bytes hashed are the bytes sent (and sent again on a retry).
            let data = Bytes::from(tokio::fs::read(file).await.map_err(io)?);
            let found = crate::oci::digest::sha256_hex(&data);
            super::is_its_digest(key, &found)?;
            let put = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(full)
                .set_metadata(digest_metadata(&found))
                .set_if_none_match(if_none_match)
                .set_if_match(if_match)
                .body(ByteStream::from(data))
                .send()
                .await;
            return match put {
                Ok(_) => Ok(true),
                Err(e) if status(&e) == Some(412) => Ok(false),
                Err(e) => Err(s3_error(key, "PutObject", e)),
            };
        }
        // The metadata is set when the upload starts, so it is the digest
        // the key claims; the upload completes only if the bytes sent have it.
        let claimed = super::claimed_digest(key)?;
        let upload_id = self
            .start_upload(key, full, digest_metadata(claimed))
            .await?;
        let parts = match self.upload_parts(key, full, &upload_id, file, size).await {
            Ok((parts, found)) => match super::is_its_digest(key, &found) {
                Ok(()) => parts,
                Err(e) => {
                    self.abort(full, &upload_id).await;
                    return Err(e);
                }
            },
            Err(e) => {
                self.abort(full, &upload_id).await;
                return Err(e);
            }
        };
        let completed = self
            .complete_upload(key, full, &upload_id, parts, Some(precondition))
            .await;
        if !matches!(completed, Ok(true)) {
            self.abort(full, &upload_id).await;
        }
        completed
    }

    /// CreateMultipartUpload of `full`, with `metadata`: its upload id.
    async fn start_upload(
        &self,
        key: &str,
        full: &str,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<String, StorageError> {
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .set_metadata(metadata)
            .send()
            .await
            .map_err(|e| s3_error(key, "CreateMultipartUpload", e))?;
        Ok(upload.upload_id().unwrap_or_default().to_string())
    }

    /// CompleteMultipartUpload of `parts`, under `precondition` if there is
    /// one: `false` if it failed (412), and then the upload is left for
    /// the caller to abort.
    async fn complete_upload(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        precondition: Option<&Precondition<'_>>,
    ) -> Result<bool, StorageError> {
        let (if_none_match, if_match) = precondition.map(Precondition::headers).unwrap_or_default();
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
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
            Err(e) if status(&e) == Some(412) => Ok(false),
            Err(e) => Err(s3_error(key, "CompleteMultipartUpload", e)),
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

    /// The parts of a multipart upload: read from the file in order and
    /// hashed as they are read, each sent as the bytes that were hashed,
    /// a few at a time. The parts, and the sha256 of all the bytes sent.
    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        file: &Path,
        size: u64,
    ) -> Result<(Vec<CompletedPart>, String), StorageError> {
        use sha2::Digest;
        use tokio::io::AsyncReadExt;
        let part_size = part_size(size);
        let count = size.div_ceil(part_size);
        // At most about PARALLEL_PARTS x PART_SIZE bytes in memory.
        let parallel = (PARALLEL_PARTS as u64 * PART_SIZE / part_size).max(1) as usize;
        let io = |source: std::io::Error| StorageError::Io {
            key: key.to_string(),
            source,
        };
        let mut reader = tokio::fs::File::open(file).await.map_err(io)?;
        let mut hash = sha2::Sha256::new();
        let mut in_flight = std::collections::VecDeque::new();
        let mut parts = Vec::with_capacity(count as usize);
        let result = async {
            for i in 0..count {
                let length = part_size.min(size - i * part_size) as usize;
                let mut bytes = vec![0; length];
                reader.read_exact(&mut bytes).await.map_err(io)?;
                hash.update(&bytes);
                let number = i as i32 + 1;
                let send = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(bytes))
                    .send();
                // A task of its own, so it goes on while the next part is read.
                in_flight.push_back((number, tokio::spawn(send)));
                if in_flight.len() >= parallel {
                    let (number, task) = in_flight.pop_front().expect("not empty");
                    parts.push(finished_part(key, number, task).await?);
                }
            }
            while let Some((number, task)) = in_flight.pop_front() {
                parts.push(finished_part(key, number, task).await?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            for (_, task) in in_flight {
                task.abort();
            }
            return Err(e);
        }
        Ok((parts, hex::encode(hash.finalize())))
    }
}

/// Parts of a streamed upload: the least S3 takes but for the last part,
/// with room to spare. Memory holds about three (the writer's, one in the
/// channel, the one being sent).
const STREAM_PART: usize = 8 << 20;
/// What one UploadPartCopy copies of a staged object at most.
const COPY_PART: u64 = 1 << 30;

impl S3Storage {
    /// The multipart upload of a streamed object to `staging/`, one part
    /// as each arrives, two in flight; completed only once the writer
    /// finishes. A writer dropped unfinished, or any failure, aborts the
    /// upload: S3 keeps nothing of it, and nothing is left under
    /// `staging/`.
    async fn stream_to_staging(
        self,
        mut parts: super::Parts,
    ) -> Result<super::Staged, StorageError> {
        let key = super::keys::StagingKey::unique("layer").to_string();
        let full = self.full(&key)?;
        let upload_id = self.start_upload(&key, &full, None).await?;
        let mut in_flight = std::collections::VecDeque::new();
        let mut completed = Vec::new();
        let mut size = 0u64;
        let sent = async {
            let mut number = 0i32;
            loop {
                let bytes = match parts.next().await {
                    super::Next::Part(bytes) => bytes,
                    super::Next::End => break,
                    super::Next::Abandoned => {
                        return Err(StorageError::Abandoned { key: key.clone() })
                    }
                };
                number += 1;
                if number as u64 > MAX_PARTS {
                    return Err(StorageError::TooLarge {
                        key: key.clone(),
                        size: number as u64 * STREAM_PART as u64,
                        limit: MAX_PARTS * STREAM_PART as u64,
                    });
                }
                size += bytes.len() as u64;
                let send = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(ByteStream::from(bytes))
                    .send();
                in_flight.push_back((number, tokio::spawn(send)));
                if in_flight.len() >= 2 {
                    let (number, task) = in_flight.pop_front().expect("not empty");
                    completed.push(finished_part(&key, number, task).await?);
                }
            }
            while let Some((number, task)) = in_flight.pop_front() {
                completed.push(finished_part(&key, number, task).await?);
            }
            if completed.is_empty() {
                return Err(StorageError::Backend {
                    key: key.clone(),
                    operation: "UploadPart",
                    message: "nothing was written".to_string(),
                });
            }
            // Unconditional: it completes, or fails.
            let parts = std::mem::take(&mut completed);
            match self
                .complete_upload(&key, &full, &upload_id, parts, None)
                .await?
            {
                true => Ok(()),
                false => Err(StorageError::Backend {
                    key: key.clone(),
                    operation: "CompleteMultipartUpload",
                    message: "precondition failed".to_string(),
                }),
            }
        }
        .await;
        match sent {
            Ok(()) => Ok(super::Staged { key, size }),
            Err(error) => {
                // A writer still writing learns at once that it is over.
                drop(parts);
                // Parts of an abandoned object are still being sent to a
                // working endpoint: they are waited for, since one that
                // landed after the abort would outlive it (until the
                // bucket's lifecycle rule). After a failure of S3 they are
                // cut short: their retries could take minutes.
                let abandoned = matches!(error, StorageError::Abandoned { .. });
                for (_, task) in in_flight {
                    if abandoned {
                        let _ = task.await;
                    } else {
                        task.abort();
                    }
                }
                self.abort(&full, &upload_id).await;
                Err(error)
            }
        }
    }
}

/// The part an upload task sent, or why it failed.
async fn finished_part(
    key: &str,
    number: i32,
    task: tokio::task::JoinHandle<
        Result<
            aws_sdk_s3::operation::upload_part::UploadPartOutput,
            SdkError<
                aws_sdk_s3::operation::upload_part::UploadPartError,
                aws_sdk_s3::config::http::HttpResponse,
            >,
        >,
    >,
) -> Result<CompletedPart, StorageError> {
    let sent = task.await.map_err(|e| StorageError::Backend {
        key: key.to_string(),
        operation: "UploadPart",
        message: e.to_string(),
    })?;
    let part = sent.map_err(|e| s3_error(key, "UploadPart", e))?;
    Ok(CompletedPart::builder()
        .part_number(number)
        .set_e_tag(part.e_tag().map(str::to_string))
        .build())
}

/// The object metadata that records a blob's digest.
fn digest_metadata(sha256: &str) -> Option<std::collections::HashMap<String, String>> {
    Some(std::collections::HashMap::from([(
        DIGEST_METADATA.to_string(),
        sha256.to_string(),
    )]))
}

/// `x-amz-meta-sha256`: the digest of a blob, recorded at upload.
const DIGEST_METADATA: &str = "sha256";

/// What a content-addressed write expects to find.
enum Precondition<'a> {
    /// Nothing: it creates (`If-None-Match: *`).
    Absent,
    /// The object found corrupt, by its ETag: it repairs (`If-Match`).
    Replacing { etag: &'a ETag },
}

impl Precondition<'_> {
    /// Its `If-None-Match` and `If-Match` headers.
    fn headers(&self) -> (Option<String>, Option<String>) {
        match self {
            Precondition::Absent => (Some("*".to_string()), None),
            Precondition::Replacing { etag } => (None, Some(etag.as_str().to_string())),
        }
    }
}

/// An object of `size` bytes is within S3's limit, or refused.
fn within_max_object(key: &str, size: u64) -> Result<(), StorageError> {
    if size > MAX_OBJECT {
        return Err(StorageError::TooLarge {
            key: key.to_string(),
            size,
            limit: MAX_OBJECT,
        });
    }
    Ok(())
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

    /// A staged object copied to `key` (see [`Storage::place_streamed`]).
    async fn copy_into_place(
        &self,
        staged: &super::Staged,
        key: &str,
        damaged: Option<&ETag>,
    ) -> Result<bool, StorageError> {
        let full = self.full(key)?;
        let source = format!("{}/{}", self.bucket, self.full(&staged.key)?);
        let claimed = super::claimed_digest(key)?;
        within_max_object(key, staged.size)?;
        let upload_id = self
            .start_upload(key, &full, digest_metadata(claimed))
            .await?;
        let copied = async {
            let mut parts = Vec::new();
            let mut start = 0u64;
            let mut number = 1i32;
            while start < staged.size || number == 1 {
                let end = (start + COPY_PART).min(staged.size);
                let copy = self
                    .client
                    .upload_part_copy()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .copy_source(&source)
                    .copy_source_range(format!("bytes={start}-{}", end.saturating_sub(1)))
                    .send()
                    .await
                    .map_err(|e| s3_error(key, "UploadPartCopy", e))?;
                let etag = copy
                    .copy_part_result()
                    .and_then(|r| r.e_tag())
                    .map(str::to_string);
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(etag)
                        .build(),
                );
                start = end;
                number += 1;
                if start >= staged.size {
                    break;
                }
            }
            let precondition = match damaged {
                None => Precondition::Absent,
                Some(etag) => Precondition::Replacing { etag },
            };
            self.complete_upload(key, &full, &upload_id, parts, Some(&precondition))
                .await
        }
        .await;
        if !matches!(copied, Ok(true)) {
            self.abort(&full, &upload_id).await;
        }
        copied
    }

    /// Uploads a file to `key` under a precondition; `false` if it failed.
    async fn store_file(
        &self,
        key: &str,
        file: &Path,
        precondition: &Precondition<'_>,
    ) -> Result<bool, StorageError> {
        let full = self.full(key)?;
        super::claimed_digest(key)?;
        self.upload(key, &full, file, precondition).await
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
            super::claimed_digest(key)?;
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

    async fn replace_file(
        &self,
        key: &str,
        file: &Path,
        damaged: &ETag,
    ) -> Result<(), StorageError> {
        let result = async {
            let replacing = Precondition::Replacing { etag: damaged };
            if self.store_file(key, file, &replacing).await? {
                Ok(())
            } else {
                Err(StorageError::Changed {
                    key: key.to_string(),
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
        // No digest recorded at upload: unverified, so damaged (see Check).
        let digest_ok = head
            .metadata()
            .and_then(|m| m.get(DIGEST_METADATA))
            .is_some_and(|recorded| recorded == hex);
        Ok(if size_ok && digest_ok {
            Check::Good
        } else {
            Check::Corrupt(ETag::new(head.e_tag().unwrap_or_default()))
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

    async fn begin_stream(&self) -> Result<Option<super::Streamed>, StorageError> {
        let (writer, parts) = super::PartWriter::new(STREAM_PART);
        let storage = self.clone();
        Ok(Some(super::Streamed {
            writer,
            upload: Box::pin(storage.stream_to_staging(parts)),
        }))
    }

    /// The staged object is copied into place by S3 itself (UploadPartCopy
    /// of ranges into a multipart upload of `key`, with the digest the
    /// writer computed as metadata), completed only under the
    /// precondition (`If-None-Match: *`, or `If-Match` the damaged
    /// version): the policy's conditional writes hold for streamed
    /// objects too. The staged object is deleted either way.
    async fn place_streamed(
        &self,
        staged: super::Staged,
        key: &str,
        damaged: Option<&ETag>,
    ) -> Result<bool, StorageError> {
        let placed = self.copy_into_place(&staged, key, damaged).await;
        self.discard_streamed(staged).await;
        placed
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

    /// A listing of the key itself, not a HeadObject: garbage collection
    /// asks this right before each delete, and its role may list the
    /// bucket but not read what it deletes (HeadObject needs
    /// `s3:GetObject`). The key sorts first among those it prefixes.
    async fn modified(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let full = self.full(key)?;
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| s3_error(key, "ListObjectsV2", e))?;
        Ok(page
            .contents()
            .iter()
            .find(|object| object.key() == Some(full.as_str()))
            .map(|object| object.last_modified().map_or(0, |t| t.secs().max(0) as u64)))
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
