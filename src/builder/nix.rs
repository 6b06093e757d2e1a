//! Calling Nix: resolve package names, realise them, read the closure graph.
//!
//! Three commands, each with the package list as data:
//!
//! 1. `nix-instantiate --eval --strict --json --read-write-mode` of
//!    `nix/resolve.nix` (embedded in the binary) with the request as a JSON
//!    string argument: which names are packages, their derivations and the
//!    outputs to install, and which names are unknown.
//! 2. `nix-store --realise <drv>!<output> ...`: build or fetch them.
//! 3. `nix path-info --json --recursive <paths>`: the closure with each
//!    path's NAR size and references (an array before Nix 2.19, an object
//!    keyed by path after; both are read).
//!
//! Nix's stdout and stderr are read concurrently (a chatty build cannot
//! block on a full pipe), each command is stopped after the configured
//! timeout (with its whole process group), and a failure keeps Nix's own
//! message. What is kept of either stream in memory is bounded.
//!
//! Package sets are code, so Nix runs apart from this process's secrets:
//! with an environment cleared down to the variables Nix itself needs
//! ([`NIX_ENVIRONMENT`]), and evaluation in
//! restricted mode (`restrict-eval`), allowed to read only the package
//! source: its directory, or the one URL its fetcher needs. Builds then run
//! as Nix's build users, in its sandbox where the host allows (that is
//! Nix's configuration: see `.ci/nix/nix.conf` and `docs/security.md`).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

pub use super::progress::NixLog;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// The resolver expression, compiled into the binary so a worker needs
/// nothing but Nix.
pub const RESOLVE_NIX: &str = include_str!("../../nix/resolve.nix");
/// The expression that lists a package set's attributes for the
/// attribute index (see `crate::assembly::attrs`).
pub const INDEX_NIX: &str = include_str!("../../nix/index.nix");
/// What `resolve.nix` and `index.nix` share, passed to both as `common`.
pub const COMMON_NIX: &str = include_str!("../../nix/common.nix");

/// How much of Nix's error output is kept in an error message.
const MAX_MESSAGE: usize = 2000;
/// The most stdout kept from one command (resolve and path-info print JSON
/// that grows with the closure; a million store paths stay well under it).
const MAX_STDOUT: u64 = 256 * 1024 * 1024;
/// The most stderr lines kept (the last ones), and of each line.
const MAX_STDERR_LINES: usize = 400;
const MAX_LINE: usize = 4096;

/// The variables Nix is started with, when this process has them. Nothing
/// else of the environment (credentials, settings) reaches Nix, so
/// `builtins.getEnv` in a package set and builders see none of it.
pub const NIX_ENVIRONMENT: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "NIX_CONF_DIR",
    "NIX_CONFIG",
    "NIX_REMOTE",
    "NIX_STORE_DIR",
    "NIX_STATE_DIR",
    "NIX_LOG_DIR",
    "NIX_DATA_DIR",
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "NIX_USER_CONF_FILES",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
];

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("could not start {command}: {source}")]
    Spawn {
        command: &'static str,
        source: std::io::Error,
    },
    #[error("{command} did not finish within {seconds} s")]
    Timeout { command: &'static str, seconds: u64 },
    #[error("{command} failed: {message}")]
    Failed {
        command: &'static str,
        message: String,
    },
    #[error("unexpected output from {command}: {detail}")]
    Output {
        command: &'static str,
        detail: String,
    },
    /// The Nix store's disk is full: the worker's fault, not the image's.
    #[error("{command} ran out of disk space: {message}")]
    DiskFull {
        command: &'static str,
        message: String,
    },
}

pub use crate::source::SourceArg;

#[derive(Debug, Clone, Serialize)]
pub struct ResolveRequest {
    pub source: SourceArg,
    pub system: String,
    pub packages: Vec<String>,
    /// Added to every image when the package set has them; no error if not.
    pub implicit: Vec<String>,
    /// What is resolved must be at least this recent (Unix seconds): for
    /// a source that answers from an index of the package set, not Nix.
    #[serde(skip)]
    pub not_before: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPackage {
    pub name: String,
    pub drv_path: String,
    pub outputs: Vec<String>,
    /// Store paths of `outputs`, in the same order.
    pub paths: Vec<String>,
    /// What the package set says about the package, for the SBOM. Absent
    /// from the output of an older resolver (or a hand-written one), so
    /// defaulted rather than required.
    #[serde(default)]
    pub meta: PackageMeta,
}

/// A package's `pname`, `version` and `meta` fields as `nix/resolve.nix`
/// reads them without building anything: informative only, and written by
/// the package set's author, so never used as a path, option or code.
/// A field the package does not set (or sets to something else, or that
/// throws) is `None`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PackageMeta {
    pub pname: Option<String>,
    pub version: Option<String>,
    /// SPDX license identifiers (`meta.license.spdxId`, of each license).
    pub license: Vec<String>,
    pub homepage: Option<String>,
    pub description: Option<String>,
}

impl PackageMeta {
    /// Whether the package said nothing about itself.
    pub fn is_empty(&self) -> bool {
        self == &PackageMeta::default()
    }
}

/// What an attribute of a package set is, as `nix/index.nix` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttributeKind {
    /// A derivation: a package.
    Drv,
    /// An attribute set listed too (it asks to be recursed into).
    Set,
    /// An attribute set not listed: only Nix can look into it.
    Opaque,
    /// A derivation whose outputs do not evaluate.
    Broken,
    /// Anything else, or a value that throws: not a package.
    None,
}

/// One attribute of a package set, as `nix/index.nix` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedAttribute {
    /// The attribute path, one name per level.
    pub path: Vec<String>,
    pub kind: AttributeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drv_path: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Store paths of `outputs`, in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "PackageMeta::is_empty")]
    pub meta: PackageMeta,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Resolved {
    pub packages: Vec<ResolvedPackage>,
    pub unknown: Vec<String>,
}

/// One store path of a closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub nar_size: u64,
    /// The hash of its NAR serialisation, `sha256:<nix32>` (as Nix signs
    /// it): what its bytes are, so equal hashes mean equal contents
    /// whether they come from a Nix store or a binary cache.
    pub nar_hash: String,
    /// Other paths this one refers to (itself excluded).
    pub references: Vec<String>,
}

/// A closure: every path, with its size and references; sorted by path.
pub type Closure = BTreeMap<String, PathInfo>;

#[derive(Debug, Clone)]
pub struct Nix {
    timeout: Duration,
}

impl Nix {
    pub fn new(timeout: Duration) -> Nix {
        Nix { timeout }
    }

    /// Step 1: which names are packages and what to realise for them.
    pub async fn resolve(&self, request: &ResolveRequest) -> Result<Resolved, NixError> {
        const CMD: &str = "nix-instantiate";
        let json = serde_json::to_string(request).expect("a request always serialises");
        let mut command = Command::new(CMD);
        command
            .args([
                "--eval",
                "--strict",
                "--json",
                "--read-write-mode",
                "--argstr",
                "request",
            ])
            .arg(json);
        restrict(&mut command, &request.source);
        command.args(["--arg", "common", COMMON_NIX]);
        command.arg("-E").arg(RESOLVE_NIX);
        let stdout = self.run(CMD, command).await?;
        let resolved: Resolved = serde_json::from_slice(&stdout).map_err(|e| NixError::Output {
            command: CMD,
            detail: e.to_string(),
        })?;
        // What the package set evaluated to is its author's to choose: only
        // store paths, derivations and output names go on to the next
        // commands, never strings they could read as options.
        for package in &resolved.packages {
            let plain = is_store_path(&package.drv_path)
                && package.drv_path.ends_with(".drv")
                && !package.outputs.is_empty()
                && package.outputs.iter().all(|o| is_output_name(o))
                && package.paths.len() == package.outputs.len()
                && package.paths.iter().all(|p| is_store_path(p));
            if !plain {
                return Err(NixError::Output {
                    command: CMD,
                    detail: format!(
                        "package {:?} does not evaluate to store paths",
                        package.name
                    ),
                });
            }
        }
        Ok(resolved)
    }

    /// Every attribute of the package set at `source` for `system` (and of
    /// the sets it recurses into, `max_depth` levels down), described as
    /// [`Nix::resolve`] would describe each (see `nix/index.nix`). Like
    /// resolving, it evaluates in restricted mode with a cleared
    /// environment; what the package set evaluated to is checked the same
    /// way before anything uses it. Top-level attributes are described in
    /// batches: a batch that fails is split, and an attribute that fails
    /// alone is listed as broken (only a build can say what it does).
    pub async fn list_attributes(
        &self,
        source: &SourceArg,
        system: &str,
        max_depth: u32,
    ) -> Result<Vec<ListedAttribute>, NixError> {
        /// Top-level names described by one evaluation.
        const BATCH: usize = 2000;
        #[derive(Deserialize)]
        struct Names {
            names: Vec<String>,
        }
        let names: Names = self.index_call(source, system, max_depth, None).await?;
        let mut entries = Vec::new();
        let mut pending: Vec<Vec<String>> = names
            .names
            .chunks(BATCH)
            .rev()
            .map(<[String]>::to_vec)
            .collect();
        while let Some(batch) = pending.pop() {
            #[derive(Deserialize)]
            struct Listed {
                entries: Vec<ListedAttribute>,
            }
            match self
                .index_call::<Listed>(source, system, max_depth, Some(&batch))
                .await
            {
                Ok(listed) => entries.extend(listed.entries),
                Err(NixError::Failed { message, .. }) if batch.len() > 1 => {
                    tracing::debug!(names = batch.len(), %message, "a batch of attributes failed; splitting it");
                    let (first, second) = batch.split_at(batch.len() / 2);
                    pending.push(second.to_vec());
                    pending.push(first.to_vec());
                }
                Err(NixError::Failed { message, .. }) => {
                    tracing::info!(attribute = %batch[0], message = %crate::source::redact_urls(&message), "an attribute does not evaluate; listed as broken");
                    entries.push(ListedAttribute {
                        path: batch,
                        kind: AttributeKind::Broken,
                        drv_path: None,
                        outputs: vec![],
                        paths: vec![],
                        meta: PackageMeta::default(),
                    });
                }
                Err(other) => return Err(other),
            }
        }
        // What the package set evaluated to is its author's to choose: an
        // attribute that does not evaluate to plain store paths (an output
        // named like an option, say) is listed as broken, and only Nix
        // (which refuses it as it refuses it today) looks at it again.
        for attribute in &mut entries {
            let plain = match attribute.kind {
                AttributeKind::Drv => {
                    attribute
                        .drv_path
                        .as_deref()
                        .is_some_and(|d| is_store_path(d) && d.ends_with(".drv"))
                        && !attribute.outputs.is_empty()
                        && attribute.outputs.iter().all(|o| is_output_name(o))
                        && attribute.paths.len() == attribute.outputs.len()
                        && attribute.paths.iter().all(|p| is_store_path(p))
                }
                _ => attribute.outputs.is_empty() && attribute.paths.is_empty(),
            };
            if !plain {
                tracing::info!(attribute = %attribute.path.join("."), "an attribute does not evaluate to store paths; listed as broken");
                *attribute = ListedAttribute {
                    path: std::mem::take(&mut attribute.path),
                    kind: AttributeKind::Broken,
                    drv_path: None,
                    outputs: vec![],
                    paths: vec![],
                    meta: PackageMeta::default(),
                };
            }
        }
        entries.retain(|attribute| !attribute.path.is_empty());
        Ok(entries)
    }

    /// One evaluation of `nix/index.nix`: the top-level names (`names`
    /// none), or the description of those names.
    async fn index_call<T: serde::de::DeserializeOwned>(
        &self,
        source: &SourceArg,
        system: &str,
        max_depth: u32,
        names: Option<&[String]>,
    ) -> Result<T, NixError> {
        const CMD: &str = "nix-instantiate";
        let request = serde_json::json!({
            "source": source,
            "system": system,
            "maxDepth": max_depth,
            "names": names,
        });
        let mut command = Command::new(CMD);
        command
            .args(["--eval", "--strict", "--json", "--argstr", "request"])
            .arg(request.to_string());
        restrict(&mut command, source);
        command.args(["--arg", "common", COMMON_NIX]);
        command.arg("-E").arg(INDEX_NIX);
        let stdout = self.run(CMD, command).await?;
        serde_json::from_slice(&stdout).map_err(|e| NixError::Output {
            command: CMD,
            detail: e.to_string(),
        })
    }

    /// Step 2: builds (or substitutes) the given outputs, telling
    /// `progress` how far Nix is after each line it prints.
    pub async fn realise(
        &self,
        packages: &[ResolvedPackage],
        mut progress: impl FnMut(&NixLog) + Send,
    ) -> Result<(), NixError> {
        const CMD: &str = "nix-store";
        let mut command = Command::new(CMD);
        command.args([
            "--realise",
            "--no-gc-warning",
            "--log-format",
            "internal-json",
            "--",
        ]);
        for package in packages {
            for output in &package.outputs {
                command.arg(format!("{}!{}", package.drv_path, output));
            }
        }
        let mut log = NixLog::default();
        let lines = |line: String| {
            let text = log.line(&line);
            progress(&log);
            text
        };
        self.run_with(CMD, command, lines).await.map(drop)
    }

    /// Deletes store paths nothing refers to (no GC root, no running Nix
    /// process) until `max_freed` bytes are freed.
    pub async fn collect_garbage(&self, max_freed: u64) -> Result<(), NixError> {
        const CMD: &str = "nix-store --gc";
        let mut command = Command::new("nix-store");
        command
            .args(["--gc", "--max-freed"])
            .arg(max_freed.to_string());
        self.run(CMD, command).await.map(drop)
    }

    /// Step 3: the closure of the given store paths.
    pub async fn closure(&self, paths: &[String]) -> Result<Closure, NixError> {
        const CMD: &str = "nix path-info";
        let mut command = Command::new("nix");
        command
            .args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                "--recursive",
                "--",
            ])
            .args(paths);
        let stdout = self.run(CMD, command).await?;
        parse_path_info(&stdout).map_err(|detail| NixError::Output {
            command: CMD,
            detail,
        })
    }

    /// Runs a command to the end within the timeout; stdout on success.
    async fn run(&self, name: &'static str, command: Command) -> Result<Vec<u8>, NixError> {
        self.run_with(name, command, Some).await
    }

    /// [`Nix::run`], with each line of stderr read by `lines`, which
    /// returns the text to keep of it for error messages (if any).
    async fn run_with(
        &self,
        name: &'static str,
        mut command: Command,
        mut lines: impl FnMut(String) -> Option<String> + Send,
    ) -> Result<Vec<u8>, NixError> {
        command.env_clear();
        for var in NIX_ENVIRONMENT {
            if let Some(value) = std::env::var_os(var) {
                command.env(var, value);
            }
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: prctl(2) is async-signal-safe and only sets a flag of the
        // child. If this process dies (a worker killed mid-build), Nix dies
        // with it instead of building on unowned.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| NixError::Spawn {
            command: name,
            source,
        })?;
        let pid = child.id();
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        let work = async {
            let read_stdout = async {
                let mut buf = Vec::new();
                (&mut stdout)
                    .take(MAX_STDOUT + 1)
                    .read_to_end(&mut buf)
                    .await?;
                if buf.len() as u64 > MAX_STDOUT {
                    return Err(std::io::Error::other(format!(
                        "more than {MAX_STDOUT} bytes of output"
                    )));
                }
                Ok(buf)
            };
            let read_stderr = async {
                let mut stderr = BufReader::new(stderr).lines();
                let mut kept = std::collections::VecDeque::new();
                while let Ok(Some(line)) = stderr.next_line().await {
                    // Nix quotes fetchers' URLs, which may carry tokens:
                    // nothing after this point (logs, errors, the build
                    // status) sees them.
                    let line = crate::source::redact_urls(&line);
                    tracing::debug!(command = name, "{line}");
                    let Some(wanted) = lines(line) else {
                        continue;
                    };
                    // Again: `lines` may have decoded it from JSON.
                    let mut line = crate::source::redact_urls(&wanted);
                    if line.len() > MAX_LINE {
                        let mut cut = MAX_LINE;
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        line.truncate(cut);
                    }
                    if kept.len() == MAX_STDERR_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
                Vec::from(kept)
            };
            let (out, err) = tokio::join!(read_stdout, read_stderr);
            let status = child.wait().await;
            (out, err, status)
        };

        let (out, err, status) = match tokio::time::timeout(self.timeout, work).await {
            Ok(done) => done,
            Err(_) => {
                if let Some(pid) = pid {
                    kill_group(pid);
                }
                return Err(NixError::Timeout {
                    command: name,
                    seconds: self.timeout.as_secs(),
                });
            }
        };
        let status = status.map_err(|source| NixError::Spawn {
            command: name,
            source,
        })?;
        if !status.success() {
            let message = error_message(&err);
            if says_disk_full(&err) && store_disk_low() {
                tracing::error!(command = name, stderr = %err.join("\n"), "the Nix store's disk is full; this build will be retried");
                return Err(NixError::DiskFull {
                    command: name,
                    message,
                });
            }
            tracing::warn!(command = name, %status, stderr = %err.join("\n"), "nix command failed");
            return Err(NixError::Failed {
                command: name,
                message,
            });
        }
        out.map_err(|source| NixError::Spawn {
            command: name,
            source,
        })
    }
}

/// Bytes free to unprivileged writers on the filesystem of the Nix store.
pub fn store_free_bytes() -> std::io::Result<u64> {
    store_space().map(|(free, _)| free)
}

/// (free, total) bytes of the filesystem of the Nix store.
fn store_space() -> std::io::Result<(u64, u64)> {
    let path = std::ffi::CString::new("/nix/store").expect("no NUL");
    // SAFETY: statvfs(3) only writes into the struct it is given, and the
    // path is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = stat.f_frsize as u64;
    Ok((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}

/// Whether Nix itself reported ENOSPC: on one of its own `error:` lines,
/// not in a build's log lines it quotes after `>`.
fn says_disk_full(stderr: &[String]) -> bool {
    stderr.iter().any(|line| {
        let line = line.trim_start();
        line.starts_with("error:") && line.contains(DISK_FULL)
    })
}

/// Whether the store's disk is nearly full now (under 2 GiB or 5% free):
/// a package that only prints the words does not make its failure look
/// like the machine's.
fn store_disk_low() -> bool {
    store_space().is_ok_and(|(free, total)| free < (2 << 30) || free < total / 20)
}

/// How many bytes to collect so that a build starts with room: none while
/// `free` is at least `min_free` (or the limit is off, 0), else enough to
/// have twice `min_free` free, so that a collection is not needed again at
/// the very next build.
pub fn bytes_to_collect(free: u64, min_free: u64) -> Option<u64> {
    (min_free > 0 && free < min_free).then(|| min_free.saturating_mul(2) - free)
}

/// How the C library words ENOSPC, which Nix quotes when a write fails.
const DISK_FULL: &str = "No space left on device";

/// `/nix/store/<32 base-32 characters>-<name>`, and nothing else: no
/// option, no other directory, no `..`.
pub fn is_store_path(path: &str) -> bool {
    let Some(base) = path.strip_prefix("/nix/store/") else {
        return false;
    };
    let Some((hash, name)) = base.split_at_checked(32) else {
        return false;
    };
    hash.bytes()
        .all(|b| b.is_ascii_digit() || (b.is_ascii_lowercase() && !b"eotu".contains(&b)))
        && name.len() > 1
        && name.starts_with('-')
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
        && !name[1..].starts_with('.')
}

/// A derivation output's name (`out`, `bin`, `dev`, ...).
fn is_output_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Restricted evaluation: only the package source may be read. Nix then
/// also answers `builtins.getEnv` with the empty string.
fn restrict(command: &mut Command, source: &SourceArg) {
    command.args(["--option", "restrict-eval", "true"]);
    let allowed = match source {
        SourceArg::Path { path } => {
            command.arg("-I").arg(path);
            return;
        }
        SourceArg::Git { url, .. } => url.expose().to_string(),
        SourceArg::Channel { name } => format!("https://nixos.org/channels/{name}/"),
        SourceArg::Commit { rev } => {
            format!("https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz")
        }
    };
    command.args(["--option", "allowed-uris"]).arg(allowed);
}

/// Stops a command and everything it started.
fn kill_group(pid: u32) {
    // SAFETY: kill(2) with a negative pid signals a process group; it has no
    // memory-safety preconditions.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
}

/// The part of Nix's stderr that says what went wrong: from the first
/// `error:` line on, then the last lines a failed builder printed before it
/// (legacy Nix commands print build output as it comes), bounded.
fn error_message(stderr: &[String]) -> String {
    let start = stderr
        .iter()
        .position(|l| l.trim_start().starts_with("error"))
        .unwrap_or(stderr.len().saturating_sub(10));
    let text: Vec<&str> = stderr[start..]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let mut text = text.join("\n");
    let noise = |l: &str| {
        l.is_empty()
            || l.starts_with("building '")
            || l.starts_with("these ")
            || l.starts_with("this derivation")
            || l.starts_with("this path")
            || l.starts_with("warning:")
            || l.starts_with("/nix/store/")
    };
    let output: Vec<&str> = stderr[..start]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !noise(l))
        .collect();
    if !output.is_empty() && !text.contains("log lines") {
        let tail = &output[output.len().saturating_sub(10)..];
        text.push_str("\nlast log lines:\n");
        text.push_str(&tail.join("\n"));
    }
    if text.is_empty() {
        text = "no error output".to_string();
    }
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" [...]");
    }
    text
}

/// Reads `nix path-info --json` output of any Nix version.
fn parse_path_info(json: &[u8]) -> Result<Closure, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Entry {
        path: Option<String>,
        nar_size: u64,
        nar_hash: String,
        #[serde(default)]
        references: Vec<String>,
    }
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let entries: Vec<(String, Entry)> = match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|item| {
                let entry: Entry = serde_json::from_value(item).map_err(|e| e.to_string())?;
                let path = entry.path.clone().ok_or("an entry has no path")?;
                Ok((path, entry))
            })
            .collect::<Result<_, String>>()?,
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(path, item)| {
                Ok((
                    path,
                    serde_json::from_value(item).map_err(|e| e.to_string())?,
                ))
            })
            .collect::<Result<_, String>>()?,
        _ => return Err("neither an array nor an object".to_string()),
    };
    let mut closure = Closure::new();
    for (path, entry) in entries {
        // Newer Nix prints references as store paths too; drop self-references.
        let mut references: Vec<String> = entry
            .references
            .into_iter()
            .filter(|r| *r != path)
            .collect();
        references.sort();
        references.dedup();
        // Any form Nix prints (nix32, hex, SRI), as Nix signs it.
        let nar_hash = crate::binary_cache::narinfo::Sha256Hash::parse_any(&entry.nar_hash)
            .map_err(|e| format!("{path}: {e}"))?
            .to_nix32_string();
        closure.insert(
            path,
            PathInfo {
                nar_size: entry.nar_size,
                nar_hash,
                references,
            },
        );
    }
    for (path, info) in &closure {
        if let Some(missing) = info.references.iter().find(|r| !closure.contains_key(*r)) {
            return Err(format!(
                "{path} refers to {missing}, which is not in the closure"
            ));
        }
    }
    Ok(closure)
}

/// A closure of `(path, references)` edges, for the tests of what reads
/// closures.
#[cfg(test)]
pub(crate) fn test_closure(edges: &[(&str, &[&str])]) -> Closure {
    edges
        .iter()
        .map(|(path, refs)| {
            let references = refs.iter().map(|r| r.to_string()).collect();
            (
                path.to_string(),
                PathInfo {
                    nar_size: 1,
                    nar_hash: String::new(),
                    references,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256 of nothing, in the three forms Nix versions print.
    const EMPTY_HEX: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_SRI: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn path_info_array_and_object_agree() {
        let array = format!(
            r#"[{{"path":"/nix/store/a-x","narSize":10,"narHash":"{EMPTY_HEX}","references":["/nix/store/a-x","/nix/store/b-y"]}},
                {{"path":"/nix/store/b-y","narSize":5,"narHash":"{EMPTY_HEX}","references":[]}}]"#
        );
        let object = format!(
            r#"{{"/nix/store/a-x":{{"narSize":10,"narHash":"{EMPTY_SRI}","references":["/nix/store/b-y","/nix/store/a-x"]}},
                 "/nix/store/b-y":{{"narSize":5,"narHash":"{EMPTY_SRI}","references":[]}}}}"#
        );
        let a = parse_path_info(array.as_bytes()).unwrap();
        assert_eq!(a, parse_path_info(object.as_bytes()).unwrap());
        assert_eq!(
            a["/nix/store/a-x"].references,
            vec!["/nix/store/b-y".to_string()]
        );
        // Hex and SRI read as the nix32 a narinfo has.
        let empty: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(b"").into();
        assert_eq!(
            a["/nix/store/b-y"].nar_hash,
            crate::binary_cache::Sha256Hash(empty).to_nix32_string()
        );
        let missing = br#"[{"path":"/nix/store/a-x","narSize":10,"references":[]}]"#;
        assert!(parse_path_info(missing).is_err());
    }

    #[test]
    fn resolve_output_parses_with_and_without_meta() {
        let json = br#"{"packages":[
            {"name":"hello","drvPath":"/nix/store/yvk3jvafqy8dyj6y3dbddjn7brw8w4i4-hello-2.12.1.drv",
             "outputs":["out"],"paths":["/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-hello-2.12.1"],
             "meta":{"pname":"hello","version":"2.12.1","license":["GPL-3.0-or-later"],
                     "homepage":"https://www.gnu.org/software/hello/","description":"Prints"}},
            {"name":"jq","drvPath":"/nix/store/yvk3jvafqy8dyj6y3dbddjn7brw8w4i4-jq-1.6.drv",
             "outputs":["out"],"paths":["/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-jq-1.6"],
             "meta":{"pname":null,"version":null,"license":[],"homepage":null,"description":null}},
            {"name":"old","drvPath":"/nix/store/yvk3jvafqy8dyj6y3dbddjn7brw8w4i4-old.drv",
             "outputs":["out"],"paths":["/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-old"]},
            {"name":"partial","drvPath":"/nix/store/yvk3jvafqy8dyj6y3dbddjn7brw8w4i4-p.drv",
             "outputs":["out"],"paths":["/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-p"],
             "meta":{"version":"1"}}],
            "unknown":["nope"]}"#;
        let resolved: Resolved = serde_json::from_slice(json).unwrap();
        let meta: Vec<&PackageMeta> = resolved.packages.iter().map(|p| &p.meta).collect();
        assert_eq!(
            meta[0],
            &PackageMeta {
                pname: Some("hello".into()),
                version: Some("2.12.1".into()),
                license: vec!["GPL-3.0-or-later".into()],
                homepage: Some("https://www.gnu.org/software/hello/".into()),
                description: Some("Prints".into()),
            }
        );
        assert_eq!(meta[1], &PackageMeta::default());
        assert_eq!(meta[2], &PackageMeta::default());
        assert_eq!(
            meta[3],
            &PackageMeta {
                version: Some("1".into()),
                ..PackageMeta::default()
            }
        );
        assert_eq!(resolved.unknown, vec!["nope".to_string()]);
    }

    #[test]
    fn path_info_rejects_an_open_graph() {
        let json = format!(
            r#"[{{"path":"/nix/store/a-x","narSize":10,"narHash":"{EMPTY_HEX}","references":["/nix/store/c-z"]}}]"#
        );
        assert!(parse_path_info(json.as_bytes())
            .unwrap_err()
            .contains("c-z"));
    }

    #[test]
    fn error_message_starts_at_the_error() {
        let lines: Vec<String> = [
            "building '/nix/store/x.drv'...",
            "error: builder failed",
            "  > oops",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(error_message(&lines), "error: builder failed\n> oops");
        let legacy: Vec<String> = [
            "building '/nix/store/x.drv'...",
            "compiling",
            "it broke",
            "error: builder for x failed",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            error_message(&legacy),
            "error: builder for x failed\nlast log lines:\ncompiling\nit broke"
        );
        let long = vec!["error: ".to_string() + &"é".repeat(5000)];
        assert!(error_message(&long).len() <= MAX_MESSAGE + 10);
    }

    #[test]
    fn only_store_paths_pass() {
        let good = "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-hello-2.12.1";
        assert!(is_store_path(good));
        assert!(is_store_path(&format!("{good}.drv")));
        for bad in [
            "--option",
            "--expr",
            "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74",
            "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-",
            "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q7--x",
            "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-a/../../etc/passwd",
            "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-..",
            "/tmp/0sd4izqfaqmcmqvjk51zk001a4xv7q74-hello",
            "/nix/store/EEEEizqfaqmcmqvjk51zk001a4xv7q74-hello",
        ] {
            assert!(!is_store_path(bad), "{bad}");
        }
        assert!(is_output_name("out") && is_output_name("dev") && !is_output_name("--impure"));
    }

    #[test]
    fn collections_start_below_the_minimum_and_aim_for_twice_it() {
        let gib = 1u64 << 30;
        assert_eq!(bytes_to_collect(10 * gib, 0), None);
        assert_eq!(bytes_to_collect(8 * gib, 8 * gib), None);
        assert_eq!(bytes_to_collect(3 * gib, 8 * gib), Some(13 * gib));
        assert_eq!(bytes_to_collect(0, u64::MAX), Some(u64::MAX));
        assert!(store_free_bytes().is_ok() || !std::path::Path::new("/nix/store").exists());
    }

    #[test]
    fn only_nix_s_own_errors_say_the_disk_is_full() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(says_disk_full(&lines(&[
            "copying path '/nix/store/x' from 'https://cache.nixos.org'...",
            "error: writing to file: No space left on device",
        ])));
        // A build's own output, quoted by Nix, is the package's business.
        assert!(!says_disk_full(&lines(&[
            "error: builder for '/nix/store/x.drv' failed with exit code 1;",
            "       last 10 log lines:",
            "       > cp: No space left on device",
        ])));
        assert!(!says_disk_full(&lines(&[
            "error: builder for hello failed"
        ])));
    }

    #[tokio::test]
    async fn a_package_that_prints_disk_full_on_a_roomy_disk_just_failed() {
        if store_disk_low() {
            return; // this machine's disk really is nearly full
        }
        let nix = Nix::new(Duration::from_secs(10));
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "echo 'error: writing to file: No space left on device' >&2; exit 1",
        ]);
        let failed = nix.run("nix-store", command).await.unwrap_err();
        assert!(matches!(failed, NixError::Failed { .. }), "{failed:?}");
    }
}
