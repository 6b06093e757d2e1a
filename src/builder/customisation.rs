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
//! * CA certificates: when the closure has a `cacert`-like path
//!   (`etc/ssl/certs/ca-bundle.crt`), `/etc/ssl/certs/ca-bundle.crt` and
//!   `/etc/ssl/certs/ca-certificates.crt` link to it and `SSL_CERT_FILE` is set.
//!
//! It reads the realised store paths (so it runs where Nix ran) and returns
//! an in-memory [`Tree`] for [`super::pack::pack_tree`].

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::pack::{Node, Tree};

const CA_BUNDLE: &str = "etc/ssl/certs/ca-bundle.crt";
const PATH: &str = "PATH=/bin:/sbin:/usr/bin";
const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// The customisation layer's files and the config it implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customisation {
    pub tree: Tree,
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("reading {path} for the customisation layer: {source}")]
pub struct CustomisationError {
    pub path: PathBuf,
    pub source: io::Error,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> CustomisationError + '_ {
    move |source| CustomisationError {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the layer for `outputs` (the requested packages' output paths, in
/// priority order) with `closure` (every store path in the image).
pub fn customise<'a>(
    outputs: &[String],
    closure: impl IntoIterator<Item = &'a String>,
) -> Result<Customisation, CustomisationError> {
    let mut tree = Tree::new();
    let roots: Vec<PathBuf> = outputs
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .collect();
    merge(&mut tree, Path::new(""), &roots, true)?;

    let mut env = vec![PATH.to_string()];

    put_dir(&mut tree, "tmp", 0o1777)?;
    if let Some(Node::Symlink { target }) = tree.get(Path::new("bin/env")).cloned() {
        if materialise(&mut tree, Path::new("usr/bin"))? {
            tree.entry("usr/bin/env".into())
                .or_insert(Node::Symlink { target });
        }
    }
    if materialise(&mut tree, Path::new("etc"))? {
        for (name, content) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
            tree.entry(name.into()).or_insert(Node::File {
                mode: 0o644,
                data: content.as_bytes().to_vec(),
            });
        }
    }
    let bundle = closure
        .into_iter()
        .map(|p| Path::new(p).join(CA_BUNDLE))
        .find(|p| p.is_file());
    if let Some(bundle) = bundle {
        if materialise(&mut tree, Path::new("etc/ssl/certs"))? {
            for name in [
                "etc/ssl/certs/ca-bundle.crt",
                "etc/ssl/certs/ca-certificates.crt",
            ] {
                tree.entry(name.into()).or_insert(Node::Symlink {
                    target: bundle.clone(),
                });
            }
            env.push(format!("SSL_CERT_FILE=/{CA_BUNDLE}"));
        }
    }

    let cmd = ["bash", "sh"]
        .iter()
        .find(|sh| tree.contains_key(&Path::new("bin").join(sh)))
        .map(|sh| vec![format!("/bin/{sh}")]);
    Ok(Customisation { tree, env, cmd })
}

/// Merges the children of `sources` (directories on disk, in priority
/// order) into `tree` at `at`.
fn merge(
    tree: &mut Tree,
    at: &Path,
    sources: &[PathBuf],
    top: bool,
) -> Result<(), CustomisationError> {
    let mut names = BTreeSet::<Vec<u8>>::new();
    for source in sources {
        for entry in std::fs::read_dir(source).map_err(err(source))? {
            let entry = entry.map_err(err(source))?;
            names.insert(entry.file_name().as_bytes().to_vec());
        }
    }
    for name in names {
        let name = OsString::from(std::ffi::OsStr::from_bytes(&name));
        if top && name == "nix-support" {
            continue;
        }
        let candidates: Vec<PathBuf> = sources
            .iter()
            .map(|s| s.join(&name))
            .filter(|p| p.symlink_metadata().is_ok())
            .collect();
        let dirs: Vec<PathBuf> = candidates.iter().filter(|p| p.is_dir()).cloned().collect();
        let here = at.join(&name);
        let first_is_dir = candidates.first().is_some_and(|p| p.is_dir());
        if first_is_dir && (top || dirs.len() > 1) {
            tree.insert(here.clone(), Node::Dir { mode: 0o755 });
            merge(tree, &here, &dirs, false)?;
        } else if let Some(first) = candidates.into_iter().next() {
            tree.insert(here, Node::Symlink { target: first });
        }
    }
    Ok(())
}

/// Inserts a real directory (replacing nothing that exists).
fn put_dir(tree: &mut Tree, path: &str, mode: u32) -> Result<bool, CustomisationError> {
    let path = Path::new(path);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !materialise(tree, parent)? {
            return Ok(false);
        }
    }
    match tree.get(path) {
        None => {
            tree.insert(path.to_path_buf(), Node::Dir { mode });
            Ok(true)
        }
        Some(Node::Dir { .. }) => Ok(true),
        Some(_) => Ok(false),
    }
}

/// Makes `path` and its parents real directories in the tree: a symlink to
/// a store directory becomes a directory of symlinks to its entries.
/// `false` if something that is not a directory is in the way.
fn materialise(tree: &mut Tree, path: &Path) -> Result<bool, CustomisationError> {
    let mut at = PathBuf::new();
    for component in path.components() {
        at.push(component);
        match tree.get(&at).cloned() {
            None => {
                tree.insert(at.clone(), Node::Dir { mode: 0o755 });
            }
            Some(Node::Dir { .. }) => {}
            Some(Node::Symlink { target }) if target.is_dir() => {
                tree.insert(at.clone(), Node::Dir { mode: 0o755 });
                merge(tree, &at, &[target], false)?;
            }
            Some(_) => return Ok(false),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn package(root: &Path, name: &str, files: &[&str]) -> String {
        let dir = root.join(name);
        for f in files {
            let path = dir.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, name).unwrap();
        }
        dir.to_str().unwrap().to_string()
    }

    #[test]
    fn packages_merge_like_build_env() {
        let dir = tempfile::tempdir().unwrap();
        let coreutils = package(
            dir.path(),
            "coreutils",
            &["bin/env", "bin/ls", "share/man/man1/ls.1"],
        );
        let hello = package(
            dir.path(),
            "hello",
            &[
                "bin/hello",
                "bin/ls",
                "share/man/man1/hello.1",
                "share/info/hello.info",
                "nix-support/x",
            ],
        );
        let bash = package(dir.path(), "bash", &["bin/bash"]);
        let cacert = package(dir.path(), "cacert", &["etc/ssl/certs/ca-bundle.crt"]);
        let outputs = vec![
            bash.clone(),
            coreutils.clone(),
            hello.clone(),
            cacert.clone(),
        ];
        let c = customise(&outputs, &outputs).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let hello = package(dir.path(), "hello", &["bin/hello"]);
        symlink("/nowhere", dir.path().join("hello/bin/dangling")).unwrap();
        let c = customise(std::slice::from_ref(&hello), std::slice::from_ref(&hello)).unwrap();
        assert!(!c.tree.contains_key(Path::new("usr/bin/env")));
        assert!(c.tree.contains_key(Path::new("bin/dangling")));
        assert_eq!(c.cmd, None);
        assert_eq!(c.env, vec![PATH.to_string()]);
    }
}
