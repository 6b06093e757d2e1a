//! Images assembled from a signed binary cache, end to end: the fixture
//! packages built by real Nix and copied with `nix copy` into a signed
//! cache served over loopback HTTP, their attribute index made by
//! `nixery index`, and `nixery serve` with no Nix on its PATH answering
//! pulls from the cache alone. The manifests are byte for byte those a
//! Nix build of the same names gives; what the cache lacks goes to Nix
//! (`first`) or is a clear error (`only`).
// The integration tier: needs real Nix and skopeo (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::binary_cache::SignedCache;
use common::{fixture_pkgs, Server};
use serde_json::Value;

/// Images pulled in these tests: a shell and a reference chain, nested
/// attributes, two outputs, a CA bundle, tar edge cases, 50 MB.
const IMAGES: &[&str] = &[
    "shell/hello",
    "curl/jq",
    "pythonpackages.bar",
    "libmulti",
    "edgecases",
    "big",
];

/// What the images need (with the implicit packages), in the cache.
const CACHED: &[&str] = &[
    "hello",
    "bashInteractive",
    "coreutils",
    "moreutils",
    "nano",
    "curl",
    "jq",
    "pythonPackages.bar",
    "libmulti",
    "libmulti.dev",
    "libmulti.doc",
    "edgecases",
    "big",
    "cacert",
    "iana-etc",
];

/// The signed cache, once for every test here.
fn cache() -> &'static SignedCache {
    static CACHE: OnceLock<SignedCache> = OnceLock::new();
    CACHE.get_or_init(|| SignedCache::of(CACHED, "nixery-assembly-1"))
}

/// `nixery index` of the fixture package set into `storage`.
fn index(storage: &Path) {
    let out = common::run(
        Command::new(env!("CARGO_BIN_EXE_nixery"))
            .args(["index", "--storage-path"])
            .arg(storage)
            .arg("--pkgs-path")
            .arg(fixture_pkgs())
            .env("NIX_CONF_DIR", common::nix_conf_dir()),
    );
    assert!(out.contains("stored attrs/"), "{out}");
}

/// A directory for PATH with nothing in it: a process started with it
/// cannot run Nix.
fn no_nix() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// A server assembling from the cache (`mode`), on `storage`, with no Nix
/// to run.
fn assembling(storage: &Path, mode: &str) -> Server {
    let cache = cache();
    Server::start_with(
        storage,
        &[
            ("PATH", no_nix().to_str().unwrap()),
            ("NIXERY_SUBSTITUTER", &cache.server.url),
            ("NIXERY_TRUSTED_KEYS", &cache.key.public_key),
            ("NIXERY_FROM_CACHE", mode),
        ],
    )
}

async fn digest(server: &Server, image: &str) -> (u16, String, Value) {
    let response = reqwest::get(server.url(&format!("/v2/{image}/manifests/latest")))
        .await
        .unwrap();
    let status = response.status().as_u16();
    let digest = response
        .headers()
        .get("docker-content-digest")
        .map(|d| d.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, digest, body)
}

/// The build steps a server's log shows.
fn steps(server: &Server) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|l| l.contains("build step"))
        .filter_map(|l| l.split("step=").nth(1))
        .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn assembled_images_are_byte_for_byte_what_nix_builds() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("assembled");
    index(&storage);
    let assembled = assembling(&storage, "only");
    let mut digests = Vec::new();
    for image in IMAGES {
        let (status, digest, body) = digest(&assembled, image).await;
        assert_eq!(status, 200, "{image}: {body}\n{}", assembled.log());
        digests.push(digest);
    }
    // Nothing ran Nix: the steps are those of an assembly.
    let seen = steps(&assembled);
    assert!(seen.iter().any(|s| s == "fetching"), "{seen:?}");
    for step in ["evaluating", "realising", "packing"] {
        assert!(!seen.iter().any(|s| s == step), "{step}: {seen:?}");
    }
    // The build status says it was assembled.
    let builds: Value = reqwest::get(assembled.url("/api/builds"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let done = builds["builds"].as_array().unwrap();
    assert!(done.len() >= IMAGES.len(), "{builds}");
    assert!(
        done.iter()
            .all(|b| b["state"] == "done" && b["assembled"] == true),
        "{builds}"
    );

    // A Nix build of the same names, on empty storage: the same manifests.
    let built = Server::start_with(&work.path().join("built"), &[]);
    for (image, assembled_digest) in IMAGES.iter().zip(&digests) {
        let (status, digest, body) = digest(&built, image).await;
        assert_eq!(status, 200, "{image}: {body}");
        assert_eq!(&digest, assembled_digest, "{image} differs");
    }
    assert!(steps(&built).iter().any(|s| s == "realising"));

    // And the image runs.
    let rootfs = common::pull_and_unpack(&assembled, "shell/hello", work.path());
    assert_eq!(common::chroot_sh(&rootfs, "hello"), "Hello, world!\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_cache_lacks_is_built_first_and_an_error_only() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    index(&storage);
    // `7zip` is in the index, not in the cache.
    let only = assembling(&storage, "only");
    let (status, _, body) = digest(&only, "7zip").await;
    assert_eq!(status, 404, "{body}");
    let error = &body["errors"][0];
    assert_eq!(error["code"], "MANIFEST_UNKNOWN");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("7zip"), "{message}");
    assert!(message.contains(&cache().server.url), "{message}");
    assert!(message.contains("binary cache"), "{message}");
    // A name the package set lacks: unknown, with no Nix to ask.
    let (status, _, body) = digest(&only, "nosuchpackage").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("unknown packages: nosuchpackage"));
    drop(only);

    // With `first`, Nix builds it.
    let first = Server::start_with(
        &storage,
        &[
            ("NIXERY_SUBSTITUTER", &cache().server.url),
            ("NIXERY_TRUSTED_KEYS", &cache().key.public_key),
        ],
    );
    let (status, _, body) = digest(&first, "7zip").await;
    assert_eq!(status, 200, "{body}");
    let seen = steps(&first);
    assert!(seen.iter().any(|s| s == "realising"), "{seen:?}");
    assert!(
        first.log().contains("trying the next source"),
        "{}",
        first.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revision_without_an_index_is_built_and_indexed_for_the_next_pull() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let first = Server::start_with(
        &storage,
        &[
            ("NIXERY_SUBSTITUTER", &cache().server.url),
            ("NIXERY_TRUSTED_KEYS", &cache().key.public_key),
        ],
    );
    let (status, _, body) = digest(&first, "jq").await;
    assert_eq!(status, 200, "{body}");
    assert!(steps(&first).iter().any(|s| s == "realising"));
    // One index job ran meanwhile.
    let indexed = common::wait_until(Duration::from_secs(120), || {
        first.log().contains("attribute index stored")
    });
    assert!(indexed, "{}", first.log());
    let heads: Vec<PathBuf> = walk(&storage.join("attrs"))
        .into_iter()
        .filter(|p| p.ends_with("head"))
        .collect();
    assert_eq!(heads.len(), 1, "{heads:?}");
    // The next new image comes from the cache.
    let (status, _, body) = digest(&first, "curl").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        steps(&first).iter().any(|s| s == "fetching"),
        "{}",
        first.log()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        } else {
            out.push(path);
        }
    }
    out
}
