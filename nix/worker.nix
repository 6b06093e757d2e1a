# The build worker's container image: `nixery worker` with Nix, git and CA
# certificates, for ECS Fargate (infra/template.yaml) or any container host.
#
# Build it where nixpkgs is reachable (a channel, NIX_PATH or -I), on the
# worker's architecture (x86_64-linux for WorkerArchitecture X86_64,
# aarch64-linux for ARM64), and push it without a Docker daemon:
#
#   nix-build nix/worker.nix -o worker-image        # a docker-archive .tar.gz
#   gunzip -c worker-image > worker-image.tar       # skopeo reads it uncompressed
#   skopeo copy docker-archive:worker-image.tar \
#     docker://<account>.dkr.ecr.<region>.amazonaws.com/nixery-worker:<tag>
#
# (docs/deploy.md has the ECR login and the rest.) Arguments:
#   pkgs    the nixpkgs to build with; its Rust must be new enough for the
#           locked crates (nix/package.nix checks);
#   nixery  the nixery package, e.g. one built with a newer Rust;
#   nix     the Nix the worker runs;
#   tag     the image's tag inside the archive (default: the output hash).
#
# What is in the image:
#   /bin          nixery, nix*, git, bash, sh, coreutils, iptables, and the
#                 entrypoint nixery-worker-start (nix/worker-start.sh), which
#                 applies isolate-builders (nix/isolate-builders.sh) first
#   /etc/nix/nix.conf   from nix/worker-nix-conf.nix (no daemon; build users;
#                       the sandbox where the host allows it)
#   /etc/ssl/certs      CA bundle (cacert); /etc/passwd and /etc/group with
#                       root, nobody and the nixbld build users (nix/worker-users.nix)
#   /nix/var/nix/db     the Nix database of everything in the image, so Nix
#                       inside the container knows its own store is valid
#   /tmp, /var/tmp      mode 1777; /root is HOME
# The OCI config (entrypoint `nixery worker`, environment) is
# nix/worker-image-config.nix.
{
  pkgs ? import <nixpkgs> { },
  nixery ? pkgs.callPackage ./package.nix { },
  nix ? pkgs.nix,
  tag ? null,
}:

let
  inherit (pkgs) dockerTools;

  nixConf = pkgs.writeTextDir "etc/nix/nix.conf" (import ./worker-nix-conf.nix { });

  # root, nobody and the nixbld build users (fakeNss has only the first two).
  users = import ./worker-users.nix { };
  accounts = pkgs.symlinkJoin {
    name = "worker-accounts";
    paths = [
      (pkgs.writeTextDir "etc/passwd" users.passwd)
      (pkgs.writeTextDir "etc/group" users.group)
      (pkgs.writeTextDir "etc/nsswitch.conf" "passwd: files\ngroup: files\nhosts: files dns\n")
    ];
  };

  # The entrypoint, and the packet filter rules it applies before the
  # worker starts: builders kept off the host's loopback and metadata
  # addresses where the host allows (docs/security.md).
  entrypoint = pkgs.runCommand "nixery-worker-entrypoint" { } ''
    mkdir -p $out/bin
    install -m 0755 ${./isolate-builders.sh} $out/bin/isolate-builders
    install -m 0755 ${./worker-start.sh} $out/bin/nixery-worker-start
  '';

  # Registers the closure of `contents` in the image's Nix database
  # (nix-store --load-db of its closureInfo) in the last layer. Newer
  # nixpkgs spell it `includeNixDB = true`.
  buildImage =
    dockerTools.buildLayeredImageWithNixDb
      or (args: dockerTools.buildLayeredImage (args // { includeNixDB = true; }));
in
buildImage {
  name = "nixery-worker";
  inherit tag;

  # Each package's top-level directories are linked into the image's root.
  contents = [
    nixery
    nix
    pkgs.gitMinimal # builtins.fetchGit for NIXERY_PKGS_REPO (https URLs)
    pkgs.cacert
    pkgs.bashInteractive # /bin/sh and /bin/bash, for Nix and for debugging
    pkgs.coreutils
    pkgs.iptables # iptables and ip6tables, for isolate-builders
    entrypoint # /bin/nixery-worker-start, /bin/isolate-builders
    accounts # /etc/passwd, /etc/group (with the build users), /etc/nsswitch.conf
    dockerTools.usrBinEnv # /usr/bin/env
    nixConf
  ];

  # Runs in the image's last layer, after the Nix database is written.
  extraCommands = ''
    mkdir -p -m 1777 tmp var/tmp
    mkdir -p root
  '';

  config = import ./worker-image-config.nix;

  # One layer per store path where possible: pushing a new nixery changes
  # one layer, not the whole image.
  maxLayers = 100;
}
