#!/usr/bin/env bash
# Regenerates kernels/ptx/*.ptx with the pinned nvcc and runs the machine-code gate on them
# (tools/sass_check.py: no register spills, the hot decode kernels' loads in flight).
#   tools/ptx.sh            install the pinned compiler (once, into .nvcc/), regenerate, gate
#   tools/ptx.sh --check    the same, then fail if the regenerated PTX differs from the checked-in
# The compiler comes from pip, pinned: unpinned installs pull a newer nvcc whose PTX ISA the GPU
# hosts' driver rejects. Needs python3 with venv/pip, gcc, and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.nvcc
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
# nvdisasm for the gate: 13.2 is the oldest CUDA 13 release on PyPI; it reads ptxas 13.0's cubins.
if ! "$venv/bin/python" -c 'import nvidia, os, sys; sys.exit(not os.path.exists(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvdisasm")))'; then
    "$venv/bin/pip" install --quiet nvidia-cuda-nvdisasm==13.2.51
fi
bin=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin"))')
"$bin/nvcc" --version | grep -q V13.0.88 || { echo "ptx.sh: $bin/nvcc is not 13.0.88" >&2; exit 1; }
mkdir -p kernels/ptx
for src in kernels/*.cu; do
    stem=$(basename "$src" .cu)
    "$bin/nvcc" -ptx -O3 -arch=sm_80 -std=c++17 -o "kernels/ptx/$stem.ptx" "$src"
done
# Register spills in any kernel (all of them sit on the decode or backward hot path) and too few
# loads in flight in the hot decode kernels fail the gate (sm_90 and sm_80; kernels/sass_gate.json).
python3 tools/sass_check.py "$bin"
if [ "${1:-}" = "--check" ]; then
    if ! git diff --exit-code --stat -- kernels/ptx; then
        echo "ptx.sh: kernels/ptx differs from what nvcc 13.0.88 generates; run tools/ptx.sh and commit" >&2
        exit 1
    fi
    if [ -n "$(git status --porcelain -- kernels/ptx)" ]; then
        echo "ptx.sh: untracked PTX in kernels/ptx; run tools/ptx.sh and commit" >&2
        exit 1
    fi
fi
echo "ptx.sh: PTX up to date, machine-code gate passed"
