//! Oracle parity: the CPU engine against what HF transformers (f32, eager) recorded for each
//! fixture model (`tools/make_fixtures.py`): preprocessing, prompt ids, vision and projected
//! features, final hidden states and logits at every step, generated ids and text, through both the
//! KV-cache path and a full teacher-forced recompute.

mod common;

use common::{assert_close, fixture_dir, fixture_image, Expected};
use fastrm::backend::cpu::Cpu;
use fastrm::backend::Backend;
use fastrm::{Engine, GenerateOptions, Request};

const TOL: f32 = 1e-4;

fn parity(name: &str) {
    let exp = Expected::load(name);
    let engine = Engine::load(Cpu, &fixture_dir(name)).expect("fixture model loads");
    let b = engine.backend();
    let question = &exp.meta["question"];

    // Image and text inputs, each from the raw file / string.
    let (pixels, _) = engine.pixels(&fixture_image(name).into()).unwrap();
    let (_, want_px) = exp.f32("pixel_values");
    let max_px = pixels
        .iter()
        .zip(want_px)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_px <= 1e-5,
        "{name}: pixel values differ by up to {max_px:e}"
    );
    let prompt = engine.prompt(question).unwrap();
    let ids = prompt.ids().to_vec();
    assert_eq!(ids, exp.ids("input_ids"), "{name}: expanded prompt ids");

    // Vision tower and projector on the oracle's pixels, so their errors are their own.
    let (feats, proj) = engine.model().encode_image(b, want_px).unwrap();
    assert_close(
        &format!("{name} vision_features"),
        &b.download(&feats).unwrap(),
        &exp.f32("vision_features").1,
        TOL,
    );
    assert_close(
        &format!("{name} projected"),
        &b.download(&proj).unwrap(),
        &exp.f32("projected").1,
        TOL,
    );

    // Greedy generation with the KV cache: ids exact, each step's hidden state and logits close.
    let want_gen = exp.ids("generated_ids");
    let opts = GenerateOptions {
        max_new_tokens: want_gen.len(),
        stop_at_eos: false,
        keep_steps: true,
        ..Default::default()
    };
    let g = engine.model().generate(b, prompt, want_px, &opts).unwrap();
    assert_eq!(g.generated_ids, want_gen, "{name}: generated ids");
    let (lshape, want_logits) = exp.f32("logits");
    let vocab = lshape[1];
    let (hshape, want_hidden) = exp.f32("hidden_final");
    let d = hshape[1];
    let n = ids.len();
    for (k, (logits, hidden)) in g.step_logits.iter().zip(&g.step_hidden).enumerate() {
        let p = n - 1 + k;
        assert_close(
            &format!("{name} step {k} logits"),
            logits,
            &want_logits[k * vocab..(k + 1) * vocab],
            TOL,
        );
        assert_close(
            &format!("{name} step {k} hidden"),
            hidden,
            &want_hidden[p * d..(p + 1) * d],
            TOL,
        );
    }

    // Full recompute without cache reuse over prompt + generated (teacher forcing).
    let mut full_ids = ids.clone();
    full_ids.extend_from_slice(&want_gen[..want_gen.len() - 1]);
    let hidden = engine.model().forward_full(b, &full_ids, want_px).unwrap();
    let rows = full_ids.len();
    assert_close(
        &format!("{name} full hidden"),
        &b.download(&hidden).unwrap(),
        &want_hidden[..rows * d],
        TOL,
    );
    let tail = b.slice_rows(&hidden, n - 1, want_gen.len()).unwrap();
    let logits = engine.model().llm.logits(b, &tail).unwrap();
    assert_close(
        &format!("{name} full logits"),
        &b.download(&logits).unwrap(),
        want_logits,
        TOL,
    );

    // The whole pipeline from files, as the CLI runs it.
    let out = engine
        .generate(
            &Request::question(fixture_image(name), question.as_str()),
            &opts,
        )
        .unwrap();
    assert_eq!(
        out.generated_ids, want_gen,
        "{name}: end-to-end ids from the image file"
    );
    assert_eq!(out.text, exp.meta["generated_text"], "{name}: decoded text");
}

#[test]
fn parity_tiny() {
    parity("tiny");
}

#[test]
fn parity_clip336() {
    parity("clip336");
}
