#!/usr/bin/env bash
# Trigger a deployment's run from the command line and wait for it (see deployments/trigger.py), e.g.
#   deployments/trigger.sh finetune/on-demand --set train.learning_rate=1e-3
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec python "$FINETUNE_FLOW_ROOT/deployments/trigger.py" "$@"
