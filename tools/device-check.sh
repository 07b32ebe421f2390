#!/usr/bin/env bash
# The one command to run on the lent GPU machine (device tool), after tools/stage-device.sh here:
#   run(command="bash tools/device-check.sh --reference", carry=["stage/device"], timeout_s=420)
#
# Steps, most important first, each under its own limit (`timeout -k`):
#   preflight  fastrm gpu-check: the driver/cuBLAS/NVML files actually loaded (paths), driver
#              version, device name, one cuBLAS GEMM against the CPU. If it fails the run stops:
#              every later step is recorded as not run and the script exits non-zero.
#   bench      the CUDA bench: copy bandwidth, prefill, decode step, FastRM step, baseline maps
#   profile    fastrm profile, synthetic 7B, all methods at 10 and 100 tokens (latency median and
#              spread, NVML and ledger peaks)
#   tests      every GPU test with FASTRM_REQUIRE_GPU=1 (a test that cannot reach the GPU fails)
#   reference  (--reference) the PyTorch relevancy baseline at 10 and 100 tokens
#   write-7b   (--with-7b, off by default; run it alone: --only write-7b) writes a 7B hub-layout
#              checkpoint to local disk, times loading it on the GPU, deletes it
# The default limits add up to 287 s, 360 s with --reference (kill grace included), so a rerun
# fits in the device budget.
#
# What comes back: at most 3 files in $OUT, none in a folder — summary.txt (the numbers first),
# results.json (machine-readable) and logs.tar.gz (every log, the profile's table/JSON/plots).
# All three are rewritten after every step, so a run cut off by the device tool still returns
# what finished.
#
# Before anything runs, the real run refuses a stage that lacks a binary or was built from other
# sources than this tree (tools/stage-device.sh records their list and hash; --source-hash prints
# the hash of the NUL-separated list on stdin).
#
# Options: --only STEP[,STEP] (a targeted rerun), --limit STEP=SECONDS, --reference, --with-7b, --dry-run (or
# DEVICE_CHECK_DRY=1: stub commands and a fake library tree instead of the GPU; tests/device_check.rs
# runs it on the CPU). Test knobs (dry run): DEVICE_CHECK_TIME_SCALE scales every limit;
# DEVICE_CHECK_STUB_HANG / DEVICE_CHECK_STUB_FAIL name steps whose stub hangs / fails.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The hash of the sources the staged binaries were built from: the files tools/stage-device.sh
# listed (NUL-separated on stdin: what git tracks or would carry under the source folders) by
# name and content. sha256sum exists on both machines; git may not be on the device machine's
# copy. A listed file that is missing makes a different hash.
source_hash() {
    LC_ALL=C sort -z | xargs -0 sha256sum 2>&1 | sha256sum | cut -d' ' -f1
}
if [ "${1:-}" = --source-hash ]; then
    source_hash
    exit 0
fi
OUT=${OUT:-$root/device-out}
mkdir -p "$OUT"

all_steps=(preflight bench profile tests reference write-7b)
declare -A limit=([preflight]=15 [bench]=60 [profile]=130 [tests]=70 [reference]=70 [write-7b]=240)
grace=3 # seconds between timeout's TERM and its KILL

only="" reference=0 with7b=0 dry=${DEVICE_CHECK_DRY:-0}
while [ $# -gt 0 ]; do
    case $1 in
        --only) only=${2:-}; shift 2 || { echo "device-check: --only needs STEP[,STEP]" >&2; exit 2; } ;;
        --only=*) only=${1#--only=}; shift ;;
        --reference) reference=1; shift ;;
        --with-7b) with7b=1; shift ;;
        --dry-run) dry=1; shift ;;
        --limit)
            # STEP=SECONDS: a targeted rerun of a step that ran out of time.
            l=${2:-}; st=${l%%=*}; sec=${l#*=}
            if [ -z "${limit[$st]:-}" ] || ! [[ $sec =~ ^[0-9]+$ ]] || [ "$sec" -lt 1 ]; then
                echo "device-check: --limit wants STEP=SECONDS with a known step, got '$l'" >&2; exit 2
            fi
            limit[$st]=$sec; shift 2 ;;
        *) echo "device-check: unknown argument '$1' (--only STEP[,STEP] --limit STEP=SECONDS --reference --with-7b --dry-run)" >&2; exit 2 ;;
    esac
done

# The steps this run takes, in their fixed order.
selected=()
if [ -n "$only" ]; then
    IFS=, read -ra want <<< "$only"
    for w in "${want[@]}"; do
        [ -n "${limit[$w]:-}" ] || { echo "device-check: --only: no step '$w' (steps: ${all_steps[*]})" >&2; exit 2; }
    done
    for s in "${all_steps[@]}"; do
        for w in "${want[@]}"; do [ "$s" = "$w" ] && selected+=("$s"); done
    done
else
    selected=(preflight bench profile tests)
    [ "$reference" = 1 ] && selected+=(reference)
    [ "$with7b" = 1 ] && selected+=(write-7b)
fi

# Logs and the profile's files live outside $OUT; only the archive of them goes back.
work=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
mkdir -p "$work/logs" "$work/profile"
scale=${DEVICE_CHECK_TIME_SCALE:-1}

if [ "$dry" = 1 ]; then
    # Stand-ins for the binaries, the Python steps and the CUDA libraries (tested on the CPU).
    bin=$work/stub
    mkdir -p "$bin" "$work/fakelib/cuda/lib64" "$work/fakelib/nvidia/cublas/lib"
    : > "$work/fakelib/cuda/lib64/libcudart.so.13"
    : > "$work/fakelib/nvidia/cublas/lib/libcublas.so.13"
    lib_roots="$work/fakelib/cuda/lib64 $work/fakelib/nvidia/cublas/lib"
    for s in fastrm cuda-tests cuda-bench reference; do
        printf '#!/usr/bin/env bash\nexec python3 %q %q "$@"\n' "$root/tools/device_check_stub.py" "$s" > "$bin/$s"
        chmod +x "$bin/$s"
    done
    python_cmd=("$bin/reference")
    echo "dry run" > "$bin/COMMIT"
else
    bin=$root/stage/device
    missing=()
    for f in fastrm cuda-tests cuda-bench; do [ -x "$bin/$f" ] || missing+=("$f"); done
    for f in COMMIT SOURCE_FILES SOURCE_HASH; do [ -f "$bin/$f" ] || missing+=("$f"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "device-check: stage/device lacks ${missing[*]}; run tools/stage-device.sh and carry stage/device" >&2
        exit 2
    fi
    staged=$(cat "$bin/SOURCE_HASH") here=$(source_hash < "$bin/SOURCE_FILES")
    if [ "$staged" != "$here" ]; then
        echo "device-check: stage/device was built from other sources ($(cat "$bin/COMMIT"), hash ${staged:0:12}) than this tree (hash ${here:0:12}); run tools/stage-device.sh again" >&2
        exit 2
    fi
    # cuBLAS: the CUDA toolkit's, else the one pip installed beside torch.
    lib_roots="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia
    for p in nvidia.__path__:
        print(" ".join(glob.glob(os.path.join(p, "*", "lib"))))
except Exception:
    pass
PY
)"
    python_cmd=(python3)
fi
libs=""
for d in $lib_roots; do [ -d "$d" ] && libs="$libs:$d"; done
# Our binaries only: the Python steps keep the environment they came with (torch brings its own).
# FASTRM_ROOT: the prebuilt test binaries look for their fixtures here, not at the build's path.
ours_env=(env "LD_LIBRARY_PATH=${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" FASTRM_REQUIRE_GPU=1
          "FASTRM_ROOT=$root")

dir7b=${DEVICE_CHECK_7B_DIR:-/tmp/fastrm-7b}
[ "$dry" = 1 ] && dir7b=$work/7b
export DC_WORK=$work DC_OUT=$OUT DC_COMMIT="$(cat "$bin/COMMIT" 2>/dev/null || echo unknown)"
export DC_DRY=$dry DC_SCALE=$scale DC_GRACE=$grace
steps_file=$work/steps.tsv # name limit scaled_limit status rc seconds
: > "$steps_file"
for s in "${selected[@]}"; do printf '%s\t%s\t\t%s\t\t\n' "$s" "${limit[$s]}" "pending" >> "$steps_file"; done

report() { # rewrites summary.txt, results.json and logs.tar.gz from what has finished
    python3 "$root/tools/device_check_report.py" "$steps_file" ||
        echo "device-check: the report failed (logs are still in $work)" >&2
    tar -czf "$OUT/logs.tar.gz.part" -C "$work" logs profile && mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

set_step() { # name status rc seconds scaled_limit
    python3 - "$steps_file" "$@" <<'PY'
import sys
path, name, status, rc, secs, lim = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path)]
for r in rows:
    if r[0] == name:
        r[2:6] = [lim, status, rc, secs]
open(path, "w").write("".join("\t".join(r) + "\n" for r in rows))
PY
}

cmd_for() { # step -> the command line in array `cmd`
    case $1 in
        preflight) cmd=("${ours_env[@]}" "$bin/fastrm" gpu-check) ;;
        bench) cmd=("${ours_env[@]}" FASTRM_BENCH_QUICK=1 "$bin/cuda-bench" --bench) ;;
        profile) cmd=("${ours_env[@]}" "$bin/fastrm" profile --model synthetic:llava-1.5-7b --device cuda
                      --tokens 10,100 --methods generate,fastrm,baseline,baseline-incremental
                      --repeat 3 --out "$work/profile") ;;
        tests) cmd=("${ours_env[@]}" "$bin/cuda-tests" --test-threads=1) ;;
        reference) cmd=("${python_cmd[@]}" tools/reference_baseline.py --config 7b --tokens 10,100
                        --budget-s 50 --json "$work/logs/reference.json") ;;
        write-7b)
            # The checkpoint goes to the machine's local disk, never under $OUT; info logging
            # prints the "model loaded ... seconds=" line the report reads.
            cmd=(bash -c 'set -e; dir=$1; shift; cleanup() { rm -rf "$dir"; }; trap cleanup EXIT
                "$@" synth-model --like llava-1.5-7b --out "$dir"
                RUST_LOG=fastrm=info "$@" generate --model "$dir" --device cuda \
                    --prompt "Describe the image." -n 4 --json' write-7b "$dir7b" "${ours_env[@]}" "$bin/fastrm") ;;
    esac
}

status=0
stopped=""
for s in "${selected[@]}"; do
    if [ -n "$stopped" ]; then
        set_step "$s" "not run ($stopped)" "" "" ""
        continue
    fi
    read -r lim kill_after < <(awk -v l="${limit[$s]}" -v s="$scale" -v g="$grace" 'BEGIN {
        lim = l * s; if (lim < 1) lim = 1
        k = g * (s * 10 < 1 ? s * 10 : 1); if (k < 0.2) k = 0.2
        printf "%g %g\n", lim, k }')
    set_step "$s" "running" "" "" "$lim"
    report
    cmd_for "$s"
    t0=$(date +%s.%N)
    DC_STEP=$s timeout -k "$kill_after" "$lim" "${cmd[@]}" > "$work/logs/$s.log" 2>&1
    rc=$?
    [ "$s" = write-7b ] && rm -rf "$dir7b" # in case the limit's KILL skipped the step's own cleanup
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) st=pass ;;
        124|137) st="timed out after ${lim}s"; status=1 ;;
        *) st=fail; status=1 ;;
    esac
    set_step "$s" "$st" "$rc" "$secs" "$lim"
    echo "== $s: $st (rc=$rc, ${secs}s)"
    if [ "$s" = preflight ] && [ "$rc" != 0 ]; then
        stopped="pre-flight failed: the GPU is not usable"
    fi
done
report
echo
cat "$OUT/summary.txt"
rm -rf "$work"
[ -n "$stopped" ] && exit 1
exit $status
