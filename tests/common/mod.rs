//! Shared by the integration tests: the fixture package set, a running
//! `nixery serve` on 127.0.0.1 (stopped on drop), and helpers to run the
//! real pull clients.
#![allow(dead_code)]

pub mod binary_cache;
pub mod containerd;
pub mod docker;
pub mod forge;
pub mod images;
pub mod moto;
pub mod s3;
pub mod template;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture package set, with its busybox copied in (it is not committed).
pub fn fixture_pkgs() -> PathBuf {
    static COPY: Once = Once::new();
    let pkgs = repo().join("tests/fixtures/pkgs");
    COPY.call_once(|| {
        let bin = pkgs.join("busybox/bin");
        if !bin.join("busybox").exists() {
            std::fs::create_dir_all(&bin).expect("creating the fixture busybox directory");
            std::fs::copy("/bin/busybox", bin.join("busybox.tmp"))
                .expect("copying /bin/busybox (install busybox-static)");
            std::fs::rename(bin.join("busybox.tmp"), bin.join("busybox")).unwrap();
        }
    });
    pkgs
}

/// A copy of the fixture package set under `dir`, with `settings` as its
/// settings.json (for example `{"slowSeconds": 5, "salt": "..."}`). Store
/// paths of packages the settings do not touch are the same as the
/// original's, so copies share builds.
pub fn fixture_copy(dir: &Path, settings: serde_json::Value) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let to = dir.join(format!("pkgs-{}", unique()));
    copy(&fixture_pkgs(), &to);
    std::fs::write(to.join("settings.json"), settings.to_string()).unwrap();
    to
}

/// podman with its root, run root and temporary files under `dir`, in
/// the settings this machine allows (vfs storage, cgroupfs, runc).
pub fn podman(dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--events-backend",
            "none",
        ]);
    c
}

/// Runs git in `dir` with a fixed identity and `main` as the first branch;
/// its stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.org",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir))
    .trim()
    .to_string()
}

/// Nix settings for a daemon-less, offline, root machine.
pub fn nix_conf_dir() -> PathBuf {
    std::env::var_os("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ci/nix"))
}

/// A `nixery serve` process with its own storage; killed on drop.
pub struct Server {
    child: Child,
    pub addr: String,
    pub storage: PathBuf,
    pub log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// A server with fresh, empty storage.
    pub fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let mut server = Server::start_with(&storage, &[]);
        server._dir = Some(dir);
        server
    }

    /// A server on the given storage root, with extra environment.
    pub fn start_with(storage: &Path, env: &[(&str, &str)]) -> Server {
        let log = storage.with_extension(format!("log-{}", unique()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_nixery"));
        command
            .arg("serve")
            .env("NIXERY_LISTEN", "127.0.0.1:0")
            .env("NIXERY_PKGS_PATH", fixture_pkgs())
            .env("STORAGE_PATH", storage)
            .env("NIX_CONF_DIR", nix_conf_dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("starting nixery serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = match line.trim().strip_prefix("nixery listening on http://") {
            Some(addr) => addr.to_string(),
            None => {
                let _ = child.kill();
                panic!(
                    "nixery did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Server {
            child,
            addr,
            storage: storage.to_path_buf(),
            log,
            _dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `limit` for the server to exit:
    /// whether it did.
    pub fn terminate(&mut self, limit: Duration) -> bool {
        // SAFETY: kill(2) only sends a signal to the child this guard owns.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let child = &mut self.child;
        wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))))
    }

    /// How many builds this server has started.
    pub fn builds_started(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("build started"))
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A child process killed when dropped, so a failing test leaves none
/// behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(command: &mut Command) -> String {
    let started = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({:?}, {:?}):\nstdout: {}\nstderr: {}",
        output.status,
        started.elapsed(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `skopeo copy` from the server to a local transport (`dir:...`, `oci:...`).
pub fn skopeo_copy(server: &Server, image: &str, dest: &str) {
    skopeo_copy_from(&server.addr, image, dest)
}

/// `skopeo copy` from a registry at `addr` (host:port, plain HTTP).
pub fn skopeo_copy_from(addr: &str, image: &str, dest: &str) {
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{addr}/{image}"),
        dest,
    ]));
}

/// Pulls with skopeo into an OCI layout, unpacks with umoci; the rootfs.
pub fn pull_and_unpack(server: &Server, image: &str, work: &Path) -> PathBuf {
    let layout = work.join(format!("oci-{}", unique()));
    skopeo_copy(server, image, &format!("oci:{}:img", layout.display()));
    let bundle = work.join(format!("bundle-{}", unique()));
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:img", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

/// Runs a shell command inside an unpacked rootfs; its stdout.
pub fn chroot_sh(rootfs: &Path, script: &str) -> String {
    run(Command::new("chroot")
        .arg(rootfs)
        .args(["/bin/sh", "-c", script]))
}

/// Polls until `check` returns true or the time is up.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// The DOM of `url` after its scripts ran, from headless Chromium (its
/// timers run on virtual time: a few seconds of the page's life).
pub fn browser_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    run(Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url))
}
