#!/usr/bin/env bash
# Builds what tools/device-check.sh runs on the lent GPU machine (which has no Rust toolchain):
# the release CLI (its hidden `gpu-check` is the run's pre-flight), the CUDA test binary and the
# CUDA bench binary, stripped, into stage/device/ (git-ignored). Carry that folder with the device
# tool: carry=["stage/device"]. The run's Python helpers (tools/device_check_*.py,
# reference_baseline.py) are tracked files and travel with the working tree.
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
# What the binaries were built from: the commit, and a hash of the sources as they are (edits
# not committed included), which tools/device-check.sh recomputes on the device machine's copy of
# the tree and refuses to run against when it differs.
git describe --always --dirty --abbrev=12 > "$out/COMMIT"
git ls-files -z --cached --others --exclude-standard -- Cargo.toml Cargo.lock build.rs src kernels \
    tests benches > "$out/SOURCE_FILES"
bash tools/device-check.sh --source-hash < "$out/SOURCE_FILES" > "$out/SOURCE_HASH"
du -sh "$out"/*
kib=$(du -sk "$out" | cut -f1)
if [ "$kib" -gt $((64 * 1024)) ]; then
    echo "stage-device: $out is $((kib / 1024)) MiB, over the device tool's 64 MiB for carried paths" >&2
    exit 1
fi
echo "staged $(du -sh "$out" | cut -f1) in $out (device tool limit: 64 MiB)"
# The pre-flight command exists in what was staged, the staged test binary finds its fixtures
# from a copy of the tree in another folder (as on the device machine, through FASTRM_ROOT), and
# a dry run of the device check (stubs, no GPU) passes: a broken run is caught here, before it
# costs device time.
"$out/fastrm" gpu-check --help > /dev/null
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
mkdir -p "$copy/tests"
cp -r tests/fixtures "$copy/tests/"
(cd "$copy" && FASTRM_ROOT="$copy" "$OLDPWD/$out/cuda-tests" --exact \
    the_fixtures_are_found_under_fastrm_root --quiet > /dev/null) || {
    echo "stage-device: the staged cuda-tests does not find its fixtures from a copy of the tree" >&2
    exit 1
}
OUT=$(mktemp -d) DEVICE_CHECK_TIME_SCALE=0.03 bash tools/device-check.sh --dry-run --reference > /dev/null
