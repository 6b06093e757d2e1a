//! [`CacheStore`]: store paths from a signed binary cache, found through
//! the attribute index: the source of store paths ([`StorePaths`]) that
//! assembles an image without Nix and without running package-set code.
//!
//! | step | what it does |
//! |---|---|
//! | resolving | names -> outputs from the attribute index ([`super::attrs`]) |
//! | resolving | the closure from verified narinfos ([`BinaryCache::closure`]) |
//! | grouping | as for a build ([`crate::builder::layers`]) |
//! | fetching | each new layer streamed NAR -> tar -> compressed, checked |
//! | customising | over the NAR listings of the paths it looks into |
//!
//! What the cache cannot give is [`NotHere`]: the builder then tries its
//! next source (Nix, in local mode), passes the image on to a worker, or
//! fails with a clear error (`NIXERY_FROM_CACHE=only`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::attrs::{Catalog, Lookup};
use super::jobs::IndexJobs;
use crate::binary_cache::nar::{self, NarError, NarLimits, Node};
use crate::binary_cache::{BinaryCache, CacheError, NarInfo, StorePath};
use crate::builder::customisation::{self, Customisation, CustomisationError, Entry, ListedTree};
use crate::builder::nix::{Closure, PathInfo, ResolveRequest, Resolved, ResolvedPackage};
use crate::builder::objects::Job;
use crate::builder::pack::PackError;
use crate::builder::store::{Steps, StorePaths, WalkLimits};
use crate::builder::{BuildError, NotHere, Progress, Step, StepProgress};

/// A path's listing is kept (for the customisation layer) when it has at
/// most this many entries.
const LISTING_KEPT_ENTRIES: usize = 20_000;
/// Narinfos and listings are kept between the steps of builds (and for
/// the next builds) up to this many listing entries, and as many narinfo
/// references: what bounds the memory they take (a few hundred bytes
/// each at most).
const KEPT_ENTRIES_TOTAL: usize = 1_000_000;
/// Listings fetched at once for the customisation layer.
const LISTINGS_AT_ONCE: usize = 8;

/// Store paths from a binary cache.
pub struct CacheStore {
    cache: BinaryCache,
    catalog: Arc<Catalog>,
    jobs: Arc<dyn IndexJobs>,
    /// Use an index older than a pull's freshness bound rather than give
    /// up (when nothing else can build the image).
    stale_index_ok: bool,
    /// Verified narinfos of closures read lately, by store path.
    narinfos: Mutex<Kept<NarInfo>>,
    /// Listings of store paths walked lately, by store path.
    listings: Arc<Mutex<Kept<Arc<customisation::Listing>>>>,
}

impl CacheStore {
    pub fn new(
        cache: BinaryCache,
        catalog: Arc<Catalog>,
        jobs: Arc<dyn IndexJobs>,
        stale_index_ok: bool,
    ) -> CacheStore {
        CacheStore {
            cache,
            catalog,
            jobs,
            stale_index_ok,
            narinfos: Mutex::default(),
            listings: Arc::default(),
        }
    }

    fn cache_url(&self) -> String {
        self.cache.url().to_string()
    }

    /// The narinfo of `path`: kept from its closure, or fetched.
    async fn narinfo(&self, path: &str) -> Result<NarInfo, NotHere> {
        if let Some(info) = self.narinfos.lock().expect("never poisoned").get(path) {
            return Ok(info);
        }
        let store_path = self.store_path(path)?;
        let info = self
            .cache
            .narinfo(&store_path)
            .await
            .map_err(|e| not_here(&e, &self.cache_url()))?;
        self.keep_narinfos(std::iter::once(info.clone()));
        Ok(info)
    }

    fn keep_narinfos(&self, infos: impl IntoIterator<Item = NarInfo>) {
        let mut kept = self.narinfos.lock().expect("never poisoned");
        for info in infos {
            let weight = 1 + info.references.len();
            kept.keep(info.store_path.as_str().to_string(), info, weight);
        }
    }

    fn store_path(&self, path: &str) -> Result<StorePath, NotHere> {
        path.parse().map_err(|e| NotHere::Refused {
            path: path.to_string(),
            cache: self.cache_url(),
            message: format!("not a store path: {e}"),
        })
    }

    /// The listing of `path`, from a NAR walked lately or by walking it.
    async fn listing(&self, path: &str) -> Result<Arc<customisation::Listing>, NotHere> {
        if let Some(found) = self.listings.lock().expect("never poisoned").get(path) {
            return Ok(found);
        }
        let info = self.narinfo(path).await?;
        let cache = self.cache_url();
        let limits = NarLimits {
            max_size: info.nar_size,
            ..NarLimits::default()
        };
        let walked = self
            .cache
            .with_nar(&info, move |reader| nar::listing(reader, &limits))
            .await
            .map_err(|e| not_here(&e, &cache))?
            .map_err(|e| nar_error(&e, path, &self.cache_url()))?;
        let listing: customisation::Listing = walked
            .entries
            .into_iter()
            .map(|entry| {
                let node = match entry.kind {
                    nar::EntryKind::Directory => Entry::Dir,
                    nar::EntryKind::File { executable, size } => Entry::File { executable, size },
                    nar::EntryKind::Symlink { target } => Entry::Symlink { target },
                };
                (entry.path, node)
            })
            .collect();
        let listing = Arc::new(listing);
        keep_listing(&self.listings, path, listing.clone());
        Ok(listing)
    }
}

/// Keeps a listing of at most [`LISTING_KEPT_ENTRIES`] entries.
fn keep_listing(
    listings: &Mutex<Kept<Arc<customisation::Listing>>>,
    path: &str,
    listing: Arc<customisation::Listing>,
) {
    let weight = listing.len().max(1);
    if weight <= LISTING_KEPT_ENTRIES {
        let mut kept = listings.lock().expect("never poisoned");
        kept.keep(path.to_string(), listing, weight);
    }
}

/// Items kept by store path, with a weight (entries, references) whose
/// total is bounded: past [`KEPT_ENTRIES_TOTAL`] everything goes and
/// keeping starts again.
struct Kept<T> {
    by_path: HashMap<String, (T, usize)>,
    weight: usize,
}

impl<T> Default for Kept<T> {
    fn default() -> Kept<T> {
        Kept {
            by_path: HashMap::new(),
            weight: 0,
        }
    }
}

impl<T: Clone> Kept<T> {
    fn get(&self, path: &str) -> Option<T> {
        self.by_path.get(path).map(|(item, _)| item.clone())
    }

    fn keep(&mut self, path: String, item: T, weight: usize) {
        if weight > KEPT_ENTRIES_TOTAL {
            return;
        }
        if self.weight + weight > KEPT_ENTRIES_TOTAL {
            self.by_path.clear();
            self.weight = 0;
        }
        if let Some((_, old)) = self.by_path.insert(path, (item, weight)) {
            self.weight -= old;
        }
        self.weight += weight;
    }

    #[cfg(test)]
    fn total(&self) -> usize {
        self.weight
    }
}

/// What a cache error means for the image: the cache lacks it; failed to
/// give it (down, slow, cut off mid-NAR, or answering a status that says
/// it is misconfigured), where another source or a later try may do
/// better; or sent what a check refused.
fn not_here(error: &CacheError, cache: &str) -> NotHere {
    match error {
        CacheError::NotFound { path, .. } => NotHere::NotInCache {
            path: path.to_string(),
            cache: cache.to_string(),
        },
        // Cancelled: only the reader's own caller, who gave up, sees it.
        CacheError::Unavailable { .. }
        | CacheError::Url { .. }
        | CacheError::Http { .. }
        | CacheError::Redirect { .. }
        | CacheError::Io { .. }
        | CacheError::Cancelled { .. } => NotHere::Unavailable {
            cache: cache.to_string(),
            message: error.to_string(),
        },
        CacheError::NarInfo { path, .. }
        | CacheError::WrongPath { path, .. }
        | CacheError::Signature { path, .. }
        | CacheError::TooManyPaths { path, .. }
        | CacheError::ClosureTooLarge { path, .. }
        | CacheError::FileSize { path, .. }
        | CacheError::FileTooLarge { path, .. }
        | CacheError::FileHash { path, .. }
        | CacheError::NarSize { path, .. }
        | CacheError::NarHash { path, .. }
        | CacheError::Decompress { path, .. } => NotHere::Refused {
            path: path.to_string(),
            cache: cache.to_string(),
            message: error.to_string(),
        },
    }
}

/// The cache error that stopped a NAR's walk, if one did.
fn cache_error(error: &NarError) -> Option<&CacheError> {
    match error {
        NarError::Read { source, .. } => CacheError::from_io(source),
        _ => None,
    }
}

/// A NAR that could not be walked: what the cache sent is refused, or
/// (if reading it failed) what the cache error says.
fn nar_error(error: &NarError, path: &str, cache: &str) -> NotHere {
    if let Some(cache_error) = cache_error(error) {
        return not_here(cache_error, cache);
    }
    NotHere::Refused {
        path: path.to_string(),
        cache: cache.to_string(),
        message: error.to_string(),
    }
}

#[async_trait]
impl StorePaths for CacheStore {
    fn steps(&self) -> Steps {
        Steps {
            resolve: Step::Resolving,
            realise: None,
            closure: Step::Resolving,
            pack: Step::Fetching,
            from_cache: true,
        }
    }

    async fn resolve(&self, request: &ResolveRequest) -> Result<Resolved, BuildError> {
        let system = request.system.clone();
        let head = self
            .catalog
            .head(&request.source, &system)
            .await
            .map_err(|e| BuildError::Task(format!("reading the attribute index: {e}")))?;
        let Some(head) = head else {
            self.jobs.request(&request.source, &system).await;
            return Err(BuildError::NotHere(NotHere::NoIndex { system }));
        };
        if !head.is_current(request.not_before) {
            self.jobs.request(&request.source, &system).await;
            if !self.stale_index_ok {
                return Err(BuildError::NotHere(NotHere::StaleIndex { system }));
            }
        }
        let implicit: Vec<String> = request
            .implicit
            .iter()
            .filter(|name| !request.packages.contains(name))
            .cloned()
            .collect();
        let names: Vec<String> = request.packages.iter().chain(&implicit).cloned().collect();
        let found = self
            .catalog
            .look_up(&head, &names)
            .await
            .map_err(|e| BuildError::Task(format!("reading the attribute index: {e}")))?;
        let mut packages = Vec::new();
        let mut unknown = Vec::new();
        for (i, (name, lookup)) in names.iter().zip(found).enumerate() {
            let requested = i < request.packages.len();
            match lookup {
                Lookup::Package(attribute) => packages.push(ResolvedPackage {
                    name: name.clone(),
                    drv_path: attribute.drv_path.clone().unwrap_or_default(),
                    outputs: attribute.outputs.clone(),
                    paths: attribute.paths.clone(),
                    meta: attribute.meta.clone(),
                }),
                Lookup::NotAPackage if requested => unknown.push(name.clone()),
                // An implicit package the set lacks is left out.
                Lookup::NotAPackage => {}
                Lookup::Unknown => {
                    return Err(BuildError::NotHere(NotHere::NotIndexed {
                        name: name.clone(),
                    }))
                }
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
        Ok(())
    }

    async fn closure(
        &self,
        roots: &[String],
        max_size: u64,
        progress: Progress<'_>,
    ) -> Result<Closure, BuildError> {
        let roots = roots
            .iter()
            .map(|p| self.store_path(p))
            .collect::<Result<Vec<StorePath>, NotHere>>()
            .map_err(BuildError::NotHere)?;
        if let Some(progress) = progress {
            progress.send_modify(|p: &mut StepProgress| {
                p.detail = Some(format!(
                    "reading the closure's narinfos from {}",
                    self.cache.url()
                ));
            });
        }
        let found = self
            .cache
            .closure(&roots)
            .await
            .map_err(|error| match error {
                CacheError::ClosureTooLarge { size, .. } if size > max_size => {
                    BuildError::TooLarge {
                        size,
                        limit: max_size,
                    }
                }
                other => BuildError::NotHere(not_here(&other, &self.cache_url())),
            })?;
        if found.nar_size > max_size {
            return Err(BuildError::TooLarge {
                size: found.nar_size,
                limit: max_size,
            });
        }
        if let Some(progress) = progress {
            let n = found.paths.len() as u64;
            progress.send_modify(|p: &mut StepProgress| {
                (p.done, p.total) = (Some(n), Some(n));
            });
        }
        let closure = closure_graph(&found);
        self.keep_narinfos(found.paths.into_values());
        Ok(closure)
    }

    fn pack(&self, paths: Vec<String>, _closure: &Closure) -> Job {
        let mut sorted = paths;
        sorted.sort();
        sorted.dedup();
        let infos: Vec<Result<NarInfo, String>> = sorted
            .iter()
            .map(|p| {
                self.narinfos
                    .lock()
                    .expect("never poisoned")
                    .get(p)
                    .ok_or_else(|| p.clone())
            })
            .collect();
        let cache = self.cache.clone();
        let listings = self.listings.clone();
        let runtime = tokio::runtime::Handle::current();
        Box::new(move |writer| {
            writer.store_root()?;
            for info in infos {
                let info = match info {
                    Ok(info) => info,
                    Err(path) => {
                        let store_path = path.parse::<StorePath>().map_err(|e| {
                            PackError::NotHere(NotHere::Refused {
                                path: path.clone(),
                                cache: cache.url().to_string(),
                                message: e.to_string(),
                            })
                        })?;
                        runtime
                            .block_on(cache.narinfo(&store_path))
                            .map_err(|e| PackError::NotHere(not_here(&e, cache.url())))?
                    }
                };
                let path = info.store_path.as_str().to_string();
                let mut stream = runtime
                    .block_on(cache.nar(&info))
                    .map_err(|e| PackError::NotHere(not_here(&e, cache.url())))?;
                if let Some(flag) = writer.cancel_flag() {
                    stream = stream.cancel_on(flag.clone());
                }
                let reader = stream.into_reader();
                let root = PathBuf::from(path.trim_start_matches('/'));
                let mut listing = Some(customisation::Listing::new());
                let mut failed: Option<PackError> = None;
                let limits = NarLimits {
                    max_size: info.nar_size,
                    ..NarLimits::default()
                };
                let walked = nar::walk_with(reader, &limits, &mut |rel: &Path, node: Node<'_>| {
                    let name = if rel.as_os_str().is_empty() {
                        root.clone()
                    } else {
                        root.join(rel)
                    };
                    let (written, entry) = match node {
                        Node::Directory => (writer.store_dir(&name), Entry::Dir),
                        Node::File {
                            executable,
                            size,
                            contents,
                        } => (
                            writer.store_file(&name, executable, size, contents),
                            Entry::File { executable, size },
                        ),
                        Node::Symlink { target } => (
                            writer.symlink(&name, target),
                            Entry::Symlink {
                                target: target.to_path_buf(),
                            },
                        ),
                    };
                    if let Some(kept) = listing.as_mut() {
                        if kept.len() < LISTING_KEPT_ENTRIES {
                            kept.insert(rel.to_path_buf(), entry);
                        } else {
                            listing = None;
                        }
                    }
                    written.map_err(|e| {
                        let shown = std::io::Error::other(e.to_string());
                        failed = Some(e);
                        shown
                    })
                });
                match (walked, failed) {
                    (Ok(_), None) => {}
                    // The writer failed by itself: its sink, or the build
                    // was cancelled between entries.
                    (Err(NarError::Visitor { .. }) | Ok(_), Some(error)) => return Err(error),
                    // The archive failed (under the writer too, if a file
                    // was being copied: the writer saw only its effect).
                    (Err(error), _) => {
                        return Err(match cache_error(&error) {
                            Some(CacheError::Cancelled { .. }) => PackError::Cancelled,
                            _ => PackError::NotHere(nar_error(&error, &path, cache.url())),
                        })
                    }
                }
                if let Some(listing) = listing {
                    keep_listing(&listings, &path, Arc::new(listing));
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
        self.customise_in_rounds(outputs, closure, limits)
            .await
            .map(|(custom, _)| custom)
    }
}

impl CacheStore {
    /// The customisation walk over listings fetched as it asks for them,
    /// and how many walks that took. A walk stops at the first path it
    /// has no listing of; that one is fetched together with every other
    /// path the listings held so far link into, so an output linking into
    /// many packages (an env's `bin/`) costs a few walks, not one per
    /// package.
    async fn customise_in_rounds(
        &self,
        outputs: Vec<String>,
        closure: &Closure,
        limits: WalkLimits,
    ) -> Result<(Customisation, usize), BuildError> {
        use futures_util::{StreamExt, TryStreamExt};
        let paths: Vec<String> = closure.keys().cloned().collect();
        let in_closure: std::collections::HashSet<&str> =
            paths.iter().map(String::as_str).collect();
        let mut tree = ListedTree::default();
        for round in 1..=paths.len() + 1 {
            let walk = {
                let (outputs, paths, tree, limits) =
                    (outputs.clone(), paths.clone(), tree.clone(), limits.clone());
                tokio::task::spawn_blocking(move || limits.customise(&outputs, &paths, &tree))
                    .await
                    .map_err(|e| BuildError::Task(e.to_string()))?
            };
            let missing = match walk {
                Err(CustomisationError::Unlisted { store_path }) => store_path,
                other => return other.map(|c| (c, round)).map_err(BuildError::from),
            };
            let mut wanted = tree.linked_unlisted(&in_closure);
            wanted.insert(missing);
            let fetched: Vec<(String, Arc<customisation::Listing>)> =
                futures_util::stream::iter(wanted)
                    .map(|path| async move {
                        let listing = self.listing(&path).await?;
                        Ok::<_, NotHere>((path, listing))
                    })
                    .buffer_unordered(LISTINGS_AT_ONCE)
                    .try_collect()
                    .await
                    .map_err(BuildError::NotHere)?;
            tree.listings.extend(fetched);
        }
        Err(BuildError::Task(
            "the customisation layer asked for more listings than the closure has".to_string(),
        ))
    }
}

/// A closure from the cache's narinfos as the builder reads one (as
/// `nix path-info` gives it from a store): sizes, NarHashes, references
/// without the path itself.
pub(crate) fn closure_graph(found: &crate::binary_cache::Closure) -> Closure {
    found
        .paths
        .iter()
        .map(|(path, info)| {
            let references = info
                .references
                .iter()
                .filter(|r| *r != path)
                .map(|r| r.as_str().to_string())
                .collect();
            (
                path.as_str().to_string(),
                PathInfo {
                    nar_size: info.nar_size,
                    nar_hash: info.nar_hash.to_nix32_string(),
                    references,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! What the store keeps between builds, and how the customisation
    //! walk fetches listings.
    use super::*;
    use crate::binary_cache::decompress::Compression;
    use crate::binary_cache::testing::{self, Server, TestCache, TestNode};
    use crate::binary_cache::{CacheOptions, TrustedKeys};
    use crate::builder::nix::PathInfo;
    use crate::storage::MemoryStorage;
    use std::sync::atomic::AtomicBool;

    fn store_over(cache: BinaryCache) -> CacheStore {
        let storage = Arc::new(MemoryStorage::new());
        CacheStore::new(
            cache,
            Arc::new(Catalog::new(storage)),
            Arc::new(super::super::jobs::NoIndexJobs),
            true,
        )
    }

    fn files(n: usize) -> TestNode {
        TestNode::Directory(vec![(
            b"share".to_vec(),
            TestNode::Directory(
                (0..n)
                    .map(|i| {
                        (
                            format!("f{i:06}").into_bytes(),
                            TestNode::File {
                                executable: false,
                                contents: Vec::new(),
                            },
                        )
                    })
                    .collect(),
            ),
        )])
    }

    /// A listing too large to keep is walked and used, not kept: what the
    /// process keeps stays within its bounds.
    #[tokio::test]
    async fn a_listing_over_the_kept_bound_is_used_but_not_kept() {
        let key = testing::test_key();
        let mut cache = TestCache::new();
        let big = testing::store_path("big-1");
        cache.add(
            &big,
            &files(LISTING_KEPT_ENTRIES + 5_000),
            &[],
            Compression::Zstd,
            Some(&key),
        );
        let server = Server::start(&cache).await;
        let keys = TrustedKeys::parse(&key.public_key()).unwrap();
        let client = BinaryCache::new(&server.url(), keys, CacheOptions::default()).unwrap();
        let store = store_over(client);
        let listing = store.listing(big.as_str()).await.unwrap();
        assert!(listing.len() > LISTING_KEPT_ENTRIES);
        let kept = store.listings.lock().unwrap().total();
        assert!(
            kept <= LISTING_KEPT_ENTRIES,
            "the process keeps {kept} listing entries of one path, over LISTING_KEPT_ENTRIES ({LISTING_KEPT_ENTRIES})"
        );
        // However many are kept, their total stays bounded.
        let mut kept = Kept::default();
        for i in 0..10 {
            kept.keep(format!("p{i}"), (), KEPT_ENTRIES_TOTAL / 4);
            assert!(kept.total() <= KEPT_ENTRIES_TOTAL);
        }
        kept.keep("huge".to_string(), (), KEPT_ENTRIES_TOTAL + 1);
        assert!(kept.get("huge").is_none());
    }

    /// An output whose `bin/` links into many packages (an env) takes a
    /// few walks, each fetching every listing the last one showed links
    /// into, not one walk per package.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn customising_links_into_many_paths_takes_a_few_walks() {
        const N: usize = 600;
        const FILLER: usize = 200;
        let client = BinaryCache::new(
            "file:///nonexistent-cache",
            TrustedKeys::cache_nixos_org(),
            CacheOptions::default(),
        )
        .unwrap();
        let store = store_over(client);
        let env = testing::store_path("env-1");
        let mut closure = Closure::new();
        let mut env_listing = customisation::Listing::new();
        env_listing.insert(PathBuf::new(), Entry::Dir);
        env_listing.insert(PathBuf::from("bin"), Entry::Dir);
        for i in 0..N {
            let dep = testing::store_path(&format!("dep{i}-1"));
            let mut listing = customisation::Listing::new();
            listing.insert(PathBuf::new(), Entry::Dir);
            listing.insert(PathBuf::from("bin"), Entry::Dir);
            listing.insert(
                PathBuf::from(format!("bin/tool{i}")),
                Entry::File {
                    executable: true,
                    size: 1,
                },
            );
            listing.insert(PathBuf::from("share"), Entry::Dir);
            for j in 0..FILLER {
                listing.insert(
                    PathBuf::from(format!("share/f{j}")),
                    Entry::File {
                        executable: false,
                        size: 1,
                    },
                );
            }
            keep_listing(&store.listings, dep.as_str(), Arc::new(listing));
            env_listing.insert(
                PathBuf::from(format!("bin/tool{i}")),
                Entry::Symlink {
                    target: PathBuf::from(format!("{dep}/bin/tool{i}")),
                },
            );
            closure.insert(
                dep.as_str().to_string(),
                PathInfo {
                    nar_size: 1,
                    nar_hash: String::new(),
                    references: vec![],
                },
            );
        }
        keep_listing(&store.listings, env.as_str(), Arc::new(env_listing));
        closure.insert(
            env.as_str().to_string(),
            PathInfo {
                nar_size: 1,
                nar_hash: String::new(),
                references: vec![],
            },
        );
        let limits = WalkLimits {
            max_entries: 200_000,
            max_bytes: 1 << 40,
            cancelled: Arc::new(AtomicBool::new(false)),
        };
        let (custom, walks) = store
            .customise_in_rounds(vec![env.as_str().to_string()], &closure, limits)
            .await
            .unwrap();
        assert!(custom.tree.len() > N);
        assert!(walks <= 3, "{walks} walks for {N} linked packages");
    }
}
