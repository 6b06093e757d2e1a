//! The builder's policies, in process, on a fake source of store paths
//! and in-memory storage: the order of writes, layer reuse, a full disk,
//! the keys and the verdicts. Milliseconds each; no Nix.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::fake::{store_path, FakeStore};
use super::*;
use crate::source::SourceArg;
use crate::storage::keys::{BlobKey, ManifestKey, Parsed};
use crate::storage::{Intercepted, MemoryStorage};

/// Memory storage that notes every key written, in order.
fn recording() -> (Arc<Intercepted>, Arc<Mutex<Vec<String>>>) {
    let writes = Arc::new(Mutex::new(Vec::new()));
    let noted = writes.clone();
    let storage = Intercepted::new(Arc::new(MemoryStorage::new()), move |op, key| {
        if op.writes() {
            noted.lock().unwrap().push(key.to_string());
        }
        Ok(())
    });
    (Arc::new(storage), writes)
}

fn store() -> FakeStore {
    FakeStore::default()
        .with_package("busybox", &[])
        .with_package("bash", &["busybox"])
        .with_package("hello", &["bash"])
        .with_package("jq", &["bash"])
}

fn limits() -> BuildLimits {
    crate::config::default_limits()
}

pub(crate) fn request(packages: &[&str]) -> BuildRequest {
    BuildRequest {
        packages: packages.iter().map(|p| p.to_string()).collect(),
        system: "x86_64-linux".into(),
        architecture: "amd64".into(),
        source: SourceArg::Path {
            path: "/pkgs".into(),
        },
        layer_budget: 94,
        implicit: vec![],
        not_before: 0,
        compression: Compression::Gzip,
        name: packages.join("/"),
        tag: "latest".into(),
        config: None,
    }
}

fn builder(store: Arc<FakeStore>, storage: Arc<dyn Storage>, limits: BuildLimits) -> Builder {
    Builder::new(store, storage, Arc::new(Popularity::none()), limits)
}

#[tokio::test]
async fn the_image_record_is_written_last_after_everything_it_names() {
    let (storage, writes) = recording();
    let builder = builder(Arc::new(store()), storage.clone(), limits());
    let built = builder.build(&request(&["hello"]), None).await.unwrap();
    let writes = writes.lock().unwrap().clone();
    let last = writes.last().unwrap();
    assert_eq!(
        Parsed::of(last),
        Some(Parsed::ImageRecord(request(&["hello"]).image_key())),
        "{writes:#?}"
    );
    // Everything the record names was there before it.
    let manifest = storage
        .inner()
        .get(&ManifestKey::of_digest(&built.record.manifest_digest))
        .await
        .unwrap()
        .unwrap();
    let manifest: crate::oci::manifest::Manifest = serde_json::from_slice(&manifest).unwrap();
    let before = &writes[..writes.len() - 1];
    for digest in manifest
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&manifest.config.digest])
    {
        let key = BlobKey::of_digest(digest).to_string();
        assert!(before.contains(&key), "{key} written after the record");
    }
    let stats = built.stats.unwrap();
    // busybox, bash, hello in layers of their own (no popularity data:
    // each path its own layer within the budget), and the customisation.
    assert_eq!(stats.layers_new, manifest.layers.len());
    assert_eq!(stats.layers_reused, 0);
}

#[tokio::test]
async fn layers_another_image_shares_are_reused_not_packed_again() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let fake = Arc::new(store());
    // Popular paths get layers of their own, which images share.
    let popular = [("bash", 1000), ("busybox", 1000)]
        .into_iter()
        .map(|(name, n)| (name.to_string(), n))
        .collect();
    let builder = Builder::new(
        fake.clone(),
        storage.clone(),
        Arc::new(Popularity::from_counts(popular)),
        limits(),
    );
    let first = builder.build(&request(&["hello"]), None).await.unwrap();
    let packed = fake.packed.load(Ordering::SeqCst);
    let second = builder.build(&request(&["jq"]), None).await.unwrap();
    let stats = second.stats.unwrap();
    // bash and busybox are shared; jq and the customisation layer are new.
    assert_eq!(stats.layers_reused, 2, "{stats:?}");
    assert_eq!(stats.layers_new, 2, "{stats:?}");
    assert!(fake.packed.load(Ordering::SeqCst) - packed <= 3);
    assert_ne!(first.record.manifest_digest, second.record.manifest_digest);
    // A current image is not built again.
    let again = builder.build(&request(&["jq"]), None).await.unwrap();
    assert!(again.stats.is_none());
    assert_eq!(again.record, second.record);
}

#[tokio::test]
async fn the_same_request_gives_the_same_manifest_from_empty_storage() {
    let one = builder(Arc::new(store()), Arc::new(MemoryStorage::new()), limits());
    let two = builder(Arc::new(store()), Arc::new(MemoryStorage::new()), limits());
    let a = one.build(&request(&["hello", "jq"]), None).await.unwrap();
    let b = two.build(&request(&["hello", "jq"]), None).await.unwrap();
    assert_eq!(a.record.manifest_digest, b.record.manifest_digest);
}

#[tokio::test]
async fn a_full_disk_is_collected_and_tried_once_more() {
    let fake = Arc::new(store());
    fake.disk_full.store(1, Ordering::SeqCst);
    fake.free.store(10, Ordering::SeqCst);
    let limits = BuildLimits {
        min_free: 1000,
        ..limits()
    };
    let builder = builder(fake.clone(), Arc::new(MemoryStorage::new()), limits);
    builder.build(&request(&["hello"]), None).await.unwrap();
    assert_eq!(fake.realised.load(Ordering::SeqCst), 2);
    // Collected before the build (the disk was low) and after it filled.
    let collected = fake.collected.lock().unwrap().clone();
    assert_eq!(collected, vec![1990, 1990]);

    // Full again right after collecting: the image does not fit here.
    let fake = Arc::new(store());
    fake.disk_full.store(2, Ordering::SeqCst);
    fake.free.store(10, Ordering::SeqCst);
    let builder = super::tests::builder(fake.clone(), Arc::new(MemoryStorage::new()), limits);
    let error = builder.build(&request(&["hello"]), None).await.unwrap_err();
    assert!(matches!(error, BuildError::NoRoom { free: 10 }), "{error}");
    assert!(error.failure().is_some());
}

#[tokio::test]
async fn a_full_disk_without_a_free_space_setting_is_a_retry() {
    let fake = Arc::new(store());
    fake.disk_full.store(1, Ordering::SeqCst);
    let builder = builder(fake.clone(), Arc::new(MemoryStorage::new()), limits());
    let error = builder.build(&request(&["hello"]), None).await.unwrap_err();
    assert_eq!(error.verdict(), Verdict::Retry(Retry::DiskFull));
    assert!(fake.collected.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unknown_packages_and_oversized_images_fail_before_packing() {
    let fake = Arc::new(store());
    let builder = builder(fake.clone(), Arc::new(MemoryStorage::new()), limits());
    let error = builder
        .build(&request(&["hello", "nope"]), None)
        .await
        .unwrap_err();
    assert_eq!(
        error.failure(),
        Some(Failure::UnknownPackages {
            names: vec!["nope".into()]
        })
    );
    let small = BuildLimits {
        max_image_size: 100,
        ..limits()
    };
    let builder = super::tests::builder(fake.clone(), Arc::new(MemoryStorage::new()), small);
    let error = builder.build(&request(&["hello"]), None).await.unwrap_err();
    assert!(
        matches!(error, BuildError::TooLarge { limit: 100, .. }),
        "{error}"
    );
    assert_eq!(fake.packed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn progress_reports_each_step_in_order() {
    let builder = builder(Arc::new(store()), Arc::new(MemoryStorage::new()), limits());
    let (tx, mut rx) = watch::channel(StepProgress::default());
    let steps = Arc::new(Mutex::new(Vec::new()));
    let seen = steps.clone();
    let watcher = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let step = rx.borrow_and_update().step;
            let mut seen = seen.lock().unwrap();
            if let Some(step) = step {
                if seen.last() != Some(&step) {
                    seen.push(step);
                }
            }
        }
    });
    builder
        .build(&request(&["hello"]), Some(&tx))
        .await
        .unwrap();
    drop(tx);
    watcher.await.unwrap();
    let steps = steps.lock().unwrap().clone();
    // The watcher may miss a step that passed in an instant, never the
    // order.
    let order = [
        Step::Evaluating,
        Step::Realising,
        Step::Grouping,
        Step::Packing,
        Step::Customising,
        Step::Uploading,
    ];
    let positions: Vec<usize> = steps
        .iter()
        .map(|s| order.iter().position(|o| o == s).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&Step::Uploading));
}

#[tokio::test]
async fn a_link_out_of_the_closure_is_an_image_link_not_a_listing() {
    let mut fake = store();
    let hello = fake.paths.get_mut(&store_path("hello")).unwrap();
    hello.nodes.insert(
        "etc".into(),
        fake::FakeNode::Symlink {
            target: "/etc".into(),
        },
    );
    let storage = Arc::new(MemoryStorage::new());
    let builder = builder(Arc::new(fake), storage.clone(), limits());
    let built = builder.build(&request(&["hello"]), None).await.unwrap();
    let manifest = storage
        .get(&ManifestKey::of_digest(&built.record.manifest_digest))
        .await
        .unwrap()
        .unwrap();
    let manifest: crate::oci::manifest::Manifest = serde_json::from_slice(&manifest).unwrap();
    let custom = manifest.layers.last().unwrap();
    let bytes = storage
        .get(&BlobKey::of_digest(&custom.digest))
        .await
        .unwrap()
        .unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    // `/etc` links into the package, as the package has it, and no name
    // of the building machine's /etc is in the layer.
    assert!(names.contains(&"etc".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("etc/")), "{names:?}");
}

#[test]
fn the_customisation_key_follows_its_inputs() {
    let hashed = |closure: &[&str], hash: &str| -> nix::Closure {
        closure
            .iter()
            .map(|p| {
                let info = nix::PathInfo {
                    nar_size: 1,
                    nar_hash: hash.to_string(),
                    references: vec![],
                };
                (p.to_string(), info)
            })
            .collect()
    };
    let key = |roots: &[&str], closure: &[&str], compression| {
        let roots: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
        customisation_key(&roots, &hashed(closure, "sha256:1"), compression)
    };
    let a = key(&["/nix/store/a"], &["/nix/store/a"], Compression::Gzip);
    assert_eq!(
        a,
        key(&["/nix/store/a"], &["/nix/store/a"], Compression::Gzip)
    );
    assert_ne!(
        a,
        key(
            &["/nix/store/a"],
            &["/nix/store/a", "/nix/store/b"],
            Compression::Gzip
        )
    );
    assert_ne!(
        a,
        key(&["/nix/store/a"], &["/nix/store/a"], Compression::Zstd)
    );
    // The same paths with other contents.
    let roots = vec!["/nix/store/a".to_string()];
    assert_ne!(
        a,
        customisation_key(
            &roots,
            &hashed(&["/nix/store/a"], "sha256:2"),
            Compression::Gzip
        )
    );
}

#[test]
fn fake_store_paths_are_store_paths() {
    assert!(nix::is_store_path(&store_path("hello")));
}
