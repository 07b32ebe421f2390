//! The `fastrm` binary as scripts use it: the `--json` contract, and every kind of bad input ending
//! in a one-line error that names the problem, a non-zero exit, and no panic.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{
    copy_model, fixture_dir, fixture_image, read_safetensors, write_safetensors, Expected,
};
use safetensors::Dtype;

fn fastrm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn generate(model: &Path, image: &Path, prompt: &str, extra: &[&str]) -> Output {
    let (m, i) = (model.to_str().unwrap(), image.to_str().unwrap());
    let mut args = vec!["generate", "--model", m, "--image", i, "--prompt", prompt];
    args.extend_from_slice(extra);
    fastrm(&args)
}

/// Asserts a clean failure: exit code 1, nothing on stdout, a single `error:` line mentioning every
/// needle, and no panic.
fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "partial stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    for n in needles {
        assert!(
            stderr.to_lowercase().contains(&n.to_lowercase()),
            "stderr {stderr:?} should mention {n:?}"
        );
    }
}

#[test]
fn json_contract_matches_the_oracle() {
    let exp = Expected::load("tiny");
    let want = exp.ids("generated_ids");
    let out = generate(
        &fixture_dir("tiny"),
        &fixture_image("tiny"),
        &exp.meta["question"],
        &["--json", "--max-new-tokens", &want.len().to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let ids = |k: &str| common::json_ids(&v, k);
    assert_eq!(ids("input_ids"), exp.ids("input_ids"));
    // The logits that chose the first token, as transformers computed them.
    let first = common::json_f32s(&v, "first_step_logits");
    let (lshape, logits) = exp.f32("logits");
    common::assert_close("first_step_logits", &first, &logits[..lshape[1]], 1e-4);
    // Generation may stop at EOS before the oracle's forced length; it must agree up to there.
    let got = ids("generated_ids");
    assert!(!got.is_empty() && got.len() <= want.len());
    assert_eq!(got[..], want[..got.len()]);
    assert!(v["text"].is_string());
    let stop = v["stop_reason"].as_str().unwrap();
    assert!(
        ["eos", "max_new_tokens"].contains(&stop),
        "stop_reason {stop}"
    );
    assert_eq!(
        stop == "eos",
        got.len() < want.len()
            || exp.meta["eos_token_id"].parse::<u32>().ok() == got.last().copied()
    );
}

#[test]
fn plain_output_is_the_answer_text() {
    let out = generate(
        &fixture_dir("tiny"),
        &fixture_image("tiny"),
        "What colour?",
        &["--max-new-tokens", "3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn bad_arguments() {
    let model = fixture_dir("tiny");
    let image = fixture_image("tiny");
    assert_fails(
        &generate(&model, &image, "Hi?", &["--max-new-tokens", "0"]),
        &["max-new-tokens"],
    );
    assert_fails(&generate(&model, &image, "", &[]), &["question is empty"]);
    assert_fails(
        &generate(&model, &image, "<image> again?", &[]),
        &["<image>"],
    );
    let long = "why ".repeat(400);
    assert_fails(&generate(&model, &image, &long, &[]), &["context"]);
    assert_fails(
        &generate(&model, &image, "Hi?", &["--device", "cuda"]),
        &["cuda"],
    );
    let out = fastrm(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_fails(&out, &["--image"]);
}

#[test]
fn bad_images() {
    let model = fixture_dir("tiny");
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.png");
    assert_fails(&generate(&model, &missing, "Hi?", &[]), &["nope.png"]);
    let empty = tmp.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    assert_fails(&generate(&model, &empty, "Hi?", &[]), &["empty.jpg"]);
    let text = tmp.path().join("notes.png");
    std::fs::write(&text, b"this is not an image at all").unwrap();
    assert_fails(&generate(&model, &text, "Hi?", &[]), &["notes.png"]);
    let png = std::fs::read(fixture_image("tiny")).unwrap();
    let cut = tmp.path().join("cut.png");
    std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
    assert_fails(&generate(&model, &cut, "Hi?", &[]), &["cut.png"]);
}

#[test]
fn bad_model_folders() {
    let image = fixture_image("tiny");
    let run = |dir: &Path| generate(dir, &image, "Hi?", &["--max-new-tokens", "2"]);

    assert_fails(&run(Path::new("/definitely/not/here")), &["not a folder"]);

    let m = copy_model("tiny", "");
    std::fs::remove_file(m.path().join("model.safetensors")).unwrap();
    assert_fails(&run(m.path()), &["model.safetensors"]);

    let m = copy_model("tiny", "");
    std::fs::remove_file(m.path().join("tokenizer.json")).unwrap();
    assert_fails(&run(m.path()), &["tokenizer.json"]);

    let m = copy_model("tiny", "");
    std::fs::write(m.path().join("config.json"), "{\"model_type\": \"llava\", ").unwrap();
    assert_fails(&run(m.path()), &["config.json", "JSON"]);

    let m = copy_model("tiny", "");
    let cfg = std::fs::read_to_string(m.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["text_config"]["hidden_size"] = serde_json::json!("big");
    std::fs::write(m.path().join("config.json"), v.to_string()).unwrap();
    assert_fails(&run(m.path()), &["text_config.hidden_size"]);
}

#[test]
fn bad_checkpoints() {
    let image = fixture_image("tiny");
    let run = |dir: &Path| generate(dir, &image, "Hi?", &["--max-new-tokens", "2"]);
    let st = |m: &tempfile::TempDir| m.path().join("model.safetensors");

    // Truncated: the header promises more bytes than the file has.
    let m = copy_model("tiny", "");
    let bytes = std::fs::read(st(&m)).unwrap();
    std::fs::write(st(&m), &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(
        &run(m.path()),
        &["model.safetensors", "truncated or corrupt"],
    );

    // Shorter than the header length itself, and empty.
    std::fs::write(st(&m), &bytes[..5]).unwrap();
    assert_fails(&run(m.path()), &["model.safetensors", "truncated"]);
    std::fs::write(st(&m), b"").unwrap();
    assert_fails(&run(m.path()), &["model.safetensors"]);

    // A header whose offsets point past the end of the file (same length, doctored JSON).
    let m = copy_model("tiny", "");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    let end = bytes.len() as u64 * 4;
    header[&name]["data_offsets"] = serde_json::json!([end - 4, end]);
    let mut text = header.to_string().into_bytes();
    text.resize(n.max(text.len()), b' ');
    let mut doctored = (text.len() as u64).to_le_bytes().to_vec();
    doctored.extend_from_slice(&text);
    doctored.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(st(&m), &doctored).unwrap();
    assert_fails(
        &run(m.path()),
        &["model.safetensors", "invalid safetensors"],
    );

    // A missing tensor, a wrong shape, an unsupported dtype.
    let target = "language_model.model.layers.1.mlp.up_proj.weight";
    let m = copy_model("tiny", "");
    let mut ts = read_safetensors(&st(&m));
    ts.retain(|t| t.name != target);
    write_safetensors(&st(&m), &ts);
    assert_fails(&run(m.path()), &["missing tensor", target]);

    let m = copy_model("tiny", "");
    let mut ts = read_safetensors(&st(&m));
    let t = ts.iter_mut().find(|t| t.name == target).unwrap();
    t.shape = vec![t.shape[1], t.shape[0]];
    write_safetensors(&st(&m), &ts);
    assert_fails(&run(m.path()), &[target, "shape"]);

    let m = copy_model("tiny", "");
    let mut ts = read_safetensors(&st(&m));
    let t = ts.iter_mut().find(|t| t.name == target).unwrap();
    t.dtype = Dtype::I32;
    write_safetensors(&st(&m), &ts);
    assert_fails(&run(m.path()), &[target, "dtype"]);
}

/// Without `--model` the bundled demo model comes out of the binary itself: it answers from a
/// working directory outside the source tree, with no build-time path to lean on.
#[test]
fn demo_model_runs_outside_the_source_tree() {
    let cwd = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["generate", "-p", "What color is the star?"])
        .current_dir(cwd.path())
        .env_remove("CARGO_MANIFEST_DIR")
        .env("XDG_CACHE_HOME", cache.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yellow");
    let demo: Vec<_> = std::fs::read_dir(cache.path().join("fastrm"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        demo.len() == 1 && demo[0].starts_with("demo-"),
        "one complete demo folder, no temporary ones: {demo:?}"
    );
}

/// clap checks its flags when a command is first parsed: `--help` on every command catches two
/// flags sharing a short name, which would otherwise panic at run time.
#[test]
fn every_command_has_help() {
    for cmd in [
        "generate",
        "explain",
        "train",
        "distill",
        "eval",
        "profile",
        "synth-model",
    ] {
        let out = fastrm(&[cmd, "--help"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd} --help: {stderr}");
        assert!(!stderr.contains("panicked"), "{cmd} --help: {stderr}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage"), "{cmd} --help: {help}");
        if cmd == "profile" {
            for flag in ["-m, --model", "-t, --threads", "--device", "--dtype"] {
                assert!(help.contains(flag), "profile --help lacks {flag}: {help}");
            }
        }
    }
    assert!(fastrm(&["--help"]).status.success());
}

/// `synth-model` refuses what it cannot write before writing anything, naming the problem.
#[test]
fn synth_model_refuses_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("new");
    let fresh = fresh.to_str().unwrap();
    let existing = tmp.path().to_str().unwrap();
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--like", "llava-9b", "--out", fresh],
            &["llava-9b", "llava-1.5-7b"],
        ),
        (
            &["--like", "llava-1.5-7b", "--out", existing],
            &["already exists"],
        ),
        (
            &["--config", "/no/such.json", "--out", fresh],
            &["/no/such.json"],
        ),
        (
            &["--like", "llava-1.5-7b", "--shards", "0", "--out", fresh],
            &["--shards"],
        ),
    ];
    for (args, needles) in cases {
        let mut all = vec!["synth-model"];
        all.extend(args);
        assert_fails(&fastrm(&all), needles);
    }
    assert!(!tmp.path().join("new").exists(), "nothing written");
}

/// A build without the `cuda` feature refuses a GPU with a reason, not a crash.
#[cfg(not(feature = "cuda"))]
#[test]
fn cpu_only_build_refuses_cuda() {
    for device in ["cuda", "cuda:1"] {
        let out = fastrm(&["generate", "--device", device, "-p", "hi"]);
        assert_fails(&out, &["rebuild with the `cuda` feature"]);
    }
}

/// stdout that cannot take the output: a full disk is an `error:` line and exit 1; a reader that
/// has gone ends the process by SIGPIPE, quietly — never a panic (exit 101).
#[test]
fn unwritable_stdout_is_an_error_and_a_closed_pipe_is_quiet() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["explain", "-p", "What color is the star?"])
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: <stdout>") && !stderr.contains("panicked"),
        "{stderr}"
    );

    // The read end is closed before the command writes: its first line meets a closed pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["explain", "-p", "What color is the star?"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    const SIGPIPE: i32 = 13; // on Linux
    assert_eq!(
        out.status.signal(),
        Some(SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "{stderr}");
}

/// `--prompt -` reads the question from standard input; empty or non-UTF-8 input is an error.
#[test]
fn prompt_from_stdin() {
    use std::io::Write;
    let run = |input: &[u8], cmd: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastrm"))
            .args([cmd, "--prompt", "-", "--json"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    for cmd in ["generate", "explain"] {
        let out = run(b"What color is the star?\n", cmd);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["prompt"], "What color is the star?", "{cmd}");
        assert_eq!(doc["text"], "yellow", "{cmd}");
    }
    assert_fails(&run(b"", "generate"), &["--prompt -", "empty"]);
    assert_fails(&run(b"\xff\xfe what", "explain"), &["--prompt -", "UTF-8"]);
}

/// An image of extreme aspect ratio: an error naming the file and why, not a resize failure.
#[test]
fn extreme_aspect_ratio_names_the_file_and_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("strip.png");
    let img = fastrm::vision::RgbImage::new(4000, 2, vec![128; 4000 * 2 * 3]).unwrap();
    fastrm::render::write_png(&path, &img).unwrap();
    let out = fastrm(&[
        "generate",
        "--image",
        path.to_str().unwrap(),
        "-p",
        "What is it?",
    ]);
    assert_fails(&out, &["strip.png", "aspect ratio", "4000x2"]);
}

/// `--kv-memory` fixes the KV cache: too small for one page, or for the run, is a named error;
/// enough gives the answer of the default cache.
#[test]
fn kv_memory_bounds_the_cache_and_says_what_is_missing() {
    let q = ["generate", "--prompt", "What color is the star?", "--json"];
    let run = |extra: &[&str]| fastrm(&[&q[..], extra].concat());
    assert_fails(
        &run(&["--kv-memory", "1KiB"]),
        &["--kv-memory", "holds no page"],
    );
    assert_fails(
        &run(&["--kv-memory", "64KiB"]),
        &["KV cache full", "pages of 16"],
    );
    // A value clap refuses: its usage error (exit 2), naming the flag.
    let bad = run(&["--kv-memory", "lots"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--kv-memory") && stderr.contains("not a size"),
        "{stderr}"
    );
    let want = run(&[]);
    let got = run(&["--kv-memory", "8MiB"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let ids = |o: &Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["generated_ids"].clone()
    };
    assert_eq!(ids(&got), ids(&want));
}
