"""Tests of the demo-world generator (standard library unittest; run from the repository root):

    /work/pyenv/bin/python -m unittest discover -s tools/demo_world -p 'test_*.py' -v
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_eval  # noqa: E402
import world  # noqa: E402

ROOT = HERE.parent.parent


def digest(scene):
    h = hashlib.sha256(np.asarray(scene.image).tobytes())
    for o in scene.objects:
        h.update(np.packbits(o.mask).tobytes())
        h.update(json.dumps(o.describe(), sort_keys=True).encode())
    return h.hexdigest()


class Determinism(unittest.TestCase):
    def test_same_seed_same_scene(self):
        for seed in (0, 1, 17, 123456, 1_000_003):
            self.assertEqual(digest(world.make_scene(seed)), digest(world.make_scene(seed)), seed)

    def test_different_seeds_differ(self):
        self.assertEqual(len({digest(world.make_scene(s)) for s in range(20)}), 20)

    def test_same_seed_same_questions(self):
        sc = world.make_scene(5)
        a = world.questions_for(sc, 6, np.random.default_rng(3))
        b = world.questions_for(world.make_scene(5), 6, np.random.default_rng(3))
        self.assertEqual(a, b)

    def test_eval_set_files_are_byte_identical(self):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            make_eval.build(Path(a), 12)
            make_eval.build(Path(b), 12)
            fa = sorted(p.relative_to(a) for p in Path(a).rglob("*") if p.is_file())
            fb = sorted(p.relative_to(b) for p in Path(b).rglob("*") if p.is_file())
            self.assertEqual(fa, fb)
            for f in fa:
                self.assertEqual((Path(a) / f).read_bytes(), (Path(b) / f).read_bytes(), f)

    def test_committed_eval_set_reproduces(self):
        """The first scenes of the committed set equal what the generator writes today."""
        committed = ROOT / "assets/demo_world/eval"
        if not (committed / "questions.jsonl").is_file():
            self.skipTest("no committed evaluation set")
        n = 10
        with tempfile.TemporaryDirectory() as d:
            rows = make_eval.build(Path(d), n)
            want = [json.loads(l) for l in (committed / "questions.jsonl").read_text().splitlines()]
            self.assertEqual(rows, [r for r in want if r["seed"] < n])
            for r in rows:
                for rel in [r["image"]] + ([r["target_mask"]] if r["target_mask"] else []):
                    self.assertEqual((Path(d) / rel).read_bytes(), (committed / rel).read_bytes(), rel)


class Masks(unittest.TestCase):
    def test_masks_match_drawn_objects(self):
        for seed in range(200):
            sc = world.make_scene(seed)
            img = np.asarray(sc.image)
            self.assertTrue(1 <= len(sc.objects) <= 4)
            union = np.zeros(img.shape[:2], dtype=bool)
            for o in sc.objects:
                self.assertGreater(o.mask.sum(), 50, (seed, o))
                # every mask pixel has exactly the object's colour
                self.assertTrue((img[o.mask] == world.COLORS[o.color]).all(), (seed, o.shape))
                # objects never overlap
                self.assertFalse((union & o.mask).any(), seed)
                union |= o.mask
                # the mask is where the shape was drawn: its centroid is near the object's centre
                ys, xs = np.nonzero(o.mask)
                self.assertLess(abs(xs.mean() - o.cx) + abs(ys.mean() - o.cy), o.r * 0.8, (seed, o.shape))
            # outside the masks no pixel is an object colour (the background is greyish and noisy); allow a
            # handful of exact noise collisions
            colors = np.array(list(world.COLORS.values()))
            out = img[~union]
            hits = (out[:, None, :] == colors[None]).all(-1).any(-1).sum()
            self.assertLessEqual(hits, 2, seed)

    def test_distinct_shapes_and_colours(self):
        for seed in range(200):
            sc = world.make_scene(seed)
            self.assertEqual(len({o.shape for o in sc.objects}), len(sc.objects))
            self.assertEqual(len({o.color for o in sc.objects}), len(sc.objects))

    def test_eval_masks_are_target_objects(self):
        with tempfile.TemporaryDirectory() as d:
            rows = make_eval.build(Path(d), 30)
            for r in rows:
                img = np.asarray(Image.open(Path(d) / r["image"]))
                if r["target_mask"] is None:
                    self.assertEqual(r["target"], [])
                    self.assertEqual(r["answers"], ["no"])
                    continue
                m = np.asarray(Image.open(Path(d) / r["target_mask"]))
                self.assertEqual(m.dtype, np.uint8)
                self.assertEqual(m.shape, img.shape[:2])
                self.assertEqual(set(np.unique(m)), {0, 255})
                on = m > 0
                # the masked pixels are exactly the pixels of the target objects' colours
                want = np.zeros_like(on)
                for t in r["target"]:
                    want |= (img == world.COLORS[t["color"]]).all(-1)
                self.assertLessEqual(int((want ^ on).sum()), 2, r["id"])


class Questions(unittest.TestCase):
    def test_answers_are_right(self):
        rng = np.random.default_rng(0)
        for seed in range(100):
            sc = world.make_scene(seed)
            for q in world.questions_for(sc, 8, rng, weights=[1, 1, 1, 1, 1]):
                objs = [sc.objects[i] for i in q["target"]]
                if q["type"] == "color":
                    self.assertEqual(q["answer"], objs[0].color)
                    self.assertIn(objs[0].shape, q["question"])
                elif q["type"] == "shape":
                    self.assertEqual(q["answer"], objs[0].shape)
                    self.assertIn(objs[0].color, q["question"])
                elif q["type"] == "exists":
                    words = q["question"].rstrip("?").split()
                    c, s = words[-2], words[-1]
                    present = any(o.color == c and o.shape == s for o in sc.objects)
                    self.assertEqual(q["answer"], "yes" if present else "no")
                elif q["type"] == "position":
                    ys, xs = np.nonzero(objs[0].mask)
                    v = xs.mean() if "left" in q["question"] else ys.mean()
                    low = "left" if "left" in q["question"] else "top"
                    high = "right" if "left" in q["question"] else "bottom"
                    self.assertEqual(q["answer"], low if v < world.SIZE / 2 else high)
                elif q["type"] == "count":
                    self.assertEqual(q["answer"], world.NUMBERS[len(sc.objects)])
                    self.assertEqual(len(objs), len(sc.objects))


if __name__ == "__main__":
    unittest.main()
