//! The S3 server the serve benchmark (`benches/serve.sh`) uses: s3s-fs
//! (which checks request signatures and presigned URLs) on 127.0.0.1, as a
//! process of its own. Each top-level directory of the root is a bucket.
//!
//!     cargo run --example s3-server -- --root DIR [--port P] \
//!         [--access-key K] [--secret-key S]
//!
//! Every flag may also come from the environment: `S3_ROOT`, `S3_PORT`
//! (default 0: a free port), `S3_ACCESS_KEY` and `S3_SECRET_KEY` (default
//! `nixerybench` / `nixerybenchsecret`). Prints
//! `s3-server listening on http://127.0.0.1:PORT` once it accepts
//! connections, then serves until killed.

use std::io::Write;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// The value of `--name VALUE` on the command line, else of `$env`, else `default`.
fn setting(args: &[String], name: &str, env: &str, default: Option<&str>) -> String {
    let flag = format!("--{name}");
    let from_args = args.iter().position(|a| *a == flag).map(|i| {
        args.get(i + 1)
            .cloned()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")))
    });
    from_args
        .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
        .or(default.map(String::from))
        .unwrap_or_else(|| fail(&format!("set {flag} or {env}")))
}

fn fail(message: &str) -> ! {
    eprintln!("s3-server: {message}");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = setting(&args, "root", "S3_ROOT", None);
    let port = setting(&args, "port", "S3_PORT", Some("0"));
    let access_key = setting(&args, "access-key", "S3_ACCESS_KEY", Some("nixerybench"));
    let secret_key = setting(
        &args,
        "secret-key",
        "S3_SECRET_KEY",
        Some("nixerybenchsecret"),
    );

    let fs = s3s_fs::FileSystem::new(&root)
        .unwrap_or_else(|e| fail(&format!("cannot serve {root}: {e:?}")));
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(access_key, secret_key));
    let service = builder.build();

    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on 127.0.0.1:{port}: {e}")));
    let addr = listener.local_addr().expect("the bound address");
    println!("s3-server listening on http://{addr}");
    std::io::stdout().flush().expect("writing stdout");

    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
