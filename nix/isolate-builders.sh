#!/bin/sh
# Keeps Nix's build users away from this machine's own network services.
#
# Nix runs fixed-output derivations (fetchers) in the host's network
# namespace, even in its sandbox, so their builders reach whatever listens
# on loopback (the registry, a database, a debugging port) and on the
# link-local metadata addresses (on EC2, 169.254.169.254 and fd00:ec2::254
# hand out the instance role's credentials), and what they print ends up
# in the build's log, which pullers see. This rejects connections to
# those addresses from processes of the build users' group, and touches
# nothing else: other users' loopback traffic is never matched. DNS (port
# 53) stays open, since a resolver there (127.0.0.53, 169.254.169.253) is
# how fetchers find their hosts.
#
#   isolate-builders.sh [GROUP]        GROUP defaults to nixbld
#
# Idempotent: the rules live in a chain of their own, NIXERY-BUILDERS,
# rewritten on every run, with one jump to it from OUTPUT. Needs root (or
# CAP_NET_ADMIN) and iptables; exits 1, having changed nothing, where the
# host does not allow it (an unprivileged container, ECS Fargate).
# Used by .ci/setup and by the worker image's entrypoint (nix/worker.nix).
set -eu

group=${1:-nixbld}
chain=NIXERY-BUILDERS

fail() {
  echo "isolate-builders: $*; builders can reach this host's loopback and metadata services" >&2
  exit 1
}

grep -q "^$group:" /etc/group || fail "no group $group"
command -v iptables >/dev/null 2>&1 || fail "no iptables"
iptables -w -S OUTPUT >/dev/null 2>&1 || fail "iptables is not allowed here"
ipv6=false
if [ -e /proc/net/if_inet6 ]; then
  command -v ip6tables >/dev/null 2>&1 && ip6tables -w -S OUTPUT >/dev/null 2>&1 ||
    fail "IPv6 is on but ip6tables is not usable"
  ipv6=true
fi

# rules TOOL DESTINATION...: the chain, rewritten, and the jump to it.
rules() {
  tool=$1
  shift
  $tool -w -N "$chain" 2>/dev/null || $tool -w -F "$chain"
  for proto in udp tcp; do
    $tool -w -A "$chain" -m owner --gid-owner "$group" -p "$proto" --dport 53 -j RETURN
  done
  for destination in "$@"; do
    $tool -w -A "$chain" -m owner --gid-owner "$group" -d "$destination" -j REJECT
  done
  $tool -w -C OUTPUT -j "$chain" 2>/dev/null || $tool -w -I OUTPUT 1 -j "$chain"
}

# Loopback, and link-local: EC2's instance metadata (169.254.169.254), the
# ECS task metadata and credentials endpoint (169.254.170.2), and the rest.
rules iptables 127.0.0.0/8 169.254.0.0/16
if $ipv6; then
  rules ip6tables ::1/128 fe80::/10 fd00:ec2::254/128
fi
echo "isolate-builders: group $group may not connect to loopback or link-local addresses (but DNS)" >&2
