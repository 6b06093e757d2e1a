//! Garbage collection beside the registry and its builds, in process: the
//! real builder (over the fake store of paths), the real image service
//! and the collection, on filesystem storage whose objects are aged by
//! setting their files' modification times. What a collection has doomed
//! when it listed, and a build or the registry then relies on before the
//! sweep, must be kept; and a live index must keep all of its platforms'
//! images.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::*;
use crate::builder::fake::FakeStore;
use crate::builder::popularity::Popularity;
use crate::builder::tests::request;
use crate::builder::{BuildRequest, Builder};
use crate::images::{ImageError, ImageSettings, Images, Served};
use crate::metrics::Metrics;
use crate::oci::digest::sha256_digest;
use crate::oci::name::{Arch, ImageSpec};
use crate::source::{PackageSource, Sources};
use crate::storage::keys::{BlobKey, ImageRecordKey, ReferrersKey};
use crate::storage::records::unix_now;
use crate::storage::{Check, FsStorage, Intercepted, Op};

const DAY: u64 = 86_400;

fn settings() -> GcSettings {
    GcSettings {
        unused_for: Duration::from_secs(30 * DAY),
        grace: Duration::from_secs(DAY),
        dry_run: false,
    }
}

/// Sets the modification time of every stored object to `seconds` ago.
fn age_all(root: &Path, seconds: u64) {
    let then = SystemTime::now() - Duration::from_secs(seconds);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let file = std::fs::File::options().write(true).open(&path).unwrap();
                file.set_modified(then).unwrap();
            }
        }
    }
}

type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Filesystem storage that runs `hook` (a build, a pull) when the
/// collection first looks at an object again before deleting it: after
/// it listed and marked, before it swept anything. The hook is taken out
/// of the second value when it runs.
fn swept_after(inner: Arc<FsStorage>, hook: Hook) -> (Intercepted, Arc<Mutex<Option<Hook>>>) {
    let pending = Arc::new(Mutex::new(Some(hook)));
    let taken = pending.clone();
    let storage = Intercepted::new_async(inner, move |op, _| {
        let hook = match op {
            Op::Modified => taken.lock().unwrap().take(),
            _ => None,
        };
        Box::pin(async move {
            if let Some(hook) = hook {
                hook.await;
            }
            Ok(())
        })
    });
    (storage, pending)
}

fn store() -> Arc<FakeStore> {
    Arc::new(
        FakeStore::default()
            .with_package("busybox", &[])
            .with_package("hello", &["busybox"]),
    )
}

fn builder(storage: Arc<dyn Storage>) -> Builder {
    Builder::new(
        store(),
        storage,
        Arc::new(Popularity::none()),
        crate::config::default_limits(),
    )
}

/// The image service of a registry serving amd64 and arm64 from a local
/// package set, building in process.
fn images(storage: Arc<dyn Storage>) -> Images {
    let dispatch =
        crate::app::local_dispatch(builder(storage.clone()), Arc::new(Metrics::new(None)), 16);
    let mut settings: ImageSettings = crate::config::defaults().images;
    settings.platforms = vec![Arch::Amd64, Arch::Arm64];
    settings.implicit_packages = vec![];
    let sources = Sources::new(
        PackageSource::Path("/pkgs".into()),
        Duration::from_secs(6 * 3600),
    );
    Images::new(storage, dispatch, Arc::new(sources), settings)
}

fn hello() -> ImageSpec {
    ImageSpec::parse("hello", "latest").unwrap()
}

/// What a pull of `hello` gets: the index, or (`accepts_index` false)
/// the first platform's manifest; never a build.
async fn pull(images: &Images, accepts_index: bool) -> Result<Served, ImageError> {
    images
        .get_or_build(&hello(), "latest", false, accepts_index)
        .await
}

/// The requests of `hello`'s platforms, as the image service makes them.
fn platform_requests() -> Vec<BuildRequest> {
    [("x86_64-linux", "amd64"), ("aarch64-linux", "arm64")]
        .into_iter()
        .map(|(system, architecture)| BuildRequest {
            system: system.into(),
            architecture: architecture.into(),
            ..request(&["hello"])
        })
        .collect()
}

/// Everything an image record names is stored and matches its digest:
/// its manifest, config and layers, and its SBOM with its referrers.
async fn whole(storage: &dyn Storage, record_key: &str) {
    let record: ImageRecord = records::read(storage, record_key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{record_key} is gone"));
    let key = ManifestKey::of_digest(&record.manifest_digest);
    let bytes = storage
        .get(&key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{record_key}: {key} is gone"));
    assert_eq!(sha256_digest(&bytes), record.manifest_digest);
    let manifest: Manifest = serde_json::from_slice(&bytes).unwrap();
    for blob in manifest.layers.iter().chain([&manifest.config]) {
        let key = BlobKey::of_digest(&blob.digest);
        let found = storage
            .check(&key, blob.size, hex_of(&blob.digest))
            .await
            .unwrap();
        assert_eq!(found, Check::Good, "{record_key}: {key}");
    }
    let sbom = record.sbom.expect("every build stores an SBOM");
    assert!(
        storage
            .get(&ManifestKey::of_digest(&sbom))
            .await
            .unwrap()
            .is_some(),
        "{record_key}: its SBOM {sbom} is gone"
    );
    let referrers = ReferrersKey::of(hex_of(&record.manifest_digest));
    assert!(storage.get(&referrers).await.unwrap().is_some());
}

/// The race the create-only writes opened: a build that finds its config
/// and manifest stored (and good) does not write them again, so a
/// collection that doomed them before the build began deleted them under
/// it, and the image record it wrote named a manifest that was gone.
#[tokio::test]
async fn a_build_reusing_a_doomed_config_and_manifest_keeps_them() {
    let root = tempfile::tempdir().unwrap();
    let fs = Arc::new(FsStorage::open(root.path()).unwrap());
    // Built 40 days ago; its record is gone since (collected, say), and
    // nothing names its manifest and config any more.
    let built = builder(fs.clone())
        .build(&request(&["hello"]), None)
        .await
        .unwrap();
    let record_key = ImageRecordKey::of(&request(&["hello"]).image_key()).to_string();
    fs.delete(&record_key).await.unwrap();
    age_all(root.path(), 40 * DAY);

    // The collection lists and dooms them; then the same image is built
    // again before it sweeps.
    let rebuilt = {
        let fs = fs.clone();
        async move {
            builder(fs).build(&request(&["hello"]), None).await.unwrap();
        }
    };
    let (storage, hook) = swept_after(fs.clone(), Box::pin(rebuilt));
    let report = collect(&storage, &settings(), unix_now()).await.unwrap();
    assert!(hook.lock().unwrap().is_none(), "nothing was doomed");
    let config = BlobKey::of_digest(&{
        let bytes = fs
            .get(&ManifestKey::of_digest(&built.record.manifest_digest))
            .await
            .unwrap()
            .expect("the manifest the build relied on is gone");
        serde_json::from_slice::<Manifest>(&bytes)
            .unwrap()
            .config
            .digest
    })
    .to_string();
    let rescued: Vec<&String> = report.rescued.iter().collect();
    assert!(rescued.contains(&&config), "{rescued:?}");
    whole(&*fs, &record_key).await;
}

/// The registry composing an index whose manifest is stored already (old,
/// named by no record, doomed by a collection that is running) writes
/// the record naming it and does not write the manifest again: the
/// collection must not delete it then.
#[tokio::test]
async fn an_index_composed_over_a_doomed_manifest_keeps_it() {
    let root = tempfile::tempdir().unwrap();
    let fs = Arc::new(FsStorage::open(root.path()).unwrap());
    let index = images(fs.clone())
        .get_or_build(&hello(), "latest", true, true)
        .await
        .unwrap();
    // The index's record is gone (its image unused for long), its
    // platforms' images are pulled directly (their markers are fresh).
    let record = fs.list(Prefix::Indexes.as_str()).await.unwrap();
    assert_eq!(record.len(), 1);
    fs.delete(&record[0].key).await.unwrap();
    age_all(root.path(), 40 * DAY);
    for request in platform_requests() {
        let marker = crate::storage::keys::ServedKey::of(request.image_key().as_str());
        fs.put(&marker, Bytes::from_static(b"{}")).await.unwrap();
    }

    let composed = {
        let fs = fs.clone();
        async move {
            images(fs)
                .get_or_build(&hello(), "latest", true, true)
                .await
                .unwrap();
        }
    };
    let (storage, hook) = swept_after(fs.clone(), Box::pin(composed));
    collect(&storage, &settings(), unix_now()).await.unwrap();
    assert!(hook.lock().unwrap().is_none(), "nothing was doomed");
    let again = pull(&images(fs.clone()), true)
        .await
        .expect("the index's record names a manifest that was collected");
    assert_eq!(again.digest, index.digest);
    for request in platform_requests() {
        whole(&*fs, &ImageRecordKey::of(&request.image_key())).await;
    }
}

/// Serving an index serves each of its platforms' images: once the index
/// was pulled, a collection 31 days after the build keeps every platform's
/// record, manifest, config, layers and SBOM, so a client that takes one
/// manifest, or a platform's manifest by digest, still gets it, and
/// needs no right to build.
#[tokio::test]
async fn a_live_index_keeps_its_platforms_images_whole() {
    let root = tempfile::tempdir().unwrap();
    let fs = Arc::new(FsStorage::open(root.path()).unwrap());
    images(fs.clone())
        .get_or_build(&hello(), "latest", true, true)
        .await
        .unwrap();
    age_all(root.path(), 31 * DAY);

    // Pulled today, by a client that takes the index (a fresh process).
    let served = pull(&images(fs.clone()), true).await.unwrap();
    let markers: Vec<_> = platform_requests()
        .iter()
        .map(|r| crate::storage::keys::ServedKey::of(r.image_key().as_str()))
        .collect();
    // Markers are written in the background.
    for _ in 0..200 {
        let mut fresh = 0;
        for marker in &markers {
            let modified = fs.modified(marker).await.unwrap().unwrap_or(0);
            fresh += usize::from(unix_now() - modified < DAY);
        }
        if fresh == markers.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let report = collect(&*fs, &settings(), unix_now()).await.unwrap();
    assert_eq!(report.images_expired, 0, "{:?}", report.deleted);
    let first = pull(&images(fs.clone()), false)
        .await
        .expect("a client that takes no index gets the first platform's image");
    let index: ImageIndex = serde_json::from_slice(&served.bytes).unwrap();
    assert_eq!(first.digest, index.manifests[0].digest);
    let registry = images(fs.clone());
    for listed in &index.manifests {
        let by_digest = registry.by_digest(&listed.digest).await.unwrap();
        assert_eq!(sha256_digest(&by_digest.bytes), listed.digest);
    }
    for request in platform_requests() {
        whole(&*fs, &ImageRecordKey::of(&request.image_key())).await;
    }
}
