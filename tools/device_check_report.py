"""Writes the device check's summary.txt and results.json (tools/device-check.sh calls it after
every step, so a run cut off part-way still returns what finished).

usage: device_check_report.py STEPS_TSV   (environment: DC_WORK, DC_OUT, DC_COMMIT, DC_DRY, DC_GRACE)
"""
import json
import os
import re
import sys

steps_file = sys.argv[1]
work, out = os.environ["DC_WORK"], os.environ["DC_OUT"]
logs = os.path.join(work, "logs")
grace = float(os.environ.get("DC_GRACE", "0"))


def log(name):
    try:
        return open(os.path.join(logs, name + ".log"), errors="replace").read()
    except OSError:
        return None


def last_json(text):
    for line in reversed((text or "").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


steps = []
for line in open(steps_file):
    name, limit, scaled, status, rc, secs = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
    steps.append({"name": name, "limit_s": float(limit), "effective_limit_s": float(scaled) if scaled else None,
                  "status": status, "rc": int(rc) if rc else None, "seconds": float(secs) if secs else None})
by = {s["name"]: s for s in steps}

res = {"format": "fastrm-device-check-1", "commit": os.environ.get("DC_COMMIT", "unknown"),
       "dry_run": os.environ.get("DC_DRY") == "1",
       "budget_s": sum(s["limit_s"] + grace for s in steps), "steps": steps}
bad = [s for s in steps if s["status"] not in ("pass", "pending", "running")]
unfinished = [s for s in steps if s["status"] in ("pending", "running")]
res["verdict"] = "FAIL" if bad else ("INCOMPLETE" if unfinished else "PASS")

if "preflight" in by:
    res["preflight"] = last_json(log("preflight"))
if "bench" in by:
    lines = [l.strip() for l in (log("bench") or "").splitlines() if l.startswith("RESULT")]
    kv = {}
    for l in lines:
        for k, v in re.findall(r"(\w+)=(\S+)", l):
            try:
                kv[k] = float(v)
            except ValueError:
                kv[k] = v
    res["bench"] = {"values": kv, "lines": lines}
if "profile" in by:
    res["profile"] = load(os.path.join(work, "profile", "profile.json"))
if "tests" in by:
    t = log("tests") or ""
    res["tests"] = {"results": re.findall(r"^test result: .*$", t, re.M),
                    "failed": re.findall(r"^test (\S+) \.\.\. FAILED$", t, re.M),
                    "skipped": re.findall(r"^SKIPPED .*$", t, re.M)}
if "reference" in by:
    res["reference"] = load(os.path.join(logs, "reference.json"))
if "write-7b" in by:
    m = re.search(r"model loaded.*?seconds=([0-9.]+)", log("write-7b") or "")
    res["write_7b"] = {"load_seconds": float(m.group(1)) if m else None}

tmp = os.path.join(out, "results.json.part")
json.dump(res, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, "results.json"))

# The summary: the verdict and the numbers first, the step table last.
S = [f"device check: {res['verdict']}  (commit {res['commit']}{', DRY RUN' if res['dry_run'] else ''})"]
p = res.get("preflight")
if p:
    S.append(f"device {p.get('nvml_device_name') or p.get('device_name')}, driver {p.get('driver_version')}, "
             f"GEMM max rel err {p.get('gemm', {}).get('max_rel_err')}")
    for lib, paths in (p.get("libraries") or {}).items():
        S.append(f"  {lib}: {', '.join(paths) or 'not loaded'}")
elif "preflight" in by:
    S.append("pre-flight: no report (see logs.tar.gz: logs/preflight.log)")
# The memory claim both ways, counted alike: peak bytes allocated to tensors, weights included (our
# ledger; PyTorch's max_memory_allocated), FastRM against our own lean baseline (profile) and
# against the PyTorch baseline (reference); NVML's device-wide peaks beside them.
prof_runs = (res.get("profile") or {}).get("runs", [])
ref_runs = (res.get("reference") or {}).get("runs", [])


def find(runs, method, tokens, key):
    for r in runs:
        if r.get("method") == method and r.get("tokens") == tokens and r.get(key):
            return r[key]
    return None


def less(f, peak):
    return f"{peak / 1e9:.2f} GB (fastrm {100 * (1 - f / peak):.1f}% less)"


head = []
for n in sorted({r.get("tokens") for r in prof_runs if r.get("method") == "fastrm"}):
    f = find(prof_runs, "fastrm", n, "ledger_peak_bytes")
    if f:
        line = f"{n:>4} tokens, allocated: fastrm {f / 1e9:.2f} GB"
        for label, peak in (("our baseline", find(prof_runs, "baseline", n, "ledger_peak_bytes")),
                            ("PyTorch baseline", find(ref_runs, "baseline", n, "peak_bytes"))):
            if peak:
                line += f"; {label} {less(f, peak)}"
        head.append(line)
    f, b = find(prof_runs, "fastrm", n, "peak_memory_bytes"), find(prof_runs, "baseline", n, "peak_memory_bytes")
    if f and b:
        head.append(f"{n:>4} tokens, NVML: fastrm {f / 1e9:.2f} GB; our baseline {less(f, b)}")
if head:
    S.append("---- peak memory, FastRM vs the baselines (weights included)")
    S += head
if res.get("bench"):
    S.append("---- bench")
    S += res["bench"]["lines"] or ["(no RESULT lines)"]
if "profile" in by:
    S.append("---- profile (synthetic 7B, f16)")
    try:
        S.append(open(os.path.join(work, "profile", "profile.txt")).read().rstrip())
    except OSError:
        S.append("(no profile table)")
if res.get("tests"):
    t = res["tests"]
    S.append("---- GPU tests (FASTRM_REQUIRE_GPU=1)")
    S += t["results"] or ["(no test result line)"]
    S += [f"FAILED {f}" for f in t["failed"]] + t["skipped"]
if "reference" in by:
    S.append("---- PyTorch reference")
    r = res.get("reference")
    for run in (r or {}).get("runs", []):
        ml = run.get("map_latency_s")
        S.append(f"{run.get('method', '?'):<22} {run.get('tokens', '?'):>4} tokens  latency {1e3 * (run.get('latency_s') or 0):9.1f} ms"
                 + (f"  map/token {1e3 * ml:8.2f} ms" if ml else "") + f"  peak {(run.get('peak_bytes') or 0) / 1e9:.2f} GB")
    if not r:
        S.append("(no reference JSON)")
if "write_7b" in res:
    S.append(f"---- 7B checkpoint load: {res['write_7b']['load_seconds']} s")
S.append("---- steps (limit; logs and plots in logs.tar.gz)")
for s in steps:
    S.append(f"{s['name']:<10} {s['status']:<24} rc={'' if s['rc'] is None else s['rc']:<4} "
             f"{'' if s['seconds'] is None else s['seconds']:>6}s of {s['effective_limit_s'] or s['limit_s']}s")
tmp = os.path.join(out, "summary.txt.part")
open(tmp, "w").write("\n".join(S) + "\n")
os.replace(tmp, os.path.join(out, "summary.txt"))
