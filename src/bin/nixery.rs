//! `nixery serve`: the registry in local mode (filesystem storage, builds
//! with the local Nix). Reads its settings from the environment; see the
//! README's configuration table.

use std::sync::Arc;

use anyhow::Context;
use nixery::build::local::LocalDispatch;
use nixery::build::Builder;
use nixery::config::{Config, StorageConfig};
use nixery::nix::Nix;
use nixery::registry::{self, AppState};
use nixery::storage::{FsStorage, Storage};
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: nixery serve

Runs the registry on 127.0.0.1:$PORT (or $NIXERY_LISTEN), storing images
under $STORAGE_PATH and building them with the local Nix from the package
set at $NIXERY_PKGS_PATH. Logs go to stderr (RUST_LOG sets the level).";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve"] => {}
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::from_env()?;
    tokio::runtime::Runtime::new().context("starting the async runtime")?.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let storage: Arc<dyn Storage> = match &config.storage {
        StorageConfig::Filesystem { root } => Arc::new(
            FsStorage::open(root).with_context(|| format!("opening the storage root {}", root.display()))?,
        ),
    };
    let builder = Builder::new(Nix::new(config.nix_timeout), storage.clone());
    let state = AppState {
        storage,
        dispatch: Arc::new(LocalDispatch::new(builder)),
        source: config.source.clone(),
        layer_budget: config.layer_budget,
    };
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
