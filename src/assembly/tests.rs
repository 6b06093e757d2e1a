//! Assembly from a binary cache, in process: a signed cache made in
//! memory and served on 127.0.0.1 (with faults on demand), an attribute
//! index written to memory storage, and the builder (or the whole
//! registry) over them. What the cache sends that fails a check, or does
//! not send, is a clear error or goes to the next source; nothing of it
//! reaches an image, and no image record is left half made.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::attrs::Catalog;
use super::jobs::NoIndexJobs;
use super::store::CacheStore;
use super::{CacheConfig, FromCache};
use crate::app::{App, Parts};
use crate::binary_cache::decompress::Compression;
use crate::binary_cache::narinfo::NarInfoLimits;
use crate::binary_cache::testing::{
    self, narinfo_text, sha256_nix32, Server, TestCache, TestKey, TestNode,
};
use crate::binary_cache::{BinaryCache, CacheOptions, NarInfo, StorePath, TrustedKeys};
use crate::builder::fake::{FakeNode, FakePath, FakeStore};
use crate::builder::nix::{AttributeKind, ListedAttribute};
use crate::builder::popularity::Popularity;
use crate::builder::{BuildError, BuildLimits, BuildRequest, Builder, Failure, Verdict};
use crate::config::NixConfig;
use crate::oci::digest::sha256_digest;
use crate::source::{PackageSource, SourceArg};
use crate::storage::keys::Parsed;
use crate::storage::{MemoryStorage, Storage};

const SYSTEM: &str = "x86_64-linux";

fn source() -> SourceArg {
    SourceArg::Path {
        path: "/pkgs".into(),
    }
}

fn file(executable: bool, contents: &str) -> TestNode {
    TestNode::File {
        executable,
        contents: contents.as_bytes().to_vec(),
    }
}

fn dir(entries: Vec<(&str, TestNode)>) -> TestNode {
    TestNode::Directory(
        entries
            .into_iter()
            .map(|(name, node)| (name.as_bytes().to_vec(), node))
            .collect(),
    )
}

/// A package `name` with `bin/<name>`, as a NAR tree.
fn package(name: &str) -> TestNode {
    dir(vec![(
        "bin",
        dir(vec![(
            name,
            file(true, &format!("#!/bin/sh\necho {name}\n")),
        )]),
    )])
}

/// The same tree for the fake store.
fn fake_tree(node: &TestNode) -> BTreeMap<PathBuf, FakeNode> {
    fn add(out: &mut BTreeMap<PathBuf, FakeNode>, at: PathBuf, node: &TestNode) {
        match node {
            TestNode::Directory(entries) => {
                out.insert(at.clone(), FakeNode::Dir);
                for (name, child) in entries {
                    add(out, at.join(String::from_utf8_lossy(name).as_ref()), child);
                }
            }
            TestNode::File {
                executable,
                contents,
            } => {
                out.insert(
                    at,
                    FakeNode::File {
                        executable: *executable,
                        data: contents.clone(),
                    },
                );
            }
            TestNode::Symlink(target) => {
                out.insert(
                    at,
                    FakeNode::Symlink {
                        target: String::from_utf8_lossy(target).into_owned(),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    add(&mut out, PathBuf::new(), node);
    out
}

fn attribute(name: &str, path: &StorePath) -> ListedAttribute {
    ListedAttribute {
        path: vec![name.to_string()],
        kind: AttributeKind::Drv,
        drv_path: Some(format!(
            "{}.drv",
            testing::store_path(&format!("{name}-drv"))
        )),
        outputs: vec!["out".into()],
        paths: vec![path.as_str().to_string()],
        meta: Default::default(),
    }
}

/// A cache of `bash` and `hello` (which refers to `bash`), its index,
/// and what the same packages are in a fake Nix store.
struct World {
    key: TestKey,
    cache: TestCache,
    index: Vec<ListedAttribute>,
    fake: FakeStore,
}

fn world() -> World {
    let key = testing::test_key();
    let mut cache = TestCache::new();
    let bash = testing::store_path("bash-5.2");
    let hello = testing::store_path("hello-2.12");
    cache.add(&bash, &package("bash"), &[], Compression::Zstd, Some(&key));
    cache.add(
        &hello,
        &package("hello"),
        &[&bash],
        Compression::Xz,
        Some(&key),
    );
    let index = vec![
        attribute("bash", &bash),
        attribute("hello", &hello),
        // In the index, not in the cache.
        attribute("jq", &testing::store_path("jq-1.6")),
        ListedAttribute {
            path: vec!["lib".into()],
            kind: AttributeKind::None,
            drv_path: None,
            outputs: vec![],
            paths: vec![],
            meta: Default::default(),
        },
    ];
    let mut fake = FakeStore::default();
    for (name, path, node, references) in [
        ("bash", &bash, package("bash"), vec![]),
        (
            "hello",
            &hello,
            package("hello"),
            vec![bash.as_str().to_string()],
        ),
    ] {
        fake.paths.insert(
            path.as_str().to_string(),
            FakePath {
                references,
                nodes: fake_tree(&node),
            },
        );
        fake.packages
            .insert(name.to_string(), vec![path.as_str().to_string()]);
    }
    World {
        key,
        cache,
        index,
        fake,
    }
}

fn request(packages: &[&str]) -> BuildRequest {
    BuildRequest {
        source: source(),
        ..crate::builder::tests::request(packages)
    }
}

fn limits() -> BuildLimits {
    crate::config::default_limits()
}

/// Options that give up fast on a failing server.
fn options(limits: &BuildLimits) -> CacheOptions {
    CacheOptions {
        request_timeout: Duration::from_secs(2),
        attempts: 2,
        backoff: Duration::from_millis(10),
        max_nar_size: limits.max_image_size,
        ..CacheOptions::default()
    }
}

/// The index in `storage`, and a cache store over `server`.
async fn cache_store(
    world: &World,
    server: &Server,
    storage: Arc<dyn Storage>,
    limits: &BuildLimits,
) -> Arc<CacheStore> {
    let catalog = Arc::new(Catalog::new(storage));
    catalog
        .write(
            &source(),
            SYSTEM,
            world.index.clone(),
            crate::storage::records::unix_now(),
        )
        .await
        .unwrap();
    let keys = TrustedKeys::parse(&world.key.public_key()).unwrap();
    let client = BinaryCache::new(&server.url(), keys, options(limits)).unwrap();
    Arc::new(CacheStore::new(
        client,
        catalog,
        Arc::new(NoIndexJobs),
        true,
    ))
}

/// A builder with the cache alone (`only`).
async fn only(
    world: &World,
    server: &Server,
    storage: Arc<dyn Storage>,
    limits: BuildLimits,
) -> Builder {
    let store = cache_store(world, server, storage.clone(), &limits).await;
    Builder::new(store, storage, Arc::new(Popularity::none()), limits)
}

/// Nothing half made: no image record, and every blob and manifest
/// stored matches its digest.
fn nothing_partial(storage: &MemoryStorage) {
    for key in storage.keys() {
        match Parsed::of(&key) {
            Some(Parsed::ImageRecord(_)) => panic!("an image record was written: {key}"),
            Some(Parsed::Blob(hex) | Parsed::Manifest(hex)) => {
                let bytes = futures_util::FutureExt::now_or_never(storage.get(&key))
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert_eq!(sha256_digest(&bytes), format!("sha256:{hex}"), "{key}");
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn an_assembled_image_is_byte_for_byte_the_built_one() {
    let world = world();
    let server = Server::start(&world.cache).await;
    let storage = Arc::new(MemoryStorage::new());
    let assembled = only(&world, &server, storage.clone(), limits())
        .await
        .build(&request(&["hello"]), None)
        .await
        .unwrap();
    assert!(assembled.stats.unwrap().assembled);
    let built = Builder::new(
        Arc::new(world.fake),
        Arc::new(MemoryStorage::new()),
        Arc::new(Popularity::none()),
        limits(),
    )
    .build(&request(&["hello"]), None)
    .await
    .unwrap();
    assert!(!built.stats.unwrap().assembled);
    assert_eq!(
        assembled.record.manifest_digest,
        built.record.manifest_digest
    );
}

/// What `only` says when the cache's narinfo of `hello` is `narinfo`
/// (and its NAR `nar`, if given).
async fn only_with(
    world: &mut World,
    change: impl FnOnce(&mut TestCache, &StorePath, &TestKey),
) -> (BuildError, Arc<MemoryStorage>, Vec<String>) {
    let hello = testing::store_path("hello-2.12");
    change(&mut world.cache, &hello, &world.key);
    let server = Server::start(&world.cache).await;
    let storage = Arc::new(MemoryStorage::new());
    let error = only(world, &server, storage.clone(), limits())
        .await
        .build(&request(&["hello"]), None)
        .await
        .unwrap_err();
    nothing_partial(&storage);
    (error, storage, server.requests())
}

/// `hello` again, with `node` as its NAR and the narinfo made by `edit`
/// from the honest one, signed by `key` (if any).
fn replace_hello(
    cache: &mut TestCache,
    hello: &StorePath,
    node: &TestNode,
    key: Option<&TestKey>,
    edit: impl FnOnce(&mut NarInfo),
) {
    let bash = testing::store_path("bash-5.2");
    let mut info = cache.add(hello, node, &[&bash], Compression::None, None);
    edit(&mut info);
    info.signatures.clear();
    if let Some(key) = key {
        info.signatures.push(key.sign(&info));
    }
    cache.files.insert(
        format!("{}.narinfo", hello.hash_part()),
        narinfo_text(&info),
    );
}

fn refused(error: &BuildError) -> String {
    match error.verdict() {
        Verdict::Failed {
            failure: failure @ Failure::CacheRefused { .. },
            ..
        } => failure.to_string(),
        other => panic!("{error}: {other:?}"),
    }
}

#[tokio::test]
async fn an_unsigned_narinfo_is_refused() {
    let mut world = world();
    let (error, _, _) = only_with(&mut world, |cache, hello, _| {
        replace_hello(cache, hello, &package("hello"), None, |_| {})
    })
    .await;
    let message = refused(&error);
    assert!(
        message.contains("hello-2.12") && message.contains("127.0.0.1"),
        "{message}"
    );
}

#[tokio::test]
async fn a_narinfo_signed_by_another_key_is_refused() {
    let mut world = world();
    let (error, _, _) = only_with(&mut world, |cache, hello, _| {
        let stranger = TestKey::new("stranger-1", 9);
        replace_hello(cache, hello, &package("hello"), Some(&stranger), |_| {})
    })
    .await;
    assert!(refused(&error).contains("stranger-1"), "{error}");
}

#[tokio::test]
async fn a_nar_hash_mismatch_with_a_good_file_hash_stores_no_layer_of_it() {
    let mut world = world();
    let (error, storage, _) = only_with(&mut world, |cache, hello, key| {
        // The file is what FileHash says; the NAR in it is not what
        // NarHash says (another NAR of the same size).
        replace_hello(cache, hello, &package("hellp"), Some(key), |info| {
            let honest = testing::nar(&package("hello"));
            info.nar_hash = crate::binary_cache::Sha256Hash::parse(&sha256_nix32(&honest)).unwrap();
        })
    })
    .await;
    assert!(refused(&error).contains("NarHash"), "{error}");
    // No layer of hello's path: no record names it.
    for key in storage.keys() {
        if key.starts_with("layers/") {
            let record: crate::storage::records::LayerRecord =
                serde_json::from_slice(&storage.get(&key).await.unwrap().unwrap()).unwrap();
            let blob = storage
                .get(&crate::storage::keys::BlobKey::of_digest(&record.digest))
                .await
                .unwrap()
                .unwrap();
            let names = layer_names(&blob);
            assert!(!names.iter().any(|n| n.contains("hello")), "{names:?}");
        }
    }
}

fn layer_names(gzip: &[u8]) -> Vec<String> {
    tar::Archive::new(flate2::read::GzDecoder::new(gzip))
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn a_truncated_nar_is_refused() {
    let mut world = world();
    let (error, _, _) = only_with(&mut world, |cache, hello, key| {
        let bash = testing::store_path("bash-5.2");
        let nar = testing::nar(&package("hello"));
        let truncated = nar[..nar.len() - 24].to_vec();
        let text = format!(
            "StorePath: {hello}\nURL: nar/truncated.nar\nCompression: none\nFileHash: {}\n\
             FileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            sha256_nix32(&truncated),
            truncated.len(),
            sha256_nix32(&nar),
            nar.len(),
            bash.base_name()
        );
        let mut info = NarInfo::parse(text.as_bytes(), &NarInfoLimits::default()).unwrap();
        info.signatures.push(key.sign(&info));
        cache.files.insert(
            format!("{}.narinfo", hello.hash_part()),
            narinfo_text(&info),
        );
        cache.files.insert("nar/truncated.nar".into(), truncated);
    })
    .await;
    refused(&error);
}

#[tokio::test]
async fn nar_entries_that_escape_or_repeat_are_refused() {
    let hostile: Vec<(&str, TestNode)> = vec![
        ("dot-dot", dir(vec![("..", file(false, "up"))])),
        (
            "slash",
            TestNode::Directory(vec![(b"a/b".to_vec(), file(false, "x"))]),
        ),
        (
            "duplicate",
            TestNode::Directory(vec![
                (b"bin".to_vec(), file(false, "one")),
                (b"bin".to_vec(), file(false, "two")),
            ]),
        ),
    ];
    for (what, node) in hostile {
        let mut world = world();
        let (error, _, _) = only_with(&mut world, |cache, hello, key| {
            replace_hello(cache, hello, &node, Some(key), |_| {})
        })
        .await;
        let message = refused(&error);
        assert!(message.contains("hello-2.12"), "{what}: {message}");
    }
}

#[tokio::test]
async fn a_references_cycle_is_followed_once_and_a_huge_list_refused() {
    let key = testing::test_key();
    let mut cache = TestCache::new();
    let a = testing::store_path("a-1");
    let b = testing::store_path("b-1");
    cache.add(&a, &package("a"), &[&b], Compression::None, Some(&key));
    cache.add(&b, &package("b"), &[&a], Compression::None, Some(&key));
    let mut world = world();
    world.cache = cache.clone();
    world.index = vec![attribute("a", &a)];
    let server = Server::start(&world.cache).await;
    let storage = Arc::new(MemoryStorage::new());
    let built = only(&world, &server, storage.clone(), limits())
        .await
        .build(&request(&["a"]), None)
        .await
        .unwrap();
    assert!(built.stats.unwrap().layers_new >= 2);

    // A narinfo with more references than any path has (20,000; over
    // the limit of 10,000), signed.
    let honest = cache.add(&a, &package("a"), &[&b], Compression::None, Some(&key));
    let many: Vec<String> = (0..20_000)
        .map(|i| {
            testing::store_path(&format!("dep-{i}"))
                .base_name()
                .to_string()
        })
        .collect();
    let text = String::from_utf8(narinfo_text(&honest)).unwrap().replace(
        &format!("References: {}", b.base_name()),
        &format!("References: {}", many.join(" ")),
    );
    cache
        .files
        .insert(format!("{}.narinfo", a.hash_part()), text.into_bytes());
    world.cache = cache;
    let server = Server::start(&world.cache).await;
    let storage = Arc::new(MemoryStorage::new());
    let error = only(&world, &server, storage.clone(), limits())
        .await
        .build(&request(&["a"]), None)
        .await
        .unwrap_err();
    assert!(
        refused(&error).contains("References lists 20000 paths"),
        "{error}"
    );
    nothing_partial(&storage);
}

#[tokio::test]
async fn an_image_over_the_size_limit_is_refused_before_any_nar_is_fetched() {
    let world = world();
    let server = Server::start(&world.cache).await;
    let storage = Arc::new(MemoryStorage::new());
    let small = BuildLimits {
        max_image_size: 100,
        ..limits()
    };
    let error = only(&world, &server, storage.clone(), small)
        .await
        .build(&request(&["hello"]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, BuildError::TooLarge { limit: 100, .. }),
        "{error}"
    );
    assert!(
        server.requests().iter().all(|r| !r.contains("nar/")),
        "{:?}",
        server.requests()
    );
    nothing_partial(&storage);
}

#[tokio::test]
async fn a_failing_cache_is_retried_then_built_with_first_and_unavailable_with_only() {
    let world = world();
    let server = Server::start(&world.cache).await;
    server.fail(1000, 503);
    let storage = Arc::new(MemoryStorage::new());
    let error = only(&world, &server, storage.clone(), limits())
        .await
        .build(&request(&["hello"]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.verdict(),
            Verdict::Failed {
                failure: Failure::CacheUnavailable { .. },
                ..
            }
        ),
        "{error}"
    );
    // Each narinfo was asked for more than once.
    let asked = server.requests().len();
    assert!(asked >= 2, "{asked}");
    nothing_partial(&storage);

    // With `first`, the next source builds it.
    built_with_first(world, &server).await;
}

/// With `first` over `server`, hello is built by the fake store (realised
/// once), not assembled.
async fn built_with_first(world: World, server: &Server) {
    let storage = Arc::new(MemoryStorage::new());
    let store = cache_store(&world, server, storage.clone(), &limits()).await;
    let fake = Arc::new(world.fake);
    let built = Builder::new(
        fake.clone(),
        storage,
        Arc::new(Popularity::none()),
        limits(),
    )
    .trying_first(store)
    .build(&request(&["hello"]), None)
    .await
    .unwrap();
    assert!(!built.stats.unwrap().assembled);
    assert_eq!(fake.realised.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_nar_cut_off_mid_body_is_unavailable_with_only_and_built_with_first() {
    let world = world();
    let server = Server::start(&world.cache).await;
    *server.state.cut_after.lock().unwrap() = Some(40);
    let storage = Arc::new(MemoryStorage::new());
    let error = only(&world, &server, storage.clone(), limits())
        .await
        .build(&request(&["hello"]), None)
        .await
        .unwrap_err();
    match error.verdict() {
        Verdict::Failed {
            failure: Failure::CacheUnavailable { .. },
            ..
        } => {}
        other => panic!("{error}: {other:?}"),
    }
    nothing_partial(&storage);

    // With `first`, the next source builds it.
    built_with_first(world, &server).await;
}

#[tokio::test]
async fn an_assembly_given_up_stops_its_download() {
    let world = world();
    let server = Server::start(&world.cache).await;
    // The first bytes, then one byte every 50 ms: seconds for the NAR.
    *server.state.trickle.lock().unwrap() = Some((10, Duration::from_millis(50)));
    let storage = Arc::new(MemoryStorage::new());
    let builder = only(&world, &server, storage.clone(), limits()).await;
    let request = request(&["hello"]);
    let building = builder.build(&request, None);
    // Whoever wanted the image gave up while a NAR downloads.
    assert!(tokio::time::timeout(Duration::from_millis(500), building)
        .await
        .is_err());
    assert!(
        server
            .state
            .bodies
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    );
    let mut stopped = false;
    for _ in 0..100 {
        if server
            .state
            .bodies
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopped, "the NAR is still downloading for nobody");
    nothing_partial(&storage);
}

/// The registry in `only` mode over the cache: what a client sees.
#[tokio::test]
async fn clients_see_each_refusal_as_a_clear_error() {
    let mut world = world();
    let bash = testing::store_path("bash-5.2");
    // A second image whose narinfo is unsigned.
    let unsigned = testing::store_path("unsigned-1");
    world.cache.add(
        &unsigned,
        &package("unsigned"),
        &[&bash],
        Compression::None,
        None,
    );
    world.index.push(attribute("unsigned", &unsigned));
    let server = Server::start(&world.cache).await;
    let storage = Arc::new(MemoryStorage::new());
    Catalog::new(storage.clone())
        .write(
            &source(),
            SYSTEM,
            world.index.clone(),
            crate::storage::records::unix_now(),
        )
        .await
        .unwrap();
    let mut config = crate::config::defaults();
    config.source = PackageSource::Path("/pkgs".into());
    config.images.implicit_packages = vec![];
    let nix = NixConfig {
        timeout: Duration::from_secs(10),
        popularity_url: None,
        limits: limits(),
    };
    config.assembly = Some((
        CacheConfig {
            substituter: server.url(),
            trusted_keys: world.key.public_key(),
            mode: FromCache::Only,
        },
        nix,
    ));
    let parts = Parts {
        storage: Some(storage.clone()),
        dispatch: None,
    };
    let router = App::with(&config, false, parts).await.unwrap().router();
    let get = |path: &'static str| {
        let router = router.clone();
        async move {
            let response = router
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            (status, body)
        }
    };
    let (status, _) = get("/v2/hello/manifests/latest").await;
    assert_eq!(status, StatusCode::OK);
    for (path, want, says) in [
        (
            "/v2/nope/manifests/latest",
            StatusCode::NOT_FOUND,
            "unknown packages: nope",
        ),
        (
            "/v2/lib/manifests/latest",
            StatusCode::NOT_FOUND,
            "unknown packages: lib",
        ),
        (
            "/v2/jq/manifests/latest",
            StatusCode::NOT_FOUND,
            "jq-1.6 is not in the binary cache",
        ),
        (
            "/v2/unsigned/manifests/latest",
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsigned-1",
        ),
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, want, "{path}: {body}");
        let message = body["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{path}: {message}");
    }
    server.fail(1000, 500);
    let (status, body) = get("/v2/hello/bash/manifests/latest").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("unavailable"));
}

/// A binary cache URL with credentials (`https://user:token@host/...`)
/// is shown without them where the registry logs its settings.
#[tokio::test]
async fn a_cache_password_in_its_url_never_reaches_the_log() {
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let world = world();
    let server = Server::start(&world.cache).await;
    let storage = Arc::new(MemoryStorage::new());
    let mut config = crate::config::defaults();
    config.source = PackageSource::Path("/pkgs".into());
    config.images.implicit_packages = vec![];
    let nix = NixConfig {
        timeout: Duration::from_secs(10),
        popularity_url: None,
        limits: limits(),
    };
    let with_secret = server
        .url()
        .replace("http://", "http://alice:cache-s3cret-token@");
    config.assembly = Some((
        CacheConfig {
            substituter: with_secret,
            trusted_keys: world.key.public_key(),
            mode: FromCache::Only,
        },
        nix,
    ));
    let parts = Parts {
        storage: Some(storage.clone()),
        dispatch: None,
    };
    let _app = App::with(&config, false, parts).await.unwrap();
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("assembled from the binary cache"),
        "the start was not logged: {log}"
    );
    assert!(
        !log.contains("cache-s3cret-token"),
        "the cache's password is in the log:\n{log}"
    );
}

/// A layer is found again by its store paths and their NarHashes: an
/// image assembled from the cache never reuses a layer a Nix build packed
/// from other bytes of the same paths (a build that is not reproducible,
/// or a tampered store), so it holds only bytes the cache signed.
#[tokio::test]
async fn an_assembled_image_never_reuses_a_layer_of_other_bytes_of_its_paths() {
    let mut world = world();
    let hello = testing::store_path("hello-2.12");
    let other_bytes = dir(vec![(
        "bin",
        dir(vec![(
            "hello",
            file(true, "#!/bin/sh\necho unsigned-bytes\n"),
        )]),
    )]);
    world.fake.paths.get_mut(hello.as_str()).unwrap().nodes = fake_tree(&other_bytes);
    // A third package, so that the assembled image is another image.
    let extra = testing::store_path("extra-1");
    world.cache.add(
        &extra,
        &package("extra"),
        &[],
        Compression::Zstd,
        Some(&world.key),
    );
    world.index.push(attribute("extra", &extra));
    let storage = Arc::new(MemoryStorage::new());
    let server = Server::start(&world.cache).await;
    let assembler = only(&world, &server, storage.clone(), limits()).await;
    // A build with Nix of `hello` (the same store paths) into the same bucket.
    Builder::new(
        Arc::new(world.fake),
        storage.clone(),
        Arc::new(Popularity::none()),
        limits(),
    )
    .build(&request(&["bash", "hello"]), None)
    .await
    .unwrap();
    // Then a pull of another image with hello, assembled from the cache.
    let assembled = assembler
        .build(&request(&["bash", "extra", "hello"]), None)
        .await
        .unwrap();
    assert!(assembled.stats.unwrap().assembled);
    let manifest = storage
        .get(&crate::storage::keys::ManifestKey::of_digest(
            &assembled.record.manifest_digest,
        ))
        .await
        .unwrap()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let blob = storage
            .get(&crate::storage::keys::BlobKey::of_digest(digest))
            .await
            .unwrap()
            .unwrap();
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar).unwrap();
        assert!(
            !tar.windows(14).any(|w| w == b"unsigned-bytes"),
            "layer {digest} of an image assembled from the signed cache holds bytes the cache never signed ({:?})",
            layer_names(&blob)
        );
    }
}
