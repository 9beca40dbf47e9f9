#!/usr/bin/env bash
# Runs one command as N JAX processes on this machine (127.0.0.1), each with its own forced CPU
# devices: a multi-host run (per-host data, collectives over gloo, checkpoints written by every
# process) tested on one host.
#
# Usage: launch/local_multiprocess.sh [options] N COMMAND [ARGS...]
#   --devices_per_process=K  forced CPU devices per process (default 4)
#   --port=P                 coordinator port on 127.0.0.1 (default: a free one)
#   --log_dir=DIR            processes 1..N-1 write DIR/process_<i>.log (default: a new
#                            directory under ${TMPDIR:-/tmp})
#   --heartbeat_timeout=S    seconds without a heartbeat from a process before the others stop
#                            with an error (default 10)
#   --grace=S                after a process fails, seconds the others get to stop on their own
#                            before they are terminated (default 30)
#   --dry_run                print each process's command and exit
#
# Example (2 processes x 4 devices, the tiny config):
#   launch/local_multiprocess.sh 2 python -m xattn_vlm.train --multiprocess \
#       --config=experiments/tiny_test.py --workdir=/tmp/tiny_2proc
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and
# JAX_HEARTBEAT_TIMEOUT_SECONDS (read by xattn_vlm.distributed.initialize), JAX_PLATFORMS=cpu,
# XLA_FLAGS forcing K host devices, and no persistent compilation cache (a process that hits it
# while another compiles drifts ahead by more than the 30 s gloo waits for a peer). Process 0
# writes to this terminal, the others to their log files. SIGINT/SIGTERM are forwarded to every
# process as SIGTERM (the trainer saves and stops). Exits with the first non-zero exit status of a
# process, or 0 when all succeed.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "local_multiprocess: $*" >&2
  exit 2
}

positive_int() {  # name value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1: expected a positive integer, got '$2'"
}

devices=4
port=""
log_dir=""
heartbeat=10
grace=30
dry_run=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --heartbeat_timeout=*) heartbeat="${1#*=}" ;;
    --grace=*) grace="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --help) usage ;;
    *) die "unknown option '$1'; see --help" ;;
  esac
  shift
done
[[ $# -ge 2 ]] || die "expected N and a COMMAND, got '$*'; see --help"
num_processes="$1"
shift
positive_int N "$num_processes"
positive_int --devices_per_process "$devices"
positive_int --heartbeat_timeout "$heartbeat"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace: expected a non-negative integer, got '$grace'"
if [[ -z "$port" ]]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
positive_int --port "$port"
log_dir="${log_dir:-${TMPDIR:-/tmp}/local_multiprocess.$$}"

process_env() {  # i -> the environment of process i, one VAR=value per word
  printf '%s\n' "JAX_PLATFORMS=cpu" \
    "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices" \
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_processes" \
    "JAX_PROCESS_ID=$1" "JAX_HEARTBEAT_TIMEOUT_SECONDS=$heartbeat" \
    "JAX_ENABLE_COMPILATION_CACHE=false"
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    mapfile -t environment < <(process_env "$i")
    redirect=""
    ((i == 0)) || redirect=" >$log_dir/process_$i.log 2>&1"
    line="$(printf '%q ' env "${environment[@]}" "$@")"
    echo "${line% }${redirect} &"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
for ((i = 0; i < num_processes; i++)); do
  mapfile -t environment < <(process_env "$i")
  if ((i == 0)); then
    env "${environment[@]}" "$@" &
  else
    env "${environment[@]}" "$@" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
  echo "local_multiprocess: process $i pid $! log $( ((i == 0)) && echo stdout || echo "$log_dir/process_$i.log")" >&2
done

finished=()
terminate() {  # signal -> sends it to every process still running
  for i in "${!pids[@]}"; do
    [[ -n "${finished[i]:-}" ]] || kill "-$1" "${pids[i]}" 2>/dev/null || true
  done
}
trap 'echo "local_multiprocess: stopping every process (SIGTERM)" >&2; terminate TERM' INT TERM

status=0
failed_at=""
terminated_at=""
running="$num_processes"
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    [[ -z "${finished[i]:-}" ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    finished[i]=1
    running=$((running - 1))
    if ((rc != 0 && status == 0)); then
      status="$rc"
      failed_at="$SECONDS"
      echo "local_multiprocess: process $i exited with status $rc; the others get ${grace}s to stop" >&2
    fi
  done
  if [[ -n "$failed_at" && -z "$terminated_at" ]] && ((running > 0 && SECONDS - failed_at >= grace)); then
    echo "local_multiprocess: terminating the $running processes still running" >&2
    terminate TERM
    terminated_at="$SECONDS"
  elif [[ -n "$terminated_at" ]] && ((running > 0 && SECONDS - terminated_at >= 5)); then
    terminate KILL
  fi
  sleep 0.2
done
exit "$status"
