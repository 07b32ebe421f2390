#!/usr/bin/env python3
"""Write the PIL/transformers reference fixtures for `tests/vision.rs` into tests/fixtures/vision/.

Pinned environment (the fixtures depend on Pillow's exact resampling and libjpeg-turbo build):

    python3 -m venv /work/visenv
    /work/visenv/bin/pip install pillow==13.0.0 numpy==2.4.6 scikit-image==0.26.0
    /work/visenv/bin/python tools/make_vision_fixtures.py            # writes the fixtures

Optional cross-check of the float outputs against the real `CLIPImageProcessor` (PIL backend), in
an environment that also has transformers (4.x slow processor or 5.x `CLIPImageProcessorPil`):

    /work/pyenv/bin/python tools/make_vision_fixtures.py --check-transformers

(Last run with transformers 5.24.0 / Pillow 13.0.0: every float identical, max |diff| 0.)

Optional JPEG study on larger real photos (not committed; read by the ignored test
`jpeg_decode_study` with VISION_JPEG_STUDY_DIR=/tmp/jpeg_study):

    /work/visenv/bin/python tools/make_vision_fixtures.py --jpeg-study /tmp/jpeg_study

What is written (all raw arrays little-endian, no headers; shapes in manifest.json):
- inputs/     the test images (photo crops from scikit-image's bundled data, odd sizes, every PNG
              colour type/depth PIL distinguishes, interlaced PNG; JPEGs from Pillow: baseline
              4:2:0/4:2:2/4:4:4/grey, progressive, restart markers, RGB, tiny sizes; and JPEGs from
              the small encoder below for layouts Pillow cannot write: 4:4:0, 4:1:1, mixed
              factors, chroma finer than luma, one scan per component, RGB by component ids).
- decoded/    np.array(Image.open(f).convert("RGB")) for each input, uint8 HWC (.rgb).
- resize/     Image.fromarray(decoded).resize((w, h), Image.BICUBIC), as 8-bit RGB PNG, for
              downscales, upscales, one-axis-only changes and both of Pillow 13's pass orders.
- preprocess/ the CLIPImageProcessor pipeline (resize shortest edge, center crop with zero
              padding, rescale in float64 -> float32, normalize in float32), float32 CHW (.f32),
              computed here with numpy exactly as transformers' image_transforms.py does.
  Plus, for LLaVA's real 336 setting, the resized+cropped bytes (PNG) and a per-channel table of
  the float for every byte value.
- llava_preprocessor_config.json  as in llava-hf/llava-1.5-7b-hf.
"""

import argparse
import io
import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "vision"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ----------------------------------------------------------------------------------------------
# Minimal PNG writer for the flavours Pillow cannot write (2/4-bit grey, 16-bit grey+alpha,
# 16-bit RGB/RGBA, Adam7 interlacing).


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _pack_rows(samples: np.ndarray, depth: int) -> list:
    """samples: (h, w*channels) integer array -> list of packed row bytes."""
    rows = []
    for r in samples:
        if depth == 16:
            rows.append(r.astype(">u2").tobytes())
        elif depth == 8:
            rows.append(r.astype(np.uint8).tobytes())
        else:
            per = 8 // depth
            n = math.ceil(len(r) / per)
            padded = np.zeros(n * per, dtype=np.uint16)
            padded[: len(r)] = r
            b = np.zeros(n, dtype=np.uint16)
            for i in range(per):
                b = (b << depth) | padded[i::per]
            rows.append(b.astype(np.uint8).tobytes())
    return rows


def write_png(path: Path, arr: np.ndarray, depth: int, ctype: int, interlace=False, extra=b""):
    """arr: (h, w) or (h, w, c) samples at `depth` bits; ctype: PNG colour type."""
    h, w = arr.shape[:2]
    flat = arr.reshape(h, -1)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 1 if interlace else 0)
    raw = b""
    if not interlace:
        raw = b"".join(b"\x00" + r for r in _pack_rows(flat, depth))
    else:
        # Adam7 passes: (x0, y0, dx, dy)
        for x0, y0, dx, dy in [
            (0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
            (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2),
        ]:
            sub = arr[y0::dy, x0::dx]
            if sub.size == 0:
                continue
            raw += b"".join(b"\x00" + r for r in _pack_rows(sub.reshape(sub.shape[0], -1), depth))
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra
    data += _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    path.write_bytes(data)


# ----------------------------------------------------------------------------------------------
# Minimal baseline JPEG encoder for layouts Pillow cannot write (4:4:0, 4:1:1, chroma sampled
# finer than luma, one scan per component, Adobe RGB), so the decoder's upsampling choices are
# checked against libjpeg-turbo (via Pillow) on valid files. Not optimised; not a reference for
# anything but "a valid JPEG".


def _jpeg_huff_table(symbols, length):
    """Canonical table with every symbol at the same code length (valid, not optimal)."""
    counts = [0] * 16
    counts[length - 1] = len(symbols)
    codes = {sym: (i, length) for i, sym in enumerate(sorted(symbols))}
    return bytes(counts) + bytes(sorted(symbols)), codes


ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34,
          27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44,
          51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63]


def encode_jpeg(planes, samp, width, height, restart=0, separate_scans=False, marker="jfif",
                ids=(1, 2, 3), q=6):
    """planes: full-resolution uint8 planes (one per component); samp: [(h, v)] per component."""
    hmax, vmax = max(h for h, _ in samp), max(v for _, v in samp)
    mx, my = -(-width // (8 * hmax)), -(-height // (8 * vmax))
    n = np.arange(8)
    C = np.sqrt(2 / 8) * np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16)
    C[0] /= np.sqrt(2)
    comps = []
    for plane, (h, v) in zip(planes, samp):
        fy, fx = vmax // v, hmax // h
        cw, ch = -(-width * h // hmax), -(-height * v // vmax)
        p = plane.astype(np.float64)
        p = np.pad(p, ((0, ch * fy - p.shape[0]), (0, cw * fx - p.shape[1])), mode="edge")
        p = p.reshape(ch, fy, cw, fx).mean(axis=(1, 3))  # box-downsample to the component grid
        bw, bh = mx * h, my * v
        p = np.pad(p, ((0, bh * 8 - ch), (0, bw * 8 - cw)), mode="edge") - 128
        blocks = p.reshape(bh, 8, bw, 8).transpose(0, 2, 1, 3)
        coef = np.einsum("ui,abij,vj->abuv", C, blocks, C)
        qc = np.round(coef / q).astype(np.int64).reshape(bh, bw, 64)[:, :, ZIGZAG]
        comps.append(dict(h=h, v=v, q=qc, bw=bw, bh=bh, cw=-(-cw // 8), ch=-(-ch // 8)))

    dc_syms, ac_syms = set(range(12)), set()
    for c in comps:
        for blk in c["q"].reshape(-1, 64):
            run = 0
            for k in range(1, 64):
                a = int(blk[k])
                if a == 0:
                    run += 1
                    continue
                while run > 15:
                    ac_syms.add(0xF0)
                    run -= 16
                ac_syms.add((run << 4) | int(abs(a)).bit_length())
                run = 0
            ac_syms.add(0x00)
    dc_tab, dc_codes = _jpeg_huff_table(dc_syms, 4)
    ac_tab, ac_codes = _jpeg_huff_table(ac_syms, 8)

    out = bytearray(b"\xff\xd8")
    seg = lambda m, d: out.extend(bytes([0xFF, m]) + struct.pack(">H", len(d) + 2) + d)
    if marker == "jfif":
        seg(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    elif marker == "adobe_rgb":
        seg(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x00")
    seg(0xDB, bytes([0]) + bytes([q] * 64))
    sof = struct.pack(">BHHB", 8, height, width, len(comps))
    for cid, c in zip(ids, comps):
        sof += bytes([cid, (c["h"] << 4) | c["v"], 0])
    seg(0xC0, sof)
    seg(0xC4, bytes([0x00]) + dc_tab)
    seg(0xC4, bytes([0x10]) + ac_tab)
    if restart:
        seg(0xDD, struct.pack(">H", restart))

    def scan(cis):
        seg(0xDA, bytes([len(cis)]) + b"".join(bytes([ids[i], 0x00]) for i in cis) + b"\x00\x3f\x00")
        bits = []
        data = bytearray()

        def put(val, nb):
            for i in range(nb - 1, -1, -1):
                bits.append((val >> i) & 1)

        def flush(pad):
            if pad:
                while len(bits) % 8:
                    bits.append(1)
            while len(bits) >= 8:
                b = 0
                for i in range(8):
                    b = (b << 1) | bits.pop(0)
                data.append(b)
                if b == 0xFF:
                    data.append(0)

        def enc_val(a):
            nb = int(abs(a)).bit_length()
            return nb, (a if a >= 0 else a + (1 << nb) - 1)

        if len(cis) == 1:
            c = comps[cis[0]]
            order = [[(cis[0], x, y)] for y in range(c["ch"]) for x in range(c["cw"])]
        else:
            order = [[(ci, X * comps[ci]["h"] + bx, Y * comps[ci]["v"] + by) for ci in cis
                      for by in range(comps[ci]["v"]) for bx in range(comps[ci]["h"])]
                     for Y in range(my) for X in range(mx)]
        pred = {ci: 0 for ci in cis}
        rst = 0
        for m, mcu in enumerate(order):
            if restart and m > 0 and m % restart == 0:
                flush(True)
                data.extend(bytes([0xFF, 0xD0 + rst % 8]))
                rst += 1
                pred = {ci: 0 for ci in cis}
            for ci, x, y in mcu:
                blk = comps[ci]["q"][y, x]
                nb, val = enc_val(int(blk[0]) - pred[ci])
                pred[ci] = int(blk[0])
                put(dc_codes[nb][0], dc_codes[nb][1])
                put(val, nb)
                run = 0
                for k in range(1, 64):
                    a = int(blk[k])
                    if a == 0:
                        run += 1
                        continue
                    while run > 15:
                        put(*ac_codes[0xF0])
                        run -= 16
                    nb, val = enc_val(a)
                    put(*ac_codes[(run << 4) | nb])
                    put(val, nb)
                    run = 0
                if run:
                    put(*ac_codes[0x00])
            flush(False)
        flush(True)
        out.extend(data)

    if separate_scans:
        for ci in range(len(comps)):
            scan([ci])
    else:
        scan(list(range(len(comps))))
    out.extend(b"\xff\xd9")
    return bytes(out)


# ----------------------------------------------------------------------------------------------
# transformers' CLIPImageProcessor (PIL backend) steps, copied from image_transforms.py.


def resize_output_size(h, w, shortest_edge):
    """get_resize_output_image_size(default_to_square=False) -> (new_h, new_w)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop(img, ch, cw):
    """image_transforms.center_crop on an HWC array (pads with zeros when too small)."""
    img = img.transpose(2, 0, 1)
    oh, ow = img.shape[-2:]
    top = (oh - ch) // 2
    left = (ow - cw) // 2
    if top >= 0 and top + ch <= oh and left >= 0 and left + cw <= ow:
        return img[:, top : top + ch, left : left + cw].transpose(1, 2, 0)
    nh, nw = max(ch, oh), max(cw, ow)
    new = np.zeros_like(img, shape=img.shape[:-2] + (nh, nw))
    tp = math.ceil((nh - oh) / 2)
    lp = math.ceil((nw - ow) / 2)
    new[:, tp : tp + oh, lp : lp + ow] = img
    top += tp
    left += lp
    out = new[:, max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
    return out.transpose(1, 2, 0)


def clip_preprocess(rgb, cfg):
    """HWC uint8 -> CHW float32, as CLIPImageProcessor (PIL backend)."""
    img = rgb
    if cfg["do_resize"]:
        if "shortest_edge" in cfg["size"]:
            nh, nw = resize_output_size(img.shape[0], img.shape[1], cfg["size"]["shortest_edge"])
        else:
            nh, nw = cfg["size"]["height"], cfg["size"]["width"]
        img = np.array(Image.fromarray(img).resize((nw, nh), resample=3, reducing_gap=None))
    if cfg["do_center_crop"]:
        img = center_crop(img, cfg["crop_size"]["height"], cfg["crop_size"]["width"])
    x = img
    if cfg["do_rescale"]:
        x = (x.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    if cfg["do_normalize"]:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mean = np.array(cfg["image_mean"], dtype=x.dtype)
        std = np.array(cfg["image_std"], dtype=x.dtype)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32)


def clip_cfg(shortest=None, crop=None, hw=None, **kw):
    cfg = {
        "do_resize": True,
        "size": {"shortest_edge": shortest} if hw is None else {"height": hw[0], "width": hw[1]},
        "do_center_crop": True,
        "crop_size": {"height": crop[0], "width": crop[1]} if crop else None,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
    }
    cfg.update(kw)
    if cfg["crop_size"] is None:
        cfg["do_center_crop"] = False
        del cfg["crop_size"]
    return cfg


# ----------------------------------------------------------------------------------------------


def pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def make_inputs(inp: Path):
    """Write the input images; returns [(file name, kind)]."""
    from skimage import data as skd

    rng = np.random.default_rng(20240611)
    astronaut, coffee, chelsea = skd.astronaut(), skd.coffee(), skd.chelsea()
    camera = skd.camera()
    cases = []

    def save(name, im, kind, **kw):
        im.save(inp / name, **kw)
        cases.append((name, kind))

    # 8-bit PNGs written by Pillow.
    save("astronaut_rgb_157x213.png", Image.fromarray(astronaut[40:253, 180:337]), "png rgb8")
    save("coffee_rgb_301x97.png", Image.fromarray(coffee[150:247, 200:501]), "png rgb8")
    save("camera_gray_120x90.png", Image.fromarray(camera[100:190, 200:320]), "png gray8")
    rgba = np.dstack([chelsea[60:140, 150:246], rng.integers(0, 256, (80, 96), dtype=np.uint8)])
    save("chelsea_rgba_96x80.png", Image.fromarray(rgba, "RGBA"), "png rgba8")
    la = np.dstack([camera[300:343, 10:61], rng.integers(0, 256, (43, 51), dtype=np.uint8)])
    save("camera_la_51x43.png", Image.fromarray(la, "LA"), "png gray+alpha8")
    pal = Image.fromarray(astronaut[200:270, 100:190]).quantize(colors=200, dither=Image.Dither.NONE)
    pal.info["transparency"] = 5
    save("astronaut_palette8_90x70.png", pal, "png palette8 + tRNS", transparency=5)
    pal4 = Image.fromarray(coffee[10:31, 400:433]).quantize(colors=16)
    save("coffee_palette4_33x21.png", pal4, "png palette4", bits=4)
    bw = Image.fromarray(camera[20:59, 20:77] > 128).convert("1")
    save("camera_1bit_57x39.png", bw, "png gray1")

    # Flavours written by hand.
    g2 = camera[0:19, 0:37] >> 6
    write_png(inp / "camera_gray2_37x19.png", g2, 2, 0)
    cases.append(("camera_gray2_37x19.png", "png gray2"))
    g4 = camera[50:73, 60:89] >> 4
    write_png(inp / "camera_gray4_29x23.png", g4, 4, 0)
    cases.append(("camera_gray4_29x23.png", "png gray4"))
    rgb16 = chelsea[100:131, 200:253].astype(np.int64) * 256 + rng.integers(0, 256, (31, 53, 3))
    write_png(inp / "chelsea_rgb16_53x31.png", rgb16.astype(np.uint16), 16, 2)
    cases.append(("chelsea_rgb16_53x31.png", "png rgb16"))
    rgba16 = np.dstack([rgb16[:, :40], rng.integers(0, 65536, (31, 40), dtype=np.uint16)])
    write_png(inp / "chelsea_rgba16_40x31.png", rgba16.astype(np.uint16), 16, 6)
    cases.append(("chelsea_rgba16_40x31.png", "png rgba16"))
    la16 = np.dstack([camera[200:229, 300:341].astype(np.int64) * 256 + rng.integers(0, 256, (29, 41)),
                      rng.integers(0, 65536, (29, 41), dtype=np.uint16)])
    write_png(inp / "camera_la16_41x29.png", la16.astype(np.uint16), 16, 4)
    cases.append(("camera_la16_41x29.png", "png gray+alpha16"))
    write_png(inp / "astronaut_interlaced_45x37.png", astronaut[300:337, 300:345], 8, 2, interlace=True)
    cases.append(("astronaut_interlaced_45x37.png", "png rgb8 adam7"))
    g16 = camera[0:10, 0:12].astype(np.uint16) * 257
    write_png(inp / "camera_gray16_12x10.png", g16, 16, 0)  # rejected: see manifest "rejected"

    # JPEGs (libjpeg-turbo via Pillow). Odd sizes exercise partial MCUs and edge upsampling.
    save("chelsea_420_173x131.jpg", Image.fromarray(chelsea[60:191, 120:293]), "jpeg baseline 4:2:0",
         quality=90, subsampling=2)
    save("coffee_progressive_177x139.jpg", Image.fromarray(coffee[120:259, 280:457]),
         "jpeg progressive 4:2:0", quality=85, subsampling=2, progressive=True)
    save("astronaut_444_67x83.jpg", Image.fromarray(astronaut[0:83, 200:267]), "jpeg baseline 4:4:4",
         quality=95, subsampling=0)
    save("astronaut_422_130x75.jpg", Image.fromarray(astronaut[380:455, 10:140]), "jpeg baseline 4:2:2",
         quality=80, subsampling=1)
    save("camera_gray_121x97.jpg", Image.fromarray(camera[260:357, 170:291]), "jpeg grayscale",
         quality=88)
    save("chelsea_restart_420_67x45.jpg", Image.fromarray(chelsea[200:245, 300:367]),
         "jpeg baseline 4:2:0 + restart markers", quality=70, restart_marker_blocks=3)
    save("coffee_progressive_restart_51x37.jpg", Image.fromarray(coffee[300:337, 100:151]),
         "jpeg progressive 4:2:2 + restart markers", quality=92, subsampling=1, progressive=True,
         restart_marker_rows=1)
    save("astronaut_keep_rgb_29x21.jpg", Image.fromarray(astronaut[100:121, 100:129]),
         "jpeg RGB (Adobe transform 0)", quality=90, keep_rgb=True)
    for w, h in ((1, 1), (2, 5), (3, 3), (5, 2)):  # chroma <= 2 samples wide: no fancy upsampling
        save(f"tiny_420_{w}x{h}.jpg", Image.fromarray(coffee[200:200 + h, 200:200 + w]),
             "jpeg 4:2:0 tiny", quality=90, subsampling=2)

    # Motion-JPEG style: a baseline file with its (standard) Huffman tables stripped; libjpeg
    # substitutes the standard tables.
    b = io.BytesIO()
    Image.fromarray(chelsea[10:43, 10:61]).save(b, "JPEG", quality=80)
    data, out, i = b.getvalue(), bytearray(b"\xff\xd8"), 2
    while data[i + 1] != 0xDA:
        n = struct.unpack(">H", data[i + 2:i + 4])[0]
        if data[i + 1] != 0xC4:
            out += data[i:i + 2 + n]
        i += 2 + n
    out += data[i:]
    (inp / "chelsea_no_dht_51x33.jpg").write_bytes(bytes(out))
    cases.append(("chelsea_no_dht_51x33.jpg", "jpeg baseline without DHT (Motion-JPEG style)"))

    # Layouts only our encoder writes (box-downsampled chroma, one Huffman table per class).
    ycc = np.array(Image.fromarray(astronaut[150:191, 250:303]).convert("YCbCr"))
    planes = [ycc[:, :, i] for i in range(3)]
    W, H = 53, 41
    for name, samp, kw in [
        ("h1v2_440", [(1, 2), (1, 1), (1, 1)], {}),
        ("h4v1_411", [(4, 1), (1, 1), (1, 1)], {}),
        ("h2v2_chroma_h1v2", [(2, 2), (1, 2), (1, 1)], {}),
        ("luma_coarser_than_chroma", [(1, 1), (2, 2), (2, 2)], {}),
        ("separate_scans_restart_420", [(2, 2), (1, 1), (1, 1)],
         dict(separate_scans=True, restart=5)),
        ("no_marker_ids_123_422", [(2, 1), (1, 1), (1, 1)], dict(marker=None)),
    ]:
        fname = f"synthetic_{name}_{W}x{H}.jpg"
        (inp / fname).write_bytes(encode_jpeg(planes, samp, W, H, **kw))
        cases.append((fname, f"jpeg synthetic {samp} {kw}"))
    rgb_planes = [astronaut[150:191, 250:303, i] for i in range(3)]
    fname = f"synthetic_rgb_ids_{W}x{H}.jpg"
    (inp / fname).write_bytes(encode_jpeg(rgb_planes, [(1, 1), (2, 1), (1, 1)], W, H, marker=None,
                                          ids=(ord("R"), ord("G"), ord("B"))))
    cases.append((fname, "jpeg synthetic RGB by component ids 'R','G','B'"))
    return cases


def write_rgb(path: Path, arr: np.ndarray):
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    path.write_bytes(np.ascontiguousarray(arr).tobytes())


def main_fixtures():
    if OUT.exists():
        shutil.rmtree(OUT)
    for d in ("inputs", "decoded", "resize", "preprocess"):
        (OUT / d).mkdir(parents=True)
    cases = make_inputs(OUT / "inputs")
    manifest = {
        "generator": "tools/make_vision_fixtures.py",
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "decode": [],
        "rejected": [{"file": "inputs/camera_gray16_12x10.png", "contains": "16-bit"}],
        "resize": [],
        "preprocess": [],
    }
    decoded = {}
    for name, kind in cases:
        rgb = pil_rgb(OUT / "inputs" / name)
        decoded[name] = rgb
        stem = name.rsplit(".", 1)[0]
        write_rgb(OUT / "decoded" / f"{stem}.rgb", rgb)
        manifest["decode"].append({
            "file": f"inputs/{name}", "kind": kind,
            "width": rgb.shape[1], "height": rgb.shape[0], "decoded": f"decoded/{stem}.rgb",
        })

    # Resize parity, starting from PIL's decoded pixels (independent of our decoders).
    rng = np.random.default_rng(7)
    resize_cases = {
        # Pillow 13 runs the vertical pass first when in_h - out_h > 2 * (in_w - out_w):
        # 130x159 is just on the horizontal-first side of that rule, 130x158 just over it.
        "astronaut_rgb_157x213.png": [(64, 87), (24, 24), (300, 41), (157, 100), (80, 213), (170, 231),
                                      (1, 1), (130, 159), (130, 158)],
        "coffee_rgb_301x97.png": [(104, 33), (336, 108), (300, 5)],
        "chelsea_420_173x131.jpg": [(97, 75), (173, 30)],
        "camera_gray_120x90.png": [(7, 5), (119, 89), (161, 121)],
        "astronaut_palette8_90x70.png": [(45, 35), (91, 71)],
    }
    tall = rng.integers(0, 256, (600, 5, 3), dtype=np.uint8)  # both pass orders, see above
    thin = rng.integers(0, 256, (3, 700, 3), dtype=np.uint8)
    extra = {"random_tall_5x600": (tall, [(4, 480), (3, 599), (5, 300), (9, 100)]),
             "random_wide_700x3": (thin, [(350, 2), (699, 3), (100, 7)])}
    srcs = [(n.rsplit(".", 1)[0], decoded[n], sizes, f"decoded/{n.rsplit('.', 1)[0]}.rgb")
            for n, sizes in resize_cases.items()]
    for stem, (arr, sizes) in extra.items():
        write_rgb(OUT / "decoded" / f"{stem}.rgb", arr)
        srcs.append((stem, arr, sizes, f"decoded/{stem}.rgb"))
    for stem, rgb, sizes, src in srcs:
        for w, h in sizes:
            out = np.array(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
            # Stored as 8-bit RGB PNG to save space (lossless; RGB8 PNG decoding is itself
            # checked against raw arrays by the decode fixtures).
            rel = f"resize/{stem}__{w}x{h}.png"
            Image.fromarray(out, "RGB").save(OUT / rel, optimize=True)
            manifest["resize"].append({"src": src, "src_width": rgb.shape[1], "src_height": rgb.shape[0],
                                       "width": w, "height": h, "out": rel})

    # Full preprocessing, from the PIL-decoded pixels ("src") and, for the pipeline test, from the
    # file itself ("file", which adds our decoder's error for JPEGs).
    configs = {
        "clip32": clip_cfg(32, (32, 32)),
        "se48_crop40x24": clip_cfg(48, (40, 24)),
        "se20_crop30x26_pad": clip_cfg(20, (30, 26)),
        "se36_nocrop": clip_cfg(36, None),
        "hw28x44_crop16": clip_cfg(hw=(28, 44), crop=(16, 16)),
        "noresize_crop40": clip_cfg(336, (40, 40), do_resize=False),
        "clip24_norescale": clip_cfg(24, (24, 24), do_rescale=False),
    }
    pre_cases = [
        ("astronaut_rgb_157x213.png", ["clip32", "se48_crop40x24", "se20_crop30x26_pad", "se36_nocrop",
                                       "hw28x44_crop16", "noresize_crop40", "clip24_norescale"]),
        ("coffee_rgb_301x97.png", ["clip32", "se20_crop30x26_pad"]),
        ("camera_gray_120x90.png", ["clip32"]),
        ("chelsea_rgba_96x80.png", ["clip32"]),
        ("astronaut_palette8_90x70.png", ["se48_crop40x24"]),
        ("chelsea_420_173x131.jpg", ["clip32", "se48_crop40x24"]),
        ("coffee_progressive_177x139.jpg", ["clip32"]),
        ("camera_gray_121x97.jpg", ["clip32"]),
    ]
    for name, cfg_names in pre_cases:
        stem = name.rsplit(".", 1)[0]
        for cn in cfg_names:
            cfg = configs[cn]
            out = clip_preprocess(decoded[name], cfg)
            rel = f"preprocess/{stem}__{cn}.f32"
            (OUT / rel).write_bytes(out.astype("<f4").tobytes())
            manifest["preprocess"].append({
                "file": f"inputs/{name}", "src": f"decoded/{stem}.rgb",
                "src_width": decoded[name].shape[1], "src_height": decoded[name].shape[0],
                "config": cfg, "out": rel, "shape": list(out.shape),
            })

    # LLaVA-1.5's real setting (336): the resized+cropped bytes, plus every byte value's
    # normalised float per channel (the f32 output is a per-channel function of the byte).
    name = "chelsea_420_173x131.jpg"
    cfg = clip_cfg(336, (336, 336))
    img = decoded[name]
    nh, nw = resize_output_size(img.shape[0], img.shape[1], 336)
    crop = center_crop(np.array(Image.fromarray(img).resize((nw, nh), resample=3)), 336, 336)
    Image.fromarray(crop, "RGB").save(OUT / "preprocess" / "chelsea_420_173x131__clip336_bytes.png", optimize=True)
    table = clip_preprocess(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2),
                            {**cfg, "do_resize": False, "do_center_crop": False})
    (OUT / "preprocess" / "clip_byte_table.f32").write_bytes(table.astype("<f4").tobytes())
    manifest["clip336"] = {
        "src": "decoded/chelsea_420_173x131.rgb", "src_width": img.shape[1], "src_height": img.shape[0],
        "bytes": "preprocess/chelsea_420_173x131__clip336_bytes.png",
        "byte_table": "preprocess/clip_byte_table.f32", "byte_table_shape": [3, 1, 256],
    }

    (OUT / "llava_preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": CLIP_MEAN, "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD, "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
    }, indent=2) + "\n")
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


def check_transformers():
    """Compare the committed float fixtures with the real CLIPImageProcessor (PIL backend)."""
    import transformers

    try:  # transformers 5.x: explicit PIL backend class
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:  # 4.x: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Proc
    manifest = json.loads((OUT / "manifest.json").read_text())
    worst = 0.0
    for e in manifest["preprocess"]:
        cfg = dict(e["config"])
        rgb = np.fromfile(OUT / e["src"], dtype=np.uint8).reshape(e["src_height"], e["src_width"], 3)
        kwargs = {k: v for k, v in cfg.items()}
        if "crop_size" not in kwargs:
            kwargs["crop_size"] = {"height": 1, "width": 1}
        proc = Proc(**kwargs)
        got = proc(images=Image.fromarray(rgb), return_tensors="np")["pixel_values"][0]
        ref = np.fromfile(OUT / e["out"], dtype="<f4").reshape(e["shape"])
        d = float(np.abs(got.astype(np.float64) - ref).max()) if got.shape == ref.shape else math.inf
        worst = max(worst, d)
        print(f"{e['out']}: shape {got.shape} vs {ref.shape}, max |diff| {d:.3g}")
    # LLaVA's 336 setting, built from the committed preprocessor_config.json.
    c = manifest["clip336"]
    proc = Proc(**json.loads((OUT / "llava_preprocessor_config.json").read_text()))
    rgb = np.fromfile(OUT / c["src"], dtype=np.uint8).reshape(c["src_height"], c["src_width"], 3)
    got = proc(images=Image.fromarray(rgb), return_tensors="np")["pixel_values"][0]
    crop = np.array(Image.open(OUT / c["bytes"]))
    table = np.fromfile(OUT / c["byte_table"], dtype="<f4").reshape(3, 256)
    ref = np.stack([table[ch][crop[:, :, ch]] for ch in range(3)])
    d = float(np.abs(got.astype(np.float64) - ref).max())
    worst = max(worst, d)
    print(f"clip336 from llava_preprocessor_config.json: shape {got.shape}, max |diff| {d:.3g}")
    print(f"transformers {transformers.__version__} ({Proc.__name__}): worst max |diff| {worst:.3g}")
    return 0 if worst == 0.0 else 1


def jpeg_study(out: Path):
    """Larger real photos as JPEG, with PIL's decode and its 336 CLIP resize, for the ignored
    `jpeg_decode_study` test (not committed)."""
    from skimage import data as skd

    skdir = Path(skd.__file__).parent
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    jpegs = []
    for f in ("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg"):  # camera-made JPEGs as shipped
        jpegs.append((f, (skdir / f).read_bytes()))
    for nm in ("astronaut", "coffee", "chelsea", "immunohistochemistry"):
        arr = getattr(skd, nm)()
        for q, sub, prog in ((75, 2, False), (90, 2, True), (95, 0, False), (85, 1, False)):
            b = io.BytesIO()
            Image.fromarray(arr).save(b, "JPEG", quality=q, subsampling=sub, progressive=prog)
            jpegs.append((f"{nm}_q{q}_s{sub}{'_prog' if prog else ''}.jpg", b.getvalue()))
    for name, data in jpegs:
        (out / name).write_bytes(data)
        rgb = pil_rgb(out / name)
        write_rgb(out / f"{name}.rgb", rgb)
        nh, nw = resize_output_size(rgb.shape[0], rgb.shape[1], 336)
        res = np.array(Image.fromarray(rgb).resize((nw, nh), resample=3))
        write_rgb(out / f"{name}.336.rgb", res)
        pre = clip_preprocess(rgb, clip_cfg(336, (336, 336)))
        (out / f"{name}.pre336.f32").write_bytes(pre.astype("<f4").tobytes())
        entries.append({"file": name, "width": rgb.shape[1], "height": rgb.shape[0],
                        "decoded": f"{name}.rgb", "resized": f"{name}.336.rgb",
                        "resized_width": nw, "resized_height": nh,
                        "preprocessed": f"{name}.pre336.f32"})
    (out / "manifest.json").write_text(json.dumps(entries, indent=1))
    print(f"wrote {len(entries)} JPEGs to {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-transformers", action="store_true")
    ap.add_argument("--jpeg-study", type=Path)
    args = ap.parse_args()
    if args.check_transformers:
        sys.exit(check_transformers())
    if args.jpeg_study:
        jpeg_study(args.jpeg_study)
    else:
        if PIL.__version__ != "13.0.0":
            sys.exit(f"pillow {PIL.__version__} found; the fixtures are pinned to pillow==13.0.0")
        main_fixtures()
