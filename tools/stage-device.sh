#!/usr/bin/env bash
# Builds what tools/device-check.sh runs on the lent GPU machine (which has no Rust toolchain):
# the release CLI, the CUDA test binary and the CUDA bench binary, stripped, into stage/device/
# (git-ignored). Carry that folder with the device tool: carry=["stage/device"].
set -euo pipefail
cd "$(dirname "$0")/.."
out=stage/device
rm -rf "$out"
mkdir -p "$out"
exe() { # kind cargo-args... -> path of the executable of target `cuda` of that kind (test, bench)
    local kind=$1
    shift
    cargo "$@" --message-format=json 2>/dev/null |
        KIND=$kind python3 -c 'import json, os, sys
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["target"]["name"] == "cuda" and os.environ["KIND"] in m["target"]["kind"]]
print(paths[-1])'
}
cargo build --release --bin fastrm
cp target/release/fastrm "$out/fastrm"
cp "$(exe test test --release --no-run --test cuda)" "$out/cuda-tests"
cp "$(exe bench bench --no-run --bench cuda)" "$out/cuda-bench"
strip "$out"/*
git rev-parse HEAD > "$out/COMMIT"
du -sh "$out"/*
echo "staged $(du -sh "$out" | cut -f1) in $out (device tool limit: 64 MiB)"
