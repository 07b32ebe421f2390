//! Several images per prompt, and none. Each image's features fill its own patch span, in order
//! (checked through causality: an image's hidden states depend only on what precedes it); every
//! token has a map per image; the prefix cache tells the images of one prompt apart; a
//! conversation without images is answered and a map of it is a named error.

mod common;

use common::fixture_dir;
use fastrm::backend::cpu::Cpu;
use fastrm::explain::fastrm::HeadWeights;
use fastrm::text::{Role, Turn};
use fastrm::util::SplitMix64;
use fastrm::vision::RgbImage;
use fastrm::{CancelToken, Engine, GenerateOptions, ImageInput, Item, Method, Request, RunOptions};

fn tiny() -> Engine<Cpu> {
    let mut e = Engine::load(Cpu, &fixture_dir("tiny")).unwrap();
    let d = e.config().text.hidden_size;
    e.set_head(&HeadWeights::random(d, 16, 4)).unwrap();
    e
}

fn picture(seed: u64) -> ImageInput {
    let mut r = SplitMix64::new(seed);
    let data = (0..40 * 30 * 3)
        .map(|_| (r.next_u64() % 256) as u8)
        .collect();
    ImageInput::Decoded(RgbImage::new(40, 30, data).unwrap())
}

fn two(x: &ImageInput, y: &ImageInput) -> Request {
    Request::Chat {
        turns: vec![Turn::new(Role::User, 2, "What differs between them?")],
        images: vec![x.clone(), y.clone()],
    }
}

struct Run {
    ids: Vec<u32>,
    maps: Vec<fastrm::engine::TokenMap>,
    hidden: Vec<f32>,
    cached: usize,
}

fn run(e: &Engine<Cpu>, req: &Request, method: Option<Method>) -> fastrm::Result<Run> {
    let opts = RunOptions {
        generate: GenerateOptions {
            max_new_tokens: 3,
            stop_at_eos: false,
            ..Default::default()
        },
        method,
        hidden_states: true,
        ..Default::default()
    };
    let mut r = Run {
        ids: Vec::new(),
        maps: Vec::new(),
        hidden: Vec::new(),
        cached: 0,
    };
    for it in e.stream(req, &opts, &CancelToken::new()) {
        match it? {
            Item::Prefilled {
                image_hidden,
                cached_len,
                ..
            } => {
                r.hidden = image_hidden.unwrap_or_default();
                r.cached = cached_len;
            }
            Item::Token(t) => r.maps.extend(t.map),
            Item::Map(m) => r.maps.push(m),
            Item::Done(s) => r.ids = s.generated_ids,
            _ => {}
        }
    }
    Ok(r)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn each_image_fills_its_own_span_in_order() {
    let e = tiny();
    let (a, b, c) = (picture(1), picture(2), picture(3));
    let cfg = e.config();
    let span = cfg.vision.num_patches() * cfg.text.hidden_size;
    let ab = run(&e, &two(&a, &b), Some(Method::FastRm)).unwrap();
    let ac = run(&e, &two(&a, &c), Some(Method::FastRm)).unwrap();
    let ba = run(&e, &two(&b, &a), Some(Method::FastRm)).unwrap();
    assert_eq!(ab.hidden.len(), 2 * span);
    // The first span sees only the template's opening and the first image.
    assert!(max_diff(&ab.hidden[..span], &ac.hidden[..span]) <= 1e-6);
    assert!(max_diff(&ab.hidden[span..], &ac.hidden[span..]) > 1e-3);
    assert!(max_diff(&ab.hidden[..span], &ba.hidden[..span]) > 1e-3);
    // A map per image per token.
    for m in &ab.maps {
        assert_eq!(m.images, 2);
        let parts: Vec<&[f32]> = m.per_image();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() == cfg.vision.num_patches()));
    }
    // And for a method that maps after generation.
    let exact = run(
        &e,
        &two(&a, &b),
        Some(Method::Baseline {
            mode: fastrm::explain::baseline::RowMode::Streamed,
        }),
    )
    .unwrap();
    assert_eq!(exact.ids, ab.ids);
    assert!(exact
        .maps
        .iter()
        .all(|m| m.map.len() == 2 * cfg.vision.num_patches()));
}

/// Two prompts whose first image is the same and whose second differs share the pages before the
/// second image's span, never past it, and answer as cold runs.
#[test]
fn the_prefix_cache_tells_the_images_of_a_prompt_apart() {
    let (cold, warm) = (tiny(), tiny());
    warm.set_image_cache(4);
    warm.set_prefix_cache(Some(1 << 30));
    let (a, b, c) = (picture(1), picture(2), picture(3));
    run(&warm, &two(&a, &b), Some(Method::FastRm)).unwrap();
    let hit = run(&warm, &two(&a, &c), Some(Method::FastRm)).unwrap();
    let want = run(&cold, &two(&a, &c), Some(Method::FastRm)).unwrap();
    // BOS, "USER", ":" and the first image's 25 tokens, then "\n" and the second image: only the
    // first page is the first image's alone.
    assert_eq!(hit.cached, fastrm::model::kv::PAGE);
    assert_eq!(hit.ids, want.ids);
    assert!(max_diff(&hit.hidden, &want.hidden) <= 1e-5);
    for (x, y) in hit.maps.iter().zip(&want.maps) {
        assert!(max_diff(&x.map, &y.map) <= 1e-5);
    }
}

#[test]
fn a_conversation_without_images_is_answered_and_has_no_maps() {
    let e = tiny();
    let req = Request::Chat {
        turns: vec![
            Turn::new(Role::System, 0, "Answer briefly."),
            Turn::new(Role::User, 0, "What is a relevancy map?"),
        ],
        images: vec![],
    };
    let plain = run(&e, &req, None).unwrap();
    assert_eq!(plain.ids.len(), 3);
    assert!(plain.hidden.is_empty());
    // The same ids as the prompt run again through the prefix cache (a page of text only).
    e.set_prefix_cache(Some(1 << 30));
    run(&e, &req, None).unwrap();
    let again = run(&e, &req, None).unwrap();
    assert!(again.cached > 0);
    assert_eq!(again.ids, plain.ids);
    for m in [
        Method::FastRm,
        Method::Baseline {
            mode: fastrm::explain::baseline::RowMode::Streamed,
        },
    ] {
        let err = run(&e, &req, Some(m))
            .err()
            .expect("a map without an image");
        assert!(err.to_string().contains("no image"), "{err}");
    }
}

/// The same picture twice in one prompt: one set of features from the image cache for both
/// spans, cached pages naming it once, and the answer of a cold run, first and when repeated.
#[test]
fn the_same_picture_twice_in_one_prompt() {
    let (cold, warm) = (tiny(), tiny());
    warm.set_image_cache(4);
    warm.set_prefix_cache(Some(1 << 30));
    let a = picture(1);
    let want = run(&cold, &two(&a, &a), Some(Method::FastRm)).unwrap();
    for pass in 0..2 {
        let got = run(&warm, &two(&a, &a), Some(Method::FastRm)).unwrap();
        assert_eq!(got.cached > 0, pass == 1, "pass {pass}");
        assert_eq!(got.ids, want.ids, "pass {pass}");
        assert!(max_diff(&got.hidden, &want.hidden) <= 1e-5, "pass {pass}");
    }
}
