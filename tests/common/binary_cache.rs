//! Signed Nix binary caches made by real Nix for the tests: a signing
//! key, `nix copy --to file://...` of some store paths, and a loopback
//! HTTP server over the cache's directory (stopped on drop).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Nix command with the tests' Nix settings.
pub fn nix(args: &[&str]) -> Command {
    let mut command = Command::new(args[0]);
    command
        .args(&args[1..])
        .env("NIX_CONF_DIR", super::nix_conf_dir());
    command
}

/// A signing key: its secret key file and its public key (`name:base64`).
pub struct SigningKey {
    pub secret_key: PathBuf,
    pub public_key: String,
    _dir: tempfile::TempDir,
}

impl SigningKey {
    pub fn generate(name: &str) -> SigningKey {
        let dir = tempfile::tempdir().unwrap();
        let secret_key = dir.path().join("secret-key");
        let secret = super::run(&mut nix(&[
            "nix",
            "key",
            "generate-secret",
            "--key-name",
            name,
        ]));
        std::fs::write(&secret_key, &secret).unwrap();
        let mut convert = nix(&["nix", "key", "convert-secret-to-public"]);
        convert.stdin(File::open(&secret_key).unwrap());
        let output = convert.output().unwrap();
        assert!(output.status.success());
        let public_key = String::from_utf8(output.stdout).unwrap().trim().to_string();
        SigningKey {
            secret_key,
            public_key,
            _dir: dir,
        }
    }
}

/// Builds `attributes` of the fixture package set; their store paths.
pub fn build_fixture(attributes: &[&str]) -> Vec<String> {
    let mut build = nix(&["nix-build", "--no-out-link"]);
    build.arg(super::fixture_pkgs());
    for attribute in attributes {
        build.args(["-A", attribute]);
    }
    super::run(&mut build).lines().map(str::to_string).collect()
}

/// Copies the closure of `paths` into a cache at `dir` with `nix copy`,
/// compressed with `compression` (xz, zstd, bzip2, none) at Nix's fastest
/// level, signed with `key`.
pub fn nix_copy(paths: &[String], dir: &Path, compression: &str, key: &SigningKey) {
    let speed = match compression {
        "xz" => "&compression-level=0&parallel-compression=true",
        "bzip2" => "&compression-level=1",
        _ => "",
    };
    let to = format!(
        "file://{}?compression={compression}&secret-key={}{speed}",
        dir.display(),
        key.secret_key.display()
    );
    let mut copy = nix(&["nix", "copy", "--to", &to]);
    copy.args(paths);
    super::run(&mut copy);
}

/// A signed cache of some fixture packages' closures, compressed with
/// zstd, served over loopback HTTP: its signing key, its URL.
pub struct SignedCache {
    pub key: SigningKey,
    pub server: StaticServer,
    /// Holds the cache's files.
    _dir: tempfile::TempDir,
}

impl SignedCache {
    pub fn of(attributes: &[&str], key_name: &str) -> SignedCache {
        let key = SigningKey::generate(key_name);
        let dir = tempfile::tempdir().unwrap();
        nix_copy(&build_fixture(attributes), dir.path(), "zstd", &key);
        let server = StaticServer::start(dir.path().to_path_buf());
        SignedCache {
            key,
            server,
            _dir: dir,
        }
    }
}

/// Serves a directory on 127.0.0.1 (GET only, files only), on a thread of
/// its own; stopped on drop.
pub struct StaticServer {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StaticServer {
    pub fn start(dir: PathBuf) -> StaticServer {
        use axum::extract::State;
        use axum::http::{StatusCode, Uri};
        use axum::response::{IntoResponse, Response};

        async fn get(State(dir): State<PathBuf>, uri: Uri) -> Response {
            let name = uri.path().trim_start_matches('/');
            if name
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return StatusCode::BAD_REQUEST.into_response();
            }
            match tokio::fs::read(dir.join(name)).await {
                Ok(bytes) => bytes.into_response(),
                Err(_) => StatusCode::NOT_FOUND.into_response(),
            }
        }

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let router = axum::Router::new().fallback(get).with_state(dir);
                axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        StaticServer {
            url,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
