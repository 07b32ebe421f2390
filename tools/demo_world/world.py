"""Seeded procedural scenes for the fastrm demo model: 1-4 flat-coloured shapes on a textured, noisy
background, a pixel mask per object, and one-word-answer questions that name their target object(s).

Everything is a pure function of the seed (numpy PCG64 + Pillow drawing without anti-aliasing), so a seed
gives byte-identical images, masks and questions on any machine with the pinned Pillow / numpy.

Objects in one scene have distinct shapes and distinct colours, and never overlap (their bounding circles
are kept apart), so "the star" / "the red object" always names exactly one object and each object's mask is
exactly the set of pixels drawn in its colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 112  # scene side in pixels (the model's CLIP input size: no resize in preprocessing)

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
COLORS = {
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
COLOR_NAMES = list(COLORS)
NUMBERS = ["zero", "one", "two", "three", "four"]
QTYPES = ["color", "shape", "exists", "position", "count"]

MIN_R, MAX_R = 10, 20  # object "radius" (half the bounding box side) in pixels
MAX_TILT = 0.2  # shapes are drawn upright, tilted by at most this many radians


@dataclass
class Obj:
    shape: str
    color: str
    cx: float
    cy: float
    r: float
    angle: float
    mask: np.ndarray = field(repr=False)  # bool [SIZE, SIZE], pixels of this object

    def describe(self):
        return {"shape": self.shape, "color": self.color, "cx": round(self.cx, 2), "cy": round(self.cy, 2),
                "r": round(self.r, 2), "angle": round(self.angle, 4), "area": int(self.mask.sum())}


@dataclass
class Scene:
    seed: int
    image: Image.Image
    objects: list


def _polygon(shape, cx, cy, r, angle):
    def rot(pts):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]

    if shape == "square":
        s = r * 0.85
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "diamond":
        return rot([(0, -r), (r * 0.65, 0), (0, r), (-r * 0.65, 0)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    if shape == "cross":
        a, b = r, r * 0.33
        return rot([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                    (-a, -b), (-b, -b)])
    raise ValueError(shape)


def _shape_mask(shape, cx, cy, r, angle):
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(m) > 0


def _background(rng):
    """Low-saturation textured background: a random gradient, one of several textures, pixel noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / SIZE
    base = rng.uniform(40, 140, size=3)
    tint = rng.uniform(-1, 1, size=3) * 15  # keep it greyish so object colours stay unambiguous
    g = rng.uniform(-40, 40) * (xx - 0.5) + rng.uniform(-40, 40) * (yy - 0.5)
    kind = int(rng.integers(0, 4))
    if kind == 0:  # stripes
        f = rng.uniform(3, 10)
        th = rng.uniform(0, math.pi)
        t = 18 * np.sign(np.sin(2 * math.pi * f * (xx * math.cos(th) + yy * math.sin(th))))
    elif kind == 1:  # checker
        f = int(rng.integers(3, 9))
        t = 14 * (((np.floor(xx * f) + np.floor(yy * f)) % 2) * 2 - 1)
    elif kind == 2:  # blobs: upsampled coarse noise
        c = rng.normal(0, 20, size=(7, 7))
        t = np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((SIZE, SIZE), Image.Resampling.BILINEAR),
                       dtype=np.float64)
    else:  # plain
        t = np.zeros((SIZE, SIZE))
    img = base[None, None, :] + tint[None, None, :] + (g + t)[:, :, None]
    img = img + rng.normal(0, rng.uniform(3, 12), size=(SIZE, SIZE, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_scene(seed: int, n_objects: int | None = None) -> Scene:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5)) if n_objects is None else n_objects
    shapes = list(rng.choice(SHAPES, size=n, replace=False))
    colors = list(rng.choice(COLOR_NAMES, size=n, replace=False))
    placed = []
    for i in range(n):
        for _ in range(200):
            r = float(rng.uniform(MIN_R, MAX_R))
            cx = float(rng.uniform(r + 2, SIZE - r - 2))
            cy = float(rng.uniform(r + 2, SIZE - r - 2))
            if all(math.hypot(cx - p[0], cy - p[1]) > r + p[2] + 3 for p in placed):
                break
        else:  # crowded: shrink and retry deterministically
            r = float(MIN_R)
            cx, cy = float(rng.uniform(r + 2, SIZE - r - 2)), float(rng.uniform(r + 2, SIZE - r - 2))
            if not all(math.hypot(cx - p[0], cy - p[1]) > r + p[2] + 3 for p in placed):
                continue  # give up on this object
        placed.append((cx, cy, r, str(shapes[i]), str(colors[i]), float(rng.uniform(-MAX_TILT, MAX_TILT))))
    img = _background(rng)
    objs = []
    for cx, cy, r, shape, color, angle in placed:
        if shape in ("circle",):
            angle = 0.0
        m = _shape_mask(shape, cx, cy, r, angle)
        img[m] = COLORS[color]
        objs.append(Obj(shape, color, cx, cy, r, angle, m))
    return Scene(seed, Image.fromarray(img, "RGB"), objs)


def patch_labels(scene: Scene, patch: int = 14, min_frac: float = 0.12):
    """Per-patch (shape, colour) class ids from the masks: the object covering most of the patch if it covers
    at least `min_frac` of it, else background (id len(SHAPES) / len(COLORS))."""
    g = SIZE // patch
    shp = np.full((g, g), len(SHAPES), dtype=np.int64)
    col = np.full((g, g), len(COLOR_NAMES), dtype=np.int64)
    best = np.zeros((g, g))
    for o in scene.objects:
        cov = o.mask[: g * patch, : g * patch].reshape(g, patch, g, patch).mean(axis=(1, 3))
        take = (cov >= min_frac) & (cov > best)
        shp[take] = SHAPES.index(o.shape)
        col[take] = COLOR_NAMES.index(o.color)
        best = np.where(take, cov, best)
    return shp, col


def object_coverage(scene: Scene, patch: int = 14):
    """[n_objects, g*g] fraction of each patch covered by each object, and the objects' shape ids."""
    g = SIZE // patch
    cov = np.stack([o.mask[: g * patch, : g * patch].reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1)
                    for o in scene.objects]) if scene.objects else np.zeros((0, g * g))
    return cov, np.array([SHAPES.index(o.shape) for o in scene.objects], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------------

POS_MARGIN = 10  # an object's centroid must be this far from the middle for a left/right/top/bottom question


def _centroid(o):
    ys, xs = np.nonzero(o.mask)
    return float(xs.mean()), float(ys.mean())


def question(scene: Scene, qtype: str, rng: np.random.Generator):
    """One question of `qtype` about the scene, or None when the scene cannot support it.
    Returns dict(question, answer, type, target=[object indices])."""
    objs = scene.objects
    if not objs:
        return None
    if qtype == "color":
        i = int(rng.integers(len(objs)))
        return dict(question=f"What color is the {objs[i].shape}?", answer=objs[i].color, type=qtype, target=[i])
    if qtype == "shape":
        i = int(rng.integers(len(objs)))
        return dict(question=f"What shape is the {objs[i].color} object?", answer=objs[i].shape, type=qtype,
                    target=[i])
    if qtype == "exists":
        if rng.random() < 0.5:
            i = int(rng.integers(len(objs)))
            return dict(question=f"Is there a {objs[i].color} {objs[i].shape}?", answer="yes", type=qtype,
                        target=[i])
        present = {(o.color, o.shape) for o in objs}
        # hard negatives: keep one attribute of a present object, change the other
        o = objs[int(rng.integers(len(objs)))]
        for _ in range(50):
            if rng.random() < 0.5:
                c, s = o.color, str(rng.choice(SHAPES))
            else:
                c, s = str(rng.choice(COLOR_NAMES)), o.shape
            if (c, s) not in present:
                return dict(question=f"Is there a {c} {s}?", answer="no", type=qtype, target=[])
        return None
    if qtype == "position":
        order = list(rng.permutation(len(objs)))
        axis = "x" if rng.random() < 0.5 else "y"
        for i in order:
            cx, cy = _centroid(objs[i])
            v = cx if axis == "x" else cy
            if abs(v - SIZE / 2) < POS_MARGIN:
                continue
            o = objs[i]
            if axis == "x":
                q = f"Is the {o.color} {o.shape} on the left or right?"
                a = "left" if v < SIZE / 2 else "right"
            else:
                q = f"Is the {o.color} {o.shape} at the top or bottom?"
                a = "top" if v < SIZE / 2 else "bottom"
            return dict(question=q, answer=a, type=qtype, target=[int(i)])
        return None
    if qtype == "count":
        return dict(question="How many shapes are there?", answer=NUMBERS[len(objs)], type=qtype,
                    target=list(range(len(objs))))
    raise ValueError(qtype)


def questions_for(scene: Scene, k: int, rng: np.random.Generator, weights=None):
    """k distinct questions about a scene, types drawn with `weights` (default: colour and shape twice as
    often as the others)."""
    w = np.array(weights if weights is not None else [2, 2, 1, 1, 1], dtype=np.float64)
    w = w / w.sum()
    out, seen = [], set()
    for _ in range(k * 6):
        if len(out) == k:
            break
        q = question(scene, QTYPES[int(rng.choice(len(QTYPES), p=w))], rng)
        if q is None or q["question"] in seen:
            continue
        seen.add(q["question"])
        out.append(q)
    return out


def target_mask(scene: Scene, target):
    m = np.zeros((SIZE, SIZE), dtype=bool)
    for i in target:
        m |= scene.objects[i].mask
    return m


def corpus_lines():
    """Every question and answer the generator can produce (for the tokenizer)."""
    lines = []
    for s in SHAPES:
        lines.append(f"What color is the {s}?")
        for c in COLOR_NAMES:
            lines.append(f"Is there a {c} {s}?")
            lines.append(f"Is the {c} {s} on the left or right?")
            lines.append(f"Is the {c} {s} at the top or bottom?")
    for c in COLOR_NAMES:
        lines.append(f"What shape is the {c} object?")
    lines.append("How many shapes are there?")
    lines += SHAPES + COLOR_NAMES + NUMBERS + ["yes", "no", "left", "right", "top", "bottom"]
    return lines
