//! One behaviour for every storage backend: the same suite runs against the
//! filesystem backend and against S3 (a real S3-protocol server that checks
//! signatures).

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::s3::{S3Server, BUCKET};
use nixery::storage::{
    Check, Download, FsStorage, MemoryStorage, S3Storage, Storage, StorageError,
};
use tokio::io::AsyncReadExt;

/// The bytes behind a download, however it is offered.
async fn fetch(download: Download) -> Vec<u8> {
    match download {
        Download::Stream { size, mut body } => {
            let mut bytes = Vec::new();
            body.read_to_end(&mut bytes).await.unwrap();
            assert_eq!(bytes.len() as u64, size);
            bytes
        }
        Download::Url(url) => {
            let response = reqwest::get(&url).await.unwrap();
            assert_eq!(response.status(), 200, "{url}");
            response.bytes().await.unwrap().to_vec()
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The two files the suite stores: under one upload part, and over.
const SMALL: usize = 300_000;
const LARGE: usize = 40 * 1024 * 1024 + 123;

/// `blobs/sha256/<hex>` of some bytes.
fn blob_key_of(bytes: &[u8]) -> String {
    format!("blobs/sha256/{}", hex_of(bytes))
}

async fn suite(storage: &dyn Storage, scratch: &Path) {
    let small_key = blob_key_of(&pattern(SMALL, 7));
    let large_key = blob_key_of(&pattern(LARGE, 7));
    let started = nixery::storage::records::unix_now() - 1;
    // Absent objects.
    assert!(storage.get("images/none").await.unwrap().is_none());
    assert!(storage.head("blobs/sha256/00").await.unwrap().is_none());
    match storage.download("blobs/sha256/00").await.unwrap() {
        None => {}
        Some(Download::Url(url)) => assert_eq!(reqwest::get(&url).await.unwrap().status(), 404),
        Some(other) => panic!("a download of nothing: {other:?}"),
    }

    // Small objects: put, get, replace, head.
    storage
        .put("images/a", Bytes::from_static(b"one"))
        .await
        .unwrap();
    assert_eq!(storage.get("images/a").await.unwrap().unwrap(), "one");
    storage
        .put("images/a", Bytes::from_static(b"two!"))
        .await
        .unwrap();
    assert_eq!(storage.get("images/a").await.unwrap().unwrap(), "two!");
    assert_eq!(storage.head("images/a").await.unwrap(), Some(4));

    // Conditional writes: only the first wins.
    assert!(storage
        .put_if_absent("builds/k", Bytes::from_static(b"first"))
        .await
        .unwrap());
    assert!(!storage
        .put_if_absent("builds/k", Bytes::from_static(b"second"))
        .await
        .unwrap());
    assert_eq!(storage.get("builds/k").await.unwrap().unwrap(), "first");

    // Files, small and larger than one upload part: moved into place,
    // consumed, downloadable byte for byte.
    let dir = storage
        .local_staging_dir()
        .unwrap_or_else(|| scratch.to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    for (key, len) in [(&small_key, SMALL), (&large_key, LARGE)] {
        let file = dir.join("upload");
        let content = pattern(len, 7);
        std::fs::write(&file, &content).unwrap();
        storage.put_file(key, &file).await.unwrap();
        assert!(!file.exists(), "put_file must consume its file");
        assert_eq!(storage.head(key).await.unwrap(), Some(len as u64));
        assert!(
            fetch(storage.download(key).await.unwrap().unwrap()).await == content,
            "{key} differs"
        );
    }

    // Content-addressed: an existing object is kept, not overwritten (the
    // file is not even read).
    let file = dir.join("again");
    std::fs::write(&file, b"different bytes").unwrap();
    storage.put_file(&small_key, &file).await.unwrap();
    assert!(!file.exists());
    assert_eq!(storage.head(&small_key).await.unwrap(), Some(SMALL as u64));

    // Checking a stored object against its size and digest, and repairing
    // one that is damaged.
    let content = pattern(100_000, 3);
    let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
    let key = format!("blobs/sha256/{hex}");
    let size = content.len() as u64;
    let file = dir.join("checked");
    assert_eq!(
        storage.check(&key, size, &hex).await.unwrap(),
        Check::Absent
    );
    std::fs::write(&file, &content).unwrap();
    storage.put_file(&key, &file).await.unwrap();
    assert_eq!(storage.check(&key, size, &hex).await.unwrap(), Check::Good);
    // Truncated, as by a failed write: corrupt.
    storage
        .put(&key, Bytes::from(content[..50_000].to_vec()))
        .await
        .unwrap();
    let Check::Corrupt(damaged) = storage.check(&key, size, &hex).await.unwrap() else {
        panic!("a truncated object is not corrupt")
    };
    // Creating keeps what is there; only a replacement repairs it.
    std::fs::write(&file, &content).unwrap();
    storage.put_file(&key, &file).await.unwrap();
    assert!(matches!(
        storage.check(&key, size, &hex).await.unwrap(),
        Check::Corrupt(_)
    ));
    std::fs::write(&file, &content).unwrap();
    storage.replace_file(&key, &file, &damaged).await.unwrap();
    assert!(!file.exists(), "replace_file must consume its file");
    assert_eq!(storage.check(&key, size, &hex).await.unwrap(), Check::Good);
    assert!(fetch(storage.download(&key).await.unwrap().unwrap()).await == content);
    storage
        .put(&key, Bytes::from(content.clone()))
        .await
        .unwrap();

    // Listing a directory of the layout: every object under it, with its
    // size and a recent modification time; deleting one.
    let mut listed = storage.list("blobs/").await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
    let mut expected = vec![large_key.clone(), small_key.clone(), key.clone()];
    expected.sort();
    assert_eq!(keys, expected);
    let small = listed.iter().find(|l| l.key == small_key).unwrap();
    assert_eq!(small.size, SMALL as u64);
    assert!(listed.iter().all(|l| l.modified >= started), "{listed:?}");
    assert_eq!(storage.list("images/").await.unwrap().len(), 1);
    let modified = storage.modified("images/a").await.unwrap().unwrap();
    assert!(modified >= started, "{modified}");
    assert_eq!(storage.modified("images/none").await.unwrap(), None);
    // A key that begins another one is itself, and the other's beginning
    // is nothing (S3 answers this from a listing).
    storage
        .put("builds/k.1", Bytes::from_static(b"claim"))
        .await
        .unwrap();
    assert!(storage.modified("builds/k").await.unwrap().is_some());
    assert_eq!(storage.modified("builds/k.").await.unwrap(), None);
    storage.delete("builds/k.1").await.unwrap();
    assert!(storage.list("nothing/").await.unwrap().is_empty());
    // The first few in key order: what the build lists read.
    let first: Vec<String> = storage
        .list_first("blobs/", 2)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(first, expected[..2]);
    assert!(storage.list_first("nothing/", 5).await.unwrap().is_empty());
    storage.delete(&small_key).await.unwrap();
    assert!(storage.head(&small_key).await.unwrap().is_none());
    storage.delete(&small_key).await.unwrap();
    assert_eq!(storage.list("blobs/").await.unwrap().len(), 2);
    for bad in ["blobs", "../", "blobs//", ""] {
        assert!(
            matches!(
                storage.list(bad).await,
                Err(StorageError::InvalidKey { .. })
            ),
            "{bad:?}"
        );
    }

    // Keys outside the layout are refused, not written.
    assert!(matches!(
        storage.put("../escape", Bytes::new()).await,
        Err(StorageError::InvalidKey { .. })
    ));
    assert!(matches!(
        storage.get("blobs//x").await,
        Err(StorageError::InvalidKey { .. })
    ));
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

/// Content-addressed writes on every backend: a file must be what its key
/// says it is, and nothing good is ever overwritten.
async fn content_addressed_rules(storage: &dyn Storage, scratch: &Path, sizes: &[usize]) {
    let dir = storage
        .local_staging_dir()
        .unwrap_or_else(|| scratch.to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    for (&len, seed) in sizes.iter().zip(21u8..) {
        let content = pattern(len, seed);
        let key = format!("blobs/sha256/{}", hex_of(&content));
        let file = dir.join("claimed");

        // Other bytes under this key's name (the same size): refused, and
        // nothing is stored, so nothing can record a digest they lack.
        let mut other = content.clone();
        other[len / 2] ^= 0x55;
        std::fs::write(&file, &other).unwrap();
        let refused = storage.put_file(&key, &file).await;
        assert!(
            matches!(refused, Err(StorageError::NotItsDigest { .. })),
            "{len}: a file unlike its key: {refused:?}"
        );
        assert!(!file.exists(), "put_file must consume its file");
        assert_eq!(storage.head(&key).await.unwrap(), None, "{len}");
        // Nor does a key that names no digest take a file.
        std::fs::write(&file, &content).unwrap();
        assert!(matches!(
            storage.put_file("images/not-content", &file).await,
            Err(StorageError::InvalidKey { .. })
        ));

        // The right bytes: stored, and good.
        std::fs::write(&file, &content).unwrap();
        storage.put_file(&key, &file).await.unwrap();
        let hex = hex_of(&content);
        assert_eq!(
            storage.check(&key, len as u64, &hex).await.unwrap(),
            Check::Good
        );

        // Damaged (the same size, other bytes): check names this version,
        // and only a replacement with the right bytes over it repairs it.
        storage.put(&key, Bytes::from(other.clone())).await.unwrap();
        let Check::Corrupt(damaged) = storage.check(&key, len as u64, &hex).await.unwrap() else {
            panic!("{len}: damaged bytes pass the check")
        };
        std::fs::write(&file, &other).unwrap();
        let refused = storage.replace_file(&key, &file, &damaged).await;
        assert!(
            matches!(refused, Err(StorageError::NotItsDigest { .. })),
            "{refused:?}"
        );
        assert!(!file.exists(), "replace_file must consume its file");
        std::fs::write(&file, &content).unwrap();
        storage.replace_file(&key, &file, &damaged).await.unwrap();
        assert_eq!(
            storage.check(&key, len as u64, &hex).await.unwrap(),
            Check::Good
        );

        // A good object is never replaced: a second writer that found the
        // same damage comes too late, and writes nothing.
        let modified = storage.modified(&key).await.unwrap();
        std::fs::write(&file, &content).unwrap();
        let late = storage.replace_file(&key, &file, &damaged).await;
        assert!(
            matches!(late, Err(StorageError::Changed { .. })),
            "{len}: a good object was replaced: {late:?}"
        );
        assert!(!file.exists(), "replace_file must consume its file");
        assert_eq!(storage.modified(&key).await.unwrap(), modified);
        assert!(
            fetch(storage.download(&key).await.unwrap().unwrap()).await == content,
            "{len}: the good object changed"
        );

        // Nor is a deleted one brought back by a stale replacement.
        storage.delete(&key).await.unwrap();
        std::fs::write(&file, &content).unwrap();
        assert!(matches!(
            storage.replace_file(&key, &file, &damaged).await,
            Err(StorageError::Changed { .. })
        ));
        assert_eq!(storage.head(&key).await.unwrap(), None);
    }
}

#[tokio::test]
async fn content_addressed_writes_on_the_filesystem() {
    let root = tempfile::tempdir().unwrap();
    let storage = FsStorage::open(root.path()).unwrap();
    // Read whole, and streamed.
    content_addressed_rules(&storage, root.path(), &[70_000, (1 << 20) + 1]).await;
}

#[tokio::test]
async fn content_addressed_writes_in_memory() {
    let scratch = tempfile::tempdir().unwrap();
    content_addressed_rules(&MemoryStorage::new(), scratch.path(), &[70_000]).await;
}

#[tokio::test]
async fn content_addressed_writes_on_s3() {
    let server = S3Server::start();
    let scratch = tempfile::tempdir().unwrap();
    let storage = S3Storage::new(server.client().await, BUCKET, "", Duration::from_secs(600));
    // One PUT, and larger than one upload part (multipart).
    content_addressed_rules(
        &storage,
        scratch.path(),
        &[70_000, nixery::storage::s3::PART_SIZE as usize + 5],
    )
    .await;

    // An object whose digest nobody recorded at upload (written some other
    // way) is not known good, even with the right bytes: it is treated as
    // damaged, and a replacement records the digest of what it uploads.
    let content = pattern(5000, 23);
    let key = blob_key_of(&content);
    let hex = hex_of(&content);
    storage
        .put(&key, Bytes::from(content.clone()))
        .await
        .unwrap();
    let Check::Corrupt(unverified) = storage.check(&key, 5000, &hex).await.unwrap() else {
        panic!("an object without a recorded digest passes the check")
    };
    let file = scratch.path().join("verified");
    std::fs::write(&file, &content).unwrap();
    storage
        .replace_file(&key, &file, &unverified)
        .await
        .unwrap();
    assert_eq!(storage.check(&key, 5000, &hex).await.unwrap(), Check::Good);
    // What is recorded is the hash of what was uploaded.
    let head = server
        .client()
        .await
        .head_object()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.metadata().unwrap()["sha256"], hex);
}

#[tokio::test]
async fn every_content_addressed_write_to_s3_is_conditional() {
    let server = S3Server::start();
    let scratch = tempfile::tempdir().unwrap();
    let storage = S3Storage::new(server.client().await, BUCKET, "", Duration::from_secs(600));
    for len in [70_000, nixery::storage::s3::PART_SIZE as usize + 5] {
        let content = pattern(len, 41);
        let key = blob_key_of(&content);
        let hex = hex_of(&content);
        let file = scratch.path().join("file");
        std::fs::write(&file, &content).unwrap();
        storage.put_file(&key, &file).await.unwrap();
        // Damaged behind the registry's back, then repaired.
        let stored = server.root.join(BUCKET).join(&key);
        std::fs::write(&stored, &content[..len / 2]).unwrap();
        let Check::Corrupt(damaged) = storage.check(&key, len as u64, &hex).await.unwrap() else {
            panic!("{len}: truncated, and good?")
        };
        std::fs::write(&file, &content).unwrap();
        storage.replace_file(&key, &file, &damaged).await.unwrap();
    }
    // Each PutObject and CompleteMultipartUpload named a precondition (the
    // parts of an upload make no object, and take none).
    let writes: Vec<_> = server
        .served()
        .into_iter()
        .filter(|s| s.path.contains("/blobs/"))
        .filter(|s| {
            let part = s.query.contains("partNumber=");
            let start = s.method == "POST" && s.query.starts_with("uploads");
            (s.method == "PUT" && !part) || (s.method == "POST" && !start)
        })
        .collect();
    assert_eq!(writes.len(), 4, "{writes:?}");
    assert!(writes.iter().all(|w| w.conditional), "{writes:?}");
}

/// Writes `content` through a streamed upload, as a packing thread does;
/// the staged object.
async fn stream(storage: &dyn Storage, content: &[u8]) -> nixery::storage::Staged {
    use std::io::Write;
    let streamed = storage.begin_stream().await.unwrap().expect("S3 streams");
    let upload = tokio::spawn(streamed.upload);
    let mut writer = streamed.writer;
    let content = content.to_vec();
    tokio::task::spawn_blocking(move || {
        // In pieces of odd sizes, as a compressor writes.
        for piece in content.chunks(300_007) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap();
    })
    .await
    .unwrap();
    upload.await.unwrap().unwrap()
}

#[tokio::test]
async fn streamed_objects_on_s3_are_placed_create_only_with_their_digest() {
    let server = S3Server::start();
    let storage = S3Storage::new(server.client().await, BUCKET, "", Duration::from_secs(600));
    // Larger than three parts of a stream, and smaller than one.
    for len in [20 << 20, 70_000] {
        let content = pattern(len, 57);
        let key = blob_key_of(&content);
        let hex = hex_of(&content);
        let staged = stream(&storage, &content).await;
        assert_eq!(staged.size, len as u64);
        assert!(staged.key.starts_with("staging/"), "{}", staged.key);
        assert_eq!(
            storage.check(&key, len as u64, &hex).await.unwrap(),
            Check::Absent
        );
        assert!(storage.place_streamed(staged, &key, None).await.unwrap());
        assert_eq!(
            storage.check(&key, len as u64, &hex).await.unwrap(),
            Check::Good
        );
        assert!(fetch(storage.download(&key).await.unwrap().unwrap()).await == content);
        // A second writer of the same object writes nothing.
        let modified = storage.modified(&key).await.unwrap();
        let again = stream(&storage, &content).await;
        assert!(!storage.place_streamed(again, &key, None).await.unwrap());
        assert_eq!(storage.modified(&key).await.unwrap(), modified);
        // Damaged, and repaired over the damaged version only.
        let stored = server.root.join(BUCKET).join(&key);
        std::fs::write(&stored, &content[..len / 2]).unwrap();
        let Check::Corrupt(damaged) = storage.check(&key, len as u64, &hex).await.unwrap() else {
            panic!("{len}: truncated, and good?")
        };
        let repair = stream(&storage, &content).await;
        assert!(storage
            .place_streamed(repair, &key, Some(&damaged))
            .await
            .unwrap());
        assert_eq!(
            storage.check(&key, len as u64, &hex).await.unwrap(),
            Check::Good
        );
    }
    // Nothing is left staged, nor any upload open.
    assert_eq!(storage.list("staging/").await.unwrap(), vec![]);
    assert!(
        server.keys().iter().all(|k| k.starts_with("blobs/")),
        "{:?}",
        server.keys()
    );
    assert_eq!(open_uploads(&server), Vec::<String>::new());
    // Every write that makes an object under blobs/ named a precondition
    // (two sizes: a create, a second writer's refused create, a repair).
    let writes: Vec<_> = server
        .served()
        .into_iter()
        .filter(|s| s.path.contains("/blobs/"))
        .filter(|s| s.method == "POST" && !s.query.starts_with("uploads"))
        .collect();
    assert_eq!(writes.len(), 6, "{writes:?}");
    assert_eq!(writes.iter().filter(|w| w.status == 412).count(), 2);
    assert!(writes.iter().all(|w| w.conditional), "{writes:?}");
}

#[tokio::test]
async fn filesystem_backend() {
    let root = tempfile::tempdir().unwrap();
    let storage = FsStorage::open(root.path()).unwrap();
    suite(&storage, root.path()).await;
    let left: Vec<_> = std::fs::read_dir(root.path().join("staging"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "staging not empty: {left:?}");

    // The same size with other bytes: the digest tells, and such a blob is
    // not served whole, whether it is small (read whole: unknown) or large
    // (streamed: cut short).
    for (len, seed) in [(4096, 9), ((1 << 20) + 1, 10)] {
        let content = pattern(len, seed);
        let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
        let key = format!("blobs/sha256/{hex}");
        storage
            .put(&key, Bytes::from(content.clone()))
            .await
            .unwrap();
        let good = storage.download(&key).await.unwrap().unwrap();
        assert_eq!(fetch(good).await, content);
        let mut damaged = content.clone();
        damaged[100] ^= 0xff;
        std::fs::write(root.path().join(&key), &damaged).unwrap();
        assert!(matches!(
            storage.check(&key, len as u64, &hex).await.unwrap(),
            Check::Corrupt(_)
        ));
        if let Some(download) = storage.download(&key).await.unwrap() {
            assert!(try_fetch(download).await.is_err(), "{len}");
        }
        assert!(storage.download(&key).await.unwrap().is_none(), "{len}");
    }
}

/// Flips one byte of a file in place and sets its times back, as bit rot
/// on a disk would: the same size, the same modification time.
fn rot(path: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let before = std::fs::metadata(path).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&[byte[0] ^ 0x20]).unwrap();
    file.set_times(
        std::fs::FileTimes::new()
            .set_modified(before.modified().unwrap())
            .set_accessed(before.accessed().unwrap()),
    )
    .unwrap();
    drop(file);
    let after = std::fs::metadata(path).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(after.modified().unwrap(), before.modified().unwrap());
}

/// The bytes of a download, or the error that cut it short.
async fn try_fetch(download: Download) -> std::io::Result<Vec<u8>> {
    let Download::Stream { size, mut body } = download else {
        panic!("the filesystem hands out streams")
    };
    let mut bytes = Vec::new();
    body.read_to_end(&mut bytes).await?;
    assert_eq!(bytes.len() as u64, size);
    Ok(bytes)
}

#[tokio::test]
async fn bit_rot_that_keeps_size_and_time_is_never_served_on_the_filesystem() {
    let root = tempfile::tempdir().unwrap();
    let storage = FsStorage::open(root.path()).unwrap();
    // Read whole (a config), and streamed (a layer).
    for (len, seed) in [(4096usize, 31u8), ((3 << 20) + 7, 32)] {
        let content = pattern(len, seed);
        let key = blob_key_of(&content);
        let file = root.path().join("staging/upload");
        std::fs::write(&file, &content).unwrap();
        storage.put_file(&key, &file).await.unwrap();
        // Served, and so known good once.
        let served = try_fetch(storage.download(&key).await.unwrap().unwrap()).await;
        assert!(served.unwrap() == content);

        rot(&root.path().join(&key), len as u64 / 2);
        match storage.download(&key).await.unwrap() {
            None => {}
            Some(download) => {
                let served = try_fetch(download).await;
                assert!(served.is_err(), "{len}: damaged bytes were served whole");
            }
        }
        // Moved aside, so that the next build that needs it stores it
        // again; never served again.
        assert_eq!(storage.head(&key).await.unwrap(), None, "{len}");
        assert!(storage.download(&key).await.unwrap().is_none(), "{len}");
        let aside: Vec<String> = std::fs::read_dir(root.path().join("staging"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            aside
                .iter()
                .any(|name| name.contains(&key["blobs/sha256/".len()..])),
            "{len}: not quarantined under staging/: {aside:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_reads_of_a_large_blob_hash_it_once() {
    let root = tempfile::tempdir().unwrap();
    let storage = FsStorage::open(root.path()).unwrap();
    let content = pattern((8 << 20) + 3, 33);
    let key = blob_key_of(&content);
    let file = root.path().join("staging/upload");
    std::fs::write(&file, &content).unwrap();
    storage.put_file(&key, &file).await.unwrap();
    assert_eq!(storage.blob_hashes(), 0);

    // Eight clients at once: one pass over the file for all of them.
    let opened = futures_util::future::join_all((0..8).map(|_| storage.download(&key))).await;
    let served =
        futures_util::future::join_all(opened.into_iter().map(|d| try_fetch(d.unwrap().unwrap())))
            .await;
    for bytes in served {
        assert!(bytes.unwrap() == content);
    }
    assert_eq!(storage.blob_hashes(), 1);

    // A read after they all ended hashes it again: what rots between reads
    // is caught.
    assert!(
        try_fetch(storage.download(&key).await.unwrap().unwrap())
            .await
            .unwrap()
            == content
    );
    assert_eq!(storage.blob_hashes(), 2);
}

#[tokio::test]
async fn memory_backend() {
    let scratch = tempfile::tempdir().unwrap();
    let storage = MemoryStorage::new();
    suite(&storage, scratch.path()).await;
    assert!(
        std::fs::read_dir(scratch.path()).unwrap().next().is_none(),
        "files left in scratch"
    );
    // Refused keys wrote nothing; there is no staging to leave behind.
    let mut expected = vec![
        // The checked object: sha256 of pattern(100_000, 3).
        "blobs/sha256/5b549d264e029a4406324861b7dafa2e83872f0759b2e7b891bdd120df72f58f".to_string(),
        blob_key_of(&pattern(LARGE, 7)),
        "builds/k".to_string(),
        "images/a".to_string(),
    ];
    expected.sort();
    assert_eq!(storage.keys(), expected);
}

#[tokio::test]
async fn s3_backend() {
    let server = S3Server::start();
    let scratch = tempfile::tempdir().unwrap();
    let storage = S3Storage::new(
        server.client().await,
        BUCKET,
        "/some/prefix/",
        Duration::from_secs(600),
    );
    suite(&storage, scratch.path()).await;

    let keys = server.keys();
    assert!(
        keys.iter().all(|k| k.starts_with("some/prefix/")),
        "{keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.contains("staging/")),
        "staging left behind: {keys:?}"
    );
    // The large file went up in parts, straight to its key; the existing
    // one was not uploaded again.
    let served = server.served();
    let large_key = blob_key_of(&pattern(LARGE, 7));
    assert!(
        served
            .iter()
            .any(|s| s.method == "POST" && s.path.contains(&large_key)),
        "no multipart upload"
    );
    // More than S3 can hold (5 TiB, as a sparse file): refused before
    // any upload, as too large, which no retry can change.
    let huge = scratch.path().join("huge");
    let sparse = std::fs::File::create(&huge).and_then(|f| f.set_len(6 << 40));
    if sparse.is_ok() {
        let huge_key = format!("blobs/sha256/{}", "0".repeat(64));
        let refused = storage.put_file(&huge_key, &huge).await;
        assert!(
            matches!(refused, Err(StorageError::TooLarge { size, .. }) if size == 6 << 40),
            "{refused:?}"
        );
        assert!(!server.keys().iter().any(|k| k.ends_with(&huge_key)));
    }
    let small_key = blob_key_of(&pattern(SMALL, 7));
    let uploads_of_small = served
        .iter()
        .filter(|s| s.method == "PUT" && s.path.ends_with(&small_key) && s.status == 200)
        .count();
    assert_eq!(uploads_of_small, 1);
}

#[tokio::test]
#[cfg(feature = "integration")] // curl as the client
async fn s3_presigned_urls_are_checked_by_the_server() {
    let server = S3Server::start();
    let scratch = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let storage = S3Storage::new(client.clone(), BUCKET, "", Duration::from_secs(600));
    let file = scratch.path().join("blob");
    std::fs::write(&file, b"presigned content").unwrap();
    let key = blob_key_of(b"presigned content");
    storage.put_file(&key, &file).await.unwrap();

    let Some(Download::Url(url)) = storage.download(&key).await.unwrap() else {
        panic!("no URL")
    };
    // curl, as a client would, gets the exact bytes.
    let fetched = common::run(std::process::Command::new("curl").args(["-sS", "-f", &url]));
    assert_eq!(fetched, "presigned content");

    // Tampered: another key, or a changed signature.
    let other_key = url.replace(&key, &blob_key_of(b"other content"));
    assert_eq!(reqwest::get(&other_key).await.unwrap().status(), 403);
    let sig = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut tampered = url.clone();
    let flipped = if &url[sig..sig + 1] == "0" { "1" } else { "0" };
    tampered.replace_range(sig..sig + 1, flipped);
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);

    // Expired: a URL that lives one second is refused once it is over.
    let short = S3Storage::new(client, BUCKET, "", Duration::from_secs(1));
    let Some(Download::Url(url)) = short.download(&key).await.unwrap() else {
        panic!("no URL")
    };
    let refused = common::wait_until(Duration::from_secs(15), || {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
            .output()
            .unwrap();
        out.stdout == b"403"
    });
    assert!(refused, "an expired URL still works");
}

/// Set in the child process of the test below: the storage root it writes.
const WRITER_ROOT: &str = "NIXERY_TEST_WRITER_ROOT";

/// The writer the test below kills: when run as its child, writes objects
/// of a few megabytes under their digests, forever.
#[tokio::test]
async fn killed_writer_child() {
    let Some(root) = std::env::var_os(WRITER_ROOT) else {
        return;
    };
    let storage = FsStorage::open(root).unwrap();
    for i in 0u32.. {
        let content = pattern(3 << 20, (i % 251) as u8)
            .into_iter()
            .chain(i.to_le_bytes())
            .collect::<Vec<u8>>();
        let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
        let key = format!("blobs/sha256/{hex}");
        if i % 2 == 0 {
            storage.put(&key, Bytes::from(content)).await.unwrap();
        } else {
            storage
                .put_if_absent(&key, Bytes::from(content))
                .await
                .unwrap();
        }
    }
}

#[test]
fn a_writer_killed_at_any_point_leaves_no_partial_object() {
    let root = tempfile::tempdir().unwrap();
    for round in 0..8u64 {
        // Killed on drop too, should a check below fail first.
        let mut child = common::KillOnDrop(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "killed_writer_child", "--nocapture"])
                .env(WRITER_ROOT, root.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Kill it at a different point of its writes each round, once it
        // writes at all (on a busy machine the child takes a while to
        // start; waiting for it, not for a fixed time, keeps every round
        // a kill mid-write).
        let staging = root.path().join("staging");
        let writing = common::wait_until(Duration::from_secs(60), || {
            std::fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_some())
                || root.path().join("blobs/sha256").exists()
        });
        assert!(writing, "the writer never started writing");
        std::thread::sleep(Duration::from_millis(20 + round * 37));
        if round == 7 {
            // However slow the machine, the last writer lives until it
            // has finished one object, so the check below has whole
            // objects to look at as well as killed ones.
            let finished = common::wait_until(Duration::from_secs(120), || {
                std::fs::read_dir(root.path().join("blobs/sha256"))
                    .is_ok_and(|mut d| d.next().is_some())
            });
            assert!(finished, "the writer never finished an object");
        }
        child.0.kill().unwrap();
        child.0.wait().unwrap();
    }
    let blobs = root.path().join("blobs/sha256");
    let mut complete = 0;
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let entry = entry.unwrap();
        let data = std::fs::read(entry.path()).unwrap();
        let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
        assert_eq!(
            entry.file_name().to_string_lossy(),
            hex,
            "a partial object under a final name"
        );
        complete += 1;
    }
    assert!(
        complete > 0,
        "the writer wrote nothing before it was killed"
    );
}

/// Multipart uploads the S3 test server holds open, with their parts:
/// s3s-fs keeps `.upload-<id>.json` and `.upload_id-<id>.part-<n>` beside
/// its buckets until an upload is completed or aborted.
fn open_uploads(server: &S3Server) -> Vec<String> {
    let mut open: Vec<String> = std::fs::read_dir(&server.root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".upload"))
        .collect();
    open.sort();
    open
}

/// A layer whose packing fails (a NAR that fails its NarHash at the end,
/// a cancelled build) drops its `PartWriter` without `finish`. That is
/// not the end of the layer: the upload is aborted and fails, and nothing
/// is left, neither a truncated object under `staging/` nor an open
/// multipart upload.
#[tokio::test]
async fn a_stream_dropped_before_its_end_leaves_nothing() {
    use std::io::Write;
    let server = S3Server::start();
    let storage = S3Storage::new(server.client().await, BUCKET, "", Duration::from_secs(600));
    // More than one part, and less than one.
    for len in [9 << 20, 70_000] {
        let streamed = storage.begin_stream().await.unwrap().expect("S3 streams");
        let upload = tokio::spawn(streamed.upload);
        let mut writer = streamed.writer;
        tokio::task::spawn_blocking(move || {
            // Then the packing fails: no finish().
            writer.write_all(&pattern(len, 3)).unwrap();
            drop(writer);
        })
        .await
        .unwrap();
        let result = upload.await.unwrap();
        assert!(
            matches!(result, Err(StorageError::Abandoned { .. })),
            "{len}: a stream dropped before its end was completed: {result:?}"
        );
        assert_eq!(storage.list("staging/").await.unwrap(), vec![], "{len}");
        assert_eq!(server.keys(), Vec::<String>::new(), "{len}");
        assert_eq!(open_uploads(&server), Vec::<String>::new(), "{len}");
    }
    // Each upload was aborted, once.
    let aborted: Vec<_> = server
        .served()
        .into_iter()
        .filter(|s| s.method == "DELETE" && s.query.contains("uploadId="))
        .collect();
    assert_eq!(aborted.len(), 2, "{aborted:?}");
    assert!(aborted.iter().all(|s| s.status == 204), "{aborted:?}");
}
