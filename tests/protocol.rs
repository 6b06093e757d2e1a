//! The registry API as clients see it: headers, bodies and every error case,
//! against a running `nixery serve` building from the fixture package set.
// The integration tier: needs real Nix (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use common::Server;
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// The image config a manifest points at.
async fn image_config(server: &Server, name: &str, manifest: &Value) -> Value {
    let digest = manifest["config"]["digest"].as_str().unwrap();
    let response = client()
        .get(server.url(&format!("/v2/{name}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Asserts an error response: status, spec envelope, JSON content type.
async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "{:?}", response.url().path());
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        header(&response, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    let body: Value = response.json().await.unwrap();
    let error = &body["errors"][0];
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test]
async fn base_endpoint_announces_the_api_version() {
    let server = Server::start();
    for path in ["/v2/", "/v2"] {
        let response = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0")
        );
        assert_eq!(
            header(&response, "content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(response.text().await.unwrap(), "{}");
    }
}

#[tokio::test]
async fn head_and_get_agree_by_tag_and_by_digest() {
    let server = Server::start();
    let c = client();
    // HEAD first, as containerd does: it builds the image.
    let head = c
        .head(server.url("/v2/shell/hello/manifests/latest?ns=example.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let digest = header(&head, "docker-content-digest").unwrap();
    let length = header(&head, "content-length").unwrap();
    assert_eq!(header(&head, "content-type").as_deref(), Some(OCI_MANIFEST));

    let get = c
        .get(server.url("/v2/shell/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(
        header(&get, "docker-content-digest").as_ref(),
        Some(&digest)
    );
    assert_eq!(header(&get, "content-length").as_ref(), Some(&length));
    assert_eq!(header(&get, "content-type").as_deref(), Some(OCI_MANIFEST));
    let body = get.bytes().await.unwrap();
    assert_eq!(body.len().to_string(), length);
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&body))),
        digest
    );

    // The same by digest, GET and HEAD.
    for method in [Method::GET, Method::HEAD] {
        let r = c
            .request(
                method.clone(),
                server.url(&format!("/v2/shell/hello/manifests/{digest}")),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "docker-content-digest").as_ref(), Some(&digest));
        assert_eq!(header(&r, "content-length").as_ref(), Some(&length));
        assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_MANIFEST));
        if method == Method::GET {
            assert_eq!(r.bytes().await.unwrap(), body);
        }
    }
    // One build for HEAD + GET + the digest requests.
    assert_eq!(server.builds_started(), 1);

    // Every blob: HEAD and GET agree with the manifest and the content.
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    let mut blobs = vec![manifest["config"].clone()];
    blobs.extend(manifest["layers"].as_array().unwrap().iter().cloned());
    for blob in blobs {
        let d = blob["digest"].as_str().unwrap();
        let size = blob["size"].as_u64().unwrap().to_string();
        let url = server.url(&format!("/v2/shell/hello/blobs/{d}"));
        let head = c.head(&url).send().await.unwrap();
        assert_eq!(head.status(), 200);
        assert_eq!(header(&head, "content-length").as_ref(), Some(&size));
        assert_eq!(header(&head, "docker-content-digest").as_deref(), Some(d));
        let get = c.get(&url).send().await.unwrap();
        assert_eq!(get.status(), 200);
        assert_eq!(header(&get, "content-length").as_ref(), Some(&size));
        let bytes = get.bytes().await.unwrap();
        assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))), d);
    }

    // The config is complete.
    let config = image_config(&server, "shell/hello", &manifest).await;
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().unwrap().len(),
        manifest["layers"].as_array().unwrap().len()
    );
    assert!(config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.as_str().unwrap().starts_with("PATH=")));
    assert_eq!(config["config"]["Cmd"][0], "/bin/bash");
}

#[tokio::test]
async fn name_order_does_not_matter() {
    let server = Server::start();
    let c = client();
    let a = c
        .head(server.url("/v2/hello/shell/manifests/latest"))
        .send()
        .await
        .unwrap();
    let b = c
        .head(server.url("/v2/shell/hello/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    assert_eq!(
        header(&a, "docker-content-digest"),
        header(&b, "docker-content-digest")
    );
    assert_eq!(server.builds_started(), 1);
}

#[tokio::test]
async fn client_mistakes_get_spec_errors() {
    let server = Server::start();
    let c = client();
    let zeros = format!("sha256:{}", "0".repeat(64));

    // Names outside the grammar never reach Nix.
    for name in [
        "Hello",
        "hello..world",
        "a/-b",
        "x/".repeat(130).trim_end_matches('/'),
    ] {
        let r = c
            .get(server.url(&format!("/v2/{name}/manifests/latest")))
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID").await;
    }
    let r = c
        .get(server.url("/v2/hello/manifests/-bad-tag"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "TAG_INVALID").await;

    // Digests.
    for bad in ["sha256:1234", "sha256:XYZ", "md5:00"] {
        let r = c
            .get(server.url(&format!("/v2/hello/blobs/{bad}")))
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
        let r = c
            .get(server.url(&format!("/v2/hello/manifests/{bad}")))
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    }
    let r = c
        .get(server.url(&format!("/v2/hello/blobs/{zeros}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
    let r = c
        .head(server.url(&format!("/v2/hello/blobs/{zeros}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c
        .get(server.url(&format!("/v2/hello/manifests/{zeros}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;

    // Writes are refused.
    for (method, path) in [
        (Method::PUT, "/v2/hello/manifests/latest"),
        (Method::DELETE, "/v2/hello/manifests/latest"),
        (Method::POST, "/v2/hello/blobs/uploads/"),
        (Method::PATCH, "/v2/hello/blobs/uploads/1234"),
        (Method::DELETE, &format!("/v2/hello/blobs/{zeros}")),
    ] {
        let r = c
            .request(method, server.url(path))
            .body("x")
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED").await;
    }

    // Unknown endpoints.
    for path in ["/v2/_catalog", "/v2/hello/tags/other", "/nothing-here"] {
        let r = c.get(server.url(path)).send().await.unwrap();
        expect_error(r, StatusCode::NOT_FOUND, "UNSUPPORTED").await;
    }
    // Referrers are listed by digest only.
    let r = c
        .get(server.url("/v2/hello/referrers/latest"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert_eq!(
        server.builds_started(),
        0,
        "a bad request reached the builder"
    );
}

#[tokio::test]
async fn unknown_packages_are_named() {
    let server = Server::start();
    let r = client()
        .get(server.url("/v2/hello/nosuchpkg/pythonpackages.nope/manifests/latest"))
        .send()
        .await
        .unwrap();
    let body = expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("nosuchpkg") && message.contains("pythonpackages.nope"),
        "{message}"
    );
    assert!(!message.contains("hello"), "{message}");
    assert_eq!(
        body["errors"][0]["detail"]["unknown"],
        serde_json::json!(["nosuchpkg", "pythonpackages.nope"])
    );
    // HEAD says the same (without a body).
    let r = client()
        .head(server.url("/v2/nosuchpkg/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Nothing was stored for the failed image.
    assert!(
        !server.storage.join("images").exists()
            || std::fs::read_dir(server.storage.join("images"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[tokio::test]
async fn build_failures_say_what_failed() {
    let server = Server::start();
    let r = client()
        .get(server.url("/v2/hello/failing/manifests/latest"))
        .send()
        .await
        .unwrap();
    let body = expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "UNKNOWN").await;
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("building the image failed"), "{message}");
    assert!(message.contains("failing"), "{message}");
    // Nix's own words are in the log.
    assert!(server
        .log()
        .contains("fixture build failure: this package always fails"));
    assert!(
        !server.storage.join("images").exists()
            || std::fs::read_dir(server.storage.join("images"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[tokio::test]
async fn nested_digit_and_case_insensitive_names_resolve() {
    let server = Server::start();
    let c = client();
    for name in ["pythonpackages.foo", "7zip", "bashinteractive", "libmulti"] {
        let r = c
            .head(server.url(&format!("/v2/{name}/manifests/latest")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}: {}", server.log());
    }
}

#[tokio::test]
async fn tags_list() {
    let server = Server::start();
    let r = client()
        .get(server.url("/v2/shell/hello/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({ "name": "shell/hello", "tags": ["latest"] })
    );
    let r = client()
        .get(server.url("/v2/BAD/tags/list"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID").await;
}

#[tokio::test]
async fn concurrent_pulls_share_one_build() {
    let server = Server::start();
    let c = client();
    let url = server.url("/v2/jq/curl/manifests/latest");
    let requests = (0..16).map(|i| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let method = if i % 2 == 0 {
                Method::GET
            } else {
                Method::HEAD
            };
            let r = c.request(method, &url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            header(&r, "docker-content-digest").unwrap()
        }
    });
    let digests: Vec<String> = futures_util::future::join_all(requests).await;
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(server.builds_started(), 1);
}

#[tokio::test]
async fn arm64_images_are_separate_and_say_so() {
    let server = Server::start();
    let c = client();
    let amd = c
        .get(server.url("/v2/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    let arm = c
        .get(server.url("/v2/arm64/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(arm.status(), 200, "{}", server.log());
    assert_ne!(
        header(&amd, "docker-content-digest"),
        header(&arm, "docker-content-digest")
    );
    let manifest: Value = arm.json().await.unwrap();
    let config = image_config(&server, "arm64/hello", &manifest).await;
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(server.builds_started(), 2);
}

#[tokio::test]
async fn several_platforms_give_an_index_unless_the_client_takes_none() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_PLATFORMS", "amd64,arm64")],
    );
    let c = client();
    let get = |accept: Option<&'static str>, path: String| {
        let mut request = c.get(server.url(&path));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send()
    };
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    let index = get(Some(INDEX), "/v2/hello/manifests/latest".into())
        .await
        .unwrap();
    assert_eq!(index.status(), 200, "{}", server.log());
    assert_eq!(header(&index, "content-type").as_deref(), Some(INDEX));
    let digest = header(&index, "docker-content-digest").unwrap();
    let body = index.bytes().await.unwrap();
    assert_eq!(format!("sha256:{:x}", Sha256::digest(&body)), digest);
    let parsed: Value = serde_json::from_slice(&body).unwrap();
    let entries = parsed["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);

    // By digest, with its own type; HEAD agrees.
    let by_digest = get(None, format!("/v2/hello/manifests/{digest}"))
        .await
        .unwrap();
    assert_eq!(header(&by_digest, "content-type").as_deref(), Some(INDEX));
    assert_eq!(by_digest.bytes().await.unwrap(), body);
    let head = c
        .head(server.url("/v2/hello/manifests/latest"))
        .header("accept", INDEX)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&head, "docker-content-digest").unwrap(), digest);

    // A client that takes single manifests only gets the first platform's.
    let single = get(Some(OCI_MANIFEST), "/v2/hello/manifests/latest".into())
        .await
        .unwrap();
    assert_eq!(
        header(&single, "content-type").as_deref(),
        Some(OCI_MANIFEST)
    );
    assert_eq!(
        header(&single, "docker-content-digest").unwrap(),
        entries[0]["digest"].as_str().unwrap()
    );
    // Docker's list type counts as an index; so does no Accept at all.
    let docker = get(
        Some("application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"),
        "/v2/hello/manifests/latest".into(),
    )
    .await
    .unwrap();
    assert_eq!(header(&docker, "docker-content-digest").unwrap(), digest);

    // `arm64/` still means arm64 alone.
    let arm = get(Some(INDEX), "/v2/arm64/hello/manifests/latest".into())
        .await
        .unwrap();
    assert_eq!(header(&arm, "content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(
        header(&arm, "docker-content-digest").unwrap(),
        entries[1]["digest"].as_str().unwrap()
    );
    // Two builds in all: one per platform.
    assert_eq!(server.builds_started(), 2);
}

#[tokio::test]
async fn declared_images_are_pulled_by_name_with_their_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("images.json");
    std::fs::write(
        &file,
        r#"{"images": {
            "team/api-base": {"packages": ["shell", "hello"], "config": {
                "Cmd": ["hello"], "Entrypoint": ["/bin/env"], "Env": ["GREETING=hi"],
                "WorkingDir": "/srv", "User": "1000:1000",
                "ExposedPorts": {"8080/tcp": {}}, "Labels": {"team": "api"}}},
            "hello": {"packages": ["bashInteractive"]}}}"#,
    )
    .unwrap();
    let file_url = format!("file://{}", file.display());
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_IMAGES", file_url.as_str())],
    );
    let c = client();
    let response = c
        .get(server.url("/v2/team/api-base/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", server.log());
    let manifest: Value = response.json().await.unwrap();
    let config = image_config(&server, "team/api-base", &manifest).await;
    let run = &config["config"];
    assert_eq!(run["Cmd"], serde_json::json!(["hello"]));
    assert_eq!(run["Entrypoint"], serde_json::json!(["/bin/env"]));
    assert_eq!(run["WorkingDir"], "/srv");
    assert_eq!(run["User"], "1000:1000");
    assert_eq!(run["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
    assert_eq!(run["Labels"]["team"], "api");
    let env: Vec<&str> = run["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"GREETING=hi"), "{env:?}");
    assert!(env.iter().any(|v| v.starts_with("PATH=")), "{env:?}");

    // A declared name wins over the package of the same name.
    let hello = c
        .get(server.url("/v2/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    let manifest: Value = hello.json().await.unwrap();
    let config = image_config(&server, "hello", &manifest).await;
    let log = server.log();
    assert!(log.contains("name=hello"), "{log}");
    assert!(
        config["config"]["Cmd"] != serde_json::json!(["hello"]),
        "{config}"
    );
    // The declared one was built from bashInteractive alone.
    assert!(
        log.lines()
            .any(|l| l.contains("build started") && l.contains("packages=[\"bashInteractive\"")),
        "{log}"
    );
}
