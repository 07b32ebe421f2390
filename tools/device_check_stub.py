"""Stand-in for the device check's commands in its dry run (tools/device-check.sh --dry-run):
prints what the real command prints, in miniature, and writes the files it writes.
DEVICE_CHECK_STUB_HANG / DEVICE_CHECK_STUB_FAIL (comma-separated step names) make the stub of
that step hang or fail, to test the limits and the pre-flight's stop."""
import json
import os
import sys
import time

name, args = sys.argv[1], sys.argv[2:]
step = os.environ.get("DC_STEP", "")


def listed(var):
    return step in os.environ.get(var, "").split(",")


def arg(flag):
    return args[args.index(flag) + 1] if flag in args else None


if listed("DEVICE_CHECK_STUB_HANG"):
    time.sleep(1000)
if listed("DEVICE_CHECK_STUB_FAIL"):
    print(f"error: stub {name} told to fail", file=sys.stderr)
    sys.exit(1)

# Our prebuilt binaries find the fixtures through FASTRM_ROOT (the build's path does not exist on
# the device machine): its stand-ins fail without it, as the real test binary would.
if name in ("cuda-tests", "cuda-bench"):
    root = os.environ.get("FASTRM_ROOT", "")
    if not root or not os.path.isdir(os.path.join(root, "tests", "fixtures")):
        print(f"error: stub {name}: FASTRM_ROOT ({root!r}) holds no tests/fixtures", file=sys.stderr)
        sys.exit(1)

# The library files the dynamic loader would find for our binaries: the path set on our command
# lines, which the Python steps must not see.
lib_path = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
if name == "fastrm" and args[:1] == ["gpu-check"]:
    libs = {"libcublas": [os.path.join(d, f) for d in lib_path if os.path.isdir(d)
                          for f in sorted(os.listdir(d)) if f.startswith("libcublas")],
            "libcuda": [], "libnvidia-ml": []}
    print(json.dumps({"device_name": "dry-run stub", "nvml_device_name": "dry-run stub",
                      "driver_version": "0.0", "dtype": "f16",
                      "gemm": {"m": 64, "k": 320, "n": 96, "max_rel_err": 0.0, "tolerance": 0.01, "ok": True},
                      "libraries": libs}))
elif name == "fastrm" and args[:1] == ["profile"]:
    out = arg("--out")
    os.makedirs(out, exist_ok=True)
    runs = [{"method": "fastrm", "tokens": 10, "ledger_peak_bytes": 14.6e9, "peak_memory_bytes": 15.0e9},
            {"method": "baseline", "tokens": 10, "ledger_peak_bytes": 16.4e9, "peak_memory_bytes": 20.0e9}]
    doc = {"format": "fastrm-profile-2", "device": "dry-run stub", "runs": runs, "ratios": []}
    json.dump(doc, open(os.path.join(out, "profile.json"), "w"))
    table = "tokens  method  latency ms\n    10  generate  1.0\n"
    open(os.path.join(out, "profile.txt"), "w").write(table)
    for png in ("latency.png", "memory.png"):
        open(os.path.join(out, png), "wb").write(b"\x89PNG stub")
    print(table)
elif name == "fastrm" and args[:1] == ["synth-model"]:
    out = arg("--out")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "config.json"), "w").write("{}")
elif name == "fastrm" and args[:1] == ["generate"]:
    print(f"INFO fastrm::engine: model loaded dir={arg('--model')} seconds=1.25", file=sys.stderr)
    print(json.dumps({"generated_ids": [1, 2, 3, 4], "timings_ms": {"vision": 1.0}}))
elif name == "cuda-tests":
    print("test gemm_matches_cpu ... ok\n\ntest result: ok. 3 passed; 0 failed; 0 ignored")
elif name == "cuda-bench":
    print("RESULT card=stub model=llava-1.5-7b dtype=f16 copy_bw_gbs=1000", file=sys.stderr)
    print("RESULT decode_ms=1.000 decode_gbs=500 decode_pct_of_copy_bw=50.0 context=617", file=sys.stderr)
elif name == "reference":
    print("LD_LIBRARY_PATH=" + os.environ.get("LD_LIBRARY_PATH", ""))
    json.dump({"runs": [{"method": "baseline", "tokens": 10, "latency_s": 15.0, "peak_bytes": 26.0e9}]},
              open(arg("--json"), "w"))
else:
    print(f"stub {name}: unexpected arguments {args}", file=sys.stderr)
    sys.exit(2)
