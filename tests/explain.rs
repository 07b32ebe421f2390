//! `fastrm explain` as users and scripts see it: the JSON contract (maps equal to the oracle's),
//! the PNG outputs, and bad input that must fail cleanly without leaving a run that looks complete.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{assert_close, file_names, fixture_dir, fixture_image, maps_of, Expected};
use fastrm::explain::map_entropy;

fn explain(extra: &[&str]) -> Output {
    let model = fixture_dir("tiny");
    let image = fixture_image("tiny");
    let exp = Expected::load("tiny");
    let mut args = vec![
        "explain",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        &exp.meta["question"],
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

#[test]
fn json_contract_and_oracle_maps() {
    let exp = Expected::load("tiny");
    let gen = exp.ids("generated_ids");
    let v = json_of(&explain(&[
        "--json",
        "--method",
        "baseline",
        "--max-new-tokens",
        &gen.len().to_string(),
    ]));
    assert_eq!(v["method"], "baseline");
    assert_eq!(v["grid"], serde_json::json!([5, 5]));
    let ids: Vec<u32> = v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, gen);
    let input: Vec<u32> = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(input, exp.ids("input_ids"));
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), gen.len());
    let (shape, want) = exp.f32("relevancy");
    for (t, tok) in tokens.iter().enumerate() {
        assert_eq!(tok["id"].as_u64().unwrap() as u32, gen[t]);
        assert!(tok["text"].is_string());
        let map: Vec<f32> = tok["map"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(map.len(), 25);
        assert_close(
            &format!("cli map {t}"),
            &map,
            &want[t * shape[1]..(t + 1) * shape[1]],
            1e-4,
        );
        let h = tok["entropy"].as_f64().unwrap() as f32;
        assert!((h - map_entropy(&map)).abs() < 1e-6 && (0.0..=1.0).contains(&h));
    }
    // --full-r: the paper's materialised R gives the same maps.
    let full = json_of(&explain(&[
        "--json",
        "--method",
        "baseline",
        "--full-r",
        "--max-new-tokens",
        &gen.len().to_string(),
    ]));
    assert_eq!(full["full_r"], true);
    for (a, b) in maps_of(&full).iter().zip(maps_of(&v)) {
        assert_close("full-r map", a, &b, 1e-5);
    }
}

#[test]
fn entropy_definition() {
    assert!((map_entropy(&[1.0; 16]) - 1.0).abs() < 1e-6);
    assert_eq!(map_entropy(&[0.0, 0.0, 3.0, 0.0]), 0.0);
    assert_eq!(map_entropy(&[0.0; 9]), 1.0);
    let h = map_entropy(&[1.0, 1.0, 0.0, 0.0]);
    assert!(
        (h - 0.5).abs() < 1e-6,
        "two of four patches: ln2/ln4 = 0.5, got {h}"
    );
}

fn png_dims(path: &Path) -> (u32, u32) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec
        .read_info()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    (info.width, info.height)
}

#[test]
fn png_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("maps");
    // A stale file from a longer earlier run must not survive into this one.
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("token_099.png"), b"old").unwrap();
    let out = explain(&[
        "--method",
        "gradcam",
        "--max-new-tokens",
        "3",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        file_names(&out_dir),
        [
            "explain.json",
            "sheet.png",
            "token_000.png",
            "token_001.png",
            "token_002.png"
        ]
    );
    let (w0, h0) = png_dims(&out_dir.join("token_000.png"));
    assert!(
        w0 >= 30 && h0 > w0,
        "overlay {w0}x{h0}: the 30 px image plus caption and legend"
    );
    for i in 1..3 {
        assert_eq!(
            png_dims(&out_dir.join(format!("token_{i:03}.png"))),
            (w0, h0)
        );
    }
    let (sw, sh) = png_dims(&out_dir.join("sheet.png"));
    assert!(
        sw >= 2 * w0 && sh >= 2 * h0,
        "sheet {sw}x{sh} holds a 2x2 grid of {w0}x{h0}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("explain.json")).unwrap())
            .unwrap();
    assert_eq!(doc["method"], "gradcam");
    assert_eq!(doc["layer"], 1);
    assert_eq!(doc["tokens"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_input() {
    let fails = |out: &Output, needle: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "should fail: {needle}");
        assert!(
            err.contains(needle),
            "stderr {err:?} should mention {needle:?}"
        );
        assert!(out.stdout.is_empty());
    };
    fails(&explain(&["--method", "magic"]), "magic");
    fails(&explain(&["--method", "gradcam", "--full-r"]), "--full-r");
    fails(
        &explain(&["--method", "baseline", "--layer", "1"]),
        "--layer",
    );
    fails(
        &explain(&["--method", "gradcam", "--layer", "7"]),
        "layer 7",
    );
    fails(&explain(&["--max-new-tokens", "0"]), "max-new-tokens");

    // An output folder that cannot be created: its parent is a regular file.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("maps");
    fails(
        &explain(&["--method", "baseline", "--out", bad.to_str().unwrap()]),
        "plain-file",
    );

    // A run that fails after the folder was prepared leaves nothing that looks complete.
    let out_dir = tmp.path().join("maps");
    let model = fixture_dir("tiny");
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args([
            "explain",
            "--model",
            model.to_str().unwrap(),
            "--image",
            "/no/such/image.png",
            "--prompt",
            "hi",
            "--method",
            "baseline",
        ])
        .args(["--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    fails(&out, "image.png");
    // The run made the folder, so it takes it away again.
    assert!(!out_dir.exists(), "failed run left {}", out_dir.display());
}

#[test]
fn answer_confidence() {
    use fastrm::explain::Confidence;
    // EOS (id 2) is not part of the answer.
    let c = Confidence::of_answer(&[0.2, 0.4, 0.9], &[7, 8, 2], &[2], Some(0.5));
    assert!((c.mean_entropy - 0.3).abs() < 1e-6 && c.tokens == 2);
    assert_eq!(c.verdict(), "confident");
    assert_eq!(
        Confidence::of_answer(&[0.8], &[5], &[2], Some(0.5)).verdict(),
        "uncertain"
    );
    assert_eq!(
        Confidence::of_answer(&[0.8], &[5], &[2], None).verdict(),
        "uncalibrated"
    );
    // An answer that is only EOS still gets a number.
    assert_eq!(Confidence::of_answer(&[0.6], &[2], &[2], None).tokens, 1);
}

/// `--out` into one folder from several runs at once: each run's files replace the others' as a
/// whole, so explain.json always lists exactly the token PNGs the folder holds. And a run that
/// fails leaves no folder it created.
#[test]
fn concurrent_writers_and_failed_runs_leave_consistent_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shared");
    let bin = env!("CARGO_BIN_EXE_fastrm");
    for round in 0..40 {
        // Answers of 1, 2, 3 and 4 tokens (EOS ignored by the length limit where it comes later).
        let children: Vec<_> = (1..=4)
            .map(|n| {
                Command::new(bin)
                    .args(["explain", "-p", "What color is the star?", "-n"])
                    .arg(n.to_string())
                    .arg("--out")
                    .arg(&out)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success(), "round {round}");
        }
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("explain.json")).unwrap()).unwrap();
        let listed: Vec<String> = doc["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("token_{:03}.png", t["index"].as_u64().unwrap()))
            .collect();
        let present: Vec<String> = file_names(&out)
            .into_iter()
            .filter(|n| n.starts_with("token_"))
            .collect();
        assert_eq!(listed, present, "round {round}: explain.json vs the folder");
    }

    let fresh = tmp.path().join("never");
    let o = Command::new(bin)
        .args([
            "explain",
            "-p",
            "Hi?",
            "--image",
            "/nonexistent/x.png",
            "--out",
        ])
        .arg(&fresh)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(!fresh.exists(), "a failed run left {}", fresh.display());
}

/// Several `--image` flags: one `<image>` each, in order; every output says which image a map
/// is of: a PNG per token per image, and per token in the JSON the image count and a map of
/// every image's patches.
#[test]
fn several_images_give_a_map_per_image_in_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let second = tmp.path().join("second.png");
    let mut img = fastrm::vision::load_image(&fixture_image("tiny")).unwrap();
    for v in img.data.iter_mut().step_by(3) {
        *v = 255 - *v;
    }
    fastrm::render::write_png(&second, &img).unwrap();
    let out_dir = tmp.path().join("maps");
    let out = explain(&[
        "--image",
        second.to_str().unwrap(),
        "--method",
        "baseline",
        "--max-new-tokens",
        "2",
        "--json",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let doc = json_of(&out);
    assert_eq!(doc["images"].as_array().unwrap().len(), 2, "{doc}");
    let patches = 25;
    for t in doc["tokens"].as_array().unwrap() {
        assert_eq!(t["images"], 2);
        assert_eq!(t["map"].as_array().unwrap().len(), 2 * patches);
    }
    // One <image> per flag, in order, before the question.
    assert!(doc["prompt"].as_str().is_some());
    let ids: Vec<u64> = doc["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let image_token = 512;
    assert_eq!(
        ids.iter().filter(|&&i| i == image_token).count(),
        2 * patches
    );
    assert_eq!(
        file_names(&out_dir),
        [
            "explain.json",
            "sheet.png",
            "token_000_image1.png",
            "token_000_image2.png",
            "token_001_image1.png",
            "token_001_image2.png",
        ]
    );
    // The two images' overlays of one token differ: each is drawn from its own part of the map.
    let a = std::fs::read(out_dir.join("token_000_image1.png")).unwrap();
    let b = std::fs::read(out_dir.join("token_000_image2.png")).unwrap();
    assert_ne!(a, b);
}

/// A conversation without images is answered; asking for its maps is a named error.
#[test]
fn a_text_only_conversation_is_answered_and_its_maps_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("chat.json");
    std::fs::write(
        &file,
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]"#,
    )
    .unwrap();
    let model = fixture_dir("tiny");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fastrm"))
            .args(args)
            .args(["--model", model.to_str().unwrap(), "--messages"])
            .arg(&file)
            .args(["-n", "3", "--json"])
            .output()
            .unwrap()
    };
    let doc = json_of(&run(&["generate"]));
    assert_eq!(doc["generated_ids"].as_array().unwrap().len(), 3);
    assert_eq!(doc["images"], serde_json::json!([]));
    let out = run(&["explain", "--method", "baseline"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no image") && !err.contains("panicked"),
        "{err}"
    );
}
