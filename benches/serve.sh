#!/usr/bin/env bash
# Serving speed of nixery next to the CNCF registry (distribution 2.8,
# Debian's `docker-registry`) holding the same image, measured with wrk.
#
#   benches/serve.sh                    # from anywhere; prints a Markdown table
#   DURATION=3s benches/serve.sh        # shorter runs (default 10s each)
#   NIXERY_BIN=path/to/nixery benches/serve.sh   # skip building nixery
#
# Other settings: IMAGE (default shell/hello), WRK_THREADS and
# WRK_CONNECTIONS (default 2 and 16), STARTS (startup samples, default 5),
# CARGO_TARGET_DIR (where cargo builds; default target/ in the repository).
#
# What it does, all on 127.0.0.1: builds the image once with nixery on the
# filesystem and once on S3 (s3s-fs, `cargo run --example s3-server`), copies
# it into distribution with skopeo, then runs wrk against each registry in
# turn: manifest by tag (filesystem and S3), blob GET answered by a 307 to a
# presigned URL (S3), and the config blob on one kept-alive connection
# (filesystem). It also times each registry's start to its first `GET /v2/`
# answer and reads its peak RSS under the S3 load. It installs what it
# needs with apt (docker-registry, wrk, skopeo, curl, python3) and runs
# .ci/setup (Nix, build users, the fixture package set's busybox). Both
# registries log to files: nixery its usual line per request (RUST_LOG=info),
# distribution without its access log (which only helps distribution).
#
# Progress goes to stderr, the results table to stdout. Everything it starts
# is stopped on exit, and its temporary directory removed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

DURATION=${DURATION:-10s}
IMAGE=${IMAGE:-shell/hello}
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-16}
STARTS=${STARTS:-5}

S3_ACCESS_KEY=nixerybench
S3_SECRET_KEY=nixerybenchsecret
S3_REGION=us-east-1
NIXERY_BUCKET=nixery
DIST_BUCKET=distribution
MANIFEST_TYPES="application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"

# Plumbing (log, warn, die, cleanup on exit), and starting, waiting for
# and stopping processes, by PID.
# shellcheck source=benches/processes.sh
. "$repo/benches/processes.sh"

# http_status URL [CURL ARGS...]: the status code of a GET (redirects not followed).
http_status() {
  local url=$1
  shift
  curl -s -o /dev/null -w '%{http_code}' "$@" "$url"
}

# expect_status CODE URL [CURL ARGS...]: fails unless a GET answers CODE.
expect_status() {
  local code=$1 url=$2 got
  shift 2
  got=$(http_status "$url" "$@")
  [ "$got" = "$code" ] || die "GET $url answered $got, expected $code"
}

# header NAME: the value of response header NAME (lowercase) in the headers on stdin.
header() {
  tr -d '\r' | awk -v name="$1:" 'tolower($1) == name {print $2}'
}

# json_get FILE EXPR: a value from a JSON file (EXPR indexes `d`, e.g. d["config"]["digest"]).
json_get() {
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# --- setup ------------------------------------------------------------------

install_missing() {
  local need=() sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  command -v docker-registry >/dev/null || need+=(docker-registry)
  command -v wrk >/dev/null || need+=(wrk)
  command -v skopeo >/dev/null || need+=(skopeo)
  command -v curl >/dev/null || need+=(curl)
  command -v python3 >/dev/null || need+=(python3)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  # Nix, busybox, build users, the fixture package set's busybox.
  .ci/setup
}

# Sets nixery_bin and s3_server_bin, building what is needed.
build_binaries() {
  local target_dir=${CARGO_TARGET_DIR:-$repo/target}
  if [ -n "${NIXERY_BIN:-}" ]; then
    [ -x "$NIXERY_BIN" ] || die "NIXERY_BIN=$NIXERY_BIN is not an executable"
    nixery_bin=$NIXERY_BIN
    log "building the s3-server example (nixery from NIXERY_BIN)"
    cargo build --release --locked --example s3-server
  else
    log "building nixery and the s3-server example (release)"
    cargo build --release --locked --bin nixery --example s3-server
    nixery_bin=$target_dir/release/nixery
  fi
  s3_server_bin=$target_dir/release/examples/s3-server
  [ -x "$nixery_bin" ] || die "no nixery binary at $nixery_bin"
  [ -x "$s3_server_bin" ] || die "no s3-server binary at $s3_server_bin"
}

# The environment every nixery process gets: only this script's settings.
nixery_env() {
  echo "NIXERY_PKGS_PATH=$repo/tests/fixtures/pkgs"
  echo "NIX_CONF_DIR=$NIX_CONF_DIR"
  echo "RUST_LOG=${RUST_LOG:-info}"
}

nixery_s3_env() {
  echo "NIXERY_STORAGE_BACKEND=s3"
  echo "NIXERY_S3_BUCKET=$NIXERY_BUCKET"
  echo "NIXERY_S3_ENDPOINT=$s3_endpoint"
  echo "AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY"
  echo "AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY"
  echo "AWS_REGION=$S3_REGION"
  echo "AWS_EC2_METADATA_DISABLED=true"
}

# start_nixery NAME MODE: `nixery serve` on a free port, MODE `fs` (storage
# under $work/nixery-fs) or `s3`; sets last_pid and last_addr (host:port).
start_nixery() {
  local name=$1 mode=$2 settings
  if [ "$mode" = fs ]; then
    settings=$(nixery_env; echo "STORAGE_PATH=$work/nixery-fs")
  else
    settings=$(nixery_env; nixery_s3_env)
  fi
  local -a vars
  mapfile -t vars <<<"$settings"
  start_bg "$name" env "${vars[@]}" NIXERY_LISTEN=127.0.0.1:0 "$nixery_bin" serve
  last_addr=$(wait_for_line "$name" "$last_pid" 'nixery listening on http://([0-9.:]+)')
}

# Writes distribution's configuration for a storage section (YAML, indented
# by two) and an address; prints the file's path.
distribution_config() {
  local name=$1 addr=$2 storage=$3
  cat >"$work/$name.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  cache:
    blobdescriptor: inmemory
$storage
http:
  addr: $addr
  headers:
    X-Content-Type-Options: [nosniff]
EOF
  echo "$work/$name.yml"
}

# start_distribution NAME fs|s3: distribution on a free port over the tree
# in $work/s3/$DIST_BUCKET, either directly (filesystem driver) or through
# the S3 server; sets last_pid and last_addr.
start_distribution() {
  local name=$1 mode=$2 port storage config
  port=$(free_port)
  if [ "$mode" = fs ]; then
    storage="  filesystem:
    rootdirectory: $work/s3/$DIST_BUCKET"
  else
    storage="  s3:
    region: $S3_REGION
    regionendpoint: $s3_endpoint
    bucket: $DIST_BUCKET
    accesskey: $S3_ACCESS_KEY
    secretkey: $S3_SECRET_KEY
    forcepathstyle: true
    secure: false
    v4auth: true
  redirect:
    disable: false"
  fi
  config=$(distribution_config "$name" "127.0.0.1:$port" "$storage")
  # Its S3 driver panics at start when AWS_CA_BUNDLE is set.
  start_bg "$name" env -u AWS_CA_BUNDLE docker-registry serve "$config"
  last_addr=127.0.0.1:$port
  wait_for_http "$name" "$last_pid" "http://$last_addr/v2/"
}

# build_image ADDR: pulls the manifest of $IMAGE:latest once (nixery builds
# it), saves it as $work/manifest.json; sets built_digest and manifest_type.
build_image() {
  local addr=$1 headers=$work/manifest.headers code
  code=$(curl -s -o "$work/manifest.json" -D "$headers" -w '%{http_code}' --max-time 900 \
    -H "Accept: $MANIFEST_TYPES" "http://$addr/v2/$IMAGE/manifests/latest")
  [ "$code" = 200 ] || die "building $IMAGE on $addr: HTTP $code: $(cat "$work/manifest.json")"
  manifest_type=$(header content-type <"$headers")
  built_digest=$(header docker-content-digest <"$headers")
  if [ -z "$manifest_type" ] || [ -z "$built_digest" ]; then
    die "the manifest from $addr has no Content-Type or Docker-Content-Digest"
  fi
}

# manifest_digest ADDR: the Docker-Content-Digest of $IMAGE:latest there.
manifest_digest() {
  curl -s -o /dev/null -D - -H "Accept: $manifest_type" "http://$1/v2/$IMAGE/manifests/latest" |
    header docker-content-digest
}

# --- measuring --------------------------------------------------------------

declare -A rps p50 p99

# to_ms VALUE: a wrk latency (123.45us, 1.2ms, 1.01s, 2m) in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
    if (f < 0) { print "?"; exit 1 }
    printf "%.3f", n * f
  }'
}

# run_wrk KEY EXPECT URL WRK_ARGS...: checks that URL answers EXPECT, runs
# wrk, records req/s, p50 and p99 (ms) under KEY. Fails on any response
# that is not 2xx or 3xx, warns on socket errors.
run_wrk() {
  local key=$1 expect=$2 url=$3 out
  shift 3
  local curl_args=() arg
  for arg in "$@"; do
    if [[ "$arg" == Accept:* ]]; then curl_args=(-H "$arg"); fi
  done
  expect_status "$expect" "$url" "${curl_args[@]}"
  out=$work/wrk-$key.txt
  log "wrk $key: $url"
  wrk --latency -d "$DURATION" "$@" "$url" >"$out" 2>&1 || {
    cat "$out" >&2
    die "wrk failed for $key"
  }
  if grep -q 'Non-2xx or 3xx responses' "$out"; then
    cat "$out" >&2
    die "$key: $(grep 'Non-2xx or 3xx responses' "$out" | xargs) (expected $expect throughout)"
  fi
  if grep -q 'Socket errors' "$out"; then
    warn "$key: $(grep 'Socket errors' "$out" | xargs)"
  fi
  rps[$key]=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  p50[$key]=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
  p99[$key]=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
  [ -n "${rps[$key]}" ] || {
    cat "$out" >&2
    die "no Requests/sec in wrk's output for $key"
  }
  log "  ${rps[$key]} req/s, p50 ${p50[$key]} ms, p99 ${p99[$key]} ms"
}

# check_idle: samples how busy the CPUs are over one second while the
# registries idle; warns when other processes use them (the figures then
# measure the contention too). Keeps the highest sample in $busy_max.
busy_max=0
check_idle() {
  local before after busy
  before=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat)
  sleep 1
  after=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat)
  busy=$(awk -v a="$before" -v b="$after" 'BEGIN {
    split(a, x, " "); split(b, y, " "); t = (y[1] - x[1]) + (y[2] - x[2])
    printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }')
  if [ "$busy" -gt "$busy_max" ]; then busy_max=$busy; fi
  if [ "$busy" -gt 15 ]; then
    warn "the CPUs are ${busy}% busy before the runs (other processes): figures will be low and noisy"
  fi
}

# vm_hwm_mib PID: the process's peak resident set size, in MiB.
vm_hwm_mib() {
  awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"
}

# startup_ms VAR COMMAND...: starts COMMAND $STARTS times, each with VAR set
# to a fresh 127.0.0.1:PORT, and times each start until `GET /v2/` gets any
# HTTP answer (polled every millisecond); prints "BEST MEDIAN" in ms.
startup_ms() {
  python3 - "$STARTS" "$@" <<'PY'
import http.client, os, signal, statistics, subprocess, sys, time, socket

starts, var, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
times = []
for _ in range(starts):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    env = dict(os.environ, **{var: f"127.0.0.1:{port}"})
    began = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"{command[0]} exited at start: {proc.stderr.read().decode()}")
            if time.monotonic() - began > 60:
                sys.exit(f"{command[0]} did not answer GET /v2/ within 60 s")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/v2/")
                c.getresponse().read()
                break
            except OSError:
                time.sleep(0.001)
        times.append((time.monotonic() - began) * 1000)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
print(f"{min(times):.0f} {statistics.median(times):.0f}")
PY
}

# --- the report -------------------------------------------------------------

# ratio A B: A / B with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

cell() { printf '%.0f req/s · p50 %.2f ms · p99 %.2f ms' "${rps[$1]}" "${p50[$1]}" "${p99[$1]}"; }

row() {
  local title=$1 n=nixery-$2 d=distribution-$2
  printf '| %s | %s | %s | ×%s req/s · p50 ×%s · p99 ×%s |\n' "$title" "$(cell "$n")" "$(cell "$d")" \
    "$(ratio "${rps[$n]}" "${rps[$d]}")" "$(ratio "${p50[$n]}" "${p50[$d]}")" "$(ratio "${p99[$n]}" "${p99[$d]}")"
}

report() {
  local cpu
  cpu=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
  echo
  echo "Machine: $(nproc) cores${cpu:+ ($cpu)}, ${busy_max}% busy with other work before the runs; wrk and the registries share the cores. Image: \`$IMAGE:latest\`, $DURATION per run, \`-t$WRK_THREADS -c$WRK_CONNECTIONS\` unless noted; ratio = nixery / distribution (higher req/s is better, lower latency is better)."
  echo
  echo "| request | nixery | distribution | ratio |"
  echo "|---|---|---|---|"
  row "manifest by tag, filesystem" manifest-fs
  row "manifest by tag, S3" manifest-s3
  row "blob GET → 307, S3 (layer)" blob-307-s3
  row "config blob, one kept-alive connection (\`-t1 -c1\`), filesystem" small-blob-fs
  # shellcheck disable=SC2016 # backquotes are Markdown
  printf '| start to first `GET /v2/` answer, S3 (best / median of %s) | %s / %s ms | %s / %s ms | ×%s (median) |\n' \
    "$STARTS" "${startup_nixery% *}" "${startup_nixery#* }" "${startup_dist% *}" "${startup_dist#* }" \
    "$(ratio "${startup_nixery#* }" "${startup_dist#* }")"
  printf '| peak RSS (VmHWM) after the S3 runs | %s MiB | %s MiB | ×%s |\n' \
    "$rss_nixery" "$rss_dist" "$(ratio "$rss_nixery" "$rss_dist")"
}

# --- main -------------------------------------------------------------------

main() {
  install_missing
  if [ -z "${NIX_CONF_DIR:-}" ] && [ ! -S /nix/var/nix/daemon-socket/socket ]; then
    export NIX_CONF_DIR="$repo/.ci/nix"
  fi
  NIX_CONF_DIR=${NIX_CONF_DIR:-/etc/nix}
  # Only this script's settings reach nixery (exactly one package source).
  local v
  for v in $(compgen -e | grep -E '^NIXERY_' | grep -vx NIXERY_BIN || true); do unset "$v"; done
  unset STORAGE_PATH PORT

  build_binaries
  work=$(mktemp -d "${TMPDIR:-/tmp}/nixery-serve-bench.XXXXXX")
  local wrk_load=(-t "$WRK_THREADS" -c "$WRK_CONNECTIONS")
  local wrk_one=(-t 1 -c 1)

  log "starting the S3 server (buckets $NIXERY_BUCKET and $DIST_BUCKET under $work/s3)"
  mkdir -p "$work/s3/$NIXERY_BUCKET" "$work/s3/$DIST_BUCKET"
  start_bg s3-server "$s3_server_bin" --root "$work/s3" --port 0 \
    --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY"
  s3_endpoint=$(wait_for_line s3-server "$last_pid" 's3-server listening on (http://[0-9.:]+)')

  # Filesystem: build with nixery, push into distribution, measure.
  log "building $IMAGE with nixery (filesystem storage)"
  start_nixery nixery-fs fs
  local nixery_fs_pid=$last_pid nixery_fs=$last_addr
  build_image "$nixery_fs"
  local digest=$built_digest
  log "  $digest ($manifest_type)"
  local config_digest layer_digest
  config_digest=$(json_get "$work/manifest.json" 'd["config"]["digest"]')
  layer_digest=$(json_get "$work/manifest.json" 'd["layers"][0]["digest"]')

  log "copying it into distribution (filesystem driver, the S3 server's $DIST_BUCKET bucket)"
  start_distribution distribution-fs fs
  local dist_fs_pid=$last_pid dist_fs=$last_addr
  skopeo copy --quiet --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
    "docker://$nixery_fs/$IMAGE:latest" "docker://$dist_fs/$IMAGE:latest"
  [ "$(manifest_digest "$dist_fs")" = "$digest" ] ||
    die "distribution holds $IMAGE with another digest than nixery's $digest"

  local accept="Accept: $manifest_type"
  check_idle
  run_wrk nixery-manifest-fs 200 "http://$nixery_fs/v2/$IMAGE/manifests/latest" "${wrk_load[@]}" -H "$accept"
  run_wrk distribution-manifest-fs 200 "http://$dist_fs/v2/$IMAGE/manifests/latest" "${wrk_load[@]}" -H "$accept"
  run_wrk nixery-small-blob-fs 200 "http://$nixery_fs/v2/$IMAGE/blobs/$config_digest" "${wrk_one[@]}"
  run_wrk distribution-small-blob-fs 200 "http://$dist_fs/v2/$IMAGE/blobs/$config_digest" "${wrk_one[@]}"
  stop "$nixery_fs_pid"
  stop "$dist_fs_pid"

  # S3: build with one nixery process, measure a fresh one (so its peak RSS
  # is the serving's, not the build's), and distribution over the same tree
  # it wrote through the filesystem driver (it cannot receive pushes on s3s-fs).
  log "building $IMAGE with nixery (S3 storage at $s3_endpoint)"
  start_nixery nixery-s3-build s3
  build_image "$last_addr"
  [ "$built_digest" = "$digest" ] ||
    die "nixery on S3 built $built_digest, on the filesystem $digest: not the same image"
  stop "$last_pid"

  start_nixery nixery-s3 s3
  local nixery_s3_pid=$last_pid nixery_s3=$last_addr
  start_distribution distribution-s3 s3
  local dist_s3_pid=$last_pid dist_s3=$last_addr
  [ "$(manifest_digest "$dist_s3")" = "$digest" ] || die "distribution on S3 does not serve $digest"
  check_idle

  run_wrk nixery-manifest-s3 200 "http://$nixery_s3/v2/$IMAGE/manifests/latest" "${wrk_load[@]}" -H "$accept"
  run_wrk distribution-manifest-s3 200 "http://$dist_s3/v2/$IMAGE/manifests/latest" "${wrk_load[@]}" -H "$accept"
  run_wrk nixery-blob-307-s3 307 "http://$nixery_s3/v2/$IMAGE/blobs/$layer_digest" "${wrk_load[@]}"
  run_wrk distribution-blob-307-s3 307 "http://$dist_s3/v2/$IMAGE/blobs/$layer_digest" "${wrk_load[@]}"
  rss_nixery=$(vm_hwm_mib "$nixery_s3_pid")
  rss_dist=$(vm_hwm_mib "$dist_s3_pid")
  stop "$nixery_s3_pid"
  stop "$dist_s3_pid"

  log "timing $STARTS starts of each registry (S3 storage)"
  local -a vars
  mapfile -t vars < <(nixery_env; nixery_s3_env)
  startup_nixery=$(startup_ms NIXERY_LISTEN env "${vars[@]}" "$nixery_bin" serve)
  startup_dist=$(startup_ms REGISTRY_HTTP_ADDR env -u AWS_CA_BUNDLE docker-registry serve "$work/distribution-s3.yml")

  report
}

main "$@"
