# The OCI config of the build worker's container image (nix/worker.nix).
#
# Pure: it names paths inside the image, never store paths, so the tests
# evaluate it without nixpkgs (tests/infra.rs):
#
#   nix-instantiate --eval --strict --json nix/worker-image-config.nix
#
# The image's root holds the bin/ and etc/ of every package in it (nixery,
# nix, git, cacert, bash, coreutils), so /bin is the whole PATH.
let
  certs = "/etc/ssl/certs/ca-bundle.crt";
in
{
  # `nixery worker`: long-polls the build queue, builds with Nix, writes to
  # S3. Its settings come from the environment (infra/template.yaml sets them).
  # nix/worker-start.sh applies nix/isolate-builders.sh first, then execs it.
  Entrypoint = [ "/bin/nixery-worker-start" ];
  Env = [
    "PATH=/bin"
    "USER=root"
    "HOME=/root"
    # Nix (downloads), git (fetches) and the worker's own HTTPS clients.
    "SSL_CERT_FILE=${certs}"
    "NIX_SSL_CERT_FILE=${certs}"
    "GIT_SSL_CAINFO=${certs}"
  ];
  WorkingDir = "/root";
  User = "0:0";
  Labels = {
    "org.opencontainers.image.title" = "nixery-worker";
    "org.opencontainers.image.description" = "Builds container images with Nix for the nixery registry";
  };
}
