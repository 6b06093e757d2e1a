//! The clients a Kubernetes node and a workstation use: containerd's `ctr`
//! (HEAD by tag, then GET by digest) and podman pull and run what
//! `nixery serve` builds, with gzip layers and with zstd ones.
// The integration tier: needs real Nix, containerd, podman and skopeo (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::process::Command;

use common::containerd::{Containerd, NAMESPACE};
use common::{run, skopeo_copy, Server};

#[test]
fn containerd_pulls_and_runs_shell_hello() {
    let server = Server::start();
    let containerd = Containerd::start();
    let image = format!("{}/shell/hello:latest", server.addr);

    run(containerd.pull_command().arg(&image));
    // containerd asks HEAD by tag, then GET by the digest it was given.
    let log = server.log();
    assert!(
        log.contains("method=HEAD path=\"/v2/shell/hello/manifests/latest\" status=200"),
        "{log}"
    );
    assert!(
        log.contains("method=GET path=\"/v2/shell/hello/manifests/sha256:"),
        "{log}"
    );

    let flags = containerd.run_flags();
    let out = run(containerd
        .ctr()
        .arg("run")
        .args(&flags)
        .args([&image, "hello-1", "hello"]));
    assert_eq!(out, "Hello, world!\n");
    let out = run(containerd.ctr().arg("run").args(&flags).args([
        &image,
        "sh-1",
        "/bin/sh",
        "-c",
        "stat -c %a /tmp; /usr/bin/env echo env works",
    ]));
    assert_eq!(out, "1777\nenv works\n");

    // An unknown package fails the pull with the registry's answer.
    let missing = Command::new("ctr")
        .arg("-a")
        .arg(&containerd.socket)
        .args(["-n", NAMESPACE, "image", "pull", "--plain-http"])
        .arg(format!("{}/nosuchpkg:latest", server.addr))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[test]
fn podman_pulls_and_runs_shell_hello() {
    if Command::new("podman").arg("--version").output().is_err() {
        panic!("podman is not installed (.ci/setup --test installs it)");
    }
    let server = Server::start();
    podman_pulls_and_runs_hello(&format!("{}/shell/hello", server.addr));
}

/// podman pulls `image` and runs its `hello`, with no network.
fn podman_pulls_and_runs_hello(image: &str) {
    let dir = tempfile::tempdir().unwrap();
    let podman = || common::podman(dir.path());
    run(podman().args(["pull", "--quiet", "--tls-verify=false", image]));
    let out = run(podman().args([
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        image,
        "hello",
    ]));
    assert_eq!(out, "Hello, world!\n");
}

#[test]
fn zstd_images_pull_and_run_with_containerd_podman_and_skopeo() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("storage"),
        &[("NIXERY_COMPRESSION", "zstd")],
    );
    let image = format!("{}/shell/hello:latest", server.addr);

    // skopeo checks every blob's digest as it copies; the layers are zstd.
    let copy = dir.path().join("skopeo");
    skopeo_copy(
        &server,
        "shell/hello:latest",
        &format!("dir:{}", copy.display()),
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("manifest.json")).unwrap()).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert!(layers.len() > 1);
    for layer in layers {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let blob = copy.join(
            layer["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:"),
        );
        // zstd's magic number opens every layer.
        assert_eq!(
            &std::fs::read(blob).unwrap()[..4],
            &[0x28, 0xb5, 0x2f, 0xfd]
        );
    }

    let containerd = Containerd::start();
    run(containerd.pull_command().arg(&image));
    let flags = containerd.run_flags();
    let out = run(containerd
        .ctr()
        .arg("run")
        .args(&flags)
        .args([&image, "zstd-hello-1", "hello"]));
    assert_eq!(out, "Hello, world!\n");

    podman_pulls_and_runs_hello(&image);
}

/// The OCI index a tag answers with two platforms, from skopeo's copy.
fn index_of(layout: &std::path::Path) -> serde_json::Value {
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = top["manifests"][0]["digest"].as_str().unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap()
}

#[test]
fn a_multi_platform_image_copies_whole_and_pulls_by_platform() {
    let dir = tempfile::tempdir().unwrap();
    let platforms = [("NIXERY_PLATFORMS", "amd64,arm64")];
    let server = Server::start_with(&dir.path().join("storage"), &platforms);

    // skopeo --all: the index and both platforms' images, every blob checked.
    let layout = dir.path().join("oci");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/shell/hello:latest", server.addr),
        &format!("oci:{}:img", layout.display()),
    ]));
    let index = index_of(&layout);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().unwrap();
    let arches: Vec<&str> = manifests
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(arches, ["amd64", "arm64"]);
    for entry in manifests {
        assert_eq!(entry["platform"]["os"], "linux");
        let hex = entry["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        let config_hex = manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(layout.join("blobs/sha256").join(config_hex)).unwrap(),
        )
        .unwrap();
        assert_eq!(config["architecture"], entry["platform"]["architecture"]);
    }

    // containerd takes the platform it is asked for, and runs the amd64 one.
    let containerd = Containerd::start();
    let image = format!("{}/shell/hello:latest", server.addr);
    for platform in ["linux/arm64", "linux/amd64"] {
        run(containerd
            .pull_command()
            .args(["--platform", platform])
            .arg(&image));
    }
    let flags = containerd.run_flags();
    let out = run(containerd
        .ctr()
        .arg("run")
        .args(&flags)
        .args([&image, "multi-hello", "hello"]));
    assert_eq!(out, "Hello, world!\n");

    // A second registry on empty storage gives the same index, byte for byte.
    let other = Server::start_with(&dir.path().join("storage2"), &platforms);
    let again = dir.path().join("oci2");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/shell/hello:latest", other.addr),
        &format!("oci:{}:img", again.display()),
    ]));
    assert_eq!(index_of(&again), index);
}
