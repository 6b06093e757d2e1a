#!/usr/bin/env bash
# Cold pulls: an image assembled by the registry from a signed Nix binary
# cache, next to the same image built by a freshly started worker whose
# Nix store is empty and substitutes from that same cache; NAR -> layer
# throughput next to packing the same store path from a Nix store; and the
# registry's peak memory while it assembles the 50 MB fixture package.
#
#   benches/cold_pull.sh                 # from anywhere; prints Markdown tables
#   RUNS=3 benches/cold_pull.sh          # fewer samples (default 5)
#   NIXERY_BIN=path/to/nixery benches/cold_pull.sh   # skip building nixery
#
# Other settings: IMAGES (default "shell/curl big"), CACHES (NAR
# compressions of the binary cache, default "zstd xz"), LAYERS (layer
# compressions of the throughput runs, default "gzip zstd"),
# CARGO_TARGET_DIR (where cargo builds; default target/ in the repository).
#
# What it does, all on 127.0.0.1:
#
# 1. Builds the fixture packages (tests/fixtures/pkgs) with Nix, makes a
#    signing key and one signed binary cache per NAR compression with
#    `nix copy --to file://...?compression=...&secret-key=...` (at Nix's
#    default levels), serves each with Python's http.server (keep-alive,
#    no Nagle, a deep listen backlog), and indexes the package set with `nixery index`
#    into the registry's storage.
# 2. Runs the deployed topology: S3 (s3s-fs, the `s3-server` example),
#    SQS (moto's server), the registry as `nixery serve` with
#    NIXERY_BUILDER=sqs and no Nix on its PATH, and for the worker path a
#    `nixery worker` started for each pull in a private mount namespace
#    where an empty directory is bind-mounted over /nix: an empty Nix
#    store and database at the real store path (so the cache's store paths
#    apply), a fresh HOME (no narinfo cache of Nix's), and a nix.conf whose
#    only substituter is the cache, with its key trusted. That is what a
#    newly started task has, except that the cache answers from loopback.
# 3. Times each image's cold pull (the manifest request of a pull, answered
#    once the image is stored) RUNS times per path and cache, the paths
#    taking turns: by assembly (NIXERY_FROM_CACHE=only, no worker), and
#    through SQS from the moment the worker process starts (the pull is
#    sent right after) to the answer. Before every pull the bucket is
#    emptied but for the attribute index, each pull has a queue of its own,
#    and every process is new: each pull is cold.
# 4. Times packing the layer of `big` (the `layer packed` log line, which
#    covers the NAR download, its decompression and checks, tar, layer
#    compression and digests) with `nixery serve` in local mode on the
#    filesystem: from each cache, and from the Nix store (the package
#    realised beforehand, as a worker has it after substituting).
# 5. Reads the registry's peak RSS (VmHWM) and the CPU time it used after
#    each assembly (of `big` among others), and the worker's peak RSS.
#
# It installs what it needs (curl and python3 with apt, moto with pip) and
# runs .ci/setup (Nix, build users, the fixture's busybox). Progress goes to
# stderr, the results tables to stdout. Everything it starts is stopped on
# exit, and its temporary directory removed (KEEP_WORK=1 keeps it).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

RUNS=${RUNS:-5}
IMAGES=${IMAGES:-shell/curl big}
CACHES=${CACHES:-zstd xz}
LAYERS=${LAYERS:-gzip zstd}

S3_ACCESS_KEY=nixerybench
S3_SECRET_KEY=nixerybenchsecret
S3_REGION=us-east-1
BUCKET=nixery
MANIFEST_TYPES="application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"
# What the images need, their implicit packages included.
CACHED=(hello bashInteractive coreutils moreutils nano curl jq big cacert iana-etc)
# The package whose layer the throughput and memory rows measure.
BIG=big

# Plumbing (log, warn, die, cleanup on exit, KEEP_WORK=1), and starting,
# waiting for and stopping processes, by PID.
# shellcheck source=benches/processes.sh
. "$repo/benches/processes.sh"

# check_idle: samples how busy the CPUs are over one second; warns when
# other processes use them. Keeps the highest sample in $busy_max.
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

# vm_hwm_kib PID: the process's peak resident set size, in KiB.
vm_hwm_kib() {
  awk '/^VmHWM:/ {print $2}' "/proc/$1/status"
}

# cpu_ticks PID: the CPU time the process has used (user and system, all
# its threads), in clock ticks.
cpu_ticks() {
  sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

now_ns() { date +%s%N; }

# --- setup ------------------------------------------------------------------

install_missing() {
  local need=() sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  command -v curl >/dev/null || need+=(curl)
  command -v python3 >/dev/null || need+=(python3)
  command -v unshare >/dev/null || need+=(util-linux)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if ! command -v moto_server >/dev/null; then
    log "installing (pip): moto[server]"
    python3 -m pip install --quiet --root-user-action=ignore "moto[server]"
    hash -r
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

# A binary cache's files over HTTP: `python3 -m http.server`, with keep-alive
# (HTTP/1.1) and Nagle's algorithm off, as a CDN has them, and a listen
# backlog that takes the clients' parallel requests. (http.server's default
# backlog of 5 drops the connections beyond it, which their clients retry a
# second later; and it sends headers and body in separate writes, so with
# Nagle's algorithm on every response on a kept-alive connection waits
# 40 ms for a delayed ACK.)
CACHE_SERVER='
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
handler = functools.partial(Handler, directory=sys.argv[1])
Server(("127.0.0.1", int(sys.argv[2])), handler).serve_forever()
'

# The fixture packages, a signing key, and one signed cache per NAR
# compression, each served over HTTP; sets cache_url[COMPRESSION],
# public_key and big_path.
declare -A cache_url
make_caches() {
  local pkgs=$repo/tests/fixtures/pkgs args=() a paths c dir started
  for a in "${CACHED[@]}"; do args+=(-A "$a"); done
  log "building the fixture packages with Nix"
  mapfile -t paths < <(nix-build "$pkgs" "${args[@]}" --no-out-link)
  big_path=$(nix-build "$pkgs" -A "$BIG" --no-out-link)
  mkdir -p "$work/key"
  nix key generate-secret --key-name nixery-bench-1 >"$work/key/secret"
  public_key=$(nix key convert-secret-to-public <"$work/key/secret")
  for c in $CACHES; do
    dir=$work/cache-$c
    log "nix copy of the closure into a $c binary cache (Nix's default level)"
    started=$(now_ns)
    nix copy --to "file://$dir?compression=$c&secret-key=$work/key/secret" "${paths[@]}"
    log "  $(($(now_ns) / 1000000 - started / 1000000)) ms, $(du -sh "$dir" | cut -f1)"
    local port
    port=$(free_port)
    start_bg "cache-$c" python3 -c "$CACHE_SERVER" "$dir" "$port"
    cache_url[$c]=http://127.0.0.1:$port
    wait_for_http "cache-$c" "$last_pid" "${cache_url[$c]}/nix-cache-info"
  done
}

# The Nix configuration of a fresh worker substituting from cache $1.
worker_nix_conf() {
  local c=$1 dir=$work/nix-worker-$1
  mkdir -p "$dir"
  cat >"$dir/nix.conf" <<EOF
build-users-group = nixbld
sandbox = true
substituters = ${cache_url[$c]}
trusted-public-keys = $public_key
experimental-features = nix-command
EOF
  echo "$dir"
}

start_s3() {
  mkdir -p "$work/s3/$BUCKET"
  start_bg s3-server "$s3_server_bin" --root "$work/s3" --port 0 \
    --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY"
  s3_endpoint=$(wait_for_line s3-server "$last_pid" 's3-server listening on (http://[0-9.:]+)')
}

start_moto() {
  local port
  port=$(free_port)
  start_bg moto moto_server -H 127.0.0.1 -p "$port"
  sqs_endpoint=http://127.0.0.1:$port
  wait_for_http moto "$last_pid" "$sqs_endpoint/moto-api/"
}

# make_queue NAME: a new SQS queue on moto; prints its URL.
make_queue() {
  python3 - "$sqs_endpoint" "$1" <<'PY'
import sys, boto3
sqs = boto3.client("sqs", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="y")
print(sqs.create_queue(QueueName=sys.argv[2], Attributes={"VisibilityTimeout": "300"})["QueueUrl"])
PY
}

# The S3 settings every nixery process of the deployed topology gets.
s3_env() {
  echo "NIXERY_STORAGE_BACKEND=s3"
  echo "NIXERY_S3_BUCKET=$BUCKET"
  echo "NIXERY_S3_ENDPOINT=$s3_endpoint"
  echo "AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY"
  echo "AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY"
  echo "AWS_REGION=$S3_REGION"
  echo "AWS_EC2_METADATA_DISABLED=true"
}

base_env() {
  echo "HOME=$work/home"
  echo "TMPDIR=$work/tmp"
  echo "NO_PROXY=$NO_PROXY"
  echo "RUST_LOG=info"
  echo "NIXERY_PKGS_PATH=$repo/tests/fixtures/pkgs"
}

# The attribute index, made once by `nixery index` (with the host's Nix):
# into the bucket, and into a filesystem storage the throughput runs copy.
make_indexes() {
  local -a vars
  mapfile -t vars < <(base_env; s3_env)
  log "indexing the fixture package set into S3 and the filesystem"
  env -i "${vars[@]}" PATH="$PATH" NIX_CONF_DIR="$NIX_CONF_DIR" "$nixery_bin" index >"$work/index-s3.log" 2>&1 ||
    { cat "$work/index-s3.log" >&2; die "nixery index (S3) failed"; }
  mapfile -t vars < <(base_env)
  env -i "${vars[@]}" PATH="$PATH" NIX_CONF_DIR="$NIX_CONF_DIR" STORAGE_PATH="$work/fs-indexed" \
    "$nixery_bin" index >"$work/index-fs.log" 2>&1 ||
    { cat "$work/index-fs.log" >&2; die "nixery index (filesystem) failed"; }
}

# Empties the bucket but for the attribute index (made once per revision
# ahead of pulls, not by them).
wipe_bucket() {
  find "$work/s3/$BUCKET" -mindepth 1 -maxdepth 1 ! -name attrs -exec rm -rf {} +
}

# start_registry NAME QUEUE VAR=VALUE...: `nixery serve` as the function
# runs (S3, SQS dispatch, no Nix on its PATH); sets last_pid and last_addr.
start_registry() {
  local name=$1 queue=$2
  shift 2
  local -a vars
  mapfile -t vars < <(base_env; s3_env)
  start_bg "$name" env -i "${vars[@]}" PATH="$work/empty-path" \
    NIXERY_LISTEN=127.0.0.1:0 NIXERY_BUILDER=sqs NIXERY_QUEUE_URL="$queue" \
    NIXERY_SQS_ENDPOINT="$sqs_endpoint" "$@" "$nixery_bin" serve
  last_addr=$(wait_for_line "$name" "$last_pid" 'nixery listening on http://([0-9.:]+)')
}

# pull ADDR IMAGE: the manifest request of a pull of IMAGE:latest; fails
# unless it answers 200. Prints curl's total time in seconds.
pull() {
  local addr=$1 image=$2 out
  out=$(curl -s -o "$work/manifest.json" -w '%{http_code} %{time_total}' --max-time 900 \
    -H "Accept: $MANIFEST_TYPES" "http://$addr/v2/$image/manifests/latest")
  [ "${out% *}" = 200 ] || die "pull of $image from $addr: HTTP ${out% *}: $(cat "$work/manifest.json")"
  echo "${out#* }"
}

# --- the runs ---------------------------------------------------------------

results=""
seq_no=0

# record FIELDS...: one tab-separated line of results.
record() {
  local IFS=$'\t'
  echo "$*" >>"$results"
}

# keep_log KIND LOG: keeps a process's log for the report's breakdown.
keep_log() {
  local kept=$work/logs/$seq_no-$1.log
  cp "$2" "$kept"
  echo "$kept"
}

# assembly_run IMAGE CACHE RUN: a cold pull assembled by the registry.
assembly_run() {
  local image=$1 c=$2 run=$3 queue secs rss pid kept cpu0 cpu1
  seq_no=$((seq_no + 1))
  wipe_bucket
  queue=$(make_queue "assembly-$seq_no")
  start_registry "registry-$seq_no" "$queue" NIXERY_SUBSTITUTER="${cache_url[$c]}" \
    NIXERY_TRUSTED_KEYS="$public_key" NIXERY_FROM_CACHE=only
  pid=$last_pid
  cpu0=$(cpu_ticks "$pid")
  secs=$(pull "$last_addr" "$image")
  cpu1=$(cpu_ticks "$pid")
  rss=$(vm_hwm_kib "$pid")
  stop "$pid"
  kept=$(keep_log registry "$work/registry-$seq_no.err")
  grep -q 'step=fetching' "$kept" || die "the registry did not assemble $image (its log: $kept)"
  record pull assembly "$c" "$image" "$run" "$secs" "$kept" "$kept"
  record rss registry "$c" "$image" "$run" "$rss" "$((cpu1 - cpu0))"
  log "  assembly, $c cache, $image: $secs s, peak RSS $((rss / 1024)) MiB"
}

# worker_run IMAGE CACHE RUN: a cold pull built by a worker started for it
# with an empty Nix store.
worker_run() {
  local image=$1 c=$2 run=$3 queue reg_pid worker_pid t0 t1 secs total rss store conf kept_r kept_w
  seq_no=$((seq_no + 1))
  wipe_bucket
  queue=$(make_queue "worker-$seq_no")
  start_registry "registry-$seq_no" "$queue" NIXERY_SUBSTITUTER=none
  reg_pid=$last_pid
  store=$work/fresh-$seq_no
  mkdir -p "$store/nix" "$store/home" "$store/tmp"
  conf=$(worker_nix_conf "$c")
  local -a vars
  mapfile -t vars < <(base_env; s3_env)
  t0=$(now_ns)
  # A private mount namespace with an empty /nix: Nix there has an empty
  # store and database at the usual store path.
  start_bg "worker-$seq_no" unshare --mount --propagation private -- \
    sh -c 'mount --bind "$0" /nix && exec "$@"' "$store/nix" \
    env -i "${vars[@]}" HOME="$store/home" TMPDIR="$store/tmp" PATH="$PATH" NIX_CONF_DIR="$conf" \
    NIXERY_QUEUE_URL="$queue" NIXERY_SQS_ENDPOINT="$sqs_endpoint" "$nixery_bin" worker
  worker_pid=$last_pid
  t1=$(now_ns)
  secs=$(pull "$last_addr" "$image")
  # From the worker's start: until the pull was sent, then the pull.
  total=$(awk -v a="$t0" -v b="$t1" -v s="$secs" 'BEGIN {printf "%.6f", (b - a) / 1e9 + s}')
  alive "$worker_pid" || die "the worker exited: $(cat "$work/worker-$seq_no.err")"
  rss=$(vm_hwm_kib "$worker_pid")
  stop "$worker_pid"
  stop "$reg_pid"
  kept_w=$(keep_log worker "$work/worker-$seq_no.err")
  kept_r=$(keep_log registry "$work/registry-$seq_no.err")
  grep -q 'step=realising' "$kept_w" || die "the worker did not build $image (its log: $kept_w)"
  # How many store paths the fresh store holds afterwards (outputs and
  # the package set's sources; derivations aside).
  local paths
  paths=$(find "$store/nix/store" -mindepth 1 -maxdepth 1 ! -name '*.drv' ! -name '.*' | wc -l)
  rm -rf "$store"
  record pull worker "$c" "$image" "$run" "$total" "$kept_w" "$kept_r" "$t0"
  record rss worker "$c" "$image" "$run" "$rss"
  log "  fresh worker, $c cache, $image: $total s from its start ($paths store paths in its store after)"
}

# throughput_run SOURCE LAYER RUN: `nixery serve` in local mode on the
# filesystem pulls the image of $BIG alone, from a cache or (SOURCE
# `store`) from the Nix store where it is realised; records its layer.
throughput_run() {
  local source=$1 layer=$2 run=$3 storage name pid kept cpu0 cpu1
  seq_no=$((seq_no + 1))
  storage=$work/fs-$seq_no
  cp -a "$work/fs-indexed" "$storage"
  name=local-$seq_no
  local -a vars extra
  mapfile -t vars < <(base_env)
  if [ "$source" = store ]; then
    extra=(NIXERY_SUBSTITUTER=none NIX_CONF_DIR="$NIX_CONF_DIR" PATH="$PATH")
  else
    extra=(NIXERY_SUBSTITUTER="${cache_url[$source]}" NIXERY_TRUSTED_KEYS="$public_key"
      NIXERY_FROM_CACHE=only PATH="$work/empty-path")
  fi
  start_bg "$name" env -i "${vars[@]}" "${extra[@]}" STORAGE_PATH="$storage" \
    NIXERY_LISTEN=127.0.0.1:0 NIXERY_IMPLICIT_PACKAGES= NIXERY_COMPRESSION="$layer" "$nixery_bin" serve
  pid=$last_pid
  last_addr=$(wait_for_line "$name" "$pid" 'nixery listening on http://([0-9.:]+)')
  cpu0=$(cpu_ticks "$pid")
  pull "$last_addr" "$BIG" >/dev/null
  cpu1=$(cpu_ticks "$pid")
  stop "$pid"
  rm -rf "$storage"
  kept=$(keep_log local "$work/$name.err")
  record layer "$source" "$layer" "$BIG" "$run" "$kept" "$((cpu1 - cpu0))"
}

# --- the report -------------------------------------------------------------

report() {
  local cpu
  cpu=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
  python3 - "$results" "$(nproc)" "$cpu" "$busy_max" "$RUNS" "$big_path" "$(getconf CLK_TCK)" <<'PY'
import re, statistics, sys
from datetime import datetime

results, cores, cpu, busy, runs, big_path, tick = sys.argv[1:8]
tick = int(tick)
rows = [line.rstrip("\n").split("\t") for line in open(results)]

def stamp(line):
    """A log line's time, in ns since the epoch."""
    t = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
    return int(t.timestamp() * 1e9)

def read_log(path):
    steps, packed, started, finished = {}, [], None, None
    for line in open(path):
        m = re.search(r"step=(\w+) elapsed_ms=(\d+)", line)
        if m and "build step" in line:
            steps[m.group(1)] = steps.get(m.group(1), 0) + int(m.group(2))
        m = re.search(r"tar_size=(\d+) elapsed_ms=(\d+)", line)
        if m and "layer packed" in line:
            packed.append((int(m.group(1)), int(m.group(2))))
        if "build started" in line:
            started = stamp(line)
        if "build finished" in line:
            finished = stamp(line)
    return steps, packed, started, finished

def med(xs): return statistics.median(xs)
def s(x): return f"{x:.2f} s"
def ms(x): return f"{x / 1000:.2f}"

print()
print(f"Machine: {cores} cores ({cpu}), up to {busy}% busy with other work before the runs. "
      f"{runs} runs of each, the paths taking turns; min / median.")

# Cold pulls.
def answered(path):
    """When the registry answered the manifest request, and how long it took (ns)."""
    for line in open(path):
        m = re.search(r'path="/v2/[^"]*/manifests/latest" status=200 elapsed_ms=(\d+)', line)
        if m:
            return stamp(line), int(m.group(1)) * 1_000_000
    raise SystemExit(f"no answered manifest request in {path}")

pulls = {}
for r in rows:
    if r[0] != "pull":
        continue
    kind, cache, image, total, build_log, registry_log = r[1], r[2], r[3], float(r[5]), r[6], r[7]
    answer, took = answered(registry_log)
    # The worker path starts with the worker; assembly with the request.
    t0 = int(r[8]) if kind == "worker" else answer - took
    finished = read_log(build_log)[3]
    stored = (finished - t0) / 1e9
    pulls.setdefault((image, cache, kind), []).append((total, t0, answer, build_log, stored))

print()
print("Cold pull of a new image: assembled by the registry from the pull's request, "
      "and through SQS from the start of a fresh worker (the pull sent right after it); "
      "until the pull's answer, and until the image record is stored (the answer "
      "without the registry's polling of storage for it).")
print()
print("| image | cache NARs | assembly: answered | fresh worker: answered | ratio (median) | target ≤ 0.33 "
      "| assembly: stored | fresh worker: stored | ratio (median) |")
print("|---|---|---|---|---|---|---|---|---|")
keys = sorted({(i, c) for (i, c, _) in pulls}, key=lambda k: (k[0], k[1] != "zstd", k[1]))
for image, cache in keys:
    a = pulls.get((image, cache, "assembly"), [])
    w = pulls.get((image, cache, "worker"), [])
    if not a or not w:
        continue
    aa, wa = [x[0] for x in a], [x[0] for x in w]
    ast, wst = [x[4] for x in a], [x[4] for x in w]
    ratio = med(aa) / med(wa)
    print(f"| `{image}` | {cache} | {s(min(aa))} / {s(med(aa))} | {s(min(wa))} / {s(med(wa))} "
          f"| {ratio:.2f} | {'met' if ratio <= 1 / 3 else 'not met'} "
          f"| {s(min(ast))} / {s(med(ast))} | {s(min(wst))} / {s(med(wst))} | {med(ast) / med(wst):.2f} |")

# Where the time goes (medians).
print()
print("Where the time goes (medians of the runs, seconds; the steps as the build logs them):")
print()
print("| image | cache NARs | path | to the build's start | steps | image record → answer | total |")
print("|---|---|---|---|---|---|---|")
order = ["evaluating", "realising", "resolving", "grouping", "packing", "fetching",
         "customising", "uploading"]
for image, cache in keys:
    for kind in ("assembly", "worker"):
        samples = pulls.get((image, cache, kind), [])
        if not samples:
            continue
        to_start, after, steps_all = [], [], {}
        for total, t0, answer, build_log, _ in samples:
            steps, _, started, finished = read_log(build_log)
            if started is None or finished is None:
                continue
            to_start.append((started - t0) / 1e9)
            after.append((answer - finished) / 1e9)
            for k, v in steps.items():
                steps_all.setdefault(k, []).append(v)
        shown = ", ".join(f"{k} {ms(med(steps_all[k]))}" for k in order if k in steps_all)
        label = "fresh worker" if kind == "worker" else "assembly"
        start_what = "from the worker's start" if kind == "worker" else "from the request"
        print(f"| `{image}` | {cache} | {label} | {med(to_start):.2f} ({start_what}) | {shown} "
              f"| {med(after):.2f} | {med([x[0] for x in samples]):.2f} |")

# Throughput.
layers = {}
for r in rows:
    if r[0] != "layer":
        continue
    source, layer, log, cpu_s = r[1], r[2], r[5], int(r[6]) / tick
    _, packed, _, _ = read_log(log)
    if packed:
        size, took = max(packed)
        layers.setdefault((layer, source), []).append((size, took, cpu_s))
print()
print(f"NAR → layer throughput: the layer of `{big_path.split('-', 1)[1]}` "
      "(the `layer packed` line: NAR download, decompression and checks, tar, layer "
      "compression, digests), `nixery serve` in local mode, min / median:")
print()
print("| layer | packed from | tar size | time | MB/s (median) | cache / store (median) | target ≥ 0.9 "
      "| CPU time of the pull (median) | cache / store by CPU time |")
print("|---|---|---|---|---|---|---|---|---|")
for layer in sorted({l for (l, _) in layers}):
    base = layers.get((layer, "store"))
    for source in ["store"] + sorted(s for (l, s) in layers if l == layer and s != "store"):
        samples = layers.get((layer, source))
        if not samples:
            continue
        size = samples[0][0]
        times = [t for _, t, _ in samples]
        cpu_s = med([c for _, _, c in samples])
        rate = size / 1e6 / (med(times) / 1000)
        if source == "store" or not base:
            ratio, target, cpu_ratio = "", "", ""
        else:
            r = med([t for _, t, _ in base]) / med(times)
            ratio, target = f"{r:.2f}", "met" if r >= 0.9 else "not met"
            cpu_ratio = f"{med([c for _, _, c in base]) / cpu_s:.2f}"
        what = "the Nix store" if source == "store" else f"{source} NARs over HTTP"
        print(f"| {layer} | {what} | {size / 1e6:.1f} MB | {min(times) / 1000:.2f} / {med(times) / 1000:.2f} s "
              f"| {rate:.0f} | {ratio} | {target} | {cpu_s:.2f} s ({cpu_s * 1000 / (size / 1e6):.1f} ms/MB) | {cpu_ratio} |")

# Peak memory.
print()
print("Peak RSS (VmHWM) after the cold pull, min / median / max of the runs (MiB); "
      "and the CPU time the registry used for the pull (all its threads, median):")
print()
print("| process | image | cache NARs | peak RSS | target ≤ 128 MiB | CPU time |")
print("|---|---|---|---|---|---|")
rss = {}
for r in rows:
    if r[0] == "rss":
        cpu_s = int(r[6]) / tick if len(r) > 6 and r[6] else None
        rss.setdefault((r[3], r[2], r[1]), []).append((int(r[5]) / 1024, cpu_s))
for (image, cache, proc), samples in sorted(rss.items(), key=lambda kv: (kv[0][2] != "registry", kv[0][0], kv[0][1])):
    xs = [x for x, _ in samples]
    cpus = [c for _, c in samples if c is not None]
    name = "registry (assembling)" if proc == "registry" else "worker (nixery only; Nix runs as child processes)"
    target = ("met" if max(xs) <= 128 else "not met") if proc == "registry" else ""
    shown = f"{med(cpus):.2f} s" if cpus else ""
    print(f"| {name} | `{image}` | {cache} | {min(xs):.1f} / {med(xs):.1f} / {max(xs):.1f} | {target} | {shown} |")
PY
}

# --- main -------------------------------------------------------------------

main() {
  install_missing
  if [ -z "${NIX_CONF_DIR:-}" ] && [ ! -S /nix/var/nix/daemon-socket/socket ]; then
    export NIX_CONF_DIR="$repo/.ci/nix"
  fi
  NIX_CONF_DIR=${NIX_CONF_DIR:-/etc/nix}
  export NIX_CONF_DIR

  build_binaries
  work=$(mktemp -d "${TMPDIR:-/tmp}/nixery-cold-pull.XXXXXX")
  mkdir -p "$work/logs" "$work/home" "$work/tmp" "$work/empty-path"
  results=$work/results.tsv
  : >"$results"

  make_caches
  log "starting the S3 server and moto's SQS"
  start_s3
  start_moto
  make_indexes

  check_idle
  local run image c source layer
  for ((run = 1; run <= RUNS; run++)); do
    log "cold pulls, run $run of $RUNS"
    for image in $IMAGES; do
      for c in $CACHES; do
        assembly_run "$image" "$c" "$run"
        worker_run "$image" "$c" "$run"
      done
    done
  done

  check_idle
  for ((run = 1; run <= RUNS; run++)); do
    log "layer throughput, run $run of $RUNS"
    for layer in $LAYERS; do
      for source in store $CACHES; do
        throughput_run "$source" "$layer" "$run"
      done
    done
  done

  report
}

main "$@"
