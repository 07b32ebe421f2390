#!/usr/bin/env python3
"""Oracle fixtures for fastrm, made with real HF `transformers` (pinned in tools/requirements.txt).

Regenerate everything (tokenizer, tiny + clip336 fixtures; ~2.5 min on 2 cores):

    python tools/make_fixtures.py

Bench transformers f32 eager on the mid-size config: prefill, decode, exact and incremental relevancy per
token, peak RSS (writes tools/bench_transformers.json):

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
import subprocess
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
        question="What colour is the cat?", cams=True, gradcam_all_layers=True,
    ),
    "clip336": dict(
        seed=2000, image_size=336, patch_size=14, v_hidden=32, v_heads=2, v_inter=64, v_layers=3,
        t_hidden=64, t_heads=4, t_kv=4, t_inter=160, t_layers=3, max_pos=1024,
        config_style="t5", image="coffee", image_wh=(500, 375), image_file="image.jpg",
        question="What is in the cup?", cams=False,
    ),
}
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
            elif "embed_tokens" in name or name.endswith("image_newline"):
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
    if k == "model.image_newline":  # LLaVA-NeXT's row separator
        return "image_newline"
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
    """Chefer relevancy per generated token (see DESIGN §4); autograd on the prefix up to p (the causal
    model makes this the same as the full teacher-forced sequence). From the same backward, the LLM-layer
    GradCAM of every layer: row p, image columns of mean_h A_l * relu(dA_l)."""
    L = model.config.text_config.num_hidden_layers
    maps, cams0, stats = [], None, []
    gradcams, aux = [], {"C0": None, "rows_p": []}  # gradcams[k]: [L, P]; aux: token 0's C_l, rows p of C_l
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
        gradcams.append(torch.stack([
            (a[0].detach() * torch.clamp(d[0].detach(), min=0)).mean(0)[p, image_pos] for d, a in zip(dA, attns)]))
        if k == 0:
            aux["C0"] = [c.clone() for c in C]
        aux["rows_p"].append([c[p].clone() for c in C])
        if k == 0 and want_cams:
            cams0 = torch.stack([c.float() for c in C])
    return torch.stack(maps), cams0, min(stats), torch.stack(gradcams, dim=1), aux  # gradcam: [L, T, P]


def detach_cache(cache):
    """Hold the KV cache constant: no gradient may flow into past keys/values."""
    for layer in cache.layers:
        layer.keys = layer.keys.detach()
        layer.values = layer.values.detach()


def relevancy_incremental_rows(model, full_ids, pixel_values, gen, n, image_pos, exact_rel, exact_aux):
    """LVLM-Interpret-style relevancy (DESIGN §4 baseline-incremental), autograd on a KV-cached generation.

    Token 0: forward over the prompt (no cache), backward from the raw logit of gen[0] at p0 = n-1,
    C_l = mean_h relu(dA_l * A_l) (n x n) -> rows 0..n-1 of a growing per-layer matrix C^_l.
    Token k >= 1: one-token forward of gen[k-1] at p_k = n-1+k with the cache of all earlier positions
    DETACHED (the token's own key/value is computed in this forward and gets gradient), backward from the
    raw logit of gen[k]; the cam row mean_h relu(dA_l * A_l) [p_k+1] becomes row p_k of C^_l.
    Map of token k: v = e_{p_k}; v += v.C^_l for l = L-1..0 (= row p_k of (I+C^_{L-1})...(I+C^_0)),
    image columns. Gradients via autograd.grad on the attention tensors (= retain_grad + backward for dA,
    without touching the weights' .grad).

    Checks: token 0's C_l are bit-identical to the exact backward's; each later token's own row p_k equals
    row p_k of the exact C_l for that token (dO at p_k is the same in both: gradient reaches position p_k
    only through its own residual stream), so the maps differ only through the rows < p_k of C^_l."""
    exact_C0 = exact_aux["C0"]
    row_diff = 0.0
    L = model.config.text_config.num_hidden_layers
    T = len(gen)
    Nmax = n + T - 1
    Chat = [torch.zeros(Nmax, Nmax, dtype=torch.float64) for _ in range(L)]

    # token 0 (same computation as the exact token 0)
    out = model(input_ids=full_ids[:, :n], pixel_values=pixel_values, use_cache=False, output_attentions=True,
                logits_to_keep=0)
    attns = list(out.attentions)
    s = out.logits[0, n - 1, int(gen[0])]
    assert int(out.logits[0, n - 1].argmax()) == int(gen[0])
    dA = torch.autograd.grad(s, attns)
    for l, (d, a) in enumerate(zip(dA, attns)):
        c = torch.clamp(d[0].detach() * a[0].detach(), min=0).mean(0)  # [n, n]
        assert torch.equal(c, exact_C0[l]), f"token 0 cams differ from the exact backward's (layer {l})"
        Chat[l][:n, :n] = c.double()
    del out, attns, dA

    # KV cache of the prompt, built without a graph (held constant)
    with torch.no_grad():
        pre = model(input_ids=full_ids[:, :n], pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
    cache = pre.past_key_values
    assert int(pre.logits[0, -1].argmax()) == int(gen[0])
    argmax_ok = [True]

    maps = []
    for k in range(T):
        p = n - 1 + k
        if k >= 1:
            detach_cache(cache)
            o = model(input_ids=gen[k - 1].view(1, 1), past_key_values=cache, use_cache=True,
                      output_attentions=True, position_ids=torch.tensor([[p]]), cache_position=torch.tensor([p]),
                      logits_to_keep=1)
            attns = list(o.attentions)
            assert len(attns) == L and attns[0].shape[-2:] == (1, p + 1), [a.shape for a in attns]
            am = int(o.logits[0, -1].argmax())
            assert am == int(gen[k]), f"KV-cached step {k}: argmax {am} != generated id {int(gen[k])}"
            argmax_ok.append(am == int(gen[k]))
            s = o.logits[0, -1, int(gen[k])]
            dA = torch.autograd.grad(s, attns)
            for l, (d, a) in enumerate(zip(dA, attns)):
                row = torch.clamp(d[0].detach() * a[0].detach(), min=0).mean(0)[0]
                ex = exact_aux["rows_p"][k][l]
                rd = float((row - ex).abs().max() / ex.abs().max())
                assert rd <= 1e-4, f"token {k} layer {l}: own cam row differs from the exact one's ({rd:.3g})"
                row_diff = max(row_diff, rd)
                Chat[l][p, : p + 1] = row.double()
            cache = o.past_key_values
            del o, attns, dA
        v = torch.zeros(p + 1, dtype=torch.float64)
        v[p] = 1.0
        for l in reversed(range(L)):
            v = v + v @ Chat[l][: p + 1, : p + 1]
        maps.append(v[image_pos].float())
    detach_cache(cache)
    inc = torch.stack(maps)
    # the R-product form gives the same rows (checked on the last token, the largest R)
    p = Nmax - 1
    R = torch.eye(p + 1, dtype=torch.float64)
    for l in range(L):
        R = R + Chat[l][: p + 1, : p + 1] @ R
    assert torch.allclose(R[p, image_pos].float(), inc[-1], rtol=1e-6, atol=1e-9)
    # token 0: incremental == exact (same cams, bit-for-bit; the map only differs by the f64->f32 rounding of
    # the row-vector vs R-product forms)
    d0 = float((inc[0] - exact_rel[0]).abs().max())
    assert d0 <= 1e-6 * float(exact_rel[0].abs().max()), d0
    return inc, d0, all(argmax_ok), row_diff


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
    rel, cams0, min_grad, gradcam, aux = relevancy_rows(model, full, pv, gen, n, image_pos,
                                                        want_cams=spec.get("cams", False))
    return dict(
        prompt=prompt, input_ids=input_ids[0], pixel_values=pv[0], gen=gen, gen_logits=gen_logits,
        logits=logits_tf, hidden=hidden.float(), vf=vf, proj=proj, rel=rel, cams0=cams0, n=n,
        gradcam=gradcam, aux=aux, image_pos=image_pos, full=full,
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
    # additions (after the seed is accepted; nothing above depends on them)
    inc, inc_d0, inc_argmax_ok, inc_row_diff = relevancy_incremental_rows(
        model, r["full"], r["pixel_values"][None], r["gen"], r["n"], r["image_pos"], r["rel"], r["aux"])
    inc_diff = (inc - r["rel"]).abs()
    inc_later_max = float(inc_diff[1:].max())
    inc_later_rel = float((inc_diff[1:].amax(-1) / r["rel"][1:].abs().amax(-1)).max())
    gc_layer = L // 2
    P = n_patches(spec)
    assert r["gradcam"].shape == (L, len(r["gen"]), P) and inc.shape == (len(r["gen"]), P)
    tensors["relevancy_incremental"] = inc
    tensors["gradcam"] = r["gradcam"][gc_layer].contiguous()
    if spec.get("gradcam_all_layers", False):
        tensors["gradcam_all_layers"] = r["gradcam"].contiguous()
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
        "relevancy_incremental": "row k: LVLM-Interpret incremental map, autograd on a KV-cached generation "
                                 "(teacher-forced generated_ids): rows 0..n_prompt-1 of C^_l = mean_h relu(dA*A) "
                                 "from token 0's backward over the prompt; row p_k = n_prompt-1+k of C^_l from "
                                 "token k's own one-token forward at p_k (input generated_ids[k-1]) with the past "
                                 "KV cache detached (the token's own K/V gets gradient), target = raw logit of "
                                 "generated_ids[k]; map = row p_k of (I+C^_{L-1})...(I+C^_0), image positions. "
                                 "Row 0 equals relevancy row 0",
        "relevancy_incremental_max_abs_diff_vs_exact": json.dumps(
            {"token0": inc_d0, "later_tokens": inc_later_max, "later_tokens_rel_to_row_max": inc_later_rel}),
        "gradcam": f"row k: LLM-layer GradCAM at layer gradcam_layer, row p=n_prompt-1+k, image positions of "
                   f"mean_h A_l * relu(dA_l), from the same backward as relevancy (target = raw logit of "
                   f"generated_ids[k] at p)",
        "gradcam_layer": str(gc_layer),
        "gradcam_all_layers": "[L, T, P]: gradcam for every layer l (gradcam = gradcam_all_layers[gradcam_layer])"
        if "gradcam_all_layers" in tensors else "absent",
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
        "relevancy_incremental": {"token0_max_abs_diff_vs_exact": inc_d0, "kv_cached_argmax_equals_generated":
                                  inc_argmax_ok, "later_tokens_max_abs_diff_vs_exact": inc_later_max,
                                  "later_tokens_max_diff_rel_to_row_max": inc_later_rel,
                                  "per_token_max_abs_diff": [float(x) for x in inc_diff.amax(-1)],
                                  "own_row_max_rel_diff_vs_exact_row": inc_row_diff},
        "gradcam_layer": gc_layer,
    }
    print(f"  {name}: seed {seed}, n={r['n']}, gen {r['gen'].tolist()} {gen_text!r}, "
          f"min top-2 gap {r['min_gap']:.4g}, cache-vs-full {r['cache_vs_full']:.2e}, "
          f"logit std {summary[name]['logits_std']:.2f}, LLM attn entropy {[round(e, 2) for e in ents]}")
    print(f"  {name}: incremental relevancy: token 0 max|inc-exact| = {inc_d0:.3g} (asserted <= 1e-6 rel), "
          f"KV-cached argmax = generated ids at every step: {inc_argmax_ok}; later tokens max|inc-exact| = "
          f"{inc_later_max:.4g} ({inc_later_rel:.3g} of the row max), per token "
          f"{[float('%.3g' % x) for x in inc_diff.amax(-1)]}; own cam rows vs exact rows p_k: max rel diff "
          f"{inc_row_diff:.3g}; gradcam layer {gc_layer}")


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
    # The bundled demo model (assets/demo/) is trained by tools/demo_world/train.py, not written here.
    dump_json(hub4_config_dict(MIDSIZE, MIDSIZE["vocab"], MIDSIZE["image_token_id"], MIDSIZE["pad_id"]),
              root / "benches" / "midsize_config.json")
    return summary


# ----------------------------------------------------------------------------------------------------
# Bench
# ----------------------------------------------------------------------------------------------------


N_DECODE = 24


N_REL = 3  # relevancy bench: tokens measured after one warm-up token


def bench_setup():
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
    return spec, model, P, pv, ids


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss():
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def exact_token(model, ids_prefix, pv, y, image_pos, mode):
    """The exact Chefer map of one token the autograd way: forward over the whole prefix (ending at the
    token's position p) with eager attention and output_attentions, retain_grad on the attention
    probabilities, backward from the raw logit s of y at p, cams C_l = mean_h relu(dA*A) and the streamed
    row v = e_p; v += v.C_l (l = L-1..0). mode 'backward': s.backward() with the weights requiring grad
    (also computes every weight's gradient, what a plain PyTorch user gets); mode 'grad':
    torch.autograd.grad(s, attentions) (activation gradients only, as the Rust engine does).
    Returns (forward s, backward+cams+row s, map)."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = model(input_ids=ids_prefix, pixel_values=pv, use_cache=False, output_attentions=True, logits_to_keep=1)
    attns = list(out.attentions)
    if mode == "backward":
        for a in attns:
            a.retain_grad()
    s = out.logits[0, -1, y]
    t1 = time.perf_counter()
    if mode == "backward":
        s.backward()
        grads = [a.grad for a in attns]
    else:
        grads = torch.autograd.grad(s, attns)
    with torch.no_grad():
        C = [torch.clamp(d[0] * a[0], min=0).mean(0) for d, a in zip(grads, attns)]
        N = C[0].shape[0]
        v = torch.zeros(N)
        v[N - 1] = 1.0
        for c in reversed(C):
            v = v + v @ c
        m = v[image_pos].clone()
    t2 = time.perf_counter()
    del out, attns, grads, C
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, m


def bench_answer(model, pv, ids, image_token_id, lengths=(10, 100)):
    """Per-answer cost of the exact map the way a PyTorch user shares work across an answer's tokens:
    one teacher-forced forward over prompt + answer (vision tower included, eager, output_attentions,
    logits of the answer's positions only), then one torch.autograd.grad per token from the raw logit of
    its greedy id with retain_graph=True, cams and the streamed row as in exact_token. The fastrm
    counterpart is `fastrm profile --methods baseline` (one saving forward shared the same way, then a
    backward per token). Token 0's map is checked against exact_token's prefix-forward map."""
    n = ids.shape[1]
    image_pos = (ids[0] == image_token_id).nonzero()[:, 0]
    with torch.no_grad():  # greedy ids to teacher-force
        o = model(input_ids=ids, pixel_values=pv, use_cache=True, logits_to_keep=1)
        gen = [int(o.logits[0, -1].argmax())]
        cache = o.past_key_values
        for i in range(max(lengths) - 1):
            o = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[n + i]]), cache_position=torch.tensor([n + i]))
            cache = o.past_key_values
            gen.append(int(o.logits[0, -1].argmax()))
        del o, cache
    _, _, want0 = exact_token(model, ids, pv, gen[0], image_pos, "grad")
    out = {}
    for T in lengths:
        la0 = loadavg()
        full = torch.cat([ids, torch.tensor([gen[: T - 1]], dtype=ids.dtype)], dim=1)
        t0 = time.perf_counter()
        o = model(input_ids=full, pixel_values=pv, use_cache=False, output_attentions=True, logits_to_keep=T)
        attns = list(o.attentions)
        t1 = time.perf_counter()
        bw = []
        for k in range(T):
            tb = time.perf_counter()
            grads = torch.autograd.grad(o.logits[0, k, gen[k]], attns, retain_graph=True)
            with torch.no_grad():
                C = [torch.clamp(d[0] * a[0], min=0).mean(0) for d, a in zip(grads, attns)]
                v = torch.zeros(C[0].shape[0])
                v[n - 1 + k] = 1.0
                for c in reversed(C):
                    v = v + v @ c
                m = v[image_pos].clone()
            bw.append(time.perf_counter() - tb)
            if k == 0:
                d = float((m - want0).abs().max())
                assert d <= 1e-5 * float(want0.abs().max()), f"shared-forward map 0 differs by {d}"
            del grads, C
        total = time.perf_counter() - t0
        del o, attns
        out[str(T)] = {
            "tokens": T,
            "positions": n + T - 1,
            "forward_ms": round((t1 - t0) * 1e3, 1),
            "backward_ms_median": round(statistics.median(bw) * 1e3, 1),
            "backward_ms_first_last": [round(bw[0] * 1e3, 1), round(bw[-1] * 1e3, 1)],
            "total_ms": round(total * 1e3, 1),
            "loadavg_1_5_15_before": la0, "loadavg_1_5_15_after": loadavg(),
        }
        print(f"exact answer of {T} tokens: {out[str(T)]}")
    return out


def incremental_token(model, cache, y_prev, p, y, Chat, image_pos, mode):
    """One later token of the incremental (LVLM-Interpret) map: one-token forward of y_prev at position p
    with the past KV cache detached, output_attentions, backward from the raw logit of y, cam row
    -> row p of C^_l, map = row p of (I+C^_{L-1})...(I+C^_0) by the streamed row. Returns
    (forward s, backward+cam row+map s, map, cache, argmax)."""
    detach_cache(cache)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    o = model(input_ids=torch.tensor([[y_prev]]), past_key_values=cache, use_cache=True, output_attentions=True,
              position_ids=torch.tensor([[p]]), cache_position=torch.tensor([p]), logits_to_keep=1)
    attns = list(o.attentions)
    if mode == "backward":
        for a in attns:
            a.retain_grad()
    s = o.logits[0, -1, y]
    t1 = time.perf_counter()
    if mode == "backward":
        s.backward()
        grads = [a.grad for a in attns]
    else:
        grads = torch.autograd.grad(s, attns)
    with torch.no_grad():
        for l, (d, a) in enumerate(zip(grads, attns)):
            Chat[l][p, : p + 1] = torch.clamp(d[0] * a[0], min=0).mean(0)[0]
        v = torch.zeros(p + 1)
        v[p] = 1.0
        for l in reversed(range(len(Chat))):
            v = v + v @ Chat[l][: p + 1, : p + 1]
        m = v[image_pos].clone()
    t2 = time.perf_counter()
    am = int(o.logits[0, -1].argmax())
    cache = o.past_key_values
    detach_cache(cache)
    del o, attns, grads
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, m, cache, am


def bench_mem_child(variant):
    """Run in a fresh interpreter (--bench-mem VARIANT): peak RSS over one operation on the token at
    position n (prefix n+1 positions). Prints one JSON line."""
    spec, model, P, pv, ids = bench_setup()
    n = ids.shape[1]
    image_pos = (ids[0] == spec["image_token_id"]).nonzero()[:, 0]
    # warm-up on a short text-only sequence (lazy imports, thread pools, allocator), then give memory back
    short = ids[:, :6]  # BOS + text, no image ids
    o = model(input_ids=short, use_cache=False, output_attentions=True, logits_to_keep=1)
    o.logits[0, -1, 0].backward()
    del o
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        y = int(model(input_ids=ids, pixel_values=pv, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
    prefix = torch.cat([ids, torch.tensor([[y]])], dim=1)  # token 1: p = n
    with torch.no_grad():
        y1 = int(model(input_ids=prefix, pixel_values=pv, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
    gc_collect()
    res = {"variant": variant, "positions": prefix.shape[1]}
    res["rss_before_kb"] = proc_status_kb("VmRSS")
    reset_peak_rss()
    res["hwm_after_reset_kb"] = proc_status_kb("VmHWM")
    if variant == "plain":
        with torch.no_grad():
            model(input_ids=prefix, pixel_values=pv, use_cache=False, logits_to_keep=1)
        res["peak_kb"] = proc_status_kb("VmHWM")
    else:
        mode = {"exact_backward": "backward", "exact_grad": "grad"}[variant]
        model.zero_grad(set_to_none=True)
        out = model(input_ids=prefix, pixel_values=pv, use_cache=False, output_attentions=True, logits_to_keep=1)
        attns = list(out.attentions)
        if mode == "backward":
            for a in attns:
                a.retain_grad()
        s = out.logits[0, -1, y1]
        res["peak_after_forward_kb"] = proc_status_kb("VmHWM")
        if mode == "backward":
            s.backward()
            grads = [a.grad for a in attns]
        else:
            grads = torch.autograd.grad(s, attns)
        with torch.no_grad():
            C = [torch.clamp(d[0] * a[0], min=0).mean(0) for d, a in zip(grads, attns)]
            v = torch.zeros(C[0].shape[0])
            v[-1] = 1.0
            for c in reversed(C):
                v = v + v @ c
            float(v[image_pos].sum())
        res["peak_kb"] = proc_status_kb("VmHWM")
    res["peak_delta_mb"] = round((res["peak_kb"] - res["rss_before_kb"]) / 1024, 1)
    if "peak_after_forward_kb" in res:
        res["peak_delta_after_forward_mb"] = round((res["peak_after_forward_kb"] - res["rss_before_kb"]) / 1024, 1)
    print("BENCH_MEM " + json.dumps(res))


def gc_collect():
    import gc

    gc.collect()
    malloc_trim()


def time_generation(model, ids, pv, n):
    """Prefill (5 timed after a warm-up) and N_DECODE consecutive decode steps, in seconds."""

    def prefill():
        return model(input_ids=ids, pixel_values=pv, use_cache=True, logits_to_keep=1)

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
    return pre, dec


def bench(root: Path):
    spec, model, P, pv, ids = bench_setup()
    n = ids.shape[1]
    n_params = sum(p.numel() for p in model.parameters())

    load_before = os.getloadavg()
    pre, dec = time_generation(model, ids, pv, n)
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
    res.update(bench_relevancy(model, spec, pv, ids))
    res["exact_answer"] = bench_answer(model, pv, ids, spec["image_token_id"])
    # The same shapes in bf16 (weights and activations, as a PyTorch user runs a bf16 checkpoint),
    # after the f32 measurements so they are unchanged.
    pre16, dec16 = time_generation(model.to(torch.bfloat16), ids, pv.to(torch.bfloat16), n)
    res["bf16"] = {
        "note": "model.to(torch.bfloat16), bf16 pixel values; same prefill and decode as above",
        "prefill_ms_median": round(statistics.median(pre16) * 1e3, 2),
        "prefill_ms_all": [round(x * 1e3, 2) for x in pre16],
        "decode_ms_median": round(statistics.median(dec16) * 1e3, 2),
        "decode_ms_all": [round(x * 1e3, 2) for x in dec16],
    }
    print(json.dumps(res, indent=2))
    dump_json(res, root / "tools" / "bench_transformers.json")
    return res


def bench_relevancy(model, spec, pv, ids):
    """Per-token cost of the exact map the autograd way, of the incremental map's later tokens, and the
    peak RSS of the exact token vs a plain forward (fresh subprocesses)."""
    n = ids.shape[1]
    L = spec["t_layers"]
    image_pos = (ids[0] == spec["image_token_id"]).nonzero()[:, 0]
    T = 2 + N_REL + 1
    with torch.no_grad():  # greedy ids to teacher-force
        o = model(input_ids=ids, pixel_values=pv, use_cache=True, logits_to_keep=1)
        gen = [int(o.logits[0, -1].argmax())]
        cache = o.past_key_values
        for i in range(T - 1):
            o = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[n + i]]), cache_position=torch.tensor([n + i]))
            cache = o.past_key_values
            gen.append(int(o.logits[0, -1].argmax()))
    full = torch.cat([ids, torch.tensor([gen])], dim=1)
    out = {}

    # (a) exact, per token k: forward over the prefix ending at p_k = n-1+k; token 0 is the warm-up
    maps_exact = {}
    for mode in ("backward", "grad"):
        la0 = loadavg()
        fw, bw = [], []
        for k in range(0, N_REL + 1):
            f, b, m = exact_token(model, full[:, : n + k], pv, gen[k], image_pos, mode)
            if k > 0:
                fw.append(f)
                bw.append(b)
            maps_exact[(mode, k)] = m
        tot = [a + b for a, b in zip(fw, bw)]
        out[f"exact_token_{mode}"] = {
            "positions": [n + k for k in range(1, N_REL + 1)],
            "forward_ms_median": round(statistics.median(fw) * 1e3, 1),
            "backward_cams_row_ms_median": round(statistics.median(bw) * 1e3, 1),
            "total_ms_median": round(statistics.median(tot) * 1e3, 1),
            "forward_ms_all": [round(x * 1e3, 1) for x in fw],
            "backward_cams_row_ms_all": [round(x * 1e3, 1) for x in bw],
            "total_ms_all": [round(x * 1e3, 1) for x in tot],
            "loadavg_1_5_15_before": la0, "loadavg_1_5_15_after": loadavg(),
        }
        print(f"exact ({mode}): {out[f'exact_token_{mode}']}")
    for k in range(N_REL + 1):
        d = float((maps_exact[("backward", k)] - maps_exact[("grad", k)]).abs().max())
        assert d <= 1e-5 * float(maps_exact[("grad", k)].abs().max()), (k, d)
    out["exact_token_note"] = (
        f"the exact baseline the autograd way, per generated token k = 1..{N_REL} (token 0 = warm-up): "
        "forward over the whole prefix (prompt incl. the vision tower + k generated ids, no cache, eager, "
        "output_attentions=True, logits_to_keep=1 -- only the target row's logits, the cheapest honest "
        "choice), retain_grad on the 8 attention-probability tensors, backward from the raw logit of the "
        "teacher-forced greedy id, cams C_l = mean_h relu(dA*A) [N,N] and the streamed row v = e_p; "
        "v += v.C_l. 'backward' = s.backward() with the weights requiring grad (computes every weight's "
        "gradient too; what a plain PyTorch user gets, e.g. LVLM-Interpret); 'grad' = "
        "torch.autograd.grad(s, attentions) (activation gradients only, down to layer 0's attention; what "
        "the Rust engine computes). Both give the same map (asserted).")

    # (b) incremental: token 0 = the exact token 0; later tokens: one-token forward with the detached cache
    for mode in ("backward", "grad"):
        la0 = loadavg()
        with torch.no_grad():
            o = model(input_ids=ids, pixel_values=pv, use_cache=True, logits_to_keep=1)
        cache = o.past_key_values
        Nmax = n + T
        Chat = [torch.zeros(Nmax, Nmax) for _ in range(L)]
        fw, bw = [], []
        for k in range(1, T):  # k = 1 is the warm-up
            p = n - 1 + k
            f, b, m, cache, am = incremental_token(model, cache, gen[k - 1], p, gen[k], Chat, image_pos, mode)
            assert am == gen[k], (k, am, gen[k])
            if k > 1:
                fw.append(f)
                bw.append(b)
        tot = [a + b for a, b in zip(fw, bw)]
        out[f"incremental_later_token_{mode}"] = {
            "positions": [n - 1 + k for k in range(2, T)],
            "forward_ms_median": round(statistics.median(fw) * 1e3, 2),
            "backward_cam_row_map_ms_median": round(statistics.median(bw) * 1e3, 2),
            "total_ms_median": round(statistics.median(tot) * 1e3, 2),
            "forward_ms_all": [round(x * 1e3, 2) for x in fw],
            "backward_cam_row_map_ms_all": [round(x * 1e3, 2) for x in bw],
            "total_ms_all": [round(x * 1e3, 2) for x in tot],
            "loadavg_1_5_15_before": la0, "loadavg_1_5_15_after": loadavg(),
        }
        print(f"incremental ({mode}): {out[f'incremental_later_token_{mode}']}")
    out["incremental_note"] = (
        f"incremental (LVLM-Interpret) map, cost per later token (token 1 = warm-up, then {T - 2} tokens): "
        "one-token forward of the previous id with the past KV cache detached (eager, output_attentions, "
        "logits_to_keep=1), backward from the raw logit of the greedy id, cam row mean_h relu(dA*A) [p+1] into "
        "row p of C^_l, and the map = row p of (I+C^_{L-1})...(I+C^_0) by the streamed row (O(L p^2)). The "
        "forward also yields the next token, so this replaces the plain decode step; token 0's cost is the "
        "exact token's. 'backward'/'grad' as for the exact token. Argmax of each step = the greedy id "
        "(asserted).")

    # (c) peak RSS, fresh subprocess per variant
    mem = {}
    for variant in ("plain", "exact_grad", "exact_backward"):
        la0 = loadavg()
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bench-mem", variant],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"--bench-mem {variant} failed:\n{r.stderr[-4000:]}")
        line = [l for l in r.stdout.splitlines() if l.startswith("BENCH_MEM ")][-1]
        mem[variant] = json.loads(line[len("BENCH_MEM "):])
        mem[variant]["loadavg_1_5_15_before"] = la0
        mem[variant]["loadavg_1_5_15_after"] = loadavg()
        print(f"mem {variant}: {mem[variant]}")
    out["peak_rss"] = {
        "method": "Linux /proc/self/status VmHWM (peak resident set), reset to the current RSS by writing 5 to "
                  "/proc/self/clear_refs right before the operation (psutil is not installed in the venv and "
                  "has no peak-reset anyway); each variant in a fresh interpreter (same model/inputs, a short "
                  "warm-up forward+backward, gc + malloc_trim); delta = VmHWM after the operation - VmRSS "
                  f"before it. Operation on the token at position {n} ({n + 1} positions incl. the vision tower): "
                  "'plain' = no_grad forward, logits_to_keep=1; 'exact_grad' = forward with output_attentions "
                  "+ autograd.grad to the attentions + cams + row; 'exact_backward' = the same with "
                  "retain_grad + s.backward() (weight gradients allocated too). *_after_forward = peak before "
                  "the backward starts (graph held).",
        **mem,
        "exact_grad_minus_plain_peak_delta_mb": round(mem["exact_grad"]["peak_delta_mb"]
                                                      - mem["plain"]["peak_delta_mb"], 1),
        "exact_backward_minus_plain_peak_delta_mb": round(mem["exact_backward"]["peak_delta_mb"]
                                                          - mem["plain"]["peak_delta_mb"], 1),
    }
    return out


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
    ap.add_argument("--bench-mem", choices=["plain", "exact_grad", "exact_backward"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    if args.bench_mem:
        bench_mem_child(args.bench_mem)
        return
    if args.bench:
        bench(args.out)
        return
    if args.check_determinism:
        rels = ["tests/fixtures/tiny", "tests/fixtures/clip336", "tests/fixtures/tokenizer_cases.json",
                "benches/midsize_config.json"]
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
