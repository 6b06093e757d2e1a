//! A NAR from a cache to its reader: the download, the checks on the way,
//! and the thread that runs them ahead of the reader.
//!
//! ```text
//! compressed bytes -> FileSize/FileHash -> decompress -> NarSize/NarHash -> reader
//! ```
//!
//! An HTTP body is pulled by a task of the runtime that opened it
//! ([`NarStream::into_reader`] may run anywhere), at most 16 pieces ahead,
//! within [`super::CacheOptions::request_timeout`] between pieces and a
//! deadline for the whole body that moves with the time its reader keeps
//! it waiting. FileSize, which is not signed, is bounded by the signed
//! NarSize ([`max_file_size`]). A NAR of at least
//! [`super::CacheOptions::pipe_from`] bytes is decompressed and checked on
//! a thread of its own, a few pieces ahead; the reader sees the same bytes
//! and the same errors in the same order. Dropping the reader, or setting
//! a flag given to [`NarStream::cancel_on`], stops all of it.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::decompress::Decoder;
use super::error::CacheError;
use super::narinfo::{NarInfo, Sha256Hash};
use super::network::describe;
use super::store_path::StorePath;

/// An open NAR file, not yet read.
pub struct NarStream {
    body: Body,
    info: NarInfo,
    cache: String,
    stop: Stop,
    pipe_from: u64,
}

pub(super) enum Body {
    File(std::fs::File),
    Http {
        response: reqwest::Response,
        limits: BodyLimits,
        runtime: tokio::runtime::Handle,
    },
}

/// How long an HTTP body may take.
#[derive(Clone, Copy)]
pub(super) struct BodyLimits {
    pub(super) between_pieces: Duration,
    pub(super) whole: Duration,
}

/// Flags that stop a reader once any of them is set.
#[derive(Clone, Default)]
struct Stop(Vec<Arc<AtomicBool>>);

impl Stop {
    fn is_set(&self) -> bool {
        self.0.iter().any(|flag| flag.load(Ordering::Relaxed))
    }

    /// Resolves once a flag is set (looked at every [`STOP_POLL`]).
    async fn set(&self) {
        while !self.is_set() {
            tokio::time::sleep(STOP_POLL).await;
        }
    }
}

/// How often a download waiting for its next piece looks at its flags.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Sets its flag when dropped.
pub(super) struct SetOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl NarStream {
    pub(super) fn new(body: Body, info: NarInfo, cache: String, pipe_from: u64) -> NarStream {
        NarStream {
            body,
            info,
            cache,
            stop: Stop::default(),
            pipe_from,
        }
    }

    /// The narinfo this stream checks against.
    pub fn info(&self) -> &NarInfo {
        &self.info
    }

    /// Stops the reader at its next read, and the download at once, when
    /// `flag` is set (a build that is no longer wanted).
    pub fn cancel_on(mut self, flag: Arc<AtomicBool>) -> NarStream {
        self.stop.0.push(flag);
        self
    }

    /// A blocking reader of the decompressed, checked NAR (see the module
    /// doc). Reading it blocks: use it on a blocking thread
    /// (`tokio::task::spawn_blocking`, or [`super::BinaryCache::with_nar`]), never
    /// on an async worker. An HTTP body is received by a task on the
    /// runtime that opened it and handed over in pieces, at most 16 in
    /// flight; dropping the reader stops the download. A NAR of at least
    /// [`super::CacheOptions::pipe_from`] bytes is decompressed and checked by a
    /// thread of its own, at most [`PIPED_PIECES`] pieces ahead; the
    /// reader sees the same bytes and the same errors, in the same order.
    pub fn into_reader(self) -> NarReader {
        let piped = self.info.nar_size >= self.pipe_from;
        // A piped reader dropped stops its thread and download as a
        // direct one does.
        let dropped = Arc::new(AtomicBool::new(false));
        let mut stop = self.stop;
        if piped {
            stop.0.push(dropped.clone());
        }
        let source: Box<dyn Read + Send> = match self.body {
            Body::File(file) => Box::new(file),
            Body::Http {
                response,
                limits,
                runtime,
            } => Box::new(ChannelReader::spawn(
                &runtime,
                response,
                limits,
                stop.clone(),
            )),
        };
        let checked = CheckedNar::new(source, self.info, self.cache, stop);
        NarReader(if piped {
            Reader::Piped(PipedNar::spawn(checked, SetOnDrop(dropped)))
        } else {
            Reader::Direct(Box::new(checked))
        })
    }
}

/// The most bytes a NAR file of a NAR of `nar_size` bytes may have: the
/// NAR, an eighth more (incompressible data, a compressor's framing) and
/// 1 MiB. FileSize is not signed, NarSize is: a file past this is refused,
/// and padding that decodes to nothing cannot go on for ever.
pub fn max_file_size(nar_size: u64) -> u64 {
    nar_size.saturating_add(nar_size / 8 + (1 << 20))
}

/// Pieces a piped NAR's thread may hold ready for its reader.
pub const PIPED_PIECES: usize = 4;
/// The size of each of those pieces.
const PIECE: usize = 256 * 1024;

/// A blocking [`Read`] of a NAR from a cache, checked against its narinfo
/// (see the module doc). Errors are `io::Error`s that carry a
/// [`CacheError`] ([`CacheError::from_io`]).
pub struct NarReader(Reader);

enum Reader {
    Direct(Box<CheckedNar>),
    Piped(PipedNar),
}

impl Read for NarReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            Reader::Direct(checked) => checked.read(out),
            Reader::Piped(piped) => piped.read(out),
        }
    }
}

/// A [`CheckedNar`] read by a thread of its own into a bounded channel.
/// Dropping this sets a stop flag of the [`CheckedNar`] and its download:
/// the thread ends at its next read, the download at once.
struct PipedNar {
    receiver: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
    /// The end, or the error, was handed over; later reads repeat it.
    finished: Option<Result<(), String>>,
    context: Context,
    _stop_on_drop: SetOnDrop,
}

impl PipedNar {
    fn spawn(mut checked: CheckedNar, stop_on_drop: SetOnDrop) -> PipedNar {
        let (sender, receiver) = std::sync::mpsc::sync_channel(PIPED_PIECES);
        let context = checked.context.clone();
        let thread = std::thread::Builder::new().name("nar-reader".into());
        // If no thread can be had, the receiver finds the channel closed.
        // Each piece is what one read gives, handed on at once: bytes
        // flow as they arrive, a slow download is not held back.
        let _ = thread.spawn(move || loop {
            let mut piece = vec![0; PIECE];
            match checked.read(&mut piece) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = sender.send(Err(e));
                    return;
                }
                // The end, checked: an empty piece says so.
                Ok(0) => {
                    let _ = sender.send(Ok(Vec::new()));
                    return;
                }
                Ok(n) => {
                    piece.truncate(n);
                    if sender.send(Ok(piece)).is_err() {
                        return;
                    }
                }
            }
        });
        PipedNar {
            receiver,
            current: Vec::new(),
            at: 0,
            finished: None,
            context,
            _stop_on_drop: stop_on_drop,
        }
    }
}

impl Read for PipedNar {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.at == self.current.len() {
            match &self.finished {
                Some(Ok(())) => return Ok(0),
                Some(Err(message)) => return Err(io::Error::other(message.clone())),
                None => {}
            }
            match self.receiver.recv() {
                Ok(Ok(piece)) if piece.is_empty() => self.finished = Some(Ok(())),
                Ok(Ok(piece)) => {
                    self.current = piece;
                    self.at = 0;
                }
                Ok(Err(error)) => {
                    self.finished = Some(Err(error.to_string()));
                    return Err(error);
                }
                // The thread could not start, or ended without the end
                // or an error: this registry failed, not the cache's data.
                Err(_) => {
                    let c = self.context.clone();
                    let error = CacheError::Io {
                        cache: c.cache,
                        path: c.path,
                        object: c.object,
                        source: io::Error::other("the thread reading the NAR ended early"),
                    };
                    self.finished = Some(Err(error.to_string()));
                    return Err(io::Error::other(error));
                }
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// An HTTP body pulled by a task and read from a blocking thread.
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    /// The task said the body ended.
    ended: bool,
}

impl ChannelReader {
    fn spawn(
        runtime: &tokio::runtime::Handle,
        mut response: reqwest::Response,
        limits: BodyLimits,
        stop: Stop,
    ) -> ChannelReader {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        runtime.spawn(async move {
            let now = tokio::time::Instant::now();
            // A year stands for "no deadline" where the sum overflows.
            let far = Duration::from_secs(365 * 86_400);
            let mut deadline = now.checked_add(limits.whole).unwrap_or(now + far);
            loop {
                let between = limits.between_pieces;
                let piece = tokio::select! {
                    biased;
                    // The reader was dropped: stop downloading.
                    () = sender.closed() => break,
                    // The reader sees its flag at its next read.
                    () = stop.set() => Err(io::Error::other("cancelled")),
                    () = tokio::time::sleep_until(deadline) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("not whole after {:?}", limits.whole),
                    )),
                    piece = tokio::time::timeout(between, response.chunk()) => match piece {
                        Err(_) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no data for {between:?}"),
                        )),
                        Ok(Err(e)) => Err(io::Error::other(describe(&e))),
                        // The end, said so (an empty piece): a channel that
                        // closes without it is a download that failed.
                        Ok(Ok(None)) => {
                            let _ = sender.send(Ok(Bytes::new())).await;
                            break;
                        }
                        Ok(Ok(Some(bytes))) if bytes.is_empty() => continue,
                        Ok(Ok(Some(bytes))) => Ok(bytes),
                    },
                };
                let failed = piece.is_err();
                // Time spent waiting for the reader to take a piece is the
                // registry's, not the cache's: the deadline moves with it.
                let handed = tokio::time::Instant::now();
                if sender.send(piece).await.is_err() || failed {
                    break;
                }
                let waited = handed.elapsed();
                deadline = deadline.checked_add(waited).unwrap_or(deadline);
            }
        });
        ChannelReader {
            receiver,
            current: Bytes::new(),
            ended: false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.receiver.blocking_recv() {
                // The task went without saying the body ended (its
                // runtime shut down): not a body that was whole.
                None => return Err(io::Error::other("the download stopped")),
                Some(Err(e)) => return Err(e),
                Some(Ok(bytes)) if bytes.is_empty() => self.ended = true,
                Some(Ok(bytes)) => self.current = bytes,
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The compressed file: counted and hashed, never read past FileSize (or,
/// without one, a bound derived from NarSize).
struct FileCheck {
    source: Box<dyn Read + Send>,
    hasher: Sha256,
    read: u64,
    limit: u64,
    ended: bool,
    context: Context,
}

/// What errors name.
#[derive(Clone)]
struct Context {
    cache: String,
    path: StorePath,
    object: String,
}

impl Read for FileCheck {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.ended || out.is_empty() {
            return Ok(0);
        }
        // One byte past the limit is enough to know the file is too long.
        let room = (self.limit.saturating_add(1) - self.read).min(out.len() as u64) as usize;
        let n = loop {
            match self.source.read(&mut out[..room]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let c = self.context.clone();
                    return Err(io::Error::other(CacheError::Io {
                        cache: c.cache,
                        path: c.path,
                        object: c.object,
                        source: e,
                    }));
                }
            }
        };
        if n == 0 {
            self.ended = true;
            return Ok(0);
        }
        self.read += n as u64;
        if self.read > self.limit {
            let c = self.context.clone();
            return Err(io::Error::other(CacheError::FileSize {
                cache: c.cache,
                path: c.path,
                expected: self.limit,
                found: self.read,
            }));
        }
        self.hasher.update(&out[..n]);
        Ok(n)
    }
}

/// The NAR decompressed and checked as it is read, on the reader's
/// thread.
struct CheckedNar {
    decoder: Decoder<BufReader<FileCheck>>,
    hasher: Sha256,
    read: u64,
    info: NarInfo,
    context: Context,
    stop: Stop,
    /// Set after the end was checked, or after an error: what every later
    /// read answers.
    finished: Option<Result<(), String>>,
}

impl CheckedNar {
    fn new(source: Box<dyn Read + Send>, info: NarInfo, cache: String, stop: Stop) -> CheckedNar {
        let context = Context {
            cache,
            path: info.store_path.clone(),
            object: info.url.clone(),
        };
        // Without a FileSize, the compressed file may be somewhat larger
        // than the NAR (incompressible data), not without bound.
        let limit = info
            .file_size
            .unwrap_or(max_file_size(info.nar_size))
            .min(max_file_size(info.nar_size));
        let check = FileCheck {
            source,
            hasher: Sha256::new(),
            read: 0,
            limit,
            ended: false,
            context: context.clone(),
        };
        let buffered = BufReader::with_capacity(128 * 1024, check);
        let (decoder, finished) = match Decoder::new(info.compression, buffered) {
            Ok(decoder) => (decoder, None),
            Err(e) => {
                // zstd allocates its context here; nothing was read yet.
                let error = CacheError::Decompress {
                    cache: context.cache.clone(),
                    path: context.path.clone(),
                    compression: info.compression.as_str(),
                    source: e,
                };
                let message = error.to_string();
                let empty = FileCheck {
                    source: Box::new(io::empty()),
                    hasher: Sha256::new(),
                    read: 0,
                    limit: 0,
                    ended: true,
                    context: context.clone(),
                };
                let decoder =
                    Decoder::new(super::decompress::Compression::None, BufReader::new(empty))
                        .expect("no compression cannot fail");
                (decoder, Some(Err(message)))
            }
        };
        CheckedNar {
            decoder,
            hasher: Sha256::new(),
            read: 0,
            info,
            context,
            stop,
            finished,
        }
    }

    fn cancelled(&self) -> CacheError {
        CacheError::Cancelled {
            cache: self.context.cache.clone(),
            path: self.context.path.clone(),
        }
    }

    fn fail(&mut self, error: CacheError) -> io::Error {
        self.finished = Some(Err(error.to_string()));
        io::Error::other(error)
    }

    /// At the decoder's end: the rest of the file, then every check.
    fn finish(&mut self) -> Result<(), CacheError> {
        let c = self.context.clone();
        let file = self.decoder.get_mut();
        // Whatever follows the compressed stream still counts for FileSize
        // and FileHash (and is refused by them).
        loop {
            let n = match file.fill_buf() {
                Ok(buf) => buf.len(),
                Err(e) => return Err(unwrap_cache_error(e, &c, self.info.compression.as_str())),
            };
            if n == 0 {
                break;
            }
            file.consume(n);
        }
        let check = file.get_mut();
        let found = Sha256Hash(check.hasher.clone().finalize().into());
        if let Some(expected) = self.info.file_size {
            if check.read != expected {
                return Err(CacheError::FileSize {
                    cache: c.cache,
                    path: c.path,
                    expected,
                    found: check.read,
                });
            }
        }
        if let Some(expected) = self.info.file_hash {
            if found != expected {
                return Err(CacheError::FileHash {
                    cache: c.cache,
                    path: c.path,
                    expected,
                    found,
                });
            }
        }
        if self.read != self.info.nar_size {
            return Err(CacheError::NarSize {
                cache: c.cache,
                path: c.path,
                expected: self.info.nar_size,
                found: self.read,
            });
        }
        let found = Sha256Hash(self.hasher.clone().finalize().into());
        if found != self.info.nar_hash {
            return Err(CacheError::NarHash {
                cache: c.cache,
                path: c.path,
                expected: self.info.nar_hash,
                found,
            });
        }
        Ok(())
    }
}

/// A decoder's error: ours from below (passed on), or corrupt data. When
/// the file ended short, that is what is reported.
fn unwrap_cache_error(e: io::Error, c: &Context, compression: &'static str) -> CacheError {
    match e.into_inner() {
        Some(inner) => match inner.downcast::<CacheError>() {
            Ok(cache_error) => *cache_error,
            Err(other) => CacheError::Decompress {
                cache: c.cache.clone(),
                path: c.path.clone(),
                compression,
                source: io::Error::other(other),
            },
        },
        None => CacheError::Decompress {
            cache: c.cache.clone(),
            path: c.path.clone(),
            compression,
            source: io::Error::other("corrupt data"),
        },
    }
}

impl Read for CheckedNar {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match &self.finished {
            Some(Ok(())) => return Ok(0),
            Some(Err(message)) => return Err(io::Error::other(message.clone())),
            None => {}
        }
        if out.is_empty() {
            return Ok(0);
        }
        if self.stop.is_set() {
            return Err(self.fail(self.cancelled()));
        }
        let n = match self.decoder.read(out) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            // The download stopped because the reader was cancelled.
            Err(_) if self.stop.is_set() => return Err(self.fail(self.cancelled())),
            Err(e) => {
                let kind = e.kind();
                let error = unwrap_cache_error(e, &self.context, self.info.compression.as_str());
                // Compressed data cut short: say so by its size.
                let check = self.decoder.get_mut().get_ref();
                let short = matches!(error, CacheError::Decompress { .. })
                    && (check.ended || kind == io::ErrorKind::UnexpectedEof)
                    && self.info.file_size.is_some_and(|size| check.read < size);
                let error = if short {
                    CacheError::FileSize {
                        cache: self.context.cache.clone(),
                        path: self.context.path.clone(),
                        expected: self.info.file_size.unwrap_or_default(),
                        found: check.read,
                    }
                } else {
                    error
                };
                return Err(self.fail(error));
            }
        };
        if n == 0 {
            return match self.finish() {
                Ok(()) => {
                    self.finished = Some(Ok(()));
                    Ok(0)
                }
                Err(error) => Err(self.fail(error)),
            };
        }
        self.read += n as u64;
        if self.read > self.info.nar_size {
            let c = self.context.clone();
            return Err(self.fail(CacheError::NarSize {
                cache: c.cache,
                path: c.path,
                expected: self.info.nar_size,
                found: self.read,
            }));
        }
        self.hasher.update(&out[..n]);
        Ok(n)
    }
}
