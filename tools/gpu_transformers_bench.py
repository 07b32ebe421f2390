#!/usr/bin/env python3
"""HF transformers timing of LLaVA-1.5 plain generation on a GPU, to sit beside `fastrm profile`.

Random weights with the exact llava-hf/llava-1.5-7b-hf (or -13b) shapes, written out in code (no network),
built on the meta device and initialised in place on the GPU (seconds). f16, SDPA attention, batch 1.
Prompt: BOS + text ids + 576 image ids + text ids (~40 text tokens), random 336x336 pixel_values.

Measures (CUDA events, warm-up first):
  ttft      prefill of the whole prompt (vision tower + projector + decoder, logits of the last position,
            argmax) -> first token; median of --repeats
  decode    ms/token over --tokens forced tokens (EOS ignored), manual greedy loop with the DynamicCache,
            no host sync inside the loop (per-step events)
  generate  model.generate(min_new_tokens = max_new_tokens = --tokens), end to end; its per-token decode
            estimate is (total - ttft) / (tokens - 1) (HF syncs the host each step)
  memory    torch.cuda.max_memory_allocated over prefill + decode of --tokens, and the weights alone

    python3 tools/gpu_transformers_bench.py --config 7b --tokens 128 --json gpu_bench_7b.json
    python3 tools/gpu_transformers_bench.py --config tiny --device cpu --tokens 8     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpuref_common as C  # noqa: E402


def prefill(model, ids, pv):
    out = model(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), use_cache=True,
                logits_to_keep=1)
    return C.out_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)


def decode_loop(model, cache, y, n0, steps, device):
    """Greedy steps after the prefill; returns per-step seconds (events recorded without host syncs on a
    GPU) and the ids."""
    cuda = torch.device(device).type == "cuda"
    ckw = C.cache_kw(model)
    ids = [y]
    marks = []

    def mark():
        if not cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    marks.append(mark())
    for k in range(steps):
        p = n0 + k
        o = model(input_ids=y, **{ckw: cache}, use_cache=True, logits_to_keep=1,
                  position_ids=torch.tensor([[p]], device=device), cache_position=torch.tensor([p], device=device))
        cache = C.out_cache(o)
        y = o.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(y)
        marks.append(mark())
    if cuda:
        marks[-1].synchronize()
        dts = [marks[i].elapsed_time(marks[i + 1]) / 1000.0 for i in range(steps)]
    else:
        dts = [marks[i + 1] - marks[i] for i in range(steps)]
    return dts, torch.cat(ids, dim=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(C.CONFIGS), default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=sorted(C.DTYPES), help="default f16 on cuda, f32 on cpu")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    ap.add_argument("--tokens", type=int, default=128, help="forced new tokens (EOS ignored)")
    ap.add_argument("--text-tokens", type=int, default=40, help="prompt ids besides the image ones (BOS incl.)")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills (median reported)")
    ap.add_argument("--no-generate-api", action="store_true", help="skip the model.generate() run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "f16" if torch.device(args.device).type == "cuda" else "f32"
    dev = args.device
    dtype = C.DTYPES[args.dtype]
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA not available (use --device cpu --config tiny for a smoke test)")
    T = max(2, args.tokens)
    t_start = time.perf_counter()

    import transformers  # noqa: F401  (import outside the build timing)
    from transformers import LlavaForConditionalGeneration  # noqa: F401

    t0 = time.perf_counter()
    spec, model = C.build_model(args.config, dev, dtype, args.attn, args.seed)
    C.sync(dev)
    build_s = time.perf_counter() - t0
    weights_bytes = C.param_bytes(model)
    lm = model.model.language_model
    decode_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    decode_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    ids, pv, _ = C.synthetic_prompt(spec, dev, args.text_tokens, args.seed + 1)
    pv = pv.to(device=dev, dtype=dtype)
    n = ids.shape[1]
    # forward FLOPs (2 per MAC) of the prefill: decoder linears over n positions + attention + lm_head row,
    # vision linears over 577 positions (+ attention); rough, for an achieved-rate column only
    D, L, F_ = spec["t_hidden"], spec["t_layers"], spec["t_inter"]
    Dv, Lv, Fv = spec["v_hidden"], spec["v_layers"], spec["v_inter"]
    nv = C.n_patches(spec) + 1
    prefill_flop = (2 * n * L * (4 * D * D + 3 * D * F_) + 2 * L * 2 * n * n * D / 2 + 2 * D * spec["vocab"]
                    + 2 * nv * Lv * (4 * Dv * Dv + 2 * Dv * Fv) + 2 * Lv * 2 * nv * nv * Dv
                    + 2 * C.n_patches(spec) * (Dv * D + D * D))

    res = {
        "what": "HF transformers LlavaForConditionalGeneration, random weights, plain greedy generation",
        "command": "python3 " + " ".join(sys.argv),
        "card": C.card(dev), "device": dev, "config": args.config, "shapes": spec, "dtype": args.dtype,
        "attn": args.attn, "versions": C.versions(),
        "n_params": sum(p.numel() for p in model.parameters()), "weights_bytes": weights_bytes,
        "decode_weight_bytes": decode_bytes, "prompt_len": n, "tokens": T, "build_s": round(build_s, 3),
    }

    with torch.inference_mode():
        # warm-up: one prefill + a few steps (cuBLAS handles, kernels, allocator)
        cache, y = prefill(model, ids, pv)
        decode_loop(model, cache, y, n, 4, dev)
        del cache
        ttft = []
        for _ in range(max(1, args.repeats)):
            with C.Timer(dev) as t:
                cache, y = prefill(model, ids, pv)
                y0 = int(y)
            ttft.append(t.s)
            del cache
        C.reset_peak(dev)
        mem0 = C.mem_allocated(dev)
        with C.Timer(dev) as t_all:
            cache, y = prefill(model, ids, pv)
            dts, gen = decode_loop(model, cache, y, n, T - 1, dev)
        peak = C.peak_allocated(dev)
        del cache
        assert int(gen[0, 0]) == y0
    dec = sorted(dts)
    res.update({
        "ttft_ms": {"median": round(1e3 * statistics.median(ttft), 3), "all": [round(1e3 * x, 3) for x in ttft]},
        "decode_ms_per_token": {
            "mean": round(1e3 * statistics.mean(dts), 3), "median": round(1e3 * statistics.median(dts), 3),
            "p10": round(1e3 * dec[len(dec) // 10], 3), "p90": round(1e3 * dec[(9 * len(dec)) // 10], 3),
            "first_last": [round(1e3 * dts[0], 3), round(1e3 * dts[-1], 3)],
        },
        "manual_total_s": round(t_all.s, 4),
        "prefill_flop": prefill_flop,
        "prefill_tflops": round(prefill_flop / statistics.median(ttft) / 1e12, 2),
        "decode_GBps": round(decode_bytes / statistics.median(dts) / 1e9, 1),
        "mem_before_bytes": mem0, "peak_bytes": peak,
        "peak_minus_weights_bytes": None if peak is None else peak - weights_bytes,
        "generated_ids_head": gen[0, :16].tolist(),
    })

    if not args.no_generate_api:
        kw = dict(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), do_sample=False,
                  eos_token_id=C.EOS_ID, pad_token_id=C.PAD_ID, use_cache=True)
        with torch.inference_mode():
            model.generate(**kw, max_new_tokens=2, min_new_tokens=2)  # warm-up
            C.reset_peak(dev)
            with C.Timer(dev) as tg:
                out = model.generate(**kw, max_new_tokens=T, min_new_tokens=T)
            gpeak = C.peak_allocated(dev)
        n_new = out.shape[1] - n
        res["generate_api"] = {
            "total_s": round(tg.s, 4), "new_tokens": n_new,
            "decode_ms_per_token_est": round(1e3 * (tg.s - statistics.median(ttft)) / max(1, n_new - 1), 3),
            "peak_bytes": gpeak,
            "same_ids_as_manual": out[0, n:n + 16].tolist() == gen[0, :16].tolist(),
        }
    res["wall_s"] = round(time.perf_counter() - t_start, 2)

    # compact table
    g = res.get("generate_api")
    print(f"{res['card']['name']} | llava-1.5-{args.config} {args.dtype} {args.attn} | prompt {n} | "
          f"{T} tokens | build {build_s:.1f}s")
    print(f"  {'weights':<26}{C.gib(weights_bytes):9.2f} GiB")
    print(f"  {'ttft (prefill)':<26}{res['ttft_ms']['median']:9.2f} ms   "
          f"({res['prefill_tflops']} TFLOP/s)")
    d = res["decode_ms_per_token"]
    print(f"  {'decode, manual loop':<26}{d['median']:9.3f} ms/tok  (mean {d['mean']}, p10 {d['p10']}, "
          f"p90 {d['p90']}; {res['decode_GBps']} GB/s of {C.gib(decode_bytes):.2f} GiB)")
    if g:
        print(f"  {'decode, generate()':<26}{g['decode_ms_per_token_est']:9.3f} ms/tok  "
              f"(total {g['total_s']:.3f} s for {g['new_tokens']})")
    if peak is not None:
        print(f"  {'peak allocated':<26}{C.gib(peak):9.2f} GiB  (+{C.gib(peak - weights_bytes):.2f} over weights)")
    print(f"  wall {res['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
