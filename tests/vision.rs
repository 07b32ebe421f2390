//! Parity of `fastrm::vision` with PIL 13.0 / transformers' CLIPImageProcessor (PIL backend), on
//! fixtures written by `tools/make_vision_fixtures.py` (see its docstring for the command), plus
//! bad-input handling.
//!
//! Bounds asserted here:
//! - Decoding, PNG (every colour type / depth) and JPEG (baseline, progressive, every sampling
//!   layout libjpeg-turbo upsamples differently, restart markers, RGB JPEGs): bit-exact.
//! - Resize (`resize_bicubic`) from PIL-decoded pixels: bit-exact.
//! - Full preprocessing, from PIL-decoded pixels and from the files: every float within 1e-6
//!   (bit-identical in practice; the count of non-identical floats is printed).

use std::path::{Path, PathBuf};

use fastrm::error::Error;
use fastrm::vision::{
    center_crop, load_and_preprocess, load_image, load_image_bytes, preprocess, resize_and_crop,
    resize_bicubic, resize_output_size, PreprocessConfig, RgbImage,
};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vision")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(dir().join("manifest.json"))
        .expect("tests/fixtures/vision/manifest.json (run tools/make_vision_fixtures.py)");
    serde_json::from_str(&text).unwrap()
}

fn u(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

fn read_rgb(rel: &str, w: usize, h: usize) -> RgbImage {
    let data = std::fs::read(dir().join(rel)).unwrap();
    RgbImage::new(w, h, data).unwrap()
}

fn read_f32(rel: &str) -> Vec<f32> {
    std::fs::read(dir().join(rel))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The config as the fixture wrote it, through our own `preprocessor_config.json` parser.
fn config(v: &Value) -> PreprocessConfig {
    PreprocessConfig::from_json_str(&v.to_string(), Path::new("<fixture config>")).unwrap()
}

/// (number of differing values, max |diff|)
fn byte_diff(a: &[u8], b: &[u8]) -> (usize, u8) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold((0, 0), |(n, m), (&x, &y)| {
        let d = x.abs_diff(y);
        (n + (d != 0) as usize, m.max(d))
    })
}

/// (number of values not bit-identical, max |diff|)
fn float_diff(a: &[f32], b: &[f32]) -> (usize, f32) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold((0, 0.0f32), |(n, m), (&x, &y)| {
        (
            n + (x.to_bits() != y.to_bits()) as usize,
            m.max((x - y).abs()),
        )
    })
}

#[test]
fn decoding_matches_pil_exactly() {
    let m = manifest();
    let (mut png, mut jpeg) = (0, 0);
    for e in m["decode"].as_array().unwrap() {
        let file = e["file"].as_str().unwrap();
        let got = load_image(&dir().join(file)).unwrap_or_else(|err| panic!("{file}: {err}"));
        let want = read_rgb(
            e["decoded"].as_str().unwrap(),
            u(&e["width"]),
            u(&e["height"]),
        );
        assert_eq!((got.width, got.height), (want.width, want.height), "{file}");
        let (n, max) = byte_diff(&got.data, &want.data);
        assert_eq!(
            n,
            0,
            "{file} ({}): {n}/{} values differ from PIL's convert(\"RGB\"), max |diff| {max}",
            e["kind"],
            want.data.len()
        );
        if file.ends_with(".png") {
            png += 1;
        } else {
            jpeg += 1;
        }
    }
    println!("decode: {png} PNG and {jpeg} JPEG fixtures bit-identical to PIL");
    assert!(
        png >= 14 && jpeg >= 19,
        "only {png} PNG / {jpeg} JPEG fixtures"
    );
}

#[test]
fn sixteen_bit_grey_png_is_rejected_with_a_reason() {
    let m = manifest();
    for e in m["rejected"].as_array().unwrap() {
        let path = dir().join(e["file"].as_str().unwrap());
        let err = load_image(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Image { .. }), "{msg}");
        assert!(msg.contains(e["contains"].as_str().unwrap()), "{msg}");
        assert!(msg.contains("camera_gray16_12x10.png"), "{msg}");
    }
}

#[test]
fn resize_matches_pil_bicubic_exactly() {
    let m = manifest();
    let (mut total, mut exact_cases) = (0usize, 0usize);
    let mut failures = Vec::new();
    for e in m["resize"].as_array().unwrap() {
        let src = read_rgb(
            e["src"].as_str().unwrap(),
            u(&e["src_width"]),
            u(&e["src_height"]),
        );
        let (w, h) = (u(&e["width"]), u(&e["height"]));
        let out = e["out"].as_str().unwrap();
        let want = load_image(&dir().join(out)).unwrap();
        let got = resize_bicubic(&src, w, h).unwrap();
        assert_eq!((got.width, got.height), (w, h));
        let (n, max) = byte_diff(&got.data, &want.data);
        total += 1;
        if n == 0 {
            exact_cases += 1;
        } else {
            failures.push(format!(
                "{out}: {n}/{} values differ ({:.4}%), max |diff| {max}",
                want.data.len(),
                100.0 * n as f64 / want.data.len() as f64
            ));
        }
    }
    println!("resize: {exact_cases}/{total} cases bit-exact vs PIL");
    assert!(
        failures.is_empty(),
        "{exact_cases}/{total} resize cases bit-exact; differing:\n{}",
        failures.join("\n")
    );
    assert!(total >= 25);
}

#[test]
fn preprocess_matches_transformers_from_pil_pixels() {
    let m = manifest();
    let mut worst = 0.0f32;
    let mut not_bit_exact = 0;
    let mut values = 0;
    for e in m["preprocess"].as_array().unwrap() {
        let src = read_rgb(
            e["src"].as_str().unwrap(),
            u(&e["src_width"]),
            u(&e["src_height"]),
        );
        let cfg = config(&e["config"]);
        let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(u).collect();
        assert_eq!(
            cfg.output_size(src.width, src.height),
            (shape[1], shape[2]),
            "{}",
            e["out"]
        );
        let got = preprocess(&src, &cfg).unwrap();
        let want = read_f32(e["out"].as_str().unwrap());
        let (n, max) = float_diff(&got, &want);
        assert!(
            max <= 1e-6,
            "{}: {n}/{} floats differ, max |diff| {max:e}",
            e["out"],
            want.len()
        );
        worst = worst.max(max);
        not_bit_exact += n;
        values += want.len();
    }
    println!(
        "preprocess from PIL pixels: {not_bit_exact}/{values} floats not bit-identical, max |diff| {worst:e}"
    );
}

#[test]
fn full_pipeline_from_files() {
    let m = manifest();
    for e in m["preprocess"].as_array().unwrap() {
        let file = e["file"].as_str().unwrap();
        let cfg = config(&e["config"]);
        let got = load_and_preprocess(&dir().join(file), &cfg).unwrap();
        let want = read_f32(e["out"].as_str().unwrap());
        let (n, max) = float_diff(&got, &want);
        assert!(
            max <= 1e-6,
            "{file} -> {}: {n} floats differ, max |diff| {max:e}",
            e["out"]
        );
    }
}

#[test]
fn llava_336_config_and_pipeline() {
    let cfg = PreprocessConfig::from_file(&dir().join("llava_preprocessor_config.json")).unwrap();
    assert_eq!(cfg, PreprocessConfig::clip(336));
    assert_eq!(cfg.rescale_factor_f64(), 0.00392156862745098);

    let m = &manifest()["clip336"];
    let src = read_rgb(
        m["src"].as_str().unwrap(),
        u(&m["src_width"]),
        u(&m["src_height"]),
    );
    // Bytes after resize + crop.
    let (w, h) = resize_output_size(src.width, src.height, 336);
    let cropped = center_crop(&resize_bicubic(&src, w, h).unwrap(), 336, 336).unwrap();
    let want = load_image(&dir().join(m["bytes"].as_str().unwrap())).unwrap();
    let (n, max) = byte_diff(&cropped.data, &want.data);
    assert_eq!(n, 0, "336 resize+crop: {n} values differ, max |diff| {max}");
    assert_eq!(resize_and_crop(&src, &cfg).unwrap(), want);

    // Floats: the output is a per-channel function of the byte, tabulated by numpy.
    let table = read_f32(m["byte_table"].as_str().unwrap()); // [3, 1, 256]
    let out = preprocess(&src, &cfg).unwrap();
    assert_eq!(out.len(), 3 * 336 * 336);
    let plane = 336 * 336;
    for (i, px) in want.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let expect = table[c * 256 + px[c] as usize];
            assert_eq!(
                out[c * plane + i].to_bits(),
                expect.to_bits(),
                "pixel {i} channel {c}: {} vs numpy {expect}",
                out[c * plane + i]
            );
        }
    }
}

#[test]
fn config_parsing_variants_and_errors() {
    let p = Path::new("cfg.json");
    let parse = |s: &str| PreprocessConfig::from_json_str(s, p);
    let c = parse(r#"{"size": 300, "crop_size": 256}"#).unwrap();
    assert_eq!((c.shortest_edge, c.resize_to), (300, None));
    assert_eq!((c.crop_height, c.crop_width), (256, 256));
    let c = parse(r#"{"size": {"height": 20, "width": 30}, "crop_size": [10, 12]}"#).unwrap();
    assert_eq!(c.resize_to, Some((20, 30)));
    assert_eq!((c.crop_height, c.crop_width), (10, 12));
    assert_eq!(c.output_size(100, 50), (10, 12));
    let c = parse(r#"{"image_mean": 0.5, "image_std": [1, 2, 3], "do_normalize": false}"#).unwrap();
    assert_eq!(c.image_mean, [0.5; 3]);
    assert_eq!(c.image_std, [1.0, 2.0, 3.0]);
    assert!(!c.do_normalize);
    assert_eq!(parse("{}").unwrap(), PreprocessConfig::clip(224));

    for (bad, needle) in [
        (r#"{"resample": 2}"#, "bilinear"),
        (
            r#"{"size": {"shortest_edge": 10, "longest_edge": 20}}"#,
            "longest_edge",
        ),
        (r#"{"size": 0}"#, "size"),
        (r#"{"crop_size": {"shortest_edge": 5}}"#, "crop_size"),
        (r#"{"image_std": [1, 0, 1]}"#, "image_std"),
        (r#"{"image_mean": [1, 2]}"#, "image_mean"),
        (r#"{"do_resize": "yes"}"#, "do_resize"),
        ("[1, 2]", "object"),
        ("{", "JSON"),
    ] {
        let err = parse(bad).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{bad}: {msg}");
        assert!(
            msg.contains(needle) && msg.contains("cfg.json"),
            "{bad}: {msg}"
        );
    }
    let missing = PreprocessConfig::from_file(Path::new("/nonexistent/preprocessor_config.json"));
    assert!(matches!(missing, Err(Error::Io { .. })));
}

#[test]
fn preprocess_rejects_invalid_inputs() {
    let bad = RgbImage {
        width: 4,
        height: 4,
        data: vec![0; 5],
    };
    assert!(preprocess(&bad, &PreprocessConfig::clip(8)).is_err());
    let img = RgbImage::new(4, 4, vec![7; 48]).unwrap();
    let mut cfg = PreprocessConfig::clip(8);
    cfg.crop_height = 0;
    assert!(preprocess(&img, &cfg).is_err());
    assert!(resize_bicubic(&img, 0, 3).is_err());
    assert!(resize_bicubic(&img, 100_000, 3).is_err());
    // An extreme aspect ratio whose long side would exceed the limit after resizing.
    let thin = RgbImage::new(16000, 1, vec![1; 48000]).unwrap();
    let err = preprocess(&thin, &PreprocessConfig::clip(336)).unwrap_err();
    assert!(
        err.to_string().contains("aspect ratio is too extreme"),
        "{err}"
    );
    assert!(RgbImage::new(0, 3, vec![]).is_err());
    assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
}

/// Asserts `result` is an error naming `name`, and returns its message.
fn expect_err(result: fastrm::Result<RgbImage>, name: &str, what: &str) -> String {
    match result {
        Ok(img) => panic!(
            "{what}: decoded a {}x{} image instead of failing",
            img.width, img.height
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(name),
                "{what}: message does not name the file: {msg}"
            );
            msg
        }
    }
}

#[test]
fn bad_inputs_give_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    // Missing file.
    let missing = tmp.path().join("missing.png");
    let err = load_image(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.png"), "{err}");

    // Zero bytes.
    let msg = expect_err(load_image(&write("empty.jpg", b"")), "empty.jpg", "empty");
    assert!(msg.contains("empty"), "{msg}");

    // Text with an image extension; random bytes; other formats.
    let msg = expect_err(
        load_image(&write("notes.png", b"hello, this is not a picture\n")),
        "notes.png",
        "text",
    );
    assert!(msg.contains("not a PNG or JPEG"), "{msg}");
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let noise: Vec<u8> = (0..4096).map(|_| rnd() as u8).collect();
    expect_err(
        load_image(&write("noise.bin", &noise)),
        "noise.bin",
        "noise",
    );
    let msg = expect_err(
        load_image(&write("anim.gif", b"GIF89a\x01\x00\x01\x00")),
        "anim.gif",
        "gif",
    );
    assert!(msg.contains("GIF"), "{msg}");

    // Truncated PNGs and JPEGs, cut at many points (including inside the signature).
    for name in [
        "astronaut_rgb_157x213.png",
        "astronaut_interlaced_45x37.png",
        "coffee_palette4_33x21.png",
        "chelsea_420_173x131.jpg",
        "coffee_progressive_177x139.jpg",
        "camera_gray_121x97.jpg",
    ] {
        let bytes = std::fs::read(dir().join("inputs").join(name)).unwrap();
        let mut cuts: Vec<usize> = (1..40).collect();
        cuts.extend((1..30).map(|i| bytes.len() * i / 30));
        cuts.extend([bytes.len() - 2, bytes.len() - 1]);
        for cut in cuts {
            if name.ends_with(".png") && cut >= bytes.len() - 24 {
                continue; // the tail after the image data: see png_with_a_cut_off_tail_decodes
            }
            let fname = format!("cut{cut}_{name}");
            let msg = expect_err(
                load_image_bytes(&bytes[..cut], Path::new(&fname)),
                &fname,
                &format!("{name} truncated to {cut} bytes"),
            );
            assert!(
                msg.contains("truncated") || msg.contains("corrupt") || msg.contains("PNG"),
                "{msg}"
            );
        }
    }

    // Absurd sizes in otherwise well-formed headers.
    let png_header = |w: u32, h: u32| {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        let mut chunk = b"IHDR".to_vec();
        chunk.extend_from_slice(&ihdr);
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
        out
    };
    let msg = expect_err(
        load_image(&write("huge.png", &png_header(20000, 10))),
        "huge.png",
        "huge png",
    );
    assert!(msg.contains("20000x10") && msg.contains("limit"), "{msg}");
    let msg = expect_err(
        load_image(&write("big.png", &png_header(16384, 16385))),
        "big.png",
        "big png",
    );
    assert!(msg.contains("limit"), "{msg}");
    // A JPEG whose SOF claims 60000x60000.
    let mut jpg = std::fs::read(dir().join("inputs/chelsea_420_173x131.jpg")).unwrap();
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let msg = expect_err(
        load_image(&write("huge.jpg", &jpg)),
        "huge.jpg",
        "huge jpeg",
    );
    assert!(msg.contains("60000x60000"), "{msg}");
}

/// Pillow decodes a PNG whose image data is complete even when the IDAT checksum and IEND chunk
/// are cut off (checked with Pillow 13.0 for these cuts); so do we, with the same pixels.
#[test]
fn png_with_a_cut_off_tail_decodes() {
    let name = "astronaut_rgb_157x213.png";
    let bytes = std::fs::read(dir().join("inputs").join(name)).unwrap();
    let full = load_image_bytes(&bytes, Path::new(name)).unwrap();
    for back in [1, 12, 13, 16, 17] {
        let cut = load_image_bytes(&bytes[..bytes.len() - back], Path::new(name))
            .unwrap_or_else(|e| panic!("cut {back} bytes: {e}"));
        assert_eq!(cut, full, "cut {back} bytes");
    }
    // Cutting into the image data itself is an error (Pillow: "image file is truncated").
    assert!(load_image_bytes(&bytes[..bytes.len() - 30], Path::new(name)).is_err());
}

#[test]
fn corrupted_files_never_panic() {
    // Flip bytes all over real fixtures: every outcome must be Ok or Err (a decoder panic would
    // be caught and turned into Err inside load_image_bytes; this checks no panic escapes).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for name in [
        "astronaut_palette8_90x70.png",
        "chelsea_rgb16_53x31.png",
        "astronaut_interlaced_45x37.png",
        "chelsea_420_173x131.jpg",
        "coffee_progressive_177x139.jpg",
        "astronaut_422_130x75.jpg",
    ] {
        let orig = std::fs::read(dir().join("inputs").join(name)).unwrap();
        for trial in 0..60 {
            let mut b = orig.clone();
            for _ in 0..1 + trial % 8 {
                let i = rnd() as usize % b.len();
                b[i] = rnd() as u8;
            }
            let _ = load_image_bytes(&b, Path::new(name));
        }
    }
}

/// Optional: JPEG decode and CLIP-resize differences on larger photos. Needs
/// `tools/make_vision_fixtures.py --jpeg-study DIR` and `VISION_JPEG_STUDY_DIR=DIR`; run with
/// `cargo test --test vision -- --ignored --nocapture jpeg_decode_study`.
#[test]
#[ignore]
fn jpeg_decode_study() {
    let Ok(d) = std::env::var("VISION_JPEG_STUDY_DIR") else {
        eprintln!("VISION_JPEG_STUDY_DIR not set; skipping");
        return;
    };
    let d = PathBuf::from(d);
    let entries: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap();
    let (mut all_n, mut all_len, mut all_max) = (0usize, 0usize, 0u8);
    let (mut r_n, mut r_n2, mut r_len, mut r_max) = (0usize, 0usize, 0usize, 0u8);
    let mut pre_worst = 0f32;
    for e in entries.as_array().unwrap() {
        let file = e["file"].as_str().unwrap();
        let got = load_image(&d.join(file)).unwrap();
        let raw = std::fs::read(d.join(e["decoded"].as_str().unwrap())).unwrap();
        let (n, max) = byte_diff(&got.data, &raw);
        let (w, h) = (u(&e["resized_width"]), u(&e["resized_height"]));
        let ours = resize_bicubic(&got, w, h).unwrap();
        let theirs = std::fs::read(d.join(e["resized"].as_str().unwrap())).unwrap();
        let (rn, rmax) = byte_diff(&ours.data, &theirs);
        let rn2 = ours
            .data
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.abs_diff(**b) > 1)
            .count();
        println!(
            "{file:44} {}x{}: decode {:6.2}% differ, max {max:2} | 336-resize {:6.2}% differ, \
             {:6.3}% by >1, max {rmax}",
            got.width,
            got.height,
            100.0 * n as f64 / raw.len() as f64,
            100.0 * rn as f64 / theirs.len() as f64,
            100.0 * rn2 as f64 / theirs.len() as f64
        );
        let pre = load_and_preprocess(&d.join(file), &PreprocessConfig::clip(336)).unwrap();
        let (fnum, fmax) = float_diff(&pre, &read_f32_at(&d, e["preprocessed"].as_str().unwrap()));
        println!(
            "{:44} file -> CLIP 336 floats: {fnum} not bit-identical, max |diff| {fmax:e}",
            ""
        );
        pre_worst = pre_worst.max(fmax);
        (all_n, all_len, all_max) = (all_n + n, all_len + raw.len(), all_max.max(max));
        (r_n, r_n2, r_len, r_max) = (r_n + rn, r_n2 + rn2, r_len + theirs.len(), r_max.max(rmax));
    }
    println!(
        "ALL: decode {:.2}% differ (max {all_max}); after 336 resize {:.2}% differ, {:.3}% by >1 \
         (max {r_max}); preprocessed floats max |diff| {pre_worst:e}",
        100.0 * all_n as f64 / all_len as f64,
        100.0 * r_n as f64 / r_len as f64,
        100.0 * r_n2 as f64 / r_len as f64
    );
}

fn read_f32_at(d: &Path, rel: &str) -> Vec<f32> {
    std::fs::read(d.join(rel))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// CRC-32 (PNG's polynomial), for hand-built chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
