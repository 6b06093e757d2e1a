//! Reading NARs (Nix ARchives) as a stream, refusing hostile ones.
//!
//! The format (Eelco Dolstra's thesis, "The Purely Functional Deployment
//! Model", figure 5.2; Nix's `libutil/archive.cc`) is a sequence of strings,
//! each a u64 little-endian length followed by the bytes, zero-padded to a
//! multiple of 8:
//!
//! ```text
//! nar        = "nix-archive-1" node
//! node       = "(" "type" ( regular | symlink | directory ) ")"
//! regular    = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink    = "symlink" "target" <target>
//! directory  = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! [`walk`] reads one pass and calls a [`Visitor`] per node in archive order
//! (pre-order: a directory before its entries, entries by name bytes). The
//! root has the empty relative path and may be a directory, a file or a
//! symlink. A file's contents reach the visitor as a [`Read`] over exactly
//! its bytes, read straight from the archive; whatever the visitor leaves
//! unread is skipped. Memory stays at one 64 KiB buffer plus the current
//! path, whatever the size of the files or the archive. The sha256 and size
//! of the whole archive (a narinfo's `NarHash`/`NarSize`) come back in the
//! [`NarSummary`]. [`listing`] gives the tree without contents.
//!
//! Refused, each with a [`NarError`] that says where: entry names that are
//! empty, `.` or `..`, contain `/` or NUL, or are over 255 bytes; entries
//! of a directory not in strictly ascending byte order (so no duplicates);
//! unknown tokens; non-zero padding; a string longer than what remains of
//! the size limit; nesting deeper than [`NarLimits::max_depth`]; more than
//! [`NarLimits::max_entries`] nodes; symlink targets that are empty, contain
//! NUL or are over 4095 bytes; truncation anywhere; anything after the root
//! node.
//!
//! Why not a crate: `nix-nar` allocates whatever length a string claims
//! (a hostile NAR asks for exabytes), needs UTF-8 names and checks neither
//! names, order nor padding fully; cachix's `nix-archive` streams and checks
//! names, order, padding and depth well, but reads every name and target
//! into buffers of up to 1 MiB before any bound of ours could apply (64
//! nested names make 128 MiB), hides the archive offset that the size
//! limit and the digest need, and its errors do not say which entry.
//!
//! ```
//! use std::io::Read;
//! use nixery::binary_cache::nar::{walk, Node};
//!
//! // A NAR whose root is one executable file, "hi\n".
//! let mut nar = Vec::new();
//! for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"executable", b"", b"contents", b"hi\n", b")"] {
//!     nar.extend((s.len() as u64).to_le_bytes());
//!     nar.extend(s);
//!     nar.resize(nar.len().next_multiple_of(8), 0);
//! }
//! let summary = walk(&nar[..], &mut |path: &std::path::Path, node: Node<'_>| {
//!     assert_eq!(path.as_os_str(), "");
//!     if let Node::File { executable, size, contents } = node {
//!         assert!(executable && size == 3);
//!         let mut text = String::new();
//!         contents.read_to_string(&mut text)?;
//!         assert_eq!(text, "hi\n");
//!     }
//!     Ok(())
//! }).unwrap();
//! assert_eq!(summary.size, nar.len() as u64);
//! ```

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::narinfo::Sha256Hash;

/// The longest entry name (NAME_MAX on Linux).
pub const MAX_NAME_LEN: u64 = 255;

/// The longest symlink target (PATH_MAX on Linux, less its NUL).
pub const MAX_TARGET_LEN: u64 = 4095;

/// The longest keyword of the grammar (`nix-archive-1`), rounded up.
const MAX_KEYWORD_LEN: u64 = 16;

/// How much of the archive is read at a time.
const BUFFER: usize = 64 * 1024;

/// Bounds on what an archive may make a reader do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarLimits {
    /// The most bytes the archive may have (a narinfo's `NarSize`).
    pub max_size: u64,
    /// The deepest a node may be: the root is at 0, its entries at 1.
    pub max_depth: usize,
    /// The most nodes (files, directories, symlinks, the root included).
    pub max_entries: u64,
}

impl Default for NarLimits {
    fn default() -> Self {
        NarLimits {
            max_size: u64::MAX,
            // Deep enough for node_modules trees; PATH_MAX allows ~2000.
            max_depth: 256,
            max_entries: 1 << 20,
        }
    }
}

/// One node as [`walk`] hands it to a [`Visitor`].
pub enum Node<'a> {
    Directory,
    /// `contents` reads exactly `size` bytes.
    File {
        executable: bool,
        size: u64,
        contents: &'a mut dyn Read,
    },
    Symlink {
        target: &'a Path,
    },
}

/// What [`walk`] calls for every node; any error stops the walk. Closures
/// `FnMut(&Path, Node<'_>) -> io::Result<()>` are visitors.
pub trait Visitor {
    /// `path` is relative to the root (empty for the root itself).
    fn visit(&mut self, path: &Path, node: Node<'_>) -> io::Result<()>;
}

impl<F: FnMut(&Path, Node<'_>) -> io::Result<()>> Visitor for F {
    fn visit(&mut self, path: &Path, node: Node<'_>) -> io::Result<()> {
        self(path, node)
    }
}

/// What a complete walk read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarSummary {
    /// Bytes in the archive (`NarSize`).
    pub size: u64,
    /// Their sha256 (`NarHash`).
    pub sha256: Sha256Hash,
    /// Nodes, the root included.
    pub entries: u64,
}

/// Why an archive was refused. Paths are relative to the archive's root
/// (shown as `<root>` when empty); offsets count bytes from its start.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("reading the NAR at byte {offset}: {source}")]
    Read { offset: u64, source: io::Error },
    #[error("the NAR is truncated at byte {offset}")]
    Truncated { offset: u64 },
    #[error("not a NAR: no `nix-archive-1` header")]
    NotANar,
    #[error("{} (byte {offset}): expected {expected}, found {found}", show(path))]
    UnexpectedToken {
        offset: u64,
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
    #[error("byte {offset}: the padding after a string is not zero")]
    Padding { offset: u64 },
    #[error("{}: entry name {name:?} {reason}", show(path))]
    InvalidName {
        path: PathBuf,
        name: String,
        reason: &'static str,
    },
    #[error(
        "{}: entry {name:?} comes after {previous:?}, not in strictly ascending order",
        show(path)
    )]
    Unsorted {
        path: PathBuf,
        name: String,
        previous: String,
    },
    #[error("{}: nested deeper than {limit} directories", show(path))]
    TooDeep { path: PathBuf, limit: usize },
    #[error("{}: the NAR has more than {limit} entries", show(path))]
    TooManyEntries { path: PathBuf, limit: u64 },
    #[error(
        "{} (byte {offset}): {what} of {length} bytes is over the limit of {limit}",
        show(path)
    )]
    TooLong {
        offset: u64,
        path: PathBuf,
        what: &'static str,
        length: u64,
        limit: u64,
    },
    #[error("{}: symlink target {reason}", show(path))]
    Symlink { path: PathBuf, reason: &'static str },
    #[error("data after the end of the NAR, at byte {offset}")]
    TrailingData { offset: u64 },
    #[error("{}: {source}", show(path))]
    Visitor { path: PathBuf, source: io::Error },
}

fn show(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        "<root>".to_string()
    } else {
        path.to_string_lossy().into_owned()
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned()
}

/// Walks the archive in `reader` under the default [`NarLimits`].
pub fn walk<R: Read>(reader: R, visitor: &mut impl Visitor) -> Result<NarSummary, NarError> {
    walk_with(reader, &NarLimits::default(), visitor)
}

/// Walks the archive in `reader` (see the module doc): calls `visitor` per
/// node, then checks that nothing follows the root node.
pub fn walk_with<R: Read>(
    reader: R,
    limits: &NarLimits,
    visitor: &mut impl Visitor,
) -> Result<NarSummary, NarError> {
    let mut walker = Walker {
        source: Source::new(reader, limits.max_size),
        limits,
        path: Vec::new(),
        entries: 0,
    };
    walker.archive(visitor)?;
    walker.source.expect_end()?;
    Ok(NarSummary {
        size: walker.source.offset,
        sha256: Sha256Hash(walker.source.hasher.finalize().into()),
        entries: walker.entries,
    })
}

/// One node of a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingEntry {
    /// Relative to the root; empty for the root.
    pub path: PathBuf,
    pub kind: EntryKind,
}

/// What a [`ListingEntry`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File { executable: bool, size: u64 },
    Symlink { target: PathBuf },
}

/// An archive's tree without contents, in archive order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<ListingEntry>,
    pub summary: NarSummary,
}

/// The tree of the archive in `reader` (at most `limits.max_entries`
/// nodes), for callers that need only its structure.
pub fn listing<R: Read>(reader: R, limits: &NarLimits) -> Result<Listing, NarError> {
    let mut entries = Vec::new();
    let summary = walk_with(reader, limits, &mut |path: &Path, node: Node<'_>| {
        let kind = match node {
            Node::Directory => EntryKind::Directory,
            Node::File {
                executable, size, ..
            } => EntryKind::File { executable, size },
            Node::Symlink { target } => EntryKind::Symlink {
                target: target.to_path_buf(),
            },
        };
        entries.push(ListingEntry {
            path: path.to_path_buf(),
            kind,
        });
        Ok(())
    })?;
    Ok(Listing { entries, summary })
}

/// The archive's bytes: buffered, counted, hashed as they are consumed,
/// and never more than the size limit.
struct Source<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    hasher: Sha256,
    /// Bytes consumed so far.
    offset: u64,
    limit: u64,
    /// An error of `inner` met while a visitor was reading contents (the
    /// visitor got a stand-in; this one is what the walk reports).
    failed: Option<io::Error>,
    /// `inner` ended while a visitor was reading contents.
    truncated: bool,
}

impl<R: Read> Source<R> {
    fn new(inner: R, limit: u64) -> Self {
        Source {
            inner,
            buf: vec![0; BUFFER].into_boxed_slice(),
            pos: 0,
            end: 0,
            hasher: Sha256::new(),
            offset: 0,
            limit,
            failed: None,
            truncated: false,
        }
    }

    /// Refills an empty buffer; false at the end of `inner`.
    fn fill(&mut self) -> io::Result<bool> {
        debug_assert_eq!(self.pos, self.end);
        loop {
            match self.inner.read(&mut self.buf) {
                Ok(n) => {
                    self.pos = 0;
                    self.end = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Consumes exactly `out.len()` bytes into `out`.
    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), NarError> {
        if self.limit - self.offset < out.len() as u64 {
            return Err(NarError::TooLong {
                offset: self.offset,
                path: PathBuf::new(),
                what: "the NAR",
                length: self.offset + out.len() as u64,
                limit: self.limit,
            });
        }
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.end {
                match self.fill() {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(NarError::Truncated {
                            offset: self.offset,
                        })
                    }
                    Err(source) => {
                        return Err(NarError::Read {
                            offset: self.offset,
                            source,
                        })
                    }
                }
            }
            let n = (self.end - self.pos).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.consume(n);
            done += n;
        }
        Ok(())
    }

    /// Marks `n` buffered bytes as read.
    fn consume(&mut self, n: usize) {
        self.hasher.update(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.offset += n as u64;
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut bytes = [0; 8];
        self.read_exact(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let padding = ((8 - len % 8) % 8) as usize;
        let mut bytes = [0; 8];
        let offset = self.offset;
        self.read_exact(&mut bytes[..padding])?;
        if bytes.iter().any(|&b| b != 0) {
            return Err(NarError::Padding { offset });
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes into `out` (cleared first).
    fn read_string(
        &mut self,
        out: &mut Vec<u8>,
        max: u64,
        what: &'static str,
        path: &[u8],
    ) -> Result<(), NarError> {
        let offset = self.offset;
        let len = self.read_u64()?;
        if len > max {
            return Err(NarError::TooLong {
                offset,
                path: to_path(path).to_path_buf(),
                what,
                length: len,
                limit: max,
            });
        }
        out.clear();
        out.resize(len as usize, 0);
        self.read_exact(out)?;
        self.read_padding(len)
    }

    /// Reads contents that a visitor left unread.
    fn skip(&mut self, mut n: u64) -> Result<(), NarError> {
        while n > 0 {
            if self.pos == self.end {
                match self.fill() {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(NarError::Truncated {
                            offset: self.offset,
                        })
                    }
                    Err(source) => {
                        return Err(NarError::Read {
                            offset: self.offset,
                            source,
                        })
                    }
                }
            }
            let k = ((self.end - self.pos) as u64).min(n) as usize;
            self.consume(k);
            n -= k as u64;
        }
        Ok(())
    }

    /// Checks that `inner` has nothing after the archive.
    fn expect_end(&mut self) -> Result<(), NarError> {
        let trailing = NarError::TrailingData {
            offset: self.offset,
        };
        if self.pos < self.end {
            return Err(trailing);
        }
        match self.fill() {
            Ok(false) => Ok(()),
            Ok(true) => Err(trailing),
            Err(source) => Err(NarError::Read {
                offset: self.offset,
                source,
            }),
        }
    }
}

/// A file's contents, read from the archive as the visitor asks.
struct Contents<'a, R> {
    source: &'a mut Source<R>,
    remaining: u64,
}

impl<R: Read> Read for Contents<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || out.is_empty() {
            return Ok(0);
        }
        let want = (out.len() as u64).min(self.remaining) as usize;
        let source = &mut *self.source;
        if source.pos == source.end {
            if want >= source.buf.len() {
                // A large read goes straight from the archive to the
                // caller's buffer.
                let n = match source.inner.read(&mut out[..want]) {
                    Ok(n) => n,
                    Err(e) => return Err(source.fail(e)),
                };
                if n == 0 {
                    return Err(source.eof());
                }
                source.hasher.update(&out[..n]);
                source.offset += n as u64;
                self.remaining -= n as u64;
                return Ok(n);
            }
            match source.fill() {
                Ok(true) => {}
                Ok(false) => return Err(source.eof()),
                Err(e) => return Err(source.fail(e)),
            }
        }
        let n = want.min(source.end - source.pos);
        out[..n].copy_from_slice(&source.buf[source.pos..source.pos + n]);
        source.consume(n);
        self.remaining -= n as u64;
        Ok(n)
    }
}

impl<R> Source<R> {
    /// Keeps `inner`'s error for the walk's result; the visitor gets one of
    /// the same kind.
    fn fail(&mut self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::Interrupted {
            return e;
        }
        let stand_in = io::Error::new(e.kind(), format!("reading the NAR failed: {e}"));
        self.failed.get_or_insert(e);
        stand_in
    }

    fn eof(&mut self) -> io::Error {
        self.truncated = true;
        io::Error::new(io::ErrorKind::UnexpectedEof, "the NAR is truncated")
    }

    /// The archive's own failure, if reading it failed under a visitor.
    fn take_failure(&mut self) -> Option<NarError> {
        if let Some(source) = self.failed.take() {
            return Some(NarError::Read {
                offset: self.offset,
                source,
            });
        }
        if self.truncated {
            return Some(NarError::Truncated {
                offset: self.offset,
            });
        }
        None
    }
}

fn to_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

struct Walker<'l, R> {
    source: Source<R>,
    limits: &'l NarLimits,
    /// The current node's path, names joined with `/`.
    path: Vec<u8>,
    entries: u64,
}

/// An open directory: where its path ends and its last entry's name.
struct Frame {
    path_len: usize,
    previous: Option<Vec<u8>>,
}

impl<R: Read> Walker<'_, R> {
    fn path(&self) -> PathBuf {
        to_path(&self.path).to_path_buf()
    }

    fn keyword(&mut self, expected: &'static str) -> Result<Keyword, NarError> {
        let offset = self.source.offset;
        let len = self.source.read_u64()?;
        if len > MAX_KEYWORD_LEN {
            return Err(NarError::UnexpectedToken {
                offset,
                path: self.path(),
                expected,
                found: format!("a string of {len} bytes"),
            });
        }
        let mut keyword = Keyword {
            bytes: [0; MAX_KEYWORD_LEN as usize],
            len: len as usize,
            offset,
        };
        self.source.read_exact(&mut keyword.bytes[..len as usize])?;
        self.source.read_padding(len)?;
        Ok(keyword)
    }

    fn expect(&mut self, expected: &'static str) -> Result<(), NarError> {
        let keyword = self.keyword(expected)?;
        if keyword.as_bytes() != expected.as_bytes() {
            return Err(self.unexpected(&keyword, expected));
        }
        Ok(())
    }

    fn unexpected(&self, keyword: &Keyword, expected: &'static str) -> NarError {
        NarError::UnexpectedToken {
            offset: keyword.offset,
            path: self.path(),
            expected,
            found: format!("{:?}", lossy(keyword.as_bytes())),
        }
    }

    fn archive(&mut self, visitor: &mut impl Visitor) -> Result<(), NarError> {
        let header = self.keyword("nix-archive-1");
        match header {
            Ok(k) if k.as_bytes() == b"nix-archive-1" => {}
            Ok(_) | Err(NarError::UnexpectedToken { .. }) => return Err(NarError::NotANar),
            Err(e) => return Err(e),
        }
        let mut stack: Vec<Frame> = Vec::new();
        if self.node(visitor)? {
            stack.push(Frame {
                path_len: 0,
                previous: None,
            });
        }
        let mut name = Vec::new();
        while let Some(frame) = stack.last_mut() {
            let keyword = self.keyword("`entry` or `)`")?;
            match keyword.as_bytes() {
                b")" => {
                    let path_len = frame.path_len;
                    stack.pop();
                    if !stack.is_empty() {
                        // The end of the directory's own entry.
                        self.expect(")")?;
                        self.path.truncate(path_len);
                    }
                }
                b"entry" => {
                    self.expect("(")?;
                    self.expect("name")?;
                    self.source
                        .read_string(&mut name, MAX_NAME_LEN, "entry name", &self.path)?;
                    let frame = stack.last_mut().expect("a directory is open");
                    check_name(&name, frame.previous.as_deref(), &self.path)?;
                    match &mut frame.previous {
                        Some(previous) => {
                            previous.clear();
                            previous.extend_from_slice(&name);
                        }
                        None => frame.previous = Some(name.clone()),
                    }
                    let path_len = self.path.len();
                    if !self.path.is_empty() {
                        self.path.push(b'/');
                    }
                    self.path.extend_from_slice(&name);
                    if stack.len() > self.limits.max_depth {
                        return Err(NarError::TooDeep {
                            path: self.path(),
                            limit: self.limits.max_depth,
                        });
                    }
                    self.expect("node")?;
                    if self.node(visitor)? {
                        stack.push(Frame {
                            path_len,
                            previous: None,
                        });
                    } else {
                        self.expect(")")?;
                        self.path.truncate(path_len);
                    }
                }
                _ => return Err(self.unexpected(&keyword, "`entry` or `)`")),
            }
        }
        Ok(())
    }

    /// Reads a node up to its end, or up to its first entry if it is a
    /// directory (then true).
    fn node(&mut self, visitor: &mut impl Visitor) -> Result<bool, NarError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(NarError::TooManyEntries {
                path: self.path(),
                limit: self.limits.max_entries,
            });
        }
        self.expect("(")?;
        self.expect("type")?;
        let kind = self.keyword("`regular`, `symlink` or `directory`")?;
        match kind.as_bytes() {
            b"regular" => {
                let next = self.keyword("`executable` or `contents`")?;
                let executable = match next.as_bytes() {
                    b"executable" => {
                        self.expect("")?;
                        self.expect("contents")?;
                        true
                    }
                    b"contents" => false,
                    _ => return Err(self.unexpected(&next, "`executable` or `contents`")),
                };
                self.file(executable, visitor)?;
                self.expect(")")?;
                Ok(false)
            }
            b"symlink" => {
                self.expect("target")?;
                let mut target = Vec::new();
                self.source.read_string(
                    &mut target,
                    MAX_TARGET_LEN,
                    "symlink target",
                    &self.path,
                )?;
                if target.is_empty() {
                    return Err(self.symlink_error("is empty"));
                }
                if target.contains(&0) {
                    return Err(self.symlink_error("contains a NUL byte"));
                }
                self.expect(")")?;
                let result = visitor.visit(
                    to_path(&self.path),
                    Node::Symlink {
                        target: to_path(&target),
                    },
                );
                self.visited(result)?;
                Ok(false)
            }
            b"directory" => {
                let result = visitor.visit(to_path(&self.path), Node::Directory);
                self.visited(result)?;
                Ok(true)
            }
            _ => Err(self.unexpected(&kind, "`regular`, `symlink` or `directory`")),
        }
    }

    fn file(&mut self, executable: bool, visitor: &mut impl Visitor) -> Result<(), NarError> {
        let offset = self.source.offset;
        let size = self.source.read_u64()?;
        let padding = (8 - size % 8) % 8;
        let room = self.source.limit - self.source.offset;
        if size > room || room - size < padding {
            return Err(NarError::TooLong {
                offset,
                path: self.path(),
                what: "file contents",
                length: size,
                limit: room,
            });
        }
        let mut contents = Contents {
            source: &mut self.source,
            remaining: size,
        };
        let result = visitor.visit(
            to_path(&self.path),
            Node::File {
                executable,
                size,
                contents: &mut contents,
            },
        );
        let remaining = contents.remaining;
        self.visited(result)?;
        self.source.skip(remaining)?;
        self.source.read_padding(size)
    }

    /// The walk's error for a visitor's result: the archive's own failure
    /// first (the visitor saw only its effect), then the visitor's.
    fn visited(&mut self, result: io::Result<()>) -> Result<(), NarError> {
        if let Some(failure) = self.source.take_failure() {
            return Err(failure);
        }
        result.map_err(|source| NarError::Visitor {
            path: self.path(),
            source,
        })
    }

    fn symlink_error(&self, reason: &'static str) -> NarError {
        NarError::Symlink {
            path: self.path(),
            reason,
        }
    }
}

struct Keyword {
    bytes: [u8; MAX_KEYWORD_LEN as usize],
    len: usize,
    offset: u64,
}

impl Keyword {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn check_name(name: &[u8], previous: Option<&[u8]>, dir: &[u8]) -> Result<(), NarError> {
    let invalid = |reason| NarError::InvalidName {
        path: to_path(dir).to_path_buf(),
        name: lossy(name),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("is empty"));
    }
    if name == b"." || name == b".." {
        return Err(invalid("is `.` or `..`"));
    }
    if name.contains(&b'/') {
        return Err(invalid("contains `/`"));
    }
    if name.contains(&0) {
        return Err(invalid("contains a NUL byte"));
    }
    if let Some(previous) = previous {
        if name <= previous {
            return Err(NarError::Unsorted {
                path: to_path(dir).to_path_buf(),
                name: lossy(name),
                previous: lossy(previous),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary_cache::testing::{nar, nar_string, TestNode};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn file(contents: &[u8]) -> TestNode {
        TestNode::File {
            executable: false,
            contents: contents.to_vec(),
        }
    }

    fn dir(entries: &[(&str, TestNode)]) -> TestNode {
        TestNode::Directory(
            entries
                .iter()
                .map(|(n, node)| (n.as_bytes().to_vec(), node.clone()))
                .collect(),
        )
    }

    fn sample() -> TestNode {
        dir(&[
            (
                "bin",
                dir(&[(
                    "hello",
                    TestNode::File {
                        executable: true,
                        contents: b"#!/bin/sh\necho hello\n".to_vec(),
                    },
                )]),
            ),
            ("empty", dir(&[])),
            ("link", TestNode::Symlink(b"bin/hello".to_vec())),
            ("zz", file(b"12345678")),
        ])
    }

    /// Every node, with contents read in full.
    fn collect(bytes: &[u8]) -> Result<(Vec<(String, String)>, NarSummary), NarError> {
        let mut seen = Vec::new();
        let summary = walk(bytes, &mut |path: &Path, node: Node<'_>| {
            let what = match node {
                Node::Directory => "dir".to_string(),
                Node::Symlink { target } => format!("-> {}", target.display()),
                Node::File {
                    executable,
                    size,
                    contents,
                } => {
                    let mut data = Vec::new();
                    contents.read_to_end(&mut data)?;
                    assert_eq!(data.len() as u64, size);
                    format!("{}{}", if executable { "x " } else { "" }, lossy(&data))
                }
            };
            seen.push((path.display().to_string(), what));
            Ok(())
        })?;
        Ok((seen, summary))
    }

    #[test]
    fn walks_in_archive_order_with_paths_and_contents() {
        let bytes = nar(&sample());
        let (seen, summary) = collect(&bytes).unwrap();
        let expected = [
            ("", "dir"),
            ("bin", "dir"),
            ("bin/hello", "x #!/bin/sh\necho hello\n"),
            ("empty", "dir"),
            ("link", "-> bin/hello"),
            ("zz", "12345678"),
        ];
        assert_eq!(
            seen,
            expected
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(summary.size, bytes.len() as u64);
        assert_eq!(summary.sha256.0, <[u8; 32]>::from(Sha256::digest(&bytes)));
        assert_eq!(summary.entries, 6);
    }

    #[test]
    fn the_root_may_be_a_file_or_a_symlink() {
        let (seen, _) = collect(&nar(&file(b"just a file"))).unwrap();
        assert_eq!(seen, [("".to_string(), "just a file".to_string())]);
        let (seen, _) = collect(&nar(&TestNode::Symlink(b"/nix/store/x".to_vec()))).unwrap();
        assert_eq!(seen, [("".to_string(), "-> /nix/store/x".to_string())]);
    }

    #[test]
    fn unread_contents_are_skipped_and_still_hashed() {
        let big = vec![b'x'; 300_000];
        let tree = dir(&[("a", file(&big)), ("b", file(b"after"))]);
        let bytes = nar(&tree);
        let mut names = Vec::new();
        let summary = walk(&bytes[..], &mut |path: &Path, node: Node<'_>| {
            if let Node::File { contents, .. } = node {
                // Read a little of the big file only.
                contents.take(10).read_to_end(&mut Vec::new())?;
            }
            names.push(path.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert_eq!(names.len(), 3);
        assert_eq!(summary.sha256.0, <[u8; 32]>::from(Sha256::digest(&bytes)));
    }

    #[test]
    fn listing_has_the_tree_without_contents() {
        let listing = listing(&nar(&sample())[..], &NarLimits::default()).unwrap();
        let kinds: Vec<_> = listing
            .entries
            .iter()
            .map(|e| (e.path.display().to_string(), e.kind.clone()))
            .collect();
        assert_eq!(
            kinds[2],
            (
                "bin/hello".to_string(),
                EntryKind::File {
                    executable: true,
                    size: 21
                }
            )
        );
        assert_eq!(
            kinds[4].1,
            EntryKind::Symlink {
                target: "bin/hello".into()
            }
        );
        let limits = NarLimits {
            max_entries: 5,
            ..NarLimits::default()
        };
        assert!(matches!(
            super::listing(&nar(&sample())[..], &limits),
            Err(NarError::TooManyEntries { limit: 5, .. })
        ));
    }

    fn refused(tree: &TestNode) -> NarError {
        collect(&nar(tree)).unwrap_err()
    }

    #[test]
    fn refuses_dot_dot() {
        let err = refused(&dir(&[("..", file(b"x"))]));
        assert!(
            matches!(
                err,
                NarError::InvalidName {
                    reason: "is `.` or `..`",
                    ..
                }
            ),
            "{err}"
        );
        let err = refused(&dir(&[("sub", dir(&[(".", file(b"x"))]))]));
        assert_eq!(err.to_string(), "sub: entry name \".\" is `.` or `..`");
    }

    #[test]
    fn refuses_slash_nul_and_empty_names() {
        let err = refused(&dir(&[("a/b", file(b"x"))]));
        assert!(
            matches!(
                err,
                NarError::InvalidName {
                    reason: "contains `/`",
                    ..
                }
            ),
            "{err}"
        );
        let err = refused(&dir(&[("a\0b", file(b"x"))]));
        assert!(
            matches!(
                err,
                NarError::InvalidName {
                    reason: "contains a NUL byte",
                    ..
                }
            ),
            "{err}"
        );
        let err = refused(&dir(&[("", file(b"x"))]));
        assert!(
            matches!(
                err,
                NarError::InvalidName {
                    reason: "is empty",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_long_names_before_reading_them() {
        assert!(collect(&nar(&dir(&[(&"n".repeat(255), file(b"x"))]))).is_ok());
        let err = refused(&dir(&[(&"n".repeat(256), file(b"x"))]));
        assert!(
            matches!(
                err,
                NarError::TooLong {
                    what: "entry name",
                    length: 256,
                    limit: 255,
                    ..
                }
            ),
            "{err}"
        );
        // A name that claims 2^60 bytes is refused from its length alone.
        let mut bytes = nar(&dir(&[("a", file(b"x"))]));
        let at = find(&bytes, &nar_string(b"a"));
        bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            collect(&bytes).unwrap_err(),
            NarError::TooLong {
                what: "entry name",
                ..
            }
        ));
    }

    #[test]
    fn refuses_duplicate_entries() {
        let err = refused(&dir(&[("a", file(b"1")), ("a", file(b"2"))]));
        assert!(matches!(err, NarError::Unsorted { .. }), "{err}");
    }

    #[test]
    fn refuses_unsorted_entries() {
        let err = refused(&dir(&[("b", file(b"1")), ("a", file(b"2"))]));
        assert_eq!(
            err.to_string(),
            "<root>: entry \"a\" comes after \"b\", not in strictly ascending order"
        );
        // Byte order: "B" (0x42) sorts before "a" (0x61).
        assert!(collect(&nar(&dir(&[("B", file(b"1")), ("a", file(b"2"))]))).is_ok());
    }

    #[test]
    fn refuses_bad_symlinks() {
        let err = refused(&dir(&[("l", TestNode::Symlink(Vec::new()))]));
        assert!(
            matches!(
                err,
                NarError::Symlink {
                    reason: "is empty",
                    ..
                }
            ),
            "{err}"
        );
        let err = refused(&dir(&[("l", TestNode::Symlink(b"a\0b".to_vec()))]));
        assert!(
            matches!(
                err,
                NarError::Symlink {
                    reason: "contains a NUL byte",
                    ..
                }
            ),
            "{err}"
        );
        let err = refused(&TestNode::Symlink(vec![b'a'; 5000]));
        assert!(
            matches!(
                err,
                NarError::TooLong {
                    what: "symlink target",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_unknown_tokens() {
        let good = nar(&sample());
        for (from, to) in [
            (&b"regular"[..], &b"regulaR"[..]),
            (b"directory", b"Directory"),
            (b"symlink", b"hardlink"),
            (b"contents", b"Contents"),
            (b"nix-archive-1", b"nix-archive-2"),
        ] {
            let at = find(&good, &nar_string(from));
            let mut bytes = good.clone();
            bytes[at..at + 8 + to.len()].copy_from_slice(&nar_string(to)[..8 + to.len()]);
            assert!(collect(&bytes).is_err(), "{:?} accepted", lossy(to));
        }
        // An "entry" keyword with a huge length is refused from the length.
        let at = find(&good, &nar_string(b"entry"));
        let mut bytes = good.clone();
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            collect(&bytes).unwrap_err(),
            NarError::UnexpectedToken { .. }
        ));
        assert!(matches!(
            collect(b"garbage!").unwrap_err(),
            NarError::NotANar | NarError::Truncated { .. }
        ));
    }

    #[test]
    fn refuses_nonzero_padding() {
        // "zz" contents are 8 bytes; "hello" contents 21 (3 bytes of padding).
        let good = nar(&sample());
        let body = b"#!/bin/sh\necho hello\n";
        let at = find(&good, body) + body.len();
        let mut bytes = good.clone();
        bytes[at] = 1;
        assert!(matches!(
            collect(&bytes).unwrap_err(),
            NarError::Padding { .. }
        ));
        // And the padding of a name ("bin", 5 bytes of padding).
        let at = find(&good, &nar_string(b"bin")) + 8 + 3;
        let mut bytes = good.clone();
        bytes[at + 4] = b'x';
        assert!(matches!(
            collect(&bytes).unwrap_err(),
            NarError::Padding { .. }
        ));
    }

    #[test]
    fn refuses_truncation_anywhere() {
        let good = nar(&sample());
        for len in 0..good.len() {
            match collect(&good[..len]) {
                Err(NarError::Truncated { .. }) | Err(NarError::NotANar) => {}
                other => panic!("cut at {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_trailing_garbage() {
        let mut bytes = nar(&sample());
        let end = bytes.len() as u64;
        bytes.extend(nar_string(b")"));
        assert!(matches!(
            collect(&bytes).unwrap_err(),
            NarError::TrailingData { offset } if offset == end
        ));
    }

    #[test]
    fn refuses_deep_nesting() {
        let mut tree = file(b"x");
        for _ in 0..20 {
            tree = dir(&[("d", tree)]);
        }
        let limits = NarLimits {
            max_depth: 10,
            ..NarLimits::default()
        };
        let err = walk_with(
            &nar(&tree)[..],
            &limits,
            &mut |_: &Path, _: Node<'_>| Ok(()),
        )
        .unwrap_err();
        assert!(matches!(err, NarError::TooDeep { limit: 10, .. }), "{err}");
        assert!(
            err.to_string().starts_with("d/d/d/d/d/d/d/d/d/d/d:"),
            "{err}"
        );
        // 20 levels are fine under the default.
        assert!(collect(&nar(&tree)).is_ok());
    }

    #[test]
    fn refuses_lengths_beyond_the_size_limit() {
        let bytes = nar(&dir(&[("f", file(&vec![0u8; 1000]))]));
        let limits = NarLimits {
            max_size: bytes.len() as u64 - 1,
            ..NarLimits::default()
        };
        let err = walk_with(&bytes[..], &limits, &mut |_: &Path, _: Node<'_>| Ok(())).unwrap_err();
        assert!(matches!(err, NarError::TooLong { .. }), "{err}");
        // A file that claims more than the limit is refused before the
        // visitor sees it.
        let mut bytes = nar(&dir(&[("f", file(b"abc"))]));
        let at = find(&bytes, b"abc") - 8;
        bytes[at..at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        let mut visited = 0;
        let err = walk(&bytes[..], &mut |_: &Path, node: Node<'_>| {
            if let Node::File { .. } = node {
                visited += 1;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                NarError::TooLong {
                    what: "file contents",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(visited, 0);
        // Exactly the limit is fine.
        let bytes = nar(&sample());
        let limits = NarLimits {
            max_size: bytes.len() as u64,
            ..NarLimits::default()
        };
        assert!(walk_with(&bytes[..], &limits, &mut |_: &Path, _: Node<'_>| Ok(())).is_ok());
    }

    #[test]
    fn a_failing_reader_is_the_walks_error_not_the_visitors() {
        struct Failing<'a>(&'a [u8]);
        impl Read for Failing<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::other("NarHash mismatch"));
                }
                let n = self.0.read(out)?;
                Ok(n)
            }
        }
        let bytes = nar(&dir(&[("f", file(&vec![1u8; 200_000]))]));
        let cut = &bytes[..150_000];
        let err = walk(Failing(cut), &mut |_: &Path, node: Node<'_>| {
            if let Node::File { contents, .. } = node {
                io::copy(contents, &mut io::sink())
                    .map_err(|e| io::Error::other(format!("packing: {e}")))?;
            }
            Ok(())
        })
        .unwrap_err();
        match err {
            NarError::Read { source, .. } => assert_eq!(source.to_string(), "NarHash mismatch"),
            other => panic!("{other:?}"),
        }
        // A visitor's own error names the entry.
        let err = walk(&bytes[..], &mut |path: &Path, _: Node<'_>| {
            if path.as_os_str().is_empty() {
                Ok(())
            } else {
                Err(io::Error::other("disk full"))
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "f: disk full");
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("needle in the NAR")
    }

    /// Random trees with names that are valid and unique per directory.
    fn tree() -> impl Strategy<Value = TestNode> {
        let leaf = prop_oneof![
            (
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(executable, contents)| TestNode::File {
                    executable,
                    contents
                }),
            proptest::collection::vec(1u8..=255, 1..40).prop_map(TestNode::Symlink),
        ];
        leaf.prop_recursive(5, 64, 8, |inner| {
            proptest::collection::btree_map(
                proptest::collection::vec(
                    any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
                    1..12,
                )
                .prop_filter("not . or ..", |n| n != b"." && n != b".."),
                inner,
                0..6,
            )
            .prop_map(|entries: BTreeMap<Vec<u8>, TestNode>| {
                TestNode::Directory(entries.into_iter().collect())
            })
        })
    }

    /// The tree a walk sees, rebuilt from its pre-order visits.
    fn rebuild(bytes: &[u8]) -> TestNode {
        let mut visits: Vec<(Vec<u8>, TestNode)> = Vec::new();
        walk(bytes, &mut |path: &Path, node: Node<'_>| {
            let node = match node {
                Node::Directory => TestNode::Directory(Vec::new()),
                Node::Symlink { target } => {
                    TestNode::Symlink(target.as_os_str().as_bytes().to_vec())
                }
                Node::File {
                    executable,
                    contents,
                    ..
                } => {
                    let mut data = Vec::new();
                    contents.read_to_end(&mut data)?;
                    TestNode::File {
                        executable,
                        contents: data,
                    }
                }
            };
            visits.push((path.as_os_str().as_bytes().to_vec(), node));
            Ok(())
        })
        .unwrap();
        fn build(
            visits: &mut std::iter::Peekable<std::vec::IntoIter<(Vec<u8>, TestNode)>>,
            prefix: &[u8],
        ) -> TestNode {
            let (_, node) = visits.next().unwrap();
            match node {
                TestNode::Directory(_) => {
                    let mut entries = Vec::new();
                    while let Some((path, _)) = visits.peek() {
                        let child = if prefix.is_empty() {
                            path.as_slice()
                        } else if path.starts_with(prefix) && path.get(prefix.len()) == Some(&b'/')
                        {
                            &path[prefix.len() + 1..]
                        } else {
                            break;
                        };
                        if child.contains(&b'/') {
                            break;
                        }
                        let name = child.to_vec();
                        let full = path.clone();
                        entries.push((name, build(visits, &full)));
                    }
                    TestNode::Directory(entries)
                }
                other => other,
            }
        }
        let mut iter = visits.into_iter().peekable();
        let root = build(&mut iter, b"");
        assert!(iter.next().is_none());
        root
    }

    proptest! {
        #[test]
        fn write_then_read_round_trips(tree in tree()) {
            let bytes = nar(&tree);
            prop_assert_eq!(rebuild(&bytes), tree);
            let summary = walk(&bytes[..], &mut |_: &Path, _: Node<'_>| Ok(())).unwrap();
            prop_assert_eq!(summary.size, bytes.len() as u64);
            prop_assert_eq!(summary.sha256.0, <[u8; 32]>::from(Sha256::digest(&bytes)));
        }

        /// Reading in odd-sized pieces changes nothing.
        #[test]
        fn any_chunking_reads_the_same(tree in tree(), chunk in 1usize..20) {
            struct Chunked<'a>(&'a [u8], usize);
            impl Read for Chunked<'_> {
                fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                    let n = out.len().min(self.1).min(self.0.len());
                    out[..n].copy_from_slice(&self.0[..n]);
                    self.0 = &self.0[n..];
                    Ok(n)
                }
            }
            let bytes = nar(&tree);
            let whole = listing(&bytes[..], &NarLimits::default()).unwrap();
            let pieces = listing(Chunked(&bytes, chunk), &NarLimits::default()).unwrap();
            prop_assert_eq!(whole, pieces);
        }

        /// Corrupting any byte never panics and never passes unnoticed
        /// unless the NAR still parses to a tree (e.g. a changed content byte).
        #[test]
        fn corruption_never_panics(tree in tree(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = nar(&tree);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = walk(&bytes[..], &mut |_: &Path, node: Node<'_>| {
                if let Node::File { contents, .. } = node {
                    io::copy(contents, &mut io::sink())?;
                }
                Ok(())
            });
        }
    }
}
