"""Shared setup for the GPU reference scripts (tools/gpu_transformers_bench.py, tools/reference_baseline.py).

LLaVA-1.5 configs written out in code (no network), random-weight models built on the meta device and
initialised in place on the target device, a fixed synthetic prompt, timers and memory helpers.
"""

from __future__ import annotations

import math
import platform
import time

import torch

# llava-hf/llava-1.5-{7b,13b}-hf shapes (config.json of the hub checkpoints), and a tiny CPU-testable one
# with the same prompt structure (336 px / patch 14 -> 576 image tokens).
CONFIGS = {
    "7b": dict(
        image_size=336, patch_size=14, v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16,
        t_hidden=4096, t_inter=11008, t_layers=32, t_heads=32, t_kv=32, vocab=32064, max_pos=4096,
    ),
    "13b": dict(
        image_size=336, patch_size=14, v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16,
        t_hidden=5120, t_inter=13824, t_layers=40, t_heads=40, t_kv=40, vocab=32064, max_pos=4096,
    ),
    "tiny": dict(
        image_size=336, patch_size=14, v_hidden=64, v_inter=128, v_layers=3, v_heads=2,
        t_hidden=128, t_inter=256, t_layers=3, t_heads=4, t_kv=4, vocab=32064, max_pos=4096,
    ),
}
IMAGE_TOKEN_ID = 32000
PAD_ID = 32001
BOS_ID = 1
EOS_ID = 2

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def n_patches(spec):
    return (spec["image_size"] // spec["patch_size"]) ** 2


def llava_config(spec, attn: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(
        hidden_size=spec["v_hidden"], intermediate_size=spec["v_inter"], num_hidden_layers=spec["v_layers"],
        num_attention_heads=spec["v_heads"], image_size=spec["image_size"], patch_size=spec["patch_size"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, num_channels=3,
    )
    tc = LlamaConfig(
        hidden_size=spec["t_hidden"], intermediate_size=spec["t_inter"], num_hidden_layers=spec["t_layers"],
        num_attention_heads=spec["t_heads"], num_key_value_heads=spec["t_kv"], vocab_size=spec["vocab"],
        rms_norm_eps=1e-5, max_position_embeddings=spec["max_pos"], hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN_ID, image_seq_length=n_patches(spec),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False, pad_token_id=PAD_ID,
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cfg


def set_attn(model, attn: str):
    """Pin the attention implementation on the model and both towers (transformers 5.x)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = attn


def _default_inv_freq(cfg):
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", None) or getattr(cfg, "rope_theta", None) or 10000.0
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _fix_buffers(model, device):
    """to_empty() leaves buffers uninitialised: recompute the non-persistent ones (RoPE inverse
    frequencies in f32, default RoPE as LLaVA-1.5 uses; CLIP position ids). Done by hand so it does not
    depend on the transformers version's rotary-embedding internals."""
    for name, mod in model.named_modules():
        if "RotaryEmbedding" in type(mod).__name__ and hasattr(mod, "inv_freq"):
            inv_freq = _default_inv_freq(mod.config).to(device)
            mod.inv_freq = inv_freq
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = inv_freq.clone()
            mod.attention_scaling = 1.0
        if isinstance(getattr(mod, "position_ids", None), torch.Tensor):
            pid = mod.position_ids
            mod.position_ids = torch.arange(pid.shape[-1], device=device, dtype=torch.long).expand(pid.shape)
    for name, b in model.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"buffer {name} still on meta")


def cache_kw(model):
    """Name of the forward's KV-cache argument: `cache` in newer transformers 5.x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def out_cache(out):
    c = out.get("cache", None) if hasattr(out, "get") else None
    return c if c is not None else out.past_key_values


@torch.no_grad()
def _init_params(model, seed):
    """Fast in-place init on the target device. Linear/conv weights N(0, (g/sqrt(fan_in))^2) (g = 1.4 for
    q/k, 2 for lm_head, as tools/make_fixtures.py does, so attention is neither uniform nor one-hot and the
    logits have O(1) gaps), norm weights 1, biases 0, embeddings N(0, 1) (class/position: 1 / 0.5)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith("weight") and ("norm" in name or "layrnorm" in name):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        elif "class_embedding" in name or "embed_tokens" in name:
            p.normal_(0.0, 1.0, generator=gen)
        elif "position_embedding" in name:
            p.normal_(0.0, 0.5, generator=gen)
        elif p.dim() >= 2:
            fan_in = math.prod(p.shape[1:])
            g = 1.4 if ("q_proj" in name or "k_proj" in name) else 2.0 if "lm_head" in name else 1.0
            p.normal_(0.0, g / math.sqrt(fan_in), generator=gen)
        else:
            raise RuntimeError(f"unhandled parameter {name}")


def build_model(config_name: str, device, dtype: torch.dtype, attn: str, seed: int = 0):
    """LlavaForConditionalGeneration with random weights: built on the meta device (no allocation, no
    init), materialised with to_empty() on `device`, initialised in place there. Seconds for 7B on a GPU
    (a CPU init of 7B takes minutes)."""
    from transformers import LlavaForConditionalGeneration

    spec = CONFIGS[config_name]
    cfg = llava_config(spec, attn)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(dtype=dtype)  # still meta: only changes the dtype metadata
    model = model.to_empty(device=device)
    _fix_buffers(model, torch.device(device))
    _init_params(model, seed)
    set_attn(model, attn)
    model.eval()
    return spec, model


def synthetic_prompt(spec, device, n_text: int = 40, seed: int = 1):
    """BOS + a few text ids + the expanded <image> ids + the rest of the text ids (n_text ids besides the
    image ones, BOS included), like `USER: <image>\\n{question} ASSISTANT:`; and random pixel_values."""
    g = torch.Generator().manual_seed(seed)
    P = n_patches(spec)
    before = 4
    after = max(1, n_text - 1 - before)
    ids = torch.cat([
        torch.tensor([BOS_ID]), torch.randint(3, 31999, (before,), generator=g),
        torch.full((P,), IMAGE_TOKEN_ID), torch.randint(3, 31999, (after,), generator=g),
    ])[None].to(device)
    S = spec["image_size"]
    pv = torch.randn(1, 3, S, S, generator=g)
    image_pos = (ids[0] == IMAGE_TOKEN_ID).nonzero()[:, 0]
    return ids, pv, image_pos


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Wall time of a region: CUDA events on a GPU (synchronised at stop), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e1 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.e1.record()
            self.e1.synchronize()
            self.s = self.e0.elapsed_time(self.e1) / 1000.0
        else:
            self.s = time.perf_counter() - self.t0
        return False


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mem_allocated(device):
    return torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else None


def peak_allocated(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return None


def card(device):
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"name": p.name, "total_bytes": p.total_memory, "sm": f"{p.major}.{p.minor}",
                "cuda": torch.version.cuda}
    return {"name": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}


def versions():
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gib(b):
    return None if b is None else b / 2**30
