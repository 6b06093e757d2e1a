//! Private instances: an htpasswd file guards building (`build` scope) or
//! everything (`all`), and the real clients log in: skopeo `--creds`,
//! containerd's `ctr --user`, and `podman login`. Every one of them follows
//! the Bearer challenge to `/token` (containerd with the OAuth2 password
//! grant, `POST /token`), and pulls anonymously what is built in the
//! `build` scope; clients that send Basic credentials with every request
//! keep working. (docker: tests/docker.rs.)
// The integration tier: needs real Nix and skopeo (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::path::Path;
use std::process::Command;

use common::containerd::Containerd;
use common::{run, Server};
use reqwest::StatusCode;
use serde_json::Value;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";

fn htpasswd(dir: &Path) -> String {
    let hash = bcrypt::hash(PASSWORD, 5).unwrap();
    let file = dir.join("htpasswd");
    std::fs::write(&file, format!("# the team\n{USER}:{hash}\n")).unwrap();
    file.to_string_lossy().into_owned()
}

fn private(dir: &Path, scope: &str) -> Server {
    let file = htpasswd(dir);
    Server::start_with(
        &dir.join("storage"),
        &[("NIXERY_HTPASSWD", &file), ("NIXERY_AUTH_SCOPE", scope)],
    )
}

/// A 401 with the challenge clients follow: Bearer under `/v2/`, Basic
/// (which browsers answer) elsewhere.
async fn expect_401(request: reqwest::RequestBuilder) {
    let request = request.build().unwrap();
    let head = request.method() == reqwest::Method::HEAD;
    let v2 = request.url().path().starts_with("/v2");
    let host = request.url().authority().to_string();
    let response = reqwest::Client::new().execute(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    if v2 {
        let bearer = format!("Bearer realm=\"http://{host}/token\",service=\"nixery\"");
        assert!(challenge.starts_with(&bearer), "{challenge}");
    } else {
        assert_eq!(challenge, "Basic realm=\"nixery\"");
    }
    if !head {
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    }
}

fn skopeo(server: &Server, creds: Option<&str>, image: &str, out: &Path) -> std::process::Output {
    let mut command = Command::new("skopeo");
    command.args(["copy", "--src-tls-verify=false"]);
    if let Some(creds) = creds {
        command.args(["--src-creds", creds]);
    }
    command
        .arg(format!("docker://{}/{image}", server.addr))
        .arg(format!("dir:{}", out.display()));
    command.output().unwrap()
}

#[tokio::test]
async fn anyone_pulls_what_is_built_and_only_users_build() {
    let dir = tempfile::tempdir().unwrap();
    let server = private(dir.path(), "build");
    let client = reqwest::Client::new();
    let manifest = server.url("/v2/shell/hello/manifests/latest");

    // The base endpoint challenges (so that clients send what they have);
    // building needs credentials.
    expect_401(client.get(server.url("/v2/"))).await;
    let base = client
        .get(server.url("/v2/"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(base.status(), StatusCode::OK);
    expect_401(client.get(&manifest)).await;
    expect_401(client.head(&manifest).basic_auth(USER, Some("guess"))).await;
    expect_401(client.get(&manifest).basic_auth("mallory", Some(PASSWORD))).await;
    assert_eq!(server.builds_started(), 0);
    let refused = skopeo(&server, None, "shell/hello", &dir.path().join("anon"));
    assert!(!refused.status.success());

    // A user builds it ...
    let built = skopeo(
        &server,
        Some(&format!("{USER}:{PASSWORD}")),
        "shell/hello",
        &dir.path().join("user"),
    );
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert_eq!(server.builds_started(), 1);
    // ... and then anyone may pull it, but wrong credentials never pass.
    let pulled = skopeo(&server, None, "shell/hello", &dir.path().join("anon2"));
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    expect_401(client.get(&manifest).basic_auth(USER, Some("guess"))).await;
    assert_eq!(server.builds_started(), 1);

    // containerd and podman pull it anonymously too, with tokens ...
    let containerd = Containerd::start();
    run(containerd
        .pull_command()
        .arg(format!("{}/shell/hello:latest", server.addr)));
    run(common::podman(dir.path()).args([
        "pull",
        "--quiet",
        "--tls-verify=false",
        &format!("{}/shell/hello", server.addr),
    ]));
    assert_eq!(server.builds_started(), 1);
    // ... and containerd builds only with credentials, which it sends to
    // the token endpoint as an OAuth2 password grant.
    let image = format!("{}/hello/jq:latest", server.addr);
    let anonymous = containerd.pull_command().arg(&image).output().unwrap();
    assert!(!anonymous.status.success());
    assert_eq!(server.builds_started(), 1);
    run(containerd
        .pull_command()
        .args(["--user", &format!("{USER}:{PASSWORD}")])
        .arg(&image));
    assert_eq!(server.builds_started(), 2);
    let log = server.log();
    assert!(
        log.contains("method=POST path=\"/token\" status=200"),
        "{log}"
    );
}

#[tokio::test]
async fn everything_needs_credentials_in_the_all_scope() {
    let dir = tempfile::tempdir().unwrap();
    let server = private(dir.path(), "all");
    let client = reqwest::Client::new();
    for path in [
        "/v2/".to_string(),
        "/".to_string(),
        "/v2/hello/manifests/latest".to_string(),
        format!("/v2/hello/blobs/sha256:{}", "0".repeat(64)),
    ] {
        expect_401(client.get(server.url(&path))).await;
    }
    let base = client
        .get(server.url("/v2/"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(base.status(), StatusCode::OK);

    // containerd, as a Kubernetes node pulls with an image pull secret.
    let containerd = Containerd::start();
    let image = format!("{}/shell/hello:latest", server.addr);
    let pull = |user: Option<&str>| {
        let mut ctr = containerd.pull_command();
        if let Some(user) = user {
            ctr.args(["--user", user]);
        }
        ctr.arg(&image).output().unwrap()
    };
    assert!(!pull(None).status.success());
    assert!(!pull(Some(&format!("{USER}:guess"))).status.success());
    let pulled = pull(Some(&format!("{USER}:{PASSWORD}")));
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );

    // skopeo with credentials, through a token.
    let d = dir.path();
    let copied = skopeo(
        &server,
        Some(&format!("{USER}:{PASSWORD}")),
        "shell/hello",
        &d.join("skopeo"),
    );
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let refused = skopeo(&server, None, "shell/hello", &d.join("skopeo-anon"));
    assert!(!refused.status.success());

    // podman, as a workstation logs in once.
    let auth_file = d.join("auth.json");
    let podman = || {
        let mut c = common::podman(d);
        c.env("REGISTRY_AUTH_FILE", &auth_file);
        c
    };
    let wrong = podman()
        .args([
            "login",
            "--tls-verify=false",
            "-u",
            USER,
            "-p",
            "guess",
            &server.addr,
        ])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    run(podman().args([
        "login",
        "--tls-verify=false",
        "-u",
        USER,
        "-p",
        PASSWORD,
        &server.addr,
    ]));
    run(podman().args([
        "pull",
        "--quiet",
        "--tls-verify=false",
        &format!("{}/shell/hello", server.addr),
    ]));
}
