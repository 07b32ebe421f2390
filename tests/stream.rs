//! The streaming API: items in order, text deltas that add up to the decoded answer, maps when the
//! token exists (FastRM, incremental) or after generation (exact baseline, GradCAM) and equal to
//! the collected run's, cancellation between any two units of work, images as a path, bytes or
//! pixels.

mod common;

use std::path::PathBuf;

use common::{fixture_dir, fixture_image};
use fastrm::backend::cpu::Cpu;
use fastrm::engine::{Engine, Summary};
use fastrm::explain::fastrm::HeadWeights;
use fastrm::explain::{incremental_maps, RowMode};
use fastrm::model::session::{Mode, Session};
use fastrm::{CancelToken, Error, GenerateOptions, ImageInput, Item, Method, Request, RunOptions};

fn tiny() -> Engine<Cpu> {
    let mut e = Engine::load(Cpu, &fixture_dir("tiny")).unwrap();
    let d = e.config().text.hidden_size;
    e.set_head(&HeadWeights::random(d, 16, 4)).unwrap();
    e
}

fn run(n: usize, method: Option<Method>) -> RunOptions {
    RunOptions {
        generate: GenerateOptions {
            max_new_tokens: n,
            stop_at_eos: false,
            keep_steps: false,
            ..Default::default()
        },
        method,
        ..Default::default()
    }
}

fn req(question: &str) -> Request {
    Request::question(fixture_image("tiny"), question)
}

fn items(e: &Engine<Cpu>, r: &Request, o: &RunOptions) -> Vec<Item> {
    e.stream(r, o, &CancelToken::new())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn summary(items: &[Item]) -> &Summary {
    match items.last() {
        Some(Item::Done(s)) => s,
        other => panic!("the last item is not Done: {other:?}"),
    }
}

#[test]
fn text_deltas_add_up_to_the_decoded_answer() {
    let e = tiny();
    let mut spaced = false;
    // The tiny model's random answers are full of byte-fallback runs (some invalid UTF-8) and
    // padded-vocabulary ids: the hard cases for incremental decoding.
    let questions = [
        "What is in the picture?",
        "Describe it.",
        "Why?",
        "Where is the cat?",
        "How many?",
        "Tell me a story about it.",
    ];
    for q in questions {
        let its = items(&e, &req(q), &run(16, None));
        let deltas: String = its
            .iter()
            .filter_map(|i| match i {
                Item::Token(t) => Some(t.text_delta.as_str()),
                _ => None,
            })
            .collect();
        let s = summary(&its);
        assert_eq!(s.generated_ids.len(), 16);
        assert_eq!(deltas, s.text, "{q}: joined deltas vs the answer");
        let whole = e.generate(&req(q), &run(16, None).generate).unwrap();
        assert_eq!(whole.text, s.text, "{q}: collected vs streamed");
        spaced |= s.text.trim().contains(' ');
    }
    assert!(
        spaced,
        "no answer has an inner space: the spacing check is vacuous"
    );
}

#[test]
fn items_come_in_order_and_fastrm_maps_come_with_their_token() {
    let e = tiny();
    let o = run(5, Some(Method::FastRm));
    let its = items(&e, &req("What is it?"), &o);
    assert!(matches!(its[0], Item::ImageEncoded));
    assert!(matches!(its[1], Item::Prefilled { prompt_len, .. } if prompt_len > 25));
    let tokens: Vec<_> = its[2..its.len() - 1]
        .iter()
        .map(|i| match i {
            Item::Token(t) => t.clone(),
            other => panic!("expected a token, got {other:?}"),
        })
        .collect();
    assert_eq!(tokens.len(), 5);
    let collected = e
        .explain(
            &req("What is it?"),
            &o.generate,
            Method::FastRm,
            &mut |_| {},
        )
        .unwrap();
    for (k, (t, c)) in tokens.iter().zip(&collected.tokens).enumerate() {
        assert_eq!(t.index, k);
        let m = t.map.as_ref().expect("a FastRM token carries its map");
        assert_eq!(m.map, c.map, "token {k}");
        assert_eq!(m.map.len(), 25);
    }
    let s = summary(&its);
    assert!(s.confidence.is_some());
    assert_eq!(s.generated_ids, collected.generation.generated_ids);
}

#[test]
fn gradient_maps_come_after_generation() {
    let e = tiny();
    for method in [
        Method::Baseline {
            mode: RowMode::Streamed,
        },
        Method::GradCam { layer: 1 },
    ] {
        let its = items(&e, &req("What is it?"), &run(4, Some(method)));
        let first_map = its.iter().position(|i| matches!(i, Item::Map(_))).unwrap();
        let last_token = its
            .iter()
            .rposition(|i| matches!(i, Item::Token(_)))
            .unwrap();
        assert!(
            last_token < first_map,
            "{method:?}: maps before the answer ended"
        );
        let maps: Vec<_> = its
            .iter()
            .filter_map(|i| match i {
                Item::Map(m) => Some(m.index),
                Item::Token(t) => {
                    assert!(t.map.is_none());
                    None
                }
                _ => None,
            })
            .collect();
        assert_eq!(maps, vec![0, 1, 2, 3], "{method:?}");
    }
}

#[test]
fn incremental_maps_during_generation_equal_those_after_it() {
    // Two code paths: each decode step's own saved rows while generating (SaveStep), and every
    // position kept and read back after generation (SaveAll).
    let e = tiny();
    let o = run(5, Some(Method::BaselineIncremental));
    let streamed = e
        .explain(
            &req("What is it?"),
            &o.generate,
            Method::BaselineIncremental,
            &mut |_| {},
        )
        .unwrap();
    let (prompt, pixels) = e.resolve(&req("What is it?")).unwrap();
    let (b, m) = (e.backend(), e.model());
    let (_, image) = m.encode_image(b, &pixels).unwrap();
    let mut s = Session::prefill(b, m, prompt, &image, &o.generate, Mode::SaveAll).unwrap();
    s.run_to_end().unwrap();
    assert_eq!(s.generated(), streamed.generation.generated_ids);
    let after = incremental_maps(&s).unwrap();
    assert_eq!(after.len(), 5);
    for (k, (a, t)) in after.iter().zip(&streamed.tokens).enumerate() {
        common::assert_close(&format!("incremental token {k}"), a, &t.map, 1e-5);
    }
}

#[test]
fn cancellation_stops_between_steps() {
    let e = tiny();
    let o = run(8, Some(Method::FastRm));
    // Cancelled before it starts: nothing is computed.
    let c = CancelToken::new();
    c.cancel();
    let mut st = e.stream(&req("What is it?"), &o, &c);
    assert!(matches!(st.next(), Some(Err(Error::Cancelled))));
    assert!(st.next().is_none());
    // Cancelled after the second token: no third token, then the end.
    let c = CancelToken::new();
    let mut tokens = 0;
    let mut outcome = None;
    for item in e.stream(&req("What is it?"), &o, &c) {
        match item {
            Ok(Item::Token(_)) => {
                tokens += 1;
                if tokens == 2 {
                    c.cancel();
                }
            }
            Ok(Item::Done(_)) => panic!("a cancelled run finished"),
            Ok(_) => {}
            Err(err) => outcome = Some(err),
        }
    }
    assert_eq!(tokens, 2);
    assert!(matches!(outcome, Some(Error::Cancelled)));
}

#[test]
fn images_as_path_bytes_or_pixels_give_the_same_run() {
    let e = tiny();
    let path = fixture_image("tiny");
    let bytes = std::fs::read(&path).unwrap();
    let decoded = ImageInput::Path(path.clone()).decode().unwrap();
    let o = run(4, Some(Method::FastRm));
    let answer = |image: ImageInput| {
        let its = items(&e, &Request::question(image, "What is it?"), &o);
        let maps: Vec<Vec<f32>> = its
            .iter()
            .filter_map(|i| match i {
                Item::Token(t) => t.map.as_ref().map(|m| m.map.clone()),
                _ => None,
            })
            .collect();
        (summary(&its).generated_ids.clone(), maps)
    };
    let want = answer(ImageInput::Path(path));
    assert_eq!(answer(ImageInput::Bytes(bytes.clone())), want);
    assert_eq!(answer(ImageInput::Decoded(decoded)), want);
    // Bad bytes: an image error naming the in-memory source, as the first item.
    let bad = Request::question(ImageInput::Bytes(bytes[..40].to_vec()), "What is it?");
    let err = e
        .stream(&bad, &o, &CancelToken::new())
        .next()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    assert!(err.to_string().contains("<bytes>"), "{err}");
    let missing = Request::question(PathBuf::from("/nonexistent/x.png"), "What is it?");
    let err = e.generate(&missing, &o.generate).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.png"), "{err}");
}

#[test]
fn fastrm_without_a_head_and_zero_tokens_are_input_errors() {
    let e = Engine::load(Cpu, &fixture_dir("tiny")).unwrap();
    let err = e
        .explain(
            &req("Hi?"),
            &GenerateOptions::default(),
            Method::FastRm,
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::Input(_)) && err.to_string().contains("head"),
        "{err}"
    );
    let err = e.generate(&req("Hi?"), &run(0, None).generate).unwrap_err();
    assert!(err.to_string().contains("max_new_tokens"), "{err}");
}
