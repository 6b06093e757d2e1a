//! An S3-protocol server for tests: s3s-fs, which validates request
//! signatures and presigned URLs, on 127.0.0.1 in a thread of its own,
//! counting the requests it serves. Stopped on drop.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};

pub const ACCESS_KEY: &str = "nixerytest";
pub const SECRET_KEY: &str = "nixerytestsecret";
pub const BUCKET: &str = "nixery";
pub const REGION: &str = "us-east-1";

/// One request the S3 server answered.
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// The query string (`uploadId=...&partNumber=...` for a part).
    pub query: String,
    /// Whether it carried `If-None-Match` or `If-Match`.
    pub conditional: bool,
}

pub struct S3Server {
    pub endpoint: String,
    pub root: PathBuf,
    pub served: Arc<Mutex<Vec<Served>>>,
    slow_puts: Arc<Mutex<Option<(String, std::time::Duration)>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

#[derive(Clone)]
struct Counting {
    inner: S3Service,
    served: Arc<Mutex<Vec<Served>>>,
    /// s3s-fs checks `If-None-Match: *` and then writes; S3 does both at
    /// once. Serialising conditional writes gives S3's guarantee.
    conditional: Arc<tokio::sync::Mutex<()>>,
    /// A fault to inject: PUTs whose path contains the pattern are held
    /// this long before they are served.
    slow_puts: Arc<Mutex<Option<(String, std::time::Duration)>>>,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Counting {
    type Response = http::Response<s3s::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let is_conditional =
            req.headers().contains_key("if-none-match") || req.headers().contains_key("if-match");
        let served = self.served.clone();
        // Replacements over an ETag too: s3s-fs checks it, then writes.
        let conditional = (req.headers().contains_key("if-none-match")
            || req.headers().contains_key("if-match"))
        .then(|| self.conditional.clone());
        let delay = match &*self.slow_puts.lock().unwrap() {
            Some((pattern, delay)) if method == "PUT" && path.contains(pattern.as_str()) => {
                Some(*delay)
            }
            _ => None,
        };
        let fut = hyper::service::Service::call(&self.inner, req);
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let _one_at_a_time = match &conditional {
                Some(lock) => Some(lock.lock().await),
                None => None,
            };
            let response = match fut.await {
                Ok(response) => response,
                Err(e) => http::Response::builder()
                    .status(500)
                    .body(s3s::Body::from(format!("{e:?}")))
                    .unwrap(),
            };
            served.lock().unwrap().push(Served {
                method,
                path,
                status: response.status().as_u16(),
                query,
                conditional: is_conditional,
            });
            Ok(response)
        })
    }
}

impl S3Server {
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let served = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let service_root = root.clone();
        let counting_served = served.clone();
        let slow_puts: Arc<Mutex<Option<(String, std::time::Duration)>>> = Arc::default();
        let service_slow_puts = slow_puts.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut builder = S3ServiceBuilder::new(s3s_fs::FileSystem::new(&service_root).unwrap());
                builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
                let service = Counting {
                    inner: builder.build(),
                    served: counting_served,
                    conditional: Arc::default(),
                    slow_puts: service_slow_puts,
                };
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let http = ConnBuilder::new(TokioExecutor::new());
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((socket, _)) = accepted else { continue };
                            let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                            tokio::spawn(async move { let _ = conn.await; });
                        }
                        _ = &mut stop_rx => break,
                    }
                }
            });
            runtime.shutdown_background();
        });
        let addr = addr_rx.recv().unwrap();
        S3Server {
            endpoint: format!("http://{addr}"),
            root,
            served,
            slow_puts,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Environment for a `nixery` process that stores images here.
    pub fn nixery_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NIXERY_STORAGE_BACKEND", "s3".to_string()),
            ("NIXERY_S3_BUCKET", BUCKET.to_string()),
            ("NIXERY_S3_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
    }

    /// An SDK client for this server.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        client(&self.endpoint, REGION, ACCESS_KEY, SECRET_KEY).await
    }

    /// Injects a fault: from now on, every PUT whose path contains
    /// `pattern` takes `delay` longer.
    pub fn slow_puts(&self, pattern: &str, delay: std::time::Duration) {
        *self.slow_puts.lock().unwrap() = Some((pattern.to_string(), delay));
    }

    pub fn served(&self) -> Vec<Served> {
        self.served.lock().unwrap().clone()
    }

    /// Every object key in the bucket (files under the bucket directory).
    pub fn keys(&self) -> Vec<String> {
        let bucket = self.root.join(BUCKET);
        let mut keys = Vec::new();
        let mut stack = vec![bucket.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let key = path
                        .strip_prefix(&bucket)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    // s3s-fs keeps its own metadata beside objects.
                    if !key.starts_with(".") && !key.contains("/.") {
                        keys.push(key);
                    }
                }
            }
        }
        keys.sort();
        keys
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An SDK client for the S3 server at `endpoint` (path-style), signing
/// with the key `id` and `secret`.
pub async fn client(endpoint: &str, region: &str, id: &str, secret: &str) -> aws_sdk_s3::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            id, secret, None, None, "test",
        ))
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    )
}
