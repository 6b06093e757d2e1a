//! Where a build's store paths come from: the [`StorePaths`] trait, the
//! seam between a build's steps (which are the same for every image) and
//! the source of what goes into its layers.
//!
//! | implementation | resolves with | closure from | layers packed from |
//! |---|---|---|---|
//! | [`NixStore`] | Nix evaluating the package set | `nix path-info` | the Nix store on disk |
//! | `assembly::CacheStore` | an attribute index | signed narinfos | a binary cache's NARs |
//! | tests' fake | a table | a table | trees in memory |
//!
//! Whatever the source, a layer's entries go through the one
//! [`LayerWriter`](super::pack::LayerWriter) and the customisation layer
//! through the one [`customise`](super::customisation::customise), so the
//! same store paths give the same bytes.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use async_trait::async_trait;

use super::customisation::{self, Customisation, DiskTree};
use super::nix::{Closure, Nix, ResolveRequest, Resolved, ResolvedPackage};
use super::objects::Job;
use super::pack;
use super::step::Step;
use super::{report, BuildError, Progress};

/// The steps a source runs, by the names people watching see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    /// Which packages exist, and their outputs.
    pub resolve: Step,
    /// Making the outputs present, if this source has anything to do.
    pub realise: Option<Step>,
    /// Reading the closure.
    pub closure: Step,
    /// Writing the layers not stored yet.
    pub pack: Step,
    /// Whether the source is a binary cache (an image it gives is
    /// assembled, not built).
    pub from_cache: bool,
}

/// What the customisation walk may spend (see [`customisation::Limits`]).
#[derive(Debug, Clone)]
pub struct WalkLimits {
    pub max_entries: usize,
    pub max_bytes: u64,
    pub cancelled: Arc<AtomicBool>,
}

impl WalkLimits {
    /// Runs `customise` with these limits.
    pub fn customise(
        &self,
        outputs: &[String],
        closure: &[String],
        tree: &dyn customisation::StoreTree,
    ) -> Result<Customisation, customisation::CustomisationError> {
        let limits = customisation::Limits {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            cancelled: &self.cancelled,
        };
        customisation::customise(outputs, closure, tree, &limits)
    }
}

/// A source of store paths for builds.
#[async_trait]
pub trait StorePaths: Send + Sync + 'static {
    /// The steps it runs.
    fn steps(&self) -> Steps;

    /// Which requested packages exist, with their outputs' store paths
    /// (unknown names are an error naming them).
    async fn resolve(&self, request: &ResolveRequest) -> Result<Resolved, BuildError>;

    /// Makes the outputs present (only where [`Steps::realise`] is set).
    async fn realise(
        &self,
        packages: &[ResolvedPackage],
        progress: Progress<'_>,
    ) -> Result<(), BuildError>;

    /// Every store path `roots` need, with sizes and references. A source
    /// that reads remote data checks `max_size` (bytes of NAR) as it goes.
    async fn closure(
        &self,
        roots: &[String],
        max_size: u64,
        progress: Progress<'_>,
    ) -> Result<Closure, BuildError>;

    /// What writes the layer of `paths` (sorted store paths of `closure`).
    fn pack(&self, paths: Vec<String>, closure: &Closure) -> Job;

    /// The customisation layer of `outputs` (the requested outputs, in
    /// priority order) over `closure`.
    async fn customise(
        &self,
        outputs: Vec<String>,
        closure: &Closure,
        limits: WalkLimits,
    ) -> Result<Customisation, BuildError>;

    /// Free bytes on the disk of a local store, if the source has one.
    fn free_bytes(&self) -> Option<u64> {
        None
    }

    /// Deletes store paths nothing needs until `max_freed` bytes are free
    /// (a source without a local store has nothing to do).
    async fn collect_garbage(&self, _max_freed: u64) -> Result<(), BuildError> {
        Ok(())
    }
}

/// Store paths from the local Nix: evaluated, realised and read from
/// `/nix/store`.
#[derive(Debug, Clone)]
pub struct NixStore {
    nix: Nix,
}

impl NixStore {
    pub fn new(nix: Nix) -> NixStore {
        NixStore { nix }
    }
}

#[async_trait]
impl StorePaths for NixStore {
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
        let resolved = self.nix.resolve(request).await?;
        if !resolved.unknown.is_empty() {
            return Err(BuildError::UnknownPackages(resolved.unknown));
        }
        Ok(resolved)
    }

    async fn realise(
        &self,
        packages: &[ResolvedPackage],
        progress: Progress<'_>,
    ) -> Result<(), BuildError> {
        let nix_says = |log: &super::nix::NixLog| report(progress, |p| log.report(p));
        Ok(self.nix.realise(packages, nix_says).await?)
    }

    async fn closure(
        &self,
        roots: &[String],
        _max_size: u64,
        _progress: Progress<'_>,
    ) -> Result<Closure, BuildError> {
        Ok(self.nix.closure(roots).await?)
    }

    fn pack(&self, paths: Vec<String>, _closure: &Closure) -> Job {
        Box::new(move |writer| pack::write_store_paths(writer, &paths))
    }

    async fn customise(
        &self,
        outputs: Vec<String>,
        closure: &Closure,
        limits: WalkLimits,
    ) -> Result<Customisation, BuildError> {
        let paths: Vec<String> = closure.keys().cloned().collect();
        tokio::task::spawn_blocking(move || limits.customise(&outputs, &paths, &DiskTree))
            .await
            .map_err(|e| BuildError::Task(e.to_string()))?
            .map_err(BuildError::from)
    }

    fn free_bytes(&self) -> Option<u64> {
        super::nix::store_free_bytes().ok()
    }

    async fn collect_garbage(&self, max_freed: u64) -> Result<(), BuildError> {
        Ok(self.nix.collect_garbage(max_freed).await?)
    }
}
