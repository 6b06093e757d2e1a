//! Test helpers: a NAR writer, a signing key from a fixed seed, and
//! signed caches made in memory.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use super::decompress::Compression;
use super::narinfo::{NarInfo, NarInfoLimits};
use super::nix32;
use super::store_path::StorePath;

/// A file system tree to serialise. Directory entries are written in the
/// order given, so tests can write unsorted or duplicated ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestNode {
    File { executable: bool, contents: Vec<u8> },
    Symlink(Vec<u8>),
    Directory(Vec<(Vec<u8>, TestNode)>),
}

/// One NAR string: length, bytes, zero padding.
pub fn nar_string(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// The NAR of `node`.
pub fn nar(node: &TestNode) -> Vec<u8> {
    fn write(out: &mut Vec<u8>, node: &TestNode) {
        let mut s = |b: &[u8]| out.extend(nar_string(b));
        s(b"(");
        s(b"type");
        match node {
            TestNode::File {
                executable,
                contents,
            } => {
                s(b"regular");
                if *executable {
                    s(b"executable");
                    s(b"");
                }
                s(b"contents");
                s(contents);
            }
            TestNode::Symlink(target) => {
                s(b"symlink");
                s(b"target");
                s(target);
            }
            TestNode::Directory(entries) => {
                s(b"directory");
                for (name, child) in entries {
                    out.extend(nar_string(b"entry"));
                    out.extend(nar_string(b"("));
                    out.extend(nar_string(b"name"));
                    out.extend(nar_string(name));
                    out.extend(nar_string(b"node"));
                    write(out, child);
                    out.extend(nar_string(b")"));
                }
                out.extend(nar_string(b")"));
                return;
            }
        }
        out.extend(nar_string(b")"));
    }
    let mut out = nar_string(b"nix-archive-1");
    write(&mut out, node);
    out
}

pub const TEST_KEY_NAME: &str = "test-cache-1";

/// An ed25519 key from a fixed seed.
pub struct TestKey {
    name: String,
    key: SigningKey,
}

pub fn test_key() -> TestKey {
    TestKey::new(TEST_KEY_NAME, 7)
}

impl TestKey {
    pub fn new(name: &str, seed: u8) -> TestKey {
        TestKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&[seed; 32]),
        }
    }

    /// `<name>:<base64>`, as in `trusted-public-keys`.
    pub fn public_key(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().to_bytes())
        )
    }

    /// A `Sig` value for `info`.
    pub fn sign(&self, info: &NarInfo) -> String {
        let sig = self.key.sign(info.fingerprint().as_bytes());
        format!("{}:{}", self.name, BASE64.encode(sig.to_bytes()))
    }
}

pub fn compress(compression: Compression, data: &[u8]) -> Vec<u8> {
    match compression {
        Compression::None => data.to_vec(),
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

/// `/nix/store/<hash of name>-<name>`.
pub fn store_path(name: &str) -> StorePath {
    let hash = Sha256::digest(name.as_bytes());
    StorePath::from_base_name(&format!("{}-{name}", nix32::encode(&hash[..20]))).unwrap()
}

pub fn sha256_nix32(data: &[u8]) -> String {
    format!("sha256:{}", nix32::encode(&Sha256::digest(data)))
}

/// A binary cache's files, made in memory: `nix-cache-info`,
/// `<hash>.narinfo` and `nar/<filehash>.nar<ext>`.
#[derive(Default, Clone)]
pub struct TestCache {
    pub files: BTreeMap<String, Vec<u8>>,
}

impl TestCache {
    pub fn new() -> TestCache {
        let mut cache = TestCache::default();
        cache.files.insert(
            "nix-cache-info".into(),
            b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n".to_vec(),
        );
        cache
    }

    /// Adds `path` with contents `node`, signed by `key` (if any); returns
    /// its narinfo.
    pub fn add(
        &mut self,
        path: &StorePath,
        node: &TestNode,
        references: &[&StorePath],
        compression: Compression,
        key: Option<&TestKey>,
    ) -> NarInfo {
        let nar = nar(node);
        let compressed = compress(compression, &nar);
        let ext = match compression {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
        };
        let file_hash = sha256_nix32(&compressed);
        let url = format!("nar/{}.nar{ext}", &file_hash["sha256:".len()..]);
        let refs: Vec<&str> = references.iter().map(|p| p.base_name()).collect();
        let text = format!(
            "StorePath: {path}\nURL: {url}\nCompression: {compression}\nFileHash: {file_hash}\n\
             FileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            compressed.len(),
            sha256_nix32(&nar),
            nar.len(),
            refs.join(" ")
        );
        let mut info = NarInfo::parse(text.as_bytes(), &NarInfoLimits::default()).unwrap();
        if let Some(key) = key {
            info.signatures.push(key.sign(&info));
        }
        self.files
            .insert(format!("{}.narinfo", path.hash_part()), narinfo_text(&info));
        self.files.insert(url, compressed);
        info
    }

    /// Writes the files under `dir`.
    pub fn write_to(&self, dir: &std::path::Path) {
        for (name, bytes) in &self.files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }
}

/// A narinfo as Nix writes it.
pub fn narinfo_text(info: &NarInfo) -> Vec<u8> {
    let mut text = format!(
        "StorePath: {}\nURL: {}\nCompression: {}\n",
        info.store_path, info.url, info.compression
    );
    if let Some(hash) = &info.file_hash {
        text.push_str(&format!("FileHash: {hash}\n"));
    }
    if let Some(size) = info.file_size {
        text.push_str(&format!("FileSize: {size}\n"));
    }
    let refs: Vec<&str> = info.references.iter().map(|p| p.base_name()).collect();
    text.push_str(&format!(
        "NarHash: {}\nNarSize: {}\nReferences: {}\n",
        info.nar_hash,
        info.nar_size,
        refs.join(" ")
    ));
    if let Some(deriver) = &info.deriver {
        text.push_str(&format!("Deriver: {}\n", deriver.base_name()));
    }
    for sig in &info.signatures {
        text.push_str(&format!("Sig: {sig}\n"));
    }
    if let Some(ca) = &info.ca {
        text.push_str(&format!("CA: {ca}\n"));
    }
    text.into_bytes()
}

/// A cache served over HTTP on 127.0.0.1, with faults on demand;
/// stopped on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct ServerState {
    pub files: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Request paths, and their Authorization header.
    pub log: Mutex<Vec<(String, Option<String>)>>,
    /// Answer this many requests with `fail_status` first.
    pub fail_first: AtomicUsize,
    pub fail_status: AtomicUsize,
    /// Never answer.
    pub hang: AtomicBool,
    /// NAR files (`nar/...`) are sent with their whole Content-Length,
    /// then the connection is reset after this many bytes.
    pub cut_after: Mutex<Option<usize>>,
    /// NAR files are sent this many bytes at once, then one byte at a
    /// time, this far apart.
    pub trickle: Mutex<Option<(usize, std::time::Duration)>>,
    /// Every request is answered with a redirect to this origin (same
    /// path).
    pub redirect_to: Mutex<Option<String>>,
    /// NAR bodies begun and not yet ended (sent whole, or dropped because
    /// the client went away).
    pub bodies: Arc<AtomicUsize>,
}

/// Counts a NAR body while it is being sent.
struct Sending(Arc<AtomicUsize>);

impl Sending {
    fn new(count: &Arc<AtomicUsize>) -> Sending {
        count.fetch_add(1, Ordering::SeqCst);
        Sending(count.clone())
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A NAR body as `state` says to send it: whole, cut, or trickling.
fn nar_body(state: &ServerState, bytes: Vec<u8>) -> axum::response::Response {
    use axum::body::Body;
    use axum::http::header::CONTENT_LENGTH;
    use futures_util::stream::{self, StreamExt};

    let length = bytes.len();
    let sending = Sending::new(&state.bodies);
    let trickle = *state.trickle.lock().unwrap();
    let cut = *state.cut_after.lock().unwrap();
    let body = if let Some((first, every)) = trickle {
        let first = first.min(length);
        let head = bytes::Bytes::copy_from_slice(&bytes[..first]);
        let rest = stream::unfold(
            (bytes, first, sending),
            move |(bytes, at, sending)| async move {
                if at == bytes.len() {
                    return None;
                }
                tokio::time::sleep(every).await;
                let piece = bytes::Bytes::copy_from_slice(&bytes[at..at + 1]);
                Some((Ok::<_, std::io::Error>(piece), (bytes, at + 1, sending)))
            },
        );
        Body::from_stream(stream::once(async move { Ok(head) }).chain(rest))
    } else if let Some(cut) = cut.filter(|&cut| cut < length) {
        let head = bytes::Bytes::copy_from_slice(&bytes[..cut]);
        // The head is sent (and flushed) before the connection goes.
        let reset = stream::once(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(sending);
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "cut off",
            ))
        });
        let pieces = stream::once(async move { Ok(head) }).chain(reset);
        Body::from_stream(pieces)
    } else {
        drop(sending);
        Body::from(bytes)
    };
    axum::http::Response::builder()
        .header(CONTENT_LENGTH, length)
        .body(body)
        .unwrap()
}

impl Server {
    pub async fn start(cache: &TestCache) -> Server {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode, Uri};
        use axum::response::{IntoResponse, Response};

        async fn handle(
            State(state): State<Arc<ServerState>>,
            uri: Uri,
            headers: HeaderMap,
        ) -> Response {
            let name = uri.path().trim_start_matches('/').to_string();
            let auth = headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string());
            state.log.lock().unwrap().push((name.clone(), auth));
            let redirect = state.redirect_to.lock().unwrap().clone();
            if let Some(origin) = redirect {
                let location = format!("{origin}{}", uri.path());
                return axum::response::Redirect::temporary(&location).into_response();
            }
            if state.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let failing = state
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                let status = state.fail_status.load(Ordering::SeqCst) as u16;
                return StatusCode::from_u16(status).unwrap().into_response();
            }
            // The cache is served under /cache/.
            let file = name.strip_prefix("cache/").unwrap_or_default();
            let bytes = state.files.lock().unwrap().get(file).cloned();
            match bytes {
                Some(bytes) if file.starts_with("nar/") => nar_body(&state, bytes),
                Some(bytes) => bytes.into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }

        let state = Arc::new(ServerState::default());
        *state.files.lock().unwrap() = cache.files.clone();
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Server { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/cache", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    pub fn fail(&self, times: usize, status: u16) {
        self.state
            .fail_status
            .store(status as usize, Ordering::SeqCst);
        self.state.fail_first.store(times, Ordering::SeqCst);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
