#!/usr/bin/env bash
# The one prepared GPU check (see benchmarks/gpu_check.py). On the lent GPU machine (Python
# 3.12, torch with CUDA, no megatron-core, no network) it installs megatron-core from a wheel
# carried in .whl/ (fetch it here first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1 ),
# then prints the CUDA-vs-CPU correctness and timing table last. On a CPU machine it is a dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python  # CPU dry run
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    ls .whl/megatron_core-*.whl >/dev/null 2>&1 \
        || { echo "gpu_check: megatron-core is not importable and no wheel is in .whl/ (see above)" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py
