#!/usr/bin/env bash
# Create .venv and install gptforge with what it needs. Puts torch's CPU build in place first when there is
# no CUDA GPU, so pip never pulls a multi-GB CUDA wheel on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
stamp="$VENV/.gptforge-installed-$EXTRAS"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q torch
  else
    "$VENV/bin/python" -m pip install -q "torch==${GPTFORGE_TORCH_VERSION:-2.13.0}" \
      || "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
touch "$stamp"
