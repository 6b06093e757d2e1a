//! End to end with real pull clients: skopeo copies what `nixery serve`
//! builds, umoci unpacks it, and the image runs in a chroot.
// The integration tier: needs real Nix, skopeo and umoci (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{chroot_sh, pull_and_unpack, skopeo_copy, Server};
use sha2::{Digest, Sha256};

fn sha256_file(path: &Path) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
    )
}

/// `skopeo copy ... dir:` keeps the served manifest bytes; their digest.
fn pulled_manifest_digest(server: &Server, image: &str, work: &Path) -> (String, Vec<u8>) {
    let dir = work.join(format!("dir-{}", common::unique()));
    skopeo_copy(server, image, &format!("dir:{}", dir.display()));
    let manifest = dir.join("manifest.json");
    (sha256_file(&manifest), std::fs::read(&manifest).unwrap())
}

#[test]
fn shell_hello_runs_after_skopeo_and_umoci() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start();
    let rootfs = pull_and_unpack(&server, "shell/hello:latest", work.path());

    assert_eq!(chroot_sh(&rootfs, "hello"), "Hello, world!\n");
    // bash from the shell meta-package, coreutils via /usr/bin/env.
    assert_eq!(
        chroot_sh(&rootfs, "/usr/bin/env bash -c 'echo via env'"),
        "via env\n"
    );
    assert_eq!(
        chroot_sh(
            &rootfs,
            "test -x /bin/nano && test -x /bin/sponge && test -x /bin/bash && echo ok"
        ),
        "ok\n"
    );
    let tmp = std::fs::symlink_metadata(rootfs.join("tmp")).unwrap();
    assert!(tmp.is_dir());
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    assert!(rootfs.join("etc/passwd").is_file());
}

#[test]
fn cached_images_need_no_nix_and_survive_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");

    let first = Server::start_with(&storage, &[]);
    let (digest, bytes) = pulled_manifest_digest(&first, "shell/hello:latest", work.path());
    let (again, _) = pulled_manifest_digest(&first, "hello/shell:latest", work.path());
    assert_eq!(digest, again);
    assert_eq!(first.builds_started(), 1, "the second pull built again");
    drop(first);

    // A restarted server without Nix on its PATH serves the same image.
    let no_nix = work.path().join("empty-path");
    std::fs::create_dir_all(&no_nix).unwrap();
    let second = Server::start_with(&storage, &[("PATH", no_nix.to_str().unwrap())]);
    let (restarted, _) = pulled_manifest_digest(&second, "shell/hello:latest", work.path());
    assert_eq!(digest, restarted);
    assert_eq!(second.builds_started(), 0);
    // And a new image cannot be built there: proof that Nix really is absent.
    let r = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/jq:latest", second.addr))
        .output()
        .unwrap();
    assert!(!r.status.success());
    drop(second);

    // Two builds from empty storage give byte-identical manifests.
    let fresh = Server::start();
    let (rebuilt, rebuilt_bytes) =
        pulled_manifest_digest(&fresh, "shell/hello:latest", work.path());
    assert_eq!(rebuilt, digest);
    assert_eq!(rebuilt_bytes, bytes);
}

/// Everything about a tree that a layer must carry.
fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let what = if meta.file_type().is_symlink() {
            format!("link -> {}", std::fs::read_link(&path).unwrap().display())
        } else if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            format!("dir {:o}", meta.mode() & 0o7777)
        } else {
            format!("file {:o} {}", meta.mode() & 0o7777, sha256_file(&path))
        };
        out.insert(rel, what);
    }
    out
}

#[test]
fn tar_edge_cases_arrive_intact() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start();
    let rootfs = pull_and_unpack(&server, "edgecases:latest", work.path());

    // The store path, found through the /bin link the image has for it.
    let script = std::fs::read_link(rootfs.join("bin/edge-script")).unwrap();
    let store_path = script.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(store_path.starts_with("/nix/store"));
    let unpacked = rootfs.join(store_path.strip_prefix("/").unwrap());

    // Same names, types, modes, contents and link targets as in the store.
    let want = describe(&store_path);
    let got = describe(&unpacked);
    assert_eq!(got, want);
    for needle in [
        "names/ünïcødé-文件.txt",
        "names/name with spaces.txt",
        "empty-dir",
        "links/dangling",
        "hardlink/b",
    ] {
        assert!(
            want.contains_key(Path::new(needle)),
            "the fixture lacks {needle}"
        );
    }
    assert!(
        want.keys().any(|p| p.as_os_str().len() > 255),
        "no path over 255 bytes"
    );
    // The hard link pair arrives as two files with the content: a NAR has
    // no hard links, so a layer never does, and a path built here gives
    // the same layer as the same path substituted from a binary cache.
    assert_eq!(
        std::fs::read(unpacked.join("hardlink/a")).unwrap(),
        std::fs::read(unpacked.join("hardlink/b")).unwrap()
    );
    // And it runs.
    let ran = common::run(Command::new("chroot").arg(&rootfs).arg("/bin/edge-script"));
    assert_eq!(ran, "edge-script ran\n");
}

/// Follows a symlink inside an unpacked rootfs (absolute targets are
/// relative to the rootfs).
fn inside(rootfs: &Path, link: &str) -> PathBuf {
    let target = std::fs::read_link(rootfs.join(link)).unwrap();
    rootfs.join(target.strip_prefix("/").unwrap_or(&target))
}

#[test]
fn multi_output_packages_install_their_chosen_outputs() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start();
    let rootfs = pull_and_unpack(&server, "libmulti:latest", work.path());
    // meta.outputsToInstall = [ "out" "dev" ]: both are in, doc is not.
    assert!(inside(&rootfs, "include/multi.h").is_file());
    assert!(inside(&rootfs, "lib/libmulti.so").is_file());
    let store: Vec<String> = std::fs::read_dir(rootfs.join("nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(store.iter().any(|p| p.ends_with("-dev")), "{store:?}");
    assert!(!store.iter().any(|p| p.ends_with("-doc")), "{store:?}");
}

#[test]
fn a_50_mb_package_arrives_whole() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start();
    // skopeo verifies every blob's digest as it copies.
    let dir = work.path().join("big");
    skopeo_copy(&server, "big:latest", &format!("dir:{}", dir.display()));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let total: u64 = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    assert!(total > 25_000_000, "layers hold only {total} bytes");
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let file = dir.join(digest.strip_prefix("sha256:").unwrap());
        assert_eq!(sha256_file(&file), digest);
    }
}
