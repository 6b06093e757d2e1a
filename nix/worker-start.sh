#!/bin/sh
# The worker image's entrypoint (nix/worker-image-config.nix): first keeps
# the build users off this host's loopback and link-local metadata
# addresses where the host allows it (nix/isolate-builders.sh: an EC2
# container instance granting NET_ADMIN, a VM), then runs `nixery worker`.
# ECS Fargate grants no NET_ADMIN, so there the rules cannot be applied:
# docs/security.md says what protects the worker's credentials instead.
/bin/isolate-builders nixbld || true
exec /bin/nixery worker "$@"
