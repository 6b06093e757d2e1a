//! Deterministic layer tarballs: tar -> gzip or zstd -> a sink, with the
//! sha256 of the tar (the layer's `diff_id`) and of the compressed bytes
//! (its `digest`) computed in the same single streaming pass. Compression
//! runs on every core ([`super::compress`]).
//!
//! Every layer is written through one [`LayerWriter`], whatever its
//! entries come from (a Nix store on disk, a binary cache's NARs, the
//! customisation layer's tree), so a store path gives the same bytes
//! whichever way it arrived. The archive is a function of the store
//! paths' NAR serialisation alone: entries in a fixed order (parents
//! before children, siblings by name bytes, as in a NAR), mtime 1 (as in
//! the Nix store), uid/gid 0 with no user or group names, directories
//! 0555, files 0444 or 0555 (a NAR keeps only whether a file is
//! executable), symlinks as they are. Directories (empty ones too),
//! symlinks (whatever they point at), long names (GNU long-name records)
//! and non-ASCII names are kept. A hard link between two files of a store
//! path is written as two files: a NAR cannot hold one, so a path built
//! here and the same path substituted from a cache give the same layer.
//! Memory does not grow with the layer: files are copied through fixed
//! buffers.
//!
//! ```no_run
//! use nixery::builder::compress::Compression;
//! let packed = nixery::builder::pack::pack_store_paths(&["/nix/store/…-hello".to_string()], "/tmp/layer".as_ref(), Compression::Gzip).unwrap();
//! println!("{} ({} bytes), diff_id {}", packed.digest, packed.size, packed.diff_id);
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::compress::{Compression, Encoder};

/// The modification time of every entry, as in the Nix store.
pub const MTIME: u64 = 1;
/// Modes of store path entries, as Nix restores a NAR.
const DIR_MODE: u32 = 0o555;
const FILE_MODE: u32 = 0o444;
const EXECUTABLE_MODE: u32 = 0o555;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("packing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("packing {path}: file changed size while being read")]
    Changed { path: PathBuf },
    #[error("packing {path}: not an absolute store path")]
    NotAbsolute { path: PathBuf },
    /// The build this layer belongs to is no longer wanted.
    #[error("packing stopped: the build was cancelled")]
    Cancelled,
    /// Where the entries came from cannot give them (a binary cache that
    /// lost a path, failed, or sent what a check refused).
    #[error("packing: {0}")]
    NotHere(super::NotHere),
}

/// What packing a layer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `sha256:<hex>` of the compressed bytes.
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    /// Size of the compressed bytes.
    pub size: u64,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

/// Writes one layer into a sink: entries go in in the order they are
/// given, and [`LayerWriter::finish`] says what was written.
pub struct LayerWriter<W: Write> {
    tar: tar::Builder<Hashing<Encoder<Hashing<W>>>>,
    /// Set when the build is no longer wanted: the next entry stops it.
    cancelled: Option<Arc<AtomicBool>>,
}

/// Where an error of the sink is reported.
fn sink_error(source: io::Error) -> PackError {
    PackError::Io {
        path: PathBuf::from("<layer>"),
        source,
    }
}

impl<W: Write> LayerWriter<W> {
    pub fn new(sink: W, compression: Compression) -> Result<LayerWriter<W>, PackError> {
        let encoder = Encoder::new(Hashing::new(sink), compression).map_err(sink_error)?;
        let mut tar = tar::Builder::new(Hashing::new(encoder));
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(LayerWriter {
            tar,
            cancelled: None,
        })
    }

    /// Stops at the next entry once `flag` is set.
    pub fn cancel_on(&mut self, flag: Arc<AtomicBool>) {
        self.cancelled = Some(flag);
    }

    /// The flag given to [`LayerWriter::cancel_on`], for readers of the
    /// entries to stop on too (a download need not run to the end of the
    /// file it is in).
    pub fn cancel_flag(&self) -> Option<&Arc<AtomicBool>> {
        self.cancelled.as_ref()
    }

    fn go_on(&self) -> Result<(), PackError> {
        match &self.cancelled {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(PackError::Cancelled),
            _ => Ok(()),
        }
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> PackError {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    }

    /// A directory of a store path (mode 0555).
    pub fn store_dir(&mut self, name: &Path) -> Result<(), PackError> {
        self.dir(name, DIR_MODE)
    }

    /// A directory with its own mode (the customisation layer's).
    pub fn dir(&mut self, name: &Path, mode: u32) -> Result<(), PackError> {
        self.go_on()?;
        let mut h = header(EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, name, io::empty())
            .map_err(Self::io(name))
    }

    pub fn symlink(&mut self, name: &Path, target: &Path) -> Result<(), PackError> {
        self.go_on()?;
        let mut h = header(EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, name, target)
            .map_err(Self::io(name))
    }

    /// A small file held in memory, with its own mode.
    pub fn bytes(&mut self, name: &Path, mode: u32, data: &[u8]) -> Result<(), PackError> {
        self.go_on()?;
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, name, data)
            .map_err(Self::io(name))
    }

    /// A file of a store path: `size` bytes read from `contents` (which
    /// must give exactly that many).
    pub fn store_file(
        &mut self,
        name: &Path,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), PackError> {
        self.go_on()?;
        let mode = if executable {
            EXECUTABLE_MODE
        } else {
            FILE_MODE
        };
        let mut reader = CountingReader {
            inner: contents.take(size),
            count: 0,
        };
        let mut h = header(EntryType::Regular, mode, size);
        self.tar
            .append_data(&mut h, name, &mut reader)
            .map_err(Self::io(name))?;
        if reader.count != size {
            return Err(PackError::Changed {
                path: name.to_path_buf(),
            });
        }
        Ok(())
    }

    /// The directories every store path layer starts with.
    pub fn store_root(&mut self) -> Result<(), PackError> {
        self.dir(Path::new("nix"), 0o755)?;
        self.dir(Path::new("nix/store"), 0o755)
    }

    /// Everything below a store path on disk, parents first, siblings by
    /// name, normalised as a NAR would have it.
    pub fn walk(&mut self, disk_root: &Path, name_root: &Path) -> Result<(), PackError> {
        let mut stack: Vec<(PathBuf, PathBuf)> =
            vec![(disk_root.to_path_buf(), name_root.to_path_buf())];
        while let Some((disk, name)) = stack.pop() {
            let meta = std::fs::symlink_metadata(&disk).map_err(Self::io(&disk))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = std::fs::read_link(&disk).map_err(Self::io(&disk))?;
                self.symlink(&name, &target)?;
            } else if kind.is_dir() {
                self.store_dir(&name)?;
                let mut children: Vec<OsString> = std::fs::read_dir(&disk)
                    .map_err(Self::io(&disk))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(Self::io(&disk))?;
                children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                // Reversed onto the stack, so they come off in order.
                for child in children.into_iter().rev() {
                    stack.push((disk.join(&child), name.join(&child)));
                }
            } else if kind.is_file() {
                let mut file = File::open(&disk).map_err(Self::io(&disk))?;
                let executable = meta.mode() & 0o100 != 0;
                self.store_file(&name, executable, meta.len(), &mut file)
                    .map_err(|e| match e {
                        PackError::Changed { .. } => PackError::Changed { path: disk.clone() },
                        other => other,
                    })?;
            }
            // Sockets, fifos and devices cannot be in a Nix store path.
        }
        Ok(())
    }

    /// Ends the archive and the compressed stream; what was written, and
    /// the sink.
    pub fn finish(self) -> Result<(Packed, W), PackError> {
        let tar_sink = self.tar.into_inner().map_err(sink_error)?;
        let diff_id = format!("sha256:{}", hex::encode(tar_sink.hash.finalize()));
        let tar_size = tar_sink.count;
        let mut compressed = tar_sink.inner.finish().map_err(sink_error)?;
        compressed.flush().map_err(sink_error)?;
        let digest = format!("sha256:{}", hex::encode(compressed.hash.finalize()));
        let packed = Packed {
            digest,
            diff_id,
            size: compressed.count,
            tar_size,
        };
        Ok((packed, compressed.inner))
    }
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// A layer file at `out`: created, written by `write`, flushed to disk.
pub fn pack_file(
    out: &Path,
    compression: Compression,
    write: impl FnOnce(&mut LayerWriter<BufWriter<File>>) -> Result<(), PackError>,
) -> Result<Packed, PackError> {
    let err = |source| PackError::Io {
        path: out.to_path_buf(),
        source,
    };
    let file = File::create(out).map_err(err)?;
    let mut writer = LayerWriter::new(BufWriter::with_capacity(256 * 1024, file), compression)?;
    write(&mut writer)?;
    let (packed, sink) = writer.finish()?;
    let file = sink.into_inner().map_err(|e| err(e.into_error()))?;
    file.sync_all().map_err(err)?;
    Ok(packed)
}

/// Writes whole store paths (`/nix/store/...`, read from disk) into a
/// layer, under `nix/store/` in the archive.
pub fn write_store_paths<W: Write>(
    writer: &mut LayerWriter<W>,
    paths: &[String],
) -> Result<(), PackError> {
    let mut sorted: Vec<&String> = paths.iter().collect();
    sorted.sort();
    sorted.dedup();
    writer.store_root()?;
    for path in sorted {
        let disk = Path::new(path);
        let name = disk.strip_prefix("/").map_err(|_| PackError::NotAbsolute {
            path: disk.to_path_buf(),
        })?;
        writer.walk(disk, name)?;
    }
    Ok(())
}

/// Packs whole store paths into one layer file at `out`.
pub fn pack_store_paths(
    paths: &[String],
    out: &Path,
    compression: Compression,
) -> Result<Packed, PackError> {
    pack_file(out, compression, |writer| write_store_paths(writer, paths))
}

/// A file tree held in memory (the customisation layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    Symlink { target: PathBuf },
    File { mode: u32, data: Vec<u8> },
}

/// Archive path (relative, no leading `/`) -> node. Every parent directory
/// must be present; the map's order is the archive order.
pub type Tree = BTreeMap<PathBuf, Node>;

/// Writes an in-memory tree into a layer.
pub fn write_tree<W: Write>(writer: &mut LayerWriter<W>, tree: &Tree) -> Result<(), PackError> {
    for (name, node) in tree {
        match node {
            Node::Dir { mode } => writer.dir(name, *mode)?,
            Node::Symlink { target } => writer.symlink(name, target)?,
            Node::File { mode, data } => writer.bytes(name, *mode, data)?,
        }
    }
    Ok(())
}

/// Packs an in-memory tree into one layer file at `out`.
pub fn pack_tree(tree: &Tree, out: &Path, compression: Compression) -> Result<Packed, PackError> {
    pack_file(out, compression, |writer| write_tree(writer, tree))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// Builds a tree with the awkward cases on disk.
    fn awkward_tree(root: &Path) {
        let deep = root
            .join("d".repeat(90))
            .join("e".repeat(90))
            .join("f".repeat(90));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("long-file-name.txt"), b"deep").unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("ünïcødé 文件.txt"), "unicode").unwrap();
        std::fs::write(root.join("exec"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("exec"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        std::fs::write(root.join("a"), vec![1u8; 100_000]).unwrap();
        std::fs::hard_link(root.join("a"), root.join("b")).unwrap();
        symlink("a", root.join("rel")).unwrap();
        symlink("/nowhere/at/all", root.join("dangling")).unwrap();
        symlink(deep.join("long-file-name.txt"), root.join("long-target")).unwrap();
    }

    /// name, kind, mode, link target, content
    type Unpacked = (String, EntryType, u32, Option<String>, Vec<u8>);

    /// Reads an archive back.
    fn unpack(layer: &Path) -> Vec<Unpacked> {
        unpack_from(GzDecoder::new(File::open(layer).unwrap()))
    }

    fn unpack_from(reader: impl Read) -> Vec<Unpacked> {
        let mut archive = tar::Archive::new(reader);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                assert_eq!(
                    (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
                    (0, 0, MTIME)
                );
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, h.entry_type(), h.mode().unwrap(), link, data)
            })
            .collect()
    }

    #[test]
    fn unpacking_what_was_packed_gives_the_same_tree() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("nix-store-like");
        awkward_tree(&src);
        let layer = dir.path().join("layer.tar.gz");
        let packed = pack_store_paths(
            &[src.to_str().unwrap().to_string()],
            &layer,
            Compression::Gzip,
        )
        .unwrap();
        assert_eq!(packed.size, std::fs::metadata(&layer).unwrap().len());
        assert_eq!(
            packed.digest,
            crate::oci::digest::sha256_digest(&std::fs::read(&layer).unwrap())
        );

        // Extract with the tar crate and compare with the source tree.
        let out = dir.path().join("out");
        tar::Archive::new(GzDecoder::new(File::open(&layer).unwrap()))
            .unpack(&out)
            .unwrap();
        let rel = src.strip_prefix("/").unwrap();
        let copy = out.join(rel);
        let deep = Path::new(&"d".repeat(90))
            .join("e".repeat(90))
            .join("f".repeat(90))
            .join("long-file-name.txt");
        assert_eq!(std::fs::read(copy.join(&deep)).unwrap(), b"deep");
        assert!(copy.join("empty").is_dir());
        assert_eq!(
            std::fs::read_to_string(copy.join("ünïcødé 文件.txt")).unwrap(),
            "unicode"
        );
        assert_eq!(
            std::fs::metadata(copy.join("exec")).unwrap().mode() & 0o7777,
            0o555
        );
        // A hard link is two files, as a NAR has it; modes are a NAR's.
        assert_eq!(
            std::fs::read(copy.join("a")).unwrap(),
            std::fs::read(copy.join("b")).unwrap()
        );
        assert_ne!(
            std::fs::metadata(copy.join("a")).unwrap().ino(),
            std::fs::metadata(copy.join("b")).unwrap().ino()
        );
        assert_eq!(
            std::fs::metadata(copy.join("a")).unwrap().mode() & 0o7777,
            0o444
        );
        assert_eq!(
            std::fs::read_link(copy.join("rel")).unwrap(),
            Path::new("a")
        );
        assert_eq!(
            std::fs::read_link(copy.join("dangling")).unwrap(),
            Path::new("/nowhere/at/all")
        );
        assert_eq!(
            std::fs::read_link(copy.join("long-target")).unwrap(),
            src.join(&deep)
        );

        // The archive's own view: no hard link entry, parents before children.
        let entries = unpack(&layer);
        let b = entries.iter().find(|e| e.0.ends_with("/b")).unwrap();
        assert_eq!(b.1, EntryType::Regular);
        let names: Vec<&String> = entries.iter().map(|e| &e.0).collect();
        for (i, name) in names.iter().enumerate() {
            let parent = Path::new(name.as_str()).parent().unwrap();
            if parent.starts_with(rel) {
                assert!(
                    names[..i].iter().any(|n| Path::new(n.as_str()) == parent),
                    "{name} before its parent"
                );
            }
        }
    }

    #[test]
    fn packing_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        awkward_tree(&src);
        let paths = [src.to_str().unwrap().to_string()];
        let one = pack_store_paths(&paths, &dir.path().join("1"), Compression::Gzip).unwrap();
        // Touching files changes mtimes and atimes, not the layer.
        std::fs::write(src.join("exec2"), b"x").unwrap();
        std::fs::remove_file(src.join("exec2")).unwrap();
        let two = pack_store_paths(&paths, &dir.path().join("2"), Compression::Gzip).unwrap();
        assert_eq!(one, two);
        assert_eq!(
            std::fs::read(dir.path().join("1")).unwrap(),
            std::fs::read(dir.path().join("2")).unwrap()
        );
    }

    #[test]
    fn trees_pack_in_map_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new();
        tree.insert("bin".into(), Node::Dir { mode: 0o755 });
        tree.insert(
            "bin/sh".into(),
            Node::Symlink {
                target: "/nix/store/x-busybox/bin/sh".into(),
            },
        );
        tree.insert("tmp".into(), Node::Dir { mode: 0o1777 });
        tree.insert("etc".into(), Node::Dir { mode: 0o755 });
        tree.insert(
            "etc/passwd".into(),
            Node::File {
                mode: 0o644,
                data: b"root:x:0:0::/:/bin/sh\n".to_vec(),
            },
        );
        let layer = dir.path().join("custom");
        pack_tree(&tree, &layer, Compression::Gzip).unwrap();
        let entries = unpack(&layer);
        let names: Vec<&str> = entries.iter().map(|e| e.0.trim_end_matches('/')).collect();
        assert_eq!(names, ["bin", "bin/sh", "etc", "etc/passwd", "tmp"]);
        assert_eq!(entries[4].2, 0o1777);
        assert_eq!(entries[3].4, b"root:x:0:0::/:/bin/sh\n");
    }

    #[test]
    fn zstd_layers_hold_the_same_tar() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        awkward_tree(&src);
        let paths = [src.to_str().unwrap().to_string()];
        let gzip = pack_store_paths(&paths, &dir.path().join("gz"), Compression::Gzip).unwrap();
        let zstd = pack_store_paths(&paths, &dir.path().join("zst"), Compression::Zstd).unwrap();
        // The same tar (diff_id), compressed otherwise (digest).
        assert_eq!(gzip.diff_id, zstd.diff_id);
        assert_eq!(gzip.tar_size, zstd.tar_size);
        assert_ne!(gzip.digest, zstd.digest);
        let file = File::open(dir.path().join("zst")).unwrap();
        let entries = unpack_from(zstd::stream::read::Decoder::new(file).unwrap());
        assert_eq!(entries, unpack(&dir.path().join("gz")));
    }
}
