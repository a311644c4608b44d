#!/usr/bin/env bash
# Create or update every deployment of deployments/prefect.yaml, their default parameters read from configs/ now.
# FINETUNE_DEPLOY_SET="key=value ..." adds config overrides to them (e.g. a shared output.dir for many hosts);
# FINETUNE_IMAGE names the image of the on-demand-k8s deployment (README "Kubernetes").
#   deployments/deploy.sh [extra `prefect deploy` options, e.g. --pool cpu]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FINETUNE_FLOW_ROOT"
unset FINETUNE_WORKER_ROOT   # a placeholder in prefect.yaml's pull step, filled in on the worker at run time
# the image of the Kubernetes deployment: deployments/Dockerfile built at this revision
FINETUNE_IMAGE="${FINETUNE_IMAGE:-finetune-flow:$(git rev-parse --short HEAD 2>/dev/null || echo latest)}"
export FINETUNE_IMAGE
exec prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml "$@"
