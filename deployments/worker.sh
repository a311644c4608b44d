#!/usr/bin/env bash
# Start a process worker for a pool (default gpu) on this machine; it runs flows from this checkout.
#   deployments/worker.sh [POOL] [extra `prefect worker start` options, e.g. --limit 2]
# Hub token (gated or private models/datasets): export HF_TOKEN before starting it (each flow run's process
# inherits it), or save the token in a Prefect Secret block and set model.hf_token_secret to the block's
# name; never put the token in a config or in prefect.yaml's parameters (the config refuses one).
set -euo pipefail
source "$(dirname "$0")/env.sh"
pool="${1:-gpu}"
shift || true
exec prefect worker start --pool "$pool" --type process "$@"
