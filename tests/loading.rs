//! Checkpoint loading across the layouts real checkpoints come in: hub (transformers-4.x) names in
//! one f32 file, transformers-5 names in f16 shards with an index, hub names in bf16. Every variant
//! must yield, by hub name, the f32 reference rounded to its dtype, and load into a working engine.

mod common;

use common::{fixture_dir, fixture_image, read_safetensors};
use fastrm::backend::cpu::Cpu;
use fastrm::checkpoint::{Checkpoint, DType, StoredTensor};
use fastrm::{Engine, GenerateOptions, Request};

#[test]
fn every_layout_and_dtype_gives_the_same_weights() {
    let base = fixture_dir("tiny");
    let reference = read_safetensors(&base.join("model.safetensors"));
    assert!(
        reference
            .iter()
            .any(|t| t.name.starts_with("language_model.model.")),
        "reference uses hub names"
    );
    for (sub, dtype) in [
        ("model-t5-sharded-f16", DType::F16),
        ("model-bf16", DType::BF16),
    ] {
        let ck = Checkpoint::open(&fixture_dir("tiny").join(sub))
            .unwrap_or_else(|e| panic!("{sub}: {e}"));
        if sub.contains("sharded") {
            assert!(
                ck.names().all(|n| !n.starts_with("language_model.")),
                "{sub} should use transformers-5 names"
            );
        }
        let mut checked = 0;
        for t in &reference {
            let want: Vec<f32> = t
                .data
                .chunks_exact(4)
                .map(|c| {
                    let x = f32::from_le_bytes(c.try_into().unwrap());
                    match dtype {
                        DType::F16 => half::f16::from_f32(x).to_f32(),
                        DType::BF16 => half::bf16::from_f32(x).to_f32(),
                        DType::F32 => x,
                    }
                })
                .collect();
            let got = ck
                .get(&t.name, &t.shape)
                .unwrap_or_else(|e| panic!("{sub}: {e}"));
            assert_eq!(got.dtype, dtype, "{sub} {}", t.name);
            assert_eq!(
                got.to_f32(),
                want,
                "{sub}: {} differs from the f32 reference",
                t.name
            );
            checked += 1;
        }
        assert_eq!(checked, reference.len());
        assert_eq!(
            ck.names().count(),
            reference.len(),
            "{sub} has extra tensors"
        );

        // And the engine runs on it, agreeing with the f32 model on the first token (the fixture
        // seed keeps top-2 gaps far above f16 rounding).
        let engine = Engine::load(Cpu, &fixture_dir("tiny").join(sub)).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 1,
            stop_at_eos: false,
            keep_steps: false,
            ..Default::default()
        };
        let req = Request::question(fixture_image("tiny"), "What is this?");
        let g = engine.generate(&req, &opts).unwrap();
        let f32_engine = Engine::load(Cpu, &base).unwrap();
        let g32 = f32_engine.generate(&req, &opts).unwrap();
        assert_eq!(g.generated_ids, g32.generated_ids, "{sub}: first token");
    }
}

#[test]
fn synthetic_weights_build_the_same_program() {
    // Random weights with the shapes a config implies: used by benches where no checkpoint exists.
    let cfg = fastrm::config::LlavaConfig::from_file(&fixture_dir("clip336").join("config.json"))
        .unwrap();
    let engine = Engine::synthetic(Cpu, &cfg, 7).unwrap();
    let n = cfg.vision.num_patches();
    let mut ids = vec![cfg.bos_token_id];
    ids.extend(std::iter::repeat_n(cfg.image_token_id, n));
    ids.extend([5, 6, 7]);
    let pixels = vec![0.25f32; 3 * cfg.vision.image_size * cfg.vision.image_size];
    let opts = GenerateOptions {
        max_new_tokens: 3,
        stop_at_eos: false,
        keep_steps: true,
        ..Default::default()
    };
    let prompt = engine.model().prompt(ids).unwrap();
    let g = engine
        .model()
        .generate(engine.backend(), prompt.clone(), &pixels, &opts)
        .unwrap();
    assert_eq!(g.generated_ids.len(), 3);
    assert!(g.step_logits.iter().flatten().all(|x| x.is_finite()));
    // Same seed, same weights, same answer.
    let again = Engine::synthetic(Cpu, &cfg, 7).unwrap();
    let g2 = again
        .model()
        .generate(again.backend(), prompt, &pixels, &opts)
        .unwrap();
    assert_eq!(g.step_logits, g2.step_logits);
}

#[test]
fn models_too_large_for_memory_are_refused_before_loading() {
    use fastrm::backend::Backend;
    // 2^50 f32 values: 4.5 PB, more than any machine this runs on.
    let f32s = |values: usize| StoredTensor {
        dtype: DType::F32,
        rows: 1 << 10,
        cols: values >> 10,
    };
    let e = Cpu.check_weight_memory(&[f32s(1 << 50)]).unwrap_err();
    assert!(matches!(e, fastrm::Error::OutOfMemory(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("GB") && e.contains("available"), "{e}");
    Cpu.check_weight_memory(&[f32s(1 << 20)]).unwrap();
}
