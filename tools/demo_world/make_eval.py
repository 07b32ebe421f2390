#!/usr/bin/env python3
"""Write the demo-world evaluation set (deterministic for its seeds):

    /work/pyenv/bin/python tools/demo_world/make_eval.py --out assets/demo_world/eval

Scenes use seeds 0 .. n-1 (training uses seeds >= 1,000,000, in-training validation 500,000+), three questions
per scene with the question types cycled so every type gets the same share. Files:
  scenes/NNNNN.png        the scene (112x112 RGB)
  masks/NNNNN_qK.png      8-bit greyscale, 255 on the question's target object(s) (union), 0 elsewhere
  questions.jsonl         {"image", "question", "answers", "type", "target_mask", "n_objects", + extras}
  scenes.jsonl            per scene: seed, image, objects (shape, colour, centre, radius, angle, area)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402


def build(out: Path, n_scenes: int, per_scene: int = 3, seed0: int = 0):
    if out.exists():
        for sub in ("scenes", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows, scenes = [], []
    k = 0
    for i in range(n_scenes):
        seed = seed0 + i
        sc = world.make_scene(seed)
        rng = np.random.default_rng([seed, 7])
        name = f"{seed:05d}"
        sc.image.save(out / "scenes" / f"{name}.png", format="PNG", optimize=False)
        scenes.append({"seed": seed, "image": f"scenes/{name}.png", "objects": [o.describe() for o in sc.objects]})
        asked = set()
        for j in range(per_scene):
            q = None
            for t in range(len(world.QTYPES)):
                qtype = world.QTYPES[(k + t) % len(world.QTYPES)]
                q = world.question(sc, qtype, rng)
                if q is not None and q["question"] not in asked:
                    break
                q = None
            k += 1
            if q is None:
                continue
            asked.add(q["question"])
            mask_rel = None
            if q["target"]:
                m = world.target_mask(sc, q["target"])
                mask_rel = f"masks/{name}_q{j}.png"
                Image.fromarray(m.astype(np.uint8) * 255, "L").save(out / mask_rel, format="PNG", optimize=False)
            rows.append({
                "image": f"scenes/{name}.png", "question": q["question"], "answers": [q["answer"]],
                "type": q["type"], "target_mask": mask_rel, "n_objects": len(sc.objects),
                "id": f"{name}_q{j}", "seed": seed,
                "target": [{"shape": sc.objects[t].shape, "color": sc.objects[t].color} for t in q["target"]],
            })
    with open(out / "questions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(out / "scenes.jsonl", "w") as f:
        for s in scenes:
            f.write(json.dumps(s) + "\n")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/demo_world/eval")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed0", type=int, default=0,
                    help="first scene seed (the FastRM head's training set uses 2,000,000+: "
                         "disjoint from the model's training, validation and evaluation scenes)")
    args = ap.parse_args()
    rows = build(Path(args.out), args.scenes, seed0=args.seed0)
    from collections import Counter
    print(f"{len(rows)} questions on {args.scenes} scenes: {dict(Counter(r['type'] for r in rows))}; "
          f"multi-object {sum(r['n_objects'] > 1 for r in rows)}")


if __name__ == "__main__":
    main()
