#!/usr/bin/env bash
# Create or update every deployment of deployments/prefect.yaml, their default parameters read from configs/ now.
# FINETUNE_DEPLOY_SET="key=value ..." adds config overrides to them (e.g. a shared output.dir for many hosts).
#   deployments/deploy.sh [extra `prefect deploy` options, e.g. --pool cpu]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FINETUNE_FLOW_ROOT"
unset FINETUNE_WORKER_ROOT   # a placeholder in prefect.yaml's pull step, filled in on the worker at run time
exec prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml "$@"
