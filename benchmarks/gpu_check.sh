#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py says what each step measures):
#   benchmarks/gpu_check.sh prepare        on a CPU machine with PyPI: fills .gpu-check/ (git-ignored) to carry
#   benchmarks/gpu_check.sh run [OUT] [--steps a,b]   on the GPU box: installs .gpu-check/wheels, runs the steps into OUT
#   benchmarks/gpu_check.sh stage PART     on the GPU box: keeps a carried part of the model (.gpu-check/model/part-K)
#                                          outside the tree for the next call on the same machine
#   benchmarks/gpu_check.sh dry-run OUT [--data DIR --tokenizer DIR ...]   here: the same steps, toy models, no CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-check
mode=${1:-}
site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
case "$mode" in
  prepare)
    "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py prepare --kit "$KIT" ;;
  run)
    out=${2:-${OUT:-gpu-check-results}}
    start=$(date +%s)
    if compgen -G "$KIT/wheels/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$KIT"/wheels/*.whl
      ls "$KIT"/wheels > "$site/.installed-wheels"
      echo "installed $(ls "$KIT"/wheels | wc -l) wheels in $(( $(date +%s) - start )) s"
    elif [[ -f "$site/.installed-wheels" ]]; then  # a later call on the same machine (the model's last part)
      echo "no wheels carried: using the $(wc -l < "$site/.installed-wheels") an earlier call installed in $site"
    else
      echo "no wheels carried ($KIT/wheels) and none installed on this machine ($site)" >&2; exit 2
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false
    exec python3 benchmarks/gpu_check.py run --kit "$KIT" --out "$out" "${@:3}" ;;
  stage)
    [[ $# -eq 2 ]] || { echo "usage: $0 stage PART_FOLDER" >&2; exit 2; }
    exec python3 benchmarks/gpu_check.py stage "$2" ;;
  dry-run)
    [[ $# -ge 2 ]] || { echo "usage: $0 dry-run OUT [options]" >&2; exit 2; }
    exec "${PYTHON:-python3}" benchmarks/gpu_check.py run --dry-run --out "$2" "${@:3}" ;;
  *)
    echo "usage: $0 prepare | run [OUT] [--steps a,b] | stage PART | dry-run OUT [options]" >&2; exit 2 ;;
esac
