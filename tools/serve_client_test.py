#!/usr/bin/env python3
"""The official `openai` Python client against a running `fastrm serve`: proves that an unmodified
client parses the server's responses, streamed and not, and its errors.

    python3 tools/serve_client_test.py http://127.0.0.1:8080 assets/demo/image.png \
        "What color is the star?" yellow [http://127.0.0.1:8081]

The optional last argument is a second server started with `--allow-image-urls
--allow-private-image-urls`: the image is then also sent by URL, served from a loopback HTTP server
this script runs, and must be answered as when sent inline.

Exits non-zero with a message on the first check that fails.
"""

import base64
import http.server
import sys
import threading

import openai


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) not in (5, 6):
        fail("usage: serve_client_test.py BASE_URL IMAGE QUESTION EXPECTED_WORD [URL_SERVER]")
    base, image, question, expected = sys.argv[1:5]
    client = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="unused", max_retries=0)

    models = client.models.list()
    model = models.data[0].id
    if client.models.retrieve(model).id != model:
        fail(f"models.retrieve({model!r})")
    with open(image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]

    # Streamed, plain.
    text, finish, roles = "", None, []
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, stream=True
    )
    for chunk in stream:
        if chunk.object != "chat.completion.chunk":
            fail(f"chunk object {chunk.object!r}")
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            text += delta.content
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    if roles != ["assistant"]:
        fail(f"roles in the stream: {roles}")
    if expected not in text:
        fail(f"streamed answer {text!r} lacks {expected!r}")
    if finish not in ("stop", "length"):
        fail(f"finish_reason {finish!r}")

    # Streamed with usage and the relevancy extension: extra keys reach the client untouched.
    maps, confidence, usage = 0, None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"relevancy": {"method": "fastrm"}},
    )
    for chunk in stream:
        extra = chunk.model_extra or {}
        if "relevancy" in extra:
            m = extra["relevancy"]
            rows, cols = m["grid"]
            if len(base64.b64decode(m["map_b64"])) != 2 * rows * cols:
                fail(f"map of {len(m['map_b64'])} base64 chars for a {rows}x{cols} grid")
            maps += 1
        if "confidence" in extra:
            confidence = extra["confidence"]
        if chunk.usage is not None:
            usage = chunk.usage
    if maps == 0 or confidence is None or "verdict" not in confidence:
        fail(f"relevancy extension: {maps} maps, confidence {confidence!r}")
    if usage is None or usage.completion_tokens != maps:
        fail(f"usage {usage!r} vs {maps} maps")

    # Not streamed.
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=16)
    if r.choices[0].message.content != text:
        fail(f"non-streamed {r.choices[0].message.content!r} vs streamed {text!r}")
    if r.usage.total_tokens != r.usage.prompt_tokens + r.usage.completion_tokens:
        fail(f"usage {r.usage!r}")

    # Sampling: a seed repeats its answer; a stop string is left out; log-probabilities parse into
    # the client's own types.
    sampled = [
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=1.8, seed=5
        ).choices[0].message.content
        for _ in range(2)
    ]
    if sampled[0] != sampled[1]:
        fail(f"the same seed gave {sampled!r}")
    cut = client.chat.completions.create(model=model, messages=messages, stop=[expected[2:4]])
    if cut.choices[0].message.content != expected[:2] or cut.choices[0].finish_reason != "stop":
        fail(f"stop {expected[2:4]!r}: {cut.choices[0]!r}")
    r = client.chat.completions.create(
        model=model, messages=messages, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    if len(content) != r.usage.completion_tokens or any(len(c.top_logprobs) != 2 for c in content):
        fail(f"logprobs {content!r}")
    if content[0].token.strip() != expected or not content[0].logprob <= 0.0:
        fail(f"first token's logprob {content[0]!r}")
    # A system prompt and a two-turn conversation, the image in the first turn; the second time
    # the prompt's pages come from the prefix cache, which usage reports in the client's type.
    chat = [
        {"role": "system", "content": "Answer with one word."},
        messages[0],
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "And the cross?"},
    ]
    first = client.chat.completions.create(model=model, messages=chat, max_tokens=4)
    again = client.chat.completions.create(model=model, messages=chat, max_tokens=4)
    if not first.choices[0].message.content or first.usage.prompt_tokens <= 64:
        fail(f"conversation: {first!r}")
    cached = again.usage.prompt_tokens_details.cached_tokens
    if not 0 < cached < again.usage.prompt_tokens:
        fail(f"cached tokens {cached} of {again.usage.prompt_tokens}")
    # n = 2 with a seed: two choices, and the same two again.
    pairs = [
        [
            c.message.content
            for c in client.chat.completions.create(
                model=model, messages=messages, max_tokens=6, temperature=1.5, seed=3, n=2
            ).choices
        ]
        for _ in range(2)
    ]
    if len(pairs[0]) != 2 or pairs[0] != pairs[1]:
        fail(f"n = 2 with a seed: {pairs!r}")
    # Two images in one message, each with its own map; and a chat with no image at all.
    two = [{"role": "user", "content": [messages[0]["content"][0], *messages[0]["content"]]}]
    r = client.chat.completions.create(
        model=model, messages=two, max_tokens=4, extra_body={"relevancy": {"method": "fastrm"}}
    )
    if any(t["images"] != 2 for t in r.model_extra["relevancy"]["tokens"]):
        fail(f"two images: {r.model_extra['relevancy']!r}")
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4
    )
    if r.usage.completion_tokens < 1:
        fail(f"text only: {r!r}")
    # The answer's running confidence against the head's threshold, flagged or not.
    r = client.chat.completions.create(
        model=model,
        messages=messages,
        extra_body={"relevancy": {"method": "fastrm", "ungrounded": "flag"}},
    )
    if "ungrounded" not in r.model_extra["relevancy"]:
        fail(f"ungrounded: {r.model_extra['relevancy']!r}")

    # A field that would change the answer and is not implemented is refused by name.
    try:
        client.chat.completions.create(
            model=model, messages=messages, response_format={"type": "json_object"}
        )
        fail("response_format json_object was accepted")
    except openai.BadRequestError as e:
        if "response_format" not in str(e):
            fail(f"response_format error: {e}")

    # Another model is not found, in the client's own error type.
    try:
        client.chat.completions.create(model="gpt-4o", messages=messages)
        fail("an unknown model was accepted")
    except openai.NotFoundError as e:
        if "model_not_found" not in str(e) and "does not exist" not in str(e):
            fail(f"unknown model error: {e}")

    # A refused request surfaces as the client's own error type, with the server's message.
    bad = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                {"type": "text", "text": question},
            ],
        }
    ]
    try:
        client.chat.completions.create(model=model, messages=bad)
        fail("a remote image URL was accepted")
    except openai.BadRequestError as e:
        if e.status_code != 400 or "--allow-image-urls" not in str(e):
            fail(f"remote URL error: {e}")

    if len(sys.argv) == 6:
        image_by_url(sys.argv[5], image, question)

    print(f"ok: {text!r} ({maps} maps, {confidence['verdict']})")


def image_by_url(base, image, question):
    """The same question with the image inline and by URL (from a loopback server) to a server
    that fetches URLs: the same answer; a missing image is the client's BadRequestError."""
    with open(image, "rb") as f:
        png = f.read()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/image.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def ask(url):
        return client.chat.completions.create(
            model=model,
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
        )

    inline = ask("data:image/png;base64," + base64.b64encode(png).decode())
    fetched = ask(f"http://127.0.0.1:{host.server_port}/image.png")
    if fetched.choices[0].message.content != inline.choices[0].message.content:
        fail(f"by URL {fetched.choices[0].message.content!r}, inline {inline.choices[0].message.content!r}")
    if fetched.usage.prompt_tokens != inline.usage.prompt_tokens:
        fail(f"prompt tokens by URL {fetched.usage.prompt_tokens}, inline {inline.usage.prompt_tokens}")
    try:
        ask(f"http://127.0.0.1:{host.server_port}/missing.png")
        fail("a missing image URL was accepted")
    except openai.BadRequestError as e:
        if "HTTP 404" not in str(e):
            fail(f"missing image URL error: {e}")
    host.shutdown()
    print(f"ok by URL: {fetched.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
