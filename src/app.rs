//! The object graph, built once from the configuration: the one place
//! where storage, the package source, the builder or queue, the image
//! service, credentials and metrics are made and wired together. The
//! binary calls it, and so do the tests, so both run what is deployed.
//!
//! | command | built here |
//! |---|---|
//! | `nixery serve` (and the Lambda function) | [`App::from_config`] -> the router's [`AppState`] |
//! | `nixery worker` | [`worker`] |
//! | `nixery gc` | storage, then [`crate::gc::collect`] |
//! | `nixery popularity` | [`popularity`] |
//!
//! Tests that stand something else in for storage or for the builds use
//! [`App::with`] and [`Parts`], with every other setting as configured.

use std::sync::Arc;

use crate::assembly::attrs::{revision_of, Catalog};
use crate::assembly::jobs::{
    make_index, IndexJobs, IndexRequest, LocalIndexer, NoIndexJobs, QueueIndexer,
};
use crate::assembly::store::CacheStore;
use crate::assembly::{CacheConfig, FromCache};
use crate::binary_cache::{BinaryCache, CacheOptions, StorePath, TrustedKeys};
use crate::builder::nix::{Nix, ResolveRequest};
use crate::builder::popularity::{Popularity, PopularityError};
use crate::builder::store::NixStore;
use crate::builder::Builder;
use crate::config::{
    AuthScope, BuildMode, IndexConfig, NixConfig, PopularityConfig, ServeConfig, WorkerConfig,
};
use crate::dispatch::git::QueueGit;
use crate::dispatch::in_process::InProcess;
use crate::dispatch::queue::{sqs_client, BySystem, SqsInbox, SqsQueue};
use crate::dispatch::single_flight::{SingleFlight, Turns};
use crate::dispatch::sqs::{SqsDispatch, Timings};
use crate::dispatch::worker::Worker;
use crate::dispatch::Dispatch;
use crate::fetch::FetchError;
use crate::images::declared::{DeclarationError, Declarations};
use crate::images::Images;
use crate::metrics::Metrics;
use crate::oci::name::Arch;
use crate::registry::auth::{Auth, AuthError, Scope};
use crate::registry::token::{KeyError, Tokens};
use crate::registry::AppState;
use crate::source::{SourceError, Sources};
use crate::storage::keys::{AttrsHeadKey, AttrsPopularityKey};
use crate::storage::{self, Storage, StorageConfig, StorageError};

/// Why the registry, a worker or a command could not be set up. Each
/// names the setting it comes from.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("opening storage: {0}")]
    Storage(#[from] StorageError),
    #[error("loading {setting}: {source}")]
    Read {
        setting: &'static str,
        source: FetchError,
    },
    #[error("NIXERY_IMAGES is not valid: {0}")]
    Declared(#[from] DeclarationError),
    #[error("parsing the htpasswd file (NIXERY_HTPASSWD): {0}")]
    Htpasswd(#[from] AuthError),
    #[error("parsing popularity data (NIX_POPULARITY_URL): {0}")]
    Popularity(#[from] PopularityError),
    #[error("computing popularity: {0}")]
    Compute(String),
    #[error("resolving the package source: {0}")]
    Source(#[from] SourceError),
    #[error("the binary cache (NIXERY_SUBSTITUTER, NIXERY_TRUSTED_KEYS): {0}")]
    Cache(String),
    #[error("reading the token key (NIXERY_TOKEN_KEY={object}): {source}")]
    TokenKey { object: String, source: KeyError },
}

/// What tests may put in place of what the configuration would make.
#[derive(Default)]
pub struct Parts {
    pub storage: Option<Arc<dyn Storage>>,
    pub dispatch: Option<Arc<dyn Dispatch>>,
}

/// The registry, ready to serve.
pub struct App {
    pub state: AppState,
}

impl App {
    /// The registry the configuration describes. `in_lambda`: run by the
    /// Lambda runtime (counts go to CloudWatch through the log).
    pub async fn from_config(config: &ServeConfig, in_lambda: bool) -> Result<App, AppError> {
        App::with(config, in_lambda, Parts::default()).await
    }

    /// The registry the configuration describes, with `parts` in place of
    /// what it would make.
    pub async fn with(
        config: &ServeConfig,
        in_lambda: bool,
        parts: Parts,
    ) -> Result<App, AppError> {
        let mut images = config.images.clone();
        if let Some(file) = &config.declared_images {
            let bytes = read(file, &config.storage, "the declared images (NIXERY_IMAGES)").await?;
            images.declared = Declarations::parse(&bytes)?;
            tracing::info!(images = images.declared.len(), "declared images loaded");
        }
        let storage = match parts.storage {
            Some(storage) => storage,
            None => storage::open(&config.storage).await?,
        };
        let mut sources = Sources::new(config.source.clone(), config.tag_ttl)
            .remembering_failures(config.failure_ttl)
            .allowing(config.allowed_refs.clone())
            .checking_nixpkgs_at(config.nixpkgs_api.clone());
        // In Lambda, counts go to CloudWatch through the log; locally, to
        // `/metrics`.
        let metrics = Arc::new(Metrics::new(
            in_lambda.then_some(crate::metrics::SERVICE_FUNCTION),
        ));
        let dispatch: Arc<dyn Dispatch> = match (parts.dispatch, &config.builds) {
            (Some(dispatch), _) => dispatch,
            (
                None,
                BuildMode::Sqs {
                    queue,
                    arm64_queue,
                    timings,
                },
            ) => {
                let sqs = sqs_client(queue.endpoint.as_deref()).await;
                let mut queues =
                    BySystem::new(Arc::new(SqsQueue::new(sqs.clone(), queue.url.clone())));
                if let Some(url) = arm64_queue {
                    queues = queues.with(
                        Arch::Arm64.nix_system(),
                        Arc::new(SqsQueue::new(sqs, url.clone())),
                    );
                }
                let queue = Arc::new(queues);
                // Where builds run on workers, so do git lookups: the
                // function (the Lambda runtime) has no git.
                sources = sources.resolving_git_with(Arc::new(QueueGit::new(
                    storage.clone(),
                    queue.clone(),
                    config.tag_ttl,
                    config.failure_ttl,
                    timings.build_timeout,
                )));
                sqs_dispatch(config, *timings, queue, &storage, &metrics).await?
            }
            (None, BuildMode::Local(nix)) => {
                let builder = local_builder(config, nix, &storage).await?;
                local_dispatch(builder, metrics.clone(), config.max_queued_builds)
            }
        };
        let images = Images::new(storage.clone(), dispatch, Arc::new(sources), images);
        let auth = match &config.auth {
            None => None,
            Some((file, scope)) => Some(Arc::new(
                auth(file, *scope, &config.storage)
                    .await?
                    .with_tokens(tokens(config, storage.clone()).await?)
                    .with_login_failures(config.tokens.login_failures),
            )),
        };
        let mut state = AppState::new(Arc::new(images), storage, auth, metrics);
        if let BuildMode::Sqs { timings, .. } = &config.builds {
            state = state.with_heartbeat(timings.heartbeat);
        }
        if let Some(url) = &config.public_url {
            state = state.with_public_url(url);
        }
        Ok(App { state })
    }

    /// The whole registry API.
    pub fn router(&self) -> axum::Router {
        crate::registry::router(self.state.clone())
    }
}

/// The local mode's builds: in this process, as many at once as the
/// builder has slots, at most `max_queued` more waiting for one.
pub(crate) fn local_dispatch(
    builder: Builder,
    metrics: Arc<Metrics>,
    max_queued: usize,
) -> Arc<dyn Dispatch> {
    let turns = Turns {
        running: builder.limits().max_builds,
        waiting: max_queued,
    };
    let in_process = Arc::new(InProcess::new(builder, metrics));
    Arc::new(SingleFlight::taking_turns(in_process, turns))
}

/// Builds sent to the workers over SQS; with a binary cache, images it
/// holds are assembled here first.
async fn sqs_dispatch(
    config: &ServeConfig,
    timings: Timings,
    queue: Arc<BySystem>,
    storage: &Arc<dyn Storage>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Dispatch>, AppError> {
    let mut dispatch = SqsDispatch::new(storage.clone(), queue.clone(), timings)
        .queueing_at_most(config.max_queued_builds);
    if let Some((cache, nix)) = &config.assembly {
        // Index jobs go to the workers, as builds do; never where no
        // package-set code may run.
        let jobs: Arc<dyn IndexJobs> = match cache.mode {
            FromCache::Only => Arc::new(NoIndexJobs),
            FromCache::First | FromCache::Never => {
                Arc::new(QueueIndexer::new(queue, storage.clone()))
            }
        };
        let store = cache_store(cache, nix, storage, jobs)?;
        let popularity = Arc::new(load_popularity(nix, &config.storage).await?);
        let assembler = Builder::new(store, storage.clone(), popularity, nix.limits);
        let assembler = match cache.mode {
            FromCache::Only => assembler,
            FromCache::First | FromCache::Never => assembler.passing_on(),
        };
        dispatch = dispatch.assembling_with(assembler, metrics.clone());
        log_assembly(cache);
    }
    Ok(Arc::new(SingleFlight::new(Arc::new(dispatch))))
}

/// The local mode's builder: Nix here, and with a binary cache, the
/// cache first (`first`) or alone (`only`).
async fn local_builder(
    config: &ServeConfig,
    nix: &NixConfig,
    storage: &Arc<dyn Storage>,
) -> Result<Builder, AppError> {
    let builder = builder(nix, storage, &config.storage).await?;
    let Some((cache, _)) = &config.assembly else {
        return Ok(builder);
    };
    let builder = match cache.mode {
        // Nothing of the package set runs here, indexing included:
        // indexes come from `nixery index`.
        FromCache::Only => {
            let store = cache_store(cache, nix, storage, Arc::new(NoIndexJobs))?;
            let popularity = Arc::new(load_popularity(nix, &config.storage).await?);
            Builder::new(store, storage.clone(), popularity, nix.limits)
        }
        FromCache::First | FromCache::Never => {
            let catalog = Arc::new(Catalog::new(storage.clone()));
            let jobs = Arc::new(LocalIndexer::new(
                Nix::new(nix.timeout),
                catalog.clone(),
                storage.clone(),
            ));
            builder.trying_first(cache_store_on(cache, nix, catalog, jobs)?)
        }
    };
    log_assembly(cache);
    Ok(builder)
}

fn log_assembly(cache: &CacheConfig) {
    tracing::info!(cache = %crate::source::redact_urls(&cache.substituter), mode = %cache.mode, "images are assembled from the binary cache");
}

/// A build worker: the builder, on the configured queue; it makes the
/// attribute indexes asked for too.
pub async fn worker(config: &WorkerConfig) -> Result<Worker, AppError> {
    let storage = storage::open(&config.storage).await?;
    let builder = builder(&config.nix, &storage, &config.storage).await?;
    let sqs = sqs_client(config.queue.endpoint.as_deref()).await;
    let inbox = Arc::new(SqsInbox::new(sqs, config.queue.url.clone()));
    let catalog = Arc::new(Catalog::new(storage));
    Ok(Worker::new(builder, inbox, config.queue.heartbeat)
        .indexing_with(Nix::new(config.nix.timeout), catalog))
}

/// The binary cache as a source of store paths, with the attribute
/// indexes in `storage`.
fn cache_store(
    cache: &CacheConfig,
    nix: &NixConfig,
    storage: &Arc<dyn Storage>,
    jobs: Arc<dyn IndexJobs>,
) -> Result<Arc<CacheStore>, AppError> {
    let catalog = Arc::new(Catalog::new(storage.clone()));
    cache_store_on(cache, nix, catalog, jobs)
}

/// The binary cache as a source of store paths, with the attribute
/// indexes of `catalog` (shared with the index jobs that write them).
fn cache_store_on(
    cache: &CacheConfig,
    nix: &NixConfig,
    catalog: Arc<Catalog>,
    jobs: Arc<dyn IndexJobs>,
) -> Result<Arc<CacheStore>, AppError> {
    let keys =
        TrustedKeys::parse(&cache.trusted_keys).map_err(|e| AppError::Cache(e.to_string()))?;
    let options = CacheOptions {
        // The image size limit, checked as narinfos come: nothing larger
        // is downloaded.
        max_nar_size: nix.limits.max_image_size,
        ..CacheOptions::default()
    };
    let client = BinaryCache::new(&cache.substituter, keys, options)
        .map_err(|e| AppError::Cache(e.to_string()))?;
    Ok(Arc::new(CacheStore::new(
        client,
        catalog,
        jobs,
        cache.mode == FromCache::Only,
    )))
}

/// A builder with the local Nix and the configured popularity data.
pub async fn builder(
    nix: &NixConfig,
    storage: &Arc<dyn Storage>,
    storage_config: &StorageConfig,
) -> Result<Builder, AppError> {
    let popularity = Arc::new(load_popularity(nix, storage_config).await?);
    Ok(Builder::new(
        Arc::new(NixStore::new(Nix::new(nix.timeout))),
        storage.clone(),
        popularity,
        nix.limits,
    ))
}

/// The htpasswd file of a private registry.
async fn auth(file: &str, scope: AuthScope, storage: &StorageConfig) -> Result<Auth, AppError> {
    let bytes = read(file, storage, "the htpasswd file (NIXERY_HTPASSWD)").await?;
    let scope = match scope {
        AuthScope::Build => Scope::Build,
        AuthScope::All => Scope::All,
    };
    let auth = Auth::parse(&String::from_utf8_lossy(&bytes), scope)?;
    tracing::info!(?scope, "credentials required");
    Ok(auth)
}

/// Bearer tokens signed with the key set every instance shares in
/// storage; their service is the public URL's host, if there is one.
async fn tokens(config: &ServeConfig, storage: Arc<dyn Storage>) -> Result<Tokens, AppError> {
    let settings = &config.tokens;
    let service = config
        .public_url
        .as_deref()
        .and_then(|url| url.split_once("://"))
        .map_or(crate::registry::auth::DEFAULT_SERVICE, |(_, host)| host);
    Tokens::shared(storage, &settings.key_object, service, settings.ttl)
        .await
        .map_err(|source| AppError::TokenKey {
            object: settings.key_object.clone(),
            source,
        })
}

/// A file by path, or by `file://`, `https://` or `s3://` URL.
async fn read(
    file: &str,
    storage: &StorageConfig,
    setting: &'static str,
) -> Result<Vec<u8>, AppError> {
    let read = if file.contains("://") {
        crate::fetch::fetch(file, storage.s3_endpoint()).await
    } else {
        tokio::fs::read(file).await.map_err(|e| FetchError {
            url: file.to_string(),
            message: e.to_string(),
        })
    };
    read.map_err(|source| AppError::Read { setting, source })
}

/// Popularity data from `NIX_POPULARITY_URL`, or equal weights.
async fn load_popularity(nix: &NixConfig, storage: &StorageConfig) -> Result<Popularity, AppError> {
    let Some(url) = &nix.popularity_url else {
        return Ok(Popularity::none());
    };
    let bytes = read(url, storage, "popularity data (NIX_POPULARITY_URL)").await?;
    let popularity = Popularity::parse(&bytes)?;
    tracing::info!(url, entries = popularity.len(), "popularity data loaded");
    Ok(popularity)
}

/// `nixery popularity`: builds each package and counts references over
/// their closures.
pub async fn popularity(config: PopularityConfig) -> Result<Popularity, AppError> {
    let nix = Nix::new(config.nix.timeout);
    let sources = Sources::new(config.source, config.tag_ttl);
    let source = sources.resolve("latest").await?.arg;
    let failed = |e: crate::builder::nix::NixError| AppError::Compute(e.to_string());
    let mut closures = Vec::new();
    for package in config.packages {
        let request = ResolveRequest {
            source: source.clone(),
            system: Arch::Amd64.nix_system().to_string(),
            packages: vec![package.clone()],
            implicit: vec![],
            not_before: 0,
        };
        let resolved = nix.resolve(&request).await.map_err(failed)?;
        if !resolved.unknown.is_empty() {
            return Err(AppError::Compute(format!("unknown package: {package}")));
        }
        nix.realise(&resolved.packages, |_| {})
            .await
            .map_err(failed)?;
        let paths: Vec<String> = resolved
            .packages
            .iter()
            .flat_map(|p| p.paths.clone())
            .collect();
        closures.push(nix.closure(&paths).await.map_err(failed)?);
        tracing::info!(package, "closure read");
    }
    Ok(Popularity::compute(&closures))
}

/// `nixery index`: the attribute index of the configured source at the
/// configured tag, for each system; with popularity data beside it if
/// asked for. The keys written, for the log and the operator.
pub async fn index(config: IndexConfig) -> Result<Vec<String>, AppError> {
    let storage = storage::open(&config.storage).await?;
    let sources = Sources::new(config.source.clone(), config.tag_ttl)
        .allowing(config.allowed_refs.clone())
        .checking_nixpkgs_at(config.nixpkgs_api.clone());
    let source = sources.resolve(&config.tag).await?.arg;
    let nix = Nix::new(config.nix.timeout);
    let catalog = Catalog::new(storage.clone());
    let revision = revision_of(&source);
    let mut written = Vec::new();
    for system in &config.systems {
        let request = IndexRequest {
            source: source.clone(),
            system: system.clone(),
        };
        let head = make_index(&nix, &catalog, &request)
            .await
            .map_err(|e| AppError::Compute(e.to_string()))?;
        written.push(AttrsHeadKey::of(&revision, system).to_string());
        let Some(cache) = &config.popularity_from else {
            continue;
        };
        let options = CacheOptions {
            // Every package of the revision: as many paths as that takes.
            max_paths: usize::MAX,
            max_nar_size: u64::MAX,
            ..CacheOptions::default()
        };
        let keys = TrustedKeys::parse(&cache.trusted_keys)
            .map_err(|e| AppError::Compute(e.to_string()))?;
        let cache = BinaryCache::new(&cache.substituter, keys, options)
            .map_err(|e| AppError::Compute(e.to_string()))?;
        let popularity = count_popularity(&cache, &catalog, &head)
            .await
            .map_err(|e| AppError::Compute(e.to_string()))?;
        let key = AttrsPopularityKey::of(&revision, system);
        storage
            .put(&key, bytes::Bytes::from(popularity.to_json()))
            .await?;
        tracing::info!(%key, entries = popularity.len(), "popularity stored");
        written.push(key.to_string());
    }
    Ok(written)
}

/// Nixery's popcount over an index: the closures of every package of the
/// index, from the cache's narinfos, and for each package name how many
/// store paths refer to it ([`Popularity::compute`]).
async fn count_popularity(
    cache: &BinaryCache,
    catalog: &Catalog,
    head: &crate::assembly::attrs::Head,
) -> Result<Popularity, String> {
    let entries = catalog.all_entries(head).await.map_err(|e| e.to_string())?;
    let roots: Vec<StorePath> = entries
        .iter()
        .flat_map(|e| e.paths.iter())
        .filter_map(|p| p.parse().ok())
        .collect();
    // A package set holds packages its cache never has (unfree ones,
    // those that failed to build): they count for nothing.
    let closure = cache
        .closure_of_what_it_holds(&roots)
        .await
        .map_err(|e| e.to_string())?;
    if closure.missing > 0 {
        tracing::info!(
            missing = closure.missing,
            counted = closure.paths.len(),
            "store paths the cache lacks are left out of the popularity counts"
        );
    }
    Ok(Popularity::compute([
        &crate::assembly::store::closure_graph(&closure),
    ]))
}
