//! Builds on workers: the registry (local server mode, S3 storage, SQS
//! dispatch) hands builds to `nixery worker` processes through a real
//! SQS-protocol server (moto) and waits for them in storage.
// The integration tier: needs real Nix and moto (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::moto::Moto;
use common::s3::S3Server;
use common::{fixture_copy, git, nix_conf_dir, pull_and_unpack, unique, wait_until, Server};
use reqwest::StatusCode;
use serde_json::Value;

/// Everything one test needs: S3, SQS, and the shared settings.
struct Cluster {
    s3: S3Server,
    moto: Moto,
    queue: String,
    env: Vec<(&'static str, String)>,
    work: tempfile::TempDir,
}

impl Cluster {
    async fn start(extra: &[(&'static str, &str)]) -> Cluster {
        Cluster::start_with(extra, 3).await
    }

    /// With a queue that gives up on a message after `max_receives`.
    async fn start_with(extra: &[(&'static str, &str)], max_receives: u32) -> Cluster {
        let s3 = S3Server::start();
        let moto = Moto::start();
        let queue = moto
            .queue(&format!("builds-{}", unique()), 5, max_receives)
            .await;
        // The fixture, with a salt that makes its slow package new for this
        // cluster, and the slow build's duration the test asks for.
        let work = tempfile::tempdir().unwrap();
        let slow: u64 = extra
            .iter()
            .find(|(k, _)| *k == "NIXERY_FIXTURE_SLOW_SECONDS")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(20);
        let pkgs = fixture_copy(
            work.path(),
            serde_json::json!({ "salt": unique(), "slowSeconds": slow }),
        );
        let mut env = s3.nixery_env();
        env.extend([
            ("NIXERY_QUEUE_URL", queue.clone()),
            ("NIXERY_SQS_ENDPOINT", moto.endpoint.clone()),
            ("NIXERY_HEARTBEAT_SECONDS", "1".to_string()),
            ("NIXERY_PKGS_PATH", pkgs.to_string_lossy().into_owned()),
            (
                "NIX_CONF_DIR",
                nix_conf_dir().to_string_lossy().into_owned(),
            ),
        ]);
        for (k, v) in extra
            .iter()
            .filter(|(k, _)| !k.starts_with("NIXERY_FIXTURE_"))
        {
            env.retain(|(key, _)| key != k);
            env.push((k, v.to_string()));
        }
        Cluster {
            s3,
            moto,
            queue,
            env,
            work,
        }
    }

    fn registry(&self, extra: &[(&str, &str)]) -> Server {
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("NIXERY_BUILDER", "sqs"));
        env.extend_from_slice(extra);
        // The registry must not build: no Nix on its PATH.
        env.push(("PATH", "/nonexistent"));
        Server::start_with(
            &self.work.path().join(format!("registry-{}", unique())),
            &env,
        )
    }

    fn worker(&self) -> WorkerProcess {
        let log = self.work.path().join(format!("worker-{}.log", unique()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_nixery"));
        command
            .arg("worker")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        // Metrics (stdout) and the log (stderr) in one file, as CloudWatch has them.
        let file = std::fs::File::create(&log).unwrap();
        command.stdout(file.try_clone().unwrap()).stderr(file);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        WorkerProcess {
            child: command.spawn().expect("starting nixery worker"),
            log,
        }
    }

    /// Status records (`builds/<key>`, not claims), as JSON.
    fn statuses(&self) -> Vec<Value> {
        self.s3
            .keys()
            .iter()
            .filter(|k| k.starts_with("builds/") && !k.contains('.'))
            .filter_map(|k| std::fs::read(self.s3.root.join(common::s3::BUCKET).join(k)).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// Pulls `image` with one worker, kills that worker (SIGKILL) as soon
    /// as the build's status says `step`, and checks that nothing became
    /// visible; a second worker then finishes, the pull succeeds, and
    /// nothing is lost. The second worker.
    async fn kill_at_step(&self, registry: &Server, image: &str, step: &str) -> WorkerProcess {
        let mut first = self.worker();
        let pull = tokio::spawn({
            let url = registry.url(&format!("/v2/{image}/manifests/latest"));
            async move { reqwest::get(url).await.unwrap().status() }
        });
        let mut reached = false;
        for _ in 0..12_000 {
            if self.statuses().iter().any(|s| s["step"] == step) {
                reached = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(reached, "the build never reached {step}:\n{}", first.log());
        first.kill();
        assert!(
            self.images().is_empty(),
            "an image became visible from a build killed at {step}"
        );
        let second = self.worker();
        let status = tokio::time::timeout(Duration::from_secs(240), pull)
            .await
            .expect("the pull never finished")
            .unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "{}\n{}",
            registry.log(),
            second.log()
        );
        assert_eq!(self.images().len(), 1);
        self.nothing_lost();
        second
    }

    /// Every image record's manifest and blobs are stored and match their
    /// digests: what a fault must never break.
    fn nothing_lost(&self) {
        use nixery::oci::digest::sha256_digest;
        let bucket = self.s3.root.join(common::s3::BUCKET);
        let read = |key: &str| {
            std::fs::read(bucket.join(key)).unwrap_or_else(|e| panic!("{key} is gone: {e}"))
        };
        let images = self.images();
        assert!(!images.is_empty(), "no image to check");
        for image in images {
            let record: Value = serde_json::from_slice(&read(&image)).unwrap();
            let digest = record["manifest_digest"].as_str().unwrap();
            let manifest = read(&format!("manifests/sha256/{}", &digest[7..]));
            assert_eq!(sha256_digest(&manifest), digest, "{image}'s manifest");
            let manifest: Value = serde_json::from_slice(&manifest).unwrap();
            let layers = manifest["layers"].as_array().unwrap();
            for descriptor in layers.iter().chain([&manifest["config"]]) {
                let digest = descriptor["digest"].as_str().unwrap();
                let blob = read(&format!("blobs/sha256/{}", &digest[7..]));
                assert_eq!(sha256_digest(&blob), digest, "{image}'s blob");
            }
        }
    }

    fn images(&self) -> Vec<String> {
        self.s3
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("images/"))
            .collect()
    }
}

struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn builds_started(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("build started"))
            .count()
    }
    /// SIGKILL, as when a machine dies.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn get(server: &Server, path: &str) -> (StatusCode, String, Value) {
    let r = reqwest::get(server.url(path)).await.unwrap();
    let status = r.status();
    let digest = r
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, digest, body)
}

#[tokio::test]
async fn fifty_concurrent_pulls_share_one_build() {
    let cluster = Cluster::start(&[]).await;
    // Two registry instances (as two function instances would be), 25
    // pulls each: the claim in storage makes one build between them.
    let registries = [cluster.registry(&[]), cluster.registry(&[])];
    let workers = [cluster.worker(), cluster.worker()];
    let pulls = (0..50).map(|i| get(&registries[i % 2], "/v2/shell/jq/manifests/latest"));
    let results = futures_util::future::join_all(pulls).await;
    for (status, _, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}\n{}", registries[0].log());
    }
    let digest = &results[0].1;
    assert!(results.iter().all(|r| &r.1 == digest));
    let builds: usize = workers.iter().map(WorkerProcess::builds_started).sum();
    assert_eq!(
        builds,
        1,
        "worker logs:\n{}\n{}",
        workers[0].log(),
        workers[1].log()
    );
    let dispatched: usize = registries
        .iter()
        .map(|r| {
            r.log()
                .lines()
                .filter(|l| l.contains("build dispatched"))
                .count()
        })
        .sum();
    assert_eq!(dispatched, 1);
    // The finished build's status says so.
    assert!(
        cluster.statuses().iter().any(|s| s["state"] == "done"),
        "{:?}",
        cluster.statuses()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_build_leaves_nothing_and_another_finishes() {
    let cluster = Cluster::start(&[("NIXERY_FIXTURE_SLOW_SECONDS", "5")]).await;
    let registry = cluster.registry(&[("NIXERY_BUILD_TIMEOUT", "300")]);
    // Killed while Nix is building.
    let second = cluster
        .kill_at_step(&registry, "shell/slow", "realising")
        .await;
    assert!(second.builds_started() >= 1);
    // And the image runs.
    let rootfs = pull_and_unpack(&registry, "shell/slow:latest", cluster.work.path());
    assert_eq!(common::chroot_sh(&rootfs, "slow"), "slow done\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_writes_slower_than_the_visibility_timeout_start_no_second_build() {
    // The queue hides a taken message for 5 s; every status write takes
    // 7 s. The worker keeps the message hidden on its own clock, so the
    // idle second worker never gets it; heartbeats still change often
    // enough (every 2 s + 7 s, under 6 x 2 s) that no pull takes over.
    let cluster = Cluster::start(&[
        ("NIXERY_FIXTURE_SLOW_SECONDS", "20"),
        ("NIXERY_HEARTBEAT_SECONDS", "2"),
    ])
    .await;
    let registry = cluster.registry(&[("NIXERY_BUILD_TIMEOUT", "300")]);
    let first = cluster.worker();
    let second = cluster.worker();
    cluster.s3.slow_puts("/builds/", Duration::from_secs(7));

    let (status, _, _) = get(&registry, "/v2/shell/slow/manifests/latest").await;
    assert_eq!(status, StatusCode::OK, "{}", registry.log());
    assert_eq!(
        first.builds_started() + second.builds_started(),
        1,
        "a second worker started the build:\n{}\n{}",
        first.log(),
        second.log()
    );
    assert_eq!(cluster.images().len(), 1);
    cluster.nothing_lost();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_packing_leaves_nothing_and_another_finishes() {
    let cluster = Cluster::start(&[]).await;
    let registry = cluster.registry(&[("NIXERY_BUILD_TIMEOUT", "300")]);
    // Killed while it packs and uploads the 50 MB layer.
    cluster.kill_at_step(&registry, "big", "packing").await;
}

#[tokio::test]
async fn unknown_packages_and_failed_builds_reach_the_puller_quickly_and_are_remembered() {
    let cluster = Cluster::start(&[]).await;
    let registry = cluster.registry(&[
        ("NIXERY_BUILD_TIMEOUT", "300"),
        ("NIXERY_FAILURE_TTL", "300"),
    ]);
    let worker = cluster.worker();

    // A build timeout of 300 s: these answers come from the status record.
    let (status, _, body) = get(&registry, "/v2/hello/nosuchpkg/manifests/latest").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("nosuchpkg"));

    let (status, _, body) = get(&registry, "/v2/failing/manifests/latest").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("fixture build failure: this package always fails"),
        "{message}"
    );

    // Within the failure TTL both are answered again without a new build.
    let before = worker.builds_started();
    assert_eq!(before, 2);
    assert_eq!(
        get(&registry, "/v2/failing/manifests/latest").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        get(&registry, "/v2/nosuchpkg/hello/manifests/latest")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(worker.builds_started(), before);
    let failed: Vec<Value> = cluster
        .statuses()
        .into_iter()
        .filter(|s| s["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
}

#[tokio::test]
async fn a_build_longer_than_the_timeout_goes_on_and_the_next_pull_finds_it() {
    let cluster = Cluster::start(&[("NIXERY_FIXTURE_SLOW_SECONDS", "6")]).await;
    let registry = cluster.registry(&[("NIXERY_BUILD_TIMEOUT", "2")]);
    let worker = cluster.worker();

    let (status, _, body) = get(&registry, "/v2/slow/manifests/latest").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("still being built") && message.contains("pull again"),
        "{message}"
    );
    // The error says where to watch the build, and there it runs, as the
    // worker reports it.
    let status_url = body["errors"][0]["detail"]["status_url"].as_str().unwrap();
    let key = status_url.rsplit('/').next().unwrap().to_string();
    assert!(message.ends_with(status_url), "{message}");
    let (status, _, build) = get(&registry, &format!("/api/builds/{key}")).await;
    assert_eq!(status, StatusCode::OK, "{build}");
    assert!(
        matches!(build["state"].as_str(), Some("queued" | "running")),
        "{build}"
    );
    assert_eq!(build["name"], "slow");

    let mut found = false;
    for _ in 0..60 {
        if get(&registry, "/v2/slow/manifests/latest").await.0 == StatusCode::OK {
            found = true;
            break;
        }
    }
    assert!(found, "the build never finished:\n{}", worker.log());
    assert_eq!(worker.builds_started(), 1);
    let (_, _, build) = get(&registry, &format!("/api/builds/{key}")).await;
    assert_eq!(build["state"], "done", "{build}");

    // Every line of the build names its image; its counts are in the log
    // in embedded metric format.
    let log = worker.log();
    let build_lines: Vec<&str> = log.lines().filter(|l| l.contains("build step")).collect();
    assert!(build_lines.len() >= 5, "{log}");
    assert!(
        build_lines
            .iter()
            .all(|l| l.contains(&format!("build{{image={key}}}"))),
        "{build_lines:#?}"
    );
    let emf: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"_aws\":"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(emf.len(), 1, "{log}");
    assert_eq!(emf[0]["Service"], nixery::metrics::SERVICE_WORKER);
    assert_eq!(emf[0][nixery::metrics::BUILDS], 1, "{}", emf[0]);
    assert_eq!(emf[0][nixery::metrics::BUILD_FAILURES], 0);
    assert!(emf[0][nixery::metrics::BUILD_DURATION][0].as_u64().unwrap() >= 6000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_whose_workers_keep_dying_ends_failed_and_in_the_dead_letter_queue() {
    // Messages go to the dead-letter queue after one receive that was not
    // followed by a delete.
    let cluster = Cluster::start_with(&[("NIXERY_FIXTURE_SLOW_SECONDS", "60")], 1).await;
    let registry = cluster.registry(&[("NIXERY_BUILD_TIMEOUT", "300")]);

    let pull = tokio::spawn({
        let url = registry.url("/v2/slow/manifests/latest");
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    });
    // Each attempt: a worker takes it, gets to Nix, and dies.
    for attempt in 1..=nixery::dispatch::status::MAX_ATTEMPTS {
        let mut worker = cluster.worker();
        let running = wait_until(Duration::from_secs(60), || {
            cluster
                .statuses()
                .iter()
                .any(|s| s["attempt"] == attempt && s["step"] == "realising")
        });
        assert!(
            running,
            "attempt {attempt} never ran:\n{}\n{}",
            worker.log(),
            registry.log()
        );
        worker.kill();
    }
    let (status, body) = tokio::time::timeout(Duration::from_secs(120), pull)
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("abandoned") && message.contains("dead-letter"),
        "{message}"
    );
    assert!(cluster.images().is_empty());
    assert!(
        cluster.statuses().iter().any(|s| s["state"] == "failed"),
        "{:?}",
        cluster.statuses()
    );

    // A worker that looks at the queue now finds nothing to build: the
    // abandoned messages are moved to the dead-letter queue instead.
    let drain = cluster.worker();
    let sqs = cluster.moto.client().await;
    let dlq = sqs
        .get_queue_url()
        .queue_name(format!(
            "{}-dead",
            cluster.queue.rsplit('/').next().unwrap()
        ))
        .send()
        .await
        .unwrap();
    let dead = wait_until(Duration::from_secs(30), || {
        let sqs = sqs.clone();
        let url = dlq.queue_url().unwrap().to_string();
        let count = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    let attrs = sqs
                        .get_queue_attributes()
                        .queue_url(url)
                        .attribute_names(
                            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
                        )
                        .send()
                        .await
                        .unwrap();
                    attrs.attributes().unwrap()
                        [&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages]
                        .parse::<u32>()
                        .unwrap()
                })
        })
        .join()
        .unwrap();
        count > 0
    });
    assert!(dead, "nothing reached the dead-letter queue");
    assert_eq!(drain.builds_started(), 0, "{}", drain.log());
}

/// The Lambda configuration with a git package source: the registry has
/// no git (nothing on its PATH), so it asks a worker what tags mean.
#[tokio::test]
async fn a_git_source_is_resolved_by_the_workers_for_a_registry_without_git() {
    let cluster = Cluster::start(&[]).await;
    let repo = fixture_copy(cluster.work.path(), serde_json::json!({ "salt": unique() }));
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "packages"]);
    let released = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["checkout", "-qb", "proposal"]);
    std::fs::write(repo.join("settings.json"), "{\"salt\": \"proposal\"}").unwrap();
    git(&repo, &["commit", "-qam", "proposal"]);
    let proposal = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["update-ref", "refs/pull/7/head", &proposal]);
    git(&repo, &["checkout", "-q", "main"]);
    git(&repo, &["branch", "-D", "proposal"]);

    let _worker = cluster.worker();
    let repo_url = repo.to_string_lossy().into_owned();
    let registry = cluster.registry(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_PKGS_REPO", &repo_url),
        ("NIXERY_BUILD_TIMEOUT", "300"),
    ]);
    let client = reqwest::Client::new();
    for tag in ["latest", "main", released.as_str()] {
        let response = client
            .get(registry.url(&format!("/v2/hello/manifests/{tag}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{tag}: {}", registry.log());
    }
    let refused = client
        .get(registry.url(&format!("/v2/hello/manifests/{proposal}")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let unknown = client
        .get(registry.url("/v2/hello/manifests/no-such-branch"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    // The answers are shared through storage.
    assert!(cluster.s3.keys().iter().any(|k| k.starts_with("sources/")));
}
