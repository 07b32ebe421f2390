#!/usr/bin/env bash
# LLaVA-1.5-7B on the CPU, the way a downloaded llava-hf folder runs: a hub-layout f16 folder
# (3 shards + index, written by `fastrm synth-model` unless it exists), then `generate` and
# `explain --method fastrm` (the folder's random head, hidden 4096) with its weights memory-mapped
# as stored, and the f32 refusal. Prints load time, peak RSS, time to first token, decode s/token
# and FastRM map time per token: the numbers in docs/PERF.md.
#
#   tools/cpu-7b.sh [DIR] [TOKENS]      (defaults: /work/big/llava-1.5-7b-f16, 4)
#
# Needs ~15 GB of disk for DIR and ~16 GB of free memory; FASTRM=path picks the binary (default:
# target/release/fastrm, built first). DIR is left in place: delete it when done. Measure on a
# quiet machine (load average < 1.5, nothing compiling).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/work/big/llava-1.5-7b-f16}
N=${2:-4}
IMG=tests/fixtures/clip336/image.jpg
Q="What is in the image?"
if [ -z "${FASTRM:-}" ]; then
  cargo build --release --quiet
  FASTRM=target/release/fastrm
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "$(free -g | awk '/Mem:/ {print $2}') GiB; load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ ! -d "$DIR" ]; then
  "$FASTRM" synth-model --like llava-1.5-7b --out "$DIR"
fi

# One run: $1 = name, rest = fastrm arguments. Prints the timings and /usr/bin/time's peak RSS.
run() {
  local name=$1
  shift
  RUST_LOG=fastrm=info /usr/bin/time -v "$FASTRM" "$@" --model "$DIR" --image "$IMG" \
    -p "$Q" -n "$N" --json >"$OUT/$name.json" 2>"$OUT/$name.err" || {
    cat "$OUT/$name.err"
    exit 1
  }
  python3 - "$OUT/$name.json" "$OUT/$name.err" "$name" <<'EOF'
import json, re, sys
doc = json.load(open(sys.argv[1]))
err = open(sys.argv[2]).read()
load = float(re.search(r"model loaded .*seconds=([0-9.]+)", err).group(1))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
t = doc["timings_ms"]
n = len(doc["generated_ids"])
# decode_s holds token 0's lm_head and n-1 full decoder steps.
per_tok = t["decode"] / 1e3 / max(n - 1, 1)
line = (f"{sys.argv[3]}: {doc['device']}; load {load:.2f} s; peak RSS {rss / 2**20:.2f} GiB; "
        f"vision {t['vision'] / 1e3:.1f} s; prefill {t['prefill'] / 1e3:.1f} s "
        f"({len(doc['input_ids'])} positions); first token {(t['vision'] + t['prefill']) / 1e3:.1f} s; "
        f"decode {per_tok:.2f} s/token over {n - 1}")
if "maps" in t:
    line += f"; FastRM maps {t['maps'] / n:.1f} ms/token"
print(line)
print(f"  answer ids {doc['generated_ids']} {doc['text']!r}")
EOF
}

run generate generate
run explain explain --method fastrm --head "$DIR/head.safetensors"

# f32 copies of 7B weights (28 GB) do not fit: a clear refusal naming both sizes.
if "$FASTRM" generate --dtype f32 --model "$DIR" --image "$IMG" -p "$Q" -n 1 2>"$OUT/f32.err"; then
  echo "f32: loaded (this machine has room for 28 GB of f32 weights)"
else
  echo "f32: $(cat "$OUT/f32.err")"
fi
