//! A forge's compare API over a real git repository: what the registry asks
//! GitHub about nixpkgs commits (`GET /repos/<owner>/<repo>/compare/<base>...<head>`),
//! answered by git itself (`merge-base --is-ancestor`) on 127.0.0.1, with
//! GitHub's statuses: 404 for a commit the repository does not have, and
//! `behind`, `identical`, `ahead` or `diverged` otherwise.

use std::path::PathBuf;
use std::process::Command;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The server; stopped when dropped.
pub struct Forge {
    pub api: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Forge {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn git(repo: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .unwrap()
}

async fn compare(State(repo): State<PathBuf>, Path(range): Path<String>) -> Response {
    let Some((base, head)) = range.split_once("...") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let commit = |r: &str| {
        let out = git(
            &repo,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{r}^{{commit}}"),
            ],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let (Some(base), Some(head)) = (commit(base), commit(head)) else {
        return (StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#).into_response();
    };
    let ancestor = |a: &str, b: &str| {
        git(&repo, &["merge-base", "--is-ancestor", a, b])
            .status
            .success()
    };
    let status = if base == head {
        "identical"
    } else if ancestor(&head, &base) {
        "behind"
    } else if ancestor(&base, &head) {
        "ahead"
    } else {
        "diverged"
    };
    (
        [("content-type", "application/json")],
        format!(r#"{{"status":"{status}"}}"#),
    )
        .into_response()
}

impl Forge {
    /// Serves `repo` as `<api>` = `http://127.0.0.1:<port>/repos/NixOS/nixpkgs`.
    pub async fn start(repo: PathBuf) -> Forge {
        let app = Router::new()
            .route("/repos/NixOS/nixpkgs/compare/{range}", get(compare))
            .with_state(repo);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Forge {
            api: format!("http://{addr}/repos/NixOS/nixpkgs"),
            stop: Some(stop),
        }
    }
}
