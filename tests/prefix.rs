//! The prefix cache: a conversation's next turn and another question about the same image read
//! the pages an earlier run computed, and answer exactly as a cold run does (ids, maps, the image
//! hidden states FastRM folds); a different image under the same text never shares a page; the
//! cache stays in its bound and gives its pages to runs that need room.

mod common;

use common::fixture_dir;
use fastrm::backend::cpu::Cpu;
use fastrm::backend::Backend;
use fastrm::explain::fastrm::HeadWeights;
use fastrm::text::{Role, Turn};
use fastrm::vision::RgbImage;
use fastrm::{CancelToken, Engine, GenerateOptions, ImageInput, Item, Method, Request, RunOptions};

fn tiny<B: Backend>(b: B) -> Engine<B> {
    let mut e = Engine::load(b, &fixture_dir("tiny")).unwrap();
    let d = e.config().text.hidden_size;
    e.set_head(&HeadWeights::random(d, 16, 4)).unwrap();
    e
}

/// An engine that keeps images and prefixes (as the server does).
fn warm<B: Backend>(b: B) -> Engine<B> {
    let e = tiny(b);
    e.set_image_cache(4);
    e.set_prefix_cache(Some(1 << 30));
    e
}

struct Run {
    ids: Vec<u32>,
    text: String,
    maps: Vec<Vec<f32>>,
    image_hidden: Vec<f32>,
    cached: usize,
    prompt_len: usize,
}

fn run<B: Backend>(e: &Engine<B>, req: &Request, max_new: usize) -> Run {
    let opts = RunOptions {
        generate: GenerateOptions {
            max_new_tokens: max_new,
            stop_at_eos: false,
            ..Default::default()
        },
        method: Some(Method::FastRm),
        hidden_states: true,
        ..Default::default()
    };
    let items: Vec<Item> = e
        .stream(req, &opts, &CancelToken::new())
        .collect::<Result<_, _>>()
        .unwrap();
    let mut r = Run {
        ids: Vec::new(),
        text: String::new(),
        maps: Vec::new(),
        image_hidden: Vec::new(),
        cached: usize::MAX,
        prompt_len: 0,
    };
    for it in items {
        match it {
            Item::Prefilled {
                prompt_len,
                cached_len,
                image_hidden,
                ..
            } => {
                r.prompt_len = prompt_len;
                r.cached = cached_len;
                r.image_hidden = image_hidden.unwrap();
            }
            Item::Token(t) => r.maps.push(t.map.unwrap().map),
            Item::Done(s) => {
                assert_eq!(s.cached_tokens, r.cached);
                r.ids = s.generated_ids;
                r.text = s.text;
            }
            _ => {}
        }
    }
    r
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "{what}: differs by {worst}");
}

/// A cached run against a cold one: the same ids, maps and image hidden states.
fn same(warm: &Run, cold: &Run, what: &str) {
    assert_eq!(warm.ids, cold.ids, "{what}: ids");
    assert_eq!(warm.maps.len(), cold.maps.len(), "{what}: maps");
    for (i, (a, b)) in warm.maps.iter().zip(&cold.maps).enumerate() {
        close(a, b, &format!("{what}: map {i}"));
    }
    close(
        &warm.image_hidden,
        &cold.image_hidden,
        &format!("{what}: image hidden states"),
    );
}

fn picture() -> ImageInput {
    ImageInput::Path(fixture_dir("tiny").join("image.png"))
}

/// The tiny model's picture with some pixels changed.
fn other_picture() -> ImageInput {
    let mut img: RgbImage =
        fastrm::vision::load_image(&fixture_dir("tiny").join("image.png")).unwrap();
    for v in img.data.iter_mut().step_by(5) {
        *v = v.wrapping_add(71);
    }
    ImageInput::Decoded(img)
}

fn chat(turns: Vec<Turn>, image: ImageInput) -> Request {
    Request::Chat {
        turns,
        images: vec![image],
    }
}

#[test]
fn a_follow_up_turn_reads_the_earlier_turn_and_answers_as_a_cold_run() {
    let (w, cold) = (warm(Cpu), tiny(Cpu));
    let q1 = "What is in this picture, and what colour is it?";
    let turn1 = chat(vec![Turn::new(Role::User, 1, q1)], picture());
    let first = run(&w, &turn1, 20);
    assert_eq!(first.cached, 0, "nothing is cached before the first run");
    same(&first, &run(&cold, &turn1, 20), "turn 1");
    assert!(w.prefix_pages() > 0);

    let turn2 = chat(
        vec![
            Turn::new(Role::User, 1, q1),
            Turn::new(Role::Assistant, 0, &first.text),
            Turn::new(Role::User, 0, "Where is it?"),
        ],
        picture(),
    );
    let second = run(&w, &turn2, 8);
    let page = fastrm::model::kv::PAGE;
    // At least the first turn's full pages, image included, come from the cache.
    assert!(
        second.cached >= first.prompt_len / page * page && second.cached > 0,
        "{} of {} positions cached after a first prompt of {}",
        second.cached,
        second.prompt_len,
        first.prompt_len
    );
    assert!(second.cached < second.prompt_len);
    same(&second, &run(&cold, &turn2, 8), "turn 2");
}

#[test]
fn another_question_about_the_same_image_reuses_its_pages() {
    let (w, cold) = (warm(Cpu), tiny(Cpu));
    let a = Request::question(picture(), "What is it?");
    let b = Request::question(picture(), "Describe the colours of the scene.");
    run(&w, &a, 3);
    let second = run(&w, &b, 3);
    // The tiny model's 25 image tokens start at position 3: the first page is the template's
    // opening and 13 of them, read from the cache with their hidden states.
    assert_eq!(second.cached, fastrm::model::kv::PAGE);
    same(&second, &run(&cold, &b, 3), "second question");
}

/// The contamination test: the same text over a different image shares no page past the text
/// before the image, whether or not the image cache keeps the first image's features.
#[test]
fn a_different_image_under_the_same_text_never_shares_a_page() {
    let cold = tiny(Cpu);
    for image_cache in [4, 0] {
        let w = warm(Cpu);
        w.set_image_cache(image_cache);
        let q = "What is it?";
        let x = Request::question(picture(), q);
        let y = Request::question(other_picture(), q);
        let rx = run(&w, &x, 4);
        let ry = run(&w, &y, 4);
        assert_eq!(ry.cached, 0, "image cache {image_cache}");
        same(&ry, &run(&cold, &y, 4), "the other image");
        assert_ne!(rx.image_hidden, ry.image_hidden);
        // And back: the first image still finds its own pages when its features are kept.
        let again = run(&w, &x, 4);
        assert_eq!(again.cached > 0, image_cache > 0);
        same(&again, &rx, "the first image again");
    }
}

/// A bounded cache: never more pages than its bound; in a fixed pool, its pages make room for
/// runs rather than turning them away; turned off, it gives every page back.
#[test]
fn the_cache_is_bounded_and_gives_way_to_runs() {
    let w = warm(Cpu);
    let page_bytes = w.kv_page_bytes() as u64;
    w.set_prefix_cache(Some(3 * page_bytes));
    // Room for one run of the longest prompt below and little more.
    w.set_kv_memory(Some(6 * page_bytes)).unwrap();
    for i in 0..6 {
        let q = format!("Question number {i}: what is in the picture, and where is it?");
        let r = run(&w, &Request::question(picture(), &q), 4);
        assert!(!r.ids.is_empty());
        assert!(w.prefix_pages() <= 3, "{} pages cached", w.prefix_pages());
        let (used, limit) = w.kv_usage();
        assert!(used <= limit);
        assert_eq!(used, w.prefix_pages(), "pages held by no run and no cache");
    }
    w.set_prefix_cache(None);
    assert_eq!(w.prefix_pages(), 0);
    assert_eq!(w.kv_usage().0, 0);
}

/// The same follow-up on the simulated CUDA device.
#[cfg(feature = "sim")]
#[test]
fn a_follow_up_turn_answers_as_a_cold_run_on_the_simulated_device() {
    let sim = fastrm::backend::cuda::Cuda::<f32>::simulated;
    let (w, cold) = (warm(sim()), tiny(sim()));
    let q1 = "What is in this picture?";
    let turn1 = chat(vec![Turn::new(Role::User, 1, q1)], picture());
    let first = run(&w, &turn1, 12);
    let turn2 = chat(
        vec![
            Turn::new(Role::User, 1, q1),
            Turn::new(Role::Assistant, 0, &first.text),
            Turn::new(Role::User, 0, "Where?"),
        ],
        picture(),
    );
    let second = run(&w, &turn2, 4);
    assert!(second.cached > 0);
    same(
        &second,
        &run(&cold, &turn2, 4),
        "turn 2 on the simulated device",
    );
}
