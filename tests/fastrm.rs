//! The FastRM head: the folded decode form against the unfolded formula and an independent f64
//! evaluation of the paper's definition, maps during generation against the same formula on the
//! oracle's hidden states, the head file format and its errors, and the CLI.

mod common;

use std::process::Command;

use common::{fixture_dir, fixture_image, Expected};
use fastrm::backend::cpu::{Cpu, CpuTensor};
use fastrm::explain::fastrm::{FastRmHead, HeadWeights};
use fastrm::util::SplitMix64;
use fastrm::{Engine, GenerateOptions, Method, Request};

/// `sigmoid((W_q LN(h) + b_q) · (W_k LN(k_j) + b_k) / √d)` in f64, straight from the definition.
fn reference(w: &HeadWeights, keys: &[f32], h: &[f32]) -> Vec<f64> {
    let (dm, d) = (w.cfg.hidden_size, w.cfg.head_dim);
    let eps = w.cfg.layer_norm_eps as f64;
    let ln = |x: &[f32]| -> Vec<f64> {
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / dm as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dm as f64;
        (0..dm)
            .map(|i| {
                (x[i] as f64 - mean) / (var + eps).sqrt() * w.ln_w[i] as f64 + w.ln_b[i] as f64
            })
            .collect()
    };
    let proj = |wt: &[f32], bias: &[f32], u: &[f64]| -> Vec<f64> {
        (0..d)
            .map(|r| bias[r] as f64 + (0..dm).map(|c| wt[r * dm + c] as f64 * u[c]).sum::<f64>())
            .collect()
    };
    let q = proj(&w.wq, &w.bq, &ln(h));
    keys.chunks_exact(dm)
        .map(|kr| {
            let k = proj(&w.wk, &w.bk, &ln(kr));
            let z: f64 = q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt();
            1.0 / (1.0 + (-z).exp())
        })
        .collect()
}

#[test]
fn folded_equals_unfolded_and_the_definition() {
    let mut rng = SplitMix64::new(21);
    for (dm, d, p, m) in [(64, 32, 25, 3), (512, 512, 576, 2), (96, 8, 7, 1)] {
        let w = HeadWeights::random(dm, d, 5);
        let head = FastRmHead::new(&Cpu, &w, dm).unwrap();
        let keys: Vec<f32> = (0..p * dm).map(|_| 2.0 * rng.uniform_sym()).collect();
        let hs: Vec<f32> = (0..m * dm).map(|_| 2.0 * rng.uniform_sym()).collect();
        let (kt, ht) = (
            CpuTensor::new(keys.clone(), p, dm).unwrap(),
            CpuTensor::new(hs.clone(), m, dm).unwrap(),
        );
        let folded = head.fold(&Cpu, &kt).unwrap();
        let fused = head.scores(&Cpu, &folded, &ht).unwrap();
        let unfolded = head
            .scores_unfolded(&Cpu, &head.keys(&Cpu, &kt).unwrap(), &ht)
            .unwrap();
        assert_eq!((fused.rows, fused.cols), (m, p));
        let mut spread = (1.0f64, 0.0f64);
        for r in 0..m {
            let want = reference(&w, &keys, &hs[r * dm..(r + 1) * dm]);
            for j in 0..p {
                let (a, b, c) = (
                    fused.data[r * p + j] as f64,
                    unfolded[r * p + j] as f64,
                    want[j],
                );
                assert!(
                    (a - c).abs() < 1e-5,
                    "D={dm} row {r} patch {j}: folded {a} vs definition {c}"
                );
                assert!(
                    (b - c).abs() < 1e-5,
                    "D={dm} row {r} patch {j}: unfolded {b} vs definition {c}"
                );
                spread = (spread.0.min(c), spread.1.max(c));
            }
        }
        assert!(
            spread.1 - spread.0 > 0.1,
            "scores barely vary ({spread:?}): the comparison would be weak"
        );
    }
}

#[test]
fn maps_during_generation_match_the_formula_on_oracle_hidden_states() {
    let exp = Expected::load("tiny");
    let engine = Engine::load(Cpu, &fixture_dir("tiny")).unwrap();
    let dm = engine.config().text.hidden_size;
    let w = HeadWeights::random(dm, 16, 9);
    let mut engine = engine;
    engine.set_head(&w).unwrap();
    let (ids, gen) = (exp.ids("input_ids"), exp.ids("generated_ids"));
    let opts = GenerateOptions {
        max_new_tokens: gen.len(),
        stop_at_eos: false,
        keep_steps: false,
        ..Default::default()
    };
    let (_, px) = exp.f32("pixel_values");
    let req = Request::Prepared {
        prompt: engine.model().prompt(ids.clone()).unwrap(),
        pixels: px.to_vec(),
    };
    let e = engine
        .explain(&req, &opts, Method::FastRm, &mut |_| {})
        .unwrap();
    assert_eq!(e.generation.generated_ids, gen);
    let maps: Vec<Vec<f32>> = e.tokens.into_iter().map(|t| t.map).collect();
    let (_, hidden) = exp.f32("hidden_final");
    let img_id = engine.config().image_token_id;
    let keys: Vec<f32> = (0..ids.len())
        .filter(|&i| ids[i] == img_id)
        .flat_map(|i| hidden[i * dm..(i + 1) * dm].to_vec())
        .collect();
    for (k, map) in maps.iter().enumerate() {
        let p = ids.len() - 1 + k;
        let want = reference(&w, &keys, &hidden[p * dm..(p + 1) * dm]);
        assert_eq!(map.len(), 25);
        for (j, (&a, &b)) in map.iter().zip(&want).enumerate() {
            assert!(
                (a as f64 - b).abs() < 1e-4,
                "token {k} patch {j}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn head_file_round_trip_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("head.safetensors");
    let w = HeadWeights::random(64, 16, 3);
    w.save(&path).unwrap();
    assert_eq!(HeadWeights::load(&path).unwrap(), w);
    // The same head is the same bytes (fixed metadata order).
    let again = tmp.path().join("again.safetensors");
    w.save(&again).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap()
    );
    std::fs::remove_file(&again).unwrap();
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().count() == 1,
        "no temporary file left behind"
    );

    let err = |p: &std::path::Path| HeadWeights::load(p).unwrap_err().to_string();
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    assert!(err(&cut).contains("cut.safetensors"));
    assert!(err(&tmp.path().join("none.safetensors")).contains("none.safetensors"));

    // A model checkpoint is not a head: no metadata.
    let e = err(&fixture_dir("tiny").join("model.safetensors"));
    assert!(e.contains("metadata") && e.contains("hidden_size"), "{e}");

    let mut other = w.clone();
    other.cfg.hidden_state = "vision_tower".into();
    other.save(&path).unwrap();
    assert!(err(&path).contains("hidden state"));

    // The wrong model width is refused when the head meets the model.
    let e = FastRmHead::new(&Cpu, &w, 128).err().unwrap().to_string();
    assert!(e.contains("64") && e.contains("128"), "{e}");
}

#[test]
fn cli_fastrm_method() {
    let tmp = tempfile::tempdir().unwrap();
    let head = tmp.path().join("head.safetensors");
    HeadWeights::random(64, 16, 4).save(&head).unwrap();
    let model = fixture_dir("tiny");
    let image = fixture_image("tiny");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ];
        args.extend_from_slice(&[
            "--prompt",
            "What colour is the cat?",
            "--max-new-tokens",
            "3",
        ]);
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_fastrm"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--method",
        "fastrm",
        "--head",
        head.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["method"], "fastrm");
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3);
    for t in tokens {
        let map = t["map"].as_array().unwrap();
        assert_eq!(map.len(), 25);
        assert!(map
            .iter()
            .all(|x| (0.0..=1.0).contains(&x.as_f64().unwrap())));
    }
    for (extra, needle) in [
        (vec!["--method", "fastrm"], "--head"),
        (
            vec!["--method", "baseline", "--head", head.to_str().unwrap()],
            "--head",
        ),
    ] {
        let out = run(&extra);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle));
    }
    // The answer-level confidence: mean entropy over the tokens, against the head's threshold.
    let hs: Vec<f64> = tokens
        .iter()
        .map(|t| t["entropy"].as_f64().unwrap())
        .collect();
    let mean = hs.iter().sum::<f64>() / hs.len() as f64;
    assert!((v["confidence"]["mean_entropy"].as_f64().unwrap() - mean).abs() < 1e-5);
    assert_eq!(v["confidence"]["verdict"], "uncalibrated");
    for (threshold, verdict) in [(2.0f32, "confident"), (0.0, "uncertain")] {
        let mut w = HeadWeights::random(64, 16, 4);
        w.cfg.confidence_threshold = Some(threshold);
        let calibrated = tmp.path().join(format!("cal{threshold}.safetensors"));
        w.save(&calibrated).unwrap();
        assert_eq!(
            HeadWeights::load(&calibrated)
                .unwrap()
                .cfg
                .confidence_threshold,
            Some(threshold)
        );
        let out = run(&[
            "--method",
            "fastrm",
            "--head",
            calibrated.to_str().unwrap(),
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["confidence"]["verdict"], verdict);
    }
    let wide = tmp.path().join("wide.safetensors");
    HeadWeights::random(128, 16, 4).save(&wide).unwrap();
    let out = run(&["--method", "fastrm", "--head", wide.to_str().unwrap()]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("hidden size 128")
    );
}
