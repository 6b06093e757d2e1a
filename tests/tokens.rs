//! The token flow and bounded logins in-process (no Nix, no sockets): the
//! real router with a private registry over memory storage, a dispatch
//! that stores a small image in place of Nix and counts builds, and
//! requests through `tower::ServiceExt::oneshot` from client addresses
//! set as the local server sets them (`ConnectInfo`).
//!
//! Every bad input gets 401 or 403 in the registry's error format, and
//! nothing is built: expired, tampered, unsigned and foreign tokens,
//! `alg=none`, widened scopes, oversized `Authorization` headers and a
//! flood of token requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use base64::Engine;
use common::images::store_image;
use nixery::app::{App, Parts};
use nixery::builder::BuildRequest;
use nixery::config::AuthScope;
use nixery::dispatch::single_flight::SingleFlight;
use nixery::dispatch::{Dispatch, DispatchError};
use nixery::registry::auth::MAX_AUTHORIZATION;
use nixery::registry::token::{KeySet, Tokens, DEFAULT_KEY_OBJECT};
use nixery::registry::{router, AppState};
use nixery::source::PackageSource;
use nixery::storage::records::ImageRecord;
use nixery::storage::{MemoryStorage, Storage};
use serde_json::{json, Value};
use tower::ServiceExt;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";
const SERVICE: &str = "registry.example";

/// Stands in for Nix: stores a small real image and counts builds.
struct Stores {
    storage: Arc<MemoryStorage>,
    builds: AtomicUsize,
}

#[async_trait]
impl Dispatch for Stores {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        self.builds.fetch_add(1, Ordering::SeqCst);
        Ok(store_image(&*self.storage, &request).await)
    }
}

struct Registry {
    state: AppState,
    storage: Arc<MemoryStorage>,
    dispatch: Arc<Stores>,
    /// Holds the htpasswd file.
    _dir: tempfile::TempDir,
}

impl Registry {
    /// A private registry as configured by default, with one user (a
    /// password hashed at `bcrypt_cost`) and `failures` wrong passwords a
    /// minute per address, on memory storage and the test dispatch.
    async fn new(scope: AuthScope, bcrypt_cost: u32, failures: u32) -> Registry {
        let storage = Arc::new(MemoryStorage::new());
        let dispatch = Arc::new(Stores {
            storage: storage.clone(),
            builds: AtomicUsize::new(0),
        });
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        let hash = bcrypt::hash(PASSWORD, bcrypt_cost).unwrap();
        std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
        let mut config = nixery::config::defaults();
        config.source = PackageSource::Path("/pkgs".into());
        config.images.implicit_packages = vec![];
        config.public_url = Some(format!("http://{SERVICE}"));
        config.auth = Some((htpasswd.to_str().unwrap().to_string(), scope));
        config.tokens.login_failures = failures;
        config.tokens.ttl = Duration::from_secs(300);
        let parts = Parts {
            storage: Some(storage.clone()),
            dispatch: Some(Arc::new(SingleFlight::new(dispatch.clone()))),
        };
        let state = App::with(&config, false, parts).await.unwrap().state;
        Registry {
            state,
            storage,
            dispatch,
            _dir: dir,
        }
    }

    fn builds(&self) -> usize {
        self.dispatch.builds.load(Ordering::SeqCst)
    }

    /// A request from `from`, with an `Authorization` header if given.
    async fn send(
        &self,
        method: Method,
        uri: &str,
        authorization: Option<&str>,
        from: &str,
        body: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "registry.example");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let mut request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let peer: SocketAddr = format!("{from}:40000").parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn get(
        &self,
        uri: &str,
        authorization: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        self.send(Method::GET, uri, authorization, "192.0.2.1", None)
            .await
    }

    /// A token for `scope` (anonymous, or with Basic credentials).
    async fn token(&self, scope: &str, basic: Option<(&str, &str)>) -> String {
        let authorization = basic.map(|(u, p)| basic_header(u, p));
        let (status, _, body) = self
            .get(
                &format!("/token?service={SERVICE}&scope={scope}"),
                authorization.as_deref(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["token"].as_str().unwrap().to_string()
    }
}

fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The claims of a token, unchecked.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// A 401 in the registry's format, with a Bearer challenge; the challenge.
fn unauthorized(status: StatusCode, headers: &axum::http::HeaderMap, body: &Value) -> String {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{body}");
    let challenge = headers[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(
        challenge.starts_with(&format!(
            "Bearer realm=\"http://registry.example/token\",service=\"{SERVICE}\""
        )),
        "{challenge}"
    );
    challenge.to_string()
}

const MANIFEST: &str = "/v2/shell/hello/manifests/latest";
const PULL_SCOPE: &str = "repository:shell/hello:pull";

#[tokio::test]
async fn anonymous_tokens_pull_what_is_built_and_user_tokens_build() {
    let registry = Registry::new(AuthScope::Build, 4, 10).await;

    // /v2/ challenges, and an anonymous token answers the challenge.
    let (status, headers, body) = registry.get("/v2/", None).await;
    let challenge = unauthorized(status, &headers, &body);
    assert!(!challenge.contains("scope="), "{challenge}");
    let anonymous = registry.token(PULL_SCOPE, None).await;
    let claims = claims_of(&anonymous);
    assert_eq!(claims["sub"], "");
    assert_eq!(claims["aud"], SERVICE);
    assert_eq!(claims["iss"], "nixery");
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "shell/hello", "actions": ["pull"]}])
    );
    let (status, _, _) = registry.get("/v2/", Some(&bearer(&anonymous))).await;
    assert_eq!(status, StatusCode::OK);

    // Not built: the anonymous token cannot build; the challenge names
    // the scope that would, and docker shows its description.
    let (status, headers, body) = registry.get(MANIFEST, Some(&bearer(&anonymous))).await;
    let challenge = unauthorized(status, &headers, &body);
    assert!(
        challenge.contains("scope=\"repository:shell/hello:pull,build\"")
            && challenge.contains("error=\"insufficient_scope\"")
            && challenge.contains("error_description=\"this image is not built yet"),
        "{challenge}"
    );
    assert_eq!(registry.builds(), 0);

    // A user's token builds it.
    let user = registry.token(PULL_SCOPE, Some((USER, PASSWORD))).await;
    let claims = claims_of(&user);
    assert_eq!(claims["sub"], USER);
    assert_eq!(claims["access"][0]["actions"], json!(["pull", "build"]));
    let (status, _, body) = registry.get(MANIFEST, Some(&bearer(&user))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(registry.builds(), 1);

    // Now the anonymous token pulls it, and its blobs.
    let (status, _, manifest) = registry.get(MANIFEST, Some(&bearer(&anonymous))).await;
    assert_eq!(status, StatusCode::OK);
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let (status, _, _) = registry
        .get(
            &format!("/v2/shell/hello/blobs/{layer}"),
            Some(&bearer(&anonymous)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // So do clients with no Authorization at all, and Basic ones.
    assert_eq!(registry.get(MANIFEST, None).await.0, StatusCode::OK);
    let basic = basic_header(USER, PASSWORD);
    assert_eq!(registry.get(MANIFEST, Some(&basic)).await.0, StatusCode::OK);

    // A token for one repository pulls nothing else.
    let (status, headers, body) = registry
        .get(
            &format!("/v2/hello/blobs/{layer}"),
            Some(&bearer(&anonymous)),
        )
        .await;
    let challenge = unauthorized(status, &headers, &body);
    assert!(
        challenge.contains("scope=\"repository:hello:pull\"")
            && challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert_eq!(registry.builds(), 1);
}

#[tokio::test]
async fn the_all_scope_gives_no_anonymous_tokens() {
    let registry = Registry::new(AuthScope::All, 4, 10).await;
    let (status, headers, body) = registry
        .get(&format!("/token?scope={PULL_SCOPE}"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Basic realm=\"nixery\"");
    let (status, headers, body) = registry.get(MANIFEST, None).await;
    let challenge = unauthorized(status, &headers, &body);
    assert!(challenge.contains("scope=\"repository:shell/hello:pull\""));
    // An anonymous token from a time the scope was `build` (the same
    // key) does not pass either.
    let anonymous = registry
        .state
        .auth
        .as_ref()
        .unwrap()
        .tokens()
        .issue(
            "",
            vec![nixery::registry::token::Access::repository(
                "shell/hello",
                &["pull"],
            )],
        )
        .await;
    let (status, headers, body) = registry
        .get(MANIFEST, Some(&bearer(&anonymous.token)))
        .await;
    unauthorized(status, &headers, &body);
    // Pages outside /v2/ ask browsers for Basic credentials.
    let (status, headers, _) = registry.get("/builds", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Basic realm=\"nixery\"");
    // A user's token works everywhere.
    let user = registry.token(PULL_SCOPE, Some((USER, PASSWORD))).await;
    assert_eq!(
        registry.get(MANIFEST, Some(&bearer(&user))).await.0,
        StatusCode::OK
    );
    assert_eq!(registry.builds(), 1);
}

#[tokio::test]
async fn the_token_endpoint_answers_docker_and_containerd() {
    let registry = Registry::new(AuthScope::Build, 4, 10).await;
    // docker login: no scope, account and client_id, offline_token; and
    // both names of the token, with its lifetime.
    let (status, headers, body) = registry
        .get(
            &format!("/token?account={USER}&client_id=docker&offline_token=true&service={SERVICE}"),
            Some(&basic_header(USER, PASSWORD)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token"], body["access_token"]);
    assert_eq!(body["expires_in"], 300);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(
        claims_of(body["token"].as_str().unwrap())["access"],
        json!([])
    );

    // Scopes repeat; other resource types and actions are left out.
    let (_, _, body) = registry
        .get(
            "/token?scope=repository:hello:pull&scope=repository:shell/hello:pull,push\
             &scope=registry:catalog:*&scope=repository:jq:push",
            None,
        )
        .await;
    let access = &claims_of(body["token"].as_str().unwrap())["access"];
    assert_eq!(
        access,
        &json!([
            {"type": "repository", "name": "hello", "actions": ["pull"]},
            {"type": "repository", "name": "shell/hello", "actions": ["pull"]},
        ])
    );

    // containerd's OAuth2 password grant, several scopes in one.
    let form = format!(
        "grant_type=password&username={USER}&password=correct%20horse&client_id=containerd-client\
         &service={SERVICE}&scope=repository%3Ahello%3Apull+repository%3Ajq%3Apull"
    );
    let (status, _, body) = registry
        .send(Method::POST, "/token", None, "192.0.2.1", Some(&form))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = claims_of(body["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], USER);
    assert_eq!(claims["access"][1]["name"], "jq");
    assert_eq!(claims["access"][1]["actions"], json!(["pull", "build"]));
    let wrong = form.replace("correct%20horse", "guess");
    let (status, _, body) = registry
        .send(Method::POST, "/token", None, "192.0.2.1", Some(&wrong))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let refresh = "grant_type=refresh_token&refresh_token=x&service=registry.example";
    let (status, _, body) = registry
        .send(Method::POST, "/token", None, "192.0.2.1", Some(refresh))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["code"], "DENIED");

    // Another service, too many scopes, a token instead of credentials.
    let (status, _, body) = registry.get("/token?service=elsewhere", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let many: String = (0..17)
        .map(|n| format!("scope=repository:r{n}:pull&"))
        .collect();
    let (status, _, body) = registry.get(&format!("/token?{many}"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let token = registry.token(PULL_SCOPE, None).await;
    let (status, _, body) = registry.get("/token", Some(&bearer(&token))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(registry.builds(), 0);
}

#[tokio::test]
async fn bad_tokens_get_401_and_build_nothing() {
    let registry = Registry::new(AuthScope::Build, 4, 10).await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let good = registry.token(PULL_SCOPE, Some((USER, PASSWORD))).await;
    let parts: Vec<&str> = good.split('.').collect();
    let header_json: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    let claims = claims_of(&good);

    let resign = |header: &Value, claims: &Value, secret: &[u8]| -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(secret).unwrap();
        let message = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
                .unwrap();
        format!("{message}.{signature}")
    };
    let our_secret = {
        let text = registry
            .storage
            .get(DEFAULT_KEY_OBJECT)
            .await
            .unwrap()
            .unwrap();
        let line = String::from_utf8_lossy(&text)
            .lines()
            .find(|l| !l.starts_with('#'))
            .unwrap()
            .to_string();
        base64::engine::general_purpose::STANDARD
            .decode(line)
            .unwrap()
    };
    let now = jsonwebtoken::get_current_timestamp();
    let mut expired = claims.clone();
    expired["iat"] = json!(now - 7200);
    expired["nbf"] = json!(now - 7200);
    expired["exp"] = json!(now - 3600);
    let mut widened = claims.clone();
    widened["access"] = json!([{"type": "repository", "name": "shell/hello", "actions": ["pull", "build"]},
                               {"type": "repository", "name": "big", "actions": ["pull", "build"]}]);
    let mut none = header_json.clone();
    none["alg"] = json!("none");
    let other_registry = {
        let keys = KeySet::parse(&KeySet::generate().unwrap()).unwrap();
        let other = Tokens::new(keys, SERVICE, Duration::from_secs(300));
        other
            .issue(
                USER,
                vec![nixery::registry::token::Access::repository(
                    "shell/hello",
                    &["pull", "build"],
                )],
            )
            .await
            .token
    };
    let other_service = {
        let mut c = claims.clone();
        c["aud"] = json!("elsewhere.example");
        resign(&header_json, &c, &our_secret)
    };
    let mut flipped = b64.decode(parts[2]).unwrap();
    flipped[3] ^= 0x40;
    let cases: Vec<(&str, String)> = vec![
        ("expired", resign(&header_json, &expired, &our_secret)),
        (
            "tampered signature",
            format!("{}.{}.{}", parts[0], parts[1], b64.encode(flipped)),
        ),
        ("unsigned", format!("{}.{}.", parts[0], parts[1])),
        ("two parts", format!("{}.{}", parts[0], parts[1])),
        (
            "alg=none",
            format!("{}.{}.", b64.encode(none.to_string()), parts[1]),
        ),
        (
            "widened scope",
            format!(
                "{}.{}.{}",
                parts[0],
                b64.encode(widened.to_string()),
                parts[2]
            ),
        ),
        ("another registry's key", other_registry),
        ("another service", other_service),
        ("garbage", "not-a-token".to_string()),
    ];
    // Each token asks for an image that is not built, and for one built.
    for (what, token) in &cases {
        for uri in [MANIFEST, "/v2/big/manifests/latest", "/v2/"] {
            let (status, headers, body) = registry.get(uri, Some(&bearer(token))).await;
            let challenge = unauthorized(status, &headers, &body);
            assert!(
                challenge.contains("error=\"invalid_token\""),
                "{what}: {challenge}"
            );
        }
    }
    assert_eq!(registry.builds(), 0);

    // An oversized Authorization header is refused unread, for Bearer and
    // Basic alike, at the registry and at the token endpoint.
    let huge_token = format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION));
    let huge_basic = format!("Basic {}", "A".repeat(MAX_AUTHORIZATION));
    for value in [&huge_token, &huge_basic] {
        let (status, _, body) = registry.get(MANIFEST, Some(value)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("too large"));
        let (status, _, _) = registry.get("/token", Some(value)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(registry.builds(), 0);
    // The good token still works.
    assert_eq!(
        registry.get(MANIFEST, Some(&bearer(&good))).await.0,
        StatusCode::OK
    );
    assert_eq!(registry.builds(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_wrong_passwords_neither_builds_nor_slows_other_addresses() {
    // bcrypt cost 10: tens of milliseconds a check, like production's
    // cost over fewer rounds.
    let registry = Arc::new(Registry::new(AuthScope::Build, 10, 5).await);
    let timed = |from: &'static str, password: &'static str| {
        let registry = registry.clone();
        async move {
            let started = Instant::now();
            let (status, headers, body) = registry
                .send(
                    Method::GET,
                    &format!("/token?scope={PULL_SCOPE}"),
                    Some(&basic_header(USER, password)),
                    from,
                    None,
                )
                .await;
            (status, headers, body, started.elapsed())
        }
    };
    // One bcrypt, alone, for scale.
    let (_, _, _, single) = timed("198.51.100.9", "wrong").await;

    // 48 wrong passwords at once from one address ...
    let flood: Vec<_> = (0..48)
        .map(|_| tokio::spawn(timed("203.0.113.66", "wrong")))
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // ... while a user logs in from another.
    let (status, _, body, user_took) = timed("198.51.100.7", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let mut refused = 0;
    let mut throttled = 0;
    for attempt in flood {
        let (status, headers, body, _) = attempt.await.unwrap();
        match status {
            StatusCode::UNAUTHORIZED => refused += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                throttled += 1;
                assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
                let retry: u64 = headers[header::RETRY_AFTER]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&retry), "{retry}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    eprintln!(
        "one check {single:?}; the user's login during a flood of 48: {user_took:?}; \
         {refused} checked, {throttled} refused with 429"
    );
    // At most the limit cost a bcrypt; the rest were refused unchecked.
    assert!(refused <= 5, "{refused} wrong passwords were checked");
    assert_eq!(refused + throttled, 48);
    // The user waited for at most a few checks, not for the flood.
    assert!(
        user_took < single * 4 + Duration::from_millis(200),
        "the user's login took {user_took:?}, one check {single:?}"
    );
    // The flooding address is refused for now, without a check ...
    let (status, _, _, _) = timed("203.0.113.66", "still wrong").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // ... but credentials that passed lately cost nothing, from anywhere.
    for from in ["198.51.100.7", "203.0.113.66"] {
        let (status, _, _, remembered) = timed(from, PASSWORD).await;
        assert_eq!(status, StatusCode::OK);
        assert!(remembered < single, "{remembered:?} against {single:?}");
    }
    // Anonymous token requests stay cheap and build nothing.
    let started = Instant::now();
    for _ in 0..200 {
        let (status, _, _) = registry
            .get(&format!("/token?scope={PULL_SCOPE}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(started.elapsed() < single * 20, "{:?}", started.elapsed());
    assert_eq!(registry.builds(), 0);
}

#[tokio::test]
async fn the_realm_is_the_public_url_whatever_the_host() {
    let mut registry = Registry::new(AuthScope::Build, 4, 10).await;
    registry.state = registry
        .state
        .clone()
        .with_public_url("https://nixery.example.org");
    let (status, headers, _) = registry.get("/v2/", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let challenge = headers[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"https://nixery.example.org/token\""),
        "{challenge}"
    );
}
