#!/usr/bin/env bash
# Start the Prefect server and UI, bound to 127.0.0.1 (HOST/PORT to change; default port 4200).
# Database: SQLite under $PREFECT_HOME (default ~/.prefect) unless DATABASE_URL is given, e.g.
#   DATABASE_URL=postgresql+asyncpg://prefect:secret@127.0.0.1:5432/prefect deployments/server.sh
# (PostgreSQL for a team: SQLite stalls under many concurrent workers.)
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [[ -n "${DATABASE_URL:-}" ]]; then
  export PREFECT_API_DATABASE_CONNECTION_URL="$DATABASE_URL"
fi
HOST="${HOST:-127.0.0.1}" PORT="${PORT:-4200}"
# the UI asks the server where its API is: without this it would name port 4200 whatever PORT says
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://$HOST:$PORT/api}"
exec prefect server start --host "$HOST" --port "$PORT"
