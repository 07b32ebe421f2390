"""The Python package against the `fastrm` command's --json output on the bundled demo model.

Run by tests/python.rs (`cargo test --test python -- --ignored`), which installs the package
into target/pyenv with maturin and points FASTRM_BIN at the command cargo built.
"""

import gc
import io
import json
import os
import pathlib
import re
import subprocess
import threading
import time

import numpy as np
import pytest

import fastrm
from fastrm import _fastrm

QUESTION = "What color is the star?"
MAX_NEW = 8


def cli(*args):
    exe = os.environ.get("FASTRM_BIN")
    if not exe:
        pytest.fail("FASTRM_BIN must name the fastrm command to compare with")
    out = subprocess.run(
        [exe, *args, "--json", "--threads", str(os.cpu_count())],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def engine():
    return fastrm.Engine()


@pytest.fixture(scope="module")
def image_path():
    return str(fastrm.demo_image())


def as_f32(values):
    # serde_json writes each f32 in its shortest round-tripping form: parsed and narrowed
    # to float32 it is the engine's exact value.
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def assert_same_run(ex, doc):
    assert ex.input_ids == doc["input_ids"]
    assert ex.generated_ids == doc["generated_ids"]
    assert ex.text == doc["text"]
    assert ex.stop_reason == doc["stop_reason"]


@pytest.mark.parametrize("method", ["fastrm", "baseline", "baseline-incremental", "gradcam"])
def test_explain_matches_the_cli_bit_for_bit(engine, image_path, method):
    doc = cli("explain", "--prompt", QUESTION, "-n", str(MAX_NEW), "--method", method)
    ex = engine.explain(image_path, QUESTION, method=method, max_new_tokens=MAX_NEW)
    assert_same_run(ex, doc)
    assert ex.method == doc["method"] == method
    assert ex.grid == tuple(doc["grid"]) == engine.grid
    assert len(ex.tokens) == len(doc["tokens"]) == len(ex.generated_ids)
    for t, d in zip(ex.tokens, doc["tokens"]):
        assert (t.index, t.id, t.text) == (d["index"], d["id"], d["text"])
        assert t.map.dtype == np.float32 and t.map.shape == engine.grid
        expected = as_f32(d["map"]).reshape(engine.grid)
        assert np.array_equal(t.map, expected), f"token {t.index}: maps differ"
        assert np.float32(t.entropy) == as_f32(d["entropy"])
    c = doc["confidence"]
    assert np.float32(ex.confidence.mean_entropy) == as_f32(c["mean_entropy"])
    assert ex.confidence.verdict == c["verdict"]
    assert ex.confidence.tokens == c["tokens"]
    if method == "gradcam":
        assert ex.layer == doc["layer"]


def test_generate_matches_the_cli(engine, image_path):
    doc = cli("generate", "--prompt", "What shape is red?", "-n", str(MAX_NEW))
    g = engine.generate(image_path, "What shape is red?", max_new_tokens=MAX_NEW)
    assert_same_run(g, doc)
    assert g.timings.maps_s == 0.0


def test_every_image_form_gives_the_same_maps(engine, image_path):
    from PIL import Image

    reference = engine.explain(image_path, QUESTION)
    raw = pathlib.Path(image_path).read_bytes()
    pil = Image.open(io.BytesIO(raw))
    pixels = np.asarray(pil.convert("RGB"))
    # A strided view of the same pixels (mirrored twice) exercises the non-contiguous path.
    strided = np.ascontiguousarray(pixels[:, ::-1])[:, ::-1]
    assert not strided.flags["C_CONTIGUOUS"]
    forms = {
        "pathlib": pathlib.Path(image_path),
        "bytes": raw,
        "bytearray": bytearray(raw),
        "pil": pil,
        "pil-rgba": pil.convert("RGBA"),
        "numpy": pixels,
        "numpy-strided": strided,
    }
    for name, image in forms.items():
        ex = engine.explain(image, QUESTION)
        assert ex.generated_ids == reference.generated_ids, name
        for a, b in zip(ex.tokens, reference.tokens):
            assert np.array_equal(a.map, b.map), name


def test_stream_yields_what_explain_collects(engine, image_path):
    ex = engine.explain(image_path, QUESTION, max_new_tokens=MAX_NEW)
    events = list(engine.stream(image_path, QUESTION, max_new_tokens=MAX_NEW))
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["image_encoded", "prefilled"]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    tokens = [e for e in events if isinstance(e, fastrm.Token)]
    assert [t.id for t in tokens] == ex.generated_ids
    assert "".join(t.text_delta for t in tokens) == ex.text
    for t, m in zip(tokens, ex.tokens):
        assert np.array_equal(t.map.map, m.map)
    done = events[-1]
    assert done.generation.generated_ids == ex.generated_ids
    assert done.confidence.mean_entropy == ex.confidence.mean_entropy


def test_the_baseline_streams_its_maps_after_the_tokens(engine, image_path):
    events = list(engine.stream(image_path, QUESTION, method="baseline", max_new_tokens=MAX_NEW))
    kinds = [e.kind for e in events]
    n = kinds.count("token")
    assert n >= 1 and kinds.count("map") == n
    assert kinds.index("map") > max(i for i, k in enumerate(kinds) if k == "token")
    assert all(e.map is None for e in events if e.kind == "token")
    ex = engine.explain(image_path, QUESTION, method="baseline", max_new_tokens=MAX_NEW)
    maps = [e for e in events if e.kind == "map"]
    for a, b in zip(maps, ex.tokens):
        assert np.array_equal(a.map, b.map)


def test_generation_only_stream(engine, image_path):
    events = list(engine.stream(image_path, QUESTION, method=None))
    assert all(e.map is None for e in events if e.kind == "token")
    assert events[-1].confidence is None


def wait_for_runs(live):
    deadline = time.monotonic() + 20
    while _fastrm._runs()[0] != live:
        assert time.monotonic() < deadline, f"run threads still alive: {_fastrm._runs()}"
        time.sleep(0.01)


def test_a_dropped_stream_stops_its_run(engine, image_path):
    # Earlier runs' threads end just after their last item: let them.
    wait_for_runs(0)
    live, abandoned = _fastrm._runs()
    stream = engine.stream(image_path, QUESTION, method="baseline", max_new_tokens=MAX_NEW)
    assert next(stream).kind == "image_encoded"
    del stream
    gc.collect()
    wait_for_runs(live)
    assert _fastrm._runs()[1] == abandoned + 1
    # The engine is free again.
    assert engine.explain(image_path, QUESTION).text.strip() == "yellow"


def test_a_closed_stream_yields_nothing_more(engine, image_path):
    wait_for_runs(0)
    live, abandoned = _fastrm._runs()
    with engine.stream(image_path, QUESTION) as stream:
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)
    wait_for_runs(live)
    assert _fastrm._runs()[1] == abandoned + 1
    # A stream read to its end is not abandoned.
    list(engine.stream(image_path, QUESTION))
    wait_for_runs(live)
    assert _fastrm._runs()[1] == abandoned + 1


def test_a_run_beside_an_open_stream_in_the_same_thread_is_refused(engine, image_path):
    stream = engine.stream(image_path, QUESTION)
    next(stream)
    with pytest.raises(fastrm.EngineBusyError, match="unfinished stream"):
        engine.explain(image_path, QUESTION)
    stream.close()
    assert engine.explain(image_path, QUESTION).text.strip() == "yellow"


def test_the_thread_advancing_a_stream_is_the_one_refused(engine, image_path):
    stream = engine.stream(image_path, QUESTION)
    refused = {}

    def advance_then_run():
        next(stream)
        try:
            engine.explain(image_path, QUESTION)
        except fastrm.EngineBusyError as e:
            refused["error"] = e

    worker = threading.Thread(target=advance_then_run)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the thread advancing the stream deadlocked"
    assert "error" in refused
    stream.close()
    assert engine.explain(image_path, QUESTION).text.strip() == "yellow"


def test_a_run_in_another_thread_waits_for_the_stream(engine, image_path):
    stream = engine.stream(image_path, QUESTION)
    next(stream)
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("ex", engine.explain(image_path, QUESTION))
    )
    worker.start()
    time.sleep(0.2)
    assert "ex" not in result, "the other run did not wait for the engine"
    rest = list(stream)  # the waiting thread released the GIL, or this would hang
    assert rest[-1].kind == "done"
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert result["ex"].text.strip() == "yellow"


def test_bad_inputs_raise_with_the_engines_messages(engine, image_path, tmp_path):
    with pytest.raises(fastrm.InputError, match="unknown method"):
        engine.explain(image_path, QUESTION, method="nope")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        engine.explain(image_path, QUESTION, max_new_tokens=0)
    with pytest.raises(fastrm.InputError, match="max_new_tokens must be ≥ 0, not -1"):
        engine.generate(image_path, QUESTION, max_new_tokens=-1)
    with pytest.raises(fastrm.InputError, match="top_k must be ≥ 0"):
        engine.generate(image_path, QUESTION, top_k=-5)
    with pytest.raises(fastrm.InputError, match="full R applies to the baseline"):
        engine.explain(image_path, QUESTION, full_r=True)
    with pytest.raises(fastrm.InputError, match="layer"):
        engine.explain(image_path, QUESTION, method="gradcam", layer=99)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        engine.explain(tmp_path / "missing.png", QUESTION)
    with pytest.raises(fastrm.InputError, match="<bytes>"):
        engine.explain(b"not an image", QUESTION)
    with pytest.raises(fastrm.InputError, match=r"uint8 RGB of shape \(height, width, 3\)"):
        engine.explain(np.zeros((8, 8, 3), dtype=np.float32), QUESTION)
    with pytest.raises(fastrm.InputError, match=r"shape \[8, 8\]"):
        engine.explain(np.zeros((8, 8), dtype=np.uint8), QUESTION)
    with pytest.raises(TypeError, match="not int"):
        engine.explain(42, QUESTION)
    with pytest.raises(fastrm.InputError, match="unknown device"):
        fastrm.Engine(device="tpu")
    with pytest.raises(fastrm.InputError, match="unknown dtype"):
        fastrm.Engine(dtype="f8")
    with pytest.raises(fastrm.ModelError, match="not a folder"):
        fastrm.Engine(model=tmp_path / "no-model")
    with pytest.raises(FileNotFoundError):
        fastrm.Engine(head=tmp_path / "no-head.safetensors")
    (tmp_path / "head.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(fastrm.FastrmError):
        fastrm.Engine(head=tmp_path / "head.safetensors")
    # Errors leave the engine usable.
    assert engine.explain(image_path, QUESTION).text.strip() == "yellow"


def test_fastrm_needs_a_head(image_path):
    bare = fastrm.Engine(model=pathlib.Path(fastrm.Engine().model))
    assert not bare.has_head
    with pytest.raises(fastrm.InputError, match="head"):
        bare.explain(image_path, QUESTION)
    assert bare.explain(image_path, QUESTION, method="gradcam").text.strip() == "yellow"


def test_maps_are_arrays_the_caller_owns(engine, image_path):
    ex = engine.explain(image_path, QUESTION)
    m = ex.tokens[0].map
    m[0, 0] = -1.0  # writable, and the engine keeps no reference to it
    assert engine.explain(image_path, QUESTION).tokens[0].map[0, 0] != -1.0


def test_the_readme_example_runs(capsys):
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) == 3, block
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    # The 8x8 map as NumPy prints it: 64 numbers in 8 bracketed rows.
    numbers = re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", printed)
    assert len(numbers) == 64 and printed.count("[") == 9, printed


def test_sampling_keywords_match_the_cli(engine, image_path):
    args = ["--temperature", "1.5", "--seed", "11", "--logprobs", "2", "-n", str(MAX_NEW)]
    doc = cli("generate", "--prompt", QUESTION, *args)
    kw = dict(temperature=1.5, seed=11, logprobs=2)
    g = engine.generate(image_path, QUESTION, max_new_tokens=MAX_NEW, **kw)
    assert_same_run(g, doc)
    assert len(g.logprobs) == len(g.generated_ids) == len(doc["logprobs"])
    for (lp, top), d in zip(g.logprobs, doc["logprobs"]):
        assert np.float32(lp) == as_f32(d["logprob"])
        assert [(i, t) for i, t, _ in top] == [(x["id"], x["token"]) for x in d["top_logprobs"]]
    # The same seed, the same answer, in a stream too; its tokens carry their log-probabilities.
    events = list(engine.stream(image_path, QUESTION, max_new_tokens=MAX_NEW, **kw))
    tokens = [e for e in events if e.kind == "token"]
    assert [t.id for t in tokens] == g.generated_ids
    assert [t.logprobs for t in tokens] == g.logprobs


def test_a_stop_string_is_left_out(engine, image_path):
    g = engine.generate(image_path, QUESTION, stop="llo")
    assert (g.text, g.stop_reason) == ("ye", "stop")
    ex = engine.explain(image_path, QUESTION, stop=["xyz", "ow"])
    assert (ex.text, ex.stop_reason) == ("yell", "stop")
    assert len(ex.tokens) == len(ex.generated_ids)


def test_bad_sampling_keywords_raise(engine, image_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        engine.generate(image_path, QUESTION, temprature=1.0)
    with pytest.raises(fastrm.InputError, match="temperature"):
        engine.generate(image_path, QUESTION, temperature=-1.0)
    with pytest.raises(fastrm.InputError, match="top-p"):
        engine.stream(image_path, QUESTION, top_p=2.0)
    with pytest.raises(TypeError):
        engine.explain(image_path, QUESTION, top_k="many")


def test_a_conversation_matches_the_cli_messages_file(engine, image_path, tmp_path):
    # The CLI reads the image from an image_url part; Python takes it apart and marks its place.
    def messages(image_part):
        return [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": [image_part, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "yellow"},
            {"role": "user", "content": "What color is the cross?"},
        ]

    path = tmp_path / "chat.json"
    part = {"type": "image_url", "image_url": {"url": str(pathlib.Path(image_path).resolve())}}
    path.write_text(json.dumps(messages(part)))
    doc = cli("explain", "--messages", str(path), "-n", str(MAX_NEW))
    ex = engine.explain(image_path, messages({"type": "image"}), max_new_tokens=MAX_NEW)
    assert_same_run(ex, doc)
    assert ex.input_ids != engine.explain(image_path, QUESTION, max_new_tokens=1).input_ids
    with pytest.raises(fastrm.InputError, match="mark its"):
        engine.generate(image_path, messages(part))
    with pytest.raises(fastrm.InputError, match="place 0 images but 1"):
        engine.generate(image_path, [{"role": "user", "content": "Hi"}])
    with pytest.raises(TypeError, match="list of message dicts"):
        engine.generate(image_path, 42)


def test_several_images_and_none_match_the_cli(engine, image_path, tmp_path):
    # Two images: a list, one <image> each before the question (as repeated --image flags); each
    # token's map is (images, rows, cols).
    other = tmp_path / "other.png"
    from PIL import Image

    img = Image.open(image_path).convert("RGB")
    Image.fromarray(255 - np.asarray(img)).save(other)
    doc = cli(
        "explain", "--image", image_path, "--image", str(other),
        "--prompt", QUESTION, "-n", "3", "--method", "baseline",
    )
    ex = engine.explain([image_path, str(other)], QUESTION, method="baseline", max_new_tokens=3)
    assert_same_run(ex, doc)
    for t, d in zip(ex.tokens, doc["tokens"]):
        assert t.map.shape == (2, *engine.grid)
        assert np.array_equal(t.map, as_f32(d["map"]).reshape(2, *engine.grid))
    # One image in a list is the single image, maps (rows, cols).
    one = engine.explain([image_path], QUESTION, method="baseline", max_new_tokens=3)
    assert one.tokens[0].map.shape == engine.grid
    # No image: a text-only conversation is answered; its maps are refused by name.
    chat = [{"role": "user", "content": "Say hello."}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(chat))
    g = engine.generate(None, chat, max_new_tokens=3)
    assert_same_run(g, cli("generate", "--messages", str(path), "-n", "3"))
    with pytest.raises(fastrm.InputError, match="no image"):
        engine.explain(None, chat, method="baseline", max_new_tokens=3)


def test_placed_maps_are_on_each_picture(engine, image_path):
    # A square view: the placed map is the patch grid as it is.
    ex = engine.explain(image_path, QUESTION, method="baseline", max_new_tokens=2)
    for t in ex.tokens:
        assert len(t.placed) == 1 and np.array_equal(t.placed[0], t.map)
    # A tiled image (the tiny LLaVA-NeXT fixture): `map` is flat, one value per image token;
    # `placed` is on the grid of kept tiles the CLI's layout names, each view's total kept and the
    # newline tokens (one after each kept row) left out.
    root = pathlib.Path(__file__).parents[2]
    next_dir, wide = root / "tests/fixtures/next", root / "tests/fixtures/next/wide.png"
    doc = cli(
        "explain", "--model", str(next_dir), "--image", str(wide),
        "--prompt", QUESTION, "-n", "2", "--method", "baseline",
    )
    layout = doc["image_layouts"][0]
    assert layout["kind"] == "any_res"
    grid, rows, cols = layout["grid"], layout["rows"], layout["cols"]
    tiled = fastrm.Engine(str(next_dir))
    ex = tiled.explain(str(wide), QUESTION, method="baseline", max_new_tokens=2)
    assert_same_run(ex, doc)
    for t, d in zip(ex.tokens, doc["tokens"]):
        assert np.array_equal(t.map, as_f32(d["map"]))
        assert t.map.ndim == 1 and t.map.size == grid * grid + rows * (cols + 1)
        (placed,) = t.placed
        assert placed.shape == (rows, cols) and placed.dtype == np.float32
        newlines = [grid * grid + r * (cols + 1) + cols for r in range(rows)]
        kept = np.delete(t.map.astype(np.float64), newlines)
        assert abs(placed.sum(dtype=np.float64) - kept.sum()) <= 1e-4 * np.abs(kept).sum()
