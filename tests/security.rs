//! A public endpoint under attack: package sets that hunt for secrets or
//! reach outside themselves, revisions that only a pull request holds,
//! images over the size limit, and more builds than the limit allows. Real
//! Nix (sandboxed, as build users), real storage, the real registry.
// The integration tier: needs real Nix and git (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeMap;
use std::io::Read;

use common::{fixture_copy, git, unique, Server};
use reqwest::StatusCode;
use serde_json::Value;

/// Every regular file of an image, path -> bytes, read from its layers.
async fn image_files(server: &Server, name: &str) -> BTreeMap<String, Vec<u8>> {
    let manifest: Value = reqwest::get(server.url(&format!("/v2/{name}/manifests/latest")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut files = BTreeMap::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let blob = reqwest::get(server.url(&format!("/v2/{name}/blobs/{digest}")))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.header().entry_type().is_file() {
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                files.insert(path, bytes);
            }
        }
    }
    files
}

async fn error_of(server: &Server, path: &str) -> (StatusCode, Value) {
    let response = reqwest::get(server.url(path)).await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn a_package_set_hunting_for_secrets_finds_none() {
    let canary = format!("canary-{}", unique());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[
            ("NIXERY_CANARY", &canary),
            ("AWS_SECRET_ACCESS_KEY", &canary),
        ],
    );
    let files = image_files(&server, "snoop").await;
    let snooped = |name: &str| {
        let (_, bytes) = files
            .iter()
            .find(|(path, _)| path.ends_with(&format!("share/snoop/{name}")))
            .unwrap_or_else(|| panic!("the snoop package's {name} file is missing"));
        String::from_utf8_lossy(bytes).into_owned()
    };
    // The package ran, and saw nothing: evaluation got an empty
    // environment, and the builder saw no process but its own.
    assert_eq!(snooped("eval").trim(), "evaluation saw:");
    assert_eq!(snooped("proc"), "");
    for (path, bytes) in &files {
        assert!(
            !String::from_utf8_lossy(bytes).contains(&canary),
            "{path} holds the canary"
        );
    }
}

#[tokio::test]
async fn evaluation_cannot_read_outside_the_package_set() {
    let server = Server::start();
    let (status, body) = error_of(&server, "/v2/escape/manifests/latest").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("restricted mode"), "{message}");
    let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    assert!(
        hostname.trim().is_empty() || !message.contains(&format!("\"{}\"", hostname.trim())),
        "{message}"
    );
}

#[tokio::test]
async fn an_image_over_the_size_limit_is_refused_before_packing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Server::start_with(&storage, &[("NIXERY_MAX_IMAGE_SIZE", "10000000")]);
    let (status, body) = error_of(&server, "/v2/big/manifests/latest").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let error = &body["errors"][0];
    assert_eq!(error["code"], "DENIED");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("10000000"), "{message}");
    let size = error["detail"]["size"].as_u64().unwrap();
    assert!(size > 50_000_000, "{body}");
    assert!(message.contains(&size.to_string()), "{message}");
    // Nothing was packed or stored for it.
    assert!(!server.log().contains("layer packed"), "{}", server.log());
    assert!(
        !storage.join("images").exists()
            || std::fs::read_dir(storage.join("images"))
                .unwrap()
                .next()
                .is_none()
    );
    // Small images still build under the same limit.
    let ok = reqwest::get(server.url("/v2/hello/manifests/latest"))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn builds_beyond_the_limit_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = fixture_copy(
        dir.path(),
        serde_json::json!({ "salt": unique(), "slowSeconds": 2 }),
    );
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
            ("NIXERY_MAX_BUILDS", "1"),
        ],
    );
    let pulls: Vec<_> = ["slow", "slow2", "slow3"]
        .into_iter()
        .map(|name| {
            let url = server.url(&format!("/v2/{name}/manifests/latest"));
            tokio::spawn(async move { reqwest::get(url).await.unwrap().status() })
        })
        .collect();
    for pull in pulls {
        assert_eq!(pull.await.unwrap(), StatusCode::OK);
    }
    // One at a time: every start follows the previous build's end.
    let log = server.log();
    let events: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            if l.contains("build started") {
                Some("start")
            } else if l.contains("build finished") {
                Some("end")
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        events,
        ["start", "end", "start", "end", "start", "end"],
        "{log}"
    );
    assert!(log.contains("waiting for a build slot"), "{log}");
}

/// Pulls whose clients give up: each still gets its request line (status
/// 499, saying the client left), a build that started goes on, and the
/// builds still waiting for the slot are dropped, so the next new image
/// builds right after the one under way.
#[tokio::test]
async fn pulls_whose_clients_leave_are_logged_and_their_waiting_builds_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = fixture_copy(
        dir.path(),
        serde_json::json!({ "salt": unique(), "slowSeconds": 3 }),
    );
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
            ("NIXERY_MAX_BUILDS", "1"),
        ],
    );
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    for name in ["slow", "slow2", "slow3"] {
        let url = server.url(&format!("/v2/{name}/manifests/latest"));
        assert!(impatient.get(url).send().await.unwrap_err().is_timeout());
    }
    let left = |name: &str| {
        let path = format!("path=\"/v2/{name}/manifests/latest\"");
        server
            .log()
            .lines()
            .any(|l| l.contains(" request ") && l.contains(&path) && l.contains("status=499"))
    };
    // Waiting without blocking the runtime, which closes the client's
    // connections.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !["slow", "slow2", "slow3"].into_iter().all(left) {
        assert!(
            std::time::Instant::now() < deadline,
            "no request line for a client that left:\n{}",
            server.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(server.log().contains("the client left before the answer"));

    let ok = reqwest::get(server.url("/v2/hello/manifests/latest"))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let log = server.log();
    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("build started"))
        .collect();
    assert_eq!(started.len(), 2, "{log}");
    assert!(
        started[0].contains("slow") && started[1].contains("hello"),
        "{log}"
    );
    assert_eq!(log.matches("build dropped").count(), 2, "{log}");
    // The build that had started is there for the next pull.
    let slow = reqwest::get(server.url("/v2/slow/manifests/latest"))
        .await
        .unwrap();
    assert_eq!(slow.status(), StatusCode::OK);
    assert_eq!(server.builds_started(), 2);
}

#[tokio::test]
async fn a_revision_only_a_pull_request_holds_is_never_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("default.nix"), "{ ... }: { }\n").unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "base"]);
    git(&repo, &["checkout", "-qb", "pr"]);
    // Evaluating this would run the attacker's code.
    std::fs::write(
        repo.join("default.nix"),
        "{ ... }: builtins.throw \"attacker code evaluated\"\n",
    )
    .unwrap();
    git(&repo, &["commit", "-qam", "attack"]);
    let attack = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["update-ref", "refs/pull/1/head", &attack]);
    git(&repo, &["checkout", "-q", "main"]);
    git(&repo, &["branch", "-D", "pr"]);

    let server = Server::start_with(
        &dir.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", ""),
            ("NIXERY_PKGS_REPO", repo.to_str().unwrap()),
        ],
    );
    for _ in 0..2 {
        let (status, body) = error_of(&server, &format!("/v2/hello/manifests/{attack}")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["errors"][0]["code"], "DENIED");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(&attack), "{message}");
        assert!(!message.contains(repo.to_str().unwrap()), "{message}");
    }
    assert_eq!(server.builds_started(), 0);
    assert!(!server.log().contains("attacker code evaluated"));
}

/// Every pull reads storage: for tests that change storage behind a
/// running server's back.
const UNCACHED: (&str, &str) = ("NIXERY_CACHE_TTL", "0");

/// The digest of the first layer of `shell/hello` (built if need be).
async fn first_layer(server: &Server) -> String {
    let manifest: Value = reqwest::get(server.url("/v2/shell/hello/manifests/latest"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Damages one layer of a built image in storage (`blob_file` finds where
/// the backend keeps it), drops the image record so the next pull builds
/// again, and checks that the build repairs the layer. The server must
/// run without the manifest cache ([`UNCACHED`]): a warm one would keep
/// serving the manifest it read before, as it should.
async fn damaged_layers_are_rebuilt(
    server: &Server,
    blob_file: impl Fn(&str) -> std::path::PathBuf,
    images: &std::path::Path,
) {
    let layer = first_layer(server).await;
    let hex = layer.strip_prefix("sha256:").unwrap().to_string();
    let file = blob_file(&hex);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    for entry in std::fs::read_dir(images).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let again = reqwest::get(server.url("/v2/shell/hello/manifests/latest"))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert!(server.log().contains("damaged"), "{}", server.log());
    let repaired = std::fs::read(&file).unwrap();
    assert_eq!(repaired, bytes, "the layer was not written again");
}

#[tokio::test]
async fn a_damaged_layer_is_never_served_and_is_rebuilt_on_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Server::start_with(&storage, &[UNCACHED]);
    // Served while good; a damaged copy is unknown to clients.
    let layer = first_layer(&server).await;
    let path = storage
        .join("blobs/sha256")
        .join(layer.strip_prefix("sha256:").unwrap());
    let blob_url = server.url(&format!("/v2/shell/hello/blobs/{layer}"));
    assert_eq!(
        reqwest::get(&blob_url).await.unwrap().status(),
        StatusCode::OK
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    // Unknown, or (a large layer, verified as it streams) cut short; then
    // unknown from then on.
    let (status, body) = pull_blob(&server, "shell/hello", &layer).await;
    assert!(
        status == StatusCode::NOT_FOUND || body.is_none(),
        "damaged bytes were served whole"
    );
    let (status, body) = error_of(&server, &format!("/v2/shell/hello/blobs/{layer}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let blobs = storage.join("blobs/sha256");
    damaged_layers_are_rebuilt(&server, |hex| blobs.join(hex), &storage.join("images")).await;
    let served = reqwest::get(&blob_url)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(nixery::oci::digest::sha256_digest(&served), layer);
}

#[tokio::test]
async fn a_damaged_layer_is_rebuilt_in_s3() {
    let s3 = common::s3::S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let env = s3.nixery_env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(UNCACHED);
    let server = Server::start_with(&dir.path().join("unused"), &env);
    let bucket = s3.root.join(common::s3::BUCKET);
    let blobs = bucket.join("blobs/sha256");
    damaged_layers_are_rebuilt(&server, |hex| blobs.join(hex), &bucket.join("images")).await;
}

/// A stand-in for nixpkgs: the channel branch, master, and a commit that
/// only a fork holds (GitHub serves such commits under nixpkgs' URLs).
fn nixpkgs_with_a_fork(dir: &std::path::Path) -> (std::path::PathBuf, String, String) {
    let repo = dir.join("nixpkgs");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("default.nix"), "{ ... }: { }\n").unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "release"]);
    let released = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["branch", "nixos-unstable"]);
    git(&repo, &["branch", "master"]);
    git(&repo, &["checkout", "-qb", "fork"]);
    std::fs::write(repo.join("default.nix"), "{ ... }: throw \"fork code\"\n").unwrap();
    git(&repo, &["commit", "-qam", "fork"]);
    let fork = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["checkout", "-q", "main"]);
    git(&repo, &["branch", "-D", "fork"]);
    (repo, released, fork)
}

#[tokio::test]
async fn nixpkgs_commits_must_be_on_the_channel_or_master() {
    use nixery::source::{PackageSource, Resolved, SourceArg, SourceError, Sources};
    let dir = tempfile::tempdir().unwrap();
    let (repo, released, fork) = nixpkgs_with_a_fork(dir.path());
    let forge = common::forge::Forge::start(repo).await;
    let sources = Sources::new(
        PackageSource::Channel {
            name: "nixos-unstable".into(),
        },
        std::time::Duration::from_secs(60),
    )
    .checking_nixpkgs_at(forge.api.clone());
    assert_eq!(
        sources.resolve(&released).await.unwrap(),
        Resolved {
            arg: SourceArg::Commit {
                rev: released.clone()
            },
            moving: false
        }
    );
    for refused in [fork.clone(), "0".repeat(40)] {
        assert!(
            matches!(
                sources.resolve(&refused).await,
                Err(SourceError::NotReachable { .. })
            ),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn a_nixpkgs_commit_only_a_fork_holds_is_never_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _, fork) = nixpkgs_with_a_fork(dir.path());
    let forge = common::forge::Forge::start(repo).await;
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", ""),
            ("NIXERY_CHANNEL", "nixos-unstable"),
            ("NIXERY_NIXPKGS_API", &forge.api),
        ],
    );
    let (status, body) = error_of(&server, &format!("/v2/hello/manifests/{fork}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains(&fork));
    assert_eq!(server.builds_started(), 0);
}

#[tokio::test]
async fn outputs_that_are_not_store_paths_never_reach_nix_as_options() {
    let server = Server::start();
    let (status, body) = error_of(&server, "/v2/optioned/manifests/latest").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(!message.contains("Nix)"), "{message}");
    assert!(
        server.log().contains("does not evaluate to store paths"),
        "{}",
        server.log()
    );
}

/// Every file under `dir`, as text (for looking for secrets at rest).
fn all_text_under(dir: &std::path::Path) -> String {
    let mut text = String::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    text
}

/// What a visitor, a puller and the operator's log can see: the landing
/// page, `/api/builds`, the error of a pull of `name`, the log, and what
/// the build status keeps in storage.
async fn everything_shown(server: &Server, name: &str) -> String {
    let landing = reqwest::get(server.url("/")).await.unwrap();
    assert_eq!(landing.status(), StatusCode::OK);
    let mut shown = landing.text().await.unwrap();
    let pull = reqwest::get(server.url(&format!("/v2/{name}/manifests/latest")))
        .await
        .unwrap();
    assert!(!pull.status().is_success(), "{name} was built");
    shown.push_str(&pull.text().await.unwrap());
    let builds: Value = reqwest::get(server.url("/api/builds"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for build in builds["builds"].as_array().unwrap() {
        let one =
            reqwest::get(server.url(&format!("/api/builds/{}", build["key"].as_str().unwrap())))
                .await
                .unwrap();
        shown.push_str(&one.text().await.unwrap());
    }
    shown.push_str(&builds.to_string());
    shown.push_str(&server.log());
    shown.push_str(&all_text_under(&server.storage));
    shown
}

#[tokio::test]
async fn credentials_in_the_package_repository_url_are_shown_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: git fails, and says which URL it tried.
    let url = "https://pkguser:usersecret@127.0.0.1:1/pkgs.git?private_token=querysecret";
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_PKGS_PATH", ""), ("NIXERY_PKGS_REPO", url)],
    );
    let shown = everything_shown(&server, "hello").await;
    for secret in ["usersecret", "querysecret", "pkguser"] {
        assert!(!shown.contains(secret), "{secret} is shown:\n{shown}");
    }
    // The rest of the URL is still there to tell sources apart.
    let landing = reqwest::get(server.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(landing.contains("127.0.0.1:1/pkgs.git"), "{landing}");
}

#[tokio::test]
async fn credentials_in_urls_nix_quotes_are_shown_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = fixture_copy(
        dir.path(),
        serde_json::json!({
            "fetchUrl": "http://pkguser:usersecret@127.0.0.1:1/file?private_token=querysecret",
        }),
    );
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())],
    );
    let shown = everything_shown(&server, "fetches").await;
    // Nix's reason is still given, with the URL's host.
    assert!(shown.contains("restricted mode"), "{shown}");
    assert!(shown.contains("127.0.0.1:1/file"), "{shown}");
    for secret in ["usersecret", "querysecret", "pkguser"] {
        assert!(!shown.contains(secret), "{secret} is shown:\n{shown}");
    }
}

#[tokio::test]
async fn a_local_package_set_is_shown_without_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = fixture_copy(dir.path(), serde_json::json!({}));
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())],
    );
    let landing = reqwest::get(server.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(landing.contains("a local package set"), "{landing}");
    assert!(!landing.contains(pkgs.to_str().unwrap()), "{landing}");
    let (_, body) = error_of(&server, "/v2/escape/manifests/latest").await;
    assert!(!body.to_string().contains(pkgs.to_str().unwrap()), "{body}");
}

/// Flips one byte in the middle of a file in place, keeping its size and
/// times, as bit rot on a disk would.
fn rot(path: &std::path::Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let before = std::fs::metadata(path).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = before.len() / 2;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&[byte[0] ^ 0x20]).unwrap();
    file.set_times(
        std::fs::FileTimes::new()
            .set_modified(before.modified().unwrap())
            .set_accessed(before.accessed().unwrap()),
    )
    .unwrap();
}

/// A blob as a client gets it: the status, and the body if it arrived
/// whole (`None`: cut short).
async fn pull_blob(server: &Server, name: &str, digest: &str) -> (StatusCode, Option<Vec<u8>>) {
    let response = reqwest::get(server.url(&format!("/v2/{name}/blobs/{digest}")))
        .await
        .unwrap();
    let status = response.status();
    (status, response.bytes().await.ok().map(|b| b.to_vec()))
}

#[tokio::test]
async fn bit_rot_in_a_stored_blob_is_never_served_and_a_later_build_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Server::start_with(&storage, &[UNCACHED]);
    let name = "shell/hello";
    let manifest: Value = reqwest::get(server.url(&format!("/v2/{name}/manifests/latest")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // A small blob (the config, read whole) and a large one (the largest
    // layer, streamed).
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    let largest = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap();
    assert!(largest["size"].as_u64().unwrap() > 256 << 10, "{manifest}");
    let layer = largest["digest"].as_str().unwrap().to_string();
    let file_of = |digest: &str| {
        storage
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..])
    };

    for digest in [&config, &layer] {
        // Served whole while good (and so known good once).
        let (status, body) = pull_blob(&server, name, digest).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(nixery::oci::digest::sha256_digest(&body.unwrap()), *digest);

        rot(&file_of(digest));
        let (status, body) = pull_blob(&server, name, digest).await;
        if status == StatusCode::OK {
            if let Some(body) = body {
                assert_eq!(
                    nixery::oci::digest::sha256_digest(&body),
                    *digest,
                    "damaged bytes were served whole as a 200"
                );
            }
        }
        // Moved aside: unknown to clients from now on.
        assert!(!file_of(digest).exists(), "{digest} is still in place");
        let (status, _) = pull_blob(&server, name, digest).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{digest}");
    }
    let aside = std::fs::read_dir(storage.join("staging"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("damaged-")
        })
        .count();
    assert_eq!(aside, 2);

    // The next build of the image stores both again.
    for entry in std::fs::read_dir(storage.join("images")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let again = reqwest::get(server.url(&format!("/v2/{name}/manifests/latest")))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    for digest in [&config, &layer] {
        let (status, body) = pull_blob(&server, name, digest).await;
        assert_eq!(status, StatusCode::OK, "{digest} was not stored again");
        assert_eq!(nixery::oci::digest::sha256_digest(&body.unwrap()), *digest);
    }
}

/// A service on the build host's loopback that answers every request with
/// `secret`; how many connections it accepted.
async fn host_service(secret: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{secret}",
                    secret.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_output_builder_cannot_reach_services_on_the_build_host() {
    let secret = format!("host-secret-{}", unique());
    let (port, accepted) = host_service(secret.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let pkgs = fixture_copy(
        dir.path(),
        serde_json::json!({
            "phoneHomePort": port,
            "salt": unique(),
        }),
    );
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())],
    );
    let shown = everything_shown(&server, "phonehome").await;
    assert!(
        !shown.contains(&secret),
        "the host's secret is shown:\n{shown}"
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a builder reached a service on the host's loopback \
         (nix/isolate-builders.sh, run by .ci/setup as root, blocks it)"
    );
    assert!(
        shown.contains("phonehome could not fetch"),
        "the builder did not run as expected:\n{shown}"
    );
}
