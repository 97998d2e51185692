#!/usr/bin/env bash
# Create or refresh the local virtual environment (.venv) used by the README commands.
# Idempotent: re-installs only when pyproject.toml changed since the last run.
# On a CPU machine torch is installed as the 2.13.0 CPU build (MEGAPATCH_TORCH overrides);
# on clusters, run inside an NGC PyTorch container and install with `pip install -e .[gpu]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MEGAPATCH_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV"
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.megapatch-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[bootstrap] installing megapatch and its dependencies into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==${MEGAPATCH_TORCH:-2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
