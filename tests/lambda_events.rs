//! The Lambda entry: real Function URL and API Gateway v2 event JSON through
//! lambda_http's adapter and the registry router, on S3 storage, as the
//! Lambda runtime would deliver them.
// The integration tier: needs real Nix (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::s3::{S3Server, BUCKET};
use common::{fixture_pkgs, Server};
use lambda_http::request::LambdaRequest;
use lambda_http::tower::Service;
use lambda_http::{Adapter, Context, LambdaEvent};
use nixery::app::{App, Parts};
use nixery::config::{Cli, Mode};
use nixery::registry::{router, AppState};
use nixery::storage::S3Storage;
use serde_json::Value;

/// Sends one event through the adapter; the Lambda response as JSON.
async fn invoke(state: &AppState, event: &str) -> Value {
    let request: LambdaRequest = serde_json::from_str(event).expect("a valid event");
    let mut adapter = Adapter::from(router(state.clone()));
    let response = adapter
        .call(LambdaEvent::new(request, Context::default()))
        .await
        .unwrap();
    serde_json::to_value(&response).unwrap()
}

fn event(name: &str) -> String {
    std::fs::read_to_string(common::repo().join("tests/fixtures/events").join(name)).unwrap()
}

#[tokio::test]
async fn function_url_and_api_gateway_events() {
    let s3 = S3Server::start();
    let work = tempfile::tempdir().unwrap();
    // Build the image once with a local server on the same bucket, so the
    // function below serves it from S3 alone.
    {
        let env = s3.nixery_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let builder = Server::start_with(&work.path().join("unused"), &env);
        let status = reqwest::get(builder.url("/v2/shell/hello/manifests/latest"))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    let storage: Arc<dyn nixery::storage::Storage> = Arc::new(S3Storage::new(
        s3.client().await,
        BUCKET,
        "",
        Duration::from_secs(900),
    ));
    // The settings the building server had: nothing set but the package set.
    let pkgs = fixture_pkgs();
    let cli = <Cli as clap::Parser>::try_parse_from([
        "nixery".as_ref(),
        "serve".as_ref(),
        "--pkgs-path".as_ref(),
        pkgs.as_os_str(),
        "--storage-path".as_ref(),
        "/unused".as_ref(),
    ])
    .unwrap();
    let Mode::Serve(defaults) = cli.mode(false).unwrap() else {
        panic!("not the registry's settings");
    };
    let parts = Parts {
        storage: Some(storage),
        ..Parts::default()
    };
    let state = App::with(&defaults, false, parts).await.unwrap().state;

    // GET manifest by tag, with containerd's ?ns= query.
    let get = invoke(&state, &event("function-url-get-manifest.json")).await;
    assert_eq!(get["statusCode"], 200, "{get}");
    let headers = &get["headers"];
    assert_eq!(
        headers["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let digest = headers["docker-content-digest"]
        .as_str()
        .unwrap()
        .to_string();
    let body = get["body"].as_str().unwrap();
    assert_eq!(headers["content-length"], body.len().to_string());
    assert_eq!(nixery::oci::digest::sha256_digest(body.as_bytes()), digest);

    // HEAD through API Gateway v2: same headers, no body.
    let head = invoke(&state, &event("apigw-v2-head-manifest.json")).await;
    assert_eq!(head["statusCode"], 200, "{head}");
    assert_eq!(head["headers"]["docker-content-digest"], digest.as_str());
    assert_eq!(head["headers"]["content-length"], body.len().to_string());
    assert!(head["body"].is_null() || head["body"] == "", "{head}");

    // A blob: a redirect to a presigned URL that works.
    let manifest: Value = serde_json::from_str(body).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = invoke(
        &state,
        &event("function-url-get-blob.json").replace("DIGEST", layer),
    )
    .await;
    assert_eq!(blob["statusCode"], 307, "{blob}");
    assert_eq!(blob["headers"]["content-length"], "0");
    let location = blob["headers"]["location"].as_str().unwrap();
    let bytes = reqwest::get(location).await.unwrap().bytes().await.unwrap();
    assert_eq!(nixery::oci::digest::sha256_digest(&bytes), layer);

    // A client mistake: a registry error, not a function error.
    let bad = invoke(&state, &event("function-url-bad-name.json")).await;
    assert_eq!(bad["statusCode"], 400, "{bad}");
    assert_eq!(bad["headers"]["content-type"], "application/json");
    let error: Value = serde_json::from_str(bad["body"].as_str().unwrap()).unwrap();
    assert_eq!(error["errors"][0]["code"], "NAME_INVALID");
}
