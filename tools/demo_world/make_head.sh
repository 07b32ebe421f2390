#!/usr/bin/env bash
# Trains the bundled demo model's FastRM head with the engine's own pipeline and
# evaluates it on the committed evaluation set:
#   1. a head-training question set on fresh scenes (seeds 2,000,000+, never seen by the model),
#   2. `fastrm distill` (answers, exact baseline maps, hidden states),
#   3. `fastrm train` → assets/demo/head.safetensors,
#   4. `fastrm distill` of assets/demo_world/eval and `fastrm eval --write-threshold` (the calibrated
#      confidence threshold goes into the head) → docs/demo-eval/.
# Needs the fixture tool's Python (tools/requirements.txt; PY=...) for the scene generator.
#   tools/demo_world/make_head.sh   # SCENES=300 STEPS=2000 LR=1e-3 BATCH=128 EVAL_LIMIT=200
# EVAL_LIMIT bounds the evaluation's samples: its perturbation curves cost ~300 masked generations a
# sample (~2 s each on 2 cores), so all 600 questions take ~20 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
SCENES=${SCENES:-300}
STEPS=${STEPS:-2000}
LR=${LR:-1e-3}
BATCH=${BATCH:-128}
EVAL_LIMIT=${EVAL_LIMIT:-200}
work=${WORK:-target/demo-head}
model=assets/demo/model
head=assets/demo/head.safetensors
mkdir -p "$work"
cargo build --release --bin fastrm
bin=target/release/fastrm
"$PY" tools/demo_world/make_eval.py --out "$work/train-set" --scenes "$SCENES" --seed0 2000000
"$bin" distill --model "$model" --questions "$work/train-set/questions.jsonl" \
    --images "$work/train-set" --out "$work/distill-train"
"$bin" train --data "$work/distill-train" --out "$head" --steps "$STEPS" --batch "$BATCH" \
    --lr "$LR" --seed 0
"$bin" distill --model "$model" --questions assets/demo_world/eval/questions.jsonl \
    --images assets/demo_world/eval --out "$work/distill-eval"
"$bin" eval --model "$model" --head "$head" --data "$work/distill-eval" --out docs/demo-eval \
    --write-threshold --limit "$EVAL_LIMIT" --json > "$work/eval.json"
echo "head: $head; evaluation: docs/demo-eval/eval.json"
