//! Layer packing throughput: `nixery::pack` against `tar | gzip -6 | sha256sum`
//! on the same files, in the same run.
//!
//!     cargo bench --bench pack
//!
//! Inputs: the fixture package `big` (~50 MB, built with Nix; needs the
//! fixture's busybox copy and a Nix config, as the tests do) and a larger
//! synthetic tree (~256 MB: half random bytes, half text, in files of mixed
//! sizes) generated under the system temp directory. Throughput is input
//! (uncompressed tar) megabytes per second of wall time; each figure is the
//! best of three runs. The last line is the process's peak resident memory,
//! which bounds what packing needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the fixture's `big` package and returns its store path.
fn big_package() -> Option<String> {
    let pkgs = repo().join("tests/fixtures/pkgs");
    let busybox = pkgs.join("busybox/bin/busybox");
    if !busybox.exists() {
        std::fs::create_dir_all(busybox.parent().unwrap()).ok()?;
        std::fs::copy("/bin/busybox", &busybox).ok()?;
    }
    let conf = std::env::var_os("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ci/nix"));
    let out = Command::new("nix-build")
        .arg(&pkgs)
        .args(["-A", "big", "--no-out-link"])
        .env("NIX_CONF_DIR", conf)
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

fn compare(label: &str, path: &str, scratch: &Path) {
    let out = scratch.join("layer.tar.gz");
    let (ours, packed) = best_of(3, || {
        nixery::builder::pack::pack_store_paths(
            &[path.to_string()],
            &out,
            nixery::builder::compress::Compression::Gzip,
        )
        .unwrap()
    });
    let parent = Path::new(path).parent().unwrap();
    let name = Path::new(path).file_name().unwrap();
    let script = format!(
        "tar -C '{}' -cf - '{}' | gzip -6 | sha256sum > /dev/null",
        parent.display(),
        name.to_string_lossy()
    );
    let (theirs, _) = best_of(3, || {
        let status = Command::new("sh").args(["-c", &script]).status().unwrap();
        assert!(status.success());
    });
    println!(
        "| {label} | {:.1} MB | {:.1} MB | {:.2} s, {:.0} MB/s | {:.2} s, {:.0} MB/s |",
        packed.tar_size as f64 / 1e6,
        packed.size as f64 / 1e6,
        ours.as_secs_f64(),
        mb_per_s(packed.tar_size, ours),
        theirs.as_secs_f64(),
        mb_per_s(packed.tar_size, theirs),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let scratch = tempfile::tempdir().unwrap();
    println!("| input | tar size | gzip size | nixery::pack | tar \\| gzip -6 \\| sha256sum |");
    println!("|---|---|---|---|---|");
    match big_package() {
        Some(path) => compare("fixture `big` (Nix store path)", &path, scratch.path()),
        None => println!("| fixture `big` | (not built: Nix or busybox missing) | | | |"),
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
