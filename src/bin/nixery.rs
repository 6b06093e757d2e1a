//! `nixery serve`: the registry. Inside AWS Lambda (when
//! `AWS_LAMBDA_RUNTIME_API` is set) it answers Function URL events;
//! elsewhere it listens on 127.0.0.1:$PORT. Settings come from the
//! environment; see the README's configuration table.

use std::sync::Arc;

use anyhow::Context;
use nixery::build::local::LocalDispatch;
use nixery::build::Builder;
use nixery::config::{Config, StorageConfig};
use nixery::popularity::Popularity;
use nixery::source::Sources;
use nixery::nix::Nix;
use nixery::registry::{self, AppState};
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: nixery serve

Runs the registry on 127.0.0.1:$PORT (or $NIXERY_LISTEN), or as an AWS
Lambda function when AWS_LAMBDA_RUNTIME_API is set. Images are stored in
$NIXERY_STORAGE_BACKEND storage and built with the local Nix from the
package set at $NIXERY_PKGS_PATH. Logs go to stderr (RUST_LOG sets the
level).";

/// Set by the Lambda runtime in every function's environment.
const LAMBDA_RUNTIME_API: &str = "AWS_LAMBDA_RUNTIME_API";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let in_lambda = std::env::var_os(LAMBDA_RUNTIME_API).is_some();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve"] => {}
        // The Lambda runtime starts the bootstrap binary without arguments.
        [] if in_lambda => {}
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
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(!in_lambda && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::from_env()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
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
    let storage = nixery::storage::open(&config.storage).await.context("opening storage")?;
    let popularity = Arc::new(popularity(config).await?);
    let builder = Builder::new(Nix::new(config.nix_timeout), storage.clone(), popularity);
    Ok(AppState {
        storage,
        dispatch: Arc::new(LocalDispatch::new(builder)),
        sources: Arc::new(Sources::new(config.source.clone(), config.tag_ttl)),
        layer_budget: config.layer_budget,
        implicit_packages: config.implicit_packages.clone(),
        activity: Arc::default(),
    })
}

/// Popularity data from `NIX_POPULARITY_URL`, or equal weights.
async fn popularity(config: &Config) -> anyhow::Result<Popularity> {
    let Some(url) = &config.popularity_url else { return Ok(Popularity::none()) };
    let endpoint = match &config.storage {
        StorageConfig::S3 { endpoint, .. } => endpoint.as_deref(),
        StorageConfig::Filesystem { .. } => None,
    };
    let bytes = nixery::fetch::fetch(url, endpoint).await.context("loading popularity data (NIX_POPULARITY_URL)")?;
    let popularity = Popularity::parse(&bytes).context("parsing popularity data (NIX_POPULARITY_URL)")?;
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
