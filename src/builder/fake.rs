//! A [`StorePaths`] source held in memory, for tests of the builder's and
//! the dispatchers' policies without Nix: packages resolve from a table,
//! closures follow the table's references, layers and the customisation
//! layer are written from in-memory trees through the same writers as
//! the real sources. Faults are injected by counters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::customisation::{Customisation, Entry, ListedTree, Listing};
use super::nix::{Closure, NixError, PathInfo, ResolveRequest, Resolved, ResolvedPackage};
use super::objects::Job;
use super::step::Step;
use super::store::{Steps, StorePaths, WalkLimits};
use super::{BuildError, Progress};

/// One file or directory of a fake store path.
#[derive(Debug, Clone)]
pub enum FakeNode {
    Dir,
    File { executable: bool, data: Vec<u8> },
    Symlink { target: String },
}

#[derive(Debug, Clone, Default)]
pub struct FakePath {
    pub references: Vec<String>,
    /// Relative path (`""` is the store path itself) -> node.
    pub nodes: BTreeMap<PathBuf, FakeNode>,
}

#[derive(Debug, Default)]
pub struct FakeStore {
    /// Package name -> its output paths.
    pub packages: BTreeMap<String, Vec<String>>,
    pub paths: BTreeMap<String, FakePath>,
    /// Realisations that fail with a full disk before one succeeds.
    pub disk_full: AtomicUsize,
    /// Free bytes the fake store's disk reports.
    pub free: AtomicU64,
    /// Calls made, by kind.
    pub realised: AtomicUsize,
    pub packed: AtomicUsize,
    pub collected: Mutex<Vec<u64>>,
    /// Realisations wait while a test holds this for writing (a build
    /// that takes as long as the test wants).
    pub gate: tokio::sync::RwLock<()>,
}

/// `/nix/store/<hash>-<name>`, with a hash made of `name`.
pub fn store_path(name: &str) -> String {
    let hash: String = crate::oci::digest::sha256_hex(name.as_bytes())
        .chars()
        .map(|c| match c {
            'e' => 'f',
            other => other,
        })
        .take(32)
        .collect();
    format!("/nix/store/{hash}-{name}")
}

impl FakePath {
    /// The NarHash of its tree, as Nix computes it: the same as a binary
    /// cache's narinfo says for the same tree.
    pub fn nar_hash(&self) -> String {
        use crate::binary_cache::testing::{nar, TestNode};
        fn node(nodes: &BTreeMap<PathBuf, FakeNode>, at: &std::path::Path) -> TestNode {
            match &nodes[at] {
                FakeNode::File { executable, data } => TestNode::File {
                    executable: *executable,
                    contents: data.clone(),
                },
                FakeNode::Symlink { target } => TestNode::Symlink(target.as_bytes().to_vec()),
                FakeNode::Dir => TestNode::Directory(
                    nodes
                        .keys()
                        .filter(|p| p.parent() == Some(at) && p.as_os_str() != at.as_os_str())
                        .map(|p| {
                            let name = p.file_name().expect("a child has a name");
                            (name.as_encoded_bytes().to_vec(), node(nodes, p))
                        })
                        .collect(),
                ),
            }
        }
        let bytes = nar(&node(&self.nodes, std::path::Path::new("")));
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
        crate::binary_cache::Sha256Hash(digest).to_nix32_string()
    }
}

impl FakeStore {
    /// A package `name` whose one output holds `bin/<name>` and refers to
    /// `references` (other packages' outputs).
    pub fn with_package(mut self, name: &str, references: &[&str]) -> FakeStore {
        let path = store_path(name);
        let mut nodes = BTreeMap::new();
        nodes.insert(PathBuf::new(), FakeNode::Dir);
        nodes.insert(PathBuf::from("bin"), FakeNode::Dir);
        nodes.insert(
            PathBuf::from("bin").join(name),
            FakeNode::File {
                executable: true,
                data: format!("#!/bin/sh\necho {name}\n").into_bytes(),
            },
        );
        let references = references.iter().map(|r| store_path(r)).collect();
        self.paths
            .insert(path.clone(), FakePath { references, nodes });
        self.packages.insert(name.to_string(), vec![path]);
        self
    }

    fn listing(&self, path: &str) -> Listing {
        self.paths[path]
            .nodes
            .iter()
            .map(|(rel, node)| {
                let entry = match node {
                    FakeNode::Dir => Entry::Dir,
                    FakeNode::File { executable, data } => Entry::File {
                        executable: *executable,
                        size: data.len() as u64,
                    },
                    FakeNode::Symlink { target } => Entry::Symlink {
                        target: PathBuf::from(target),
                    },
                };
                (rel.clone(), entry)
            })
            .collect()
    }
}

#[async_trait]
impl StorePaths for FakeStore {
    fn steps(&self) -> Steps {
        Steps {
            resolve: Step::Evaluating,
            realise: Some(Step::Realising),
            closure: Step::Grouping,
            pack: Step::Packing,
            from_cache: false,
        }
    }

    async fn resolve(&self, request: &ResolveRequest) -> Result<Resolved, BuildError> {
        let mut packages = Vec::new();
        let mut unknown = Vec::new();
        for name in &request.packages {
            match self.packages.get(name) {
                Some(paths) => packages.push(ResolvedPackage {
                    name: name.clone(),
                    drv_path: format!("{}.drv", paths[0]),
                    outputs: vec!["out".into()],
                    paths: paths.clone(),
                    meta: Default::default(),
                }),
                None => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() {
            return Err(BuildError::UnknownPackages(unknown));
        }
        Ok(Resolved { packages, unknown })
    }

    async fn realise(
        &self,
        _packages: &[ResolvedPackage],
        _progress: Progress<'_>,
    ) -> Result<(), BuildError> {
        self.realised.fetch_add(1, Ordering::SeqCst);
        let _open = self.gate.read().await;
        let full = self
            .disk_full
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if full {
            return Err(BuildError::Nix(NixError::DiskFull {
                command: "nix-store",
                message: "No space left on device".into(),
            }));
        }
        Ok(())
    }

    async fn closure(
        &self,
        roots: &[String],
        _max_size: u64,
        _progress: Progress<'_>,
    ) -> Result<Closure, BuildError> {
        let mut closure = Closure::new();
        let mut pending: Vec<String> = roots.to_vec();
        while let Some(path) = pending.pop() {
            if closure.contains_key(&path) {
                continue;
            }
            let fake = &self.paths[&path];
            let size = fake
                .nodes
                .values()
                .map(|n| match n {
                    FakeNode::File { data, .. } => data.len() as u64 + 64,
                    _ => 64,
                })
                .sum();
            pending.extend(fake.references.iter().cloned());
            closure.insert(
                path,
                PathInfo {
                    nar_size: size,
                    nar_hash: fake.nar_hash(),
                    references: fake.references.clone(),
                },
            );
        }
        Ok(closure)
    }

    fn pack(&self, paths: Vec<String>, _closure: &Closure) -> Job {
        self.packed.fetch_add(1, Ordering::SeqCst);
        let trees: Vec<(String, FakePath)> = paths
            .iter()
            .map(|p| (p.clone(), self.paths[p].clone()))
            .collect();
        Box::new(move |writer| {
            writer.store_root()?;
            for (path, fake) in trees {
                let root = PathBuf::from(path.trim_start_matches('/'));
                for (rel, node) in fake.nodes {
                    let name = if rel.as_os_str().is_empty() {
                        root.clone()
                    } else {
                        root.join(rel)
                    };
                    match node {
                        FakeNode::Dir => writer.store_dir(&name)?,
                        FakeNode::File { executable, data } => writer.store_file(
                            &name,
                            executable,
                            data.len() as u64,
                            &mut &data[..],
                        )?,
                        FakeNode::Symlink { target } => {
                            writer.symlink(&name, std::path::Path::new(&target))?
                        }
                    }
                }
            }
            Ok(())
        })
    }

    async fn customise(
        &self,
        outputs: Vec<String>,
        closure: &Closure,
        limits: WalkLimits,
    ) -> Result<Customisation, BuildError> {
        let tree = ListedTree {
            listings: closure
                .keys()
                .map(|p| (p.clone(), std::sync::Arc::new(self.listing(p))))
                .collect(),
        };
        let paths: Vec<String> = closure.keys().cloned().collect();
        Ok(limits.customise(&outputs, &paths, &tree)?)
    }

    fn free_bytes(&self) -> Option<u64> {
        Some(self.free.load(Ordering::SeqCst))
    }

    async fn collect_garbage(&self, max_freed: u64) -> Result<(), BuildError> {
        self.collected.lock().unwrap().push(max_freed);
        Ok(())
    }
}
