#!/usr/bin/env python3
"""Load bench for `fastrm serve`: K concurrent clients for T seconds on loopback.

Each client sends the bundled scene with "What color is the star?" as a streaming chat completion
with FastRM maps, reads the stream to its end, checks the answer, and starts again until the time
is up. Reports requests/s, p50/p99 time to first token and per-token latency (the gap between
consecutive token chunks, each carrying its map), the server's RSS before and after, and errors
by kind. A 429 (full queue) is expected when the clients outnumber the queue; the client then
waits as its Retry-After says, as OpenAI's clients do. Anything else (another status, a broken
stream, a wrong answer) is an error and makes the exit status 1.

Standard library only. Without --url it starts the server itself (release build by default):

    cargo build --release
    tools/serve_load.py --clients 4 --seconds 20
    tools/serve_load.py --clients 16 --seconds 20 --max-queue 4
    tools/serve_load.py --url http://127.0.0.1:8080 --pid 1234 --clients 4 --seconds 20
    tools/serve_load.py --clients 16 --max-tokens 32 --serve-arg=--max-batch=16

--max-tokens N asks for N tokens past the end of the answer (`ignore_eos`), so decode steps, not
prefills, dominate: the answer must then start with the expected word and have N tokens.
--no-maps asks for plain completions (no relevancy).
--mix sends a mixed workload instead, each client cycling through four kinds of request from its
own starting point: the question with maps (a short answer), a 48-token answer without maps, a
follow-up turn (the question, the answer, another question) with maps, and the question with a
numbered suffix (its last prompt page new to the prefix cache). The server's RSS is sampled every
few seconds (`rss_samples`), so a long run shows whether memory stays flat.
"""

import argparse
import base64
import http.client
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What color is the star?"
ANSWER = "yellow"
MAX_CLIENTS = 256
MAX_SECONDS = 600


def percentile(xs, p):
    """Nearest-rank percentile; None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def rss_kib(pid):
    """(VmRSS, VmHWM) of a process in KiB, from /proc; (None, None) where unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return tuple(int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return (None, None)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.rejected = 0
        self.errors = {}
        self.ttft = []
        self.gaps = []
        self.tokens = 0
        self.kinds = {}

    def error(self, kind):
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1


def one_request(host, port, body, timeout, maps=True):
    """One streamed completion: ("ok", ttft, gaps, n_tokens, text) | ("429", retry_after)
    | ("error", kind)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status == 429:
            resp.read()
            return ("429", float(resp.getheader("Retry-After") or 1))
        if resp.status != 200:
            resp.read()
            return ("error", f"http {resp.status}")
        text, stamps, done = [], [], False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return ("error", "stream error: " + str(chunk["error"].get("code")))
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            content = delta.get("content")
            if content or "relevancy" in chunk:
                stamps.append(time.perf_counter())
                if maps and "relevancy" not in chunk:
                    return ("error", "token without a map")
            if content:
                text.append(content)
        if not done:
            return ("error", "stream ended before [DONE]")
        if not stamps:
            return ("error", "no tokens")
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return ("ok", stamps[0] - t0, gaps, len(stamps), "".join(text))
    except (OSError, http.client.HTTPException) as e:
        return ("error", type(e).__name__)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return ("error", "bad chunk: " + type(e).__name__)
    finally:
        conn.close()


def right_answer(text, n, max_tokens, answer):
    """The expected answer (any, when `answer` is empty); with --max-tokens, one that starts with
    it and has that many tokens."""
    if max_tokens is None:
        return not answer or text.strip() == answer
    return text.strip().startswith(answer) and n == max_tokens


def client(host, port, kinds, start, deadline, stats, timeout, retry_cap):
    """Requests until the deadline, cycling through `kinds` (name, body, maps, max_tokens, answer)
    from `start`."""
    i = start
    while time.monotonic() < deadline:
        name, body, maps, max_tokens, answer = kinds[i % len(kinds)]
        if callable(body):
            body = body(i)
        r = one_request(host, port, body, timeout, maps)
        if r[0] == "ok":
            i += 1
            _, ttft, gaps, n, text = r
            if not right_answer(text, n, max_tokens, answer):
                stats.error(f"wrong answer {text!r} ({n} tokens) to {name}")
                continue
            with stats.lock:
                stats.kinds[name] = stats.kinds.get(name, 0) + 1
                stats.ok += 1
                stats.ttft.append(ttft)
                stats.gaps.extend(gaps)
                stats.tokens += n
        elif r[0] == "429":
            with stats.lock:
                stats.rejected += 1
            time.sleep(min(r[1], retry_cap))
        else:
            i += 1
            stats.error(r[1])


def sample_rss(pid, stop, samples, t0, every=5.0):
    """The server's RSS every `every` seconds until `stop` is set: (seconds, KiB) pairs."""
    while not stop.wait(every):
        rss = rss_kib(pid)[0]
        if rss is not None:
            samples.append((round(time.monotonic() - t0, 1), rss))


def start_server(binary, max_queue, threads, extra):
    cmd = [binary, "serve", "--port", "0", "--max-queue", str(max_queue)]
    if threads:
        cmd += ["-t", str(threads)]
    cmd += extra
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    prefix = "listening on "
    if not line.startswith(prefix):
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    return proc, line[len(prefix):], cmd


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", "-k", type=int, default=4)
    ap.add_argument("--seconds", "-T", type=float, default=20)
    ap.add_argument("--url", help="a running server; default: start one")
    ap.add_argument("--pid", type=int, help="the running server's pid, for its RSS")
    ap.add_argument(
        "--binary",
        default=os.path.join(ROOT, "target/release/fastrm"),
        help="fastrm binary to start (default: the release build)",
    )
    ap.add_argument("--max-queue", type=int, default=16, help="for the started server")
    ap.add_argument("--threads", "-t", type=int, help="engine threads of the started server")
    ap.add_argument("--serve-arg", action="append", default=[], help="more serve flags")
    ap.add_argument("--image", default=os.path.join(ROOT, "assets/demo/image.png"))
    ap.add_argument("--timeout", type=float, default=60, help="per request, seconds")
    ap.add_argument(
        "--retry-after-cap",
        type=float,
        default=1.0,
        help="longest wait after a 429, seconds (the server asks for 1)",
    )
    ap.add_argument("--max-tokens", type=int, help="tokens per answer, past its end (ignore_eos)")
    ap.add_argument("--no-maps", action="store_true", help="plain completions, no relevancy")
    ap.add_argument(
        "--answer",
        default=ANSWER,
        help="the expected answer (the demo model's); '' accepts any (a synthetic model's)",
    )
    ap.add_argument("--mix", action="store_true", help="a mixed workload (see above)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if not 1 <= a.clients <= MAX_CLIENTS:
        sys.exit(f"--clients must be in 1..{MAX_CLIENTS}")
    if not 0 < a.seconds <= MAX_SECONDS:
        sys.exit(f"--seconds must be in (0, {MAX_SECONDS}]")

    proc = None
    cmd = None
    if a.url:
        url, pid = a.url, a.pid
    else:
        proc, url, cmd = start_server(a.binary, a.max_queue, a.threads, a.serve_arg)
        pid = proc.pid
    u = urllib.parse.urlparse(url)
    host, port = u.hostname, u.port or 80

    with open(a.image, "rb") as f:
        png = base64.b64encode(f.read()).decode()
    mime = "image/jpeg" if a.image.lower().endswith((".jpg", ".jpeg")) else "image/png"
    # No `model`: the server answers with the one it serves (the demo's, or --model's).
    image_part = {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{png}"}}

    def chat(messages, maps, max_tokens):
        req = {"stream": True, "messages": messages}
        if maps:
            req["relevancy"] = {"method": "fastrm"}
        if max_tokens is not None:
            req["max_tokens"] = max_tokens
            req["ignore_eos"] = True
        return json.dumps(req).encode()

    def ask(question):
        return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]

    if a.max_tokens is not None and not 1 <= a.max_tokens <= 4096:
        sys.exit("--max-tokens must be in 1..4096")
    maps = not a.no_maps
    if a.mix and (a.max_tokens is not None or a.no_maps):
        sys.exit("--mix sets each request's length and maps itself: leave out --max-tokens and --no-maps")
    if a.mix:
        follow_up = ask(QUESTION) + [
            {"role": "assistant", "content": a.answer or ANSWER},
            {"role": "user", "content": "What shape is it?"},
        ]
        kinds = [
            ("question with maps", chat(ask(QUESTION), True, None), True, None, a.answer),
            # Checked for an answer only: past the demo model's end the tokens are end-of-sequence
            # ids, which a stream does not show.
            ("48 tokens, no maps", chat(ask(QUESTION), False, 48), False, None, ""),
            ("follow-up turn with maps", chat(follow_up, True, None), True, None, ""),
            (
                "numbered question",
                lambda i: chat(ask(f"{QUESTION} ({i})"), False, None),
                False,
                None,
                "",
            ),
        ]
    else:
        kinds = [("question", chat(ask(QUESTION), maps, a.max_tokens), maps, a.max_tokens, a.answer)]
    body = kinds[0][1]

    try:
        rss_before = rss_kib(pid) if pid else (None, None)
        # One request first: the answer must be right before timing anything.
        warm = one_request(host, port, body, a.timeout, kinds[0][2])
        if warm[0] != "ok" or not right_answer(warm[4], warm[3], kinds[0][3], kinds[0][4]):
            sys.exit(f"warm-up request failed: {warm}")
        stats = Stats()
        t0 = time.monotonic()
        deadline = t0 + a.seconds
        threads = [
            threading.Thread(
                target=client,
                args=(host, port, kinds, c, deadline, stats, a.timeout, a.retry_after_cap),
                daemon=True,
            )
            for c in range(a.clients)
        ]
        samples, stop = [], threading.Event()
        sampler = None
        if pid:
            sampler = threading.Thread(target=sample_rss, args=(pid, stop, samples, t0), daemon=True)
            sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(a.seconds + a.timeout + 5)
        elapsed = time.monotonic() - t0
        stop.set()
        rss_after = rss_kib(pid) if pid else (None, None)
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "server": " ".join(cmd) if cmd else url,
        "clients": a.clients,
        "seconds": round(elapsed, 2),
        "ok": stats.ok,
        "requests_per_s": round(stats.ok / elapsed, 2),
        "rejected_429": stats.rejected,
        "errors": stats.errors,
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / elapsed, 1),
        "max_tokens": a.max_tokens,
        "maps": maps,
        "mix": a.mix,
        "requests_by_kind": stats.kinds,
        "ttft_ms": {"p50": ms(percentile(stats.ttft, 50)), "p99": ms(percentile(stats.ttft, 99))},
        "per_token_ms": {
            "p50": ms(percentile(stats.gaps, 50)),
            "p99": ms(percentile(stats.gaps, 99)),
            "samples": len(stats.gaps),
        },
        "rss_kib": {
            "before": rss_before[0],
            "after": rss_after[0],
            "peak_after": rss_after[1],
        },
        "rss_samples": samples,
    }
    if proc is not None:
        res["server_exit"] = proc.returncode
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    bad = stats.errors or (proc is not None and proc.returncode != 0)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
