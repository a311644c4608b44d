#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py says what each step measures):
#   benchmarks/gpu_check.sh prepare        on a CPU machine with PyPI: fills .gpu-check/ (git-ignored) to carry
#   benchmarks/gpu_check.sh run [OUT] [--steps a,b]   on the GPU box: installs .gpu-check/wheels, runs the steps into OUT
#   benchmarks/gpu_check.sh dry-run OUT [--data DIR --tokenizer DIR ...]   here: the same steps, toy models, no CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-check
mode=${1:-}
case "$mode" in
  prepare)
    "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py prepare --kit "$KIT" ;;
  run)
    out=${2:-${OUT:-gpu-check-results}}
    site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
    start=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$KIT"/wheels/*.whl
    echo "installed $(ls "$KIT"/wheels | wc -l) wheels in $(( $(date +%s) - start )) s"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false
    exec python3 benchmarks/gpu_check.py run --kit "$KIT" --out "$out" "${@:3}" ;;
  dry-run)
    [[ $# -ge 2 ]] || { echo "usage: $0 dry-run OUT [options]" >&2; exit 2; }
    exec "${PYTHON:-python3}" benchmarks/gpu_check.py run --dry-run --out "$2" "${@:3}" ;;
  *)
    echo "usage: $0 prepare | run [OUT] [--steps a,b] | dry-run OUT [options]" >&2; exit 2 ;;
esac
