//! containerd for tests: a daemon whose root, state and sockets live in a
//! temp dir (no CRI plugin, overlayfs snapshots), driven with `ctr`, and
//! torn down with its shims and mounts on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

pub const NAMESPACE: &str = "nixerytest";

/// A containerd daemon whose root, state and sockets are in a temp dir.
pub struct Containerd {
    child: Child,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl Containerd {
    pub fn start() -> Containerd {
        // Unix socket paths are limited to 108 bytes: keep the dir short.
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let socket = dir.join("containerd.sock");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let mut daemon = Containerd { child, dir, socket };
        let ready = wait_until(Duration::from_secs(30), || {
            Command::new("ctr")
                .arg("-a")
                .arg(&daemon.socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !ready || daemon.child.try_wait().unwrap().is_some() {
            panic!(
                "containerd did not start:\n{}",
                std::fs::read_to_string(daemon.dir.join("containerd.log")).unwrap_or_default()
            );
        }
        daemon.socket = daemon.dir.join("containerd.sock");
        daemon
    }

    pub fn ctr(&self) -> Command {
        let mut command = Command::new("ctr");
        command.arg("-a").arg(&self.socket).args(["-n", NAMESPACE]);
        command
    }

    /// `ctr image pull` over plain HTTP into the overlayfs snapshotter;
    /// arguments (such as `--user`) go before the image.
    pub fn pull_command(&self) -> Command {
        let mut command = self.ctr();
        command.args([
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
        ]);
        command
    }

    pub fn run_flags(&self) -> Vec<String> {
        let d = self.dir.display();
        ["--rm", "--snapshotter", "overlayfs"]
            .iter()
            .map(|s| s.to_string())
            .chain([
                format!("--runc-root={d}/runc"),
                format!("--fifo-dir={d}/fifo"),
            ])
            .collect()
    }

    fn ids(&self, what: &[&str]) -> Vec<String> {
        self.ctr()
            .args(what)
            .arg("-q")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.ids(&["task", "ls"]) {
            let _ = self
                .ctr()
                .args(["task", "kill", "-s", "SIGKILL", &id])
                .output();
            let _ = self.ctr().args(["task", "rm", "-f", &id]).output();
        }
        for id in self.ids(&["container", "ls"]) {
            let _ = self.ctr().args(["container", "rm", &id]).output();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims outlive their daemon: stop the ones serving this socket.
        let marker = format!("-address {}", self.socket.display());
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for entry in procs.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("containerd-shim") && cmdline.trim_end().ends_with(&marker) {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        for cgroup in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(cgroup.path().join(NAMESPACE));
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(NAMESPACE));
    }
}

/// Unmounts everything mounted below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by(|a, b| b.cmp(a));
    for point in points {
        let _ = Command::new("umount").arg("-l").arg(point).output();
    }
}
