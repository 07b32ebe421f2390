#!/usr/bin/env python3
"""Oracle fixtures for fastrm, made with real HF `transformers` (pinned in tools/requirements.txt).

Regenerate everything (tokenizer, tiny + clip336 fixtures, demo model; ~2 min on 2 cores):

    python tools/make_fixtures.py

Bench transformers f32 eager on the mid-size config (writes tools/bench_transformers.json):

    python tools/make_fixtures.py --bench

Run from the repository root (paths are relative to this file's parent's parent, so any cwd works).
Everything is seeded; a second run rewrites byte-identical files (checked by `--check-determinism`,
which regenerates into a temp dir and compares hashes).

What is written (see tools/README.md for the tensor lists):
  tests/fixtures/tokenizer_cases.json          texts -> ids / decoded text, from the HF tokenizer
  tests/fixtures/tiny/                         model dir (4.x hub-style config, hub tensor names, f32)
      image.png, expected.safetensors
      model-t5-sharded-f16/                    same weights, transformers-5 state-dict names, f16, 2 shards
      model-bf16/                              same weights, hub names, bf16, one file
  tests/fixtures/clip336/                      model dir (transformers-5.24 save_pretrained config), f32
      image.jpg, expected.safetensors
  assets/demo/model/ + image.jpg + README.md   bundled demo model (random weights, f16, hub names)
  benches/midsize_config.json                  shapes for the Rust bench (4.x hub style)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CMD = "python tools/make_fixtures.py"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

CORPUS = """\
What is in the image?
What colour is the cat?
What color is the cat in the picture?
Is there a dog in this photo?
How many shapes are there in the image?
Describe the image in one sentence.
What is the man holding in his hand?
What is the woman wearing?
Where is the red ball?
Which shape is the largest one?
Is the square bigger than the circle?
The circle is red and the square is blue.
A small green triangle sits next to a large yellow circle.
The cat has orange fur with brown and white stripes.
A grey cat is looking at the camera.
There are three shapes: a circle, a square and a triangle.
The sky is blue and the grass is green.
A cup of coffee is on the wooden table.
What is in the cup?
The coffee cup is white and the saucer is white too.
A person is standing in front of a rocket.
The astronaut is wearing a white suit with a flag.
Is the picture taken indoors or outdoors?
What time of day is it in the photo?
The photo shows a cat with green eyes.
Two red squares and one blue circle are on a black background.
How many cats are in the image? There is one cat.
Yes, there is a cat. No, there is no dog.
The animal in the image is a cat.
What animal is this? It is a cat.
What is the colour of the background?
The background is dark and the object is bright.
Is the object on the left or on the right?
The ball is on the left side of the table.
What is the shape of the sign? The sign is round.
A pink flower is in a purple vase.
The car is black and the road is grey.
What is the cat doing? The cat is sitting and looking up.
Is it sunny? It is a sunny day with a few white clouds.
What colour are the eyes of the cat? The eyes are yellow and green.
The image shows a close photo of an animal face.
USER: What is shown here? ASSISTANT: A cat.
USER: Describe the colours. ASSISTANT: Orange, brown, white and black.
"""

N_TRAINED = 256  # specials(3) + alphabet + merges, trained by the BPE trainer
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def build_tokenizer():
    """Llama-layout byte-fallback BPE: <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF> = 3..258, trained pieces,
    then <image>, <pad> as added special tokens. Same normalizer/pre-tokenizer/decoder layout as
    transformers 5's LlamaTokenizer (no normalizer, Metaspace(prepend_scheme=first, split=False))."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    lines = [l for l in CORPUS.splitlines() if l.strip()]
    # Train word-split so no piece has '▁' inside it (like sentencepiece); encode without splitting.
    tr = Tokenizer(models.BPE(unk_token="<unk>"))
    tr.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=N_TRAINED, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False, min_frequency=2
    )
    tr.train_from_iterator(lines, trainer=trainer)
    tj = json.loads(tr.to_str())
    trained_vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in tj["model"]["merges"]]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for t in BYTE_TOKENS:
        vocab[t] = len(vocab)
    for tok, _ in trained_vocab:
        if tok in vocab:
            continue
        vocab[tok] = len(vocab)

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    specials = [AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]]
    tok.add_special_tokens(specials)
    return tok


def added_token_entry(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_tokenizer_files(tok, d: Path, max_len: int):
    d.mkdir(parents=True, exist_ok=True)
    tj = json.loads(tok.to_str())
    # merges as "a b" strings, like the llava-hf / Llama tokenizer.json files on the hub (readable by old and new
    # `tokenizers`; no piece contains a space, the word separator is '▁')
    merges = tj["model"]["merges"]
    assert all(" " not in a and " " not in b for a, b in merges)
    tj["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    (d / "tokenizer.json").write_text(json.dumps(tj, indent=2, ensure_ascii=False) + "\n")
    ids = {t: tok.token_to_id(t) for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]}
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): added_token_entry(t) for t, i in sorted(ids.items(), key=lambda kv: kv[1])},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": max_len,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    dump_json(cfg, d / "tokenizer_config.json")
    stm = {
        "bos_token": added_token_entry("<s>"),
        "eos_token": added_token_entry("</s>"),
        "pad_token": added_token_entry("<pad>"),
        "unk_token": added_token_entry("<unk>"),
    }
    for v in stm.values():
        v.pop("special")
    dump_json(stm, d / "special_tokens_map.json")


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------

FIXTURES = {
    "tiny": dict(
        seed=1000, image_size=30, patch_size=6, v_hidden=32, v_heads=2, v_inter=64, v_layers=3,
        t_hidden=64, t_heads=4, t_kv=2, t_inter=128, t_layers=2, max_pos=256,
        config_style="hub4", image="chelsea", image_wh=(45, 37), image_file="image.png",
        question="What colour is the cat?", cams=True,
    ),
    "clip336": dict(
        seed=2000, image_size=336, patch_size=14, v_hidden=32, v_heads=2, v_inter=64, v_layers=3,
        t_hidden=64, t_heads=4, t_kv=4, t_inter=160, t_layers=3, max_pos=1024,
        config_style="t5", image="coffee", image_wh=(500, 375), image_file="image.jpg",
        question="What is in the cup?", cams=False,
    ),
}
DEMO = dict(
    seed=3000, image_size=336, patch_size=14, v_hidden=32, v_heads=2, v_inter=64, v_layers=3,
    t_hidden=64, t_heads=4, t_kv=4, t_inter=160, t_layers=3, max_pos=1024,
    config_style="hub4", image="chelsea", image_wh=None, image_file="image.jpg",
    question="What is the cat doing?",
)
MIDSIZE = dict(
    image_size=336, patch_size=14, v_hidden=32, v_heads=2, v_inter=64, v_layers=3,
    t_hidden=512, t_heads=8, t_kv=8, t_inter=1376, t_layers=8, max_pos=4096, vocab=32064,
    image_token_id=32000, pad_id=32001,
)
T_NEW = 8


def n_patches(spec):
    return (spec["image_size"] // spec["patch_size"]) ** 2


def hf_config(spec, vocab, image_token_id, pad_id):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(
        hidden_size=spec["v_hidden"], intermediate_size=spec["v_inter"], num_hidden_layers=spec["v_layers"],
        num_attention_heads=spec["v_heads"], image_size=spec["image_size"], patch_size=spec["patch_size"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, num_channels=3,
    )
    tc = LlamaConfig(
        hidden_size=spec["t_hidden"], intermediate_size=spec["t_inter"], num_hidden_layers=spec["t_layers"],
        num_attention_heads=spec["t_heads"], num_key_value_heads=spec["t_kv"], vocab_size=vocab,
        rms_norm_eps=1e-5, max_position_embeddings=spec["max_pos"], hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=image_token_id, image_seq_length=n_patches(spec),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False, pad_token_id=pad_id,
    )


def hub4_config_dict(spec, vocab, image_token_id, pad_id, dtype="float32"):
    """config.json in the llava-hf hub layout written by transformers 4.x (image_token_index, torch_dtype,
    text_config.rope_theta), with every shape given explicitly."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": n_patches(spec),
        "image_token_index": image_token_id,
        "model_type": "llava",
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": spec["t_hidden"],
            "intermediate_size": spec["t_inter"],
            "max_position_embeddings": spec["max_pos"],
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": spec["t_heads"],
            "num_hidden_layers": spec["t_layers"],
            "num_key_value_heads": spec["t_kv"],
            "pad_token_id": pad_id,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "vocab_size": vocab,
        },
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "vision_config": {
            "hidden_act": "quick_gelu",
            "hidden_size": spec["v_hidden"],
            "image_size": spec["image_size"],
            "intermediate_size": spec["v_inter"],
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": spec["v_heads"],
            "num_channels": 3,
            "num_hidden_layers": spec["v_layers"],
            "patch_size": spec["patch_size"],
            "projection_dim": 768,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
    }


def t5_config_dict(model, dtype: torch.dtype):
    """What transformers 5.24 `save_pretrained` writes as config.json (via a scratch dir)."""
    cfg = copy.deepcopy(model.config)
    cfg.dtype = dtype
    cfg.architectures = ["LlavaForConditionalGeneration"]
    with tempfile.TemporaryDirectory() as td:
        cfg.save_pretrained(td)
        return json.loads((Path(td) / "config.json").read_text())


def preprocessor_config(spec):
    s = spec["image_size"]
    return {
        "crop_size": {"height": s, "width": s},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": s},
    }


def processor_config(spec):
    return {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": spec["patch_size"],
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    }


# ----------------------------------------------------------------------------------------------------
# Model build / weights
# ----------------------------------------------------------------------------------------------------


def init_weights(model, seed):
    """Non-degenerate random init: linears std gain/sqrt(fan_in) (so activations keep unit scale and
    attention is neither uniform nor one-hot), norms 1+noise, small biases, O(1) embeddings."""
    g = torch.Generator().manual_seed(seed)

    def rn(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight") and ("norm" in name or "layrnorm" in name):
                p.copy_(1.0 + rn(p.shape, 0.1))
            elif name.endswith("bias"):
                p.copy_(rn(p.shape, 0.05))
            elif "class_embedding" in name:
                p.copy_(rn(p.shape, 1.0))
            elif "position_embedding" in name:
                p.copy_(rn(p.shape, 0.5))
            elif "embed_tokens" in name:
                p.copy_(rn(p.shape, 1.0))
            elif p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                gain = 1.0
                if any(k in name for k in ("q_proj", "k_proj")):
                    gain = 1.4
                elif "lm_head" in name:
                    gain = 2.0
                p.copy_(rn(p.shape, gain / math.sqrt(fan_in)))
            else:
                raise RuntimeError(f"unhandled parameter {name}")


def build_model(spec, vocab, image_token_id, pad_id, seed):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = hf_config(spec, vocab, image_token_id, pad_id)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).to(torch.float32)
    model.config._attn_implementation = "eager"
    for sub in (model.model.language_model, model.model.vision_tower):
        sub.config._attn_implementation = "eager"
    init_weights(model, seed)
    model.eval()
    return model


def t5_state_dict(model):
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    return sd


def hub_name(k: str) -> str:
    """transformers-5.24 state-dict name -> llava-hf hub (transformers 4.x) checkpoint name."""
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k.startswith("model.multi_modal_projector."):
        return k[len("model."):]
    if k.startswith("model.vision_tower."):
        rest = k[len("model.vision_tower."):]
        if not rest.startswith("vision_model."):
            rest = "vision_model." + rest
        return "vision_tower." + rest
    raise KeyError(k)


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def save_st(tensors: dict, path: Path, metadata=None):
    """Write a safetensors file byte-deterministically (the `safetensors` package serialises `__metadata__`
    from a hash map, so its key order -- and the file bytes -- change from run to run). Layout: u64 LE header
    length, JSON header (`__metadata__` first with sorted keys, then tensors sorted by name, space-padded to
    a multiple of 8), then the tensor data in the same order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
    # read back with the reference implementation
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert (f.metadata() or {}) == ({k: str(v) for k, v in metadata.items()} if metadata else {})
        for k in tensors:
            assert torch.equal(f.get_tensor(k), tensors[k].cpu()), k


def write_model_dir(d: Path, sd_t5: dict, names: str, dtype: torch.dtype, config: dict, spec, tok,
                    shards: int = 1):
    d.mkdir(parents=True, exist_ok=True)
    sd = {(hub_name(k) if names == "hub" else k): v.to(dtype) for k, v in sd_t5.items()}
    dump_json(config, d / "config.json")
    if shards == 1:
        save_st(sd, d / "model.safetensors", {"format": "pt"})
    else:
        keys = sorted(sd)
        # split by bytes, keeping key order, so both shards are non-trivial
        total = sum(sd[k].numel() * sd[k].element_size() for k in keys)
        parts, acc, cur = [], 0, []
        for k in keys:
            cur.append(k)
            acc += sd[k].numel() * sd[k].element_size()
            if len(parts) < shards - 1 and acc >= total * (len(parts) + 1) / shards:
                parts.append(cur)
                cur = []
        parts.append(cur)
        assert len(parts) == shards and all(parts)
        weight_map = {}
        for i, ks in enumerate(parts):
            fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_st({k: sd[k] for k in ks}, d / fn, {"format": "pt"})
            for k in ks:
                weight_map[k] = fn
        dump_json(
            {"metadata": {"total_parameters": sum(sd[k].numel() for k in keys), "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))},
            d / "model.safetensors.index.json",
        )
    write_tokenizer_files(tok, d, spec["max_pos"])
    dump_json(preprocessor_config(spec), d / "preprocessor_config.json")
    dump_json(processor_config(spec), d / "processor_config.json")
    dump_json({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": config["text_config"]["pad_token_id"]},
              d / "generation_config.json")


# ----------------------------------------------------------------------------------------------------
# Images and processor
# ----------------------------------------------------------------------------------------------------


def make_image(kind, wh):
    import skimage.data

    if kind == "chelsea":
        im = Image.fromarray(skimage.data.chelsea())  # 451x300
    elif kind == "coffee":
        arr = skimage.data.coffee()  # 600x400
        h, w = arr.shape[:2]
        cw = int(round(h * 4 / 3))
        x0 = (w - cw) // 2
        im = Image.fromarray(np.ascontiguousarray(arr[:, x0:x0 + cw]))
    else:
        raise ValueError(kind)
    im = im.convert("RGB")
    if wh is not None:
        im = im.resize(wh, Image.Resampling.LANCZOS)
    return im


def save_image(im: Image.Image, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        im.save(path, format="PNG", optimize=False)
    else:
        # 4:4:4 (no chroma subsampling) so decoders agree more closely on the pixels
        im.save(path, format="JPEG", quality=90, subsampling=0, optimize=False, progressive=False)


def load_processor(model_dir: Path, spec):
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil.from_pretrained(str(model_dir))
    tk = AutoTokenizer.from_pretrained(str(model_dir))
    proc = LlavaProcessor(
        image_processor=ip, tokenizer=tk, patch_size=spec["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    assert type(proc.image_processor).__name__ == "CLIPImageProcessorPil", type(proc.image_processor)
    assert proc.image_processor.backend == "pil" if hasattr(proc.image_processor, "backend") else True
    return proc


def prompt_for(question):
    return f"USER: <image>\n{question} ASSISTANT:"


# ----------------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------------


def acceptable(gen, min_gap, eos_id, tok_vocab):
    """Seed acceptance: clear argmax at every step, no EOS (generation runs the full T_NEW tokens), ids that
    vary (>= 5 distinct, no id three times in a row), and only real tokenizer ids (not the padded rows)."""
    runs = any(gen[i] == gen[i + 1] == gen[i + 2] for i in range(len(gen) - 2))
    return (min_gap > 1e-2 and eos_id not in gen and len(set(gen)) >= 5 and not runs
            and all(t < tok_vocab for t in gen))


def top2_gap(logits_rows: torch.Tensor) -> float:
    t = torch.topk(logits_rows.double(), 2, dim=-1).values
    return float((t[:, 0] - t[:, 1]).min())


@torch.no_grad()
def greedy(model, input_ids, pixel_values, eos_id, pad_id):
    out = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=T_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
        eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True,
    )
    gen = out.sequences[0, input_ids.shape[1]:]
    logits = torch.stack([l[0] for l in out.logits]).float()
    return gen, logits


@torch.no_grad()
def teacher_forced(model, full_ids, pixel_values):
    cap = {}
    h = model.model.language_model.norm.register_forward_hook(lambda m, i, o: cap.__setitem__("h", o))
    out = model(input_ids=full_ids, pixel_values=pixel_values, use_cache=False, output_hidden_states=True,
                logits_to_keep=0)
    h.remove()
    return out, cap["h"][0]


def relevancy_rows(model, full_ids, pixel_values, gen, n, image_pos, want_cams=False):
    """Chefer relevancy per generated token (see DESIGN §4); autograd on the prefix up to p."""
    L = model.config.text_config.num_hidden_layers
    maps, cams0, stats = [], None, []
    for k in range(len(gen)):
        p = n - 1 + k
        ids = full_ids[:, : p + 1]
        out = model(input_ids=ids, pixel_values=pixel_values, use_cache=False, output_attentions=True,
                    logits_to_keep=0)
        attns = list(out.attentions)
        assert len(attns) == L and attns[0].shape[-1] == p + 1, [a.shape for a in attns]
        s = out.logits[0, p, int(gen[k])]
        # autograd.grad errors if an attention tensor is not part of the graph (i.e. a detached copy)
        dA = torch.autograd.grad(s, attns)
        C = [torch.clamp(d[0].detach() * a[0].detach(), min=0).mean(0) for d, a in zip(dA, attns)]  # [N,N]
        R = torch.eye(p + 1, dtype=torch.float64)
        for l in range(L):
            R = R + C[l].double() @ R
        v = torch.zeros(p + 1, dtype=torch.float64)
        v[p] = 1.0
        for l in reversed(range(L)):
            v = v + v @ C[l].double()
        assert torch.allclose(v, R[p], rtol=1e-10, atol=1e-12)
        maps.append(R[p, image_pos].float())
        stats.append(float(max(d.abs().max() for d in dA)))
        if k == 0 and want_cams:
            cams0 = torch.stack([c.float() for c in C])
    return torch.stack(maps), cams0, min(stats)


def run_oracle(model, proc, spec, im, question, eos_id, pad_id, image_token_id):
    prompt = prompt_for(question)
    inputs = proc(images=im, text=prompt, return_tensors="pt")
    input_ids = inputs["input_ids"]
    pv = inputs["pixel_values"].float()
    P = n_patches(spec)
    S = spec["image_size"]
    assert pv.shape == (1, 3, S, S), pv.shape
    n_img = int((input_ids == image_token_id).sum())
    assert n_img == P, (n_img, P)
    assert int(input_ids[0, 0]) == 1 and int((input_ids == 1).sum()) == 1, "exactly one BOS, first"
    # tokenizing the un-expanded prompt and expanding the single id must give the same ids
    raw = proc.tokenizer(prompt)["input_ids"]
    i = raw.index(image_token_id)
    assert raw.count(image_token_id) == 1
    expanded = raw[:i] + [image_token_id] * P + raw[i + 1:]
    assert expanded == input_ids[0].tolist(), "expand-after-tokenize differs from processor"

    gen, gen_logits = greedy(model, input_ids, pv, eos_id, pad_id)
    n = input_ids.shape[1]
    full = torch.cat([input_ids, gen[None]], dim=1)
    out, hidden = teacher_forced(model, full, pv)
    logits_tf = out.logits[0, n - 1: n - 1 + len(gen)].float()
    assert torch.equal(logits_tf.argmax(-1), gen), "teacher-forced argmax != generated ids"
    # hidden after final norm reproduces logits
    lm = hidden @ model.lm_head.weight.T
    assert torch.allclose(lm, out.logits[0], atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        vt = model.model.vision_tower(pv, output_hidden_states=True)
        vf = vt.hidden_states[-2][0, 1:].float()
        cap = {}
        hk = model.model.vision_tower.encoder.layers[spec["v_layers"] - 2].register_forward_hook(
            lambda m, i, o: cap.__setitem__("o", o[0] if isinstance(o, tuple) else o))
        model.model.vision_tower(pv)
        hk.remove()
        assert torch.allclose(cap["o"][0, 1:], vf, atol=1e-6), "hidden_states[-2] != output of layer N-2"
        proj = model.model.multi_modal_projector(vf[None])[0].float()
        feats = model.model.get_image_features(pixel_values=pv)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = feats[0] if isinstance(feats, (list, tuple)) else feats
        assert torch.allclose(feats.reshape(P, -1).float(), proj, atol=1e-5), "get_image_features mismatch"

    image_pos = (input_ids[0] == image_token_id).nonzero()[:, 0]
    rel, cams0, min_grad = relevancy_rows(model, full, pv, gen, n, image_pos, want_cams=spec.get("cams", False))
    return dict(
        prompt=prompt, input_ids=input_ids[0], pixel_values=pv[0], gen=gen, gen_logits=gen_logits,
        logits=logits_tf, hidden=hidden.float(), vf=vf, proj=proj, rel=rel, cams0=cams0, n=n,
        min_gap=min(top2_gap(logits_tf), top2_gap(gen_logits)),
        cache_vs_full=float((gen_logits - logits_tf).abs().max()), min_grad=min_grad,
    )


def attn_stats(model, full, pv):
    with torch.no_grad():
        out = model(input_ids=full, pixel_values=pv, use_cache=False, output_attentions=True)
        ents = []
        for a in out.attentions:
            a = a[0].double()
            e = -(a.clamp_min(1e-30).log() * a).sum(-1)  # [H,N]
            ents.append(float(e[:, 1:].mean()))  # skip row 0 (always 0)
        vt = model.model.vision_tower(pv, output_attentions=True)
        vents = []
        for a in vt.attentions:
            a = a[0].double()
            vents.append(float((-(a.clamp_min(1e-30).log() * a).sum(-1)).mean()))
    return ents, vents


# ----------------------------------------------------------------------------------------------------
# Main steps
# ----------------------------------------------------------------------------------------------------


def dump_json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def versions():
    import tokenizers
    import transformers
    import safetensors
    import PIL
    import skimage

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
        "scikit-image": skimage.__version__, "python": platform.python_version(),
    }


def tokenizer_cases(tok_dir: Path, raw_tok, out: Path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [
        "USER: <image>\nWhat colour is the cat? ASSISTANT:",
        "What is in the image?",
        "Hello world",
        " leading space and  double  spaces",
        "line one\nline two\n",
        "café naïve – 🐱 ok",
        "<image><image> two images",
        "ASSISTANT: The cat is orange.</s>",
        "",
        "zzzz qqq xyz 1234567890",
    ]
    cases = []
    for t in texts:
        ids_hf = hf(t)["input_ids"]
        ids_raw = raw_tok.encode(t).ids
        assert ids_hf == ids_raw, (t, ids_hf, ids_raw)
        cases.append({
            "text": t,
            "ids": ids_hf,
            "tokens": hf.convert_ids_to_tokens(ids_hf),
            "decoded_skip_special": hf.decode(ids_hf, skip_special_tokens=True),
            "decoded": hf.decode(ids_hf, skip_special_tokens=False),
        })
    dump_json({
        "generated_by": CMD,
        "tokenizer": "tests/fixtures/tiny/tokenizer.json (same file in every model dir)",
        "hf_tokenizer_class": type(hf).__name__,
        "add_special_tokens": True,
        "cases": cases,
    }, out)
    return type(hf).__name__


def verify_dir(d: Path, ref_model, full, pv, ref_logits, atol, label):
    """from_pretrained the written dir; report missing/unexpected keys; compare logits."""
    from transformers import LlavaForConditionalGeneration

    m, info = LlavaForConditionalGeneration.from_pretrained(
        str(d), attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    m.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print(f"  WARNING {label}: loading info {bad}")
    with torch.no_grad():
        lg = m(input_ids=full, pixel_values=pv, use_cache=False).logits[0]
    diff = float((lg - ref_logits).abs().max())
    assert not bad and diff <= atol, (label, bad, diff)
    # weights identical to the reference model (after the file's rounding)
    ref_sd = ref_model.state_dict()
    for k, v in m.state_dict().items():
        if "position_ids" in k:
            continue
        assert torch.equal(v, ref_sd[k]), (label, k)
    print(f"  verified {label}: from_pretrained OK, no missing/unexpected keys, max|dlogits|={diff:.2e}")
    return diff


def rounded_copy(model, dtype):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype).float())
    return m


def make_fixture(name, spec, tok, vocab, image_token_id, pad_id, eos_id, root: Path, summary):
    d = root / "tests" / "fixtures" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    im = make_image(spec["image"], spec["image_wh"])
    save_image(im, d / spec["image_file"])
    im_loaded = Image.open(d / spec["image_file"]).convert("RGB")  # what the engine will decode
    rgb = np.asarray(im_loaded)

    # model dir files first (the processor is loaded from it, as a user would)
    seed = spec["seed"]
    tries = []
    while True:
        model = build_model(spec, vocab, image_token_id, pad_id, seed)
        sd = t5_state_dict(model)
        cfg = hub4_config_dict(spec, vocab, image_token_id, pad_id) if spec["config_style"] == "hub4" \
            else t5_config_dict(model, torch.float32)
        write_model_dir(d, sd, "hub", torch.float32, cfg, spec, tok)
        proc = load_processor(d, spec)
        r = run_oracle(model, proc, spec, im_loaded, spec["question"], eos_id, pad_id, image_token_id)
        ok = acceptable(r["gen"].tolist(), r["min_gap"], eos_id, tok.get_vocab_size())
        tries.append((seed, r["min_gap"], r["gen"].tolist()))
        if ok:
            break
        print(f"  seed {seed} rejected: min gap {r['min_gap']:.2e}, gen {r['gen'].tolist()}")
        seed += 1
        assert seed < spec["seed"] + 50

    gen_text = proc.tokenizer.decode(r["gen"].tolist(), skip_special_tokens=True)
    full = torch.cat([r["input_ids"], r["gen"]])[None]
    ents, vents = attn_stats(model, full, r["pixel_values"][None])
    L = spec["t_layers"]
    N = full.shape[1]
    tensors = {
        "pixel_values": r["pixel_values"].contiguous(),
        "input_ids": r["input_ids"].to(torch.int64),
        "generated_ids": r["gen"].to(torch.int64),
        "vision_features": r["vf"],
        "projected": r["proj"],
        "hidden_final": r["hidden"],
        "logits": r["logits"],
        "relevancy": r["rel"],
    }
    if r["cams0"] is not None:
        assert r["cams0"].shape == (L, r["n"], r["n"])
        tensors["cams_step0"] = r["cams0"]
    meta = {
        "generated_by": CMD,
        "fixture": name,
        "question": spec["question"],
        "prompt": r["prompt"],
        "image_file": spec["image_file"],
        "image_decoded_wh": f"{rgb.shape[1]}x{rgb.shape[0]}",
        "image_decoded_rgb_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
        "image_size": str(spec["image_size"]),
        "patch_size": str(spec["patch_size"]),
        "n_patches": str(n_patches(spec)),
        "n_prompt": str(r["n"]),
        "n_generated": str(len(r["gen"])),
        "hidden_final_rows": f"N = n_prompt + n_generated = {N}: prompt + ALL generated ids fed, no cache",
        "logits_rows": "row k = teacher-forced position n_prompt-1+k (the logits that produced generated_ids[k])",
        "relevancy": "row k: R[p, image positions], R=(I+C_{L-1})...(I+C_0), C_l=mean_h relu(dA*A), "
                     "target = raw logit of generated_ids[k] at p=n_prompt-1+k",
        "cams_step0": "C_l for generated token 0 (p = n_prompt-1), [L, n_prompt, n_prompt]" if r["cams0"] is not None
        else "absent",
        "image_token_id": str(image_token_id),
        "bos_token_id": "1",
        "eos_token_id": str(eos_id),
        "pad_token_id": str(pad_id),
        "tokenizer_vocab_size": str(tok.get_vocab_size()),
        "model_vocab_size": str(vocab),
        "generated_text": gen_text,
        "seed": str(seed),
        "min_top2_logit_gap": f"{r['min_gap']:.6g}",
        "max_abs_diff_kvcache_vs_full_logits": f"{r['cache_vs_full']:.3g}",
        "image_processor_class": type(proc.image_processor).__name__,
        "tokenizer_class": type(proc.tokenizer).__name__,
        "attn_implementation": "eager",
        "compute_dtype": "float32",
        "llm_attention_entropy_per_layer": json.dumps([round(e, 4) for e in ents]),
        "vision_attention_entropy_per_layer": json.dumps([round(e, 4) for e in vents]),
        "versions": json.dumps(versions()),
    }
    save_st(tensors, d / "expected.safetensors", meta)

    # verify the written dirs load with transformers and reproduce the logits
    pv = r["pixel_values"][None]
    ref_logits = teacher_forced(model, full, pv)[0].logits[0]
    verify_dir(d, model, full, pv, ref_logits, 0.0, f"{name} (hub names, f32)")
    if name == "tiny":
        f16 = rounded_copy(model, torch.float16)
        write_model_dir(d / "model-t5-sharded-f16", sd, "t5", torch.float16, t5_config_dict(model, torch.float16),
                        spec, tok, shards=2)
        lf16 = teacher_forced(f16, full, pv)[0].logits[0]
        verify_dir(d / "model-t5-sharded-f16", f16, full, pv, lf16, 0.0, "tiny/model-t5-sharded-f16")
        bf16 = rounded_copy(model, torch.bfloat16)
        write_model_dir(d / "model-bf16", sd, "hub", torch.bfloat16,
                        hub4_config_dict(spec, vocab, image_token_id, pad_id, "bfloat16"), spec, tok)
        lbf16 = teacher_forced(bf16, full, pv)[0].logits[0]
        verify_dir(d / "model-bf16", bf16, full, pv, lbf16, 0.0, "tiny/model-bf16")
        print(f"  rounding effect on logits: f16 {float((lf16 - ref_logits).abs().max()):.2e}, "
              f"bf16 {float((lbf16 - ref_logits).abs().max()):.2e}")

    summary[name] = {
        "seed": seed, "min_top2_gap": r["min_gap"], "generated_ids": r["gen"].tolist(), "generated_text": gen_text,
        "n_prompt": r["n"], "N": N, "cache_vs_full": r["cache_vs_full"], "llm_attn_entropy": ents,
        "vision_attn_entropy": vents, "relevancy_range": [float(r["rel"].min()), float(r["rel"].max())],
        "logits_std": float(r["logits"].std()),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    print(f"  {name}: seed {seed}, n={r['n']}, gen {r['gen'].tolist()} {gen_text!r}, "
          f"min top-2 gap {r['min_gap']:.4g}, cache-vs-full {r['cache_vs_full']:.2e}, "
          f"logit std {summary[name]['logits_std']:.2f}, LLM attn entropy {[round(e, 2) for e in ents]}")


def make_demo(tok, vocab, image_token_id, pad_id, eos_id, root: Path, summary):
    spec = DEMO
    d = root / "assets" / "demo"
    md = d / "model"
    if md.exists():
        shutil.rmtree(md)
    im = make_image(spec["image"], spec["image_wh"])
    save_image(im, d / "image.jpg")
    seed = spec["seed"]
    while True:
        model = build_model(spec, vocab, image_token_id, pad_id, seed)
        sd = t5_state_dict(model)
        write_model_dir(md, sd, "hub", torch.float16,
                        hub4_config_dict(spec, vocab, image_token_id, pad_id, "float16"), spec, tok)
        m16 = rounded_copy(model, torch.float16)
        proc = load_processor(md, spec)
        inputs = proc(images=Image.open(d / "image.jpg").convert("RGB"), text=prompt_for(spec["question"]),
                      return_tensors="pt")
        gen, gl = greedy(m16, inputs["input_ids"], inputs["pixel_values"], eos_id, pad_id)
        if acceptable(gen.tolist(), top2_gap(gl), eos_id, tok.get_vocab_size()):
            break
        print(f"  seed {seed} rejected: min gap {top2_gap(gl):.2e}, gen {gen.tolist()}")
        seed += 1
        assert seed < spec["seed"] + 50
    text = proc.tokenizer.decode(gen.tolist(), skip_special_tokens=True)
    full = torch.cat([inputs["input_ids"][0], gen])[None]
    verify_dir(md, m16, full, inputs["pixel_values"], teacher_forced(m16, full, inputs["pixel_values"])[0].logits[0],
               0.0, "assets/demo/model (hub names, f16)")
    w, h = im.size
    readme = f"""# Demo model and image

`model/` is a LLaVA-1.5-shaped model in the llava-hf checkpoint layout (config.json in the transformers-4.x
hub style, `model.safetensors` with hub tensor names, f16, tokenizer and processor files), small enough to
ship in the repository: CLIP-style vision tower at 336 px with patch 14 (576 patches, a 24x24 map),
vision width {spec['v_hidden']}, {spec['v_layers']} layers; Llama decoder width {spec['t_hidden']}, {spec['t_layers']} layers,
{spec['t_heads']} heads; a {tok.get_vocab_size()}-token byte-fallback BPE tokenizer (model vocab padded to {vocab}).

**The weights are random** (seed {seed}, `{CMD}`). The model runs end to end and its relevancy
maps have the real 24x24 shape, but its answers are meaningless until the trained demo model lands.

`image.jpg`: `skimage.data.chelsea()` ("Chelsea the cat"; scikit-image states: no copyright restrictions,
CC0 by the photographer, Stefan van der Walt), {w}x{h}, JPEG quality 90, no chroma subsampling.

Prompt to use (the LLaVA-1.5 template; the engine adds BOS):

    USER: <image>
    {spec['question']} ASSISTANT:

Question: `{spec['question']}`. With transformers {versions()['transformers']} (f32 compute on these f16 weights,
greedy, {T_NEW} new tokens) the model answers: ids `{gen.tolist()}`, text `{text!r}`.
"""
    (d / "README.md").write_text(readme)
    summary["demo"] = {"generated_ids": gen.tolist(), "generated_text": text, "min_top2_gap": top2_gap(gl)}
    print(f"  demo: gen {gen.tolist()} {text!r}, min gap {top2_gap(gl):.4g}")


def generate_all(root: Path):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    summary = {"versions": versions()}
    tok = build_tokenizer()
    image_token_id = tok.token_to_id("<image>")
    pad_id = tok.token_to_id("<pad>")
    eos_id = tok.token_to_id("</s>")
    assert (tok.token_to_id("<unk>"), tok.token_to_id("<s>"), eos_id) == (0, 1, 2)
    vocab = int(math.ceil(tok.get_vocab_size() / 64) * 64)
    if vocab - tok.get_vocab_size() < 16:
        vocab += 64
    print(f"tokenizer: {tok.get_vocab_size()} tokens, <image>={image_token_id} <pad>={pad_id}; model vocab {vocab}")
    summary["tokenizer"] = {"size": tok.get_vocab_size(), "image": image_token_id, "pad": pad_id, "bos": 1,
                            "eos": eos_id, "unk": 0, "model_vocab": vocab}
    for name, spec in FIXTURES.items():
        print(f"fixture {name}")
        make_fixture(name, spec, tok, vocab, image_token_id, pad_id, eos_id, root, summary)
    summary["tokenizer"]["hf_class"] = tokenizer_cases(root / "tests/fixtures/tiny", tok,
                                                       root / "tests/fixtures/tokenizer_cases.json")
    print("demo")
    make_demo(tok, vocab, image_token_id, pad_id, eos_id, root, summary)
    dump_json(hub4_config_dict(MIDSIZE, MIDSIZE["vocab"], MIDSIZE["image_token_id"], MIDSIZE["pad_id"]),
              root / "benches" / "midsize_config.json")
    return summary


# ----------------------------------------------------------------------------------------------------
# Bench
# ----------------------------------------------------------------------------------------------------


N_DECODE = 24


def bench(root: Path):
    torch.set_num_threads(2)
    spec = MIDSIZE
    model = build_model(spec, spec["vocab"], spec["image_token_id"], spec["pad_id"], 4000)
    P = n_patches(spec)
    g = torch.Generator().manual_seed(4001)
    S = spec["image_size"]
    pv = torch.randn(1, 3, S, S, generator=g)
    text_before = torch.randint(3, 30000, (5,), generator=g)
    text_after = torch.randint(3, 30000, (19,), generator=g)
    ids = torch.cat([torch.tensor([1]), text_before, torch.full((P,), spec["image_token_id"]), text_after])[None]
    n = ids.shape[1]
    n_params = sum(p.numel() for p in model.parameters())

    def prefill():
        return model(input_ids=ids, pixel_values=pv, use_cache=True, logits_to_keep=1)

    load_before = os.getloadavg()
    with torch.no_grad():
        prefill()  # warm-up
        pre = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = prefill()
            pre.append(time.perf_counter() - t0)
        dec = []
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(N_DECODE):
            t0 = time.perf_counter()
            o = model(input_ids=tok, past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[n + i]]), cache_position=torch.tensor([n + i]))
            dec.append(time.perf_counter() - t0)
            cache = o.past_key_values
            tok = o.logits[:, -1].argmax(-1, keepdim=True)
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    res = {
        "what": "transformers LlavaForConditionalGeneration, f32, eager attention, CPU, random weights "
                "(benches/midsize_config.json shapes)",
        "command": f"{CMD} --bench",
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "config": {k: v for k, v in spec.items()},
        "n_params": n_params,
        "prefill_positions": n,
        "prefill_note": "one forward over the whole prompt incl. the vision tower and projector, "
                        "logits only for the last position (as generate does)",
        "prefill_ms_median": round(statistics.median(pre) * 1e3, 2),
        "prefill_ms_all": [round(x * 1e3, 2) for x in pre],
        "prefill_ms_min": round(min(pre) * 1e3, 2),
        "decode_note": f"one-token forward with DynamicCache, positions {n}..{n + N_DECODE - 1}, "
                       f"median of {N_DECODE} consecutive steps",
        "decode_ms_median": round(statistics.median(dec) * 1e3, 2),
        "decode_ms_min": round(min(dec) * 1e3, 2),
        "decode_ms_all": [round(x * 1e3, 2) for x in dec],
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(res, indent=2))
    dump_json(res, root / "tools" / "bench_transformers.json")
    return res


# ----------------------------------------------------------------------------------------------------


def tree_hashes(root: Path, rels):
    out = {}
    for rel in rels:
        base = root / rel
        for p in sorted(base.rglob("*")) if base.is_dir() else [base]:
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", action="store_true", help="time transformers on the mid-size config instead")
    ap.add_argument("--out", type=Path, default=ROOT, help="write under this root instead of the repo")
    ap.add_argument("--check-determinism", action="store_true",
                    help="regenerate into a temp dir and compare with the files in the repo")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    if args.bench:
        bench(args.out)
        return
    if args.check_determinism:
        rels = ["tests/fixtures/tiny", "tests/fixtures/clip336", "tests/fixtures/tokenizer_cases.json",
                "assets/demo", "benches/midsize_config.json"]
        with tempfile.TemporaryDirectory() as td:
            generate_all(Path(td))
            a, b = tree_hashes(ROOT, rels), tree_hashes(Path(td), rels)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        print("identical" if not diff else f"DIFFERENT: {diff}")
        sys.exit(1 if diff else 0)
    summary = generate_all(args.out)
    print(json.dumps(summary, indent=1, default=str)[:20000])


if __name__ == "__main__":
    main()
