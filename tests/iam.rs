//! The deployment template's roles, each tried for real: the registry
//! function, a build worker, `nixery index` (the index task) and `nixery
//! gc` run as processes, each with the credentials of an IAM user holding
//! exactly its role's policies from `infra/template.yaml` (read
//! generically, so statements added later are tried too), against moto
//! serving S3 and SQS and enforcing IAM. The function assembles images
//! from a signed binary cache (the fixture packages copied there by real
//! Nix, served on loopback), as deployed.
//!
//! What moto enforces: actions and resources, for S3 and SQS. Of
//! conditions it evaluates only `StringEquals`; a statement with another
//! (the worker's `Null` on `s3:if-none-match`/`s3:if-match`, `Bool` on
//! `s3:ObjectCreationOperation`) counts as unconditional here, so those
//! conditions are not tried: `tests/infra.rs` checks that they are there,
//! and `tests/storage.rs` that every content-addressed write sends the
//! header they ask for.
// The integration tier: needs real Nix, moto and cfn-lint (`.ci/test`).
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use std::sync::OnceLock;
use std::time::Duration;

use common::binary_cache::{build_fixture, nix_copy, SigningKey, StaticServer};
use common::moto::{Key, Moto};
use common::template::Stack;
use common::{fixture_copy, nix_conf_dir, unique, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// An S3 client signing with `key`.
async fn s3_as(moto: &Moto, key: &Key) -> aws_sdk_s3::Client {
    common::s3::client(
        &moto.endpoint,
        common::template::REGION,
        &key.id,
        &key.secret,
    )
    .await
}

/// Every key in the bucket.
async fn keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut pages = s3.list_objects_v2().bucket(bucket).into_paginator().send();
    while let Some(page) = pages.next().await {
        for object in page.unwrap().contents() {
            keys.push(object.key().unwrap().to_string());
        }
    }
    keys
}

/// The environment of a `nixery` process on this stand-in deployment,
/// signing with `key`.
fn env_as(key: &Key, shared: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = shared.to_vec();
    env.extend([
        ("AWS_ACCESS_KEY_ID", key.id.clone()),
        ("AWS_SECRET_ACCESS_KEY", key.secret.clone()),
    ]);
    env
}

/// What the images pulled here need (with the implicit packages).
const CACHED: &[&str] = &[
    "hello",
    "bashInteractive",
    "coreutils",
    "moreutils",
    "nano",
    "curl",
    "jq",
    "cacert",
    "iana-etc",
];

struct Cache {
    key: SigningKey,
    server: StaticServer,
    /// Holds the cache's files.
    _dir: tempfile::TempDir,
}

/// A signed binary cache of the fixture packages, once for every test here.
fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| {
        let key = SigningKey::generate("nixery-iam-1");
        let dir = tempfile::tempdir().unwrap();
        nix_copy(&build_fixture(CACHED), dir.path(), "zstd", &key);
        let server = StaticServer::start(dir.path().to_path_buf());
        Cache {
            key,
            server,
            _dir: dir,
        }
    })
}

/// The build steps a process's log shows.
fn steps(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("build step"))
        .filter_map(|l| l.split("step=").nth(1))
        .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// The manifests a pull of `name` gets: one, or each of an index's.
async fn manifests(registry: &Server, name: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let get = |reference: String| {
        client
            .get(registry.url(&format!("/v2/{name}/manifests/{reference}")))
            .header(
                "accept",
                "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
            )
            .send()
    };
    let first = get("latest".into()).await.unwrap();
    assert_eq!(
        first.status(),
        StatusCode::OK,
        "{}\nregistry:\n{}",
        first.text().await.unwrap(),
        registry.log()
    );
    let first: Value = first.json().await.unwrap();
    let Some(listed) = first["manifests"].as_array() else {
        return vec![first];
    };
    let mut found = Vec::new();
    for entry in listed {
        let manifest = get(entry["digest"].as_str().unwrap().to_string())
            .await
            .unwrap();
        assert_eq!(manifest.status(), StatusCode::OK);
        found.push(manifest.json().await.unwrap());
    }
    found
}

#[tokio::test]
async fn the_function_a_worker_and_gc_each_work_under_their_own_role() {
    deployment("amd64").await;
}

/// With several platforms the function composes indexes: statements of
/// its role that only this deployment has.
#[tokio::test]
async fn with_several_platforms_the_function_composes_indexes_under_its_role() {
    deployment("amd64,arm64").await;
}

/// One deployment with these `Platforms`: the function, a worker, the
/// index task and gc, each under its own role, through a build (and an
/// index job) for a revision without an index, an index made by the task,
/// an image assembled by the function from the binary cache, pulls and a
/// collection.
async fn deployment(platforms: &str) {
    let moto = Moto::start_with_iam();
    let bucket = format!("nixery-iam-{}", unique());
    let setup = Key {
        id: "setup".into(),
        secret: "setup".into(),
    };
    s3_as(&moto, &setup)
        .await
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let queue = moto.queue(&format!("builds-{}", unique()), 60, 3).await;

    // The roles, as the template gives them to the function, the workers,
    // the index task and the gc task: with the default FromCache (first)
    // and a binary cache, so the function assembles and asks for indexes.
    let stack = Stack::new()
        .with_bucket("ImageBucket", &bucket)
        .with_queue("BuildQueue", &queue)
        .with_parameter("Platforms", platforms);
    assert!(stack.condition("AssemblesInFunction") && stack.condition("SendsIndexJobs"));
    let roles: BTreeMap<&str, String> = BTreeMap::from([
        (
            "function",
            stack.role_of(&stack.only("AWS::Serverless::Function"), "Role"),
        ),
        (
            "worker",
            stack.role_of("WorkerTaskDefinition", "TaskRoleArn"),
        ),
        ("index", stack.role_of("IndexTaskDefinition", "TaskRoleArn")),
        ("gc", stack.role_of("GcTaskDefinition", "TaskRoleArn")),
    ]);
    let mut users = serde_json::Map::new();
    for (user, role) in &roles {
        users.insert(user.to_string(), Value::Array(stack.policies(role)));
    }
    // The test's own eyes.
    users.insert(
        "inspector".into(),
        json!([{ "Version": "2012-10-17", "Statement": [
            { "Effect": "Allow", "Action": ["s3:*", "sqs:*"], "Resource": "*" }
        ]}]),
    );
    let keys_of = moto.users(&Value::Object(users));
    moto.enforce_iam().await;
    let inspector = s3_as(&moto, &keys_of["inspector"]).await;

    // moto does refuse what a role lacks: the function may not answer git
    // lookups (the workers' sources/), the index task may write attrs/
    // only, gc may write nothing.
    for (user, key) in [
        ("function", "sources/x"),
        ("index", "images/x"),
        ("gc", "images/x"),
    ] {
        let refused = s3_as(&moto, &keys_of[user])
            .await
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(Vec::new().into())
            .send()
            .await;
        assert!(refused.is_err(), "{user} may write {key}");
    }

    let work = tempfile::tempdir().unwrap();
    let pkgs = fixture_copy(work.path(), json!({}));
    let shared: Vec<(&'static str, String)> = vec![
        ("NIXERY_STORAGE_BACKEND", "s3".into()),
        ("NIXERY_S3_BUCKET", bucket.clone()),
        ("NIXERY_S3_ENDPOINT", moto.endpoint.clone()),
        ("NIXERY_QUEUE_URL", queue.clone()),
        ("NIXERY_SQS_ENDPOINT", moto.endpoint.clone()),
        ("NIXERY_HEARTBEAT_SECONDS", "1".into()),
        ("NIXERY_PKGS_PATH", pkgs.to_string_lossy().into_owned()),
        (
            "NIX_CONF_DIR",
            nix_conf_dir().to_string_lossy().into_owned(),
        ),
        ("AWS_REGION", common::template::REGION.into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];

    // The function (no Nix of its own) and a worker: a pull builds the
    // image and serves it, blobs through presigned URLs signed with the
    // function's role.
    let worker_log = work.path().join("worker.log");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_nixery"));
    worker
        .arg("worker")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&worker_log).unwrap());
    for (k, v) in env_as(&keys_of["worker"], &shared) {
        worker.env(k, v);
    }
    let worker = common::KillOnDrop(worker.spawn().expect("starting nixery worker"));
    let cache = cache();
    let mut function_env = env_as(&keys_of["function"], &shared);
    function_env.push(("NIXERY_BUILDER", "sqs".into()));
    function_env.push(("NIXERY_PLATFORMS", platforms.into()));
    function_env.push(("NIXERY_FROM_CACHE", "first".into()));
    function_env.push(("NIXERY_SUBSTITUTER", cache.server.url.clone()));
    function_env.push(("NIXERY_TRUSTED_KEYS", cache.key.public_key.clone()));
    function_env.push(("PATH", "/nonexistent".into()));
    let function_env: Vec<(&str, &str)> =
        function_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let registry = Server::start_with(&work.path().join("registry"), &function_env);

    let worker_log_text = || std::fs::read_to_string(&worker_log).unwrap_or_default();
    let systems: Vec<&str> = platforms
        .split(',')
        .map(|p| {
            if p == "arm64" {
                "aarch64-linux"
            } else {
                "x86_64-linux"
            }
        })
        .collect();

    // A revision without an index: the function claims the index job
    // (attrs/<revision>/<system>/claim, under its role) and sends it to the
    // workers, and the image goes to them as a build.
    let claims = |keys: &[String]| -> usize {
        systems
            .iter()
            .filter(|system| {
                keys.iter()
                    .any(|k| k.starts_with("attrs/") && k.ends_with(&format!("/{system}/claim")))
            })
            .count()
    };
    let heads = |keys: &[String]| -> usize {
        systems
            .iter()
            .filter(|system| {
                keys.iter()
                    .any(|k| k.starts_with("attrs/") && k.ends_with(&format!("/{system}/head")))
            })
            .count()
    };
    pull_every_blob(&registry, "shell/hello", platforms).await;
    assert_eq!(claims(&keys(&inspector, &bucket).await), systems.len());
    // The worker makes the indexes asked for, under its role.
    let mut indexed = false;
    for _ in 0..240 {
        if heads(&keys(&inspector, &bucket).await) == systems.len() {
            indexed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(indexed, "no index from the worker:\n{}", worker_log_text());

    // The index task, under its role: the index of every platform, again.
    let mut index = Command::new(env!("CARGO_BIN_EXE_nixery"));
    index.arg("index").env("RUST_LOG", "info");
    for (k, v) in env_as(&keys_of["index"], &shared) {
        index.env(k, v);
    }
    index.env("NIXERY_PLATFORMS", platforms);
    let indexed = index.stdin(Stdio::null()).output().unwrap();
    let printed = String::from_utf8_lossy(&indexed.stdout).into_owned();
    assert!(
        indexed.status.success(),
        "nixery index failed under its role:\n{printed}\n{}",
        String::from_utf8_lossy(&indexed.stderr)
    );
    assert_eq!(
        printed.matches("stored attrs/").count(),
        systems.len(),
        "{printed}"
    );

    // With an index, the function assembles a new image from the binary
    // cache itself, under its role (the cache has amd64 paths only: an
    // arm64 image still goes to the worker).
    let before = steps(&registry.log()).len();
    pull_every_blob(&registry, "curl/jq", platforms).await;
    let assembled = steps(&registry.log())[before..].to_vec();
    assert!(
        assembled.iter().any(|s| s == "fetching"),
        "curl/jq was not assembled by the function: {assembled:?}\n{}",
        registry.log()
    );
    // Build status and the list of builds, which the function reads.
    let builds = reqwest::get(registry.url("/api/builds")).await.unwrap();
    assert_eq!(builds.status(), StatusCode::OK);
    assert!(
        !registry.log().contains("AccessDenied"),
        "{}",
        registry.log()
    );
    assert!(
        !worker_log_text().contains("AccessDenied"),
        "{}",
        worker_log_text()
    );
    drop(worker);
    drop(registry);

    // gc, under its role, collects everything but the attribute indexes,
    // which it leaves alone (nothing is used or young with these
    // settings): image records first, then what they named.
    let stored = keys(&inspector, &bucket).await;
    let mut prefixes = vec![
        "attrs/",
        "images/",
        "manifests/",
        "blobs/",
        "layers/",
        "builds/",
        "served/",
    ];
    if platforms.contains(',') {
        // The function held the index manifest it composed; the second
        // platform's build held the SBOMs' shared empty config.
        prefixes.extend(["indexes/", "holds/"]);
    }
    for prefix in prefixes {
        assert!(
            stored.iter().any(|k| k.starts_with(prefix)),
            "nothing under {prefix} before gc: {stored:?}"
        );
    }
    let mut gc = Command::new(env!("CARGO_BIN_EXE_nixery"));
    gc.args(["gc", "--unused-for", "0s", "--grace", "0s"])
        .env("RUST_LOG", "warn");
    for (k, v) in env_as(&keys_of["gc"], &shared) {
        gc.env(k, v);
    }
    let collected = gc.stdin(Stdio::null()).output().unwrap();
    let report = String::from_utf8_lossy(&collected.stdout).into_owned();
    assert!(
        collected.status.success(),
        "gc failed under its role:\n{report}\n{}",
        String::from_utf8_lossy(&collected.stderr)
    );
    let left = keys(&inspector, &bucket).await;
    assert!(
        left.iter().all(|k| k.starts_with("attrs/")),
        "gc left {left:?}\n{report}"
    );
    assert_eq!(heads(&left), systems.len(), "the indexes are kept");
}

/// Pulls `name` (each platform's manifest) and every blob they name,
/// following the redirects to moto: the function's role may read what it
/// signs.
async fn pull_every_blob(registry: &Server, name: &str, platforms: &str) {
    let pulled = manifests(registry, name).await;
    assert_eq!(pulled.len(), platforms.split(',').count());
    let mut digests = Vec::new();
    for manifest in &pulled {
        digests.push(manifest["config"]["digest"].as_str().unwrap().to_string());
        for layer in manifest["layers"].as_array().unwrap() {
            digests.push(layer["digest"].as_str().unwrap().to_string());
        }
    }
    for digest in &digests {
        let blob = reqwest::get(registry.url(&format!("/v2/{name}/blobs/{digest}")))
            .await
            .unwrap();
        assert_eq!(blob.status(), StatusCode::OK, "{name} {digest}");
        let bytes = blob.bytes().await.unwrap();
        assert_eq!(nixery::oci::digest::sha256_digest(&bytes), *digest);
    }
}
