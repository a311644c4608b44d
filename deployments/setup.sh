#!/usr/bin/env bash
# Create the work pools and the GPU concurrency limit (idempotent; needs a running server, see server.sh).
#   cpu            process pool for CPU-only work (no GPU slot)
#   $POOL (gpu)    process pool for one GPU: its runs get CUDA_VISIBLE_DEVICES=$GPU (default 0) and
#                  FINETUNE_GPU_SLOT=$POOL, and a global concurrency limit $POOL with 1 slot, so the GPU
#                  stages (train, evaluate, merge) of one run at a time use that GPU; CPU stages do not wait.
#                  More GPUs on a host: one pool each, e.g. POOL=gpu-1 GPU=1 deployments/setup.sh
#   gpu-k8s        (KUBERNETES=1) a Kubernetes pool whose jobs request nvidia.com/gpu (pools/gpu-kubernetes.json;
#                  the device plugin gives each pod its own GPU; set the image to one containing this project)
set -euo pipefail
cd "$(dirname "$0")"
source ./env.sh
POOL="${POOL:-gpu}"
GPU="${GPU:-0}"
template="$(mktemp)"
trap 'rm -f "$template"' EXIT

prefect work-pool create cpu --type process --overwrite
sed -e "s/@GPU@/$GPU/" -e "s/@SLOT@/$POOL/" pools/gpu-process.json > "$template"
prefect work-pool create "$POOL" --type process --base-job-template "$template" --overwrite
if prefect global-concurrency-limit inspect "$POOL" > /dev/null 2>&1; then
  prefect global-concurrency-limit update "$POOL" --limit 1
else
  prefect global-concurrency-limit create "$POOL" --limit 1
fi
if [[ "${KUBERNETES:-0}" == 1 ]]; then
  prefect work-pool create gpu-k8s --type kubernetes --base-job-template pools/gpu-kubernetes.json --overwrite
fi
