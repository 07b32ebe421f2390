#!/usr/bin/env python3
"""Train the fastrm demo model: a tiny LLaVA-1.5 (real transformers LlavaForConditionalGeneration: CLIP
vision tower, GELU projector, Llama decoder) on demo-world questions. Seeded, fixed step counts.

    nice -n 10 /work/pyenv/bin/python tools/demo_world/train.py --out assets/demo/model \
        --log tools/demo_world/train_log.txt

Stages (see tools/demo_world/README.md):
  A. vision tower alone, per-patch shape, colour (and row/column) classification from the object masks
     (linear heads on the `vision_feature_layer` output, i.e. exactly the features the projector sees);
  B. whole model, LM loss on the answers of 6-8 packed question turns per image + the patch losses as
     auxiliary terms (on the tower and on the projector's output); the vision tower frozen for the first
     steps, then at a low learning rate; optionally supervised attention (decoder heads onto the target
     object's patches, a first-layer head onto the question's colour/shape words).
Validation: held-out scenes (seeds < 10^6; training scenes use seeds >= 10^6), single-question prompts,
with the distill suffix; exact match of the greedy answer (teacher-forced argmax of every answer token and the EOS: equal to greedy
generation's exact match).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import world  # noqa: E402
import make_fixtures as mf  # noqa: E402

PATCH_SHAPE_WEIGHT = 1.0  # set from --patch-shape
POS_WEIGHT = 0.0  # set from --pos-aux
PROJ_POS = False  # set from --proj-pos
SUFFIX = " Answer the question using up to two words."  # = src/distill SUFFIX (the engine's distill default)
TRAIN_SEED0 = 1_000_000  # training scenes: seeds >= this; evaluation / validation scenes: below

SPEC = dict(
    image_size=112, patch_size=14, v_hidden=96, v_heads=3, v_inter=384, v_layers=4,
    t_hidden=128, t_heads=4, t_kv=4, t_inter=384, t_layers=3, max_pos=512,
)


# ---------------------------------------------------------------------------------------------------
# Tokenizer: the fixture tool's byte-fallback BPE layout, trained on the demo world's texts
# ---------------------------------------------------------------------------------------------------

def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    lines = world.corpus_lines() + ["USER: ASSISTANT:" + SUFFIX]
    lines = [l for l in lines] * 3
    tr = Tokenizer(models.BPE(unk_token="<unk>"))
    tr.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  min_frequency=2)
    tr.train_from_iterator(lines, trainer=trainer)
    tj = json.loads(tr.to_str())
    trained_vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in tj["model"]["merges"]]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for t in mf.BYTE_TOKENS:
        vocab[t] = len(vocab)
    for t, _ in trained_vocab:
        if t not in vocab:
            vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]])
    return tok


class Text:
    def __init__(self, tok):
        self.tok = tok
        self.image = tok.token_to_id("<image>")
        self.pad = tok.token_to_id("<pad>")
        self.eos = tok.token_to_id("</s>")
        self.bos = tok.token_to_id("<s>")
        self.n_patches = (SPEC["image_size"] // SPEC["patch_size"]) ** 2
        self.cache = {}
        # the tokens that name an object in a question: colour and shape words, alone or fused with the "?"
        # ("▁star?" is one token), i.e. what the lookup of the question's object must be keyed on
        vocab = tok.get_vocab()
        self.key_words = {vocab[f"▁{w}{end}"] for w in world.SHAPES + world.COLOR_NAMES for end in ("", "?")
                          if f"▁{w}{end}" in vocab}

    def enc(self, s, bos=False):
        key = (s, bos)
        if key not in self.cache:
            self.cache[key] = self.tok.encode(s, add_special_tokens=bos).ids
        return self.cache[key]

    def first_turn(self, q, suffix=True):
        ids = self.enc(mf.prompt_for(q + (SUFFIX if suffix else "")), bos=True)
        out = []
        for t in ids:
            out += [t] * self.n_patches if t == self.image else [t]
        return out

    def later_turn(self, q, suffix=True):
        return self.enc(f"USER: {q}{SUFFIX if suffix else ''} ASSISTANT:")

    def answer(self, a):
        return self.enc(a) + [self.eos]


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

MEAN = torch.tensor(mf.CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(mf.CLIP_STD).view(3, 1, 1)


def pixels(img):
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (a - MEAN) / STD


def scene_batch(seeds):
    scenes = [world.make_scene(int(s)) for s in seeds]
    pv = torch.stack([pixels(s.image) for s in scenes])
    labs = [world.patch_labels(s, SPEC["patch_size"]) for s in scenes]
    col = torch.from_numpy(np.stack([l[1].reshape(-1) for l in labs]))
    pshp = torch.from_numpy(np.stack([l[0].reshape(-1) for l in labs]))
    pshp[pshp == len(world.SHAPES)] = -100  # background patches: no shape label
    # object-level shape targets: coverage-weighted mean of the object's patch features -> shape class
    g2 = col.shape[1]
    w = torch.zeros(len(scenes), 4, g2)
    ys = torch.full((len(scenes), 4), -100, dtype=torch.long)
    for i, s in enumerate(scenes):
        cov, sid = world.object_coverage(s, SPEC["patch_size"])
        for j in range(len(sid)):
            w[i, j] = torch.from_numpy(cov[j] / max(cov[j].sum(), 1e-6)).float()
            ys[i, j] = int(sid[j])
    return scenes, pv, (w, ys, pshp), col


def packed_batch(text, scenes, rng, turns=(6, 8), with_targets=False):
    seqs, labs, targets, copies, reads = [], [], [], [], []
    for b, sc in enumerate(scenes):
        cov = world.object_coverage(sc, SPEC["patch_size"])[0] if with_targets else None
        k = int(rng.integers(turns[0], turns[1] + 1))
        qs = world.questions_for(sc, k, rng)
        ids, lab = [], []
        for j, q in enumerate(qs):
            # half of the turns carry the distill suffix, half are the bare question (the README's command)
            sfx = bool(rng.random() < 0.5)
            p = text.first_turn(q["question"], sfx) if j == 0 else text.later_turn(q["question"], sfx)
            a = text.answer(q["answer"])
            if with_targets and q["target"]:
                c = cov[q["target"]].sum(axis=0)
                tm = c >= 0.12
                if not tm.any():
                    tm = c == c.max()
                # the position that predicts the answer's first token: the prompt's last token
                targets.append((b, len(ids) + len(p) - 1, torch.from_numpy(tm.astype(np.float32)), q["type"]))
                if len(q["target"]) == 1:
                    # the target's centroid as (row, column) cells of the patch grid, for --read-aux
                    x, y = world._centroid(sc.objects[q["target"][0]])
                    reads.append((b, len(ids) + len(p) - 1, int(y) // SPEC["patch_size"],
                                  int(x) // SPEC["patch_size"]))
            if with_targets:
                keys = [len(ids) + i for i, t in enumerate(p) if t in text.key_words]
                if keys:
                    copies.append((b, len(ids) + len(p) - 1, keys))
            ids += p + a
            lab += [-100] * len(p) + a
        seqs.append(ids)
        labs.append(lab)
    ids, lab = pad(text, seqs, labs)
    return (ids, lab, targets, copies, reads) if with_targets else (ids, lab)


def pad(text, seqs, labs):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), text.pad, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------

def build(vocab, text, seed):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = mf.hf_config(SPEC, vocab, text.image, text.pad)
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).float()
    heads = torch.nn.ModuleDict({
        "shape": torch.nn.Linear(SPEC["v_hidden"], len(world.SHAPES)),
        "color": torch.nn.Linear(SPEC["v_hidden"], len(world.COLOR_NAMES) + 1),
        "pos": torch.nn.Linear(SPEC["v_hidden"], 2 * (SPEC["image_size"] // SPEC["patch_size"])),
        # the same per-patch labels read from the projector's output, i.e. the image embeddings the decoder
        # sees (see --proj-aux)
        "proj_shape": torch.nn.Linear(SPEC["t_hidden"], len(world.SHAPES)),
        "proj_color": torch.nn.Linear(SPEC["t_hidden"], len(world.COLOR_NAMES) + 1),
        "proj_pos": torch.nn.Linear(SPEC["t_hidden"], 2 * (SPEC["image_size"] // SPEC["patch_size"])),
        "read_pos": torch.nn.Linear(SPEC["t_hidden"], 2 * (SPEC["image_size"] // SPEC["patch_size"])),
    })
    return model, heads


def vision_features(model, pv):
    vt = model.model.vision_tower
    out = vt(pv, output_hidden_states=True)
    return out.hidden_states[-2][:, 1:]  # vision_feature_layer -2, CLS dropped ("default")


def patch_loss(heads, feats, shp, col, prefix=""):
    """Shape: per object, from the coverage-weighted mean of its patches' features (interior patches of
    flat shapes look alike, so a per-patch shape label is mostly unlearnable locally). Colour: per patch,
    background patches (~85%) weighted down."""
    w, ys, pshp = shp
    shape_head, color_head = heads[prefix + "shape"], heads[prefix + "color"]
    pooled = torch.bmm(w, feats)  # [B, 4, D]
    ls = F.cross_entropy(shape_head(pooled).flatten(0, 1), ys.flatten(), ignore_index=-100)
    if PATCH_SHAPE_WEIGHT:
        # each object patch should also carry its object's shape, so the LM can find "the star" by
        # attending to patches (the pooled term alone allows a code spread over the object's patches)
        ls = ls + PATCH_SHAPE_WEIGHT * F.cross_entropy(shape_head(feats).flatten(0, 1), pshp.flatten(),
                                                       ignore_index=-100)
    wc = torch.ones(len(world.COLOR_NAMES) + 1)
    wc[-1] = 0.1
    lc = F.cross_entropy(color_head(feats).flatten(0, 1), col.flatten(), weight=wc)
    if POS_WEIGHT and (PROJ_POS or not prefix):
        # every patch keeps its row and column, so "on the left or right" can be read from the patches the
        # decoder attends to (the position embedding alone can be washed out by the shape/colour features)
        g = SPEC["image_size"] // SPEC["patch_size"]
        lp = heads[prefix + "pos"](feats)  # [B, g*g, 2g]
        idx = torch.arange(g * g)
        lc = lc + POS_WEIGHT * (F.cross_entropy(lp[..., :g].flatten(0, 1), (idx // g).repeat(len(feats)))
                                + F.cross_entropy(lp[..., g:].flatten(0, 1), (idx % g).repeat(len(feats))))
    return ls, lc


def lm_logits(model, ids, feats, text, attentions=False, full=False):
    """The decoder's last hidden state; with `full`, also its attentions (None unless `attentions`), the
    projected image features and every layer's hidden state."""
    emb = model.model.language_model.embed_tokens(ids)
    proj = model.model.multi_modal_projector(feats)
    m = ids == text.image
    emb = emb.masked_scatter(m.unsqueeze(-1), proj.reshape(-1, proj.shape[-1]).to(emb.dtype))
    out = model.model.language_model(inputs_embeds=emb, use_cache=False, output_attentions=attentions,
                                     output_hidden_states=full)
    if full:
        return out.last_hidden_state, out.attentions, proj, out.hidden_states
    return out.last_hidden_state


def attention_loss(attns, ids, targets, text, layer, head, types=None):
    """Supervise one attention head: from the position that predicts an answer, the attention mass on the
    image patches of the question's target object(s) (-log of the mass). Teaches the lookup "find the
    star" directly instead of waiting for the answer loss to discover it."""
    a = attns[layer][:, head]  # [B, T, T]
    img_pos = (ids[0] == text.image).nonzero().flatten()  # the same 64 positions in every row
    losses = []
    for b, pos, tm, qtype in targets:
        if types and qtype not in types:
            continue
        mass = (a[b, pos, img_pos] * tm).sum()
        losses.append(-torch.log(mass + 1e-6))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def copy_loss(attns, copies, layer, head):
    """Supervise one first-layer head: from the position that predicts an answer, the attention mass on the
    current question's colour/shape words. Without it the decoder could not find "the red object": the
    prompt's last token never gathered the colour word (a probe read the named colour from it at ~0.5, its
    first-layer attention on the word was ~1%), so the lookup fell back to shape alone."""
    a = attns[layer][:, head]
    losses = [-torch.log(a[b, pos, keys].sum() + 1e-6) for b, pos, keys in copies]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def parse_att_head(spec):
    """`LAYER:HEAD` or `LAYER:HEAD:TYPE,TYPE...` (only those question types supervise that head)."""
    parts = spec.split(":")
    return int(parts[0]), int(parts[1]), set(parts[2].split(",")) if len(parts) > 2 else None


def answer_loss(model, h, lab):
    # position t predicts token t+1
    tgt = lab[:, 1:]
    sel = tgt != -100
    hs = h[:, :-1][sel]
    logits = model.lm_head(hs)
    return F.cross_entropy(logits, tgt[sel]), (logits.argmax(-1) == tgt[sel]).float().mean()


# ---------------------------------------------------------------------------------------------------
# Validation (single-question prompts, exact match)
# ---------------------------------------------------------------------------------------------------

def val_items(n_scenes, seed0=500_000):
    rng = np.random.default_rng(12345)
    items = []
    for s in range(seed0, seed0 + n_scenes):
        sc = world.make_scene(s)
        for q in world.questions_for(sc, 2, rng, weights=[1, 1, 1, 1, 1]):
            items.append((s, len(sc.objects), q))
    return items


@torch.no_grad()
def validate(model, text, items, bs=64):
    model.eval()
    res = []
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        _, pv, _, _ = scene_batch([c[0] for c in chunk])
        seqs, labs = [], []
        for _, _, q in chunk:
            p = text.first_turn(q["question"])
            a = text.answer(q["answer"])
            seqs.append(p + a)
            labs.append([-100] * len(p) + a)
        ids, lab = pad(text, seqs, labs)
        feats = vision_features(model, pv)
        h = lm_logits(model, ids, feats, text)
        logits = model.lm_head(h[:, :-1])
        tgt = lab[:, 1:]
        ok = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(dim=1)
        res += [bool(x) for x in ok]
    model.train()
    return summarize(items, res)


def summarize(items, res):
    out = {}
    for (s, n, q), r in zip(items, res):
        for key in ("all", q["type"]) + ((f"multi:{q['type']}", "multi:all") if n > 1 else ()):
            a = out.setdefault(key, [0, 0])
            a[0] += int(r)
            a[1] += 1
    return {k: round(v[0] / v[1], 4) for k, v in sorted(out.items())} | {"n": len(items)}


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def lr_at(step, total, peak, warm, floor_frac=0.1):
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", default=None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps-a", type=int, default=800)
    ap.add_argument("--batch-a", type=int, default=32)
    ap.add_argument("--steps-b", type=int, default=900)
    ap.add_argument("--batch-b", type=int, default=16)
    ap.add_argument("--freeze-b", type=int, default=100, help="stage-B steps with the vision tower frozen")
    ap.add_argument("--lr-a", type=float, default=1e-3)
    ap.add_argument("--lr-b", type=float, default=1e-3)
    ap.add_argument("--lr-vision-b", type=float, default=3e-4)
    ap.add_argument("--aux-b", type=float, default=0.5)
    ap.add_argument("--val-scenes", type=int, default=150)
    ap.add_argument("--val-every", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1, help="1 is several times faster than 2 on a busy 2-core box")
    ap.add_argument("--patch-shape", type=float, default=1.0, help="weight of the per-patch shape term")
    ap.add_argument("--proj-aux", type=float, default=0.0,
                    help="weight of the per-patch shape/colour terms on the projector's output (stage B)")
    ap.add_argument("--copy-head", default=None, metavar="LAYER:HEAD",
                    help="with --att-sup: also supervise this head onto the question's colour/shape words")
    ap.add_argument("--read-aux", type=float, default=0.0,
                    help="weight of the target's row/column read from the answer position (with --att-sup)")
    ap.add_argument("--read-layer", type=int, default=2,
                    help="hidden state that --read-aux reads (2 = after the second decoder layer)")
    ap.add_argument("--proj-pos", action="store_true", help="--proj-aux also has the row/column term")
    ap.add_argument("--pos-aux", type=float, default=0.0, help="weight of the per-patch row/column term")
    ap.add_argument("--first-scene", type=int, default=TRAIN_SEED0, help="seed of the first training scene")
    ap.add_argument("--att-sup", type=float, default=0.0,
                    help="weight of the attention supervision (the --att-heads onto the target's patches)")
    ap.add_argument("--att-heads", nargs="+", default=["1:0"], metavar="LAYER:HEAD[:TYPES]",
                    help="decoder heads that --att-sup supervises, each on all question types or on the listed "
                         "ones (comma-separated)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="end stage B after this many steps (the learning-rate schedule still follows --steps-b)")
    ap.add_argument("--init", default=None, help="start from this saved model folder (use with --steps-a 0)")
    ap.add_argument("--turns", type=int, nargs=2, default=[6, 8], help="question turns per image (min max)")
    args = ap.parse_args()
    global PATCH_SHAPE_WEIGHT, POS_WEIGHT, PROJ_POS
    PROJ_POS = args.proj_pos
    PATCH_SHAPE_WEIGHT = args.patch_shape
    POS_WEIGHT = args.pos_aux

    att_heads = [parse_att_head(spec) for spec in args.att_heads]
    torch.set_num_threads(args.threads)
    logf = open(args.log, "w") if args.log else None

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()

    log("command: " + " ".join(sys.argv))
    log("versions: " + json.dumps(mf.versions()))
    tok = build_tokenizer()
    text = Text(tok)
    vocab = int(math.ceil((tok.get_vocab_size() + 16) / 64) * 64)
    log(f"tokenizer {tok.get_vocab_size()} tokens (image {text.image}, pad {text.pad}); model vocab {vocab}")
    for w in world.SHAPES + world.COLOR_NAMES + world.NUMBERS + ["yes", "no", "left", "right", "top", "bottom"]:
        assert len(text.enc(w)) == 1, (w, text.enc(w))
    model, heads = build(vocab, text, args.seed)
    if args.att_sup:
        for sub in (model, model.model.language_model):  # attention probabilities need eager attention
            sub.config._attn_implementation = "eager"
    if args.init:
        # continue from a saved model folder (its f16 weights, computed in f32); the auxiliary heads are not
        # saved, so they start fresh
        from transformers import LlavaForConditionalGeneration

        init = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        missing = model.load_state_dict(init.state_dict(), strict=True)
        log(f"initialised from {args.init}: {missing}")
        if aux_path(args.init).exists():
            heads.load_state_dict(torch.load(aux_path(args.init)), strict=False)
            log(f"auxiliary heads from {aux_path(args.init)}")
    nparam = sum(p.numel() for p in model.parameters())
    log(f"model {nparam/1e6:.2f} M parameters; spec {json.dumps(SPEC)}")
    rng = np.random.default_rng(args.seed)
    val = val_items(args.val_scenes)
    log(f"validation: {len(val)} questions on {args.val_scenes} held-out scenes")
    next_seed = args.first_scene
    assert next_seed >= TRAIN_SEED0

    def seeds(n):
        nonlocal next_seed
        s = list(range(next_seed, next_seed + n))
        next_seed += n
        return s

    # ---- stage A: vision tower on per-patch labels
    vt = model.model.vision_tower
    va_params = list(vt.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(va_params, lr=args.lr_a, weight_decay=0.01)
    t0 = time.time()
    for step in range(args.steps_a):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps_a, args.lr_a, 30)
        _, pv, shp, col = scene_batch(seeds(args.batch_a))
        feats = vision_features(model, pv)
        ls, lc = patch_loss(heads, feats, shp, col)
        loss = ls + lc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(va_params, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps_a - 1:
            with torch.no_grad():
                w, ys, _ = shp
                fo = ys.flatten() != -100
                acc_s = (heads["shape"](torch.bmm(w, feats)).flatten(0, 1).argmax(-1) == ys.flatten())[fo].float().mean()
                fg = col.flatten() != len(world.COLOR_NAMES)
                acc_c = (heads["color"](feats).flatten(0, 1).argmax(-1) == col.flatten())[fg].float().mean()
                ps = shp[2].flatten()
                acc_p = (heads["shape"](feats).flatten(0, 1).argmax(-1) == ps)[ps != -100].float().mean()
            log(f"A {step:5d} loss shape {ls.item():.4f} color {lc.item():.4f} | object acc shape "
                f"{acc_s:.3f} | object-patch acc shape {acc_p:.3f} color {acc_c:.3f} | "
                f"{(time.time()-t0)/(step+1):.2f} s/step")
    if args.steps_a and not args.steps_b:
        save(model, heads, tok, vocab, text, Path(args.out), log)

    # ---- stage B: whole model
    lm_params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    proj_heads = [p for n, p in heads.named_parameters() if n.startswith(("proj_", "read_"))]
    vision_heads = [p for n, p in heads.named_parameters() if not n.startswith(("proj_", "read_"))]
    opt = torch.optim.AdamW([
        {"params": lm_params + proj_heads, "lr": args.lr_b, "weight_decay": 0.01},
        {"params": list(vt.parameters()) + vision_heads, "lr": 0.0, "weight_decay": 0.01},
    ])
    t0 = time.time()
    best = None
    for step in range(args.steps_b):
        frozen = step < args.freeze_b
        opt.param_groups[0]["lr"] = lr_at(step, args.steps_b, args.lr_b, 60)
        opt.param_groups[1]["lr"] = 0.0 if frozen else lr_at(step - args.freeze_b, args.steps_b - args.freeze_b,
                                                              args.lr_vision_b, 50)
        scenes, pv, shp, col = scene_batch(seeds(args.batch_b))
        if args.att_sup:
            ids, lab, targets, copies, reads = packed_batch(text, scenes, rng, tuple(args.turns), with_targets=True)
        else:
            ids, lab = packed_batch(text, scenes, rng, tuple(args.turns))
        if frozen:
            with torch.no_grad():
                feats = vision_features(model, pv)
            aux = torch.zeros(())
        else:
            feats = vision_features(model, pv)
            ls, lc = patch_loss(heads, feats, shp, col)
            aux = ls + lc
        h, attns, proj, hs = lm_logits(model, ids, feats, text, attentions=bool(args.att_sup), full=True)
        if args.att_sup:
            att = sum(attention_loss(attns, ids, targets, text, *lh) for lh in att_heads) / len(att_heads)
            if args.copy_head:
                att = att + copy_loss(attns, copies, *[int(x) for x in args.copy_head.split(":")])
        else:
            att = torch.zeros(())
        if args.proj_aux:
            # without this term the projector let colour fade (a linear probe read 0.83 from its output and
            # 0.40 from the supervised head's values, against 0.997 from the tower) and the decoder answered
            # one colour for every question, its attention on the right object notwithstanding
            pls, plc = patch_loss(heads, proj, shp, col, prefix="proj_")
            paux = pls + plc
        else:
            paux = torch.zeros(())
        if args.read_aux and args.att_sup and reads:
            # the answer position, after the supervised layer, must know where the target is: the lookup's
            # values have to carry the patches' row and column, not only their colour and shape
            b_i, p_i, r_i, c_i = (torch.tensor(v) for v in zip(*reads))
            lp = heads["read_pos"](hs[args.read_layer][b_i, p_i])
            g = SPEC["image_size"] // SPEC["patch_size"]
            raux = F.cross_entropy(lp[:, :g], r_i) + F.cross_entropy(lp[:, g:], c_i)
        else:
            raux = torch.zeros(())
        lml, tacc = answer_loss(model, h, lab)
        loss = lml + args.aux_b * aux + args.proj_aux * paux + args.att_sup * att + args.read_aux * raux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps_b - 1:
            log(f"B {step:5d} lm {lml.item():.4f} aux {float(aux.detach()):.4f} proj-aux {float(paux.detach()):.4f} att {float(att.detach()):.4f} read {float(raux.detach()):.4f} answer-token acc {tacc:.3f} | "
                f"{(time.time()-t0)/(step+1):.2f} s/step")
        if (step + 1) % args.val_every == 0 or step == args.steps_b - 1:
            v = validate(model, text, val)
            log(f"B {step:5d} VAL {json.dumps(v)}")
            save(model, heads, tok, vocab, text, Path(args.out), log)  # each validation: a usable checkpoint
        if args.stop_after and step + 1 >= args.stop_after:
            v = validate(model, text, val)
            log(f"B {step:5d} VAL {json.dumps(v)} (stopping: --stop-after {args.stop_after})")
            save(model, heads, tok, vocab, text, Path(args.out), log)
            break
    log("done")


def aux_path(model_dir) -> Path:
    """The auxiliary heads live beside the model folder, not in it: they are training state, not model."""
    return Path(str(model_dir).rstrip("/") + ".aux.pt")


def save(model, heads, tok, vocab, text, out: Path, log):
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    sd = mf.t5_state_dict(model)
    mf.write_model_dir(out, sd, "hub", torch.float16,
                       mf.hub4_config_dict(SPEC, vocab, text.image, text.pad, "float16"), SPEC, tok)
    torch.save(heads.state_dict(), aux_path(out))
    log(f"saved {out} (f16, hub names): {sum((out / f).stat().st_size for f in os.listdir(out))} bytes")


if __name__ == "__main__":
    main()
