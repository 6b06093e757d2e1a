//! What Nixery users rely on: package sources selected by tag (a git
//! repository here), layer reuse between images, popularity data, and the
//! landing page.
// The integration tier: needs real Nix and git (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{chroot_sh, fixture_pkgs, git, pull_and_unpack, run, Server};
use serde_json::Value;

/// A copy of the fixture set where `hello` greets with `greeting`.
fn write_fixture(dest: &Path, greeting: &str) {
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", fixture_pkgs().display()))
        .arg(dest));
    let default = dest.join("default.nix");
    let text = std::fs::read_to_string(&default).unwrap();
    assert!(text.contains("Hello, world!"));
    std::fs::write(&default, text.replace("Hello, world!", greeting)).unwrap();
}

async fn digest(server: &Server, image: &str, tag: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .head(server.url(&format!("/v2/{image}/manifests/{tag}")))
        .send()
        .await
        .unwrap();
    let d = r
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), d)
}

#[tokio::test]
async fn a_git_source_serves_branches_tags_and_commits() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("pkgs-repo");
    std::fs::create_dir_all(&repo).unwrap();
    write_fixture(&repo, "Hello, world!");
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["checkout", "-qb", "next"]);
    write_fixture(&repo, "Hello from next!");
    git(&repo, &["commit", "-qam", "second"]);
    git(&repo, &["tag", "v2"]);
    git(&repo, &["checkout", "-q", "main"]);

    let server = Server::start_with(
        &work.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", ""),
            ("NIXERY_PKGS_REPO", repo.to_str().unwrap()),
            ("NIXERY_TAG_TTL", "1"),
        ],
    );
    let greeting = |tag: &str| {
        let rootfs = pull_and_unpack(&server, &format!("shell/hello:{tag}"), work.path());
        chroot_sh(&rootfs, "hello")
    };
    assert_eq!(greeting("latest"), "Hello, world!\n", "{}", server.log());
    assert_eq!(greeting("next"), "Hello from next!\n");
    assert_eq!(greeting("v2"), "Hello from next!\n");
    assert_eq!(greeting(&first), "Hello, world!\n");
    let (_, by_branch) = digest(&server, "shell/hello", "next").await;
    assert_eq!(
        digest(&server, "shell/hello", "v2").await.1,
        by_branch,
        "a tag and a branch on one commit differ"
    );

    // Unknown refs are named.
    let r = reqwest::get(server.url("/v2/hello/manifests/no-such-branch"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("no-such-branch"));

    // Move main; once the TTL has passed, `latest` is the new commit.
    let (_, before) = digest(&server, "shell/hello", "latest").await;
    git(&repo, &["update-ref", "refs/heads/main", "refs/heads/next"]);
    let mut after = before.clone();
    for _ in 0..100 {
        after = digest(&server, "shell/hello", "latest").await.1;
        if after != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after, by_branch, "latest did not follow the moved branch");
    assert_eq!(greeting("latest"), "Hello from next!\n");
}

#[tokio::test]
async fn an_image_sharing_layers_uploads_only_new_ones() {
    let server = Server::start();
    let manifest = |name: &'static str| {
        let url = server.url(&format!("/v2/{name}/manifests/latest"));
        async move {
            reqwest::get(url)
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let layers = |m: &Value| -> Vec<(String, u64)> {
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["digest"].as_str().unwrap().to_string(),
                    l["size"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let a = layers(&manifest("shell/hello").await);
    let b = layers(&manifest("shell/hello/jq").await);
    let new: Vec<&(String, u64)> = b.iter().filter(|l| !a.contains(l)).collect();
    let shared = b.len() - new.len();
    assert!(shared > 0 && !new.is_empty(), "a: {a:?}\nb: {b:?}");

    // The build of B reports exactly those new layers (the customisation
    // layer among them) and reuses the rest.
    let log = server.log();
    let finished: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("build finished"))
        .collect();
    assert_eq!(finished.len(), 2);
    let b_line = finished[1];
    assert!(
        b_line.contains(&format!("layers_new={}", new.len())),
        "{b_line}"
    );
    assert!(
        b_line.contains(&format!("layers_reused={shared}")),
        "{b_line}"
    );
    let new_bytes: u64 = new.iter().map(|l| l.1).sum();
    let all_bytes: u64 = b.iter().map(|l| l.1).sum();
    assert!(
        b_line.contains(&format!("bytes_uploaded={new_bytes}")),
        "{b_line}"
    );
    println!("after shell/hello, a client pulling shell/hello/jq downloads {new_bytes} of {all_bytes} bytes ({} of {} layers)", new.len(), b.len());
}

#[tokio::test]
async fn the_landing_page_shows_how_to_pull_and_links_to_the_builds() {
    let server = Server::start();
    assert_eq!(digest(&server, "shell/hello", "latest").await.0, 200);
    assert_eq!(digest(&server, "nosuchpackage", "latest").await.0, 404);
    let r = reqwest::Client::new()
        .get(server.url("/"))
        .header("host", "registry.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(
        page.contains("docker pull registry.example.org/shell/curl/jq"),
        "{page}"
    );
    // The source, without where it lies on this machine.
    assert!(
        page.contains("a local package set"),
        "the source is not shown"
    );
    assert!(
        !page.contains(&fixture_pkgs().canonicalize().unwrap().display().to_string()),
        "the local path is shown"
    );
    assert!(page.contains("href=\"/builds\""), "{page}");
    // What it links to lists the build and the failure.
    let builds: serde_json::Value = reqwest::get(server.url("/api/builds"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let outcome = |name: &str| {
        let found = builds["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name);
        let found = found.unwrap_or_else(|| panic!("{name} is not listed: {builds}"));
        (found["state"].clone(), found["error"].clone())
    };
    assert_eq!(outcome("shell/hello").0, "done");
    let (state, error) = outcome("nosuchpackage");
    assert_eq!(state, "failed");
    assert_eq!(error, "unknown packages: nosuchpackage");
}

#[tokio::test]
async fn popularity_data_is_computed_and_loaded() {
    let work = tempfile::tempdir().unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args(["popularity", "hello", "curl", "jq", "nano"])
        .env("NIXERY_PKGS_PATH", fixture_pkgs())
        .env("NIX_CONF_DIR", common::nix_conf_dir()));
    let counts: Value = serde_json::from_str(&out).unwrap();
    let busybox = counts
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.starts_with("busybox-"))
        .unwrap();
    assert_eq!(busybox.1, 3, "{counts}");
    let file = work.path().join("popularity.json");
    std::fs::write(&file, &out).unwrap();

    let url = format!("file://{}", file.display());
    let server = Server::start_with(
        &work.path().join("storage"),
        &[("NIX_POPULARITY_URL", &url)],
    );
    assert_eq!(digest(&server, "shell/hello", "latest").await.0, 200);
    assert!(server.log().contains("popularity data loaded"));

    // Bad data stops the start, naming the variable.
    std::fs::write(&file, "[1, 2]").unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("serve")
        .env("NIXERY_PKGS_PATH", fixture_pkgs())
        .env("STORAGE_PATH", work.path().join("s2"))
        .env("NIXERY_LISTEN", "127.0.0.1:0")
        .env("NIX_POPULARITY_URL", &url)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("NIX_POPULARITY_URL"));
}

#[tokio::test]
async fn images_from_a_moving_path_source_are_rebuilt_after_the_ttl() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start_with(&work.path().join("storage"), &[("NIXERY_TAG_TTL", "1")]);
    let (_, first) = digest(&server, "hello", "latest").await;
    assert_eq!(server.builds_started(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, second) = digest(&server, "hello", "latest").await;
    assert_eq!(server.builds_started(), 2, "a stale image was served");
    // Nothing changed in the set, so the rebuild is byte-identical.
    assert_eq!(first, second);
}
