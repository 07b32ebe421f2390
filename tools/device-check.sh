#!/usr/bin/env bash
# The one command to run on the lent GPU machine (device tool), after tools/stage-device.sh here:
#   run(command="bash tools/device-check.sh", carry=["stage/device"], timeout_s=600)
# Runs every GPU test, the GPU benches, a short end-to-end profile on synthetic LLaVA-1.5-7B
# shapes and the transformers comparison; writes full logs to $OUT and prints a compact table
# last. Each step has its own time limit, so the whole check fits in ~8 minutes.
#   --reference   also run the PyTorch relevancy baseline (tools/reference_baseline.py; ~4 min more)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-$root/device-out}
mkdir -p "$OUT"
bin=$root/stage/device
summary=$OUT/summary.txt
: > "$summary"
export FASTRM_ROOT=$root

if [ ! -x "$bin/fastrm" ]; then
    echo "device-check: no binaries in stage/device; run tools/stage-device.sh first and carry stage/device" >&2
    exit 2
fi
echo "commit $(cat "$bin/COMMIT" 2>/dev/null || echo unknown)" >> "$summary"

# cuBLAS: the CUDA toolkit's, else the one pip installed beside torch.
libs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && libs="$libs:$d"
done
pylibs=$(python3 - 2>/dev/null <<'PY'
import glob, os, sys
try:
    import nvidia
    for p in nvidia.__path__:
        for d in glob.glob(os.path.join(p, "*", "lib")):
            print(d)
except Exception:
    pass
PY
)
for d in $pylibs; do libs="$libs:$d"; done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step() { # name limit_s command... : runs with a time limit, logs to $OUT/name.log
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local secs=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
    local note=""
    [ $rc = 124 ] && note=" (timed out after ${limit}s)"
    printf '%-22s rc=%-3s %6ss%s\n' "$name" "$rc" "$secs" "$note" >> "$summary"
    echo "== $name: rc=$rc ${secs}s$note"
    return 0
}

step nvidia-smi 20 nvidia-smi
step cuda-tests 170 "$bin/cuda-tests" --test-threads=1
step cuda-bench 110 "$bin/cuda-bench" --bench
step generate-7b 45 "$bin/fastrm" generate --model synthetic:llava-1.5-7b --device cuda \
    --prompt "-" --max-new-tokens 100 --json
step profile-7b 130 "$bin/fastrm" profile --model synthetic:llava-1.5-7b --device cuda \
    --tokens 10,20,50,100 --methods generate,fastrm,baseline,baseline-incremental \
    --out "$OUT/profile"
step transformers-7b 100 python3 tools/gpu_transformers_bench.py --config 7b --tokens 100 \
    --json "$OUT/transformers.json"
if [ "${1:-}" = "--reference" ]; then
    step reference-baseline 260 python3 tools/reference_baseline.py --config 7b \
        --tokens 10,20,50,100 --budget-s 180 --json "$OUT/reference_baseline.json"
fi

{
    echo
    echo "---- tests"
    grep -E "^test result|FAILED|panicked|^SKIPPED" "$OUT/cuda-tests.log" | head -20
    echo "---- bench"
    grep "^RESULT" "$OUT/cuda-bench.log"
    echo "---- 7B id-level runs (timings_ms)"
    for f in generate-7b; do
        python3 - "$OUT/$f.log" "$f" <<'PY'
import json, sys
try:
    lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
    d = json.loads(lines[-1])
    t = d["timings_ms"]
    n = len(d["generated_ids"])
    print(f"{sys.argv[2]}: {n} tokens, " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
          + f", decode/token {t['decode'] / max(n - 1, 1):.2f}")
except Exception as e:
    print(f"{sys.argv[2]}: no JSON ({e})")
PY
    done
    echo "---- profile (synthetic 7B, f16)"
    tail -n 25 "$OUT/profile-7b.log"
    echo "---- transformers (same GPU)"
    tail -n 8 "$OUT/transformers-7b.log"
} >> "$summary"
echo
cat "$summary"
