//! The registry on S3 storage: manifests from the registry, blobs by 307
//! redirect to presigned URLs that the S3 server itself answers.
// The integration tier: needs real Nix and skopeo (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use common::s3::S3Server;
use common::{skopeo_copy, Server};
use reqwest::{Client, StatusCode};
use serde_json::Value;

fn server_on(s3: &S3Server, storage: &std::path::Path) -> Server {
    let env = s3.nixery_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with(storage, &env)
}

#[tokio::test]
async fn blobs_redirect_to_presigned_s3_urls() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let server = server_on(&s3, &dir.path().join("unused"));
    let c = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let manifest = c
        .get(server.url("/v2/shell/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200, "{}", server.log());
    let manifest: Value = manifest.json().await.unwrap();
    let layer = &manifest["layers"][0];
    let digest = layer["digest"].as_str().unwrap();
    let size = layer["size"].as_u64().unwrap();

    // GET: a redirect into the S3 server, which serves the exact bytes. The
    // manifest just served names the blob, so the registry asks S3 nothing.
    let heads_before = s3.served().iter().filter(|s| s.method == "HEAD").count();
    let redirect = c
        .get(server.url(&format!("/v2/shell/hello/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(redirect.headers()["content-length"], "0");
    assert_eq!(
        s3.served().iter().filter(|s| s.method == "HEAD").count(),
        heads_before,
        "a known blob cost a storage call"
    );
    // A digest nothing names: the registry's own 404, not S3's XML.
    let missing = c
        .get(server.url(&format!("/v2/shell/hello/blobs/sha256:{}", "0".repeat(64))))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");
    let location = redirect.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&s3.endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let bytes = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(nixery::oci::digest::sha256_digest(&bytes), digest);

    // HEAD: answered from storage metadata, with the real length.
    let head = c
        .head(server.url(&format!("/v2/shell/hello/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        size.to_string()
    );
    let missing = c
        .head(server.url(&format!("/v2/shell/hello/blobs/sha256:{}", "0".repeat(64))))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Everything the build wrote is in the bucket under the documented
    // layout, and nothing is left in staging.
    let keys = s3.keys();
    for prefix in ["blobs/sha256/", "manifests/sha256/", "layers/", "images/"] {
        assert!(
            keys.iter().any(|k| k.starts_with(prefix)),
            "no {prefix} in {keys:?}"
        );
    }
    assert!(!keys.iter().any(|k| k.starts_with("staging/")), "{keys:?}");
}

#[test]
fn skopeo_pulls_through_redirects_and_a_cached_image_needs_no_nix() {
    let s3 = S3Server::start();
    let work = tempfile::tempdir().unwrap();
    let server = server_on(&s3, &work.path().join("unused"));
    let out = work.path().join("pulled");
    skopeo_copy(
        &server,
        "shell/hello:latest",
        &format!("dir:{}", out.display()),
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();

    // Every layer came from the S3 server, by a presigned GET.
    let served = s3.served();
    for layer in manifest["layers"].as_array().unwrap() {
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        assert!(
            served.iter().any(|s| s.method == "GET"
                && s.path.ends_with(&format!("blobs/sha256/{hex}"))
                && s.status == 200),
            "layer {hex} was not fetched from S3"
        );
    }
    // ... and every blob GET to the registry was a redirect.
    let log = server.log();
    let blob_gets: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("method=GET") && l.contains("/blobs/"))
        .collect();
    assert!(!blob_gets.is_empty());
    assert!(
        blob_gets.iter().all(|l| l.contains("status=307")),
        "{blob_gets:#?}"
    );
    drop(server);

    // A second registry on the same bucket, without Nix, serves it too.
    let no_nix = work.path().join("empty-path");
    std::fs::create_dir_all(&no_nix).unwrap();
    let mut env = s3.nixery_env();
    env.push(("PATH", no_nix.to_str().unwrap().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let second = Server::start_with(&work.path().join("unused2"), &env);
    let again = work.path().join("again");
    skopeo_copy(
        &second,
        "hello/shell:latest",
        &format!("dir:{}", again.display()),
    );
    assert_eq!(
        std::fs::read(out.join("manifest.json")).unwrap(),
        std::fs::read(again.join("manifest.json")).unwrap()
    );
    assert_eq!(second.builds_started(), 0);
}

#[tokio::test]
async fn an_unreachable_s3_is_a_503_not_a_hang() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    // On 127.0.0.2, where no test server listens (they bind 127.0.0.1), so
    // another test cannot take the port in between.
    let endpoint = format!("http://127.0.0.2:{port}");
    let server = Server::start_with(
        &dir.path().join("unused"),
        &[
            ("NIXERY_STORAGE_BACKEND", "s3"),
            ("NIXERY_S3_BUCKET", "nixery"),
            ("NIXERY_S3_ENDPOINT", &endpoint),
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "y"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let c = Client::new();
    for path in [
        "/v2/shell/hello/manifests/latest",
        &format!("/v2/hello/manifests/sha256:{}", "1".repeat(64)),
    ] {
        let r = c.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    }
    assert_eq!(server.builds_started(), 0);
    assert!(server.log().contains("storage"), "the cause is not logged");
}
