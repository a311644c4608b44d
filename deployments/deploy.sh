#!/usr/bin/env bash
# Create or update the deployments of deployments/prefect.yaml (on-demand and nightly), from this checkout.
#   deployments/deploy.sh [extra `prefect deploy` options, e.g. --pool cpu]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FINETUNE_FLOW_ROOT"
exec prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml "$@"
