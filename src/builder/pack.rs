//! Deterministic layer tarballs: tar -> gzip or zstd -> file, with the
//! sha256 of the tar (the layer's `diff_id`) and of the compressed bytes
//! (its `digest`) computed in the same single streaming pass. Compression
//! runs on every core ([`super::compress`]).
//!
//! The archive is a function of the files alone: entries in a fixed order
//! (parents before children, siblings by name bytes), mtime 1 (as in the Nix
//! store), uid/gid 0 with no user or group names, permissions as on disk.
//! Directories (empty ones too), symlinks (whatever they point at), hard
//! links within the layer, long names (GNU long-name records) and non-ASCII
//! names are kept. Memory does not grow with the layer: files are copied
//! through fixed buffers.
//!
//! ```no_run
//! use nixery::builder::compress::Compression;
//! let packed = nixery::builder::pack::pack_store_paths(&["/nix/store/…-hello".to_string()], "/tmp/layer".as_ref(), Compression::Gzip).unwrap();
//! println!("{} ({} bytes), diff_id {}", packed.digest, packed.size, packed.diff_id);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::compress::{Compression, Encoder};

/// The modification time of every entry, as in the Nix store.
pub const MTIME: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("packing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("packing {path}: file changed size while being read")]
    Changed { path: PathBuf },
    #[error("packing {path}: not an absolute store path")]
    NotAbsolute { path: PathBuf },
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

type Sink = Hashing<Encoder<Hashing<BufWriter<File>>>>;

/// Writes one layer: entries go in in the order they are given.
struct LayerWriter {
    tar: tar::Builder<Sink>,
    out: PathBuf,
    /// (device, inode) of multiply-linked files already written, and where.
    links: HashMap<(u64, u64), PathBuf>,
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

impl LayerWriter {
    fn create(out: &Path, compression: Compression) -> Result<LayerWriter, PackError> {
        let err = |source| PackError::Io {
            path: out.to_path_buf(),
            source,
        };
        let file = File::create(out).map_err(err)?;
        let encoder = Encoder::new(
            Hashing::new(BufWriter::with_capacity(256 * 1024, file)),
            compression,
        )
        .map_err(err)?;
        let mut tar = tar::Builder::new(Hashing::new(encoder));
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(LayerWriter {
            tar,
            out: out.to_path_buf(),
            links: HashMap::new(),
        })
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> PackError {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    }

    fn dir(&mut self, name: &Path, mode: u32) -> Result<(), PackError> {
        let mut h = header(EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, name, io::empty())
            .map_err(self.io(name))
    }

    fn symlink(&mut self, name: &Path, target: &Path) -> Result<(), PackError> {
        let mut h = header(EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, name, target)
            .map_err(self.io(name))
    }

    fn bytes(&mut self, name: &Path, mode: u32, data: &[u8]) -> Result<(), PackError> {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, name, data)
            .map_err(self.io(name))
    }

    /// A regular file from disk, or a hard link to one written before.
    fn file(&mut self, name: &Path, disk: &Path, meta: &Metadata) -> Result<(), PackError> {
        if meta.nlink() > 1 {
            let id = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&id).cloned() {
                let mut h = header(EntryType::Link, meta.mode(), 0);
                return self
                    .tar
                    .append_link(&mut h, name, &first)
                    .map_err(self.io(name));
            }
            self.links.insert(id, name.to_path_buf());
        }
        let size = meta.len();
        let file = File::open(disk).map_err(self.io(disk))?;
        let mut reader = CountingReader {
            inner: file.take(size),
            count: 0,
        };
        let mut h = header(EntryType::Regular, meta.mode(), size);
        self.tar
            .append_data(&mut h, name, &mut reader)
            .map_err(self.io(disk))?;
        if reader.count != size {
            return Err(PackError::Changed {
                path: disk.to_path_buf(),
            });
        }
        Ok(())
    }

    /// Everything below a directory on disk, parents first, siblings by name.
    fn walk(&mut self, disk_root: &Path, name_root: &Path) -> Result<(), PackError> {
        let mut stack: Vec<(PathBuf, PathBuf)> =
            vec![(disk_root.to_path_buf(), name_root.to_path_buf())];
        while let Some((disk, name)) = stack.pop() {
            let meta = std::fs::symlink_metadata(&disk).map_err(self.io(&disk))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = std::fs::read_link(&disk).map_err(self.io(&disk))?;
                self.symlink(&name, &target)?;
            } else if kind.is_dir() {
                self.dir(&name, meta.mode())?;
                let mut children: Vec<OsString> = std::fs::read_dir(&disk)
                    .map_err(self.io(&disk))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(self.io(&disk))?;
                children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                // Reversed onto the stack, so they come off in order.
                for child in children.into_iter().rev() {
                    stack.push((disk.join(&child), name.join(&child)));
                }
            } else if kind.is_file() {
                self.file(&name, &disk, &meta)?;
            }
            // Sockets, fifos and devices cannot be in a Nix store path.
        }
        Ok(())
    }

    fn finish(self) -> Result<Packed, PackError> {
        let out = self.out.clone();
        let err = |source| PackError::Io {
            path: out.clone(),
            source,
        };
        let tar_sink = self.tar.into_inner().map_err(err)?;
        let diff_id = format!("sha256:{}", hex::encode(tar_sink.hash.finalize()));
        let tar_size = tar_sink.count;
        let mut compressed = tar_sink.inner.finish().map_err(err)?;
        compressed.flush().map_err(err)?;
        let digest = format!("sha256:{}", hex::encode(compressed.hash.finalize()));
        let file = compressed
            .inner
            .into_inner()
            .map_err(|e| err(e.into_error()))?;
        file.sync_all().map_err(err)?;
        Ok(Packed {
            digest,
            diff_id,
            size: compressed.count,
            tar_size,
        })
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

/// Packs whole store paths (`/nix/store/...`) into one layer at `out`,
/// under `nix/store/` in the archive.
pub fn pack_store_paths(
    paths: &[String],
    out: &Path,
    compression: Compression,
) -> Result<Packed, PackError> {
    let mut sorted: Vec<&String> = paths.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut writer = LayerWriter::create(out, compression)?;
    writer.dir(Path::new("nix"), 0o755)?;
    writer.dir(Path::new("nix/store"), 0o755)?;
    for path in sorted {
        let disk = Path::new(path);
        let name = disk.strip_prefix("/").map_err(|_| PackError::NotAbsolute {
            path: disk.to_path_buf(),
        })?;
        writer.walk(disk, name)?;
    }
    writer.finish()
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

/// Packs an in-memory tree into one layer at `out`.
pub fn pack_tree(tree: &Tree, out: &Path, compression: Compression) -> Result<Packed, PackError> {
    let mut writer = LayerWriter::create(out, compression)?;
    for (name, node) in tree {
        match node {
            Node::Dir { mode } => writer.dir(name, *mode)?,
            Node::Symlink { target } => writer.symlink(name, target)?,
            Node::File { mode, data } => writer.bytes(name, *mode, data)?,
        }
    }
    writer.finish()
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
        assert_eq!(
            std::fs::metadata(copy.join("a")).unwrap().ino(),
            std::fs::metadata(copy.join("b")).unwrap().ino()
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

        // The archive's own view: a hard link entry, parents before children.
        let entries = unpack(&layer);
        let b = entries.iter().find(|e| e.0.ends_with("/b")).unwrap();
        assert_eq!(b.1, EntryType::Link);
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
