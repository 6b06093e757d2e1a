# Sourced by the benchmark scripts: their plumbing, and the processes a
# benchmark starts, each stopped by its PID. The script sets `$work`
# (where each process's output goes, removed on exit unless KEEP_WORK is
# set); `pids` holds what the cleanup stops.

# Local requests must never go through a proxy.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"

script=${0##*/}
log() { echo "==> $*" >&2; }
warn() { echo "$script: WARNING: $*" >&2; }
die() {
  echo "$script: ERROR: $*" >&2
  exit 1
}
trap 'echo "$script: ERROR: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR

work=""
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    stop "$pid"
  done
  if [ -n "$work" ] && [ -z "${KEEP_WORK:-}" ]; then rm -rf "$work"; fi
  if [ -n "$work" ] && [ -n "${KEEP_WORK:-}" ]; then echo "kept $work" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# alive PID: whether the process runs (exists and is not a zombie).
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# start_bg NAME COMMAND...: runs COMMAND in the background with stdout in
# $work/NAME.out and stderr in $work/NAME.err; its PID in $last_pid.
last_pid=""
start_bg() {
  local name=$1
  shift
  : >"$work/$name.out"
  : >"$work/$name.err"
  "$@" >"$work/$name.out" 2>"$work/$name.err" </dev/null &
  last_pid=$!
  pids+=("$last_pid")
}

# stop PID: stops one process this script started (SIGTERM, then SIGKILL
# after 10 s), and waits for it.
stop() {
  local pid=$1 kept=() p i
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
  for p in "${pids[@]}"; do
    if [ "$p" != "$pid" ]; then kept+=("$p"); fi
  done
  pids=("${kept[@]}")
}

# wait_for_line NAME PID REGEX: waits (up to 60 s) until the process's stdout
# has a line matching REGEX (an extended regex with one group); prints the
# group. Fails with the process's stderr if it exits first.
wait_for_line() {
  local name=$1 pid=$2 regex=$3 i
  for ((i = 0; i < 600; i++)); do
    if [[ "$(cat "$work/$name.out")" =~ $regex ]]; then
      echo "${BASH_REMATCH[1]}"
      return
    fi
    if ! alive "$pid"; then
      cat "$work/$name.err" >&2
      die "$name exited before it was ready (its stderr is above)"
    fi
    sleep 0.1
  done
  cat "$work/$name.err" >&2
  die "$name was not ready after 60 s"
}

# wait_for_http NAME PID URL: waits (up to 60 s) until URL answers at all.
wait_for_http() {
  local name=$1 pid=$2 url=$3 i
  for ((i = 0; i < 600; i++)); do
    if curl -s -o /dev/null "$url"; then return; fi
    if ! alive "$pid"; then
      cat "$work/$name.err" >&2
      die "$name exited before it answered (its stderr is above)"
    fi
    sleep 0.1
  done
  cat "$work/$name.err" >&2
  die "$name did not answer $url within 60 s"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
