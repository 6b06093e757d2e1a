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

/// Narinfos and listings kept between the steps of builds (and for the
/// next builds): the most of each.
const KEPT: usize = 50_000;
/// A path's listing is kept (for the customisation layer) when it has at
/// most this many entries.
const LISTING_KEPT_ENTRIES: usize = 20_000;

/// Store paths from a binary cache.
pub struct CacheStore {
    cache: BinaryCache,
    catalog: Arc<Catalog>,
    jobs: Arc<dyn IndexJobs>,
    /// Use an index older than a pull's freshness bound rather than give
    /// up (when nothing else can build the image).
    stale_index_ok: bool,
    /// Verified narinfos of closures read lately, by store path.
    narinfos: Mutex<HashMap<String, NarInfo>>,
    /// Listings of store paths walked lately, by store path.
    listings: Arc<Mutex<HashMap<String, Arc<customisation::Listing>>>>,
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
            return Ok(info.clone());
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
            if kept.len() >= KEPT {
                kept.clear();
            }
            kept.insert(info.store_path.as_str().to_string(), info);
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
            return Ok(found.clone());
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

fn keep_listing(
    listings: &Mutex<HashMap<String, Arc<customisation::Listing>>>,
    path: &str,
    listing: Arc<customisation::Listing>,
) {
    let mut kept = listings.lock().expect("never poisoned");
    if kept.len() >= KEPT {
        kept.clear();
    }
    kept.insert(path.to_string(), listing);
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
        CacheError::Unavailable { .. }
        | CacheError::Url { .. }
        | CacheError::Http { .. }
        | CacheError::Io { .. } => NotHere::Unavailable {
            cache: cache.to_string(),
            message: error.to_string(),
        },
        CacheError::NarInfo { path, .. }
        | CacheError::WrongPath { path, .. }
        | CacheError::Signature { path, .. }
        | CacheError::TooManyPaths { path, .. }
        | CacheError::ClosureTooLarge { path, .. }
        | CacheError::FileSize { path, .. }
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

/// A NAR that could not be walked: what the cache sent is refused, or
/// (if reading it failed) what the cache error says.
fn nar_error(error: &NarError, path: &str, cache: &str) -> NotHere {
    if let NarError::Read { source, .. } = error {
        if let Some(cache_error) = CacheError::from_io(source) {
            return not_here(cache_error, cache);
        }
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
        let closure: Closure = found
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
                        references,
                    },
                )
            })
            .collect();
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
                    .cloned()
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
                let reader = runtime
                    .block_on(cache.nar(&info))
                    .map_err(|e| PackError::NotHere(not_here(&e, cache.url())))?
                    .into_reader();
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
                if let Some(error) = failed {
                    return Err(error);
                }
                walked.map_err(|e| PackError::NotHere(nar_error(&e, &path, cache.url())))?;
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
        let paths: Vec<String> = closure.keys().cloned().collect();
        let mut tree = ListedTree::default();
        // Listings are fetched as the walk asks for them: the outputs' at
        // least, and those of paths their links lead into.
        for _ in 0..=paths.len() {
            let walk = {
                let (outputs, paths, tree, limits) =
                    (outputs.clone(), paths.clone(), tree.clone(), limits.clone());
                tokio::task::spawn_blocking(move || limits.customise(&outputs, &paths, &tree))
                    .await
                    .map_err(|e| BuildError::Task(e.to_string()))?
            };
            match walk {
                Err(CustomisationError::Unlisted { store_path }) => {
                    let listing = self
                        .listing(&store_path)
                        .await
                        .map_err(BuildError::NotHere)?;
                    tree.listings.insert(store_path, (*listing).clone());
                }
                other => return other.map_err(BuildError::from),
            }
        }
        Err(BuildError::Task(
            "the customisation layer asked for more listings than the closure has".to_string(),
        ))
    }
}
