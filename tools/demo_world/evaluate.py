#!/usr/bin/env python3
"""Evaluate a demo-world model with HF transformers exactly as a user would run it, and write the oracle
file for the Rust test.

    /work/pyenv/bin/python tools/demo_world/evaluate.py --model assets/demo/model \
        --eval assets/demo_world/eval --results tools/demo_world/eval_results.json \
        --expected tests/fixtures/demo_world/expected.json

The model folder is loaded with `from_pretrained` (f16 weights, computed in f32, eager attention), images
go through `CLIPImageProcessorPil` (the PIL backend, as the engine reproduces it), prompts are the LLaVA-1.5
template `USER: <image>\\n{question} Answer the question using up to two words. ASSISTANT:` (the engine's
distill suffix), greedy generation up to 8 new tokens. Exact match: the decoded answer, stripped and
lower-cased, equals one of `answers`.

`--expected`: a sample of the evaluation set (every `--stride`-th question) with the prompt ids, the greedy
ids (including EOS when it ended generation), the decoded text and the smallest top-2 logit gap over the
generated steps, for tests/demo_world.rs (the engine must reproduce the ids exactly).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import make_fixtures as mf  # noqa: E402
from train import SPEC, SUFFIX  # noqa: E402

MAX_NEW = 8


def load(model_dir: Path):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="eager",
                                                          dtype=torch.float32)
    model.eval()
    proc = mf.load_processor(model_dir, SPEC)
    return model, proc


@torch.no_grad()
def answer(model, proc, image_path: Path, question: str, suffix=True):
    prompt = mf.prompt_for(question + (SUFFIX if suffix else ""))
    inputs = proc(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
    out = model.generate(
        input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
        attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=MAX_NEW, do_sample=False,
        output_logits=True, return_dict_in_generate=True, eos_token_id=2,
        pad_token_id=model.config.text_config.pad_token_id, use_cache=True,
    )
    gen = out.sequences[0, inputs["input_ids"].shape[1]:]
    logits = torch.stack([l[0] for l in out.logits]).float()
    text = proc.tokenizer.decode(gen.tolist(), skip_special_tokens=True)
    return prompt, inputs["input_ids"][0].tolist(), gen.tolist(), text, mf.top2_gap(logits)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/demo/model")
    ap.add_argument("--eval", default="assets/demo_world/eval")
    ap.add_argument("--results", default=None)
    ap.add_argument("--expected", default=None)
    ap.add_argument("--stride", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-suffix", action="store_true", help="ask the bare question (no distill suffix)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model, proc = load(Path(args.model))
    ev = Path(args.eval)
    rows = [json.loads(l) for l in (ev / "questions.jsonl").read_text().splitlines() if l.strip()]
    acc = defaultdict(lambda: [0, 0])
    sample, wrong = [], []
    for i, r in enumerate(rows):
        prompt, ids, gen, text, gap = answer(model, proc, ev / r["image"], r["question"], not args.no_suffix)
        ok = text.strip().lower() in [a.lower() for a in r["answers"]]
        keys = ["all", r["type"]] + (["multi:all", "multi:" + r["type"]] if r["n_objects"] > 1 else [])
        for k in keys:
            acc[k][0] += int(ok)
            acc[k][1] += 1
        if not ok:
            wrong.append({"id": r["id"], "question": r["question"], "answers": r["answers"], "got": text})
        if i % args.stride == 0:
            sample.append({"id": r["id"], "image": r["image"], "question": r["question"], "prompt": prompt,
                           "input_ids": ids, "generated_ids": gen, "generated_text": text,
                           "min_top2_gap": round(gap, 6), "correct": ok})
    res = {k: {"correct": v[0], "n": v[1], "accuracy": round(v[0] / v[1], 4)} for k, v in sorted(acc.items())}
    for k, v in res.items():
        print(f"{k:18s} {v['accuracy']:.4f} ({v['correct']}/{v['n']})")
    if args.results:
        mf.dump_json({"model": args.model, "eval": args.eval, "suffix": "" if args.no_suffix else SUFFIX, "max_new_tokens": MAX_NEW,
                      "versions": mf.versions(), "accuracy": res, "wrong": wrong}, Path(args.results))
    if args.expected:
        mf.dump_json({
            "generator": "python tools/demo_world/evaluate.py --model assets/demo/model --eval "
                         "assets/demo_world/eval --expected tests/fixtures/demo_world/expected.json",
            "model": args.model, "eval": args.eval, "max_new_tokens": MAX_NEW, "suffix": "" if args.no_suffix else SUFFIX,
            "oracle": "transformers LlavaForConditionalGeneration.from_pretrained (f16 file, f32 compute, eager), "
                      "CLIPImageProcessorPil, greedy generate",
            "versions": mf.versions(), "cases": sample}, Path(args.expected))


if __name__ == "__main__":
    main()
