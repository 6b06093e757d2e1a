//! Layer compression on every core, with bytes that depend on the input
//! alone.
//!
//! The uncompressed stream is cut into fixed [`CHUNK`]s, and each chunk is
//! compressed on its own, on a shared pool of one thread per core, as pigz
//! and bgzip do; the results are written in order. Since where the cuts
//! fall does not depend on the pool, the output is the same whatever the
//! core count.
//!
//! - **gzip**: one gzip member. Each chunk is a raw deflate stream ended
//!   with a sync flush (byte-aligned, not final), so the chunks join into a
//!   single deflate stream; the last one is finished. The CRC-32 and size
//!   of the whole input close the member. Any gzip reader, including those
//!   that read one member only, reads it.
//! - **zstd**: one zstd frame per chunk, one after another, which the
//!   format allows and every zstd reader reads.
//!
//! A chunk starts without the previous one's history, which costs a
//! fraction of a percent in size at 1 MiB.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::str::FromStr;
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// Bytes of uncompressed input per independently compressed piece.
pub const CHUNK: usize = 1 << 20;

/// gzip's level: the default of gzip itself, and of Nixery.
pub const GZIP_LEVEL: u32 = 6;
/// zstd's level: the default of zstd itself.
pub const ZSTD_LEVEL: i32 = 3;

/// How layers are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `tar+gzip`: what every client reads, Docker's oldest included.
    #[default]
    Gzip,
    /// `tar+zstd`: smaller and faster to unpack; needs containerd 1.5,
    /// podman 3 or Docker 23 and later.
    Zstd,
}

impl Compression {
    /// What the layer and image keys say about the bytes: the format, the
    /// level and the chunking, all of which decide them.
    pub fn key(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip-6/chunks-1MiB",
            Compression::Zstd => "zstd-3/chunks-1MiB",
        }
    }

    /// The OCI media type of a layer compressed so.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => crate::oci::manifest::MEDIA_TYPE_LAYER_GZIP,
            Compression::Zstd => crate::oci::manifest::MEDIA_TYPE_LAYER_ZSTD,
        }
    }

    /// Compresses one chunk; `last` ends the stream.
    fn chunk(self, data: &[u8], last: bool) -> io::Result<Vec<u8>> {
        match self {
            Compression::Gzip => deflate(data, last),
            Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!("unknown compression {other:?} (gzip or zstd)")),
        }
    }
}

/// One chunk as raw deflate: sync-flushed, or finished if `last`.
fn deflate(data: &[u8], last: bool) -> io::Result<Vec<u8>> {
    use flate2::{Compress, FlushCompress, Status};
    let mut compress = Compress::new(flate2::Compression::new(GZIP_LEVEL), false);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(4096));
        }
        let consumed = compress.total_in() as usize;
        let status = compress
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = compress.total_in() as usize == data.len();
        match status {
            Status::StreamEnd => return Ok(out),
            // A flush is complete when the input is in and the output did
            // not fill the room it had.
            Status::Ok | Status::BufError if !last && all_in && out.len() < out.capacity() => {
                return Ok(out)
            }
            Status::Ok | Status::BufError => {}
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that compress chunks, shared by every layer being packed, and
/// a bound on the chunks given to them at once, whatever the number of
/// layers packed at a time: memory stays a few megabytes per core.
pub struct Pool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
    /// Chunks submitted and not compressed yet, and its limit.
    queued: Arc<(Mutex<usize>, Condvar)>,
    max_queued: usize,
}

impl Pool {
    /// A pool of `threads` threads (at least one), which live as long as
    /// the pool.
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("compress-{i}"))
                .spawn(move || loop {
                    let job = queue.lock().map(|q| q.recv());
                    match job {
                        Ok(Ok(job)) => job(),
                        _ => return,
                    }
                })
                .expect("spawning a compression thread");
        }
        Pool {
            jobs,
            threads,
            queued: Arc::default(),
            max_queued: 2 * threads,
        }
    }

    /// The process's pool: one thread per core.
    pub fn shared() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            Pool::new(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
            )
        })
    }

    /// Runs `compression.chunk(data, last)` on the pool.
    fn submit(
        &self,
        compression: Compression,
        data: Vec<u8>,
        last: bool,
    ) -> mpsc::Receiver<io::Result<Vec<u8>>> {
        let (done, result) = mpsc::sync_channel(1);
        let queued = self.queued.clone();
        {
            let (count, room) = &*queued;
            let mut count = count.lock().unwrap_or_else(|e| e.into_inner());
            while *count >= self.max_queued {
                count = room.wait(count).unwrap_or_else(|e| e.into_inner());
            }
            *count += 1;
        }
        let job: Job = Box::new(move || {
            let compressed = compression.chunk(&data, last);
            drop(data);
            let (count, room) = &*queued;
            *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            room.notify_one();
            let _ = done.send(compressed);
        });
        // The threads outlive the pool's sender; a send fails only if they
        // are all gone, which the receiver then reports.
        let _ = self.jobs.send(job);
        result
    }
}

/// A writer that compresses what it is given on a [`Pool`] and writes the
/// compressed bytes to `inner`, in order. Call [`Encoder::finish`]: a
/// dropped encoder leaves the stream unfinished.
pub struct Encoder<W: Write> {
    inner: W,
    compression: Compression,
    pool: &'static Pool,
    chunk: Vec<u8>,
    /// Chunks being compressed, oldest first.
    pending: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
    crc: crc32fast::Hasher,
    total_in: u64,
}

impl<W: Write> Encoder<W> {
    /// An encoder on the process's pool.
    pub fn new(inner: W, compression: Compression) -> io::Result<Encoder<W>> {
        Encoder::on(inner, compression, Pool::shared())
    }

    /// An encoder on `pool`.
    pub fn on(mut inner: W, compression: Compression, pool: &'static Pool) -> io::Result<Self> {
        if compression == Compression::Gzip {
            // No name, no time, unknown OS: nothing but the bytes.
            inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
        }
        Ok(Encoder {
            inner,
            compression,
            pool,
            chunk: Vec::with_capacity(CHUNK),
            pending: VecDeque::new(),
            crc: crc32fast::Hasher::new(),
            total_in: 0,
        })
    }

    /// Chunks compressed at once: enough to keep every thread busy, few
    /// enough to bound memory.
    fn in_flight(&self) -> usize {
        (2 * self.pool.threads).clamp(2, 16)
    }

    fn send_chunk(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        self.crc.update(&data);
        self.total_in += data.len() as u64;
        self.pending
            .push_back(self.pool.submit(self.compression, data, last));
        while self.pending.len() > self.in_flight() {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(result) = self.pending.pop_front() else {
            return Ok(());
        };
        let compressed = result
            .recv()
            .map_err(|_| io::Error::other("a compression thread stopped"))??;
        self.inner.write_all(&compressed)
    }

    /// Compresses what is left, ends the stream and gives back `inner`.
    pub fn finish(mut self) -> io::Result<W> {
        self.send_chunk(true)?;
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        if self.compression == Compression::Gzip {
            let crc = self.crc.clone().finalize();
            self.inner.write_all(&crc.to_le_bytes())?;
            // ISIZE: the input's size modulo 2^32, as gzip defines it.
            self.inner
                .write_all(&(self.total_in as u32).to_le_bytes())?;
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == CHUNK {
            self.send_chunk(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Only whole chunks are compressed; what is written is written.
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Input with long repeats and incompressible stretches, crossing
    /// several chunk boundaries.
    fn input(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|i| {
                if (i / 100_000) % 2 == 0 {
                    (i % 251) as u8
                } else {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                }
            })
            .collect()
    }

    fn encode(data: &[u8], compression: Compression, pool: &'static Pool, step: usize) -> Vec<u8> {
        let mut encoder = Encoder::on(Vec::new(), compression, pool).unwrap();
        for piece in data.chunks(step) {
            encoder.write_all(piece).unwrap();
        }
        encoder.finish().unwrap()
    }

    fn pool(threads: usize) -> &'static Pool {
        Box::leak(Box::new(Pool::new(threads)))
    }

    fn decode(bytes: &[u8], compression: Compression) -> Vec<u8> {
        let mut out = Vec::new();
        match compression {
            // The single-member reader: the output is one gzip member.
            Compression::Gzip => flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .unwrap(),
            Compression::Zstd => zstd::stream::read::Decoder::new(bytes)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap(),
        };
        out
    }

    #[test]
    fn round_trips_at_every_size_that_matters() {
        let one = pool(1);
        for compression in [Compression::Gzip, Compression::Zstd] {
            for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12_345] {
                let data = input(len);
                let packed = encode(&data, compression, one, 70_000);
                assert_eq!(decode(&packed, compression), data, "{compression} {len}");
            }
        }
    }

    #[test]
    fn bytes_do_not_depend_on_threads_or_write_sizes() {
        let data = input(5 * CHUNK + 777);
        for compression in [Compression::Gzip, Compression::Zstd] {
            let reference = encode(&data, compression, pool(1), CHUNK);
            for (threads, step) in [(2, 4096), (4, 1), (7, 3 * CHUNK)] {
                let step = step.min(data.len());
                if step == 1 {
                    // Byte-by-byte over megabytes is slow; a prefix shows it.
                    let prefix = &data[..CHUNK + 10];
                    assert_eq!(
                        encode(prefix, compression, pool(threads), 1),
                        encode(prefix, compression, pool(1), CHUNK),
                    );
                    continue;
                }
                assert_eq!(encode(&data, compression, pool(threads), step), reference);
            }
        }
    }

    #[test]
    fn gzip_is_a_standard_member_that_gzip_itself_reads() {
        let data = input(2 * CHUNK + 5);
        let packed = encode(&data, Compression::Gzip, pool(2), 65_536);
        // Header: magic, deflate, no flags, no time, unknown OS.
        assert_eq!(&packed[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
        let n = packed.len();
        let crc = u32::from_le_bytes(packed[n - 8..n - 4].try_into().unwrap());
        let size = u32::from_le_bytes(packed[n - 4..].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&data));
        assert_eq!(size as usize, data.len());
        // Smaller than the input, and near what one stream would give.
        let mut whole = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        whole.write_all(&data).unwrap();
        let whole = whole.finish().unwrap();
        assert!(packed.len() < data.len());
        assert!(packed.len() < whole.len() + whole.len() / 50);
        if let Ok(mut gzip) = std::process::Command::new("gzip")
            .args(["-dc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            let mut stdin = gzip.stdin.take().unwrap();
            let feed = std::thread::spawn(move || stdin.write_all(&packed));
            let out = gzip.wait_with_output().unwrap();
            feed.join().unwrap().unwrap();
            assert!(out.status.success());
            assert_eq!(out.stdout, data);
        }
    }

    #[test]
    fn names_parse_and_print() {
        for c in [Compression::Gzip, Compression::Zstd] {
            assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
        }
        assert!("lz4"
            .parse::<Compression>()
            .unwrap_err()
            .contains("gzip or zstd"));
        assert_ne!(Compression::Gzip.key(), Compression::Zstd.key());
    }
}
