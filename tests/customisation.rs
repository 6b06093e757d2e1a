//! The customisation layer against hostile package sets, built by real
//! Nix: outputs that are (or hold) links to a directory of the machine
//! that builds, links back to their own directory, and links that make an
//! exponentially wide tree. None of the machine's file names reach the
//! image, every pull ends in seconds, the size limit applies, and the
//! server stops when told.
// The integration tier: needs real Nix (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{fixture_copy, Server};
use serde_json::Value;

/// Every entry name of an image's last (customisation) layer.
async fn customisation_entries(server: &Server, name: &str) -> Vec<String> {
    let manifest: Value = reqwest::get(server.url(&format!("/v2/{name}/manifests/latest")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let layer = manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: {manifest}"))
        .last()
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = reqwest::get(server.url(&format!("/v2/{name}/blobs/{layer}")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut tar)
        .unwrap();
    tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn links_to_the_building_machine_leak_nothing_and_loops_end() {
    // A directory of "the machine", with names that must never appear.
    let work = tempfile::tempdir().unwrap();
    let host = work.path().join("host-secrets");
    std::fs::create_dir_all(host.join("root/.aws")).unwrap();
    std::fs::write(host.join("shadow-canary"), "x").unwrap();
    let pkgs = fixture_copy(
        work.path(),
        serde_json::json!({ "hostDir": host.to_str().unwrap() }),
    );
    let server = Server::start_with(
        &work.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
            ("NIXERY_IMPLICIT_PACKAGES", ""),
        ],
    );
    for name in ["hostlink/hello", "hostlinks/hello", "shell/hostlinks"] {
        let started = Instant::now();
        let entries = customisation_entries(&server, name).await;
        assert!(started.elapsed() < Duration::from_secs(120), "{name}");
        for entry in &entries {
            assert!(
                !entry.contains("shadow-canary") && !entry.contains(".aws"),
                "{name}: the machine's files leaked: {entries:?}"
            );
        }
    }
    // Links back to their own directory, in two packages merged.
    let started = Instant::now();
    let entries = customisation_entries(&server, "loopy/loopy2").await;
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(entries.len() < 100, "{entries:?}");
    assert!(entries.iter().any(|e| e == "x/a"), "{entries:?}");
}

#[tokio::test]
async fn an_exponentially_wide_tree_is_refused_under_the_size_limit_and_sigterm_stops_the_server() {
    let work = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(
        &work.path().join("storage"),
        &[
            ("NIXERY_IMPLICIT_PACKAGES", ""),
            ("NIXERY_MAX_IMAGE_SIZE", "4000000"),
        ],
    );
    let started = Instant::now();
    let response = reqwest::get(server.url("/v2/wide/wide2/manifests/latest"))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(120));
    // The image's failure, not the server's (a 4xx, whose message docker
    // shows).
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("customisation layer"), "{message}");
    assert!(
        !server.storage.join("images").exists()
            || std::fs::read_dir(server.storage.join("images"))
                .unwrap()
                .next()
                .is_none()
    );
    // Told to stop, it stops.
    let stopped = server.terminate(Duration::from_secs(20));
    assert!(stopped, "the server did not stop on SIGTERM");
}
