#!/usr/bin/env python3
"""Oracle fixture for conversations: llava-hf's LLaVA-1.5 chat template applied by transformers'
`LlavaProcessor.apply_chat_template`, and the processor's input ids (with `<image>` expanded to
the patch count), for a set of conversations on the tiny fixture model's tokenizer.

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
from transformers import LlavaProcessor

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


def main() -> None:
    processor = LlavaProcessor.from_pretrained(MODEL)
    image = Image.open(MODEL / "image.png").convert("RGB")
    cases = []
    for name, messages in CASES:
        rendered = processor.apply_chat_template(
            messages, chat_template=LLAVA_15_TEMPLATE, add_generation_prompt=True, tokenize=False
        )
        count = sum(1 for m in messages for part in m["content"] if part["type"] == "image")
        images = [image] * count if count else None
        ids = processor(text=rendered, images=images, return_tensors="np")["input_ids"][0]
        cases.append(
            {
                "name": name,
                "messages": messages,
                "rendered": rendered,
                "input_ids": [int(i) for i in ids],
            }
        )
    doc = {
        "made_by": "python tools/make_chat_fixtures.py",
        "transformers": transformers.__version__,
        "model": "tests/fixtures/tiny",
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} conversations")


if __name__ == "__main__":
    main()
