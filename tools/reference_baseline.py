#!/usr/bin/env python3
"""Reference cost of the gradient relevancy baseline in HF transformers, to sit beside
`fastrm profile`.

The procedure the FastRM paper measured (LVLM-Interpret style, Chefer et al. 2021 relevancy):
  1. greedy generation WITH autograd enabled, eager attention, output_attentions at every step, the KV
     cache NOT detached: one graph holds the prefill and every decode step;
  2. per generated token k, one backward from its raw logit s_k (retain_graph=True) to the attention
     probabilities of every layer and every step so far (`--grad-mode backward`: `.retain_grad()` +
     `s.backward()` with the weights requiring grad, so weight gradients are computed as a plain PyTorch user
     gets them; `--grad-mode grad`: `torch.autograd.grad(s, attentions)`, activation gradients only);
  3. cams C_l = mean_h max(0, A_l * dA_l) assembled into the (p+1)x(p+1) causal matrix (prompt block from the
     prefill's attention, row n-1+j from decode step j), R = (I + C_{L-1}) ... (I + C_0) materialised
     (`--r-mode full`, Chefer's form) or only its last row (`--r-mode row`), map = R[p_k, image columns].
Because the graph is held, backward k runs through the prefill and all k decode steps: the per-token cost
grows with k and the held graph (KV cache concatenations included) grows with the length.

Methods (rows of the JSON, per output length):
  generate               plain greedy generation, torch.no_grad, same model (eager), manual loop, EOS ignored
  baseline               the procedure above (exact map per token)
  baseline-incremental   baseline-incremental (LVLM-Interpret): KV cache detached before every step, one
                         single-row backward per token (prompt rows from token 0's backward)

Runtime is bounded by --budget-s: lengths run in ascending order and a (method, length) is skipped when its
predicted time (fitted on the shorter lengths already run) would overrun the budget, or its predicted peak
memory would not fit; the JSON says what ran and what was skipped and why.

    python3 tools/reference_baseline.py --config 7b --tokens 10,20,50,100 --budget-s 200 --json ref_7b.json
    python3 tools/reference_baseline.py --config tiny --device cpu --tokens 4,8 --json /tmp/ref_tiny.json
    python3 tools/reference_baseline.py --check-fixture tests/fixtures/tiny   # maps vs make_fixtures.py's
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpuref_common as C  # noqa: E402

METHODS = ("generate", "baseline-incremental", "baseline")  # run order per length: cheap ones first


# ----------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------


def step_kwargs(model, cache, p, device):
    return {C.cache_kw(model): cache, "use_cache": True, "logits_to_keep": 1,
            "position_ids": torch.tensor([[p]], device=device), "cache_position": torch.tensor([p], device=device)}


def detach_cache(cache):
    """Hold the KV cache constant (no gradient into past keys/values); transformers 5.x layers or 4.x lists."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            layer.keys = layer.keys.detach()
            layer.values = layer.values.detach()
    else:  # transformers 4.x DynamicCache
        cache.key_cache = [k.detach() for k in cache.key_cache]
        cache.value_cache = [v.detach() for v in cache.value_cache]


@torch.no_grad()
def generate_plain(model, ids, pv, T, device, force=None):
    n = ids.shape[1]
    out = model(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), use_cache=True,
                logits_to_keep=1)
    cache = C.out_cache(out)
    y = out.logits[:, -1].argmax(-1, keepdim=True)
    gen = [y]
    for k in range(1, T):
        if force is not None:
            y = force[k - 1].view(1, 1)
        o = model(input_ids=y, **step_kwargs(model, cache, n - 1 + k, device))
        cache = C.out_cache(o)
        y = o.logits[:, -1].argmax(-1, keepdim=True)
        gen.append(y)
    return torch.cat(gen, 1)[0]


def generate_with_grad(model, ids, pv, T, device, force=None):
    """Greedy generation with autograd on and the whole graph held (KV cache attached). Returns the raw
    logit rows (in the graph), the per-step attention tensors ([L] per step; step 0: [1,H,n,n], step j:
    [1,H,1,n+j]) and the ids. `force`: feed these ids instead of the argmax (teacher forcing)."""
    n = ids.shape[1]
    with torch.enable_grad():
        out = model(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), use_cache=True,
                    output_attentions=True, logits_to_keep=1)
        cache = C.out_cache(out)
        logits = [out.logits[0, -1]]
        attns = [list(out.attentions)]
        del out
        y = logits[0].detach().argmax().view(1, 1)
        gen = [y]
        for k in range(1, T):
            if force is not None:
                y = force[k - 1].view(1, 1)
            o = model(input_ids=y, output_attentions=True, **step_kwargs(model, cache, n - 1 + k, device))
            cache = C.out_cache(o)
            logits.append(o.logits[0, -1])
            attns.append(list(o.attentions))
            del o
            y = logits[-1].detach().argmax().view(1, 1)
            gen.append(y)
    return logits, attns, torch.cat(gen, 1)[0], cache


def attn_grads(model, s, inputs, grad_mode, retain):
    """dS/dA for each attention tensor in `inputs`; None where A does not reach s (the last layer's
    attention of earlier steps only feeds earlier logits), which the cams treat as zeros."""
    if grad_mode == "grad":
        return torch.autograd.grad(s, inputs, retain_graph=retain, allow_unused=True)
    for a in inputs:
        a.retain_grad()
        a.grad = None
    model.zero_grad(set_to_none=True)
    s.backward(retain_graph=retain)
    return [a.grad for a in inputs]


def cam(a, g):
    """mean_h max(0, A * dA) in f32; a, g: [1, H, q, k] -> [q, k] (g None: no gradient reaches A)."""
    if g is None:
        return torch.zeros(a.shape[-2:], device=a.device, dtype=torch.float32)
    return torch.clamp(a[0].float() * g[0].float(), min=0).mean(0)


def r_row(Cs, p, r_mode):
    """Row p of R = (I + C_{L-1}) ... (I + C_0); Cs[l]: [p+1, p+1]."""
    if r_mode == "full":
        R = torch.eye(p + 1, device=Cs[0].device, dtype=torch.float32)
        for c in Cs:
            R = R + c @ R
        return R[p]
    v = torch.zeros(p + 1, device=Cs[0].device, dtype=torch.float32)
    v[p] = 1.0
    for c in reversed(Cs):
        v = v + v @ c
    return v


def baseline_maps(model, logits, attns, gen, n, image_pos, grad_mode, r_mode, device, with_incremental=False):
    """One backward per token through the held graph; exact map per token (and, from the same gradients,
    the incremental assembly: prompt rows from token 0's backward, row p_j from token j's own backward).
    Returns maps [T, P], per-token seconds, incremental maps or None."""
    T = len(logits)
    L = len(attns[0])
    maps, inc_maps, dts = [], [], []
    Chat = None
    if with_incremental:
        Chat = [torch.zeros(n + T - 1, n + T - 1, device=device) for _ in range(L)]
    for k in range(T):
        p = n - 1 + k
        with C.Timer(device) as t:
            inputs = [a for j in range(k + 1) for a in attns[j]]
            grads = attn_grads(model, logits[k][int(gen[k])], inputs, grad_mode, retain=k < T - 1)
            with torch.no_grad():
                Cs = []
                for l in range(L):
                    c = torch.zeros(p + 1, p + 1, device=device)
                    c[:n, :n] = cam(attns[0][l], grads[l])
                    for j in range(1, k + 1):
                        c[n - 1 + j, : n + j] = cam(attns[j][l], grads[j * L + l])[0]
                    Cs.append(c)
                m = r_row(Cs, p, r_mode)[image_pos].clone()
            del grads
        dts.append(t.s)
        maps.append(m)
        if with_incremental:
            with torch.no_grad():
                for l in range(L):
                    if k == 0:
                        Chat[l][:n, :n] = Cs[l][:n, :n]
                    else:
                        Chat[l][p, : p + 1] = Cs[l][p]
                inc_maps.append(r_row([c[: p + 1, : p + 1] for c in Chat], p, "row")[image_pos].clone())
        del Cs
    if grad_mode == "backward":
        model.zero_grad(set_to_none=True)
    return torch.stack(maps), dts, (torch.stack(inc_maps) if with_incremental else None)


def baseline_incremental(model, ids, pv, T, image_pos, grad_mode, device, force=None):
    """baseline-incremental (LVLM-Interpret): token 0 = prefill with grad + backward (prompt rows); token
    k >= 1: one-token forward with the past KV cache detached, backward from s_k, its own cam row."""
    n = ids.shape[1]
    L = None
    maps, dts = [], []
    gen = []
    with C.Timer(device) as t:
        with torch.enable_grad():
            out = model(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), use_cache=True,
                        output_attentions=True, logits_to_keep=1)
            a0 = list(out.attentions)
            L = len(a0)
            y = out.logits[0, -1].detach().argmax()
            gen.append(y)
            g = attn_grads(model, out.logits[0, -1, int(y)], a0, grad_mode, retain=False)
        with torch.no_grad():
            Chat = [torch.zeros(n + T - 1, n + T - 1, device=device) for _ in range(L)]
            for l in range(L):
                Chat[l][:n, :n] = cam(a0[l], g[l])
            maps.append(r_row([c[:n, :n] for c in Chat], n - 1, "row")[image_pos].clone())
        cache = C.out_cache(out)
        del out, a0, g
        detach_cache(cache)
    dts.append(t.s)
    for k in range(1, T):
        p = n - 1 + k
        with C.Timer(device) as t:
            y_in = (force[k - 1] if force is not None else gen[-1]).view(1, 1)
            with torch.enable_grad():
                o = model(input_ids=y_in, output_attentions=True, **step_kwargs(model, cache, p, device))
                att = list(o.attentions)
                y = o.logits[0, -1].detach().argmax()
                gen.append(y)
                g = attn_grads(model, o.logits[0, -1, int(y) if force is None else int(force[k])], att, grad_mode,
                               retain=False)
            with torch.no_grad():
                for l in range(L):
                    Chat[l][p, : p + 1] = cam(att[l], g[l])[0]
                maps.append(r_row([c[: p + 1, : p + 1] for c in Chat], p, "row")[image_pos].clone())
            cache = C.out_cache(o)
            del o, att, g
            detach_cache(cache)
        dts.append(t.s)
    if grad_mode == "backward":
        model.zero_grad(set_to_none=True)
    return torch.stack(maps), dts, torch.stack(gen)


# ----------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------


def map_stats(m):
    m = m.float()
    return {"max": float(m.max()), "mean": float(m.mean()), "nonzero_frac": float((m > 0).float().mean()),
            "finite": bool(torch.isfinite(m).all())}


def run_one(method, model, ids, pv, T, image_pos, args, device):
    n = ids.shape[1]
    gc.collect()
    C.reset_peak(device)
    static = C.mem_allocated(device)
    rec = {"method": method, "tokens": T}
    if method == "generate":
        with C.Timer(device) as t:
            gen = generate_plain(model, ids, pv, T, device)
        rec.update(latency_s=t.s, map_latency_s=None)
    elif method == "baseline":
        with C.Timer(device) as tg:
            logits, attns, gen, cache = generate_with_grad(model, ids, pv, T, device)
        maps, dts, _ = baseline_maps(model, logits, attns, gen, n, image_pos, args.grad_mode, args.r_mode, device)
        del logits, attns, cache
        rec.update(latency_s=tg.s + sum(dts), map_latency_s=statistics.mean(dts), gen_s=tg.s, maps_s=sum(dts),
                   per_token_map_s=[round(x, 5) for x in dts], map_stats=map_stats(maps))
    else:
        maps, dts, gen = baseline_incremental(model, ids, pv, T, image_pos, args.grad_mode, device)
        # per token: forward (replaces the decode step) + backward + cam row + map row
        rec.update(latency_s=sum(dts), map_latency_s=statistics.mean(dts[1:]) if T > 1 else dts[0],
                   token0_s=dts[0], per_token_map_s=[round(x, 5) for x in dts], map_stats=map_stats(maps))
    peak = C.peak_allocated(device)
    for k in ("latency_s", "map_latency_s", "gen_s", "maps_s", "token0_s"):
        if rec.get(k) is not None:
            rec[k] = round(rec[k], 5)
    rec.update(peak_bytes=peak, static_bytes=static, ids_head=[int(x) for x in gen[:8]])
    gc.collect()
    return rec


def predict(hist, T, quadratic):
    """Predict a quantity at length T from [(T_i, v_i)] of shorter runs: fit v = a T + b T^2 (quadratic) or
    v = a + b T (linear) on the last two points; with one point scale by (T/T_i)^2 or T/T_i (pessimistic)."""
    if not hist:
        return None
    if len(hist) == 1 or hist[-2][0] == hist[-1][0]:
        t1, v1 = hist[-1]
        return v1 * (T / t1) ** (2 if quadratic else 1)
    (t1, v1), (t2, v2) = hist[-2:]
    if quadratic:
        det = t1 * t2 * t2 - t2 * t1 * t1
        a = (v1 * t2 * t2 - v2 * t1 * t1) / det
        b = (t1 * v2 - t2 * v1) / det
        return max(a * T + b * T * T, v2 * T / t2)
    slope = (v2 - v1) / (t2 - t1)
    return v2 + max(slope, 0.0) * (T - t2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(C.CONFIGS), default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=sorted(C.DTYPES), help="default f16 on cuda, f32 on cpu")
    ap.add_argument("--tokens", default="10,20,50,100", help="output lengths, comma separated")
    ap.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="wall-clock budget from model build on (imports excluded): no run is started that is "
                         "predicted to end past it")
    ap.add_argument("--grad-mode", choices=["backward", "grad"], default="backward",
                    help="backward: retain_grad + s.backward() (weight grads too, as LVLM-Interpret); "
                         "grad: torch.autograd.grad on the attentions (activation grads only)")
    ap.add_argument("--r-mode", choices=["full", "row"], default="full",
                    help="full: materialise R per token (Chefer); row: only its last row")
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--check-fixture", type=Path, help="verify the maps against a make_fixtures.py fixture dir")
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "f16" if torch.device(args.device).type == "cuda" else "f32"
    if args.check_fixture:
        sys.exit(check_fixture(args.check_fixture))
    dev = args.device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA not available (use --device cpu --config tiny for a smoke test)")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m}")
    lengths = sorted({int(x) for x in args.tokens.split(",") if x})
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s

    import transformers  # noqa: F401  (import outside the build timing)
    from transformers import LlavaForConditionalGeneration  # noqa: F401

    t0 = time.perf_counter()
    spec, model = C.build_model(args.config, dev, C.DTYPES[args.dtype], "eager", args.seed)
    for p in model.parameters():
        p.requires_grad_(True)  # the graph is built through the weights (as with a loaded checkpoint)
    C.sync(dev)
    build_s = time.perf_counter() - t0
    ids, pv, image_pos = C.synthetic_prompt(spec, dev, args.text_tokens, args.seed + 1)
    pv = pv.to(device=dev, dtype=C.DTYPES[args.dtype])
    image_pos = image_pos.to(dev)
    n = ids.shape[1]
    total_mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if torch.device(dev).type == "cuda" else None

    res = {
        "what": "HF transformers LLaVA-1.5, random weights, eager attention: plain generation vs the gradient "
                "relevancy baseline (LVLM-Interpret procedure, one backward per token through the held graph)",
        "command": "python3 " + " ".join(sys.argv),
        "card": C.card(dev), "device": dev, "config": args.config, "shapes": spec, "dtype": args.dtype,
        "attn": "eager", "grad_mode": args.grad_mode, "r_mode": args.r_mode, "versions": C.versions(),
        "prompt_len": n, "n_patches": int(image_pos.numel()), "weights_bytes": C.param_bytes(model),
        "build_s": round(build_s, 2), "budget_s": args.budget_s, "lengths_requested": lengths,
        "methods_requested": methods,
        "notes": {
            "latency_s": "end to end: generation + all maps (baseline: grad-enabled generation, then one "
                         "backward + cams + R per token; baseline-incremental: per-token forward+backward)",
            "map_latency_s": "mean per token of backward + cams + R row (baseline-incremental: of tokens >= 1, "
                             "forward included as it replaces the decode step)",
            "peak_bytes": "torch.cuda.max_memory_allocated over the run (reset before it), weights included",
            "map_bytes": "peak_bytes minus the peak of plain generation of the same length (same process)",
        },
        "runs": [], "skipped": [],
    }

    def dump(final=False):
        """Rewrite the JSON after every run, so a run killed from outside still leaves its results."""
        res["complete"] = final
        res["ran"] = [[r["method"], r["tokens"]] for r in res["runs"]]
        res["wall_s"] = round(time.perf_counter() - t_start, 2)
        if args.json:
            tmp = args.json.with_suffix(args.json.suffix + ".tmp")
            tmp.write_text(json.dumps(res, indent=2) + "\n")
            tmp.replace(args.json)

    # warm-up (kernels, cuBLAS handles, allocator) at 2 tokens; not a result, but its time and memory seed
    # the budget predictions for the first length
    hist_t = {m: [] for m in methods}
    hist_mem = {m: [] for m in methods}
    res["warmup"] = []
    for m in methods:
        rec = run_one(m, model, ids, pv, 2, image_pos, args, dev)
        res["warmup"].append({k: rec.get(k) for k in ("method", "tokens", "latency_s", "peak_bytes")})
        hist_t[m].append((2, rec["latency_s"]))
        if rec["peak_bytes"] is not None:
            hist_mem[m].append((2, rec["peak_bytes"] - res["weights_bytes"]))
    stopped = {}
    for T in lengths:
        for m in methods:
            if m in stopped:
                res["skipped"].append({"method": m, "tokens": T, "reason": stopped[m]})
                continue
            now = time.perf_counter()
            pt = predict(hist_t[m], T, quadratic=(m == "baseline"))
            if pt is not None and now + pt > deadline:
                stopped[m] = f"predicted {pt:.1f} s, {deadline - now:.1f} s of budget left"
                res["skipped"].append({"method": m, "tokens": T, "reason": stopped[m]})
                continue
            pm = predict(hist_mem[m], T, quadratic=False)
            if pm is not None and total_mem is not None and 1.1 * pm + res["weights_bytes"] > 0.97 * total_mem:
                stopped[m] = (f"predicted peak {C.gib(1.1 * pm + res['weights_bytes']):.1f} GiB (10% margin) > "
                              f"97% of device memory")
                res["skipped"].append({"method": m, "tokens": T, "reason": stopped[m]})
                continue
            oom = None
            try:
                rec = run_one(m, model, ids, pv, T, image_pos, args, dev)
            except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
                oom = str(e).splitlines()[0][:200]
            if oom is not None:  # outside the handler, so the traceback's frames (and graph) are gone
                model.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                stopped[m] = f"out of memory at {T} tokens: {oom}"
                res["skipped"].append({"method": m, "tokens": T, "reason": stopped[m]})
                continue
            gen_peak = next((r["peak_bytes"] for r in res["runs"] if r["method"] == "generate"
                             and r["tokens"] == T), None)
            rec["map_bytes"] = 0 if m == "generate" else (
                None if rec["peak_bytes"] is None or gen_peak is None else rec["peak_bytes"] - gen_peak)
            res["runs"].append(rec)
            dump()
            if T == 2:  # replace the warm-up point by the measured one
                hist_t[m] = [h for h in hist_t[m] if h[0] != 2]
                hist_mem[m] = [h for h in hist_mem[m] if h[0] != 2]
            hist_t[m].append((T, rec["latency_s"]))
            if rec["peak_bytes"] is not None:
                hist_mem[m].append((T, rec["peak_bytes"] - res["weights_bytes"]))
            print(f"  {m:<21} T={T:<4} {rec['latency_s']:9.3f} s"
                  + (f"  map/token {1e3 * rec['map_latency_s']:9.2f} ms" if rec["map_latency_s"] else " " * 25)
                  + (f"  peak {C.gib(rec['peak_bytes']):6.2f} GiB" if rec["peak_bytes"] else ""), flush=True)
    dump(final=True)

    print(f"\n{res['card']['name']} | llava-1.5-{args.config} {args.dtype} eager | prompt {n} | "
          f"grad {args.grad_mode}, R {args.r_mode} | wall {res['wall_s']} s")
    hdr = f"{'method':<21}{'T':>5}{'latency s':>11}{'map ms/tok':>12}{'peak GiB':>10}{'map GiB':>9}"
    print(hdr)
    for r in res["runs"]:
        ml = f"{1e3 * r['map_latency_s']:.2f}" if r["map_latency_s"] else "-"
        pk = f"{C.gib(r['peak_bytes']):.2f}" if r["peak_bytes"] is not None else "-"
        mb = f"{C.gib(r['map_bytes']):.2f}" if r["map_bytes"] is not None else "-"
        print(f"{r['method']:<21}{r['tokens']:>5}{r['latency_s']:>11.3f}{ml:>12}{pk:>10}{mb:>9}")
    for s in res["skipped"]:
        print(f"skipped {s['method']} T={s['tokens']}: {s['reason']}")
    if args.json:
        print(f"wrote {args.json}")


# ----------------------------------------------------------------------------------------------------
# verification against tools/make_fixtures.py's autograd relevancy
# ----------------------------------------------------------------------------------------------------


def check_fixture(d: Path) -> int:
    """Load a make_fixtures.py fixture (f32 model folder + expected.safetensors), run this script's
    procedure teacher-forced on its prompt and generated ids, compare with its `relevancy` (exact, full
    forward per token) and `relevancy_incremental`. Returns a process exit code."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    ex = load_file(str(d / "expected.safetensors"))
    model = LlavaForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32)
    C.set_attn(model, "eager")
    model.eval()
    ids = ex["input_ids"][None]
    pv = ex["pixel_values"][None]
    gen_ref = ex["generated_ids"]
    T = gen_ref.numel()
    n = ids.shape[1]
    image_token = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    image_pos = (ids[0] == image_token).nonzero()[:, 0]
    ok = True

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    print(f"fixture {d}: prompt {n}, {T} tokens, {image_pos.numel()} patches, "
          f"{model.config.text_config.num_hidden_layers} layers")
    g_plain = generate_plain(model, ids, pv, T, "cpu")
    print(f"  plain greedy ids == fixture generated_ids: {torch.equal(g_plain, gen_ref)}")
    ok &= torch.equal(g_plain, gen_ref)
    for grad_mode in ("grad", "backward"):
        for r_mode in ("full", "row"):
            logits, attns, gen, _ = generate_with_grad(model, ids, pv, T, "cpu", force=gen_ref)
            same = torch.equal(gen, gen_ref)
            maps, _, inc = baseline_maps(model, logits, attns, gen_ref, n, image_pos, grad_mode, r_mode, "cpu",
                                         with_incremental=True)
            d_ex = rel(maps, ex["relevancy"])
            d_inc = rel(inc, ex["relevancy_incremental"])
            d_cross = rel(maps, ex["relevancy_incremental"])
            good = same and d_ex < 1e-4 and d_inc < 1e-4
            ok &= good
            print(f"  grad={grad_mode:<8} R={r_mode:<4} argmax==fixture {same}  exact vs `relevancy` {d_ex:.2e}  "
                  f"incremental assembly vs `relevancy_incremental` {d_inc:.2e}  "
                  f"(exact vs incremental {d_cross:.2e})  {'OK' if good else 'FAIL'}")
            del logits, attns
    maps_i, _, gen_i = baseline_incremental(model, ids, pv, T, image_pos, "grad", "cpu", force=gen_ref)
    d_i = rel(maps_i, ex["relevancy_incremental"])
    good = torch.equal(gen_i, gen_ref) and d_i < 1e-4
    ok &= good
    print(f"  baseline-incremental (detached cache) vs `relevancy_incremental` {d_i:.2e}  {'OK' if good else 'FAIL'}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    main()
