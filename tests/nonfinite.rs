//! NaN or infinity in the weights is an error naming where it showed, never an answer made of
//! garbage (greedy decoding over NaN logits picks token 0 every step and looks like success).

mod common;

use std::process::Command;

use common::{cli_fails, copy_model, fixture_image, read_safetensors, write_safetensors};
use fastrm::backend::cpu::Cpu;
use fastrm::explain::fastrm::HeadWeights;
use fastrm::{Engine, Error, GenerateOptions, Method, Request};

/// The tiny fixture with the f32 elements `elems` of tensor `name` set to `value`.
fn damaged(name: &str, elems: std::ops::Range<usize>, value: f32) -> tempfile::TempDir {
    let dir = copy_model("tiny", "");
    let path = dir.path().join("model.safetensors");
    let mut tensors = read_safetensors(&path);
    let t = tensors.iter_mut().find(|t| t.name == name).unwrap();
    for i in elems {
        t.data[i * 4..i * 4 + 4].copy_from_slice(&value.to_le_bytes());
    }
    write_safetensors(&path, &tensors);
    dir
}

fn run(dir: &std::path::Path, method: Option<Method>) -> Result<(), Error> {
    let mut e = Engine::load(Cpu, dir)?;
    let req = Request::question(fixture_image("tiny"), "What is it?");
    let opts = GenerateOptions {
        max_new_tokens: 4,
        ..Default::default()
    };
    match method {
        None => e.generate(&req, &opts).map(|_| ()),
        Some(m) => {
            let d = e.config().text.hidden_size;
            let mut w = HeadWeights::random(d, 16, 1);
            w.wq[5] = f32::NAN;
            e.set_head(&w)?;
            e.explain(&req, &opts, m, &mut |_| {}).map(|_| ())
        }
    }
}

fn expect_non_finite(r: Result<(), Error>, place: &str) {
    match r {
        Err(Error::NonFinite(msg)) => assert!(msg.contains(place), "{msg}"),
        other => panic!("expected a non-finite error at {place}, got {other:?}"),
    }
}

#[test]
fn nan_in_lm_head_is_caught_in_the_logits() {
    let d = damaged("language_model.lm_head.weight", 0..1, f32::NAN);
    expect_non_finite(run(d.path(), None), "logits of token 0");
}

#[test]
fn nan_in_the_embeddings_or_the_patch_embedding_is_caught_at_prefill() {
    let d = damaged(
        "language_model.model.embed_tokens.weight",
        0..576 * 64,
        f32::NAN,
    );
    expect_non_finite(run(d.path(), None), "end of prefill");
    let d = damaged(
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        0..1,
        f32::INFINITY,
    );
    expect_non_finite(run(d.path(), None), "end of prefill");
}

#[test]
fn nan_in_the_head_is_caught_in_the_map() {
    let d = copy_model("tiny", "");
    expect_non_finite(
        run(d.path(), Some(Method::FastRm)),
        "relevancy map of token 0",
    );
}

#[test]
fn the_cli_exits_non_zero_naming_the_place() {
    let d = damaged("language_model.lm_head.weight", 0..1, f32::NAN);
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["generate", "--model"])
        .arg(d.path())
        .arg("--image")
        .arg(fixture_image("tiny"))
        .args(["--prompt", "What is it?", "--json"])
        .output()
        .unwrap();
    cli_fails(&out, &["non-finite", "logits"]);
    assert!(out.stdout.is_empty(), "no partial JSON on stdout");
}
