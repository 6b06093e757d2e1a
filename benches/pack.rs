//! Layer packing throughput: `nixery::pack` against `tar | gzip -6 |
//! sha256sum` and `tar | zstd -3 | sha256sum` on the same files, in the same
//! run; and a whole cold build against `tar | gzip -6 | sha256sum`.
//!
//!     cargo bench --bench pack
//!
//! Inputs: the fixture package `big` (~50 MB, built with Nix; needs the
//! fixture's busybox copy and a Nix config, as the tests do) and a larger
//! synthetic tree (~256 MB: half random bytes, half text, in files of mixed
//! sizes) generated under the system temp directory. Throughput is input
//! (uncompressed tar) megabytes per second of wall time; each figure is the
//! best of three runs, and the ratio is nixery's time over the shell's. The
//! cold build is `nixery serve` on empty storage answering the first pull
//! of `big`. The last line is the process's peak resident memory, which
//! bounds what packing needed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nixery::builder::compress::Compression;
use nixery::builder::pack::pack_store_paths;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Nix configuration the tests use, unless one is given.
fn nix_conf_dir() -> PathBuf {
    std::env::var_os("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ci/nix"))
}

/// Builds the fixture's `big` package and returns its store path.
fn big_package() -> Option<String> {
    let pkgs = repo().join("tests/fixtures/pkgs");
    let busybox = pkgs.join("busybox/bin/busybox");
    if !busybox.exists() {
        std::fs::create_dir_all(busybox.parent().unwrap()).ok()?;
        std::fs::copy("/bin/busybox", &busybox).ok()?;
    }
    let out = Command::new("nix-build")
        .arg(&pkgs)
        .args(["-A", "big", "--no-out-link"])
        .env("NIX_CONF_DIR", nix_conf_dir())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "nix-build big failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A deterministic synthetic tree of about `total` bytes.
fn synthetic_tree(root: &Path, total: u64) {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut written = 0u64;
    let mut i = 0u64;
    while written < total {
        let dir = root.join(format!("d{:03}/e{:02}", i % 97, i % 13));
        std::fs::create_dir_all(&dir).unwrap();
        // Sizes from 100 bytes to ~4 MB, log-distributed.
        let size = 100u64 << (next() % 16);
        let data: Vec<u8> = if i.is_multiple_of(2) {
            (0..size).map(|_| next() as u8).collect()
        } else {
            let mut text = Vec::with_capacity(size as usize);
            while (text.len() as u64) < size {
                text.extend_from_slice(
                    format!("line {} of file {i}: value={}\n", text.len(), next() % 1000)
                        .as_bytes(),
                );
            }
            text.truncate(size as usize);
            text
        };
        std::fs::write(dir.join(format!("f{i}.dat")), &data).unwrap();
        written += size;
        i += 1;
    }
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = None;
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        let value = f();
        let elapsed = started.elapsed();
        if best.is_none_or(|b| elapsed < b) {
            best = Some(elapsed);
        }
        last = Some(value);
    }
    (best.unwrap(), last.unwrap())
}

fn mb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

/// A layer format, and the command-line pipeline that does the same work.
struct Format {
    compression: Compression,
    pipeline: &'static str,
}

const FORMATS: [Format; 2] = [
    Format {
        compression: Compression::Gzip,
        pipeline: "gzip -6",
    },
    Format {
        compression: Compression::Zstd,
        pipeline: "zstd -3 -q -c",
    },
];

/// `tar -c path | <pipeline> | sha256sum`.
fn shell_pack(path: &str, pipeline: &str) -> String {
    let parent = Path::new(path).parent().unwrap();
    let name = Path::new(path).file_name().unwrap();
    format!(
        "tar -C '{}' -cf - '{}' | {pipeline} | sha256sum > /dev/null",
        parent.display(),
        name.to_string_lossy()
    )
}

fn compare(label: &str, path: &str, scratch: &Path) {
    let out = scratch.join("layer");
    for format in &FORMATS {
        let tool = format.pipeline.split(' ').next().unwrap();
        if !Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            println!(
                "| {label} | {} | ({tool} not installed) | | | |",
                format.compression
            );
            continue;
        }
        let (ours, packed) = best_of(3, || {
            pack_store_paths(&[path.to_string()], &out, format.compression).unwrap()
        });
        let script = shell_pack(path, format.pipeline);
        let (theirs, _) = best_of(3, || {
            let status = Command::new("sh").args(["-c", &script]).status().unwrap();
            assert!(status.success());
        });
        println!(
            "| {label} | {} | {:.1} MB → {:.1} MB | {:.2} s, {:.0} MB/s | `tar \\| {}`: {:.2} s, {:.0} MB/s | {:.2}× |",
            format.compression,
            packed.tar_size as f64 / 1e6,
            packed.size as f64 / 1e6,
            ours.as_secs_f64(),
            mb_per_s(packed.tar_size, ours),
            format.pipeline,
            theirs.as_secs_f64(),
            mb_per_s(packed.tar_size, theirs),
            ours.as_secs_f64() / theirs.as_secs_f64(),
        );
    }
}

/// A whole cold build of the image `big` by `nixery serve`, its package
/// already realised: the first pull's wait (evaluation, closure, layering,
/// packing, storing, manifest), best of three on fresh storage each time;
/// against `tar | gzip -6 | sha256sum` over the package's store path.
fn cold_build(path: &str, scratch: &Path) {
    let (ours, ()) = best_of(3, || {
        let storage = scratch.join(format!("storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&storage);
        let mut server = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .arg("serve")
            .env("NIXERY_LISTEN", "127.0.0.1:0")
            .env("NIXERY_PKGS_PATH", repo().join("tests/fixtures/pkgs"))
            .env("NIXERY_IMPLICIT_PACKAGES", "")
            .env("STORAGE_PATH", &storage)
            .env("NIX_CONF_DIR", nix_conf_dir())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting nixery serve");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("nixery listening on http://")
            .expect("nixery serve started")
            .to_string();
        let pull = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-H"])
            .arg("Accept: application/vnd.oci.image.manifest.v1+json")
            .arg(format!("http://{addr}/v2/big/manifests/latest"))
            .status();
        let _ = server.kill();
        let _ = server.wait();
        let _ = std::fs::remove_dir_all(&storage);
        assert!(pull.unwrap().success(), "the build of big failed");
    });
    let script = shell_pack(path, "gzip -6");
    let (theirs, _) = best_of(3, || {
        assert!(Command::new("sh")
            .args(["-c", &script])
            .status()
            .unwrap()
            .success());
    });
    println!(
        "| cold build of `big`, realised | gzip | first pull: {:.2} s | `tar \\| gzip -6`: {:.2} s | {:.2}× |",
        ours.as_secs_f64(),
        theirs.as_secs_f64(),
        ours.as_secs_f64() / theirs.as_secs_f64(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let scratch = tempfile::tempdir().unwrap();
    println!(
        "{} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| input | format | tar → compressed | nixery | the same in a shell | ratio |");
    println!("|---|---|---|---|---|---|");
    match big_package() {
        Some(path) => {
            compare("fixture `big` (Nix store path)", &path, scratch.path());
            cold_build(&path, scratch.path());
        }
        None => println!("| fixture `big` | (not built: Nix or busybox missing) | | | | |"),
    }
    let tree = scratch.path().join("synthetic");
    synthetic_tree(&tree, 256 << 20);
    compare(
        "synthetic tree, 256 MiB",
        tree.to_str().unwrap(),
        scratch.path(),
    );
    println!();
    println!(
        "peak RSS of this process (generation and packing included): {:.1} MB",
        peak_rss_bytes() as f64 / 1e6
    );
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}
