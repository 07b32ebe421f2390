#!/usr/bin/env bash
# A Python environment with torch + transformers for the CPU comparison (tools/cpu-vs-torch.sh):
# the versions of tools/requirements.txt, in a venv under target/ (ignored by git).
#
#   tools/torch-cpu-env.sh [VENV_DIR]      # default target/torchenv
#
# The CPU-only torch wheel (download.pytorch.org/whl/cpu, ~200 MB) is tried first. Where that
# index cannot be reached (it could not from the 2026-12-03 development machine), the PyPI wheel
# is installed instead: the same CPU kernels, but it pulls ~5 GB of nvidia-* packages that the CPU
# path never loads. Either way torch reports its CPU capability (AVX512 / AVX2) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-target/torchenv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
TORCH=$(grep -E '^torch==' tools/requirements.txt)
if "$PIP" install -q "$TORCH" --index-url https://download.pytorch.org/whl/cpu; then
    echo "torch: CPU wheel from download.pytorch.org"
else
    echo "torch: CPU index unreachable; installing the PyPI wheel (with its nvidia-* dependencies)"
    "$PIP" install -q "$TORCH"
fi
# The rest at the oracle's versions (torch is already satisfied, so pip keeps the one above).
"$PIP" install -q -r tools/requirements.txt
"$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "CPU capability", torch.backends.cpu.get_cpu_capability())'
