//! `nixery serve`: the registry. Inside AWS Lambda (when
//! `AWS_LAMBDA_RUNTIME_API` is set) it answers Function URL events;
//! elsewhere it listens on 127.0.0.1:$PORT. Settings come from the
//! environment; see the README's configuration table.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use nixery::build::local::{in_process, SingleFlight};
use nixery::build::queue::{sqs_client, SqsDispatch, Timings, Worker};
use nixery::build::{Builder, Dispatch};
use nixery::config::{BuilderConfig, Config, StorageConfig};
use nixery::nix::{Nix, ResolveRequest};
use nixery::popularity::Popularity;
use nixery::registry::{self, AppState};
use nixery::source::Sources;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: nixery serve
       nixery worker
       nixery popularity PACKAGE...

serve: runs the registry on 127.0.0.1:$PORT (or $NIXERY_LISTEN), or as an
AWS Lambda function when AWS_LAMBDA_RUNTIME_API is set. Images are stored
in $NIXERY_STORAGE_BACKEND storage and built with the local Nix from the
configured package source.

worker: takes builds from the queue at $NIXERY_QUEUE_URL and runs them with
the local Nix, writing images to the configured storage.

popularity: builds the given packages of the configured source and prints
popularity data for NIX_POPULARITY_URL (Nixery's format) on stdout.

Settings come from the environment (see the README). Logs go to stderr
(RUST_LOG sets the level).";

/// Set by the Lambda runtime in every function's environment.
const LAMBDA_RUNTIME_API: &str = "AWS_LAMBDA_RUNTIME_API";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let in_lambda = std::env::var_os(LAMBDA_RUNTIME_API).is_some();
    let mut popularity_of = None;
    let mut worker = false;
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve"] => {}
        ["worker"] => worker = true,
        // The Lambda runtime starts the bootstrap binary without arguments.
        [] if in_lambda => {}
        ["popularity", packages @ ..] if !packages.is_empty() => {
            popularity_of = Some(packages.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        }
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            return Ok(());
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(!in_lambda && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = if popularity_of.is_some() {
        // Computing popularity stores nothing: storage settings may be absent.
        let mut vars: HashMap<String, String> = std::env::vars().collect();
        vars.entry(nixery::config::STORAGE_PATH.to_string())
            .or_insert_with(|| "/unused".to_string());
        Config::from_vars(&vars)?
    } else {
        Config::from_env()?
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(packages) = popularity_of {
            let popularity = compute_popularity(&config, packages).await?;
            println!("{}", popularity.to_json());
            return Ok(());
        }
        if worker {
            return run_worker(&config).await;
        }
        let state = state(&config).await?;
        if in_lambda {
            tracing::info!(source = ?config.source, storage = ?config.storage, "registry started in Lambda");
            lambda_http::run(registry::router(state)).await.map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
        } else {
            serve(&config, state).await
        }
    })
}

/// Everything the router shares, built once.
async fn state(config: &Config) -> anyhow::Result<AppState> {
    let storage = nixery::storage::open(&config.storage)
        .await
        .context("opening storage")?;
    let dispatch: Arc<dyn Dispatch> = match (&config.builder, &config.queue) {
        (BuilderConfig::Sqs, Some(queue)) => {
            let sqs = sqs_client(queue.endpoint.as_deref()).await;
            Arc::new(SingleFlight::new(Arc::new(SqsDispatch::new(
                storage.clone(),
                sqs,
                queue.url.clone(),
                timings(config),
            ))))
        }
        _ => {
            let popularity = Arc::new(popularity(config).await?);
            Arc::new(in_process(Builder::new(
                Nix::new(config.nix_timeout),
                storage.clone(),
                popularity,
            )))
        }
    };
    Ok(AppState {
        storage,
        dispatch,
        sources: Arc::new(Sources::new(config.source.clone(), config.tag_ttl)),
        layer_budget: config.layer_budget,
        implicit_packages: config.implicit_packages.clone(),
        activity: Arc::default(),
    })
}

fn timings(config: &Config) -> Timings {
    Timings {
        build_timeout: config.build_timeout,
        heartbeat: config.heartbeat,
        failure_ttl: config.failure_ttl,
    }
}

/// `nixery worker`: builds from the queue until SIGTERM.
async fn run_worker(config: &Config) -> anyhow::Result<()> {
    let queue = config
        .queue
        .as_ref()
        .context("NIXERY_QUEUE_URL is not set: a worker takes builds from this queue")?;
    let storage = nixery::storage::open(&config.storage)
        .await
        .context("opening storage")?;
    let popularity = Arc::new(popularity(config).await?);
    let builder = Builder::new(Nix::new(config.nix_timeout), storage.clone(), popularity);
    let sqs = sqs_client(queue.endpoint.as_deref()).await;
    let worker = Worker::new(builder, storage, sqs, queue.url.clone(), config.heartbeat);
    worker.run(shutdown_signal()).await?;
    Ok(())
}

/// Builds each package and counts references over their closures.
async fn compute_popularity(config: &Config, packages: Vec<String>) -> anyhow::Result<Popularity> {
    let nix = Nix::new(config.nix_timeout);
    let sources = Sources::new(config.source.clone(), config.tag_ttl);
    let source = sources.resolve("latest").await?.arg;
    let mut closures = Vec::new();
    for package in packages {
        let request = ResolveRequest {
            source: source.clone(),
            system: "x86_64-linux".to_string(),
            packages: vec![package.clone()],
            implicit: vec![],
        };
        let resolved = nix.resolve(&request).await?;
        anyhow::ensure!(resolved.unknown.is_empty(), "unknown package: {package}");
        nix.realise(&resolved.packages).await?;
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
async fn popularity(config: &Config) -> anyhow::Result<Popularity> {
    let Some(url) = &config.popularity_url else {
        return Ok(Popularity::none());
    };
    let endpoint = match &config.storage {
        StorageConfig::S3 { endpoint, .. } => endpoint.as_deref(),
        StorageConfig::Filesystem { .. } => None,
    };
    let bytes = nixery::fetch::fetch(url, endpoint)
        .await
        .context("loading popularity data (NIX_POPULARITY_URL)")?;
    let popularity =
        Popularity::parse(&bytes).context("parsing popularity data (NIX_POPULARITY_URL)")?;
    tracing::info!(url, entries = popularity.len(), "popularity data loaded");
    Ok(popularity)
}

async fn serve(config: &Config, state: AppState) -> anyhow::Result<()> {
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
