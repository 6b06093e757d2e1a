# The Nix configuration of the build worker's container image
# (/etc/nix/nix.conf in nix/worker.nix).
#
# Pure: it needs no nixpkgs, so the tests evaluate it and hand the result to
# a real Nix to check that every setting is known (tests/infra.rs):
#
#   nix-instantiate --eval --strict --json --expr "import ./nix/worker-nix-conf.nix { }"
#
# The container runs Nix as root without a daemon, on ECS Fargate or any
# other container host:
#   - builders run as the nixbld build users (nix/worker-users.nix puts them
#     in the image), never as root beside the task's credentials: they
#     cannot read the worker's /proc/<pid>/environ;
#   - the sandbox where the host allows it: Fargate grants no user
#     namespaces or mount privileges, so there Nix falls back to building
#     without one (sandbox-fallback); on EC2 or a privileged host builders
#     get their own namespaces too;
#   - the official binary cache, so most closures are downloaded, not built.
{
  substituters ? [ "https://cache.nixos.org" ],
  trustedPublicKeys ? [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ],
  # More settings, e.g. { http-connections = 50; }; they win over the ones below.
  extraSettings ? { },
}:

let
  settings = {
    build-users-group = "nixbld";
    sandbox = true;
    sandbox-fallback = true;
    inherit substituters;
    trusted-public-keys = trustedPublicKeys;
    experimental-features = [ "nix-command" ];
    # Build and download in parallel, with every core of the task.
    max-jobs = "auto";
    cores = 0;
    # Give up quickly on an unreachable cache or mirror instead of hanging
    # a build until NIX_TIMEOUT.
    connect-timeout = 15;
    # Failed builds quote Nix's log to the client; show enough of it.
    log-lines = 50;
    # The store is a cache on a disk of its own size (WorkerStorage): when a
    # build or download leaves less than 2 GiB free, Nix deletes paths
    # nothing uses until 8 GiB are. Before each build the worker also
    # collects below NIXERY_MIN_FREE (set in infra/template.yaml).
    min-free = 2147483648;
    max-free = 8589934592;
  } // extraSettings;

  render = value:
    if builtins.isBool value then (if value then "true" else "false")
    else if builtins.isList value then builtins.concatStringsSep " " (map render value)
    else toString value;

  line = name: "${name} = ${render settings.${name}}\n";
in
builtins.concatStringsSep "" (map line (builtins.attrNames settings))
