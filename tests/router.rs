//! The router in-process, with no Nix, no processes and no sockets: the
//! real router, image service and single-flight dispatch over in-memory
//! storage, with a dispatch that stores a small real image (or fails as
//! told) in place of Nix. Requests go through `tower::ServiceExt::oneshot`.
//!
//! What it pins down: the error mapping (status, code, message, no internal
//! details), HEAD and GET agreement, one build for many concurrent pulls,
//! digests checked before serving, and query strings ignored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use common::images::{store_image, LAYER};
use nixery::app::{App, Parts};
use nixery::builder::{BuildRequest, Failure, Step};
use nixery::dispatch::single_flight::{SingleFlight, Turns};
use nixery::dispatch::{Dispatch, DispatchError, Service};
use nixery::images::cache::CacheLimits;
use nixery::images::ImageSettings;
use nixery::oci::digest::sha256_digest;
use nixery::registry::{router, AppState};
use nixery::source::PackageSource;
use nixery::storage::keys::ManifestKey;
use nixery::storage::records::{self, ImageRecord};
use nixery::storage::{MemoryStorage, Storage};
use serde_json::Value;
use tower::ServiceExt;

/// What the test dispatch does with a build.
#[derive(Clone)]
enum Outcome {
    /// Store a small image (a config blob, a one-layer manifest, the record).
    Store,
    Fail(DispatchError),
}

/// Stands in for Nix: stores a real, minimal image, or fails as told.
struct TestDispatch {
    storage: Arc<MemoryStorage>,
    outcome: Mutex<Outcome>,
    builds: AtomicUsize,
    /// Held while a build "runs", so that tests can pile up pulls on it.
    gate: tokio::sync::RwLock<()>,
}

#[async_trait]
impl Dispatch for TestDispatch {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        self.builds.fetch_add(1, Ordering::SeqCst);
        let _running = self.gate.read().await;
        let outcome = self.outcome.lock().unwrap().clone();
        match outcome {
            Outcome::Fail(error) => Err(error),
            Outcome::Store => Ok(store_image(&*self.storage, &request).await),
        }
    }
}

struct Registry {
    state: AppState,
    storage: Arc<MemoryStorage>,
    dispatch: Arc<TestDispatch>,
}

impl Registry {
    async fn new() -> Registry {
        Registry::with(|_| {}).await
    }

    /// A registry that reads storage on every pull.
    async fn uncached() -> Registry {
        Registry::with(|images| {
            images.cache = CacheLimits {
                ttl: Duration::ZERO,
                max_bytes: 0,
            }
        })
        .await
    }

    /// The registry as configured by default (with a package set at
    /// `/pkgs` whose images expire after an hour, and no implicit
    /// packages), its settings changed by
    /// `change`, on memory storage and the test dispatch.
    async fn with(change: impl FnOnce(&mut ImageSettings)) -> Registry {
        Registry::dispatching(change, |dispatch| Arc::new(SingleFlight::new(dispatch))).await
    }

    /// A registry whose builds take turns as the local mode's do.
    async fn taking_turns(turns: Turns) -> Registry {
        Registry::dispatching(
            |_| {},
            |dispatch| Arc::new(SingleFlight::taking_turns(dispatch, turns)),
        )
        .await
    }

    /// [`Registry::with`], the test dispatch wrapped by `wrap`.
    async fn dispatching(
        change: impl FnOnce(&mut ImageSettings),
        wrap: impl FnOnce(Arc<TestDispatch>) -> Arc<dyn Dispatch>,
    ) -> Registry {
        let storage = Arc::new(MemoryStorage::new());
        let dispatch = Arc::new(TestDispatch {
            storage: storage.clone(),
            outcome: Mutex::new(Outcome::Store),
            builds: AtomicUsize::new(0),
            gate: tokio::sync::RwLock::new(()),
        });
        let mut config = nixery::config::defaults();
        config.source = PackageSource::Path("/pkgs".into());
        config.tag_ttl = Duration::from_secs(3600);
        config.images.implicit_packages = vec![];
        change(&mut config.images);
        let parts = Parts {
            storage: Some(storage.clone()),
            dispatch: Some(wrap(dispatch.clone())),
        };
        let app = App::with(&config, false, parts).await.unwrap();
        Registry {
            state: app.state,
            storage,
            dispatch,
        }
    }

    fn fail_with(&self, error: DispatchError) {
        *self.dispatch.outcome.lock().unwrap() = Outcome::Fail(error);
    }

    fn builds(&self) -> usize {
        self.dispatch.builds.load(Ordering::SeqCst)
    }

    async fn send(&self, method: Method, uri: &str) -> (Response, Bytes) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (Response::from_parts(parts, Body::empty()), bytes)
    }

    async fn get(&self, uri: &str) -> (Response, Bytes) {
        self.send(Method::GET, uri).await
    }
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_default()
}

/// The spec's error envelope: the one error's code, message and detail.
fn error(response: &Response, body: &[u8]) -> (String, String, Value) {
    assert_eq!(header(response, "content-type"), "application/json");
    let body: Value = serde_json::from_slice(body).unwrap();
    let error = &body["errors"][0];
    (
        error["code"].as_str().unwrap().to_string(),
        error["message"].as_str().unwrap().to_string(),
        error["detail"].clone(),
    )
}

#[tokio::test]
async fn base_endpoint_answers_with_the_api_version() {
    let registry = Registry::new().await;
    for uri in ["/v2/", "/v2"] {
        let (response, body) = registry.get(uri).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "docker-distribution-api-version"),
            "registry/2.0"
        );
        assert_eq!(&body[..], b"{}");
    }
}

#[tokio::test]
async fn head_and_get_agree_and_share_one_build() {
    let registry = Registry::new().await;
    let uri = "/v2/shell/hello/manifests/latest";
    let (head, head_body) = registry.send(Method::HEAD, uri).await;
    let (get, body) = registry.get(&format!("{uri}?ns=docker.io")).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(get.status(), StatusCode::OK);
    assert!(head_body.is_empty());
    for name in ["content-type", "docker-content-digest", "content-length"] {
        assert_eq!(header(&head, name), header(&get, name), "{name}");
    }
    assert_eq!(
        header(&get, "content-type"),
        "application/vnd.oci.image.manifest.v1+json"
    );
    let digest = header(&get, "docker-content-digest").to_string();
    assert_eq!(sha256_digest(&body), digest);
    assert_eq!(header(&get, "content-length"), body.len().to_string());
    assert_eq!(registry.builds(), 1, "the GET was served from storage");

    // By digest: the same bytes, from storage alone.
    let (by_digest, same) = registry
        .get(&format!("/v2/shell/hello/manifests/{digest}"))
        .await;
    assert_eq!(by_digest.status(), StatusCode::OK);
    assert_eq!(same, body);
    // The same packages in another order are the same image.
    let (_, reordered) = registry.get("/v2/hello/shell/manifests/latest").await;
    assert_eq!(reordered, body);
    assert_eq!(registry.builds(), 1);

    // Blobs the manifest names are served, with their digest.
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let (blob, bytes) = registry
        .get(&format!("/v2/shell/hello/blobs/{layer}"))
        .await;
    assert_eq!(blob.status(), StatusCode::OK);
    assert_eq!(&bytes[..], LAYER);
    assert_eq!(header(&blob, "docker-content-digest"), layer);
    let (blob_head, empty) = registry
        .send(Method::HEAD, &format!("/v2/shell/hello/blobs/{layer}"))
        .await;
    assert!(empty.is_empty());
    assert_eq!(
        header(&blob_head, "content-length"),
        LAYER.len().to_string()
    );
}

#[tokio::test]
async fn many_concurrent_pulls_start_one_build() {
    let registry = Arc::new(Registry::new().await);
    let hold = registry.dispatch.gate.write().await;
    let pulls: Vec<_> = (0..20)
        .map(|i| {
            let registry = registry.clone();
            let method = if i % 2 == 0 {
                Method::HEAD
            } else {
                Method::GET
            };
            tokio::spawn(async move {
                let (response, _) = registry.send(method, "/v2/shell/jq/manifests/latest").await;
                (
                    response.status(),
                    header(&response, "docker-content-digest").to_string(),
                )
            })
        })
        .collect();
    // Let every pull reach the build before it finishes.
    while registry.builds() == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    drop(hold);
    let mut digests = std::collections::BTreeSet::new();
    for pull in pulls {
        let (status, digest) = pull.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        digests.insert(digest);
    }
    assert_eq!(digests.len(), 1);
    assert_eq!(registry.builds(), 1);
}

/// The flood an attacker's review found: with one build at a time, 40
/// pulls of new images, each given up by its client after 0.2 s, queued
/// 37 builds, and a legitimate new image waited behind them all. Now what
/// has not started when its last client leaves is dropped, and pulls
/// beyond the queue's bound are refused at once, building nothing.
#[tokio::test]
async fn abandoned_pulls_are_dropped_and_a_full_queue_answers_429() {
    let registry = Arc::new(
        Registry::taking_turns(Turns {
            running: 1,
            waiting: 2,
        })
        .await,
    );
    let hold = registry.dispatch.gate.write().await;
    let pulls = (0..40).map(|i| {
        let registry = registry.clone();
        async move {
            let uri = format!("/v2/flood{i}/manifests/latest");
            tokio::time::timeout(Duration::from_millis(200), registry.get(&uri)).await
        }
    });
    let answered: Vec<_> = futures_util::future::join_all(pulls)
        .await
        .into_iter()
        .flatten()
        .collect();
    // One started, two waited for it; the others were told at once.
    assert_eq!(answered.len(), 37);
    for (response, body) in &answered {
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(response, "retry-after"), "30");
        let (code, message, detail) = error(response, body);
        assert_eq!(code, "TOOMANYREQUESTS");
        assert!(message.contains("pull again in 30 s"), "{message}");
        assert!(detail.get("status_url").is_none(), "{detail}");
    }
    assert_eq!(registry.builds(), 1, "only the build that started runs");

    // A legitimate pull of a new image is next once that build is done,
    // and the one that had started when its client left is stored.
    let legit = tokio::spawn({
        let registry = registry.clone();
        async move { registry.get("/v2/legit/manifests/latest").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(registry.builds(), 1);
    drop(hold);
    let (response, _) = tokio::time::timeout(Duration::from_secs(5), legit)
        .await
        .expect("the legitimate pull waited behind abandoned builds")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(registry.builds(), 2);
    let images = registry.storage.keys();
    let images: Vec<_> = images.iter().filter(|k| k.starts_with("images/")).collect();
    assert_eq!(images.len(), 2, "{images:?}");
}

#[tokio::test]
async fn client_mistakes_are_4xx_in_the_spec_format_and_build_nothing() {
    let registry = Registry::new().await;
    let digest = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(Method, String, StatusCode, &str)> = vec![
        (
            Method::GET,
            "/v2/Hello/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/a..b/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            format!("/v2/{}/manifests/latest", "a/".repeat(200)),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/hello/manifests/-bad".into(),
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
        ),
        (
            Method::GET,
            "/v2/hello/manifests/sha256:xyz".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/hello/blobs/md5:00".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            format!("/v2/hello/manifests/{digest}"),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            format!("/v2/hello/blobs/{digest}"),
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            Method::HEAD,
            format!("/v2/hello/blobs/{digest}"),
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            Method::PUT,
            "/v2/hello/manifests/latest".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::POST,
            "/v2/hello/blobs/uploads/".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            format!("/v2/hello/blobs/{digest}"),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::GET,
            "/v2/hello/nonsense/latest".into(),
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
        ),
        (
            Method::GET,
            "/elsewhere".into(),
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
        ),
    ];
    for (method, uri, status, code) in cases {
        let (response, body) = registry.send(method.clone(), &uri).await;
        assert_eq!(response.status(), status, "{method} {uri}");
        if method != Method::HEAD {
            let (got, message, _) = error(&response, &body);
            assert_eq!(got, code, "{method} {uri}: {message}");
            assert!(!message.is_empty());
        }
    }
    assert_eq!(registry.builds(), 0);
    assert!(
        registry.storage.keys().is_empty(),
        "{:?}",
        registry.storage.keys()
    );
}

#[tokio::test]
async fn build_failures_map_to_one_status_each_without_internal_details() {
    let cases = [
        (
            DispatchError::Failed(Failure::UnknownPackages {
                names: vec!["nosuchpkg".into()],
            }),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "unknown packages: nosuchpkg",
        ),
        (
            DispatchError::Failed(Failure::Build {
                message: "nix-build: builder for failing failed".into(),
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN",
            "building the image failed: nix-build: builder for failing failed",
        ),
        (
            DispatchError::StillBuilding {
                step: Some(Step::Realising),
            },
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "still being built (at step realising)",
        ),
        (
            DispatchError::Unavailable {
                service: Service::Queue,
                message: "SendMessage: dispatch failure: http://10.0.0.7/secret-queue".into(),
            },
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "build queue is unavailable",
        ),
        (
            DispatchError::Unavailable {
                service: Service::Storage,
                message: "storage I/O on /var/lib/nixery/images/x: permission denied".into(),
            },
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "storage is unavailable",
        ),
    ];
    for (failure, status, code, says) in cases {
        let registry = Registry::new().await;
        registry.fail_with(failure.clone());
        let (response, body) = registry.get("/v2/nosuchpkg/manifests/latest").await;
        assert_eq!(response.status(), status, "{failure:?}");
        let (got, message, detail) = error(&response, &body);
        assert_eq!(got, code, "{failure:?}");
        assert!(message.contains(says), "{message:?} should say {says:?}");
        for secret in ["10.0.0.7", "secret", "/var/lib", "permission"] {
            assert!(!message.contains(secret), "{message:?} leaks {secret:?}");
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(header(&response, "retry-after"), "5");
        }
        if code == "MANIFEST_UNKNOWN" {
            assert_eq!(detail["unknown"][0], "nosuchpkg");
        }
        // HEAD answers the same status, with no body.
        let (head, empty) = registry
            .send(Method::HEAD, "/v2/nosuchpkg/manifests/latest")
            .await;
        assert_eq!(head.status(), status);
        assert!(empty.is_empty());
        // Every build's error says where its status is (no Host here: a
        // path); the status itself is the dispatch's to write.
        let status_url = detail["status_url"].as_str().unwrap_or_default();
        let key = status_url.strip_prefix("/builds/").unwrap_or_default();
        assert!(
            key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
            "{detail}"
        );
        assert!(
            message.ends_with(&format!("build status: {status_url}")),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_corrupted_manifest_is_never_served() {
    let registry = Registry::uncached().await;
    let (first, body) = registry.get("/v2/hello/manifests/latest").await;
    assert_eq!(first.status(), StatusCode::OK);
    let digest = header(&first, "docker-content-digest").to_string();
    let key = ManifestKey::of_digest(&digest);
    let mut tampered = body.to_vec();
    tampered[0] ^= 1;
    registry
        .storage
        .put(&key, Bytes::from(tampered))
        .await
        .unwrap();

    for uri in [
        "/v2/hello/manifests/latest".to_string(),
        format!("/v2/hello/manifests/{digest}"),
    ] {
        let (response, body) = registry.get(&uri).await;
        assert_eq!(
            response.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "{uri}"
        );
        let (code, message, _) = error(&response, &body);
        assert_eq!(code, "UNKNOWN");
        assert!(message.contains("damaged"), "{message}");
    }
}

#[tokio::test]
async fn stale_images_of_a_moving_source_are_rebuilt() {
    let registry = Registry::uncached().await;
    let (first, _) = registry.get("/v2/hello/manifests/latest").await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(registry.builds(), 1);
    // Age the record past the TTL (an hour): the next pull builds again.
    let key = registry
        .storage
        .keys()
        .into_iter()
        .find(|k| k.starts_with("images/"))
        .unwrap();
    let mut record: ImageRecord = records::read(&*registry.storage, &key)
        .await
        .unwrap()
        .unwrap();
    record.built_at -= 3601;
    records::write(&*registry.storage, &key, &record)
        .await
        .unwrap();
    let (second, _) = registry.get("/v2/hello/manifests/latest").await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(registry.builds(), 2);
    // Fresh again: served without a build.
    let _ = registry.get("/v2/hello/manifests/latest").await;
    assert_eq!(registry.builds(), 2);
}

#[tokio::test]
async fn a_warm_instance_answers_repeated_pulls_without_storage() {
    let registry = Registry::new().await;
    let (first, body) = registry.get("/v2/hello/manifests/latest").await;
    assert_eq!(first.status(), StatusCode::OK);
    let digest = header(&first, "docker-content-digest").to_string();
    let by_digest = format!("/v2/hello/manifests/{digest}");
    // The first pull by digest reads the manifest once.
    assert_eq!(registry.get(&by_digest).await.0.status(), StatusCode::OK);
    // Being served is recorded once a day, in the background, for
    // garbage collection.
    let served = || {
        registry
            .storage
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("served/"))
            .count()
    };
    for _ in 0..200 {
        if served() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served(), 1);

    let calls = registry.storage.calls();
    for uri in ["/v2/hello/manifests/latest", by_digest.as_str()] {
        for method in [Method::GET, Method::HEAD] {
            let (response, again) = registry.send(method.clone(), uri).await;
            assert_eq!(response.status(), StatusCode::OK, "{method} {uri}");
            assert_eq!(header(&response, "docker-content-digest"), digest);
            if method == Method::GET {
                assert_eq!(again, body);
            }
        }
    }
    assert_eq!(
        registry.storage.calls(),
        calls,
        "a cached pull called storage"
    );
    assert_eq!(registry.builds(), 1);

    // What was cached had been checked: a manifest damaged in storage
    // afterwards does not reach clients from memory either, since memory
    // holds the bytes that matched their digest.
    let key = ManifestKey::of_digest(&digest);
    registry
        .storage
        .put(&key, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let (response, again) = registry.get("/v2/hello/manifests/latest").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sha256_digest(&again), digest);

    // Another image is another entry; its first pull reads storage.
    let (other, _) = registry.get("/v2/jq/manifests/latest").await;
    assert_eq!(other.status(), StatusCode::OK);
    assert!(registry.storage.calls() > calls);
}

mod fuzz {
    //! Names, tags and digests from a hostile client: whatever arrives, the
    //! answer is never a server error, and nothing is built unless the
    //! answer is a manifest.

    use super::*;
    use proptest::prelude::*;

    fn reference() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9._:@%+-]{0,140}",
            "sha256:[0-9a-fA-F]{0,70}",
            "(sha512|md5|SHA256):[0-9a-f]{0,64}",
            Just("latest".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn no_request_path_fails_the_server_or_builds_by_mistake(
            name in "[a-zA-Z0-9._/:@%+-]{0,300}",
            kind in prop::sample::select(vec!["manifests", "blobs", "tags", "referrers", ""]),
            reference in reference(),
            head in any::<bool>(),
        ) {
            let uri = format!("/v2/{name}/{kind}/{reference}");
            if uri.parse::<axum::http::Uri>().is_err() {
                // Not a request a client can send.
                return Ok(());
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let registry = Registry::new().await;
                let method = if head { Method::HEAD } else { Method::GET };
                let (response, body) = registry.send(method.clone(), &uri).await;
                let status = response.status();
                prop_assert!(!status.is_server_error(), "{method} {uri}: {status}");
                if status != StatusCode::OK {
                    prop_assert_eq!(registry.builds(), 0, "{} {} built", method, uri);
                    prop_assert!(registry.storage.keys().is_empty());
                    if method == Method::GET {
                        let (code, _, _) = error(&response, &body);
                        prop_assert!(!code.is_empty());
                    }
                }
                Ok(())
            })?;
        }
    }
}
