//! docker for tests: a private `dockerd` (Debian's `docker.io`) whose
//! socket, data, exec root and pid file live in a temp dir, with no
//! network of its own (no bridge, no iptables), and a private
//! `DOCKER_CONFIG` so that `docker login` never touches the machine's.
//! Stopped by its PID on drop, never by name; a dockerd the system runs
//! is left alone.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::containerd::unmount_below;
use super::wait_until;

/// A dockerd of this test's own.
pub struct Docker {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Docker {
    pub fn start() -> Docker {
        assert!(
            Command::new("dockerd").arg("--version").output().is_ok(),
            "dockerd is not installed (.ci/setup --test installs docker.io)"
        );
        // Unix socket paths are limited to 108 bytes: keep the dir short.
        let dir = tempfile::Builder::new()
            .prefix("dkr")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let socket = dir.join("docker.sock");
        std::fs::create_dir_all(dir.join("config")).unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let mut docker = Docker { child, dir, socket };
        let ready = wait_until(Duration::from_secs(60), || {
            docker
                .docker()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !ready || docker.child.try_wait().unwrap().is_some() {
            panic!("dockerd did not start:\n{}", docker.log());
        }
        docker
    }

    /// The docker client, talking to this daemon with this test's config.
    pub fn docker(&self) -> Command {
        let mut command = Command::new("docker");
        command
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.join("config"))
            .stdin(Stdio::null());
        command
    }

    /// `docker <args>`; its output, whatever the outcome.
    pub fn output(&self, args: &[&str]) -> Output {
        self.docker().args(args).output().unwrap()
    }

    /// `docker <args>`, which must succeed; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            output.status.success(),
            "docker {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `docker <args>`, which must fail; what it printed on stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            !output.status.success(),
            "docker {args:?} succeeded:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// `docker login` to `registry`, the password on stdin as docker
    /// wants it; the whole output.
    pub fn login(&self, registry: &str, user: &str, password: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .docker()
            .args(["login", "--username", user, "--password-stdin", registry])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(password.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `docker run --rm --network none <image> <command...>`: its stdout.
    pub fn run_image(&self, image: &str, command: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--network", "none", image];
        args.extend_from_slice(command);
        self.run(&args)
    }

    /// Removes every image, so the next pull downloads everything.
    pub fn forget_images(&self) {
        let ids = self.run(&["images", "-aq"]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rmi", "-f"];
            args.extend(ids);
            self.run(&args);
        }
    }

    /// The daemon's major version (Debian's docker.io is 20).
    pub fn server_major_version(&self) -> u32 {
        let version = self.run(&["version", "--format", "{{.Server.Version}}"]);
        version
            .trim()
            .split('.')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // Containers run with --rm; anything left is stopped with the
        // daemon. SIGTERM lets dockerd stop its own containerd.
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if !wait_until(Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten().is_some()
        }) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
