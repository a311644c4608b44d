#!/usr/bin/env bash
# Create the work pools (idempotent; needs a running server, see server.sh).
#   cpu      process pool for CPU-only work: batch predictions (no GPU slot)
#   gpu      process pool for training: any number of workers, on any number of hosts, one per GPU
#            (deployments/worker.sh pins each worker's runs to its GPU and creates that GPU's slot)
#   and the automation of zombie-runs.yaml: a run whose worker died is marked Crashed
#   gpu-k8s  a Kubernetes pool whose jobs request nvidia.com/gpu and mount the shared claim at /mnt/shared
#            (pools/gpu-kubernetes.json); its runs wait until a Kubernetes worker starts in a cluster:
#            pip install ".[kubernetes]"; prefect worker start --pool gpu-k8s --type kubernetes
set -euo pipefail
cd "$(dirname "$0")"
source ./env.sh
prefect work-pool create cpu --type process --overwrite
prefect work-pool create gpu --type process --overwrite
# flow runs whose worker died are marked Crashed (zombie-runs.yaml), once
prefect automation inspect crash-zombie-flow-runs > /dev/null 2>&1 \
  || prefect automation create --from-file zombie-runs.yaml > /dev/null
prefect work-pool create gpu-k8s --type kubernetes --base-job-template pools/gpu-kubernetes.json --overwrite
