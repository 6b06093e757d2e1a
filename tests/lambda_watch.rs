//! The registry as a Lambda function under `cargo lambda watch` (the local
//! Lambda emulator), on S3 storage: skopeo and containerd pull through it,
//! every blob GET to the function is a 307, and the bytes come from S3;
//! docker logs in to a private function and pulls through its tokens; and
//! a function dispatching to SQS assembles a new image from a signed
//! binary cache itself, with no worker to build it.
// The integration tier: needs cargo lambda, real Nix, skopeo, containerd and dockerd (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::binary_cache::SignedCache;
use common::containerd::Containerd;
use common::docker::Docker;
use common::moto::Moto;
use common::s3::S3Server;
use common::{fixture_pkgs, nix_conf_dir, repo, run, skopeo_copy_from, wait_until};

/// `cargo lambda watch` in a process group of its own, stopped on drop.
struct LambdaWatch {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl LambdaWatch {
    fn start(env: &[(&str, String)], dir: &std::path::Path) -> LambdaWatch {
        let env_file = dir.join("function.env");
        let mut file = std::fs::File::create(&env_file).unwrap();
        for (k, v) in env {
            // Quoted: a value such as a public key ends in `=`.
            assert!(!v.contains('\''), "{k}");
            writeln!(file, "{k}='{v}'").unwrap();
        }
        // A free port: bind, note it, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("lambda-watch.log");
        let child = Command::new("cargo")
            .args([
                "lambda",
                "watch",
                "--invoke-address",
                "127.0.0.1",
                "--invoke-port",
                &port.to_string(),
                "--disable-cors",
                "--env-file",
            ])
            .arg(&env_file)
            .current_dir(repo())
            .env("NO_COLOR", "1")
            .env("CARGO_TERM_COLOR", "never")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("lambda-watch.err")).unwrap())
            .process_group(0)
            .spawn()
            .expect("starting cargo lambda watch (pip install cargo-lambda)");
        let mut watch = LambdaWatch {
            child,
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        // The first request waits for the function to compile and start;
        // a private function answers with its challenge.
        let url = format!("http://{}/v2/", watch.addr);
        let ready = wait_until(Duration::from_secs(900), || {
            if watch.child.try_wait().ok().flatten().is_some() {
                return true;
            }
            Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-m",
                    "600",
                    &url,
                ])
                .output()
                .is_ok_and(|o| matches!(&o.stdout[..], b"200" | b"401"))
        });
        assert!(
            ready && watch.child.try_wait().unwrap().is_none(),
            "cargo lambda watch did not come up:\n{}",
            watch.output()
        );
        watch
    }

    fn output(&self) -> String {
        let err = std::fs::read_to_string(self.log.with_file_name("lambda-watch.err"))
            .unwrap_or_default();
        format!(
            "{}{err}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for LambdaWatch {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(group, libc::SIGTERM) };
        if !wait_until(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten().is_some()
        }) {
            unsafe { libc::kill(group, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        // The function process is in the same group.
        unsafe { libc::kill(group, libc::SIGKILL) };
    }
}

#[test]
fn skopeo_and_containerd_pull_from_the_function() {
    let s3 = S3Server::start();
    let work = tempfile::tempdir().unwrap();
    let mut env = s3.nixery_env();
    env.extend([
        (
            "NIXERY_PKGS_PATH",
            fixture_pkgs().to_string_lossy().into_owned(),
        ),
        (
            "NIX_CONF_DIR",
            nix_conf_dir().to_string_lossy().into_owned(),
        ),
        ("RUST_LOG", "info".to_string()),
    ]);
    let function = LambdaWatch::start(&env, work.path());

    // skopeo: the exact served manifest, every blob verified.
    let out = work.path().join("skopeo");
    skopeo_copy_from(
        &function.addr,
        "shell/hello:latest",
        &format!("dir:{}", out.display()),
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();

    // containerd: HEAD by tag, GET by digest, blobs by redirect; and it runs.
    let containerd = Containerd::start();
    let image = format!("{}/shell/hello:latest", function.addr);
    run(containerd.pull_command().arg(&image));
    let flags = containerd.run_flags();
    let hello =
        run(containerd
            .ctr()
            .arg("run")
            .args(&flags)
            .args([&image, "hello-lambda", "hello"]));
    assert_eq!(hello, "Hello, world!\n");

    // Every blob GET the function answered was a redirect ...
    let output = function.output();
    let blob_gets: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("method=GET") && l.contains("/blobs/sha256:"))
        .collect();
    assert!(
        blob_gets.len() >= layers.len(),
        "too few blob GETs logged:\n{output}"
    );
    assert!(
        blob_gets.iter().all(|l| l.contains("status=307")),
        "{blob_gets:#?}"
    );
    // ... and the S3 server served each layer, to both clients.
    let served = s3.served();
    for hex in &layers {
        let gets = served
            .iter()
            .filter(|s| {
                s.method == "GET"
                    && s.status == 200
                    && s.path.ends_with(&format!("blobs/sha256/{hex}"))
            })
            .count();
        assert!(gets >= 2, "layer {hex} was fetched from S3 {gets} times");
    }

    // Every request's log line carries Lambda's request id ...
    let requests: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("nixery::registry: request "))
        .collect();
    assert!(!requests.is_empty(), "{output}");
    assert!(
        requests.iter().all(|l| l.contains("request{id=")),
        "{requests:#?}"
    );
    // ... and each invocation wrote its counts in embedded metric format.
    let metrics: Vec<serde_json::Value> = output
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"_aws\":"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total = |name: &str| -> u64 {
        metrics
            .iter()
            .filter(|m| {
                m["Service"] == nixery::metrics::SERVICE_FUNCTION && m.get("ErrorCode").is_none()
            })
            .filter_map(|m| m[name].as_u64())
            .sum()
    };
    assert!(
        total(nixery::metrics::REQUESTS) as usize >= requests.len(),
        "{metrics:#?}"
    );
    assert!(total(nixery::metrics::BYTES_REDIRECTED) > 0, "{metrics:#?}");
    assert!(
        metrics
            .iter()
            .all(|m| m["_aws"]["CloudWatchMetrics"][0]["Namespace"] == nixery::metrics::NAMESPACE),
        "{metrics:#?}"
    );
}

#[test]
fn docker_logs_in_and_pulls_through_the_function_s_tokens() {
    const USER: &str = "alice";
    const PASSWORD: &str = "correct horse";
    let s3 = S3Server::start();
    let work = tempfile::tempdir().unwrap();
    let htpasswd = work.path().join("htpasswd");
    let hash = bcrypt::hash(PASSWORD, 5).unwrap();
    std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
    let mut env = s3.nixery_env();
    env.extend([
        (
            "NIXERY_PKGS_PATH",
            fixture_pkgs().to_string_lossy().into_owned(),
        ),
        (
            "NIX_CONF_DIR",
            nix_conf_dir().to_string_lossy().into_owned(),
        ),
        ("NIXERY_HTPASSWD", htpasswd.to_string_lossy().into_owned()),
        ("NIXERY_AUTH_SCOPE", "build".to_string()),
        ("RUST_LOG", "info".to_string()),
    ]);
    let function = LambdaWatch::start(&env, work.path());
    let docker = Docker::start();
    let image = format!("{}/shell/hello", function.addr);

    // Anonymous: told to log in, and nothing is built.
    let refused = docker.fails(&["pull", &image]);
    assert!(
        refused.contains("building it needs credentials"),
        "{refused}"
    );
    // A wrong password is counted against the address Lambda's request
    // context gives (the emulator's client: this machine).
    assert!(!docker.login(&function.addr, USER, "guess").status.success());
    let output = function.output();
    assert!(
        output
            .lines()
            .any(|l| l.contains("credentials refused") && l.contains("client=Ip(127.0.0.1)")),
        "{output}"
    );

    // Logged in, docker builds it, by tag, and it runs.
    let login = docker.login(&function.addr, USER, PASSWORD);
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    docker.run(&["pull", &image]);
    assert_eq!(docker.run_image(&image, &["hello"]), "Hello, world!\n");
    // The signing key is shared through the bucket.
    assert!(
        s3.keys().iter().any(|k| k == "auth/token-key"),
        "{:?}",
        s3.keys()
    );

    // Logged out, anyone pulls it, by digest too.
    let repo_digest = docker.run(&["inspect", "--format", "{{index .RepoDigests 0}}", &image]);
    let digest = repo_digest.trim().rsplit_once('@').unwrap().1.to_string();
    docker.run(&["logout", &function.addr]);
    docker.forget_images();
    let by_digest = format!("{image}@{digest}");
    docker.run(&["pull", &by_digest]);
    assert_eq!(docker.run_image(&by_digest, &["hello"]), "Hello, world!\n");
    // Blobs went to S3 by redirect, with tokens or without.
    let output = function.output();
    let blob_gets: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("method=GET") && l.contains("/blobs/sha256:"))
        .collect();
    assert!(!blob_gets.is_empty(), "{output}");
    assert!(
        blob_gets.iter().all(|l| l.contains("status=307")),
        "{blob_gets:#?}"
    );
}

#[test]
fn the_function_assembles_a_new_image_from_the_binary_cache_with_no_worker() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s3 = S3Server::start();
    let moto = Moto::start();
    let queue = runtime.block_on(moto.queue("builds-assembly", 30, 3));
    let cache = SignedCache::of(
        &[
            "hello",
            "bashInteractive",
            "coreutils",
            "moreutils",
            "nano",
            "cacert",
            "iana-etc",
        ],
        "nixery-lambda-1",
    );
    let work = tempfile::tempdir().unwrap();
    let mut env = s3.nixery_env();
    env.extend([
        (
            "NIXERY_PKGS_PATH",
            fixture_pkgs().to_string_lossy().into_owned(),
        ),
        (
            "NIX_CONF_DIR",
            nix_conf_dir().to_string_lossy().into_owned(),
        ),
    ]);
    // The attribute index, as the scheduled index task makes it.
    let mut index = Command::new(env!("CARGO_BIN_EXE_nixery"));
    index.arg("index").envs(env.iter().map(|(k, v)| (k, v)));
    let indexed = run(&mut index);
    assert!(indexed.contains("stored attrs/"), "{indexed}");

    env.extend([
        ("NIXERY_BUILDER", "sqs".to_string()),
        ("NIXERY_QUEUE_URL", queue.clone()),
        ("NIXERY_SQS_ENDPOINT", moto.endpoint.clone()),
        ("NIXERY_SUBSTITUTER", cache.server.url.clone()),
        ("NIXERY_TRUSTED_KEYS", cache.key.public_key.clone()),
        ("NIXERY_FROM_CACHE", "first".to_string()),
        ("RUST_LOG", "info".to_string()),
    ]);
    let function = LambdaWatch::start(&env, work.path());

    // No worker runs: the image comes from the cache, or not at all.
    let out = work.path().join("skopeo");
    skopeo_copy_from(
        &function.addr,
        "shell/hello:latest",
        &format!("dir:{}", out.display()),
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert!(!manifest["layers"].as_array().unwrap().is_empty());
    let output = function.output();
    let steps: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("build step"))
        .filter_map(|l| l.split("step=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(steps.contains(&"fetching"), "{output}");
    for step in ["evaluating", "realising", "packing"] {
        assert!(!steps.contains(&step), "{step}: {output}");
    }
    // Nothing was queued for a worker.
    let waiting = runtime.block_on(async {
        moto.client()
            .await
            .receive_message()
            .queue_url(&queue)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap()
            .messages()
            .len()
    });
    assert_eq!(waiting, 0, "a build was queued:\n{output}");
    // The layers went into the bucket, and out of it by redirect.
    let blob_gets: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("method=GET") && l.contains("/blobs/sha256:"))
        .collect();
    assert!(!blob_gets.is_empty(), "{output}");
    assert!(
        blob_gets.iter().all(|l| l.contains("status=307")),
        "{blob_gets:#?}"
    );
    for layer in manifest["layers"].as_array().unwrap() {
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        assert!(
            s3.keys().contains(&format!("blobs/sha256/{hex}")),
            "{hex} is not in the bucket"
        );
    }
    // Streamed in: nothing is left under staging/.
    assert!(
        !s3.keys().iter().any(|k| k.starts_with("staging/")),
        "{:?}",
        s3.keys()
    );
}
