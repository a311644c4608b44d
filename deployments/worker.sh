#!/usr/bin/env bash
# Start a process worker for a pool (default gpu) on this machine; it runs flows from this checkout.
#   deployments/worker.sh [POOL] [extra `prefect worker start` options, e.g. --limit 2]
set -euo pipefail
source "$(dirname "$0")/env.sh"
pool="${1:-gpu}"
shift || true
exec prefect worker start --pool "$pool" --type process "$@"
