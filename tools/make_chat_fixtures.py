#!/usr/bin/env python3
"""Oracle fixture for conversations and chat templates: the templates of public checkpoints
(llava-hf's LLaVA-1.5 and LLaVA-NeXT-Mistral, two versions of the latter, Qwen2-VL) applied by
transformers' `LlavaProcessor.apply_chat_template` (jinja2 with transformers' settings) to a set
of conversations, and — for templates that place images as `<image>` — the processor's input ids
on the tiny fixture model's tokenizer (`<image>` expanded to the patch count). A template's own
refusal (`raise_exception`) is recorded as the case's error.

    target/tfenv/bin/python tools/make_chat_fixtures.py

Needs only transformers, tokenizers, jinja2, numpy and pillow (no torch): the environment is
    python3 -m venv target/tfenv && target/tfenv/bin/pip install "transformers==5.24.0" \\
        "tokenizers==0.23.3" "huggingface_hub==2.4.0" jinja2 numpy==2.4.6 pillow==13.0.0
Writes tests/fixtures/chat_cases.json (deterministic: a second run writes the same bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from PIL import Image
from transformers import LlavaNextProcessor, LlavaProcessor

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/tiny"
OUT = ROOT / "tests/fixtures/chat_cases.json"

# The chat template of the llava-hf LLaVA-1.5 checkpoints (their chat_template.json), as data.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}

# Each case: a name and its messages (content as parts, the template's input shape).
CASES = [
    ("one_question", [{"role": "user", "content": [IMAGE, text("What is it?")]}]),
    ("image_after_text", [{"role": "user", "content": [text("What is it?"), IMAGE]}]),
    (
        "system_prompt",
        [
            {"role": "system", "content": [text("You are a careful assistant.")]},
            {"role": "user", "content": [IMAGE, text("Describe the picture.")]},
        ],
    ),
    (
        "follow_up",
        [
            {"role": "user", "content": [IMAGE, text("What color is the star?")]},
            {"role": "assistant", "content": [text("Yellow.")]},
            {"role": "user", "content": [text("And the cross?")]},
        ],
    ),
    (
        "system_and_history",
        [
            {"role": "system", "content": [text("Answer in one word.")]},
            {"role": "user", "content": [text("Hello!")]},
            {"role": "assistant", "content": [text("Hi. Send a picture.")]},
            {"role": "user", "content": [IMAGE, text("Which shape is red?"), text("Be brief.")]},
            {"role": "assistant", "content": [text("The cross")]},
            {"role": "user", "content": [text("Where is it?\nLeft or right?")]},
        ],
    ),
    (
        "two_images_one_turn",
        [{"role": "user", "content": [IMAGE, IMAGE, text("What differs between them?")]}],
    ),
    (
        "images_in_two_turns",
        [
            {"role": "system", "content": [text("Compare carefully.")]},
            {"role": "user", "content": [IMAGE, text("What is here?")]},
            {"role": "assistant", "content": [text("A star.")]},
            {"role": "user", "content": [text("And here?"), IMAGE]},
        ],
    ),
    (
        "text_only",
        [
            {"role": "system", "content": [text("Answer briefly.")]},
            {"role": "user", "content": [text("What is a relevancy map?")]},
        ],
    ),
    (
        "unicode_and_spaces",
        [
            {"role": "user", "content": [IMAGE, text("  Qu'est-ce que c'est ?  ")]},
            {"role": "assistant", "content": [text("Un carré — rouge.")]},
            {"role": "user", "content": [text("Et à côté ? 🙂")]},
        ],
    ),
]


# llava-hf/llava-v1.6-mistral-7b-hf (chat_template.json): Mistral's [INST], an optional system
# block, the assistant's turn closed by </s>.
NEXT_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
    "message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text "
    "next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}{{ raise_exception('Only user "
    "and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# The same checkpoint's earlier template: no system role (raise_exception), `<\\s>` as written.
NEXT_MISTRAL_OLD = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{# Render all "
    "images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
    "message['content'][0]['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only user and "
    "assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Qwen/Qwen2-VL-2B-Instruct (tokenizer_config.json): ChatML with a default system message,
# namespaces, `is string`, `in` tests; images as <|vision_start|><|image_pad|><|vision_end|> in
# the order of the parts.
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for "
    "message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system"
    "\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% "
    "if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for "
    "content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if "
    "add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set "
    "video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ "
    "video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' "
    "in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEMPLATES = {
    "llava-1.5": (LLAVA_15_TEMPLATE, True),
    "llava-next-mistral": (NEXT_MISTRAL, True),
    "llava-next-mistral-old": (NEXT_MISTRAL_OLD, True),
    "qwen2-vl": (QWEN2_VL, False),
}


def main() -> None:
    processor = LlavaProcessor.from_pretrained(MODEL)
    image = Image.open(MODEL / "image.png").convert("RGB")
    out = []
    for tname, (template, image_tokens) in TEMPLATES.items():
        for name, messages in CASES:
            case = {"template": tname, "name": name, "messages": messages}
            try:
                rendered = processor.apply_chat_template(
                    messages, chat_template=template, add_generation_prompt=True, tokenize=False
                )
            except Exception as e:  # the template's raise_exception
                case["error"] = str(e)
                out.append(case)
                continue
            case["rendered"] = rendered
            if image_tokens:
                count = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
                images = [image] * count if count else None
                ids = processor(text=rendered, images=images, return_tensors="np")["input_ids"][0]
                case["input_ids"] = [int(i) for i in ids]
            out.append(case)
    # A template that prints BOS itself: transformers then tokenizes without adding another.
    bos_template = "{{ bos_token }}Q: {{ messages[-1]['content'][-1]['text'] }}"
    bos_messages = [{"role": "user", "content": [text("hi")]}]
    bos_ids = processor.apply_chat_template(
        bos_messages, chat_template=bos_template, add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )["input_ids"][0]
    # LLaVA-NeXT on its own template: the tiny NeXT fixture's processor (any-resolution token
    # counts) on a wide picture, a system prompt and a follow-up turn.
    next_dir = ROOT / "tests/fixtures/next"
    next_proc = LlavaNextProcessor.from_pretrained(next_dir)
    next_messages = [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [IMAGE, text("What is on the left?")]},
        {"role": "assistant", "content": [text("A star.")]},
        {"role": "user", "content": [text("And its color?")]},
    ]
    next_rendered = next_proc.apply_chat_template(
        next_messages, chat_template=NEXT_MISTRAL, add_generation_prompt=True, tokenize=False
    )
    wide = Image.open(next_dir / "wide.png").convert("RGB")
    next_ids = next_proc(text=next_rendered, images=[wide], return_tensors="np")["input_ids"][0]
    doc = {
        "made_by": "python tools/make_chat_fixtures.py",
        "next_case": {
            "model": "tests/fixtures/next",
            "template": "llava-next-mistral",
            "image": "wide.png",
            "messages": next_messages,
            "rendered": next_rendered,
            "input_ids": [int(i) for i in next_ids],
        },
        "bos_case": {
            "template": bos_template,
            "messages": bos_messages,
            "input_ids": [int(i) for i in bos_ids],
        },
        "transformers": transformers.__version__,
        "model": "tests/fixtures/tiny",
        "templates": {k: v[0] for k, v in TEMPLATES.items()},
        "cases": out,
    }
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(out)} renderings")


if __name__ == "__main__":
    main()
