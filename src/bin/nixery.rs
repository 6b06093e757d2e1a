//! `nixery`: reads the command line and settings, builds the object graph
//! once ([`nixery::app`]), and hands over to the library. `nixery --help`
//! lists the commands; `nixery <command> --help` lists every setting with
//! its variable and default.

use anyhow::Context;
use nixery::app::{self, App};
use nixery::config::{Cli, GcConfig, Mode, ServeConfig};
use nixery::registry;
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
            Mode::Worker(config) => {
                let worker = app::worker(&config).await?;
                worker.run(shutdown_signal()).await;
                Ok(())
            }
            Mode::Popularity(config) => {
                println!("{}", app::popularity(config).await?.to_json());
                Ok(())
            }
            Mode::Gc(config) => collect_garbage(config).await,
            Mode::Index(config) => {
                for key in app::index(config).await? {
                    println!("stored {key}");
                }
                Ok(())
            }
        }
    })
}

/// The registry: under the Lambda runtime, or on a local port.
async fn serve(config: ServeConfig, in_lambda: bool) -> anyhow::Result<()> {
    let app = App::from_config(&config, in_lambda).await?;
    if in_lambda {
        tracing::info!(source = %config.source, storage = ?config.storage, "registry started in Lambda");
        return lambda_http::run(app.router())
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"));
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, source = %config.source, storage = ?config.storage, "registry started");
    // The one line on stdout: where to pull from (port 0 picks a free port).
    println!("nixery listening on http://{addr}");
    registry::serve(listener, app.state, shutdown_signal()).await?;
    tracing::info!("registry stopped");
    Ok(())
}

/// `nixery gc`: one collection; each object deleted on a line of stdout,
/// then the totals.
async fn collect_garbage(config: GcConfig) -> anyhow::Result<()> {
    let storage = nixery::storage::open(&config.storage)
        .await
        .context("opening storage")?;
    let settings = config.settings;
    let now = nixery::storage::records::unix_now();
    let report = nixery::gc::collect(&*storage, &settings, now)
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
