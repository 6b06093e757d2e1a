//! The customisation layer: what makes a pile of store paths a usable root
//! file system.
//!
//! * The requested packages' outputs are merged at `/` the way Nix's
//!   `buildEnv` merges them: top-level directories (`/bin`, `/etc`, ...) are
//!   real; below them an entry that only one package provides is a symlink
//!   into that package, and directories several packages provide are merged
//!   recursively. On a clash between files the package that sorts first wins.
//! * `/tmp` with mode 1777, `/usr/bin/env` (when a package provides `env`),
//!   `/etc/passwd` and `/etc/group` with `root` and `nobody` (unless a
//!   package provides them).
//! * CA certificates: when a store path of the closure named like nixpkgs'
//!   `cacert` (`nss-cacert-3.101`) holds `etc/ssl/certs/ca-bundle.crt`,
//!   `/etc/ssl/certs/ca-bundle.crt` and `/etc/ssl/certs/ca-certificates.crt`
//!   link to it and `SSL_CERT_FILE` is set.
//!
//! It reads the store paths through a [`StoreTree`], which never follows a
//! link itself: a Nix store on disk ([`DiskTree`]), or the listings of a
//! binary cache's NARs ([`ListedTree`]), so both give the same layer. Links
//! are followed here, and only while they stay inside the image's closure:
//! a package whose output (or an entry of it) links to `/etc` or `/root`
//! of the machine that builds gets a link in the image, never a listing of
//! that directory. The walk is bounded ([`Limits`]: entries, bytes counted
//! against the image size limit, a cancel flag), so links that point back
//! at their own directories cannot keep it busy or grow it without end.
//! The result is an in-memory [`Tree`] for [`super::pack::write_tree`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::pack::{Node, Tree};

const CA_BUNDLE: &str = "etc/ssl/certs/ca-bundle.crt";
const PATH: &str = "PATH=/bin:/sbin:/usr/bin";
const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const STORE: &str = "/nix/store/";
/// Links followed in a row before a path counts as unresolvable (Linux's
/// own limit).
const MAX_HOPS: usize = 40;

/// The customisation layer's files and the config it implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customisation {
    pub tree: Tree,
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CustomisationError {
    #[error("reading {path} for the customisation layer: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The tree's reader has no listing of this store path yet (a binary
    /// cache's): fetch it, and customise again.
    #[error("the customisation layer needs the listing of {store_path}")]
    Unlisted { store_path: String },
    #[error("the customisation layer would have more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("the customisation layer would hold more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the customisation step was cancelled")]
    Cancelled,
}

/// One entry of a store path, as read without following it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { executable: bool, size: u64 },
    Symlink { target: PathBuf },
}

/// Read access to store paths that never follows a link.
pub trait StoreTree {
    /// The entry at `path` (absolute, inside a store path), `None` if
    /// nothing is there.
    fn entry(&self, path: &Path) -> Result<Option<Entry>, CustomisationError>;
    /// The names in the directory at `path`, sorted by their bytes.
    fn children(&self, path: &Path) -> Result<Vec<OsString>, CustomisationError>;
}

/// Store paths on this machine's disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskTree;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CustomisationError + '_ {
    move |source| CustomisationError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StoreTree for DiskTree {
    fn entry(&self, path: &Path) -> Result<Option<Entry>, CustomisationError> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(None),
            Err(e) => return Err(io_error(path)(e)),
        };
        let kind = meta.file_type();
        Ok(Some(if kind.is_symlink() {
            Entry::Symlink {
                target: std::fs::read_link(path).map_err(io_error(path))?,
            }
        } else if kind.is_dir() {
            Entry::Dir
        } else {
            Entry::File {
                executable: meta.mode() & 0o100 != 0,
                size: meta.len(),
            }
        }))
    }

    fn children(&self, path: &Path) -> Result<Vec<OsString>, CustomisationError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io_error(path))? {
            names.push(entry.map_err(io_error(path))?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }
}

/// The entries of one store path (relative paths, `""` for the path
/// itself), as a NAR listing gives them.
pub type Listing = BTreeMap<PathBuf, Entry>;

/// Store paths known by their listings only (from a binary cache).
#[derive(Debug, Clone, Default)]
pub struct ListedTree {
    /// Store path (`/nix/store/<hash>-<name>`) -> its listing (shared: a
    /// tree is cloned for each walk, its listings never are).
    pub listings: BTreeMap<String, std::sync::Arc<Listing>>,
}

impl ListedTree {
    /// Store paths of `closure` that entries of the listings held link
    /// into and that have no listing here yet: what a walk that stopped
    /// at one unlisted path will most likely ask for next, so that all of
    /// them can be fetched at once.
    pub fn linked_unlisted(&self, closure: &HashSet<&str>) -> BTreeSet<String> {
        self.listings
            .values()
            .flat_map(|listing| listing.values())
            .filter_map(|entry| match entry {
                Entry::Symlink { target } => store_path_of(target),
                _ => None,
            })
            .filter(|path| closure.contains(path.as_str()) && !self.listings.contains_key(path))
            .collect()
    }

    /// The listing holding `path`, and `path` relative to its store path.
    fn locate<'a>(&self, path: &'a Path) -> Result<(&Listing, &'a Path), CustomisationError> {
        let store_path = store_path_of(path).ok_or_else(|| CustomisationError::Io {
            path: path.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        let listing =
            self.listings
                .get(&store_path)
                .ok_or_else(|| CustomisationError::Unlisted {
                    store_path: store_path.clone(),
                })?;
        let relative = path
            .strip_prefix(&store_path)
            .expect("a path starts with its store path");
        Ok((listing, relative))
    }
}

impl StoreTree for ListedTree {
    fn entry(&self, path: &Path) -> Result<Option<Entry>, CustomisationError> {
        let (listing, relative) = self.locate(path)?;
        Ok(listing.get(relative).cloned())
    }

    fn children(&self, path: &Path) -> Result<Vec<OsString>, CustomisationError> {
        let (listing, relative) = self.locate(path)?;
        let mut names: Vec<OsString> = listing
            .range(relative.to_path_buf()..)
            .skip_while(|(p, _)| p.as_path() == relative)
            .take_while(|(p, _)| p.starts_with(relative))
            .filter(|(p, _)| p.parent() == Some(relative))
            .filter_map(|(p, _)| p.file_name().map(OsStr::to_os_string))
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }
}

/// `/nix/store/<hash>-<name>` of a path at or below it.
fn store_path_of(path: &Path) -> Option<String> {
    let rest = path.to_str()?.strip_prefix(STORE)?;
    let name = rest.split('/').next()?;
    (!name.is_empty()).then(|| format!("{STORE}{name}"))
}

/// What the walk may spend.
#[derive(Debug)]
pub struct Limits<'a> {
    /// Entries in the tree, and directories read.
    pub max_entries: usize,
    /// Bytes of the layer's tar (headers, long names, file contents).
    pub max_bytes: u64,
    /// Set when the build is no longer wanted.
    pub cancelled: &'a AtomicBool,
}

/// Links resolved against a store tree, never leaving the closure.
struct Walker<'a> {
    tree: &'a dyn StoreTree,
    closure: HashSet<&'a str>,
    limits: &'a Limits<'a>,
    entries: usize,
    bytes: u64,
    /// Real directories being merged now (a link back to one is not
    /// followed again).
    merging: Vec<PathBuf>,
}

impl<'a> Walker<'a> {
    /// Counts one unit of work (an entry made, a directory read).
    fn spend(&mut self, name_len: usize, data: u64) -> Result<(), CustomisationError> {
        if self.limits.cancelled.load(Ordering::Relaxed) {
            return Err(CustomisationError::Cancelled);
        }
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(CustomisationError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        // A header, a GNU long-name record for a long name, the data.
        let long = if name_len > 100 {
            512 + (name_len as u64).div_ceil(512) * 512
        } else {
            0
        };
        self.bytes += 512 + long + data.div_ceil(512) * 512;
        if self.bytes > self.limits.max_bytes {
            return Err(CustomisationError::TooLarge {
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    fn in_closure(&self, path: &Path) -> bool {
        store_path_of(path).is_some_and(|p| self.closure.contains(p.as_str()))
    }

    /// The real path and entry `path` names, following links (each hop
    /// inside the closure); `None` if it is absent, leaves the closure, or
    /// loops.
    fn resolve(&self, path: &Path) -> Result<Option<(PathBuf, Entry)>, CustomisationError> {
        let mut pending: Vec<OsString> = Vec::new();
        let mut at = PathBuf::from("/");
        let mut hops = 0;
        let push_components = |pending: &mut Vec<OsString>, path: &Path| {
            let parts: Vec<OsString> = path
                .components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    Component::ParentDir => Some(OsString::from("..")),
                    _ => None,
                })
                .collect();
            pending.extend(parts.into_iter().rev());
        };
        push_components(&mut pending, path);
        let mut last = Entry::Dir;
        while let Some(part) = pending.pop() {
            if part == ".." {
                at.pop();
                continue;
            }
            let next = at.join(&part);
            if next == Path::new("/nix") || next == Path::new("/nix/store") {
                at = next;
                continue;
            }
            if !self.in_closure(&next) {
                return Ok(None);
            }
            match self.tree.entry(&next)? {
                None => return Ok(None),
                Some(Entry::Symlink { target }) => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Ok(None);
                    }
                    if target.is_absolute() {
                        at = PathBuf::from("/");
                    }
                    push_components(&mut pending, &target);
                }
                Some(entry) => {
                    if !pending.is_empty() && entry != Entry::Dir {
                        return Ok(None);
                    }
                    at = next;
                    last = entry;
                }
            }
        }
        if !self.in_closure(&at) {
            return Ok(None);
        }
        Ok(Some((at, last)))
    }

    /// The real directory `path` names, if it is one inside the closure
    /// and not being merged already.
    fn dir(&self, path: &Path) -> Result<Option<PathBuf>, CustomisationError> {
        Ok(match self.resolve(path)? {
            Some((real, Entry::Dir)) if !self.merging.contains(&real) => Some(real),
            _ => None,
        })
    }

    fn insert(
        &mut self,
        tree: &mut Tree,
        at: PathBuf,
        node: Node,
    ) -> Result<(), CustomisationError> {
        let name_len = at.as_os_str().len();
        let (data, extra) = match &node {
            Node::File { data, .. } => (data.len() as u64, 0),
            Node::Symlink { target } => (0, target.as_os_str().len()),
            Node::Dir { .. } => (0, 0),
        };
        self.spend(name_len.max(extra), data)?;
        tree.insert(at, node);
        Ok(())
    }

    /// Merges the children of `sources` (real directories, in priority
    /// order) into `tree` at `at`.
    fn merge(
        &mut self,
        tree: &mut Tree,
        at: &Path,
        sources: &[PathBuf],
        top: bool,
    ) -> Result<(), CustomisationError> {
        let mut names = BTreeSet::<Vec<u8>>::new();
        for source in sources {
            self.spend(0, 0)?;
            for name in self.tree.children(source)? {
                names.insert(name.as_bytes().to_vec());
            }
        }
        self.merging.extend(sources.iter().cloned());
        for name in names {
            let name = OsString::from(OsStr::from_bytes(&name));
            if top && name == "nix-support" {
                continue;
            }
            let mut candidates = Vec::new();
            for source in sources {
                let path = source.join(&name);
                if self.tree.entry(&path)?.is_some() {
                    candidates.push(path);
                }
            }
            let mut dirs = Vec::new();
            for candidate in &candidates {
                if let Some(real) = self.dir(candidate)? {
                    dirs.push(real);
                }
            }
            let here = at.join(&name);
            let first_is_dir = match candidates.first() {
                Some(first) => self.dir(first)?.is_some(),
                None => false,
            };
            if first_is_dir && (top || dirs.len() > 1) {
                self.insert(tree, here.clone(), Node::Dir { mode: 0o755 })?;
                self.merge(tree, &here, &dirs, false)?;
            } else if let Some(first) = candidates.into_iter().next() {
                self.insert(tree, here, Node::Symlink { target: first })?;
            }
        }
        self.merging.truncate(self.merging.len() - sources.len());
        Ok(())
    }

    /// Inserts a real directory (replacing nothing that exists).
    fn put_dir(
        &mut self,
        tree: &mut Tree,
        path: &str,
        mode: u32,
    ) -> Result<bool, CustomisationError> {
        let path = Path::new(path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !self.materialise(tree, parent)? {
                return Ok(false);
            }
        }
        match tree.get(path) {
            None => {
                self.insert(tree, path.to_path_buf(), Node::Dir { mode })?;
                Ok(true)
            }
            Some(Node::Dir { .. }) => Ok(true),
            Some(_) => Ok(false),
        }
    }

    /// Makes `path` and its parents real directories in the tree: a symlink
    /// to a store directory of the closure becomes a directory of symlinks
    /// to its entries. `false` if something that is not a directory is in
    /// the way.
    fn materialise(&mut self, tree: &mut Tree, path: &Path) -> Result<bool, CustomisationError> {
        let mut at = PathBuf::new();
        for component in path.components() {
            at.push(component);
            match tree.get(&at).cloned() {
                None => self.insert(tree, at.clone(), Node::Dir { mode: 0o755 })?,
                Some(Node::Dir { .. }) => {}
                Some(Node::Symlink { target }) => match self.dir(&target)? {
                    Some(real) => {
                        self.insert(tree, at.clone(), Node::Dir { mode: 0o755 })?;
                        self.merge(tree, &at, &[real], false)?;
                    }
                    None => return Ok(false),
                },
                Some(Node::File { .. }) => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// Builds the layer for `outputs` (the requested packages' output paths, in
/// priority order) with `closure` (every store path in the image), reading
/// them through `tree`.
pub fn customise(
    outputs: &[String],
    closure: &[String],
    tree: &dyn StoreTree,
    limits: &Limits<'_>,
) -> Result<Customisation, CustomisationError> {
    let mut walker = Walker {
        tree,
        closure: closure.iter().map(String::as_str).collect(),
        limits,
        entries: 0,
        bytes: 0,
        merging: Vec::new(),
    };
    let mut layer = Tree::new();
    let mut roots = Vec::new();
    for output in outputs {
        if let Some(real) = walker.dir(Path::new(output))? {
            roots.push(real);
        }
    }
    walker.merge(&mut layer, Path::new(""), &roots, true)?;

    let mut env = vec![PATH.to_string()];

    walker.put_dir(&mut layer, "tmp", 0o1777)?;
    if let Some(Node::Symlink { target }) = layer.get(Path::new("bin/env")).cloned() {
        if walker.materialise(&mut layer, Path::new("usr/bin"))?
            && !layer.contains_key(Path::new("usr/bin/env"))
        {
            walker.insert(&mut layer, "usr/bin/env".into(), Node::Symlink { target })?;
        }
    }
    if walker.materialise(&mut layer, Path::new("etc"))? {
        for (name, content) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
            if !layer.contains_key(Path::new(name)) {
                let file = Node::File {
                    mode: 0o644,
                    data: content.as_bytes().to_vec(),
                };
                walker.insert(&mut layer, name.into(), file)?;
            }
        }
    }
    let mut bundle = None;
    for path in closure.iter().filter(|p| is_cacert(p)) {
        let candidate = Path::new(path).join(CA_BUNDLE);
        if let Some((_, Entry::File { .. })) = walker.resolve(&candidate)? {
            bundle = Some(candidate);
            break;
        }
    }
    if let Some(bundle) = bundle {
        if walker.materialise(&mut layer, Path::new("etc/ssl/certs"))? {
            for name in [
                "etc/ssl/certs/ca-bundle.crt",
                "etc/ssl/certs/ca-certificates.crt",
            ] {
                if !layer.contains_key(Path::new(name)) {
                    let link = Node::Symlink {
                        target: bundle.clone(),
                    };
                    walker.insert(&mut layer, name.into(), link)?;
                }
            }
            env.push(format!("SSL_CERT_FILE=/{CA_BUNDLE}"));
        }
    }

    let cmd = ["bash", "sh"]
        .iter()
        .find(|sh| layer.contains_key(&Path::new("bin").join(sh)))
        .map(|sh| vec![format!("/bin/{sh}")]);
    Ok(Customisation {
        tree: layer,
        env,
        cmd,
    })
}

/// Whether a store path is a CA certificate bundle package by its name
/// (`/nix/store/<hash>-nss-cacert-3.101`, `...-cacert-1.0`).
fn is_cacert(store_path: &str) -> bool {
    store_path
        .strip_prefix(STORE)
        .and_then(|base| base.split_once('-'))
        .is_some_and(|(_, name)| name.starts_with("cacert") || name.starts_with("nss-cacert"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake store under a temporary directory: `/nix/store/...` paths are
    /// what the tests name, the disk tree below a root stands for them.
    struct Rooted {
        root: PathBuf,
    }

    impl StoreTree for Rooted {
        fn entry(&self, path: &Path) -> Result<Option<Entry>, CustomisationError> {
            DiskTree.entry(&self.root.join(path.strip_prefix("/").unwrap()))
        }
        fn children(&self, path: &Path) -> Result<Vec<OsString>, CustomisationError> {
            DiskTree.children(&self.root.join(path.strip_prefix("/").unwrap()))
        }
    }

    struct Store {
        dir: tempfile::TempDir,
        paths: Vec<String>,
    }

    impl Store {
        fn new() -> Store {
            Store {
                dir: tempfile::tempdir().unwrap(),
                paths: Vec::new(),
            }
        }

        /// `/nix/store/<hash>-<name>` with the given files.
        fn package(&mut self, name: &str, files: &[&str]) -> String {
            let store_path = format!(
                "{STORE}{}-{name}",
                "0".repeat(32)
                    .replacen('0', &self.paths.len().to_string(), 1)
            );
            let dir = self.disk(&store_path);
            std::fs::create_dir_all(&dir).unwrap();
            for f in files {
                let path = dir.join(f);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, name).unwrap();
            }
            self.paths.push(store_path.clone());
            store_path
        }

        fn disk(&self, store_path: &str) -> PathBuf {
            self.dir.path().join(store_path.strip_prefix("/").unwrap())
        }

        fn tree(&self) -> Rooted {
            Rooted {
                root: self.dir.path().to_path_buf(),
            }
        }
    }

    fn limits(cancelled: &AtomicBool) -> Limits<'_> {
        Limits {
            max_entries: 10_000,
            max_bytes: 1 << 30,
            cancelled,
        }
    }

    fn run(store: &Store, outputs: &[String]) -> Result<Customisation, CustomisationError> {
        let cancelled = AtomicBool::new(false);
        customise(outputs, &store.paths, &store.tree(), &limits(&cancelled))
    }

    #[test]
    fn packages_merge_like_build_env() {
        let mut store = Store::new();
        let coreutils = store.package("coreutils", &["bin/env", "bin/ls", "share/man/man1/ls.1"]);
        let hello = store.package(
            "hello",
            &[
                "bin/hello",
                "bin/ls",
                "share/man/man1/hello.1",
                "share/info/hello.info",
                "nix-support/x",
            ],
        );
        let bash = store.package("bash", &["bin/bash"]);
        let cacert = store.package("nss-cacert-3.1", &["etc/ssl/certs/ca-bundle.crt"]);
        let outputs = vec![
            bash.clone(),
            coreutils.clone(),
            hello.clone(),
            cacert.clone(),
        ];
        let c = run(&store, &outputs).unwrap();
        let link = |p: &str| match c.tree.get(Path::new(p)) {
            Some(Node::Symlink { target }) => target.to_str().unwrap().to_string(),
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(link("bin/hello"), format!("{hello}/bin/hello"));
        // A clash: the first package wins.
        assert_eq!(link("bin/ls"), format!("{coreutils}/bin/ls"));
        // A directory two packages share is merged; one only one has is linked.
        assert_eq!(
            c.tree.get(Path::new("share/man")),
            Some(&Node::Dir { mode: 0o755 })
        );
        assert_eq!(
            link("share/man/man1/ls.1"),
            format!("{coreutils}/share/man/man1/ls.1")
        );
        assert_eq!(link("share/info"), format!("{hello}/share/info"));
        assert!(!c.tree.contains_key(Path::new("nix-support")));
        assert_eq!(link("usr/bin/env"), format!("{coreutils}/bin/env"));
        assert_eq!(
            c.tree.get(Path::new("tmp")),
            Some(&Node::Dir { mode: 0o1777 })
        );
        assert_eq!(
            link("etc/ssl/certs/ca-certificates.crt"),
            format!("{cacert}/etc/ssl/certs/ca-bundle.crt")
        );
        assert!(matches!(
            c.tree.get(Path::new("etc/passwd")),
            Some(Node::File { .. })
        ));
        assert!(c
            .env
            .contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt".to_string()));
        assert_eq!(c.cmd, Some(vec!["/bin/bash".to_string()]));
        // Every entry's parent is a directory in the tree.
        for path in c.tree.keys() {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                assert_eq!(
                    c.tree.get(parent).map(|n| matches!(n, Node::Dir { .. })),
                    Some(true),
                    "{path:?}"
                );
            }
        }
    }

    #[test]
    fn without_env_or_shell_nothing_dangles() {
        let mut store = Store::new();
        let hello = store.package("hello", &["bin/hello"]);
        symlink("/nowhere", store.disk(&hello).join("bin/dangling")).unwrap();
        let c = run(&store, std::slice::from_ref(&hello)).unwrap();
        assert!(!c.tree.contains_key(Path::new("usr/bin/env")));
        assert!(c.tree.contains_key(Path::new("bin/dangling")));
        assert_eq!(c.cmd, None);
        assert_eq!(c.env, vec![PATH.to_string()]);
    }

    #[test]
    fn links_out_of_the_closure_are_never_followed() {
        // The machine's own directories, which a hostile package points at.
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("shadow-dir/inner")).unwrap();
        std::fs::write(host.path().join("secret-name"), "x").unwrap();
        let mut store = Store::new();
        let leaky = store.package("leaky", &["bin/tool"]);
        symlink(host.path(), store.disk(&leaky).join("etc")).unwrap();
        symlink(host.path(), store.disk(&leaky).join("bin/leak")).unwrap();
        // A whole output that is a link to a host directory.
        let whole = format!("{STORE}{}-whole", "9".repeat(32));
        symlink(host.path(), store.disk(&whole)).unwrap();
        store.paths.push(whole.clone());
        let other = store.package("other", &["etc/other.conf", "bin/other"]);
        let c = run(&store, &[leaky.clone(), whole, other]).unwrap();
        for path in c.tree.keys() {
            let text = path.to_string_lossy();
            assert!(
                !text.contains("secret-name") && !text.contains("shadow-dir"),
                "the host's files leaked: {path:?}"
            );
        }
        // The links are in the image as links into the package.
        assert_eq!(
            c.tree.get(Path::new("bin/leak")),
            Some(&Node::Symlink {
                target: PathBuf::from(format!("{leaky}/bin/leak"))
            })
        );
    }

    #[test]
    fn links_back_to_their_own_directory_end_quickly() {
        let mut store = Store::new();
        let a = store.package("a", &["x/file"]);
        let b = store.package("b", &["x/file"]);
        for package in [&a, &b] {
            symlink(".", store.disk(package).join("x/a")).unwrap();
            symlink(".", store.disk(package).join("x/b")).unwrap();
            symlink("..", store.disk(package).join("x/up")).unwrap();
        }
        let started = std::time::Instant::now();
        let c = run(&store, &[a.clone(), b.clone()]).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(c.tree.len() < 100, "{}", c.tree.len());
        assert_eq!(
            c.tree.get(Path::new("x/a")),
            Some(&Node::Symlink {
                target: PathBuf::from(format!("{a}/x/a"))
            })
        );
    }

    #[test]
    fn the_walk_is_bounded_and_cancellable() {
        // Without cycles, but wide: each level doubles.
        let mut store = Store::new();
        let mut packages = Vec::new();
        for name in ["p", "q"] {
            let package = store.package(name, &["d0/file"]);
            for level in 0..24 {
                let dir = store.disk(&package).join(format!("d{level}"));
                std::fs::create_dir_all(&dir).unwrap();
                symlink(format!("../d{}", level + 1), dir.join("l")).unwrap();
                symlink(format!("../d{}", level + 1), dir.join("r")).unwrap();
            }
            std::fs::create_dir_all(store.disk(&package).join("d24")).unwrap();
            packages.push(package);
        }
        let cancelled = AtomicBool::new(false);
        let few = Limits {
            max_entries: 5_000,
            ..limits(&cancelled)
        };
        let tree = store.tree();
        assert!(matches!(
            customise(&packages, &store.paths, &tree, &few),
            Err(CustomisationError::TooManyEntries { limit: 5_000 })
        ));
        let small = Limits {
            max_bytes: 64 * 1024,
            ..limits(&cancelled)
        };
        assert!(matches!(
            customise(&packages, &store.paths, &tree, &small),
            Err(CustomisationError::TooLarge { .. })
        ));
        cancelled.store(true, Ordering::Relaxed);
        assert!(matches!(
            customise(&packages, &store.paths, &tree, &limits(&cancelled)),
            Err(CustomisationError::Cancelled)
        ));
    }

    #[test]
    fn a_listed_tree_reads_like_the_disk() {
        let mut store = Store::new();
        let coreutils = store.package("coreutils", &["bin/env", "share/doc/a"]);
        let bash = store.package("bash", &["bin/bash", "share/doc/b"]);
        symlink("../share", store.disk(&bash).join("bin/share-link")).unwrap();
        let mut listed = ListedTree::default();
        for path in &store.paths {
            let mut listing = Listing::new();
            let disk = store.disk(path);
            let mut stack = vec![PathBuf::new()];
            while let Some(rel) = stack.pop() {
                let entry = DiskTree.entry(&disk.join(&rel)).unwrap().unwrap();
                if entry == Entry::Dir {
                    for child in DiskTree.children(&disk.join(&rel)).unwrap() {
                        stack.push(rel.join(child));
                    }
                }
                listing.insert(rel, entry);
            }
            listed
                .listings
                .insert(path.clone(), std::sync::Arc::new(listing));
        }
        let cancelled = AtomicBool::new(false);
        let outputs = [bash, coreutils];
        let from_disk = customise(&outputs, &store.paths, &store.tree(), &limits(&cancelled));
        let from_listing = customise(&outputs, &store.paths, &listed, &limits(&cancelled));
        assert_eq!(from_disk.unwrap(), from_listing.unwrap());
        // A path with no listing yet is asked for.
        let empty = ListedTree::default();
        assert!(matches!(
            customise(&outputs, &store.paths, &empty, &limits(&cancelled)),
            Err(CustomisationError::Unlisted { .. })
        ));
    }
}
