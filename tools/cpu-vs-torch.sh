#!/usr/bin/env bash
# The CPU backend against transformers on the same machine, one sitting, f32 on both sides:
# prefill, one decode step and the exact baseline on benches/midsize_config.json, 2 threads; then
# prefill and decode with the same shapes in bf16 (ours: bf16 weights read from the mapped file,
# f32 arithmetic; theirs: model.to(torch.bfloat16), bf16 activations too).
# Prints ours, theirs, the ratio (theirs / ours: above 1 = fastrm faster) and the CPU model.
#
#   tools/cpu-vs-torch.sh [PYTHON]     # default target/torchenv/bin/python (tools/torch-cpu-env.sh)
#
# Ours: criterion medians of `cargo bench --bench cpu_step --bench baseline`, and `fastrm profile
# -m synthetic:midsize --methods baseline --tokens 10,100` for whole answers. Theirs:
# `tools/make_fixtures.py --bench --out target/cpu-vs-torch` (written there, not over the committed
# tools/bench_transformers.json). The exact map is compared like for like, two ways:
# - per answer of T = 10 and 100 tokens: both sides share one forward over the answer (ours: the
#   saving forward of the run; theirs: one teacher-forced forward with the attentions kept, then
#   torch.autograd.grad per token with retain_graph), so each side is one forward + T backwards,
#   vision tower and prompt included;
# - per token, backward against backward: our backward alone against autograd.grad's alone, after
#   a forward over the prefix (theirs timed apart) and after the shared forward of a 10-token answer.
# Takes about ten minutes on a 2-core machine, plus the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-target/torchenv/bin/python}
OUT=target/cpu-vs-torch
export RAYON_NUM_THREADS=2
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench --bench cpu_step --bench baseline -- --noplot 'cpu(_bf16)?/|baseline/' 2>&1 \
    | grep -E '^(cpu|baseline)/|time:|positions|kernel' || true
cargo build --release -q
target/release/fastrm profile -m synthetic:midsize --methods baseline --tokens 10,100 --repeat 1 \
    --json > "$OUT.profile.json"
"$PY" tools/make_fixtures.py --bench --out "$OUT" > /dev/null
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$OUT/tools/bench_transformers.json" "$OUT.profile.json" <<'PY'
import json, sys
from pathlib import Path

def ours(group, name):
    est = json.loads(Path(f"target/criterion/{group}/{name}/new/estimates.json").read_text())
    return est["median"]["point_estimate"] / 1e6

t = json.loads(Path(sys.argv[1]).read_text())
flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
isa = "AVX-512F" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
print(f"\nCPU: {t['cpu']} ({isa}), torch {t['versions']['torch']} ({t['torch_threads']} threads), "
      f"transformers {t['versions']['transformers']}")
prof = json.loads(Path(sys.argv[2]).read_text())
answer = {r["tokens"]: r["latency_ms"] for r in prof["runs"] if r["method"] == "baseline"}
theirs_answer = t["exact_answer"]
rows = [
    ("prefill", ours("cpu", "prefill"), t["prefill_ms_median"]),
    ("decode step", ours("cpu", "decode_step"), t["decode_ms_median"]),
    ("exact map, answer of 10 tokens", answer[10], theirs_answer["10"]["total_ms"]),
    ("exact map, answer of 100 tokens", answer[100], theirs_answer["100"]["total_ms"]),
    ("exact map, backward per token (prefix fwd)", ours("baseline", "exact_token"),
     t["exact_token_grad"]["backward_cams_row_ms_median"]),
    ("exact map, backward per token (shared fwd)", ours("baseline", "exact_token"),
     theirs_answer["10"]["backward_ms_median"]),
    ("bf16 weights: prefill", ours("cpu_bf16", "prefill"), t["bf16"]["prefill_ms_median"]),
    ("bf16 weights: decode step", ours("cpu_bf16", "decode_step"), t["bf16"]["decode_ms_median"]),
]
print(f"{'':42} {'fastrm ms':>10} {'torch ms':>10} {'torch/fastrm':>13}")
for name, a, b in rows:
    print(f"{name:42} {a:10.2f} {b:10.2f} {b / a:12.2f}x")
PY
