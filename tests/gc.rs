//! `nixery gc` on the filesystem and on S3 (s3s-fs): a storage with images
//! used and unused, objects shared between them, SBOMs and their
//! referrers, a multi-platform index whose platforms' own records expired,
//! a build under way, a layer a build is reusing, a config a build holds,
//! leftovers and a damaged record. Objects are
//! aged by setting their files' modification times (s3s-fs reports a
//! file's as the object's). A dry run deletes nothing; a real run deletes
//! exactly the garbage; afterwards every image record's objects are there
//! and match their digests; and the `nixery gc` command says the same.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::s3::{S3Server, BUCKET};
use nixery::gc::{collect, GcSettings};
use nixery::oci::digest::{hex_of, sha256_digest};
use nixery::oci::manifest::{
    Descriptor, ImageIndex, Manifest, Platform, MEDIA_TYPE_CONFIG, MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_INDEX, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_MANIFEST,
};
use nixery::storage::keys::{
    BlobKey, HoldKey, ImageKey, ImageRecordKey, IndexKey, IndexRecordKey, LayerKey, LayerRecordKey,
    ManifestKey, ReferrersKey, ServedKey,
};
use nixery::storage::records::{self, unix_now, ImageRecord, LayerRecord};
use nixery::storage::{FsStorage, Intercepted, Op, S3Storage, Storage, StorageError};

const DAY: u64 = 86_400;

// Keys of the layout for readable names: each name stands for the
// identity that is its hash.
fn image_key(name: &str) -> String {
    ImageRecordKey::of(&ImageKey::hash_of(name.as_bytes())).to_string()
}
fn index_record_key(name: &str) -> String {
    IndexRecordKey::of(&IndexKey::hash_of(name.as_bytes())).to_string()
}
fn served_key(name: &str) -> String {
    ServedKey::of(ImageKey::hash_of(name.as_bytes()).as_str()).to_string()
}
fn layer_key(name: &str) -> String {
    LayerRecordKey::of(&LayerKey::hash_of(name.as_bytes())).to_string()
}
fn blob_key(hex: &str) -> String {
    BlobKey::of(hex).to_string()
}
fn manifest_key(hex: &str) -> String {
    ManifestKey::of(hex).to_string()
}
fn referrers_key(hex: &str) -> String {
    ReferrersKey::of(hex).to_string()
}
fn hold_key(object: &str) -> String {
    HoldKey::on(object).unwrap().to_string()
}

fn settings(dry_run: bool) -> GcSettings {
    GcSettings {
        unused_for: Duration::from_secs(30 * DAY),
        grace: Duration::from_secs(DAY),
        dry_run,
    }
}

/// Where a backend keeps an object's file, to age it.
struct Files {
    root: PathBuf,
}

impl Files {
    fn age(&self, key: &str, seconds: u64) {
        let path = self.root.join(key);
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(seconds))
            .unwrap();
    }
}

async fn put(storage: &dyn Storage, key: &str, bytes: &[u8]) {
    storage
        .put(key, Bytes::copy_from_slice(bytes))
        .await
        .unwrap();
}

/// A blob; its key.
async fn blob(storage: &dyn Storage, content: &str) -> String {
    let key = blob_key(hex_of(&sha256_digest(content.as_bytes())));
    put(storage, &key, content.as_bytes()).await;
    key
}

/// An image of the given layer contents: blobs, layer records, config,
/// manifest and record. Every key written, record last.
async fn image(storage: &dyn Storage, name: &str, layers: &[&str]) -> Vec<String> {
    let mut keys = Vec::new();
    let mut descriptors = Vec::new();
    for content in layers {
        keys.push(blob(storage, content).await);
        let descriptor = Descriptor::of(MEDIA_TYPE_LAYER_GZIP, content.as_bytes());
        let record_key = layer_key(&format!("layer-{content}"));
        let record = LayerRecord {
            digest: descriptor.digest.clone(),
            diff_id: descriptor.digest.clone(),
            size: descriptor.size,
            media_type: MEDIA_TYPE_LAYER_GZIP.to_string(),
        };
        records::write(storage, &record_key, &record).await.unwrap();
        keys.push(record_key);
        descriptors.push(descriptor);
    }
    let config = format!("{{\"config of\":\"{name}\"}}");
    keys.push(blob(storage, &config).await);
    let manifest = Manifest::new(
        Descriptor::of(MEDIA_TYPE_CONFIG, config.as_bytes()),
        descriptors,
    )
    .to_bytes();
    let digest = sha256_digest(&manifest);
    let manifest_key = manifest_key(hex_of(&digest));
    put(storage, &manifest_key, &manifest).await;
    keys.push(manifest_key);
    let record = ImageRecord {
        manifest_digest: digest,
        media_type: nixery::oci::manifest::MEDIA_TYPE_MANIFEST.to_string(),
        size: manifest.len() as u64,
        packages: vec![name.to_string()],
        architecture: "amd64".to_string(),
        built_at: unix_now() - 40 * DAY,
        sbom: None,
    };
    let record_key = image_key(name);
    records::write(storage, &record_key, &record).await.unwrap();
    keys.push(record_key);
    keys
}

/// An SBOM of the image whose keys are `image` (record last), as a build
/// stores it: document, empty config, artifact manifest, the referrers
/// index; the record names it. The keys written.
async fn sbom(storage: &dyn Storage, image: &[String]) -> Vec<String> {
    let record_key = image.last().unwrap();
    let mut record: ImageRecord = records::read(storage, record_key).await.unwrap().unwrap();
    let document = format!("{{\"spdx of\":\"{record_key}\"}}");
    let mut keys = vec![blob(storage, &document).await, blob(storage, "{}").await];
    let artifact = Manifest {
        artifact_type: Some("application/spdx+json".into()),
        subject: Some(Descriptor {
            media_type: MEDIA_TYPE_MANIFEST.into(),
            digest: record.manifest_digest.clone(),
            size: record.size,
            platform: None,
            artifact_type: None,
        }),
        ..Manifest::new(
            Descriptor::of(MEDIA_TYPE_EMPTY, b"{}"),
            vec![Descriptor::of("application/spdx+json", document.as_bytes())],
        )
    }
    .to_bytes();
    let digest = sha256_digest(&artifact);
    let artifact_key = manifest_key(hex_of(&digest));
    put(storage, &artifact_key, &artifact).await;
    let referrers_key = referrers_key(hex_of(&record.manifest_digest));
    let index = ImageIndex::new(vec![Descriptor {
        artifact_type: Some("application/spdx+json".into()),
        ..Descriptor::of(MEDIA_TYPE_MANIFEST, &artifact)
    }]);
    put(storage, &referrers_key, &index.to_bytes()).await;
    record.sbom = Some(digest);
    records::write(storage, record_key, &record).await.unwrap();
    keys.extend([artifact_key, referrers_key]);
    keys
}

async fn keys(storage: &dyn Storage) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for dir in [
        "blobs/",
        "manifests/",
        "layers/",
        "images/",
        "indexes/",
        "referrers/",
        "served/",
        "staging/",
        "builds/",
        "sources/",
        "holds/",
    ] {
        all.extend(storage.list(dir).await.unwrap().into_iter().map(|o| o.key));
    }
    all
}

/// The manifest `digest` names, checked against it.
async fn manifest_of(storage: &dyn Storage, digest: &str, whose: &str) -> Vec<u8> {
    let bytes = storage
        .get(&manifest_key(hex_of(digest)))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{whose}: manifest {digest} gone"));
    assert_eq!(sha256_digest(&bytes), digest);
    bytes.to_vec()
}

/// After a collection: every image record's manifest and blobs are there
/// and match their digests; so is every manifest an index record lists,
/// and every artifact a referrers index lists.
async fn nothing_lost(storage: &dyn Storage) {
    for index in storage.list("indexes/").await.unwrap() {
        let record: ImageRecord = records::read(storage, &index.key).await.unwrap().unwrap();
        let bytes = manifest_of(storage, &record.manifest_digest, &index.key).await;
        let listed: ImageIndex = serde_json::from_slice(&bytes).unwrap();
        for entry in listed.manifests {
            let manifest = manifest_of(storage, &entry.digest, &index.key).await;
            let manifest: Manifest = serde_json::from_slice(&manifest).unwrap();
            for descriptor in manifest.layers.iter().chain([&manifest.config]) {
                let key = blob_key(hex_of(&descriptor.digest));
                assert!(
                    storage.head(&key).await.unwrap().is_some(),
                    "{}: {key} gone",
                    index.key
                );
            }
        }
    }
    for referrers in storage.list("referrers/").await.unwrap() {
        let bytes = storage.get(&referrers.key).await.unwrap().unwrap();
        let listed: ImageIndex = serde_json::from_slice(&bytes).unwrap();
        for entry in listed.manifests {
            manifest_of(storage, &entry.digest, &referrers.key).await;
        }
    }
    for image in storage.list("images/").await.unwrap() {
        let Ok(Some(record)) = records::read::<ImageRecord>(storage, &image.key).await else {
            continue;
        };
        let manifest = manifest_of(storage, &record.manifest_digest, &image.key).await;
        let manifest: Manifest = serde_json::from_slice(&manifest).unwrap();
        for descriptor in manifest.layers.iter().chain([&manifest.config]) {
            let bytes = storage
                .get(&blob_key(hex_of(&descriptor.digest)))
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{}: blob {} gone", image.key, descriptor.digest));
            assert_eq!(sha256_digest(&bytes), descriptor.digest);
        }
    }
}

/// The scenario; the keys it expects collected.
async fn scenario(storage: &dyn Storage, files: &Files) -> BTreeSet<String> {
    let old = 40 * DAY;
    // Image "used": built long ago, served today. Shares a layer with
    // "unused", which nobody pulled for 40 days.
    let used = image(storage, "used", &["shared", "used-only"]).await;
    let unused = image(storage, "unused", &["shared", "unused-only"]).await;
    put(storage, &served_key("used"), b"{}").await;
    put(storage, &served_key("unused"), b"{}").await;
    let unused_sbom = sbom(storage, &unused).await;
    let used_sbom = sbom(storage, &used).await;
    for key in used.iter().chain(&unused).chain(&used_sbom) {
        files.age(key, old);
    }
    // The SBOM's empty config is shared with the used image's SBOM.
    let empty = blob_key(hex_of(&sha256_digest(b"{}")));
    for key in unused_sbom.iter().filter(|k| **k != empty) {
        files.age(key, old);
    }
    files.age(&served_key("unused"), old);

    // A multi-platform index pulled today, whose platforms' own records
    // nobody pulled for 40 days: the records go, the index keeps the
    // platforms' manifests, blobs and SBOMs.
    let mut platforms = Vec::new();
    let mut descriptors = Vec::new();
    for name in ["multi-amd64", "multi-arm64"] {
        let keys = image(storage, name, &[name]).await;
        let sbom_keys = sbom(storage, &keys).await;
        let record: ImageRecord = records::read(storage, keys.last().unwrap())
            .await
            .unwrap()
            .unwrap();
        let manifest = storage
            .get(&manifest_key(hex_of(&record.manifest_digest)))
            .await
            .unwrap()
            .unwrap();
        descriptors.push(Descriptor {
            platform: Some(Platform::linux(&name[6..])),
            ..Descriptor::of(MEDIA_TYPE_MANIFEST, &manifest)
        });
        for key in keys.iter().chain(&sbom_keys).filter(|k| **k != empty) {
            files.age(key, old);
        }
        platforms.push(keys.last().unwrap().clone());
    }
    let index = ImageIndex::new(descriptors).to_bytes();
    let index_digest = sha256_digest(&index);
    let index_manifest = manifest_key(hex_of(&index_digest));
    put(storage, &index_manifest, &index).await;
    let index_record = index_record_key("multi");
    let record = ImageRecord {
        manifest_digest: index_digest,
        media_type: MEDIA_TYPE_INDEX.into(),
        size: index.len() as u64,
        packages: vec!["multi".into()],
        architecture: "amd64,arm64".into(),
        built_at: unix_now() - 40 * DAY,
        sbom: None,
    };
    records::write(storage, &index_record, &record)
        .await
        .unwrap();
    put(storage, &served_key("multi"), b"{}").await;
    for key in [&index_manifest, &index_record] {
        files.age(key, old);
    }

    // A build under way: its layer and manifest are written, its record
    // is not yet.
    let building = image(storage, "building", &["in-flight"]).await;
    storage.delete(&image_key("building")).await.unwrap();
    // A build reusing an old layer nothing names any more: it rewrote the
    // layer's record a moment ago.
    let reused_blob = blob(storage, "reused").await;
    files.age(&reused_blob, old);
    let reused_record = layer_key("layer-reused");
    records::write(
        storage,
        &reused_record,
        &LayerRecord {
            digest: sha256_digest(b"reused"),
            diff_id: sha256_digest(b"reused"),
            size: 6,
            media_type: MEDIA_TYPE_LAYER_GZIP.to_string(),
        },
    )
    .await
    .unwrap();

    // A build under way relies on an old config nothing names (stored
    // before, so not written again): it held it a moment ago. An old hold
    // is a leftover of a build long over.
    let held = blob(storage, "held-config").await;
    files.age(&held, old);
    put(storage, &hold_key(&held), b"{}").await;
    let old_hold = HoldKey::of(&"0".repeat(64)).to_string();
    put(storage, &old_hold, b"{}").await;
    files.age(&old_hold, 2 * DAY);

    // Leftovers, old and young; a blob nothing names, old and young.
    for (key, age) in [
        ("staging/put-old", 2 * DAY),
        ("staging/put-new", 3600),
        ("builds/abc", 2 * DAY),
        ("builds/abc.1", 2 * DAY),
        ("builds/def", 60),
        ("sources/old-answer", 3 * DAY),
    ] {
        put(storage, key, b"{}").await;
        files.age(key, age);
    }
    let orphan_old = blob(storage, "orphan-old").await;
    files.age(&orphan_old, 2 * DAY);
    let orphan_young = blob(storage, "orphan-young").await;
    files.age(&orphan_young, 3600);

    // A damaged record of a recent image: kept, reported.
    put(storage, &image_key("damaged"), b"{not json").await;
    files.age(&image_key("damaged"), DAY);

    let _ = (building, orphan_young);
    let shared = blob_key(hex_of(&sha256_digest(b"shared")));
    unused
        .into_iter()
        .chain(unused_sbom.into_iter().filter(|k| *k != empty))
        .filter(|k| *k != shared && *k != layer_key("layer-shared"))
        .chain(platforms)
        .chain([
            served_key("unused"),
            "staging/put-old".to_string(),
            "builds/abc".to_string(),
            "builds/abc.1".to_string(),
            "sources/old-answer".to_string(),
            orphan_old,
            old_hold,
        ])
        .collect()
}

async fn collects_exactly_the_garbage(storage: &dyn Storage, files: &Files) {
    let expected = scenario(storage, files).await;
    let before = keys(storage).await;
    assert!(expected.is_subset(&before));

    let dry = collect(storage, &settings(true), unix_now()).await.unwrap();
    let would: BTreeSet<String> = dry.deleted.iter().map(|o| o.key.clone()).collect();
    assert_eq!(would, expected, "the dry run's list");
    assert_eq!(keys(storage).await, before, "a dry run deleted something");
    assert_eq!(dry.images_expired, 3);
    assert_eq!(dry.unreadable, [image_key("damaged")]);

    let real = collect(storage, &settings(false), unix_now())
        .await
        .unwrap();
    let deleted: BTreeSet<String> = real.deleted.iter().map(|o| o.key.clone()).collect();
    assert_eq!(deleted, expected);
    assert_eq!(real.bytes(), dry.bytes());
    let after = keys(storage).await;
    assert_eq!(after, before.difference(&expected).cloned().collect());
    nothing_lost(storage).await;

    // A second run finds nothing more.
    let again = collect(storage, &settings(false), unix_now())
        .await
        .unwrap();
    assert!(again.deleted.is_empty(), "{:?}", again.deleted);
}

#[tokio::test]
async fn filesystem() {
    let root = tempfile::tempdir().unwrap();
    let storage = FsStorage::open(root.path()).unwrap();
    let files = Files {
        root: root.path().to_path_buf(),
    };
    collects_exactly_the_garbage(&storage, &files).await;
}

#[tokio::test]
async fn s3() {
    let server = S3Server::start();
    let storage = S3Storage::new(
        server.client().await,
        BUCKET,
        "/gc/",
        Duration::from_secs(600),
    );
    let files = Files {
        root: server.root.join(BUCKET).join("gc"),
    };
    collects_exactly_the_garbage(&storage, &files).await;
}

#[test]
fn the_command_prints_what_it_deletes() {
    let root = tempfile::tempdir().unwrap();
    let files = Files {
        root: root.path().to_path_buf(),
    };
    let expected = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let storage = FsStorage::open(root.path()).unwrap();
        scenario(&storage, &files).await
    });
    let gc = |extra: &[&str]| {
        common::run(
            std::process::Command::new(env!("CARGO_BIN_EXE_nixery"))
                .arg("gc")
                .args(extra)
                .env("STORAGE_PATH", root.path())
                .env("RUST_LOG", "warn"),
        )
    };
    let dry = gc(&["--dry-run", "--unused-for", "30d", "--grace", "1d"]);
    for key in &expected {
        assert!(
            dry.contains(&format!("would delete {key} (")),
            "{key} in {dry}"
        );
    }
    assert!(
        dry.contains(&format!("would delete {} of ", expected.len())),
        "{dry}"
    );
    assert!(root.path().join(expected.first().unwrap()).exists());
    let real = gc(&[]);
    assert!(
        real.contains(&format!("deleted {} of ", expected.len())),
        "{real}"
    );
    assert!(!root.path().join(expected.first().unwrap()).exists());
}

/// Filesystem storage where a build rewrites some objects (to reuse them)
/// at the moment the collection starts deleting: after its listing. The
/// objects are those in the second value when that moment comes.
fn reused_midway(inner: FsStorage) -> (Intercepted, Arc<Mutex<Vec<String>>>) {
    let inner = Arc::new(inner);
    let reuse: Arc<Mutex<Vec<String>>> = Arc::default();
    let (fs, pending) = (inner.clone(), reuse.clone());
    let storage = Intercepted::new_async(inner, move |op, _| {
        let reused = match op {
            Op::Delete => std::mem::take(&mut *pending.lock().unwrap()),
            _ => Vec::new(),
        };
        let fs = fs.clone();
        Box::pin(async move {
            for key in reused {
                let bytes = fs.get(&key).await?.unwrap();
                fs.put(&key, bytes).await?;
            }
            Ok(())
        })
    });
    (storage, reuse)
}

#[tokio::test]
async fn what_a_build_reuses_after_the_listing_is_kept() {
    let root = tempfile::tempdir().unwrap();
    let files = Files {
        root: root.path().to_path_buf(),
    };
    let (storage, reuse) = reused_midway(FsStorage::open(root.path()).unwrap());
    let expected = scenario(&storage, &files).await;
    // A build of another image reuses the unused image's own layer (its
    // record rewritten) and its manifest, right after the listing.
    let layer_record = layer_key("layer-unused-only");
    let layer_blob = blob_key(hex_of(&sha256_digest(b"unused-only")));
    let manifest = expected
        .iter()
        .find(|k| k.starts_with("manifests/"))
        .unwrap()
        .clone();
    *reuse.lock().unwrap() = vec![layer_record.clone(), manifest.clone()];

    let report = collect(&storage, &settings(false), unix_now())
        .await
        .unwrap();
    let rescued: BTreeSet<String> = report.rescued.iter().cloned().collect();
    let kept = BTreeSet::from([layer_record, layer_blob, manifest]);
    assert_eq!(rescued, kept);
    let deleted: BTreeSet<String> = report.deleted.iter().map(|o| o.key.clone()).collect();
    assert_eq!(deleted, expected.difference(&kept).cloned().collect());
    let left = keys(&storage).await;
    assert!(kept.is_subset(&left));
}

/// Filesystem storage that refuses to say when objects under `prefix`
/// were written (or, with `refuse_delete`, to delete them), as S3 answers
/// a role without the right (403): once the second value is set, not
/// while the scenario is set up.
fn refusing(
    inner: FsStorage,
    prefix: &'static str,
    refuse_delete: bool,
) -> (Intercepted, Arc<AtomicBool>) {
    let armed = Arc::new(AtomicBool::new(false));
    let refusing = armed.clone();
    let storage = Intercepted::new(Arc::new(inner), move |op, key| {
        let operation = match op {
            Op::Delete if refuse_delete => "DeleteObject",
            Op::Modified if !refuse_delete => "HeadObject",
            _ => return Ok(()),
        };
        if refusing.load(Ordering::Relaxed) && key.starts_with(prefix) {
            return Err(StorageError::Backend {
                key: key.to_string(),
                operation,
                message: "AccessDenied (injected)".to_string(),
            });
        }
        Ok(())
    });
    (storage, armed)
}

#[tokio::test]
async fn an_object_gc_cannot_look_at_is_kept_and_the_rest_still_goes() {
    let root = tempfile::tempdir().unwrap();
    let files = Files {
        root: root.path().to_path_buf(),
    };
    let (storage, armed) = refusing(FsStorage::open(root.path()).unwrap(), "served/", false);
    let expected = scenario(&storage, &files).await;
    armed.store(true, Ordering::Relaxed);
    let report = collect(&storage, &settings(false), unix_now())
        .await
        .expect("one object it cannot look at does not stop the collection");
    let refused = served_key("unused");
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.failed[0].0, refused);
    let deleted: BTreeSet<String> = report.deleted.iter().map(|o| o.key.clone()).collect();
    let mut rest = expected.clone();
    rest.remove(&refused);
    assert_eq!(deleted, rest);
    nothing_lost(&storage).await;
}

#[tokio::test]
async fn an_image_record_gc_cannot_delete_keeps_everything_it_names() {
    let root = tempfile::tempdir().unwrap();
    let files = Files {
        root: root.path().to_path_buf(),
    };
    let (storage, armed) = refusing(FsStorage::open(root.path()).unwrap(), "images/", true);
    scenario(&storage, &files).await;
    armed.store(true, Ordering::Relaxed);
    let before = keys(&storage).await;
    // The collection counted on the expired records being gone: it stops.
    assert!(collect(&storage, &settings(false), unix_now())
        .await
        .is_err());
    let after = keys(&storage).await;
    assert!(
        after
            .iter()
            .all(|k| !k.starts_with("blobs/") || before.contains(k))
            && before
                .iter()
                .filter(|k| k.starts_with("blobs/") || k.starts_with("manifests/"))
                .all(|k| after.contains(k)),
        "gc deleted what a record it could not delete names"
    );
    nothing_lost(&storage).await;
}
