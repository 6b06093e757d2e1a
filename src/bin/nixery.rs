//! `nixery`: reads the command line and settings, builds the clients once,
//! and hands over to the library. `nixery --help` lists the commands;
//! `nixery <command> --help` lists every setting with its variable and
//! default.

use std::sync::Arc;

use anyhow::Context;
use nixery::builder::nix::{Nix, ResolveRequest};
use nixery::builder::popularity::Popularity;
use nixery::builder::Builder;
use nixery::config::{
    AuthScope, BuildMode, Cli, GcConfig, Mode, NixConfig, PopularityConfig, ServeConfig,
    WorkerConfig,
};
use nixery::dispatch::in_process::InProcess;
use nixery::dispatch::single_flight::SingleFlight;
use nixery::dispatch::sqs::{sqs_client, BySystem, QueueGit, SqsDispatch, SqsQueue};
use nixery::dispatch::worker::Worker;
use nixery::dispatch::Dispatch;
use nixery::images::declared::Declarations;
use nixery::images::Images;
use nixery::metrics::Metrics;
use nixery::oci::name::Arch;
use nixery::registry::auth::{Auth, Scope};
use nixery::registry::{self, AppState};
use nixery::source::Sources;
use nixery::storage::{self, Storage, StorageConfig};
use tracing_subscriber::EnvFilter;

/// Set by the Lambda runtime in every function's environment.
const LAMBDA_RUNTIME_API: &str = "AWS_LAMBDA_RUNTIME_API";

fn main() -> anyhow::Result<()> {
    let in_lambda = std::env::var_os(LAMBDA_RUNTIME_API).is_some();
    let mode = match Cli::from_env().mode(in_lambda) {
        Ok(mode) => mode,
        Err(nixery::config::ModeError::Parse(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(!in_lambda && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        match mode {
            Mode::Serve(config) => serve(*config, in_lambda).await,
            Mode::Worker(config) => run_worker(config).await,
            Mode::Popularity(config) => {
                let popularity = compute_popularity(config).await?;
                println!("{}", popularity.to_json());
                Ok(())
            }
            Mode::Gc(config) => collect_garbage(config).await,
        }
    })
}

/// `nixery gc`: one collection; each object deleted on a line of stdout,
/// then the totals.
async fn collect_garbage(config: GcConfig) -> anyhow::Result<()> {
    let storage = storage::open(&config.storage)
        .await
        .context("opening storage")?;
    let settings = config.settings;
    let report = nixery::gc::collect(&*storage, &settings, nixery::storage::records::unix_now())
        .await
        .context("collecting garbage")?;
    let verb = if settings.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for object in &report.deleted {
        println!("{verb} {} ({} bytes)", object.key, object.size);
    }
    for key in &report.unreadable {
        println!("kept unreadable {key}");
    }
    for (key, error) in &report.failed {
        println!("could not delete {key}: {error}");
    }
    println!(
        "{verb} {} of {} objects, {} bytes; {} unused images",
        report.deleted.len(),
        report.scanned,
        report.bytes(),
        report.images_expired
    );
    tracing::info!(
        dry_run = settings.dry_run,
        deleted = report.deleted.len(),
        scanned = report.scanned,
        bytes = report.bytes(),
        images_expired = report.images_expired,
        unreadable = report.unreadable.len(),
        failed = report.failed.len(),
        "garbage collected"
    );
    anyhow::ensure!(
        report.failed.is_empty(),
        "{} objects could not be collected (listed above)",
        report.failed.len()
    );
    Ok(())
}

/// The registry: under the Lambda runtime, or on a local port.
async fn serve(mut config: ServeConfig, in_lambda: bool) -> anyhow::Result<()> {
    if let Some(file) = &config.declared_images {
        let bytes = read_file_or_url(file, &config.storage)
            .await
            .context("loading the declared images (NIXERY_IMAGES)")?;
        config.images.declared = Declarations::parse(&bytes).with_context(|| {
            format!(
                "NIXERY_IMAGES={} is not valid",
                nixery::source::redact_urls(file)
            )
        })?;
        tracing::info!(
            images = config.images.declared.len(),
            "declared images loaded"
        );
    }
    let storage = storage::open(&config.storage)
        .await
        .context("opening storage")?;
    let mut sources = Sources::new(config.source.clone(), config.tag_ttl)
        .remembering_failures(config.failure_ttl)
        .allowing(config.allowed_refs.clone())
        .checking_nixpkgs_at(config.nixpkgs_api.clone());
    // In Lambda, counts go to CloudWatch through the log; locally, to
    // `/metrics`.
    let metrics = Arc::new(Metrics::new(
        in_lambda.then_some(nixery::metrics::SERVICE_FUNCTION),
    ));
    let dispatch: Arc<dyn Dispatch> = match &config.builds {
        BuildMode::Sqs {
            queue,
            arm64_queue,
            timings,
        } => {
            let sqs = sqs_client(queue.endpoint.as_deref()).await;
            let mut queues = BySystem::new(Arc::new(SqsQueue::new(sqs.clone(), queue.url.clone())));
            if let Some(url) = arm64_queue {
                queues = queues.with(
                    Arch::Arm64.nix_system(),
                    Arc::new(SqsQueue::new(sqs, url.clone())),
                );
            }
            let queue = Arc::new(queues);
            // Where builds run on workers, so do git lookups: the function
            // (the Lambda runtime) has no git.
            sources = sources.resolving_git_with(Arc::new(QueueGit::new(
                storage.clone(),
                queue.clone(),
                config.tag_ttl,
                config.failure_ttl,
                timings.build_timeout,
            )));
            Arc::new(SingleFlight::new(Arc::new(SqsDispatch::new(
                storage.clone(),
                queue,
                *timings,
            ))))
        }
        BuildMode::Local(nix) => {
            let builder = builder(nix, &storage, &config.storage).await?;
            Arc::new(SingleFlight::new(Arc::new(InProcess::new(
                builder,
                storage.clone(),
                metrics.clone(),
            ))))
        }
    };
    let sources = Arc::new(sources);
    let images = Images::new(storage.clone(), dispatch, sources, config.images.clone());
    let auth = match &config.auth {
        None => None,
        Some((file, scope)) => Some(Arc::new(auth(file, *scope, &config.storage).await?)),
    };
    let mut state = AppState::new(Arc::new(images), storage, auth, metrics);
    if let BuildMode::Sqs { timings, .. } = &config.builds {
        state = state.with_heartbeat(timings.heartbeat);
    }
    if let Some(url) = &config.public_url {
        state = state.with_public_url(url);
    }
    if in_lambda {
        tracing::info!(source = ?config.source, storage = ?config.storage, "registry started in Lambda");
        return lambda_http::run(registry::router(state))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"));
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, source = ?config.source, storage = ?config.storage, "registry started");
    // The one line on stdout: where to pull from (port 0 picks a free port).
    println!("nixery listening on http://{addr}");
    registry::serve(listener, state, shutdown_signal()).await?;
    tracing::info!("registry stopped");
    Ok(())
}

/// `nixery worker`: builds from the queue until SIGTERM.
async fn run_worker(config: WorkerConfig) -> anyhow::Result<()> {
    let storage = storage::open(&config.storage)
        .await
        .context("opening storage")?;
    let builder = builder(&config.nix, &storage, &config.storage).await?;
    let sqs = sqs_client(config.queue.endpoint.as_deref()).await;
    let worker = Worker::new(
        builder,
        storage,
        sqs,
        config.queue.url.clone(),
        config.queue.heartbeat,
    );
    worker.run(shutdown_signal()).await;
    Ok(())
}

/// A builder with the local Nix and the configured popularity data.
async fn builder(
    nix: &NixConfig,
    storage: &Arc<dyn Storage>,
    storage_config: &StorageConfig,
) -> anyhow::Result<Builder> {
    let popularity = Arc::new(popularity(nix, storage_config).await?);
    Ok(Builder::with_limits(
        Nix::new(nix.timeout),
        storage.clone(),
        popularity,
        nix.limits,
    ))
}

/// The htpasswd file of a private registry.
async fn auth(file: &str, scope: AuthScope, storage: &StorageConfig) -> anyhow::Result<Auth> {
    let bytes = read_file_or_url(file, storage)
        .await
        .context("loading the htpasswd file (NIXERY_HTPASSWD)")?;
    let scope = match scope {
        AuthScope::Build => Scope::Build,
        AuthScope::All => Scope::All,
    };
    let auth = Auth::parse(&String::from_utf8_lossy(&bytes), scope)
        .context("parsing the htpasswd file (NIXERY_HTPASSWD)")?;
    tracing::info!(?scope, "credentials required");
    Ok(auth)
}

/// Builds each package and counts references over their closures.
/// A file by path, or by `file://`, `https://` or `s3://` URL.
async fn read_file_or_url(file: &str, storage: &StorageConfig) -> anyhow::Result<Vec<u8>> {
    if file.contains("://") {
        Ok(nixery::fetch::fetch(file, storage.s3_endpoint()).await?)
    } else {
        std::fs::read(file).with_context(|| format!("reading {file}"))
    }
}

async fn compute_popularity(config: PopularityConfig) -> anyhow::Result<Popularity> {
    let nix = Nix::new(config.nix.timeout);
    let sources = Sources::new(config.source, config.tag_ttl);
    let source = sources.resolve("latest").await?.arg;
    let mut closures = Vec::new();
    for package in config.packages {
        let request = ResolveRequest {
            source: source.clone(),
            system: "x86_64-linux".to_string(),
            packages: vec![package.clone()],
            implicit: vec![],
        };
        let resolved = nix.resolve(&request).await?;
        anyhow::ensure!(resolved.unknown.is_empty(), "unknown package: {package}");
        nix.realise(&resolved.packages, |_| {}).await?;
        let paths: Vec<String> = resolved
            .packages
            .iter()
            .flat_map(|p| p.paths.clone())
            .collect();
        closures.push(nix.closure(&paths).await?);
        tracing::info!(package, "closure read");
    }
    Ok(Popularity::compute(&closures))
}

/// Popularity data from `NIX_POPULARITY_URL`, or equal weights.
async fn popularity(nix: &NixConfig, storage: &StorageConfig) -> anyhow::Result<Popularity> {
    let Some(url) = &nix.popularity_url else {
        return Ok(Popularity::none());
    };
    let bytes = nixery::fetch::fetch(url, storage.s3_endpoint())
        .await
        .context("loading popularity data (NIX_POPULARITY_URL)")?;
    let popularity =
        Popularity::parse(&bytes).context("parsing popularity data (NIX_POPULARITY_URL)")?;
    tracing::info!(url = %nixery::source::redact_urls(url), entries = popularity.len(), "popularity data loaded");
    Ok(popularity)
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
