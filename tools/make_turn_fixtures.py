#!/usr/bin/env python3
"""Oracle for conversations through transformers' model: multi-turn prompts and several images on
the tiny fixture model, each run by `LlavaForConditionalGeneration` (f32, eager) — greedy ids, the
logits of every step, and the exact (Chefer) relevancy of every generated token over every image's
patches, image after image. `tools/make_chat_fixtures.py` checks the template and the ids alone
(no torch); this one checks what the model computes on those ids.

    target/torchenv/bin/python tools/make_turn_fixtures.py      # tools/torch-cpu-env.sh makes it

Writes tests/fixtures/turns/ (expected.safetensors, second.png; deterministic: a second run
writes the same bytes). The model and the first image are tests/fixtures/tiny's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (the oracle's greedy, teacher forcing and relevancy)
from make_chat_fixtures import LLAVA_15_TEMPLATE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/tiny"
OUT = ROOT / "tests/fixtures/turns"
CMD = "python tools/make_turn_fixtures.py"

# Greedy steps per case (the tiny model's context is 256 positions).
T_NEW = 6


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(name: str) -> dict:
    # As a client sends it; the Rust test resolves the name in this fixture's folders.
    return {"type": "image_url", "image_url": {"url": name}}


CASES = [
    (
        "history",
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [image("image.png"), text("Which shape is red?")]},
            {"role": "assistant", "content": "The cross"},
            {"role": "user", "content": "Where is it?"},
        ],
    ),
    (
        "two_images",
        [{"role": "user", "content": [image("image.png"), image("second.png"),
                                      text("What differs between them?")]}],
    ),
    (
        "images_in_two_turns",
        [
            {"role": "user", "content": [image("second.png"), text("What is here?")]},
            {"role": "assistant", "content": "A star."},
            {"role": "user", "content": [text("And here?"), image("image.png")]},
        ],
    ),
]


def template_messages(messages):
    """OpenAI messages as the chat template reads them: content as parts, images as `image`."""
    out = []
    for m in messages:
        c = m["content"]
        parts = [text(c)] if isinstance(c, str) else [
            {"type": "image"} if p["type"] == "image_url" else p for p in c]
        out.append({"role": m["role"], "content": parts})
    return out


def image_files(messages):
    """The image names in the template's order: message by message, images before text."""
    return [p["image_url"]["url"] for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image_url"]


def second_image(first: Path, out: Path):
    """A different picture of the same size: the first mirrored, its channels rotated."""
    im = ImageOps.mirror(Image.open(first).convert("RGB"))
    r, g, b = im.split()
    mf.save_image(Image.merge("RGB", (b, r, g)), out)


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    second_image(MODEL / "image.png", OUT / "second.png")
    paths = {"image.png": MODEL / "image.png", "second.png": OUT / "second.png"}
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(
        str(MODEL), torch_dtype=torch.float32, attn_implementation="eager").eval()
    proc = LlavaProcessor.from_pretrained(str(MODEL))
    cfg = model.config
    image_token, eos, pad = cfg.image_token_index, cfg.text_config.eos_token_id, cfg.pad_token_id
    mf.T_NEW = T_NEW
    tensors, meta_cases = {}, []
    for name, messages in CASES:
        rendered = proc.apply_chat_template(template_messages(messages), chat_template=LLAVA_15_TEMPLATE,
                                            add_generation_prompt=True, tokenize=False)
        files = image_files(messages)
        images = [Image.open(paths[f]).convert("RGB") for f in files]
        inputs = proc(text=rendered, images=images, return_tensors="pt")
        ids, pv = inputs["input_ids"], inputs["pixel_values"].float()
        assert pv.shape[0] == len(files), pv.shape
        gen, gen_logits = mf.greedy(model, ids, pv, eos, pad)
        n = ids.shape[1]
        full = torch.cat([ids, gen[None]], dim=1)
        out, _ = mf.teacher_forced(model, full, pv)
        logits = out.logits[0, n - 1: n - 1 + len(gen)].float()
        assert torch.equal(logits.argmax(-1), gen), f"{name}: teacher-forced argmax != generated ids"
        gap = min(mf.top2_gap(logits), mf.top2_gap(gen_logits))
        # Ids are compared exactly: every step's winner must be clear of the runner-up.
        assert gap > 1e-3, f"{name}: top-2 gap {gap:.2e} too small for an exact-ids check"
        image_pos = (ids[0] == image_token).nonzero()[:, 0]
        assert len(image_pos) == len(files) * mf.n_patches(dict(image_size=cfg.vision_config.image_size,
                                                                  patch_size=cfg.vision_config.patch_size))
        rel = mf.relevancy_rows(model, full, pv, gen, n, image_pos)[0]
        assert all(float(r.max()) > 0 for r in rel), f"{name}: an all-zero map"
        tensors[f"{name}.input_ids"] = ids[0].to(torch.int64)
        tensors[f"{name}.pixel_values"] = pv.contiguous()
        tensors[f"{name}.generated_ids"] = gen.to(torch.int64)
        tensors[f"{name}.logits"] = logits.contiguous()
        tensors[f"{name}.relevancy"] = rel.contiguous()
        meta_cases.append({"name": name, "messages": messages, "rendered": rendered,
                           "top2_gap": round(gap, 6), "prompt_len": n})
        print(f"{name}: {n} prompt positions, {len(files)} image(s), ids {gen.tolist()}, gap {gap:.3g}")
    meta = {"generated_by": CMD, "model": "tests/fixtures/tiny", "cases": json.dumps(meta_cases),
            **{k: str(v) for k, v in mf.versions().items()}}
    mf.save_st(tensors, OUT / "expected.safetensors", metadata=meta)
    print(f"wrote {(OUT / 'expected.safetensors').relative_to(ROOT)}")


if __name__ == "__main__":
    np.random.seed(0)
    main()
