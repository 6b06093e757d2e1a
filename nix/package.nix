# The `nixery` binary, built from this repository with nixpkgs' Rust.
#
#   nix-build -E '(import <nixpkgs> { }).callPackage ./nix/package.nix { }'
#
# The same binary is the Lambda function (built there by `cargo lambda`) and
# the worker (`nixery worker`, in the image of nix/worker.nix).
{
  lib,
  rustPlatform,
  rustc,
  cmake,
  # The highest `rust-version` among the locked dependencies (the AWS SDK
  # crates); an older nixpkgs fails here with a clear message instead of
  # deep inside cargo. Pass a newer `rustPlatform` (e.g. from rust-overlay
  # or fenix via makeRustPlatform) together with its `rustc` to use one.
  minimumRust ? "1.94.1",
}:

assert lib.assertMsg (lib.versionAtLeast rustc.version minimumRust)
  "nixery needs Rust >= ${minimumRust} (the locked AWS SDK crates), this nixpkgs has ${rustc.version}: use a newer nixpkgs (nixos-unstable) or pass rustPlatform and rustc";

rustPlatform.buildRustPackage {
  pname = "nixery";
  version = (lib.importTOML ../Cargo.toml).package.version;

  # Only what cargo reads: a change to docs, infra or tests rebuilds nothing.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../benches # declared in Cargo.toml, so cargo looks for it
      # Embedded in the binary (include_str!).
      ../nix/common.nix
      ../nix/resolve.nix
      ../nix/index.nix
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [ "--bin" "nixery" ];

  # aws-lc-sys (TLS for the AWS SDK) may build its C code with CMake; the
  # cmake setup hook must not try to configure this Rust project.
  nativeBuildInputs = [ cmake ];
  dontUseCmakeConfigure = true;

  # The tests need Nix, busybox, skopeo, containerd, ... (.ci/test runs them).
  doCheck = false;

  meta = {
    description = "A container registry that builds images on demand with Nix";
    license = lib.licenses.asl20;
    mainProgram = "nixery";
    platforms = lib.platforms.linux;
  };
}
