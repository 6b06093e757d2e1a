//! Build status: what a build shows while it runs and after, in a real
//! browser and as JSON, on every instance that shares the storage, and
//! where a pull's error points to.
// The integration tier: needs real Nix and headless Chromium (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::time::Duration;

use common::{browser_dom, fixture_copy, Server};
use serde_json::Value;

async fn get_json(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The DOM of a page after its script ran (Chromium is a blocking call).
async fn dom(url: String) -> String {
    tokio::task::spawn_blocking(move || browser_dom(&url))
        .await
        .unwrap()
}

/// The builds `/api/builds` lists for `name`.
async fn builds_of(server: &Server, name: &str) -> Vec<Value> {
    let (status, body) = get_json(&server.url("/api/builds")).await;
    assert_eq!(status, 200, "{body}");
    body["builds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"] == name)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_is_watched_running_then_done_in_a_browser_on_any_instance() {
    let work = tempfile::tempdir().unwrap();
    let salt = common::unique();
    let pkgs = fixture_copy(
        work.path(),
        serde_json::json!({ "slowSeconds": 8, "salt": salt }),
    );
    let storage = work.path().join("storage");
    let pkgs_env = pkgs.to_str().unwrap();
    let builder = Server::start_with(&storage, &[("NIXERY_PKGS_PATH", pkgs_env)]);
    // Another instance on the same storage, which builds nothing itself.
    let other = Server::start_with(&storage, &[("NIXERY_PKGS_PATH", pkgs_env)]);

    let pull = {
        let url = builder.url("/v2/slow/manifests/latest");
        tokio::spawn(async move { reqwest::get(url).await.unwrap().status().as_u16() })
    };

    // Running, at a step, as JSON and on the page of both instances.
    let mut running = None;
    for _ in 0..600 {
        let found = builds_of(&builder, "slow").await;
        // Realising, and Nix has said what it builds (a first status
        // may be written before Nix has).
        let building = |b: &Value| {
            b["step"] == "realising"
                && b["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("building"))
        };
        if let Some(b) = found.into_iter().find(building) {
            running = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = running.expect("the build never showed as realising");
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["tag"], "latest");
    assert!(
        running["detail"]
            .as_str()
            .unwrap()
            .starts_with("building slow-1.0"),
        "{running}"
    );
    assert_eq!(running["total"], 1, "{running}");
    let key = running["key"].as_str().unwrap().to_string();
    assert!(running["started_at"].as_str().unwrap().ends_with('Z'));

    let page = dom(builder.url("/builds")).await;
    assert!(
        page.contains("data-refreshed"),
        "the script did not run:\n{page}"
    );
    assert!(
        page.contains(&format!("data-key=\"{key}\" data-state=\"running\"")),
        "{page}"
    );
    assert!(page.contains("realising"), "{page}");
    assert!(page.contains("slow:latest"), "{page}");

    // The other instance lists the first one's build, and shows its page.
    let listed = builds_of(&other, "slow").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["key"], key.as_str());
    assert_eq!(listed[0]["state"], "running");
    let page = dom(other.url(&format!("/builds/{key}"))).await;
    assert!(page.contains("data-state=\"running\""), "{page}");
    assert!(page.contains("building slow-1.0"), "{page}");

    // The landing page lists it in progress, and links to the list.
    let landing = reqwest::get(other.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(landing.contains(&format!("/builds/{key}")), "{landing}");
    assert!(landing.contains("href=\"/builds\""), "{landing}");

    assert_eq!(pull.await.unwrap(), 200);

    // Done, with what it did, in the browser of either instance.
    let page = dom(other.url("/builds")).await;
    assert!(
        page.contains(&format!("data-key=\"{key}\" data-state=\"done\"")),
        "{page}"
    );
    assert!(page.contains("built in"), "{page}");
    let (status, done) = get_json(&other.url(&format!("/api/builds/{key}"))).await;
    assert_eq!(status, 200);
    assert_eq!(done["state"], "done", "{done}");
    assert!(done["layers_new"].as_u64().unwrap() >= 1, "{done}");
    assert!(done["bytes_uploaded"].as_u64().unwrap() > 0, "{done}");
    assert!(done["elapsed_ms"].as_u64().unwrap() >= 8000, "{done}");
    assert_eq!(done["error"], Value::Null);
}

#[tokio::test]
async fn a_failed_build_s_error_points_to_its_status_with_the_log() {
    let server = Server::start();
    let response = reqwest::get(server.url("/v2/failing/manifests/latest"))
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let error = &body["errors"][0];
    let status_url = error["detail"]["status_url"].as_str().unwrap();
    let prefix = format!("http://{}/builds/", server.addr);
    assert!(status_url.starts_with(&prefix), "{body}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!("build status: {status_url}")),
        "{body}"
    );
    let key = &status_url[prefix.len()..];
    let (status, build) = get_json(&server.url(&format!("/api/builds/{key}"))).await;
    assert_eq!(status, 200);
    assert_eq!(build["state"], "failed", "{build}");
    assert_eq!(build["step"], "realising", "{build}");
    assert!(
        build["error"].as_str().unwrap().contains("failed"),
        "{build}"
    );
    let log = build["log"].as_array().unwrap();
    assert!(
        log.iter()
            .any(|l| l.as_str().unwrap().contains("this package always fails")),
        "{build}"
    );
    // The page of the status URL shows the same.
    let page = dom(status_url.to_string()).await;
    assert!(page.contains("data-state=\"failed\""), "{page}");
    assert!(page.contains("this package always fails"), "{page}");
}

#[tokio::test]
async fn bad_build_keys_are_registry_errors() {
    let server = Server::start();
    let unknown = "a".repeat(64);
    for path in [
        format!("/api/builds/{unknown}"),
        format!("/builds/{unknown}"),
        "/api/builds/not-a-key".to_string(),
        "/builds/..%2F..%2Fimages".to_string(),
        format!("/api/builds/{}", "A".repeat(64)),
    ] {
        let response = reqwest::get(server.url(&path)).await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{path}: {body}");
    }
    let (status, empty) = get_json(&server.url("/api/builds")).await;
    assert_eq!(status, 200);
    assert_eq!(empty, serde_json::json!({ "builds": [] }));
}

#[tokio::test]
async fn a_hostile_status_record_stays_text_on_the_page() {
    let server = Server::start();
    let key = "b".repeat(64);
    let hostile = serde_json::json!({
        "state": "failed",
        "attempt": 1,
        "heartbeat": 1,
        "name": "<img src=x onerror=\"document.title='owned'\">",
        "tag": "<script>document.title='owned'</script>",
        "failure": { "kind": "build", "message": "<b>bold</b>" },
        "progress": { "step": "realising", "log": ["<iframe src=\"//evil\"></iframe>"] },
    });
    let dir = server.storage.join("builds");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&key), hostile.to_string()).unwrap();
    // A damaged one beside it is left out, not an error.
    std::fs::write(dir.join("c".repeat(64)), b"{half").unwrap();
    // Both listed as asked for lately; and a note that names no build.
    let notes = dir.join("recent");
    std::fs::create_dir_all(&notes).unwrap();
    for name in [
        format!("0000000000001-{key}"),
        format!("0000000000002-{}", "c".repeat(64)),
        "0000000000003-not-a-key".into(),
    ] {
        std::fs::write(notes.join(name), b"{}").unwrap();
    }

    let listed = builds_of(&server, "<img src=x onerror=\"document.title='owned'\">").await;
    assert_eq!(listed.len(), 1);
    for path in ["/builds".to_string(), format!("/builds/{key}")] {
        let page = dom(server.url(&path)).await;
        assert!(page.contains("data-refreshed"), "{page}");
        assert!(!page.contains("owned</title>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<iframe"), "{page}");
        assert!(!page.contains("<b>bold"), "{page}");
        assert!(page.contains("&lt;img src=x"), "{page}");
    }
    let response = reqwest::get(server.url("/builds")).await.unwrap();
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
}

/// The value of a Prometheus sample line (`name{labels} value`).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn the_local_server_counts_in_prometheus_format_and_names_each_request() {
    let server = Server::start();
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    let mut manifest = Value::Null;
    for _ in 0..2 {
        let response = client
            .get(server.url("/v2/hello/manifests/latest"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        manifest = response.json().await.unwrap();
    }
    let config = &manifest["config"];
    let blob = client
        .get(server.url(&format!(
            "/v2/hello/blobs/{}",
            config["digest"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 200);
    blob.bytes().await.unwrap();
    let missing = client
        .get(server.url("/v2/nosuchpackage/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let response = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    assert!(sample(&text, "nixery_requests_total{status=\"200\"}") >= 3.0);
    assert_eq!(
        sample(&text, "nixery_errors_total{code=\"MANIFEST_UNKNOWN\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "nixery_manifest_cache_total{result=\"hit\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "nixery_manifest_cache_total{result=\"miss\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "nixery_bytes_served_total"),
        config["size"].as_f64().unwrap()
    );
    assert_eq!(sample(&text, "nixery_builds_total{outcome=\"done\"}"), 1.0);
    assert_eq!(
        sample(&text, "nixery_builds_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(sample(&text, "nixery_build_duration_seconds_count"), 1.0);
    assert!(sample(&text, "nixery_layers_total{kind=\"new\"}") >= 1.0);

    // Each request has its own id, on its log line and on every line
    // logged while answering it (the build's too, with the image key).
    assert_ne!(ids[0], ids[1]);
    let log = server.log();
    for id in &ids {
        let tagged: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("request{{id={id}}}")))
            .collect();
        assert!(
            tagged
                .iter()
                .any(|l| l.contains("path=\"/v2/hello/manifests/latest\"")),
            "{log}"
        );
    }
    // (The build of `nosuchpackage` fails at its first step.)
    let steps: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("build step") && !l.contains("build step failed"))
        .collect();
    assert!(steps.len() >= 6, "{log}");
    assert!(
        steps
            .iter()
            .all(|l| l.contains(&format!("request{{id={}}}:build{{image=", ids[0]))),
        "{steps:#?}"
    );
}

#[tokio::test]
async fn a_public_url_names_the_registry_whatever_the_host_says() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_PUBLIC_URL", "https://registry.example.org/")],
    );
    let client = reqwest::Client::new();
    let failed = client
        .get(server.url("/v2/failing/manifests/latest"))
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    let body: Value = failed.json().await.unwrap();
    let status_url = body["errors"][0]["detail"]["status_url"].as_str().unwrap();
    assert!(
        status_url.starts_with("https://registry.example.org/builds/"),
        "{body}"
    );
    let landing = client
        .get(server.url("/"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        landing.contains("docker pull registry.example.org/shell/curl/jq"),
        "{landing}"
    );
    assert!(!landing.contains("evil"), "{landing}");
}
