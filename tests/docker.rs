//! docker, the mission's first client, against `nixery serve`: pulls by
//! tag and by digest that then run, `docker login` and `docker logout` in
//! both auth scopes (through the Bearer token flow docker needs for
//! anonymous pulls), one platform of a multi-platform index at a time,
//! zstd layers where this dockerd supports them, and what docker prints
//! when it gets no image. Each test runs a private dockerd (Debian's
//! `docker.io`, 20.10; `common::docker`).
// The integration tier: needs real Nix, dockerd and the docker client (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::path::Path;

use common::docker::Docker;
use common::moto::Moto;
use common::Server;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";
const HELLO: &str = "Hello, world!\n";

fn private(dir: &Path, scope: &str) -> Server {
    let hash = bcrypt::hash(PASSWORD, 5).unwrap();
    let file = dir.join("htpasswd");
    std::fs::write(&file, format!("{USER}:{hash}\n")).unwrap();
    Server::start_with(
        &dir.join("storage"),
        &[
            ("NIXERY_HTPASSWD", file.to_str().unwrap()),
            ("NIXERY_AUTH_SCOPE", scope),
        ],
    )
}

#[test]
fn docker_pulls_by_tag_and_by_digest_and_runs_what_it_pulled() {
    let server = Server::start();
    let docker = Docker::start();
    let image = format!("{}/shell/hello", server.addr);

    let pulled = docker.run(&["pull", &image]);
    assert!(pulled.contains("Downloaded newer image"), "{pulled}");
    assert_eq!(docker.run_image(&image, &["hello"]), HELLO);
    assert_eq!(
        docker.run_image(
            &image,
            &["/bin/sh", "-c", "stat -c %a /tmp; /usr/bin/env echo ok"]
        ),
        "1777\nok\n"
    );

    // The digest docker recorded is the registry's, and pulls alone.
    let repo_digest = docker.run(&["inspect", "--format", "{{index .RepoDigests 0}}", &image]);
    let repo_digest = repo_digest.trim();
    let digest = repo_digest.rsplit_once('@').unwrap().1;
    let served = server.log();
    assert!(
        served.contains(&format!("/v2/shell/hello/manifests/{digest}\" status=200")),
        "docker did not fetch {digest}:\n{served}"
    );
    docker.forget_images();
    let by_digest = format!("{image}@{digest}");
    docker.run(&["pull", &by_digest]);
    assert_eq!(docker.run_image(&by_digest, &["hello"]), HELLO);
    assert_eq!(server.builds_started(), 1);
}

#[test]
fn docker_pulls_what_is_built_anonymously_and_logs_in_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let server = private(dir.path(), "build");
    let docker = Docker::start();
    let image = format!("{}/shell/hello", server.addr);

    // Not built yet: anonymous docker is told to log in, and nothing builds.
    let refused = docker.fails(&["pull", &image]);
    assert!(
        refused.contains("may require 'docker login'")
            && refused.contains("building it needs credentials"),
        "{refused}"
    );
    assert_eq!(server.builds_started(), 0);

    // Wrong passwords do not log in.
    let wrong = docker.login(&server.addr, USER, "guess");
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        said.contains("unauthorized") && said.contains("the credentials are not valid"),
        "{said}"
    );

    // Logged in, docker builds it ...
    let login = docker.login(&server.addr, USER, PASSWORD);
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    docker.run(&["pull", &image]);
    assert_eq!(server.builds_started(), 1);
    assert_eq!(docker.run_image(&image, &["hello"]), HELLO);
    // ... through tokens (a token request, then Bearer requests).
    let log = server.log();
    assert!(
        log.contains("path=\"/token\" status=200"),
        "no token was issued:\n{log}"
    );

    // Logged out, anyone pulls what is built, and runs it.
    docker.run(&["logout", &server.addr]);
    docker.forget_images();
    docker.run(&["pull", &image]);
    assert_eq!(docker.run_image(&image, &["hello"]), HELLO);
    assert_eq!(server.builds_started(), 1);
    // Still, nothing new builds anonymously.
    let refused = docker.fails(&["pull", &format!("{}/hello/jq", server.addr)]);
    assert!(
        refused.contains("building it needs credentials"),
        "{refused}"
    );
    assert_eq!(server.builds_started(), 1);
}

#[test]
fn docker_needs_a_login_for_everything_in_the_all_scope() {
    let dir = tempfile::tempdir().unwrap();
    let server = private(dir.path(), "all");
    let docker = Docker::start();
    let image = format!("{}/shell/hello", server.addr);

    let refused = docker.fails(&["pull", &image]);
    assert!(refused.contains("unauthorized"), "{refused}");
    assert_eq!(server.builds_started(), 0);

    let login = docker.login(&server.addr, USER, PASSWORD);
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    docker.run(&["pull", &image]);
    assert_eq!(docker.run_image(&image, &["hello"]), HELLO);

    // Logged out, even what is built needs the login again.
    docker.run(&["logout", &server.addr]);
    docker.forget_images();
    let refused = docker.fails(&["pull", &image]);
    assert!(refused.contains("unauthorized"), "{refused}");
    assert_eq!(server.builds_started(), 1);
}

#[test]
fn docker_takes_the_platform_it_is_asked_for_from_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_PLATFORMS", "amd64,arm64")],
    );
    let docker = Docker::start();
    let image = format!("{}/shell/hello", server.addr);
    for (platform, arch) in [("linux/arm64", "arm64"), ("linux/amd64", "amd64")] {
        docker.run(&["pull", "--platform", platform, &image]);
        let pulled = docker.run(&["inspect", "--format", "{{.Os}}/{{.Architecture}}", &image]);
        assert_eq!(pulled.trim(), format!("linux/{arch}"));
    }
    // The amd64 one runs here.
    assert_eq!(docker.run_image(&image, &["hello"]), HELLO);
}

#[test]
fn zstd_layers_run_where_this_dockerd_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_COMPRESSION", "zstd")],
    );
    let docker = Docker::start();
    let image = format!("{}/shell/hello", server.addr);
    let pull = docker.output(&["pull", &image]);
    if docker.server_major_version() >= 23 {
        // Docker 23 reads zstd layers.
        assert!(pull.status.success());
        assert_eq!(docker.run_image(&image, &["hello"]), HELLO);
    } else {
        // Debian's docker.io (20.10) does not: it says so when it unpacks
        // (the README says which dockerd reads zstd).
        assert!(!pull.status.success());
        let said = String::from_utf8_lossy(&pull.stderr);
        assert!(
            said.contains("failed to register layer") && said.contains("invalid tar header"),
            "{said}"
        );
    }
}

#[tokio::test]
async fn what_docker_prints_when_it_gets_no_image() {
    let server = Server::start();
    let docker = Docker::start();

    // Unknown packages: named, with where the build's status is.
    let unknown = docker.fails(&["pull", &format!("{}/hello/nosuchpkg", server.addr)]);
    assert!(
        unknown.contains("not found: manifest unknown: unknown packages: nosuchpkg"),
        "{unknown}"
    );

    // A failed build: Nix's words and the status URL reach the user.
    let failed = docker.fails(&["pull", &format!("{}/failing", server.addr)]);
    assert!(
        failed.contains("unknown: building the image failed")
            && failed.contains("fixture build failure: this package always fails")
            && failed.contains(&format!("build status: http://{}/builds/", server.addr)),
        "{failed}"
    );

    // Still being built: a registry whose builds go to a queue no worker
    // takes, and which waits two seconds. docker shows only the status
    // of a 5xx, not its message.
    let moto = Moto::start();
    let queue = moto.queue("docker-builds", 30, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let waiting = Server::start_with(
        &dir.path().join("storage"),
        &[
            ("NIXERY_BUILDER", "sqs"),
            ("NIXERY_QUEUE_URL", &queue),
            ("NIXERY_SQS_ENDPOINT", &moto.endpoint),
            ("NIXERY_BUILD_TIMEOUT", "2"),
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "y"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let building = docker.fails(&["pull", &format!("{}/hello", waiting.addr)]);
    assert!(
        building.contains("received unexpected HTTP status: 503 Service Unavailable"),
        "{building}"
    );
    assert!(
        waiting
            .log()
            .contains("path=\"/v2/hello/manifests/latest\" status=503"),
        "{}",
        waiting.log()
    );
}
