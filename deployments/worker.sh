#!/usr/bin/env bash
# Start a process worker for a pool (default gpu) on this host; its flow runs start in this checkout
# (FINETUNE_WORKER_ROOT, read by prefect.yaml's pull step when a run starts).
#   [GPU=<index>] deployments/worker.sh [POOL] [extra `prefect worker start` options]
# One worker per GPU: GPU=1 deployments/worker.sh gpu --limit 1. A gpu-pool worker's runs see only its GPU
# (CUDA_VISIBLE_DEVICES=$GPU, default 0) and their GPU stages hold a slot of the global concurrency limit
# FINETUNE_GPU_SLOT (default gpu-<host>-<GPU>, created here with one slot: flows/gpu.py), so runs sharing a GPU
# train one at a time while CPU stages overlap. A worker for multi-GPU jobs (GPU=0,1) has its runs see both GPUs
# and hold a slot of each GPU's limit at once, so it never trains beside a one-GPU worker of GPU 0 or 1. A deployment (job_variables) or a run may set both variables
# in its `env` to pick another GPU. The cpu pool's runs see no GPU and take no slot.
# Hub token (gated or private models/datasets): export HF_TOKEN before starting it (each flow run's process
# inherits it), or save the token in a Prefect Secret block and set model.hf_token_secret to the block's
# name; never put the token in a config or in prefect.yaml's parameters (the config refuses one).
set -euo pipefail
source "$(dirname "$0")/env.sh"
export FINETUNE_WORKER_ROOT="$FINETUNE_FLOW_ROOT"   # where its flow runs start (prefect.yaml's pull step)
pool="${1:-gpu}"
shift || true
if [[ "$pool" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES=""
  unset FINETUNE_GPU_SLOT
else
  export CUDA_VISIBLE_DEVICES="${GPU:-0}"
  # one limit of one slot per GPU (GPU=0,1: gpu-<host>-0,gpu-<host>-1; a job holds a slot of each)
  slots=()
  for index in ${CUDA_VISIBLE_DEVICES//,/ }; do slots+=("gpu-$(hostname -s)-$index"); done
  export FINETUNE_GPU_SLOT="${FINETUNE_GPU_SLOT:-$(IFS=,; echo "${slots[*]}")}"
  for limit in ${FINETUNE_GPU_SLOT//,/ }; do
    # the limit exists already, or is created now (by this worker or, at the same moment, another one)
    prefect global-concurrency-limit inspect "$limit" > /dev/null 2>&1 \
      || prefect global-concurrency-limit create "$limit" --limit 1 > /dev/null 2>&1 \
      || prefect global-concurrency-limit inspect "$limit" > /dev/null
  done
fi
# a worker stopped with SIGTERM (a host drained, a pod evicted) hands its running flow runs back to the pool, where
# another worker takes them, instead of leaving them Crashed
export PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR="${PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR:-reschedule}"
# and its runs send a heartbeat every 30 s: if this host dies, zombie-runs.yaml marks them Crashed after 90 s
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"

runs_of() {  # the processes $1 started (a process worker's flow runs), from /proc: slim images have no pgrep
  local stat line fields
  for stat in /proc/[0-9]*/stat; do
    read -r line 2> /dev/null < "$stat" || continue
    read -ra fields <<< "${line##*) }"   # after "pid (comm) ": state, ppid, ...
    [[ ${fields[1]} == "$1" ]] && { stat=${stat#/proc/}; echo "${stat%/stat}"; }
  done
  return 0
}

# On SIGTERM or SIGINT the worker stops at once and its runs are handed back. Prefect's own drain (the worker
# sends itself SIGINT and should stop polling) is not reliable: a worker here kept polling after SIGTERM and took
# back the very run it had just handed back (tests/test_deployments.py, 2026-12-07; on that drain, see
# PrefectHQ/prefect#22528). The worker only polls and starts runs, each its own process: it is killed, each run
# gets SIGTERM (and reschedules itself, above; a second SIGTERM, as when the whole process group was signalled,
# is harmless) and is waited for.
worker=""
drain() {
  local runs pid
  [[ -n $worker ]] || exit 143
  runs=$(runs_of "$worker")
  kill -KILL "$worker" 2> /dev/null || true
  for pid in $runs; do kill -TERM "$pid" 2> /dev/null || true; done
  for pid in $runs; do while kill -0 "$pid" 2> /dev/null; do sleep 0.5; done; done
  exit 143
}
trap drain TERM INT
prefect worker start --pool "$pool" --type process "$@" &
worker=$!
wait "$worker"
