//! The deployment template's roles, each tried for real: the registry
//! function, a build worker and `nixery gc` run as processes, each with
//! the credentials of an IAM user holding exactly its role's policies from
//! `infra/template.yaml` (read generically, so statements added later are
//! tried too), against moto serving S3 and SQS and enforcing IAM.
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

use common::moto::{Key, Moto};
use common::template::Stack;
use common::{fixture_copy, nix_conf_dir, unique, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// An S3 client signing with `key`.
async fn s3_as(moto: &Moto, key: &Key) -> aws_sdk_s3::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(common::template::REGION))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            &key.id,
            &key.secret,
            None,
            None,
            "test",
        ))
        .endpoint_url(&moto.endpoint)
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    )
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

/// One deployment with these `Platforms`: the function, a worker and gc,
/// each under its own role, through a build, a pull and a collection.
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

    // The roles, as the template gives them to the function, the workers
    // and the gc task.
    let stack = Stack::new()
        .with_bucket("ImageBucket", &bucket)
        .with_queue("BuildQueue", &queue)
        .with_parameter("Platforms", platforms);
    let roles: BTreeMap<&str, String> = BTreeMap::from([
        (
            "function",
            stack.role_of(&stack.only("AWS::Serverless::Function"), "Role"),
        ),
        (
            "worker",
            stack.role_of("WorkerTaskDefinition", "TaskRoleArn"),
        ),
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

    // moto does refuse what a role lacks: the function may not write
    // blobs, gc may write nothing.
    for (user, key) in [("function", "blobs/sha256/x"), ("gc", "images/x")] {
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
    let mut worker = worker.spawn().expect("starting nixery worker");
    let mut function_env = env_as(&keys_of["function"], &shared);
    function_env.push(("NIXERY_BUILDER", "sqs".into()));
    function_env.push(("NIXERY_PLATFORMS", platforms.into()));
    function_env.push(("PATH", "/nonexistent".into()));
    let function_env: Vec<(&str, &str)> =
        function_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let registry = Server::start_with(&work.path().join("registry"), &function_env);

    let worker_log_text = || std::fs::read_to_string(&worker_log).unwrap_or_default();
    let pulled = manifests(&registry, "shell/hello").await;
    assert_eq!(pulled.len(), platforms.split(',').count());
    let mut digests = Vec::new();
    for manifest in &pulled {
        digests.push(manifest["config"]["digest"].as_str().unwrap().to_string());
        for layer in manifest["layers"].as_array().unwrap() {
            digests.push(layer["digest"].as_str().unwrap().to_string());
        }
    }
    for digest in &digests {
        // Followed to moto: the function's role may read what it signs.
        let blob = reqwest::get(registry.url(&format!("/v2/shell/hello/blobs/{digest}")))
            .await
            .unwrap();
        assert_eq!(blob.status(), StatusCode::OK, "{digest}");
        let bytes = blob.bytes().await.unwrap();
        assert_eq!(nixery::oci::digest::sha256_digest(&bytes), *digest);
    }
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
    let _ = worker.kill();
    let _ = worker.wait();
    drop(registry);

    // gc, under its role, collects everything (nothing is used or young
    // with these settings): image records first, then what they named.
    let stored = keys(&inspector, &bucket).await;
    let mut prefixes = vec![
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
    assert!(left.is_empty(), "gc left {left:?}\n{report}");
}
