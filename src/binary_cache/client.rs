//! [`BinaryCache`]: narinfos, closures and verified NAR streams from one
//! binary cache (`http://`, `https://` or `file://`), following Nix's
//! `libstore/binary-cache-store.cc` and `http-binary-cache-store.cc`.
//!
//! - [`BinaryCache::narinfo`] fetches `<hash>.narinfo`, parses it
//!   ([`super::narinfo`]), refuses it unless its `StorePath` is the path
//!   asked for, and verifies its signature ([`super::signature`]). A 404
//!   (also 403 and 410, which S3 answers for a missing key, as Nix treats
//!   them) is [`CacheError::NotFound`]: the path is not in this cache.
//!   For a NAR only 404 and 410 are: a 403 for the NAR of a narinfo the
//!   cache just gave means credentials or a policy in the way.
//! - [`BinaryCache::closure`] follows `References` from the roots, up to
//!   [`CacheOptions::concurrency`] narinfos at a time; it stops with an
//!   error as soon as the paths found exceed [`CacheOptions::max_paths`] or
//!   their NarSize total exceeds [`CacheOptions::max_nar_size`], before any
//!   NAR is downloaded.
//! - [`BinaryCache::nar`] opens a NAR file; [`NarStream::into_reader`]
//!   makes it a blocking [`std::io::Read`] of the NAR, checked on the way
//!   ([`super::reader`]): a mismatch, a truncation or corrupt compressed
//!   data is an error from a read, at the latest the final one (the one
//!   that would return 0), so a consumer that packs a layer while reading
//!   fails before it commits. A reader stops at its next read, with
//!   [`CacheError::Cancelled`], once a flag given to
//!   [`NarStream::cancel_on`] is set, or once the future of
//!   [`BinaryCache::with_nar`] is dropped; its download stops then too.
//!
//! Connection errors, timeouts, 5xx, 408 and 429 are retried
//! ([`CacheOptions::attempts`], with doubling backoff), then are
//! [`CacheError::Unavailable`]; other answers are not retried (any other
//! status is [`CacheError::Http`]). A NAR body cut off, stalled, or not
//! whole by its deadline is [`CacheError::Io`].
//! [`CacheError::is_unavailable`] is true of these three, the cache
//! failing rather than lying, and false of everything a check refuses.
//! Each request has [`CacheOptions::request_timeout`] to answer, and a NAR
//! body that long between two pieces, and [`CacheOptions::nar_deadline_base`]
//! plus its size at [`CacheOptions::nar_min_rate`] in all. Every error
//! names the store path and the cache URL (without any `user:password`,
//! which is sent as HTTP basic auth). A query string in the cache URL
//! (`?priority=40`, Nix's store settings) is not sent.
//! Redirects are followed as [`super::network`] allows; one it does not
//! is [`CacheError::Redirect`], which is not retried.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use reqwest::{StatusCode, Url};
use tokio::io::AsyncReadExt;

use super::error::CacheError;
use super::narinfo::{NarInfo, NarInfoError, NarInfoLimits};
use super::network::{describe, is_inward, redirect_policy, OutwardResolver};
use super::reader::{max_file_size, Body, BodyLimits, NarReader, NarStream, SetOnDrop};
use super::signature::TrustedKeys;
use super::store_path::StorePath;

/// How a [`BinaryCache`] behaves and what it may spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// Time for a request to be answered, and for each piece of a NAR body.
    pub request_timeout: Duration,
    /// A NAR body must arrive whole within this plus its size at
    /// [`CacheOptions::nar_min_rate`]: a cache that trickles, each piece
    /// just within [`CacheOptions::request_timeout`], cannot hold a reader
    /// (and its blocking thread) for ever.
    pub nar_deadline_base: Duration,
    /// The slowest NAR download allowed, in bytes per second.
    pub nar_min_rate: u64,
    /// A NAR of at least this many bytes is decompressed and checked on a
    /// thread of its own, a few pieces ahead of its reader, so that a core
    /// the reader leaves free does that work (see [`NarStream::into_reader`]).
    pub pipe_from: u64,
    /// Tries of a request that fails transiently (at least 1).
    pub attempts: u32,
    /// The wait before the first retry; doubled before each next one, up
    /// to 10 s.
    pub backoff: Duration,
    /// Narinfos fetched at a time by [`BinaryCache::closure`].
    pub concurrency: usize,
    /// The most paths a closure may have.
    pub max_paths: usize,
    /// The most NAR bytes (NarSize summed) a closure may have.
    pub max_nar_size: u64,
    pub narinfo: NarInfoLimits,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            request_timeout: Duration::from_secs(30),
            nar_deadline_base: Duration::from_secs(60),
            nar_min_rate: 1 << 20,
            pipe_from: 1 << 20,
            attempts: 4,
            backoff: Duration::from_millis(250),
            concurrency: 16,
            max_paths: 10_000,
            max_nar_size: 16 << 30,
            narinfo: NarInfoLimits::default(),
        }
    }
}

/// A cache, its trusted keys and its options. Cheap to clone.
#[derive(Clone)]
pub struct BinaryCache {
    inner: Arc<Inner>,
}

struct Inner {
    location: Location,
    /// The URL for messages: no credentials, no query.
    shown: String,
    keys: TrustedKeys,
    options: CacheOptions,
}

enum Location {
    Http {
        /// Ends with `/`, so objects join under it.
        base: Url,
        client: reqwest::Client,
        credentials: Option<(String, Option<String>)>,
    },
    File {
        root: PathBuf,
    },
}

/// Statuses that say a narinfo is not in the cache: 404, and 403 and 410,
/// which S3 answers for a missing key (Nix treats all three so).
const NARINFO_MISSING: [StatusCode; 3] = [
    StatusCode::NOT_FOUND,
    StatusCode::FORBIDDEN,
    StatusCode::GONE,
];
/// Statuses that say a NAR is not in the cache. Its narinfo was just
/// there: a 401 or 403 now is credentials or a policy in the way (of a
/// CDN the cache redirects to, say), which is [`CacheError::Http`].
const NAR_MISSING: [StatusCode; 2] = [StatusCode::NOT_FOUND, StatusCode::GONE];

/// A transient failure (retried) or a final answer.
enum Attempt<T> {
    Done(Result<T, CacheError>),
    Retry(String),
}

impl BinaryCache {
    /// A cache at `url` (`http://`, `https://` or `file://`).
    pub fn new(
        url: &str,
        keys: TrustedKeys,
        options: CacheOptions,
    ) -> Result<BinaryCache, CacheError> {
        let invalid = |shown: &str, reason: String| CacheError::Url {
            url: shown.to_string(),
            reason,
        };
        let mut parsed = Url::parse(url).map_err(|e| invalid("", e.to_string()))?;
        parsed.set_query(None);
        parsed.set_fragment(None);
        let credentials =
            (!parsed.username().is_empty() || parsed.password().is_some()).then(|| {
                (
                    percent_decode(parsed.username()),
                    parsed.password().map(percent_decode),
                )
            });
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        let shown = parsed.as_str().trim_end_matches('/').to_string();
        if options.attempts == 0 || options.concurrency == 0 {
            return Err(invalid(
                &shown,
                "attempts and concurrency must be at least 1".into(),
            ));
        }
        let location = match parsed.scheme() {
            "http" | "https" => {
                if !parsed.path().ends_with('/') {
                    let path = format!("{}/", parsed.path());
                    parsed.set_path(&path);
                }
                let resolver = OutwardResolver {
                    own: parsed.host_str().unwrap_or_default().to_string(),
                    inward_allowed: is_inward(&parsed),
                };
                let client = reqwest::Client::builder()
                    .connect_timeout(options.request_timeout)
                    .dns_resolver(Arc::new(resolver))
                    .redirect(redirect_policy())
                    .build()
                    .map_err(|e| invalid(&shown, e.to_string()))?;
                Location::Http {
                    base: parsed,
                    client,
                    credentials,
                }
            }
            "file" => {
                if credentials.is_some() || parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid(&shown, "a file:// URL has no host or user".into()));
                }
                let root = parsed
                    .to_file_path()
                    .map_err(|()| invalid(&shown, "not a local path".into()))?;
                Location::File { root }
            }
            other => return Err(invalid(&shown, format!("unsupported scheme {other:?}"))),
        };
        Ok(BinaryCache {
            inner: Arc::new(Inner {
                location,
                shown,
                keys,
                options,
            }),
        })
    }

    /// The cache URL, without credentials or query.
    pub fn url(&self) -> &str {
        &self.inner.shown
    }

    pub fn options(&self) -> &CacheOptions {
        &self.inner.options
    }

    fn cache(&self) -> String {
        self.inner.shown.clone()
    }

    /// The verified narinfo of `path`.
    pub async fn narinfo(&self, path: &StorePath) -> Result<NarInfo, CacheError> {
        let object = format!("{}.narinfo", path.hash_part());
        let limits = &self.inner.options.narinfo;
        let text = self.fetch_small(path, &object, limits.max_bytes).await?;
        let info = NarInfo::parse(&text, limits).map_err(|source| CacheError::NarInfo {
            cache: self.cache(),
            path: path.clone(),
            source,
        })?;
        if &info.store_path != path {
            return Err(CacheError::WrongPath {
                cache: self.cache(),
                path: path.clone(),
                found: info.store_path,
            });
        }
        let key = self
            .inner
            .keys
            .verify(&info)
            .map_err(|source| CacheError::Signature {
                cache: self.cache(),
                path: path.clone(),
                source,
            })?;
        tracing::debug!(cache = %self.inner.shown, %path, key, "narinfo verified");
        Ok(info)
    }

    /// The verified narinfos of `roots` and everything they reference.
    pub async fn closure(&self, roots: &[StorePath]) -> Result<Closure, CacheError> {
        self.walk(roots, false).await
    }

    /// As [`BinaryCache::closure`], but a path the cache lacks is left
    /// out (with what only it refers to) instead of failing the walk, and
    /// counted in [`Closure::missing`]: for statistics over a whole
    /// package set, some of which a cache never holds (unfree packages,
    /// those that failed to build).
    pub async fn closure_of_what_it_holds(
        &self,
        roots: &[StorePath],
    ) -> Result<Closure, CacheError> {
        self.walk(roots, true).await
    }

    async fn walk(&self, roots: &[StorePath], skip_missing: bool) -> Result<Closure, CacheError> {
        let options = &self.inner.options;
        let mut seen: BTreeSet<StorePath> = BTreeSet::new();
        let mut queue: VecDeque<StorePath> = VecDeque::new();
        let mut closure = Closure::default();
        let discover =
            |path: &StorePath, seen: &mut BTreeSet<StorePath>, queue: &mut VecDeque<StorePath>| {
                if seen.insert(path.clone()) {
                    if seen.len() > options.max_paths {
                        return Err(CacheError::TooManyPaths {
                            cache: self.cache(),
                            path: path.clone(),
                            limit: options.max_paths,
                        });
                    }
                    queue.push_back(path.clone());
                }
                Ok(())
            };
        for root in roots {
            discover(root, &mut seen, &mut queue)?;
        }
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < options.concurrency {
                let Some(path) = queue.pop_front() else { break };
                in_flight.push(async move { self.narinfo(&path).await });
            }
            let Some(result) = in_flight.next().await else {
                break;
            };
            let info = match result {
                Ok(info) => info,
                Err(CacheError::NotFound { .. }) if skip_missing => {
                    closure.missing += 1;
                    continue;
                }
                Err(error) => return Err(error),
            };
            // Saturating: a hostile NarSize must not wrap the total.
            closure.nar_size = closure.nar_size.saturating_add(info.nar_size);
            if closure.nar_size > options.max_nar_size {
                return Err(CacheError::ClosureTooLarge {
                    cache: self.cache(),
                    path: info.store_path,
                    size: closure.nar_size,
                    limit: options.max_nar_size,
                });
            }
            for reference in &info.references {
                discover(reference, &mut seen, &mut queue)?;
            }
            closure.paths.insert(info.store_path.clone(), info);
        }
        Ok(closure)
    }

    /// Opens the NAR file of `info` (a narinfo this cache verified).
    pub async fn nar(&self, info: &NarInfo) -> Result<NarStream, CacheError> {
        let path = &info.store_path;
        // FileSize is not signed: bounded by what is, before any download,
        // since it bounds the download's bytes and time.
        let limit = max_file_size(info.nar_size);
        if let Some(file_size) = info.file_size.filter(|&size| size > limit) {
            return Err(CacheError::FileTooLarge {
                cache: self.cache(),
                path: path.clone(),
                file_size,
                nar_size: info.nar_size,
                limit,
            });
        }
        let body = match &self.inner.location {
            Location::File { root } => {
                let file = root.join(&info.url);
                match tokio::fs::File::open(&file).await {
                    Ok(f) => Body::File(f.into_std().await),
                    Err(e) => return Err(self.file_error(path, &info.url, e)),
                }
            }
            Location::Http { .. } => {
                let response = self
                    .with_retries(path, &info.url, || self.send(path, &info.url, &NAR_MISSING))
                    .await?;
                let options = &self.inner.options;
                let size = info.file_size.unwrap_or(limit);
                let at_min_rate = Duration::from_secs(size / options.nar_min_rate.max(1));
                Body::Http {
                    response,
                    limits: BodyLimits {
                        between_pieces: options.request_timeout,
                        whole: options.nar_deadline_base.saturating_add(at_min_rate),
                    },
                    // The body is pulled by a task of the runtime that
                    // opened it, wherever the reader ends up.
                    runtime: tokio::runtime::Handle::current(),
                }
            }
        };
        Ok(NarStream::new(
            body,
            info.clone(),
            self.cache(),
            self.inner.options.pipe_from,
        ))
    }

    /// Runs `consume` on a blocking thread with the verified NAR of `info`
    /// (see [`NarStream::into_reader`]). Dropping the future stops the
    /// reader at its next read ([`CacheError::Cancelled`]): the thread is
    /// not kept reading for nobody.
    pub async fn with_nar<T, F>(&self, info: &NarInfo, consume: F) -> Result<T, CacheError>
    where
        F: FnOnce(NarReader) -> T + Send + 'static,
        T: Send + 'static,
    {
        let abandoned = Arc::new(AtomicBool::new(false));
        let stream = self.nar(info).await?.cancel_on(abandoned.clone());
        let _abandon_on_drop = SetOnDrop(abandoned);
        match tokio::task::spawn_blocking(move || consume(stream.into_reader())).await {
            Ok(value) => Ok(value),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(CacheError::Io {
                cache: self.cache(),
                path: info.store_path.clone(),
                object: info.url.clone(),
                source: io::Error::other(e),
            }),
        }
    }

    /// A small object, whole, bounded by `max` bytes.
    async fn fetch_small(
        &self,
        path: &StorePath,
        object: &str,
        max: usize,
    ) -> Result<Vec<u8>, CacheError> {
        match &self.inner.location {
            Location::File { root } => {
                let file = root.join(object);
                let read = async {
                    let mut bytes = Vec::new();
                    let f = tokio::fs::File::open(&file).await?;
                    f.take(max as u64 + 1).read_to_end(&mut bytes).await?;
                    Ok::<_, io::Error>(bytes)
                };
                let bytes = read.await.map_err(|e| self.file_error(path, object, e))?;
                if bytes.len() > max {
                    return Err(self.too_large(path, max));
                }
                Ok(bytes)
            }
            Location::Http { .. } => {
                self.with_retries(path, object, || async {
                    let mut response = match self.send(path, object, &NARINFO_MISSING).await {
                        Attempt::Done(Ok(response)) => response,
                        Attempt::Done(Err(e)) => return Attempt::Done(Err(e)),
                        Attempt::Retry(reason) => return Attempt::Retry(reason),
                    };
                    if response.content_length().is_some_and(|n| n > max as u64) {
                        return Attempt::Done(Err(self.too_large(path, max)));
                    }
                    let mut bytes = Vec::new();
                    loop {
                        let timeout = self.inner.options.request_timeout;
                        match tokio::time::timeout(timeout, response.chunk()).await {
                            Err(_) => return Attempt::Retry(format!("no data for {timeout:?}")),
                            Ok(Err(e)) => return Attempt::Retry(describe(&e)),
                            Ok(Ok(None)) => return Attempt::Done(Ok(bytes)),
                            Ok(Ok(Some(chunk))) => {
                                if bytes.len() + chunk.len() > max {
                                    return Attempt::Done(Err(self.too_large(path, max)));
                                }
                                bytes.extend_from_slice(&chunk);
                            }
                        }
                    }
                })
                .await
            }
        }
    }

    /// One GET of `object`: its response if 2xx; `missing` are the
    /// statuses that say the cache lacks it.
    async fn send(
        &self,
        path: &StorePath,
        object: &str,
        missing: &[StatusCode],
    ) -> Attempt<reqwest::Response> {
        let Location::Http {
            base,
            client,
            credentials,
        } = &self.inner.location
        else {
            unreachable!("send is for HTTP caches");
        };
        let url = match base.join(object) {
            Ok(url) => url,
            Err(e) => {
                return Attempt::Done(Err(CacheError::Io {
                    cache: self.cache(),
                    path: path.clone(),
                    object: object.to_string(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, e),
                }))
            }
        };
        let mut request = client.get(url);
        if let Some((user, password)) = credentials {
            request = request.basic_auth(user, password.as_ref());
        }
        let timeout = self.inner.options.request_timeout;
        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => return Attempt::Retry(format!("no answer in {timeout:?}")),
            Ok(Err(e)) if e.is_redirect() => {
                return Attempt::Done(Err(CacheError::Redirect {
                    cache: self.cache(),
                    path: path.clone(),
                    object: object.to_string(),
                    reason: describe(&e),
                }))
            }
            Ok(Err(e)) => return Attempt::Retry(describe(&e)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Done(Ok(response));
        }
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            return Attempt::Retry(format!("HTTP {status}"));
        }
        if missing.contains(&status) {
            return Attempt::Done(Err(CacheError::NotFound {
                cache: self.cache(),
                path: path.clone(),
                object: object.to_string(),
            }));
        }
        Attempt::Done(Err(CacheError::Http {
            cache: self.cache(),
            path: path.clone(),
            object: object.to_string(),
            status: status.as_u16(),
        }))
    }

    async fn with_retries<T, F, Fut>(
        &self,
        path: &StorePath,
        object: &str,
        mut attempt: F,
    ) -> Result<T, CacheError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        let options = &self.inner.options;
        let mut backoff = options.backoff;
        let mut last = String::new();
        for n in 1..=options.attempts {
            match attempt().await {
                Attempt::Done(result) => return result,
                Attempt::Retry(reason) => {
                    tracing::warn!(
                        cache = %self.inner.shown, %path, object, attempt = n, %reason,
                        "binary cache request failed"
                    );
                    last = reason;
                }
            }
            if n < options.attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        Err(CacheError::Unavailable {
            cache: self.cache(),
            path: path.clone(),
            object: object.to_string(),
            attempts: options.attempts,
            reason: last,
        })
    }

    fn file_error(&self, path: &StorePath, object: &str, source: io::Error) -> CacheError {
        if source.kind() == io::ErrorKind::NotFound {
            CacheError::NotFound {
                cache: self.cache(),
                path: path.clone(),
                object: object.to_string(),
            }
        } else {
            CacheError::Io {
                cache: self.cache(),
                path: path.clone(),
                object: object.to_string(),
                source,
            }
        }
    }

    fn too_large(&self, path: &StorePath, limit: usize) -> CacheError {
        CacheError::NarInfo {
            cache: self.cache(),
            path: path.clone(),
            source: NarInfoError::TooLarge { limit },
        }
    }
}

impl std::fmt::Debug for BinaryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryCache")
            .field("url", &self.inner.shown)
            .field("keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

fn percent_decode(text: &str) -> String {
    let bytes: Vec<u8> = form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Every path of a closure, with its verified narinfo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    pub paths: BTreeMap<StorePath, NarInfo>,
    /// The NarSize total.
    pub nar_size: u64,
    /// Paths left out because the cache lacks them (only ever non-zero
    /// from [`BinaryCache::closure_of_what_it_holds`]).
    pub missing: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary_cache::decompress::Compression;
    use crate::binary_cache::nar::{self, Node};
    use crate::binary_cache::narinfo::Sha256Hash;
    use crate::binary_cache::network::MAX_REDIRECTS;
    use crate::binary_cache::signature::SignatureError;
    use crate::binary_cache::testing::{
        narinfo_text, sha256_nix32, store_path, test_key, TestCache, TestKey, TestNode,
    };
    use std::io::Read;
    use std::path::Path;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    use crate::binary_cache::testing::Server;

    fn file(contents: &str) -> TestNode {
        TestNode::File {
            executable: false,
            contents: contents.as_bytes().to_vec(),
        }
    }

    fn dir(entries: Vec<(&str, TestNode)>) -> TestNode {
        TestNode::Directory(
            entries
                .into_iter()
                .map(|(n, c)| (n.as_bytes().to_vec(), c))
                .collect(),
        )
    }

    /// hello -> bash -> (bash, libc); libc <-> libd (a cycle).
    struct Sample {
        cache: TestCache,
        hello: StorePath,
        all: BTreeMap<StorePath, NarInfo>,
    }

    fn sample(compression: Compression) -> Sample {
        let key = test_key();
        let [hello, bash, libc, libd] =
            ["hello-2.12", "bash-5.2", "libc-2.37", "libd-1.0"].map(store_path);
        let mut cache = TestCache::new();
        let mut all = BTreeMap::new();
        let contents = |name: &str| {
            dir(vec![
                ("big", file(&"x".repeat(100_000))),
                (
                    "bin",
                    dir(vec![(
                        name,
                        TestNode::File {
                            executable: true,
                            contents: format!("#!/bin/sh\necho {name}\n").into_bytes(),
                        },
                    )]),
                ),
                ("lib", TestNode::Symlink(b"../lib".to_vec())),
            ])
        };
        for (path, refs) in [
            (&hello, vec![&bash]),
            (&bash, vec![&bash, &libc]),
            (&libc, vec![&libd]),
            (&libd, vec![&libc]),
        ] {
            let info = cache.add(path, &contents(path.name()), &refs, compression, Some(&key));
            all.insert(path.clone(), info);
        }
        Sample { cache, hello, all }
    }

    fn trusted() -> TrustedKeys {
        TrustedKeys::parse(&test_key().public_key()).unwrap()
    }

    fn options() -> CacheOptions {
        CacheOptions {
            request_timeout: Duration::from_millis(500),
            attempts: 3,
            backoff: Duration::from_millis(10),
            ..CacheOptions::default()
        }
    }

    async fn http(cache: &TestCache, options: CacheOptions) -> (Server, BinaryCache) {
        let server = Server::start(cache).await;
        let client = BinaryCache::new(&server.url(), trusted(), options).unwrap();
        (server, client)
    }

    /// Walks the verified NAR of `info`; the summary, or the walk's error.
    async fn walk_nar(cache: &BinaryCache, info: &NarInfo) -> Result<nar::NarSummary, String> {
        let stream = cache.nar(info).await.map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || {
            nar::walk(stream.into_reader(), &mut |_: &Path, node: Node<'_>| {
                if let Node::File { contents, .. } = node {
                    io::copy(contents, &mut io::sink())?;
                }
                Ok(())
            })
        })
        .await
        .unwrap()
        .map_err(|e| match &e {
            nar::NarError::Read { source, .. } => CacheError::from_io(source)
                .map(|c| c.to_string())
                .unwrap_or_else(|| e.to_string()),
            _ => e.to_string(),
        })
    }

    #[tokio::test]
    async fn closure_follows_references_through_a_cycle_over_http_and_file() {
        for compression in [
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
            Compression::None,
        ] {
            let sample = sample(compression);
            let dir = tempfile::tempdir().unwrap();
            sample.cache.write_to(dir.path());
            let (server, over_http) = http(&sample.cache, options()).await;
            let file_url = format!("file://{}", dir.path().display());
            let on_disk = BinaryCache::new(&file_url, trusted(), options()).unwrap();
            for cache in [&over_http, &on_disk] {
                let closure = cache
                    .closure(std::slice::from_ref(&sample.hello))
                    .await
                    .unwrap();
                assert_eq!(closure.paths, sample.all, "{compression}");
                let total: u64 = sample.all.values().map(|i| i.nar_size).sum();
                assert_eq!(closure.nar_size, total);
                for info in closure.paths.values() {
                    let summary = walk_nar(cache, info).await.unwrap();
                    assert_eq!(summary.sha256, info.nar_hash);
                    assert_eq!(summary.size, info.nar_size);
                }
            }
            // Each narinfo was fetched once over HTTP, the cycle notwithstanding.
            let narinfos = server
                .requests()
                .iter()
                .filter(|r| r.ends_with(".narinfo"))
                .count();
            assert_eq!(narinfos, 4);
        }
    }

    #[tokio::test]
    async fn a_closure_of_what_it_holds_leaves_out_what_the_cache_lacks() {
        let sample = sample(Compression::Zstd);
        let dir = tempfile::tempdir().unwrap();
        sample.cache.write_to(dir.path());
        // libc is gone (and libd, which only libc refers to, with it), and
        // one root was never there.
        let libc = sample.all.keys().find(|p| p.name() == "libc-2.37").unwrap();
        std::fs::remove_file(dir.path().join(format!("{}.narinfo", libc.hash_part()))).unwrap();
        let absent = store_path("unfree-1.0");
        let cache = BinaryCache::new(
            &format!("file://{}", dir.path().display()),
            trusted(),
            options(),
        )
        .unwrap();
        let roots = [sample.hello.clone(), absent];
        assert!(matches!(
            cache.closure(&roots).await,
            Err(CacheError::NotFound { .. })
        ));
        let held = cache.closure_of_what_it_holds(&roots).await.unwrap();
        let names: Vec<&str> = held.paths.keys().map(|p| p.name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"hello-2.12") && names.contains(&"bash-5.2"));
        assert_eq!(held.missing, 2);
    }

    #[tokio::test]
    async fn with_nar_reads_on_a_blocking_thread() {
        let sample = sample(Compression::Xz);
        let (_server, cache) = http(&sample.cache, options()).await;
        let info = cache.narinfo(&sample.hello).await.unwrap();
        let mut bytes = cache
            .with_nar(&info, |mut reader| {
                let mut bytes = Vec::new();
                reader.read_to_end(&mut bytes).map(|_| bytes)
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bytes.len() as u64, info.nar_size);
        bytes.truncate(16);
        assert_eq!(&bytes[8..], b"nix-arch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_nar_reads_on_any_thread_and_stops_when_dropped() {
        let sample = sample(Compression::Zstd);
        let (server, cache) = http(&sample.cache, options()).await;
        let info = sample.all[&sample.hello].clone();
        let stream = cache.nar(&info).await.unwrap();
        // Not a runtime thread: the body still arrives.
        let read = std::thread::spawn(move || {
            io::copy(&mut stream.into_reader(), &mut io::sink()).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(read, info.nar_size);
        // A reader dropped after one read ends its download task.
        let stream = cache.nar(&info).await.unwrap();
        std::thread::spawn(move || {
            let mut reader = stream.into_reader();
            reader.read_exact(&mut [0; 100]).unwrap();
        })
        .join()
        .unwrap();
        assert_eq!(server.requests().len(), 2);
    }

    #[tokio::test]
    async fn a_missing_path_is_not_found() {
        let sample = sample(Compression::Xz);
        let (server, cache) = http(&sample.cache, options()).await;
        let missing = store_path("missing-1.0");
        let err = cache.narinfo(&missing).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "{missing} is not in {} ({}.narinfo not found)",
                server.url(),
                missing.hash_part()
            )
        );
        // Not retried.
        assert_eq!(server.requests().len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let on_disk = BinaryCache::new(
            &format!("file://{}", dir.path().display()),
            trusted(),
            options(),
        )
        .unwrap();
        assert!(on_disk.narinfo(&missing).await.unwrap_err().is_not_found());
    }

    /// Replaces the narinfo of `path` in `cache` by `edit` of it.
    fn edit_narinfo(cache: &mut TestCache, path: &StorePath, edit: impl FnOnce(&mut String)) {
        let name = format!("{}.narinfo", path.hash_part());
        let mut text = String::from_utf8(cache.files[&name].clone()).unwrap();
        edit(&mut text);
        cache.files.insert(name, text.into_bytes());
    }

    fn without_sigs(text: &mut String) {
        *text = text
            .lines()
            .filter(|l| !l.starts_with("Sig:"))
            .map(|l| format!("{l}\n"))
            .collect();
    }

    #[tokio::test]
    async fn an_unsigned_narinfo_is_refused() {
        let mut sample = sample(Compression::Xz);
        edit_narinfo(&mut sample.cache, &sample.hello, without_sigs);
        let (_server, cache) = http(&sample.cache, options()).await;
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(
            matches!(
                &err,
                CacheError::Signature {
                    source: SignatureError::Unsigned { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(sample.hello.as_str()), "{err}");
    }

    #[tokio::test]
    async fn a_signature_by_an_untrusted_key_is_refused() {
        let mut sample = sample(Compression::Xz);
        let stranger = TestKey::new("stranger-1", 9);
        let sig = stranger.sign(&sample.all[&sample.hello]);
        edit_narinfo(&mut sample.cache, &sample.hello, |text| {
            without_sigs(text);
            text.push_str(&format!("Sig: {sig}\n"));
        });
        let (_server, cache) = http(&sample.cache, options()).await;
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(
            matches!(
                &err,
                CacheError::Signature {
                    source: SignatureError::UntrustedKey { names, .. },
                    ..
                } if names == &["stranger-1".to_string()]
            ),
            "{err}"
        );
        // A key of the same name but other bytes does not verify either.
        let mut sample2 = self::sample(Compression::Xz);
        let impostor = TestKey::new(crate::binary_cache::testing::TEST_KEY_NAME, 9);
        let sig = impostor.sign(&sample2.all[&sample2.hello]);
        edit_narinfo(&mut sample2.cache, &sample2.hello, |text| {
            without_sigs(text);
            text.push_str(&format!("Sig: {sig}\n"));
        });
        let (_server2, cache2) = http(&sample2.cache, options()).await;
        assert!(matches!(
            cache2.narinfo(&sample2.hello).await.unwrap_err(),
            CacheError::Signature {
                source: SignatureError::Invalid { .. },
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_wrong_signature_is_refused() {
        let mut sample = sample(Compression::Xz);
        // A signed field changed after signing.
        let size = sample.all[&sample.hello].nar_size;
        edit_narinfo(&mut sample.cache, &sample.hello, |text| {
            *text = text.replace(
                &format!("NarSize: {size}"),
                &format!("NarSize: {}", size + 8),
            );
        });
        let (_server, cache) = http(&sample.cache, options()).await;
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(
            matches!(
                &err,
                CacheError::Signature {
                    source: SignatureError::Invalid { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_narinfo_for_another_path_is_refused() {
        let mut sample = sample(Compression::Xz);
        // The (validly signed) narinfo of bash, served as hello's.
        let bash = store_path("bash-5.2");
        let bash_info = sample.cache.files[&format!("{}.narinfo", bash.hash_part())].clone();
        sample
            .cache
            .files
            .insert(format!("{}.narinfo", sample.hello.hash_part()), bash_info);
        let (_server, cache) = http(&sample.cache, options()).await;
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        match &err {
            CacheError::WrongPath { path, found, .. } => {
                assert_eq!(path, &sample.hello);
                assert_eq!(found, &bash);
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn a_nar_with_another_nar_hash_fails_at_the_end_despite_a_valid_file_hash() {
        let sample = sample(Compression::Xz);
        let mut cache_files = sample.cache.clone();
        let info = sample.all[&sample.hello].clone();
        // Same size, one byte changed in a file; FileHash and FileSize (not
        // signed) describe the new file, so only NarHash can tell.
        let tampered = TestNode::Directory(vec![(
            b"bin".to_vec(),
            TestNode::File {
                executable: false,
                contents: vec![b'y'; 10],
            },
        )]);
        let mut other = TestCache::new();
        let other_info = other.add(&sample.hello, &tampered, &[], Compression::Xz, None);
        assert_ne!(other_info.nar_hash, info.nar_hash);
        let mut forged = info.clone();
        forged.url = other_info.url.clone();
        forged.file_hash = other_info.file_hash;
        forged.file_size = other_info.file_size;
        cache_files.files.insert(
            format!("{}.narinfo", sample.hello.hash_part()),
            narinfo_text(&forged),
        );
        cache_files
            .files
            .insert(other_info.url.clone(), other.files[&other_info.url].clone());
        // Make the NAR sizes equal so the hash is what differs.
        let mut forged_same_size = forged.clone();
        forged_same_size.nar_size = other_info.nar_size;
        forged_same_size.signatures = vec![test_key().sign(&forged_same_size)];
        let (_server, cache) = http(&cache_files, options()).await;
        let verified = cache.narinfo(&sample.hello).await.unwrap();
        assert_eq!(verified.nar_hash, info.nar_hash);
        let err = walk_nar(&cache, &verified).await.unwrap_err();
        assert!(err.contains("NarSize") || err.contains("NarHash"), "{err}");
        // And with the same size: NarHash.
        let stream = cache.nar(&forged_same_size).await.unwrap();
        let result = tokio::task::spawn_blocking(move || {
            let mut reader = stream.into_reader();
            let mut data = Vec::new();
            let result = reader.read_to_end(&mut data);
            (data.len(), result)
        })
        .await
        .unwrap();
        let error = result.1.unwrap_err();
        assert!(
            matches!(
                CacheError::from_io(&error),
                Some(CacheError::NarHash { .. })
            ),
            "{error}"
        );
        // Every byte came out before the error: the failure is the final read.
        assert_eq!(result.0 as u64, other_info.nar_size);
    }

    #[tokio::test]
    async fn a_nar_file_with_another_file_hash_is_refused() {
        let sample = sample(Compression::Zstd);
        let mut files = sample.cache.clone();
        edit_narinfo(&mut files, &sample.hello, |text| {
            let good = sample.all[&sample.hello].file_hash.unwrap().to_string();
            *text = text.replace(&good, &sha256_nix32(b"something else"));
        });
        let (_server, cache) = http(&files, options()).await;
        let info = cache.narinfo(&sample.hello).await.unwrap();
        let err = walk_nar(&cache, &info).await.unwrap_err();
        assert!(err.contains("FileHash"), "{err}");
        assert!(err.contains(sample.hello.as_str()), "{err}");
    }

    #[tokio::test]
    async fn a_truncated_nar_is_refused() {
        for compression in [Compression::Xz, Compression::None] {
            let sample = sample(compression);
            let info = &sample.all[&sample.hello];
            let mut files = sample.cache.clone();
            let whole = files.files[&info.url].clone();
            files
                .files
                .insert(info.url.clone(), whole[..whole.len() * 2 / 3].to_vec());
            let (_server, cache) = http(&files, options()).await;
            let err = walk_nar(&cache, info).await.unwrap_err();
            assert!(err.contains("FileSize"), "{compression}: {err}");

            // Truncated consistently (FileHash and FileSize of the short
            // file): the NAR itself is short.
            let short = whole[..whole.len() * 2 / 3].to_vec();
            let mut forged = info.clone();
            forged.file_size = Some(short.len() as u64);
            forged.file_hash = Some(Sha256Hash::parse(&sha256_nix32(&short)).unwrap());
            let err = walk_nar(&cache, &forged).await.unwrap_err();
            assert!(
                err.contains("truncated")
                    || err.contains("NarSize")
                    || err.contains("decompressing"),
                "{compression}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn trailing_bytes_after_the_compressed_stream_are_refused() {
        let sample = sample(Compression::Xz);
        let info = &sample.all[&sample.hello];
        let mut files = sample.cache.clone();
        let mut long = files.files[&info.url].clone();
        long.extend_from_slice(b"appended");
        files.files.insert(info.url.clone(), long);
        let (_server, cache) = http(&files, options()).await;
        let err = walk_nar(&cache, info).await.unwrap_err();
        assert!(
            err.contains("FileSize") || err.contains("decompressing"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_huge_references_list_is_refused() {
        let key = test_key();
        let root = store_path("root-1.0");
        let refs: Vec<StorePath> = (0..50).map(|i| store_path(&format!("dep-{i}"))).collect();
        let mut cache = TestCache::new();
        let ref_list: Vec<&StorePath> = refs.iter().collect();
        cache.add(
            &root,
            &file("root"),
            &ref_list,
            Compression::None,
            Some(&key),
        );
        for r in &refs {
            cache.add(r, &file("dep"), &[], Compression::None, Some(&key));
        }
        let limited = CacheOptions {
            narinfo: NarInfoLimits {
                max_references: 10,
                ..NarInfoLimits::default()
            },
            ..options()
        };
        let (_server, client) = http(&cache, limited).await;
        let err = client.narinfo(&root).await.unwrap_err();
        assert!(
            matches!(
                &err,
                CacheError::NarInfo {
                    source: NarInfoError::TooManyReferences {
                        count: 50,
                        limit: 10
                    },
                    ..
                }
            ),
            "{err}"
        );
        // Within the reference limit, the closure's path limit applies.
        let few_paths = CacheOptions {
            max_paths: 20,
            ..options()
        };
        let (server, client) = http(&cache, few_paths).await;
        let err = client
            .closure(std::slice::from_ref(&root))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CacheError::TooManyPaths { limit: 20, .. }),
            "{err}"
        );
        assert!(server.requests().len() <= 2, "{:?}", server.requests());
    }

    #[tokio::test]
    async fn a_closure_over_the_nar_size_limit_is_refused_before_any_nar_is_fetched() {
        let sample = sample(Compression::Xz);
        let total: u64 = sample.all.values().map(|i| i.nar_size).sum();
        let limit = total - 1;
        let limited = CacheOptions {
            max_nar_size: limit,
            concurrency: 1,
            ..options()
        };
        let (server, cache) = http(&sample.cache, limited).await;
        let err = cache
            .closure(std::slice::from_ref(&sample.hello))
            .await
            .unwrap_err();
        match &err {
            CacheError::ClosureTooLarge { size, limit: l, .. } => {
                assert_eq!(*size, total);
                assert_eq!(*l, limit);
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains(&total.to_string()), "{err}");
        assert!(err.to_string().contains(&limit.to_string()), "{err}");
        assert!(
            server.requests().iter().all(|r| r.ends_with(".narinfo")),
            "{:?}",
            server.requests()
        );
    }

    #[tokio::test]
    async fn server_errors_are_retried_until_an_answer() {
        let sample = sample(Compression::Xz);
        let (server, cache) = http(&sample.cache, options()).await;
        server.fail(2, 503);
        let info = cache.narinfo(&sample.hello).await.unwrap();
        assert_eq!(server.requests().len(), 3);
        // The NAR's opening is retried too (429: too many requests).
        server.fail(1, 429);
        walk_nar(&cache, &info).await.unwrap();
        assert_eq!(server.requests().len(), 5);
    }

    #[tokio::test]
    async fn a_failing_server_is_unavailable_after_the_retries() {
        let sample = sample(Compression::Xz);
        let (server, cache) = http(&sample.cache, options()).await;
        server.fail(usize::MAX, 500);
        let started = Instant::now();
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert_eq!(server.requests().len(), 3);
        assert!(started.elapsed() < Duration::from_secs(2));
        let text = err.to_string();
        assert!(text.contains(&server.url()), "{text}");
        assert!(text.contains(sample.hello.as_str()), "{text}");
        assert!(text.contains("HTTP 500"), "{text}");
    }

    #[tokio::test]
    async fn a_silent_server_is_unavailable_in_bounded_time() {
        let sample = sample(Compression::Xz);
        let quick = CacheOptions {
            request_timeout: Duration::from_millis(100),
            ..options()
        };
        let (server, cache) = http(&sample.cache, quick).await;
        server.state.hang.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        // 3 tries of 100 ms, 10 + 20 ms apart.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(server.requests().len(), 3);
        // Nothing listening at all: also unavailable.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let nobody = BinaryCache::new(&format!("http://{closed}"), trusted(), options()).unwrap();
        assert!(nobody
            .narinfo(&sample.hello)
            .await
            .unwrap_err()
            .is_unavailable());
    }

    #[tokio::test]
    async fn a_nar_cut_off_mid_body_is_the_cache_failing_not_lying() {
        for compression in [Compression::Xz, Compression::None] {
            let sample = sample(compression);
            let (server, cache) = http(&sample.cache, options()).await;
            *server.state.cut_after.lock().unwrap() = Some(100);
            let stream = cache.nar(&sample.all[&sample.hello]).await.unwrap();
            let error = tokio::task::spawn_blocking(move || {
                io::copy(&mut stream.into_reader(), &mut io::sink())
            })
            .await
            .unwrap()
            .unwrap_err();
            let error = CacheError::from_io(&error).expect("a cache error");
            assert!(matches!(error, CacheError::Io { .. }), "{error}");
            assert!(error.is_unavailable(), "{compression}: {error}");
        }
    }

    /// Waits (at most 5 s) for the server to have no NAR body in flight.
    async fn no_body_in_flight(server: &Server) -> bool {
        for _ in 0..100 {
            if server.state.bodies.load(Ordering::SeqCst) == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Reads the NAR of `info` to its end on a blocking thread.
    async fn read_all(stream: NarStream) -> io::Result<u64> {
        tokio::task::spawn_blocking(move || io::copy(&mut stream.into_reader(), &mut io::sink()))
            .await
            .unwrap()
    }

    /// What reading the whole NAR of `info` gives: its bytes, and the
    /// error that ended it, if one did.
    async fn read_whole(cache: &BinaryCache, info: &NarInfo) -> (Vec<u8>, Option<String>) {
        let stream = cache.nar(info).await.unwrap();
        tokio::task::spawn_blocking(move || {
            let mut reader = stream.into_reader();
            let mut bytes = Vec::new();
            // Small reads, so that pieces are split across them.
            let mut buf = [0; 1000];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return (bytes, None),
                    Ok(n) => bytes.extend_from_slice(&buf[..n]),
                    Err(e) => {
                        let shown = CacheError::from_io(&e).map(|c| c.to_string());
                        // A later read repeats the error.
                        assert!(reader.read(&mut buf).is_err());
                        return (bytes, Some(shown.unwrap_or_else(|| e.to_string())));
                    }
                }
            }
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_piped_nar_reads_the_same_bytes_and_errors_as_a_direct_one() {
        for compression in [Compression::Xz, Compression::None] {
            let sample = sample(compression);
            let server = Server::start(&sample.cache).await;
            let client = |pipe_from| {
                let options = CacheOptions {
                    pipe_from,
                    ..options()
                };
                BinaryCache::new(&server.url(), trusted(), options).unwrap()
            };
            let (direct, piped) = (client(u64::MAX), client(0));
            let info = sample.all[&sample.hello].clone();
            let mut forged = info.clone();
            forged.nar_hash = Sha256Hash([7; 32]);
            let half = info.file_size.unwrap() as usize / 2;
            for (case, info, cut) in [
                ("whole", &info, None),
                ("cut off", &info, Some(half)),
                ("another NarHash", &forged, None),
            ] {
                *server.state.cut_after.lock().unwrap() = cut;
                let (d_bytes, d_error) = read_whole(&direct, info).await;
                let (p_bytes, p_error) = read_whole(&piped, info).await;
                assert_eq!(d_error, p_error, "{compression}, {case}");
                // Cut off, how much of its last output a decoder gives
                // before the error depends on the room it is given: the
                // counts may differ, the bytes never.
                let shorter = d_bytes.len().min(p_bytes.len());
                assert!(
                    d_bytes[..shorter] == p_bytes[..shorter],
                    "{compression}, {case}"
                );
                if case != "cut off" {
                    assert_eq!(d_bytes.len(), p_bytes.len(), "{compression}, {case}");
                }
                match case {
                    "whole" => assert_eq!(p_bytes.len() as u64, info.nar_size),
                    _ => assert!(p_error.is_some(), "{compression}, {case}"),
                }
                if case == "another NarHash" {
                    // Every byte before the error, which is the last read.
                    assert_eq!(p_bytes.len() as u64, info.nar_size);
                    assert!(p_error.unwrap().contains("NarHash"));
                }
            }
        }
    }

    #[tokio::test]
    async fn a_trickling_nar_is_unavailable_by_its_deadline() {
        let sample = sample(Compression::None);
        let strict = CacheOptions {
            nar_deadline_base: Duration::from_millis(300),
            // The size adds nothing: the deadline is the base alone.
            nar_min_rate: u64::MAX,
            ..options()
        };
        let (server, cache) = http(&sample.cache, strict).await;
        // Each byte well within the 500 ms allowed between pieces.
        *server.state.trickle.lock().unwrap() = Some((1000, Duration::from_millis(20)));
        let started = Instant::now();
        let stream = cache.nar(&sample.all[&sample.hello]).await.unwrap();
        let error = read_all(stream).await.unwrap_err();
        let error = CacheError::from_io(&error).expect("a cache error");
        assert!(matches!(error, CacheError::Io { .. }), "{error}");
        assert!(error.is_unavailable(), "{error}");
        assert!(error.to_string().contains("not whole after"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(no_body_in_flight(&server).await, "the download goes on");
    }

    #[tokio::test]
    async fn a_slow_reader_does_not_count_against_the_cache_s_deadline() {
        // Far more than the download task's channel and the socket hold.
        let mut files = TestCache::new();
        let path = store_path("large-1.0");
        let node = dir(vec![("data", file(&"z".repeat(8 << 20)))]);
        let info = files.add(&path, &node, &[], Compression::None, Some(&test_key()));
        let strict = CacheOptions {
            nar_deadline_base: Duration::from_millis(300),
            nar_min_rate: u64::MAX,
            pipe_from: u64::MAX,
            ..options()
        };
        let (_server, cache) = http(&files, strict).await;
        let stream = cache.nar(&info).await.unwrap();
        let started = Instant::now();
        let read = tokio::task::spawn_blocking(move || {
            let mut reader = stream.into_reader();
            let mut buf = vec![0; 256 << 10];
            let mut total = 0;
            loop {
                match reader.read(&mut buf)? {
                    0 => return Ok::<_, io::Error>(total),
                    n => total += n as u64,
                }
                // The registry is the slow one: a busy layer compressor.
                std::thread::sleep(Duration::from_millis(30));
            }
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(read, info.nar_size);
        assert!(started.elapsed() > Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_piped_reader_dropped_stops_its_thread_and_download() {
        let sample = sample(Compression::None);
        let piped = CacheOptions {
            pipe_from: 0,
            ..options()
        };
        let (server, cache) = http(&sample.cache, piped).await;
        *server.state.trickle.lock().unwrap() = Some((1000, Duration::from_millis(20)));
        let stream = cache.nar(&sample.all[&sample.hello]).await.unwrap();
        tokio::task::spawn_blocking(move || {
            let mut reader = stream.into_reader();
            reader.read_exact(&mut [0; 100]).unwrap();
        })
        .await
        .unwrap();
        assert!(no_body_in_flight(&server).await, "the download goes on");
    }

    #[tokio::test]
    async fn a_reader_stops_at_its_next_read_once_its_flag_is_set() {
        let sample = sample(Compression::None);
        let (server, cache) = http(&sample.cache, options()).await;
        *server.state.trickle.lock().unwrap() = Some((1000, Duration::from_millis(20)));
        let flag = Arc::new(AtomicBool::new(false));
        let stream = cache
            .nar(&sample.all[&sample.hello])
            .await
            .unwrap()
            .cancel_on(flag.clone());
        let reading = tokio::spawn(read_all(stream));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(server.state.bodies.load(Ordering::SeqCst), 1);
        flag.store(true, Ordering::Relaxed);
        let error = reading.await.unwrap().unwrap_err();
        let error = CacheError::from_io(&error).expect("a cache error");
        assert!(error.is_cancelled(), "{error}");
        assert!(error.to_string().contains("hello-2.12"), "{error}");
        assert!(no_body_in_flight(&server).await, "the download goes on");
    }

    #[tokio::test]
    async fn dropping_with_nar_stops_its_reader_and_download() {
        let sample = sample(Compression::None);
        let (server, cache) = http(&sample.cache, options()).await;
        *server.state.trickle.lock().unwrap() = Some((1000, Duration::from_millis(20)));
        let (sender, receiver) = std::sync::mpsc::channel();
        let reading = cache.with_nar(&sample.all[&sample.hello], move |mut reader| {
            sender.send(io::copy(&mut reader, &mut io::sink())).unwrap()
        });
        // The caller gives up long before the trickle could end.
        assert!(tokio::time::timeout(Duration::from_millis(200), reading)
            .await
            .is_err());
        let ended = tokio::task::spawn_blocking(move || {
            receiver.recv_timeout(Duration::from_secs(5)).unwrap()
        })
        .await
        .unwrap();
        let error = CacheError::from_io(&ended.unwrap_err())
            .expect("a cache error")
            .to_string();
        assert!(error.contains("cancelled"), "{error}");
        assert!(no_body_in_flight(&server).await, "the download goes on");
    }

    #[tokio::test]
    async fn a_nar_forbidden_after_its_narinfo_is_unavailable_not_missing() {
        let sample = sample(Compression::Xz);
        let (server, cache) = http(&sample.cache, options()).await;
        let info = cache.narinfo(&sample.hello).await.unwrap();
        for status in [401, 403] {
            server.fail(1, status);
            let Err(err) = cache.nar(&info).await else {
                panic!("HTTP {status} opened the NAR");
            };
            assert!(
                matches!(err, CacheError::Http { status: s, .. } if s == status),
                "{err}"
            );
            assert!(err.is_unavailable(), "{err}");
            assert!(err.to_string().contains(&format!("HTTP {status}")), "{err}");
        }
        // For a narinfo, 403 is S3's answer for a key it does not have.
        server.fail(1, 403);
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let sample = sample(Compression::Xz);
        let (server, cache) = http(&sample.cache, options()).await;
        server.fail(usize::MAX, 400);
        let err = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(matches!(err, CacheError::Http { status: 400, .. }), "{err}");
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn credentials_go_in_a_header_never_in_messages() {
        let sample = sample(Compression::Xz);
        let server = Server::start(&sample.cache).await;
        let url = format!("http://reader:s3cret@{}/cache?priority=40", server.addr);
        let cache = BinaryCache::new(&url, trusted(), options()).unwrap();
        assert_eq!(cache.url(), server.url());
        cache.narinfo(&sample.hello).await.unwrap();
        let log = server.state.log.lock().unwrap().clone();
        assert_eq!(
            log[0],
            (
                format!("cache/{}.narinfo", sample.hello.hash_part()),
                Some("Basic cmVhZGVyOnMzY3JldA==".to_string())
            )
        );
        let err = cache.narinfo(&store_path("gone")).await.unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
        // Redirected to another origin: the credentials stay behind.
        let elsewhere = Server::start(&sample.cache).await;
        *server.state.redirect_to.lock().unwrap() = Some(format!("http://{}", elsewhere.addr));
        cache.narinfo(&sample.hello).await.unwrap();
        let seen = elsewhere.state.log.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1, None, "{seen:?}");
    }

    #[tokio::test]
    async fn a_file_size_beyond_any_compression_of_the_nar_is_refused_before_download() {
        let sample = sample(Compression::Xz);
        let (server, cache) = http(&sample.cache, options()).await;
        let mut info = sample.all[&sample.hello].clone();
        info.file_size = Some(u64::MAX);
        let error = cache.nar(&info).await.err().unwrap();
        assert!(matches!(error, CacheError::FileTooLarge { .. }), "{error}");
        assert!(!error.is_unavailable());
        assert!(server.requests().is_empty(), "{:?}", server.requests());
    }

    #[tokio::test]
    async fn a_redirect_is_followed_and_a_redirect_loop_refused_at_once() {
        let sample = sample(Compression::Xz);
        let (target, _) = http(&sample.cache, options()).await;
        let (front, cache) = http(&sample.cache, options()).await;
        // To another server: followed, and its answers checked as ever.
        *front.state.redirect_to.lock().unwrap() = Some(format!("http://{}", target.addr));
        let info = cache.narinfo(&sample.hello).await.unwrap();
        assert_eq!(info.store_path, sample.hello);
        assert_eq!(target.requests().len(), 1);
        // To itself, again and again: refused after 5 hops, not retried.
        *front.state.redirect_to.lock().unwrap() = Some(format!("http://{}", front.addr));
        let requests = front.requests().len();
        let error = cache.narinfo(&sample.hello).await.unwrap_err();
        assert!(matches!(error, CacheError::Redirect { .. }), "{error}");
        assert!(error.is_unavailable(), "{error}");
        assert!(error.to_string().contains("more than 5"), "{error}");
        assert_eq!(front.requests().len() - requests, 1 + MAX_REDIRECTS);
    }

    #[test]
    fn bad_cache_urls_are_refused() {
        for url in ["ftp://host/x", "not a url", "s3://bucket", "file://host/x"] {
            assert!(
                matches!(
                    BinaryCache::new(url, trusted(), options()),
                    Err(CacheError::Url { .. })
                ),
                "{url}"
            );
        }
    }
}
