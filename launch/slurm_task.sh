#!/usr/bin/env bash
# One task of a multi-node SLURM job (started by srun, one task per node): sets the JAX
# multi-process environment from SLURM's and runs COMMAND with it.
#
# Usage (inside an allocation, from the repository root):
#   srun --ntasks-per-node=1 launch/slurm_task.sh python -m xattn_vlm.train --multiprocess ...
#
# Sets JAX_COORDINATOR_ADDRESS (the job's first node, port JAX_COORDINATOR_PORT or one derived
# from the job id), JAX_NUM_PROCESSES (SLURM_NTASKS), JAX_PROCESS_ID (SLURM_PROCID),
# JAX_LOCAL_DEVICE_IDS (every GPU of the node: one process drives them all) and
# JAX_HEARTBEAT_TIMEOUT_SECONDS (default 100), read by xattn_vlm.distributed.initialize.
# Task 0 writes to the job's output; task i>0 to LOG_DIR/slurm-<job>-process_<i>.log
# (LOG_DIR defaults to logs). DRY_RUN=1 prints the environment and command instead.
set -euo pipefail

die() {
  echo "slurm_task: $*" >&2
  exit 2
}

[[ $# -gt 0 ]] || die "expected a COMMAND to run, got none"
for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_GPUS_ON_NODE; do
  [[ -n "${!var:-}" ]] || die "$var is not set; run this under srun inside a SLURM allocation with GPUs (--gpus-per-node)"
done
if [[ -n "${SLURM_NTASKS_PER_NODE:-}" && "$SLURM_NTASKS_PER_NODE" != 1 ]]; then
  die "SLURM_NTASKS_PER_NODE=$SLURM_NTASKS_PER_NODE: expected 1 (srun --ntasks-per-node=1; one process drives all GPUs of its node)"
fi

coordinator="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
port="${JAX_COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
devices="$(seq -s, 0 $((SLURM_GPUS_ON_NODE - 1)))"
environment=(
  "JAX_COORDINATOR_ADDRESS=$coordinator:$port"
  "JAX_NUM_PROCESSES=$SLURM_NTASKS"
  "JAX_PROCESS_ID=$SLURM_PROCID"
  "JAX_LOCAL_DEVICE_IDS=$devices"
  "JAX_HEARTBEAT_TIMEOUT_SECONDS=${JAX_HEARTBEAT_TIMEOUT_SECONDS:-100}"
)
log=""
if [[ "$SLURM_PROCID" != 0 ]]; then
  log="${LOG_DIR:-logs}/slurm-$SLURM_JOB_ID-process_$SLURM_PROCID.log"
fi

if [[ -n "${DRY_RUN:-}" ]]; then
  line="$(printf '%q ' env "${environment[@]}" "$@")"
  echo "${line% }${log:+ >$log 2>&1}"
  exit 0
fi
if [[ -n "$log" ]]; then
  mkdir -p "$(dirname "$log")"
  exec >"$log" 2>&1
fi
exec env "${environment[@]}" "$@"
