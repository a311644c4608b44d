# Sourced by the scripts in deployments/: the project's virtualenv first on PATH, this checkout's configs/, flows/
# and tasks/ importable (the install keeps them off the shared path: pyproject.toml), the Prefect API address,
# and FINETUNE_FLOW_ROOT (this checkout).
FINETUNE_FLOW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FINETUNE_FLOW_ROOT
export PATH="$FINETUNE_FLOW_ROOT/.venv/bin:$PATH"
export PYTHONPATH="$FINETUNE_FLOW_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://${HOST:-127.0.0.1}:${PORT:-4200}/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
# the stages' own loggers and the Hugging Face libraries' reach the Prefect run logs (flows/__init__.py sets the
# same default, but a worker imports Prefect, which reads this setting, before it imports the flow)
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-tasks,transformers,peft,trl,datasets,optimum}"
