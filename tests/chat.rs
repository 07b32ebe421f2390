//! Conversations: OpenAI-style `messages` read by the one parser the server and `--messages`
//! share, rendered by the model folder's chat template (LLaVA-1.5's when it has none; LLaVA-NeXT's
//! Mistral templates and Qwen2-VL's from their files) and tokenised exactly as transformers'
//! `LlavaProcessor.apply_chat_template` + processor do (`tools/make_chat_fixtures.py`), and
//! answered by the engine; every malformed conversation is a named error.

mod common;

use common::fixture_dir;
use fastrm::backend::cpu::Cpu;
use fastrm::engine::chat::parse_messages;
use fastrm::text::{Role, TextProcessor, Turn};
use fastrm::{Engine, GenerateOptions, ImageInput, Request};
use serde_json::{json, Value};

fn cases() -> Vec<Value> {
    let path = common::repo_root().join("tests/fixtures/chat_cases.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

/// The fixture's messages as a client sends them: `{"type": "image"}` becomes an `image_url`
/// part.
fn openai_messages(messages: &Value) -> String {
    let mut m = messages.clone();
    for msg in m.as_array_mut().unwrap() {
        for part in msg["content"].as_array_mut().unwrap() {
            if part["type"] == "image" {
                *part = json!({"type": "image_url", "image_url": {"url": "image.png"}});
            }
        }
    }
    m.to_string()
}

/// The tiny model's folder with `template` (by its fixture name) as its `chat_template.json`;
/// LLaVA-1.5's is the built-in one, so that case uses the folder as it is.
fn model_with_template(
    doc: &Value,
    template: &str,
) -> (std::path::PathBuf, Option<tempfile::TempDir>) {
    if template == "llava-1.5" {
        return (fixture_dir("tiny"), None);
    }
    let tmp = common::copy_model("tiny", "");
    let source = doc["templates"][template].as_str().unwrap();
    std::fs::write(
        tmp.path().join("chat_template.json"),
        json!({ "chat_template": source }).to_string(),
    )
    .unwrap();
    (tmp.path().to_path_buf(), Some(tmp))
}

/// Qwen2-VL's template places a message's parts in their order; a turn keeps its images before
/// its texts (every LLaVA template sorts them so), so the cases with an image after a text differ
/// there by design (docs/NOTES.md, chat templates).
const PART_ORDER_CASES: [&str; 2] = ["image_after_text", "images_in_two_turns"];

#[test]
fn conversations_render_and_tokenise_as_transformers_does() {
    let path = common::repo_root().join("tests/fixtures/chat_cases.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tiny = fixture_dir("tiny");
    let cases = cases();
    let mut checked = std::collections::BTreeMap::<String, (usize, usize, usize)>::new();
    for case in &cases {
        let (tname, name) = (
            case["template"].as_str().unwrap(),
            case["name"].as_str().unwrap(),
        );
        if tname == "qwen2-vl" && PART_ORDER_CASES.contains(&name) {
            continue;
        }
        let (dir, _keep) = model_with_template(&doc, tname);
        let text = TextProcessor::from_dir(&dir).unwrap();
        let conv = parse_messages(&openai_messages(&case["messages"])).unwrap();
        let tally = checked.entry(tname.to_string()).or_default();
        if let Some(err) = case["error"].as_str() {
            // The template's own refusal reaches the caller as an input error with its words.
            let e = text.render_chat(&conv.turns).unwrap_err();
            assert!(
                matches!(e, fastrm::Error::Input(_)),
                "{tname}/{name}: {e:?}"
            );
            assert!(e.to_string().contains(err), "{tname}/{name}: {e}");
            tally.2 += 1;
            continue;
        }
        assert_eq!(
            text.render_chat(&conv.turns).unwrap(),
            case["rendered"].as_str().unwrap(),
            "{tname}/{name}: rendered"
        );
        tally.0 += 1;
        let Some(ids) = case.get("input_ids") else {
            continue;
        };
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let engine = Engine::load(Cpu, &dir).unwrap();
        let cfg = engine.config();
        let count: usize = conv.turns.iter().map(|t| t.images).sum();
        let tokens = vec![cfg.vision.num_patches(); count];
        let ids = text
            .chat_ids(&conv.turns, cfg.image_token_id, &tokens)
            .unwrap();
        assert_eq!(ids, want, "{tname}/{name}: ids");
        // And the engine's prompt for the conversation with its images (none, one or several).
        let req = Request::Chat {
            turns: conv.turns.clone(),
            images: vec![ImageInput::Path(tiny.join("image.png")); count],
        };
        let (prompt, _) = engine.resolve(&req).unwrap();
        assert_eq!(prompt.ids(), &want[..], "{tname}/{name}: engine prompt");
        tally.1 += 1;
    }
    // Every template was exercised: (rendered, ids checked, refusals).
    assert_eq!(checked["llava-1.5"], (9, 9, 0));
    assert_eq!(checked["llava-next-mistral"], (9, 9, 0));
    assert_eq!(checked["llava-next-mistral-old"], (5, 5, 4));
    assert_eq!(checked["qwen2-vl"], (7, 0, 0));
}

/// A template that does not parse, or a `chat_template` of the wrong type, is a load error naming
/// its file; a folder's template wins over the built-in one.
#[test]
fn a_broken_chat_template_is_a_load_error_naming_its_file() {
    let tmp = common::copy_model("tiny", "");
    let load_error = |name: &str, content: &str| {
        std::fs::write(tmp.path().join(name), content).unwrap();
        let e = TextProcessor::from_dir(tmp.path())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(name), "{e}");
        e
    };
    let e = load_error("chat_template.jinja", "{% for m in messages %}{{ m");
    assert!(e.contains("does not parse"), "{e}");
    let e = Engine::load(Cpu, tmp.path()).err().unwrap().to_string();
    assert!(e.contains("chat_template.jinja"), "{e}");
    std::fs::remove_file(tmp.path().join("chat_template.jinja")).unwrap();
    let e = load_error("chat_template.json", r#"{"chat_template": 42}"#);
    assert!(e.contains("neither a string"), "{e}");
    // A template that prints BOS itself: tokenised without a second one, as transformers'
    // apply_chat_template(tokenize=True) does.
    let path = common::repo_root().join("tests/fixtures/chat_cases.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let bos = &doc["bos_case"];
    std::fs::write(
        tmp.path().join("chat_template.json"),
        json!({ "chat_template": bos["template"] }).to_string(),
    )
    .unwrap();
    let text = TextProcessor::from_dir(tmp.path()).unwrap();
    let conv = parse_messages(&bos["messages"].to_string()).unwrap();
    let ids = text.chat_ids(&conv.turns, 512, &[]).unwrap();
    assert_eq!(ids, common::json_ids(bos, "input_ids"));
}

/// One question through the conversation path is the plain question's prompt, and a follow-up
/// turn is answered (greedy ids are those of its prompt run alone through `generate`).
#[test]
fn a_conversation_runs_and_a_single_question_is_unchanged() {
    let tiny = fixture_dir("tiny");
    let engine = Engine::load(Cpu, &tiny).unwrap();
    let image = ImageInput::Path(tiny.join("image.png"));
    let q = "What is it?";
    let plain = engine
        .resolve(&Request::question(image.clone(), q))
        .unwrap()
        .0;
    let chat = Request::Chat {
        turns: vec![Turn::new(Role::User, 1, q)],
        images: vec![image.clone()],
    };
    assert_eq!(engine.resolve(&chat).unwrap().0, plain);
    let opts = GenerateOptions {
        max_new_tokens: 4,
        stop_at_eos: false,
        ..Default::default()
    };
    let follow = Request::Chat {
        turns: vec![
            Turn::new(Role::System, 0, "Be brief."),
            Turn::new(Role::User, 1, q),
            Turn::new(Role::Assistant, 0, "A picture."),
            Turn::new(Role::User, 0, "Of what?"),
        ],
        images: vec![image],
    };
    let g = engine.generate(&follow, &opts).unwrap();
    let (prompt, pixels) = engine.resolve(&follow).unwrap();
    assert_eq!(g.input_ids, prompt.ids());
    let again = engine
        .generate(&Request::Prepared { prompt, pixels }, &opts)
        .unwrap();
    assert_eq!(g.generated_ids, again.generated_ids);
    assert_eq!(g.generated_ids.len(), 4);
}

#[test]
fn malformed_conversations_are_named_errors() {
    let img = json!({"type": "image_url", "image_url": {"url": "image.png"}});
    let q = json!({"type": "text", "text": "What?"});
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!([]), "messages", "empty"),
        (
            json!([{"role": "system", "content": "x"}]),
            "messages[0]",
            "end with a user message",
        ),
        (
            json!([{"role": "user", "content": [img, q]}, {"role": "assistant", "content": "x"}]),
            "messages[1]",
            "end with a user message",
        ),
        (
            json!([{"role": "assistant", "content": [img]}, {"role": "user", "content": [q]}]),
            "messages[0].content[0]",
            "only user messages may hold images",
        ),
        (
            json!([{"role": "tool", "content": "x"}]),
            "messages[0].role",
            "not supported",
        ),
        (json!([{"content": "x"}]), "messages[0].role", "must be"),
        (
            json!([{"role": "user"}]),
            "messages[0].content",
            "is required",
        ),
        (
            json!([{"role": "user", "content": [{"type": "text", "text": "a <image> b"}]}]),
            "messages[0].content",
            "must not contain <image>",
        ),
        (
            json!([{"role": "user", "content": [{"type": "audio"}]}]),
            "messages[0].content[0].type",
            "not supported",
        ),
        (
            json!([{"role": "user", "content": [img, {"type": "text", "text": "  "}]}, {"role": "user", "content": ""}]),
            "messages[1]",
            "is empty",
        ),
        (
            json!([{"role": "user", "content": 5}]),
            "messages[0].content",
            "string or an array",
        ),
    ];
    for (msgs, param, needle) in cases {
        let e = parse_messages(&msgs.to_string()).unwrap_err();
        assert_eq!(e.param, param, "{msgs}: {e:?}");
        assert!(e.message.contains(needle), "{msgs}: {e:?}");
    }
    // The engine's own checks: as many images as placeholders, and room for them.
    let tiny = fixture_dir("tiny");
    let engine = Engine::load(Cpu, &tiny).unwrap();
    let image = ImageInput::Path(tiny.join("image.png"));
    let many = Request::Chat {
        turns: vec![Turn::new(Role::User, 11, "Which?")],
        images: vec![image.clone(); 11],
    };
    let e = engine.resolve(&many).unwrap_err();
    assert!(matches!(e, fastrm::Error::ContextLength(_)), "{e}");
    assert!(e.to_string().contains("11 images"), "{e}");
    let mismatch = Request::Chat {
        turns: vec![Turn::new(Role::User, 1, "Which?")],
        images: vec![image.clone(), image],
    };
    let e = engine.resolve(&mismatch).unwrap_err().to_string();
    assert!(e.contains("place 1 images but 2"), "{e}");
}

/// With the image cache on, a conversation's next turn (the same image again) skips the vision
/// tower and answers exactly as a cold run; a different image under the same text is never
/// served another image's features.
#[test]
fn a_resent_image_is_encoded_once_and_never_confused_with_another() {
    use fastrm::{CancelToken, Item, Method, RunOptions};
    let tiny = fixture_dir("tiny");
    let load = || {
        let mut e = Engine::load(Cpu, &tiny).unwrap();
        let d = e.config().text.hidden_size;
        e.set_head(&fastrm::explain::fastrm::HeadWeights::random(d, 16, 4))
            .unwrap();
        e
    };
    let (cold, warm) = (load(), load());
    warm.set_image_cache(2);
    let run = |e: &Engine<Cpu>, req: &Request| {
        let opts = RunOptions {
            generate: GenerateOptions {
                max_new_tokens: 3,
                stop_at_eos: false,
                ..Default::default()
            },
            method: Some(Method::FastRm),
            ..Default::default()
        };
        let items: Vec<Item> = e
            .stream(req, &opts, &CancelToken::new())
            .collect::<Result<_, _>>()
            .unwrap();
        let maps: Vec<Vec<f32>> = items
            .iter()
            .filter_map(|i| match i {
                Item::Token(t) => t.map.as_ref().map(|m| m.map.clone()),
                _ => None,
            })
            .collect();
        let Some(Item::Done(s)) = items.last() else {
            panic!("no Done")
        };
        (s.generated_ids.clone(), maps, s.timings.vision_s)
    };
    let x = ImageInput::Path(tiny.join("image.png"));
    let mut img = fastrm::vision::load_image(&tiny.join("image.png")).unwrap();
    for v in img.data.iter_mut().step_by(7) {
        *v = v.wrapping_add(97);
    }
    let y = ImageInput::Decoded(img);
    let turn1 = Request::Chat {
        turns: vec![Turn::new(Role::User, 1, "What is it?")],
        images: vec![x.clone()],
    };
    let turn2 = Request::Chat {
        turns: vec![
            Turn::new(Role::User, 1, "What is it?"),
            Turn::new(Role::Assistant, 0, "A picture."),
            Turn::new(Role::User, 0, "Of what?"),
        ],
        images: vec![x],
    };
    let other = Request::Chat {
        turns: vec![Turn::new(Role::User, 1, "What is it?")],
        images: vec![y],
    };
    let first = run(&warm, &turn1);
    assert!(first.2 > 0.0, "the first sight of an image runs the tower");
    let second = run(&warm, &turn2);
    assert_eq!(second.2, 0.0, "the resent image ran the tower again");
    let want = run(&cold, &turn2);
    assert_eq!((&second.0, &second.1), (&want.0, &want.1), "cached != cold");
    let third = run(&warm, &other);
    assert!(third.2 > 0.0, "a different image was served from the cache");
    let want = run(&cold, &other);
    assert_eq!(
        (&third.0, &third.1),
        (&want.0, &want.1),
        "another image's features were used"
    );
    assert_ne!(third.1, first.1, "two images gave the same maps");
}

/// Conversations through the model against transformers' `LlavaForConditionalGeneration`
/// (`tools/make_turn_fixtures.py`): a system prompt with history, two images in one turn, images
/// in two turns. The prompt's ids and pixels, greedy ids, every step's logits and the exact
/// baseline's map of every token over every image's patches, as for the single-question fixtures.
#[test]
fn conversations_match_transformers_model() {
    use common::{assert_close, Expected};
    use fastrm::explain::{Method, RowMode};
    let exp = Expected::load("turns");
    let tiny = fixture_dir("tiny");
    let engine = Engine::load(Cpu, &tiny).unwrap();
    let (b, m) = (engine.backend(), engine.model());
    let cases: Vec<Value> = serde_json::from_str(&exp.meta["cases"]).unwrap();
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let conv = parse_messages(&case["messages"].to_string()).unwrap();
        let images: Vec<ImageInput> = conv
            .images
            .iter()
            .map(|i| match i.url.as_str() {
                "image.png" => ImageInput::Path(tiny.join("image.png")),
                other => ImageInput::Path(fixture_dir("turns").join(other)),
            })
            .collect();
        let req = Request::Chat {
            turns: conv.turns,
            images,
        };
        let (prompt, pixels) = engine.resolve(&req).unwrap();
        assert_eq!(
            prompt.ids(),
            exp.ids(&format!("{name}.input_ids")),
            "{name}: ids"
        );
        let (_, want_px) = exp.f32(&format!("{name}.pixel_values"));
        assert_close(&format!("{name} pixels"), &pixels, want_px, 1e-5);

        let gen = exp.ids(&format!("{name}.generated_ids"));
        let opts = common::forced(gen.len(), true);
        let g = m.generate(b, prompt.clone(), want_px, &opts).unwrap();
        assert_eq!(g.generated_ids, gen, "{name}: generated ids");
        let (lshape, want_logits) = exp.f32(&format!("{name}.logits"));
        let vocab = lshape[1];
        assert_eq!(g.step_logits.len(), gen.len());
        for (k, logits) in g.step_logits.iter().enumerate() {
            assert_close(
                &format!("{name} step {k} logits"),
                logits,
                &want_logits[k * vocab..(k + 1) * vocab],
                1e-4,
            );
        }

        // The exact baseline's maps, each token's over every image, image after image.
        let (rshape, want_maps) = exp.f32(&format!("{name}.relevancy"));
        let n_images = pixels.len() / m.cfg.vision.pixels_per_image();
        let prepared = Request::Prepared {
            prompt,
            pixels: want_px.to_vec(),
        };
        let mode = RowMode::Streamed;
        let e = engine
            .explain(&prepared, &opts, Method::Baseline { mode }, &mut |_| {})
            .unwrap();
        assert_eq!(e.generation.generated_ids, gen, "{name}: explained ids");
        assert_eq!(e.tokens.len(), rshape[0]);
        for (t, tm) in e.tokens.iter().enumerate() {
            let want = &want_maps[t * rshape[1]..(t + 1) * rshape[1]];
            assert_eq!(tm.images, n_images, "{name}: images the map covers");
            // Every image's share of the oracle's map is non-zero, so none can be dropped unseen.
            for (i, part) in want.chunks(want.len() / n_images).enumerate() {
                assert!(
                    part.iter().any(|&x| x > 0.0),
                    "{name}: oracle map {t} image {i} is zero"
                );
            }
            assert_close(&format!("{name} exact map token {t}"), &tm.map, want, 1e-4);
        }
    }
}
