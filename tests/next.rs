//! LLaVA-NeXT (any-resolution tiles, a Mistral language model with grouped-query attention)
//! against transformers on the tiny random model `tools/make_next_fixtures.py` writes: for
//! pictures of five sizes and aspect ratios (each a different tile grid or unpadding) and two of
//! different sizes in one prompt — the tiles' pixel values, the expanded prompt ids, the packed
//! image features, greedy ids and every step's logits.

mod common;

use std::process::Command;

use common::{assert_close, fixture_dir, Expected};
use fastrm::backend::cpu::Cpu;
use fastrm::text::{Role, Turn};
use fastrm::vision::ImageLayout;
use fastrm::{Engine, GenerateOptions, ImageInput, Request};
use serde_json::Value;

fn cases(exp: &Expected) -> Vec<Value> {
    serde_json::from_str(&exp.meta["cases"]).unwrap()
}

fn request(case: &Value, question: &str) -> Request {
    let dir = fixture_dir("next");
    let images: Vec<ImageInput> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| ImageInput::Path(dir.join(f.as_str().unwrap())))
        .collect();
    Request::Chat {
        turns: vec![Turn::new(Role::User, images.len(), question)],
        images,
    }
}

#[test]
fn next_matches_transformers() {
    let exp = Expected::load("next");
    let engine = Engine::load(Cpu, &fixture_dir("next")).unwrap();
    let (b, m) = (engine.backend(), engine.model());
    let cases = cases(&exp);
    assert_eq!(cases.len(), 6);
    let mut grids = std::collections::BTreeSet::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let (prompt, pixels) = engine
            .resolve(&request(case, &exp.meta["question"]))
            .unwrap();
        assert_eq!(
            prompt.ids(),
            exp.ids(&format!("{name}.input_ids")),
            "{name}: prompt ids"
        );
        // The layouts agree with the processor's sizes, tiles and token counts.
        let sizes = exp.ids(&format!("{name}.image_sizes"));
        let layouts = prompt.layouts();
        assert_eq!(layouts.len() * 2, sizes.len());
        for (l, hw) in layouts.iter().zip(sizes.chunks(2)) {
            let &ImageLayout::AnyRes { size, tiles, .. } = l else {
                panic!("{name}: a square layout on LLaVA-NeXT")
            };
            assert_eq!(size, (hw[0] as usize, hw[1] as usize), "{name}: image size");
            grids.insert(tiles);
        }
        let views: usize = layouts.iter().map(ImageLayout::views).sum();
        assert_eq!(
            views as u64,
            case["tiles"].as_u64().unwrap(),
            "{name}: views"
        );
        let tokens: usize = layouts.iter().map(ImageLayout::tokens).sum();
        assert_eq!(tokens as u64, case["image_tokens"].as_u64().unwrap());

        // Pixels exactly: the same resize, letterbox and tiles as the PIL processor.
        let (_, want_px) = exp.f32(&format!("{name}.pixel_values"));
        assert_eq!(pixels.len(), want_px.len(), "{name}: pixel count");
        let worst = pixels
            .iter()
            .zip(want_px)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(worst, 0.0, "{name}: pixels differ by up to {worst}");

        // The packed features: tiles, unpadding and newlines in the processor's token order.
        let feats = m.encode_images(b, &pixels, layouts).unwrap();
        let got: Vec<f32> = feats.iter().flat_map(|f| f.data.to_vec()).collect();
        let (_, want_feats) = exp.f32(&format!("{name}.image_features"));
        assert_close(&format!("{name} image features"), &got, want_feats, 1e-5);

        let gen = exp.ids(&format!("{name}.generated_ids"));
        let opts = common::forced(gen.len(), true);
        let g = m.generate(b, prompt, &pixels, &opts).unwrap();
        assert_eq!(g.generated_ids, gen, "{name}: generated ids");
        let (lshape, want_logits) = exp.f32(&format!("{name}.logits"));
        let vocab = lshape[1];
        for (k, logits) in g.step_logits.iter().enumerate() {
            let want = &want_logits[k * vocab..(k + 1) * vocab];
            assert_close(&format!("{name} step {k} logits"), logits, want, 1e-4);
        }
    }
    // The pictures cover distinct tile grids (1x2, 2x1, 1x3, 2x2).
    assert!(grids.len() >= 4, "tile grids {grids:?}");
}

/// The engine's own path (the stream, the image cache) and the command line give the oracle's ids.
#[test]
fn next_generates_through_the_engine_and_the_cli() {
    let exp = Expected::load("next");
    let engine = Engine::load(Cpu, &fixture_dir("next")).unwrap();
    engine.set_image_cache(4);
    let question = &exp.meta["question"];
    for case in &cases(&exp) {
        let name = case["name"].as_str().unwrap();
        let gen = exp.ids(&format!("{name}.generated_ids"));
        let opts = common::forced(gen.len(), false);
        // Twice: the second run's image features come from the cache.
        for _ in 0..2 {
            let g = engine.generate(&request(case, question), &opts).unwrap();
            assert_eq!(g.generated_ids, gen, "{name}: engine ids");
        }
    }
    // The command line on the two-image case.
    let case = cases(&exp)
        .into_iter()
        .find(|c| c["name"] == "two_sizes")
        .unwrap();
    let dir = fixture_dir("next");
    let gen = exp.ids("two_sizes.generated_ids");
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        dir.to_str().unwrap().into(),
        "--prompt".into(),
        question.clone(),
        "--max-new-tokens".into(),
        gen.len().to_string(),
        "--json".into(),
    ];
    for f in case["images"].as_array().unwrap() {
        args.extend([
            "--image".into(),
            dir.join(f.as_str().unwrap()).display().to_string(),
        ]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(&args)
        .output()
        .unwrap();
    let stdout = common::cli_ok(&out);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let ids = |k: &str| common::json_ids(&v, k);
    assert_eq!(ids("input_ids"), exp.ids("two_sizes.input_ids"));
    // The first step's logits, for checking parity from outside.
    let first = common::json_f32s(&v, "first_step_logits");
    let (lshape, logits) = exp.f32("two_sizes.logits");
    assert_close("CLI first_step_logits", &first, &logits[..lshape[1]], 1e-4);
    let got = ids("generated_ids");
    assert_eq!(got[..], gen[..got.len()], "CLI ids (EOS may end it early)");
}

/// Each generated token's map over every image token — the exact (Chefer) baseline, the
/// incremental one and the GradCAM of each decoder layer — equals transformers' autograd on the
/// same tiled prompt; the
/// maps split per image by the layouts and place onto each picture's grid.
#[test]
fn next_maps_match_transformers() {
    use fastrm::explain::{Method, RowMode};
    let exp = Expected::load("next");
    let engine = Engine::load(Cpu, &fixture_dir("next")).unwrap();
    let layers = engine.config().text.num_hidden_layers;
    let mut incremental_differs = false;
    for case in &cases(&exp) {
        let name = case["name"].as_str().unwrap();
        let gen = exp.ids(&format!("{name}.generated_ids"));
        let opts = common::forced(gen.len(), false);
        let req = request(case, &exp.meta["question"]);
        let (rshape, want) = exp.f32(&format!("{name}.relevancy"));
        let (cshape, cams) = exp.f32(&format!("{name}.gradcam"));
        let (t, p) = (rshape[0], rshape[1]);
        assert_eq!((cshape[0], cshape[1], cshape[2]), (layers, t, p));
        let (ishape, inc) = exp.f32(&format!("{name}.relevancy_incremental"));
        assert_eq!((ishape[0], ishape[1]), (t, p));
        // The incremental maps really differ from the exact ones after token 0.
        incremental_differs |= inc[p..]
            .iter()
            .zip(&want[p..])
            .any(|(a, b)| (a - b).abs() > 1e-5);
        let mut methods = vec![
            (
                Method::Baseline {
                    mode: RowMode::Streamed,
                },
                want.to_vec(),
            ),
            // LVLM-Interpret's incremental maps over the KV-cached generation.
            (Method::BaselineIncremental, inc.to_vec()),
        ];
        for l in 0..layers {
            methods.push((
                Method::GradCam { layer: l },
                cams[l * t * p..(l + 1) * t * p].to_vec(),
            ));
        }
        for (method, want) in methods {
            let e = engine.explain(&req, &opts, method, &mut |_| {}).unwrap();
            assert_eq!(e.generation.generated_ids, gen, "{name} {method:?}: ids");
            assert_eq!(e.tokens.len(), t);
            for (k, tm) in e.tokens.iter().enumerate() {
                let what = format!("{name} {method:?} token {k}");
                assert_close(&what, &tm.map, &want[k * p..(k + 1) * p], 1e-4);
                // Split per image by the layouts, each placed on its picture's grid.
                let parts = tm.per_image();
                assert_eq!(parts.len(), e.generation.layouts.len());
                for (part, layout) in parts.iter().zip(&e.generation.layouts) {
                    let ((rows, cols), placed) = layout.place(part).unwrap();
                    assert_eq!(placed.len(), rows * cols);
                }
            }
        }
    }
    assert!(
        incremental_differs,
        "the incremental maps equal the exact ones"
    );
}

/// `explain` on the command line draws each token's map on each tiled picture and reports the
/// images' layouts in its JSON.
#[test]
fn next_explain_draws_tiled_maps() {
    let dir = fixture_dir("next");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args([
            "explain",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "What?",
        ])
        .args(["--method", "baseline", "--max-new-tokens", "2", "--out"])
        .arg(tmp.path())
        .args(["--image", dir.join("panorama.png").to_str().unwrap()])
        .args(["--image", dir.join("tall.png").to_str().unwrap()])
        .output()
        .unwrap();
    common::cli_ok(&out);
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("explain.json")).unwrap())
            .unwrap();
    let layouts = doc["image_layouts"].as_array().unwrap();
    assert_eq!(layouts.len(), 2);
    assert_eq!(layouts[0]["kind"], "any_res");
    assert_eq!(layouts[0]["size"], serde_json::json!([40, 100]));
    let pngs = common::file_names(tmp.path())
        .into_iter()
        .filter(|f| f.starts_with("token_") && f.ends_with(".png"))
        .count();
    let tokens = doc["tokens"].as_array().unwrap().len();
    assert_eq!(pngs, 2 * tokens, "one overlay per token per image");
}

// The server on a tiled model, maps included: tests/serve.rs (tiled_images_get_maps_placed_on_each_picture).

/// The processor's tiling must be the model's: a preprocessor_config.json that disagrees is an
/// error naming the field, not a silent choice of one.
#[test]
fn next_refuses_a_processor_that_tiles_differently() {
    let m = common::copy_model("next", "");
    let path = m.path().join("preprocessor_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["image_grid_pinpoints"] = serde_json::json!([[30, 60], [60, 30]]);
    std::fs::write(&path, v.to_string()).unwrap();
    let err = Engine::load(Cpu, m.path())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("image_grid_pinpoints"), "{err}");
}

/// LLaVA-NeXT on its checkpoint's own chat template (Mistral's `[INST] … [/INST]`, a system block,
/// `</s>` after the assistant's turn) from the folder's `chat_template.json`: a conversation's
/// prompt ids equal `LlavaNextProcessor.apply_chat_template` + the processor's (any-resolution
/// token count included; `tools/make_chat_fixtures.py`), and the engine answers it.
#[test]
fn next_conversations_use_the_checkpoints_own_template() {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("tests/fixtures/chat_cases.json"))
            .unwrap(),
    )
    .unwrap();
    let case = &doc["next_case"];
    let source = &doc["templates"][case["template"].as_str().unwrap()];
    let m = common::copy_model("next", "");
    let json = serde_json::json!({ "chat_template": source }).to_string();
    std::fs::write(m.path().join("chat_template.json"), json).unwrap();
    let engine = Engine::load(Cpu, m.path()).unwrap();
    let conv = fastrm::engine::chat::conversation_with_placeholders(
        &fastrm::engine::chat::messages_of(&case["messages"].to_string()).unwrap(),
    )
    .unwrap();
    let text = engine.text().unwrap();
    assert_eq!(
        text.render_chat(&conv.turns).unwrap(),
        case["rendered"].as_str().unwrap()
    );
    let req = Request::Chat {
        turns: conv.turns,
        images: vec![ImageInput::Path(
            fixture_dir("next").join(case["image"].as_str().unwrap()),
        )],
    };
    let (prompt, _) = engine.resolve(&req).unwrap();
    assert_eq!(prompt.ids(), &common::json_ids(case, "input_ids")[..]);
    let opts = GenerateOptions {
        max_new_tokens: 2,
        stop_at_eos: false,
        ..Default::default()
    };
    let g = engine.generate(&req, &opts).unwrap();
    assert_eq!(g.input_ids, common::json_ids(case, "input_ids"));
    assert_eq!(g.generated_ids.len(), 2);
}

/// `synth-model` writes a LLaVA-NeXT folder with exactly the tensors (names and shapes) of the
/// one transformers saved, its processor tiling as the model does; the engine loads it and runs
/// an id-level request, which tiles a picture of the tower's side as the model would.
#[test]
fn synthetic_next_folders_hold_what_transformers_writes() {
    let dir = fixture_dir("next");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("next");
    let opts = fastrm::synth::SynthOptions {
        dtype: fastrm::checkpoint::DType::F32,
        shards: 1,
        seed: 3,
    };
    fastrm::synth::write_model(&out, &config, &opts).unwrap();
    let shapes = |path: &std::path::Path| -> Vec<(String, Vec<usize>)> {
        common::read_safetensors(path)
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect()
    };
    let written = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "safetensors") && !p.ends_with("head.safetensors")
        })
        .unwrap();
    assert_eq!(shapes(&written), shapes(&dir.join("model.safetensors")));
    let pp: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    let model: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(pp["image_grid_pinpoints"], model["image_grid_pinpoints"]);

    let engine = Engine::load(Cpu, &out).unwrap();
    let req = Request::Ids { n_text: 4, seed: 1 };
    let (prompt, pixels) = engine.resolve(&req).unwrap();
    let side = engine.config().vision.image_size;
    assert_eq!(prompt.layouts(), [engine.config().image_layout(side, side)]);
    assert_eq!(pixels.len(), prompt.layouts()[0].views() * 3 * side * side);
    let opts = common::forced(3, false);
    assert_eq!(engine.generate(&req, &opts).unwrap().generated_ids.len(), 3);
}

/// The incremental baseline and FastRM (a random head of the model's size) run over tiled
/// images too: a finite, non-zero map over every image token of both pictures per token.
#[test]
fn next_incremental_and_fastrm_maps_cover_every_image_token() {
    use fastrm::explain::fastrm::HeadWeights;
    use fastrm::explain::Method;
    let exp = Expected::load("next");
    let mut engine = Engine::load(Cpu, &fixture_dir("next")).unwrap();
    let d = engine.config().text.hidden_size;
    engine.set_head(&HeadWeights::random(d, 16, 1)).unwrap();
    let case = cases(&exp)
        .into_iter()
        .find(|c| c["name"] == "two_sizes")
        .unwrap();
    let req = request(&case, &exp.meta["question"]);
    let tokens = case["image_tokens"].as_u64().unwrap() as usize;
    for method in [Method::BaselineIncremental, Method::FastRm] {
        let e = engine
            .explain(&req, &common::forced(3, false), method, &mut |_| {})
            .unwrap();
        assert_eq!(e.tokens.len(), 3);
        for t in &e.tokens {
            assert_eq!(t.map.len(), tokens, "{method:?}");
            assert!(t.map.iter().all(|v| v.is_finite()) && t.map.iter().any(|&v| v > 0.0));
            let parts: Vec<usize> = t.per_image().iter().map(|p| p.len()).collect();
            let want: Vec<usize> = e.generation.layouts.iter().map(|l| l.tokens()).collect();
            assert_eq!(parts, want, "{method:?}: split per image");
        }
    }
}

/// `distill` refuses a tiled model by name before any work (a training set holds one patch count
/// for every sample), and leaves no output folder behind.
#[test]
fn distill_refuses_a_tiled_model_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir("next").join("wide.png"),
        tmp.path().join("wide.png"),
    )
    .unwrap();
    let q = tmp.path().join("q.jsonl");
    std::fs::write(
        &q,
        "{\"image\": \"wide.png\", \"question\": \"What is it?\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["distill", "-t", "1", "--model"])
        .arg(fixture_dir("next"))
        .arg("--questions")
        .arg(&q)
        .arg("--images")
        .arg(tmp.path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    common::cli_fails(&o, &["LLaVA-NeXT", "cannot be distilled"]);
    assert!(!out.exists(), "a refused run leaves no folder");
}
