#!/usr/bin/env python3
"""The machine-code gate: what the decode kernels need, read from their SASS.

Every kernel in kernels/ptx/ is assembled by the pinned ptxas for each architecture of the gate
table (kernels/sass_gate.json) and disassembled by nvdisasm. Per kernel it reports registers,
spill bytes, shared memory and the most 16-byte global loads it has issued and not yet used
("in flight": a load counts from its issue until the first instruction that reads one of the
registers it writes). It fails on any spill, and on a hot kernel (a name pattern in the table)
with fewer loads in flight than the table asks: the GPU's bandwidth on a decode step depends on
how many bytes each thread has outstanding, which the source alone does not show.

The table's mutations prove the gate can fail: each applies a textual change to a kernel source
(e.g. loading one pack at a time), compiles the mutant with the pinned nvcc, and must make the
named kernel fail.

    tools/sass_check.py BIN_DIR            check (BIN_DIR holds nvcc, ptxas, nvdisasm)
    tools/sass_check.py BIN_DIR --json F   also write the per-kernel numbers to F
    tools/sass_check.py --self-test        the load-tracking analysis on hand-written SASS

Exit status 1 on a failed check.
"""

import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = os.path.join(ROOT, "kernels", "sass_gate.json")

INSN = re.compile(r"/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
REG = re.compile(r"\bR(\d+)\b")


def loads_in_flight(sass_lines):
    """The most 16-byte global loads issued and not yet read, over a linear walk of the code.
    Pending loads are dropped at any branch or exit: the walk does not follow jumps, so only
    loads issued together in straight-line code count."""
    pending = []  # (registers written)
    best = 0
    for line in sass_lines:
        m = INSN.search(line)
        if not m:
            continue
        op, operands = m.group(2), m.group(3)
        regs = [int(r) for r in REG.findall(operands)]
        if op.startswith("LDG") and ".128" in op and regs:
            reads = set(regs[1:])
            pending = [p for p in pending if not (p & reads)]
            pending.append(set(range(regs[0], regs[0] + 4)))
            best = max(best, len(pending))
            continue
        if op in ("EXIT", "RET", "BRA"):
            pending = []
            continue
        # Every register an instruction names is treated as read (a write to a pending load's
        # register before its use does not happen in compiled code).
        names = set(regs)
        pending = [p for p in pending if not (p & names)]
    return best


def functions(disasm):
    """{kernel name: its SASS lines} of nvdisasm's output."""
    out, name = {}, None
    for line in disasm.splitlines():
        m = re.match(r"\.text\.([A-Za-z0-9_]+):", line.strip())
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return out


def ptxas_report(text):
    """{kernel: {registers, spill_bytes, shared_bytes}} from `ptxas -v`."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            name = m.group(1)
            out.setdefault(name, {"registers": 0, "spill_bytes": 0, "shared_bytes": 0})
            continue
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            out.setdefault(name, {"registers": 0, "spill_bytes": 0, "shared_bytes": 0})
            continue
        if not name:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[name]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            out[name]["shared_bytes"] = int(m.group(1))
    return out


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sass_check: {' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout + r.stderr


def examine(bin_dir, ptx, arch, tmp):
    """{kernel: numbers} of one PTX file on one architecture."""
    cubin = os.path.join(tmp, f"{os.path.basename(ptx)}.{arch}.cubin")
    report = ptxas_report(run([os.path.join(bin_dir, "ptxas"), "-v", f"-arch={arch}", "-O3", "-o", cubin, ptx]))
    sass = functions(run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin]))
    for name, lines in sass.items():
        report.setdefault(name, {"registers": 0, "spill_bytes": 0, "shared_bytes": 0})
        report[name]["loads_in_flight"] = loads_in_flight(lines)
    return report


def failures(report, gate, arch):
    """The gate's complaints about one architecture's report."""
    bad = []
    for name, n in sorted(report.items()):
        if n["spill_bytes"]:
            bad.append(f"{name} ({arch}): {n['spill_bytes']} bytes of register spills")
        for pattern, least in gate["min_loads_in_flight"].items():
            if fnmatch.fnmatch(name, pattern) and n.get("loads_in_flight", 0) < least:
                bad.append(
                    f"{name} ({arch}): {n.get('loads_in_flight', 0)} 16-byte loads in flight, "
                    f"the gate asks for {least} ({pattern})"
                )
    return bad


def mutant_fails(bin_dir, gate, mutation, tmp):
    """Whether the mutated source makes its kernel fail the gate (it must)."""
    src = os.path.join(ROOT, "kernels", mutation["file"])
    with open(src) as f:
        text = f.read()
    if mutation["from"] not in text:
        sys.exit(f"sass_check: mutation {mutation['name']!r}: its text is not in {mutation['file']}")
    mutated = os.path.join(tmp, "mutant_" + mutation["file"])
    with open(mutated, "w") as f:
        f.write(text.replace(mutation["from"], mutation["to"], 1))
    ptx = os.path.join(tmp, "mutant.ptx")
    run([os.path.join(bin_dir, "nvcc"), "-ptx", "-O3", "-arch=sm_80", "-std=c++17",
         "-I", os.path.join(ROOT, "kernels"), "-o", ptx, mutated])
    arch = gate["arches"][0]
    report = examine(bin_dir, ptx, arch, tmp)
    bad = [b for b in failures(report, gate, arch) if b.startswith(mutation["kernel"] + " ")]
    return bad


def self_test():
    four = [
        "/*0010*/ LDG.E.128 R8, desc[UR4][R2.64] ;",
        "/*0020*/ @!P0 LDG.E.128 R12, desc[UR4][R2.64+0x200] ;",
        "/*0030*/ LDG.E.128 R16, desc[UR4][R2.64+0x400] ;",
        "/*0040*/ LDG.E.128 R20, desc[UR4][R2.64+0x600] ;",
        "/*0050*/ HADD2.F32 R6, -RZ, R8.H0_H0 ;",
        "/*0060*/ HADD2.F32 R7, -RZ, R13.H0_H0 ;",
    ]
    one = [
        "/*0010*/ LDG.E.128 R8, desc[UR4][R2.64] ;",
        "/*0020*/ HADD2.F32 R6, -RZ, R8.H0_H0 ;",
        "/*0030*/ LDG.E.128 R8, desc[UR4][R2.64+0x200] ;",
        "/*0040*/ FFMA R6, R9, R6, RZ ;",
        "/*0050*/ LDG.E.64 R10, desc[UR4][R2.64] ;",
    ]
    # A load whose address is a pending load's register waits for it: not independent.
    chained = [
        "/*0010*/ LDG.E.128 R8, desc[UR4][R2.64] ;",
        "/*0020*/ LDG.E.128 R12, desc[UR4][R8.64] ;",
    ]
    branch = four[:2] + ["/*0030*/ @P0 BRA `(.L_x_1) ;"] + four[2:4]
    got = [loads_in_flight(x) for x in (four, one, chained, branch)]
    want = [4, 1, 1, 2]
    if got != want:
        sys.exit(f"sass_check self-test: loads in flight {got}, expected {want}")
    print("sass_check self-test: ok")


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return
    if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != "--json"):
        sys.exit(__doc__)
    bin_dir = sys.argv[1]
    self_test()
    with open(GATE) as f:
        gate = json.load(f)
    ptx_dir = os.path.join(ROOT, "kernels", "ptx")
    results, bad = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in gate["arches"]:
            report = {}
            for ptx in sorted(os.listdir(ptx_dir)):
                if ptx.endswith(".ptx"):
                    report.update(examine(bin_dir, os.path.join(ptx_dir, ptx), arch, tmp))
            results[arch] = report
            bad += failures(report, gate, arch)
        for mutation in gate["mutations"]:
            if not mutant_fails(bin_dir, gate, mutation, tmp):
                bad.append(f"mutation {mutation['name']!r} passed the gate: the gate cannot see it")
            else:
                print(f"sass_check: mutation {mutation['name']!r} fails the gate, as it must")
    hot = sorted(
        n for n in results[gate["arches"][0]]
        if any(fnmatch.fnmatch(n, p) for p in gate["min_loads_in_flight"])
    )
    print(f"{'kernel':40} " + " ".join(f"{a + ' regs/in flight':>20}" for a in gate["arches"]))
    for name in hot:
        cells = []
        for a in gate["arches"]:
            n = results[a].get(name, {})
            cells.append(f"{n.get('registers', '-'):>14}/{n.get('loads_in_flight', '-'):<5}")
        print(f"{name:40} " + " ".join(cells))
    if len(sys.argv) == 4:
        with open(sys.argv[3], "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    if bad:
        print("sass_check: FAILED", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        sys.exit(1)
    print(f"sass_check: {sum(len(r) for r in results.values())} kernel builds, no spills, hot kernels at the gate")


if __name__ == "__main__":
    main()
