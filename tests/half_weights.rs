//! Half-precision weights on the CPU backend (f16/bf16 matrices read where the checkpoint keeps
//! them, f32 arithmetic) against the f32 path.
//!
//! Two references, two bounds. f16 and bf16 widen to f32 exactly, so a model whose stored weights
//! are half precision computes the same function with its weights held as stored or copied to f32;
//! only the order of the f32 sums differs (the GEMV's lanes, the panels), a relative error of a few
//! f32 ulps per product: the tight bound. Against the original f32 weights, the rounding of every
//! weight (relative `u` = 2⁻¹¹ for f16, 2⁻⁸ for bf16) moves every product by about `u` relative,
//! and the errors of a few dozen products compound along the forward: the loose bound, a small
//! multiple of `u`.

mod common;

use common::{fixture_dir, fixture_image};
use fastrm::backend::cpu::{Cpu, CpuTensor, CpuWeights};
use fastrm::backend::cpu_half::HalfKind;
use fastrm::backend::Backend;
use fastrm::checkpoint::{Checkpoint, DType, TensorRef};
use fastrm::explain::RowMode;
use fastrm::model::{Synthetic, WeightSource};
use fastrm::synth::{write_model, SynthOptions};
use fastrm::util::SplitMix64;
use fastrm::{Engine, GenerateOptions, Method, Request};

fn half(kind: HalfKind) -> Cpu {
    Cpu::with_weights(CpuWeights::Half(kind))
}

fn stored() -> Cpu {
    Cpu::with_weights(CpuWeights::Stored)
}

/// An f32 `[rows, cols]` tensor as the backend loads a checkpoint weight.
fn weight(b: &Cpu, values: &[f32], rows: usize, cols: usize) -> CpuTensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = [rows, cols];
    let t = TensorRef {
        name: "w",
        dtype: DType::F32,
        shape: &shape,
        bytes: &bytes,
        mapping: None,
    };
    b.load_weight(&t, rows, cols).unwrap()
}

fn rand(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.uniform_sym()).collect()
}

fn round(v: &[f32], kind: HalfKind) -> Vec<f32> {
    v.iter()
        .map(|&x| match kind {
            HalfKind::F16 => half::f16::from_f32(x).to_f32(),
            HalfKind::Bf16 => half::bf16::from_f32(x).to_f32(),
        })
        .collect()
}

/// `|got - want| <= tol * scale` elementwise, reporting the worst.
fn close(what: &str, got: &[f32], want: &[f32], tol: f32, scale: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f32), |w, (i, e)| if e > w.1 { (i, e) } else { w });
    assert!(
        err <= tol * scale && got.iter().all(|v| v.is_finite()),
        "{what}: worst |diff| {err:e} at {i} (got {}, want {}) exceeds {tol:e} x {scale}",
        got[i],
        want[i]
    );
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

#[test]
fn half_products_match_f32_products_over_the_rounded_weights() {
    // Shapes that reach every path: GEMV (m ≤ 4) and GEMM, lengths off the SIMD width (tails),
    // more than one block of rows.
    let mut rng = SplitMix64::new(11);
    for kind in [HalfKind::F16, HalfKind::Bf16] {
        for (m, n, k) in [(1, 200, 77), (3, 130, 64), (5, 70, 35), (97, 300, 260)] {
            let w = rand(&mut rng, n * k);
            let x = CpuTensor::new(rand(&mut rng, m * k), m, k).unwrap();
            let bias = CpuTensor::new(rand(&mut rng, n), 1, n).unwrap();
            let wh = weight(&half(kind), &w, n, k);
            assert!(wh.half.is_some() && wh.data.is_empty(), "held as half");
            let wr = weight(&Cpu, &round(&w, kind), n, k);
            // Each output sums k products of values ≤ 1: reordering an f32 sum moves it by at
            // most about k·2⁻²⁴ times the sum of |terms| ≤ k (the worst case; a wrong conversion
            // or row errs by O(1)).
            let tol = (k * k) as f32 * 2f32.powi(-24);
            let what = format!("{kind:?} linear m={m} n={n} k={k}");
            let y = Cpu.linear(&x, &wh, Some(&bias)).unwrap();
            let yr = Cpu.linear(&x, &wr, Some(&bias)).unwrap();
            close(&what, &y.data, &yr.data, tol, 1.0);
            // The backward: dy [m, n] · w [n, k].
            let dy = CpuTensor::new(rand(&mut rng, m * n), m, n).unwrap();
            let dx = Cpu.linear_bwd(&dy, &wh).unwrap();
            let dxr = Cpu.linear_bwd(&dy, &wr).unwrap();
            let tol = (n * n) as f32 * 2f32.powi(-24);
            close(&format!("{what} backward"), &dx.data, &dxr.data, tol, 1.0);
            // Lookups convert exactly.
            let ids = [0u32, (n - 1) as u32, 3];
            assert_eq!(
                Cpu.embedding(&wh, &ids).unwrap(),
                Cpu.embedding(&wr, &ids).unwrap()
            );
            assert_eq!(
                Cpu.slice_rows(&wh, 2, 3).unwrap(),
                Cpu.slice_rows(&wr, 2, 3).unwrap()
            );
            assert_eq!(Cpu.download(&wh).unwrap(), wr.data);
            assert!(Cpu.embedding(&wh, &[n as u32]).is_err());
        }
    }
}

#[test]
fn a_half_weight_where_f32_values_are_needed_is_an_error() {
    let mut rng = SplitMix64::new(3);
    let wh = weight(&half(HalfKind::F16), &rand(&mut rng, 16), 4, 4);
    let x = CpuTensor::new(rand(&mut rng, 16), 4, 4).unwrap();
    for r in [
        Cpu.add(&x, &wh),
        Cpu.matmul(&x, &wh),
        Cpu.gelu(&wh),
        Cpu.linear(&wh, &x, None),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("half-precision"), "{e}");
    }
    // Vectors (norms, biases) are f32 in every mode.
    let v = weight(&half(HalfKind::F16), &rand(&mut rng, 4), 1, 4);
    assert!(v.half.is_none());
}

/// First-step logits and the generated ids of `engine` on the tiny fixture's question.
fn run(engine: &Engine<Cpu>, steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let req = Request::question(fixture_image("tiny"), "What is this?");
    let (prompt, pixels) = engine.resolve(&req).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: steps,
        stop_at_eos: false,
        keep_steps: true,
        ..Default::default()
    };
    let g = engine
        .model()
        .generate(engine.backend(), prompt, &pixels, &opts)
        .unwrap();
    (g.generated_ids, g.step_logits)
}

#[test]
fn half_weights_as_stored_compute_what_their_f32_copies_do() {
    // The fixture's f16 (transformers-5 names, 2 shards) and bf16 folders, held as stored
    // (mapped) and as f32 copies: the same weights, so the tight bound.
    for (sub, kind) in [
        ("model-t5-sharded-f16", HalfKind::F16),
        ("model-bf16", HalfKind::Bf16),
    ] {
        let dir = fixture_dir("tiny").join(sub);
        let f32s = Engine::load(Cpu, &dir).unwrap();
        for b in [stored(), half(kind)] {
            let e = Engine::load(b, &dir).unwrap();
            for w in [&e.model().llm.layers[0].q, &e.model().llm.lm_head] {
                assert!(
                    w.half.as_ref().is_some_and(|h| h.is_mapped()),
                    "{sub}: mapped"
                );
            }
            let (ids, logits) = run(&e, 4);
            let (ids32, logits32) = run(&f32s, 4);
            assert_eq!(ids, ids32, "{sub}: answer");
            for (s, (a, b)) in logits.iter().zip(&logits32).enumerate() {
                close(&format!("{sub} step {s}"), a, b, 1e-5, max_abs(b));
            }
        }
        // The exact relevancy backward goes through the linear backward with half weights.
        let req = Request::question(fixture_image("tiny"), "What is this?");
        let opts = GenerateOptions {
            max_new_tokens: 2,
            stop_at_eos: false,
            keep_steps: false,
            ..Default::default()
        };
        let method = Method::Baseline {
            mode: RowMode::Streamed,
        };
        let e = Engine::load(stored(), &dir).unwrap();
        let maps = e.explain(&req, &opts, method, &mut |_| {}).unwrap();
        let maps32 = f32s.explain(&req, &opts, method, &mut |_| {}).unwrap();
        for (t, t32) in maps.tokens.iter().zip(&maps32.tokens) {
            close(
                &format!("{sub} map"),
                &t.map,
                &t32.map,
                1e-4,
                max_abs(&t32.map),
            );
        }
    }
}

#[test]
fn weights_rounded_to_half_stay_near_the_f32_model() {
    // The f32 fixture held in f16 / bf16 (rounded copies): the loose bound, 8 rounding units
    // relative to the largest logit (measured: about 2 for f16, 1.4 for bf16; independent
    // roundings mostly cancel rather than add up over the layers).
    let dir = fixture_dir("tiny");
    let (ids32, logits32) = run(&Engine::load(Cpu, &dir).unwrap(), 1);
    for (kind, u) in [
        (HalfKind::F16, 2f32.powi(-11)),
        (HalfKind::Bf16, 2f32.powi(-8)),
    ] {
        let e = Engine::load(half(kind), &dir).unwrap();
        let (ids, logits) = run(&e, 1);
        assert_eq!(ids, ids32, "{kind:?}: first token");
        close(
            &format!("{kind:?} logits"),
            &logits[0],
            &logits32[0],
            8.0 * u,
            max_abs(&logits32[0]),
        );
    }
}

#[test]
fn a_three_shard_hub_folder_loads_the_synthetic_weights_it_was_written_with() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mid");
    let config =
        std::fs::read_to_string(common::repo_root().join("benches/midsize_config.json")).unwrap();
    let opts = SynthOptions {
        seed: 5,
        ..Default::default()
    };
    let w = write_model(&dir, &config, &opts).unwrap();
    assert_eq!(
        w.shards,
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors"
        ]
    );
    for f in &w.shards {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["metadata"]["total_size"], w.bytes);
    assert_eq!(
        index["weight_map"]["language_model.lm_head.weight"],
        "model-00003-of-00003.safetensors"
    );
    // Every tensor: hub name, f16, and the values `synthetic` draws, rounded.
    let ck = Checkpoint::open(&dir).unwrap();
    let cfg = fastrm::config::LlavaConfig::from_json_str(&config).unwrap();
    let tensors = fastrm::synth::hub_tensors(&cfg);
    assert_eq!(ck.names().count(), tensors.len());
    let src = Synthetic { seed: 5 };
    for (name, shape) in &tensors {
        let t = ck.get(name, shape).unwrap();
        assert_eq!(t.dtype, DType::F16, "{name}");
        let n: usize = shape.iter().product();
        let rows = if shape.len() >= 2 { shape[0] } else { 1 };
        let want = src.get(&Cpu, name, shape, rows, n / rows).unwrap();
        assert_eq!(t.to_f32(), round(&want.data, HalfKind::F16), "{name}");
    }
    // A second write never clobbers.
    let e = write_model(&dir, &config, &opts).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");

    // The folder runs as a model (its tokenizer encodes a question, `<image>` at 32000), the same
    // as stored and as f32 copies.
    let req = Request::question(fixture_image("clip336"), "What is in the image?");
    let gen = GenerateOptions {
        max_new_tokens: 2,
        stop_at_eos: false,
        keep_steps: false,
        ..Default::default()
    };
    let g = Engine::load(stored(), &dir)
        .unwrap()
        .generate(&req, &gen)
        .unwrap();
    let g32 = Engine::load(Cpu, &dir)
        .unwrap()
        .generate(&req, &gen)
        .unwrap();
    assert_eq!(g.generated_ids, g32.generated_ids);
    assert!(!g.text.trim().is_empty(), "every id has a text");
}

#[test]
fn f32_copies_that_do_not_fit_are_refused_naming_the_mapped_alternative() {
    use fastrm::checkpoint::StoredTensor;
    // A 7B-sized f16 checkpoint scaled up past any machine: refused at f32 with the sizes and the
    // way out; held as stored it needs no anonymous memory for its matrices.
    let huge = [StoredTensor {
        dtype: DType::F16,
        rows: 1 << 30,
        cols: 1 << 20,
    }];
    let e = Cpu.check_weight_memory(&huge).unwrap_err();
    assert!(matches!(e, fastrm::Error::OutOfMemory(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("at f32") && e.contains("available") && e.contains("--dtype f32"),
        "{e}"
    );
    stored().check_weight_memory(&huge).unwrap();
    // Converting to the other half type is a copy and counts.
    assert!(half(HalfKind::Bf16).check_weight_memory(&huge).is_err());
}
