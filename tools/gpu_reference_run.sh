#!/usr/bin/env bash
# Both GPU reference scripts on the lent device machine, bounded (typically ~4 min, at most 6 min of wall
# time after the machine is up), results into $OUT (the device tool's output folder) or ./gpuref-out.
#   bash tools/gpu_reference_run.sh                 # 7b, bench 128 tokens, baseline 10,20,50,100 within 180 s
#   CFG=13b BUDGET=150 bash tools/gpu_reference_run.sh
set -u
OUT=${OUT:-gpuref-out}
CFG=${CFG:-7b}
BUDGET=${BUDGET:-180}
TOKENS=${TOKENS:-10,20,50,100}
GRAD_MODE=${GRAD_MODE:-backward}   # backward (weight grads too, as the paper) or grad (activation grads only)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" 2>&1 | tee "$OUT/versions.txt"
timeout 120 python3 tools/gpu_transformers_bench.py --config "$CFG" --tokens 128 \
    --json "$OUT/gpu_bench_$CFG.json" > "$OUT/gpu_bench_$CFG.log" 2>&1
echo "gpu_transformers_bench rc=$?"; grep -v -i warn "$OUT/gpu_bench_$CFG.log" | tail -12
timeout $((BUDGET + 60)) python3 tools/reference_baseline.py --config "$CFG" --tokens "$TOKENS" \
    --budget-s "$BUDGET" --grad-mode "$GRAD_MODE" --json "$OUT/reference_baseline_$CFG.json" > "$OUT/reference_baseline_$CFG.log" 2>&1
echo "reference_baseline rc=$?"; grep -v -i warn "$OUT/reference_baseline_$CFG.log" | tail -25
