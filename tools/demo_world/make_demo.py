#!/usr/bin/env python3
"""Write the bundled demo image and its README after training (assets/demo/):

    /work/pyenv/bin/python tools/demo_world/make_demo.py

The image is a demo-world scene (seed chosen by a fixed rule: the first seed from 900,000 with three objects,
one of them a large star whose colour is neither white nor green (the backgrounds can be greenish), all away from each other) so that a newcomer can judge
the answer and the heatmap at a glance. The README records what transformers answers (greedy, the bare
question as the README's command asks it, and with the distill suffix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import world  # noqa: E402
import evaluate  # noqa: E402
import make_fixtures as mf  # noqa: E402
from train import SPEC, SUFFIX  # noqa: E402

QUESTION = "What color is the star?"


def pick_seed():
    for seed in range(900_000, 901_000):
        sc = world.make_scene(seed)
        if len(sc.objects) != 3:
            continue
        stars = [o for o in sc.objects if o.shape == "star"]
        if not stars or stars[0].color in ("white", "green") or stars[0].r < 16:
            continue
        return seed, sc
    raise RuntimeError("no demo scene found")


def main():
    import torch

    torch.set_num_threads(1)
    d = ROOT / "assets" / "demo"
    seed, sc = pick_seed()
    sc.image.save(d / "image.png", format="PNG", optimize=False)
    star = next(o for o in sc.objects if o.shape == "star")
    Image.fromarray(star.mask.astype(np.uint8) * 255, "L").save(d / "image_star_mask.png", format="PNG",
                                                                  optimize=False)
    old = d / "image.jpg"
    if old.exists():
        old.unlink()
    model, proc = evaluate.load(d / "model")
    n_params = sum(p.numel() for p in model.parameters())
    res = {}
    for name, sfx in (("bare", False), ("suffix", True)):
        prompt, ids, gen, text, gap = evaluate.answer(model, proc, d / "image.png", QUESTION, sfx)
        res[name] = dict(prompt=prompt, generated_ids=gen, text=text, min_top2_gap=round(gap, 4))
    results = json.loads((HERE / "eval_results.json").read_text())
    acc = results["accuracy"]
    objs = ", ".join(f"a {o.color} {o.shape}" for o in sc.objects)
    rows = "\n".join(f"| {k} | {v['accuracy']:.3f} | {v['correct']}/{v['n']} |" for k, v in acc.items())
    readme = f"""# Demo model and image

`model/` is a tiny LLaVA-1.5 (a real transformers `LlavaForConditionalGeneration`: CLIP vision tower,
GELU projector, Llama decoder; {n_params / 1e6:.2f} M parameters) **trained** on the demo world
(`tools/demo_world/`: procedural scenes of 1-4 coloured shapes on textured, noisy backgrounds, with one-word
questions about colour, shape, existence, position and count). It is stored in the llava-hf checkpoint layout
(config.json in the transformers-4.x hub style, `model.safetensors` with hub tensor names, f16, tokenizer and
processor files) and loads in the engine exactly like any llava-hf checkpoint.

Shapes: CLIP tower at {SPEC['image_size']} px with patch {SPEC['patch_size']} (an 8x8 map of 64 patches), width
{SPEC['v_hidden']}, {SPEC['v_layers']} layers (the features are taken after layer {SPEC['v_layers'] - 1}, as LLaVA's
`vision_feature_layer = -2`); Llama decoder width {SPEC['t_hidden']}, {SPEC['t_layers']} layers, {SPEC['t_heads']} heads;
a {len(proc.tokenizer)}-token byte-fallback BPE tokenizer laid out like Llama's.
How it was trained, and its accuracy per question type: `tools/demo_world/README.md`.

`image.png`: demo-world scene seed {seed} ({objs}), {world.SIZE}x{world.SIZE}. `image_star_mask.png`: the
star's pixels (the answer's target), to compare the heatmap with.

Question: `{QUESTION}` (the README's first command). With transformers (f32 compute on these f16 weights,
greedy) the model answers:

- bare question, prompt `{res['bare']['prompt']!r}`: ids `{res['bare']['generated_ids']}`, text `{res['bare']['text']!r}`
- with the distill suffix (`{SUFFIX.strip()}`): ids `{res['suffix']['generated_ids']}`, text `{res['suffix']['text']!r}`

The right answer is `{star.color}`.

Accuracy on the committed evaluation set (`assets/demo_world/eval`, exact match, with the suffix):

| question type | accuracy | correct |
| --- | --- | --- |
{rows}
"""
    (d / "README.md").write_text(readme)
    print(readme)


if __name__ == "__main__":
    main()
