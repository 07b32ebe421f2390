//! `fastrm eval`: the metrics against hand-computed cases, the masked attention op against the
//! plain one and a brute-force reference, masked generation's independence from hidden positions,
//! and the CLI end to end (a hand-made pointing-game set distilled with the tiny model, a random
//! head, every JSON section, the written threshold, bad input).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{cli_fails as fails, cli_ok as ok, fixture_dir};
use fastrm::backend::cpu::Cpu;
use fastrm::backend::{AttnShape, Backend};
use fastrm::eval::metrics::{self, Counts};
use fastrm::explain::fastrm::HeadWeights;
use fastrm::model::llama::Pass;
use fastrm::model::session::{Mode, Session};
use fastrm::util::SplitMix64;
use fastrm::vision::{PreprocessConfig, RgbImage};
use fastrm::{Engine, GenerateOptions};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

// ------------------------------------------------------------------------------ metrics

#[test]
fn classification_counts_and_scores_by_hand() {
    let probs = [0.05, 0.25, 0.55, 0.95];
    let labels = [0.0, 1.0, 0.0, 1.0];
    let at = |t: f32| {
        let mut c = Counts::default();
        metrics::classify_into(&mut c, &probs, &labels, t);
        c
    };
    // t = 0.2: predicted 0 1 1 1 against 0 1 0 1.
    let c = at(0.2);
    assert_eq!((c.tp, c.fp, c.tn, c.fn_), (2, 1, 1, 0));
    assert!(close(c.accuracy(), 0.75));
    assert!(close(c.precision(), 2.0 / 3.0));
    assert!(close(c.recall(), 1.0));
    assert!(close(c.f1(), 0.8));
    // t = 0.6: predicted 0 0 0 1.
    let c = at(0.6);
    assert_eq!((c.tp, c.fp, c.tn, c.fn_), (1, 0, 2, 1));
    assert!(close(c.precision(), 1.0));
    assert!(close(c.recall(), 0.5));
    assert!(close(c.f1(), 2.0 / 3.0));
    // Nothing predicted: precision, recall and F1 are 0, accuracy the negatives' share.
    let c = at(0.96);
    assert_eq!((c.tp, c.fp, c.tn, c.fn_), (0, 0, 2, 2));
    assert_eq!((c.precision(), c.recall(), c.f1()), (0.0, 0.0, 0.0));
    assert!(close(c.accuracy(), 0.5));
    // The boundary counts as positive (p ≥ t).
    let c = at(0.55);
    assert_eq!(c.fp, 1);
    assert_eq!(metrics::THRESHOLDS.len(), 9);
    assert!(close(metrics::THRESHOLDS[0] as f64, 0.1f32 as f64));
}

#[test]
fn trapezoid_auc_and_removal_schedule() {
    assert!(close(
        metrics::trapezoid_auc(&[0.0, 0.5, 1.0], &[1.0, 0.5, 0.0]),
        0.5
    ));
    assert!(close(
        metrics::trapezoid_auc(&[0.0, 0.25, 1.0], &[1.0, 1.0, 0.0]),
        0.625
    ));
    assert!(close(metrics::trapezoid_auc(&[0.0, 1.0], &[1.0, 1.0]), 1.0));
    let s = metrics::removal_schedule(25, 20);
    assert_eq!(s.len(), 21);
    assert_eq!(s[0], (0.0, 0));
    assert_eq!(s[1].1, 1); // 1.25
    assert_eq!(s[2].1, 3); // 2.5 rounds up
    assert_eq!(s[20], (1.0, 25));
    assert!(close(s[4].0, 0.2));
}

#[test]
fn orderings_and_combined_maps() {
    let rel = [0.1, 0.5, 0.5, 0.0];
    assert_eq!(metrics::removal_order(&rel, true), vec![1, 2, 0, 3]);
    assert_eq!(metrics::removal_order(&rel, false), vec![3, 0, 1, 2]);
    // Normalised [1, 0] and an all-zero map (uniform) average to [0.75, 0.25].
    let c = metrics::combine_maps(&[&[2.0, 0.0], &[0.0, 0.0]]);
    assert!(close(c[0], 0.75) && close(c[1], 0.25), "{c:?}");
    // Scale does not matter, negative values are clamped.
    let c = metrics::combine_maps(&[&[10.0, 30.0, -5.0]]);
    assert!(close(c[0], 0.25) && close(c[1], 0.75) && close(c[2], 0.0));
    let mut o = metrics::random_order(25, 3);
    assert_ne!(o, (0..25).collect::<Vec<_>>());
    o.sort();
    assert_eq!(o, (0..25).collect::<Vec<_>>());
    assert!(metrics::answer_correct(
        " Red.",
        Some(&["red".into()]),
        "blue"
    ));
    assert!(!metrics::answer_correct(
        "blue",
        Some(&["red".into()]),
        "blue"
    ));
    assert!(metrics::answer_correct("Blue ", None, "blue"));
    assert!(!metrics::answer_correct("green", None, "blue"));
}

#[test]
fn kde_threshold_and_confidence_counts_by_hand() {
    // Correct answers at 0.2 and 0.4 (mean 0.3), incorrect at 0.6, 0.8, 1.0 (mean 0.8):
    // threshold 0.55, everything correct below it, everything incorrect above.
    let h = [0.2, 0.4, 0.6, 0.8, 1.0];
    let ok = [true, true, false, false, false];
    let cal = metrics::calibrate(&h, &ok);
    assert!(close(cal.mean_correct.unwrap(), 0.3));
    assert!(close(cal.mean_incorrect.unwrap(), 0.8));
    assert!(close(cal.threshold.unwrap(), 0.55));
    let c = cal.counts;
    assert_eq!((c.tp, c.fp, c.fn_, c.tn), (2, 0, 0, 3));
    // Mixed: correct 0.2, 0.7 (mean 0.45); incorrect 0.5, 0.9 (mean 0.7) → 0.575.
    let cal = metrics::calibrate(&[0.2, 0.5, 0.7, 0.9], &[true, false, true, false]);
    assert!(close(cal.threshold.unwrap(), 0.575));
    let c = cal.counts;
    assert_eq!((c.tp, c.fp, c.fn_, c.tn), (1, 1, 1, 1));
    // One side empty: no threshold.
    let cal = metrics::calibrate(&[0.2, 0.5], &[true, true]);
    assert_eq!(cal.threshold, None);
    assert!(cal.incorrect.is_empty());
    assert_eq!(metrics::calibrate(&[0.2], &[false]).threshold, None);
    // Scott's rule: σ (ddof 1) · n^(−1/5); for {0, 1}: √0.5 · 2^(−0.2).
    let bw = metrics::scott_bandwidth(&[0.0, 1.0]);
    assert!((bw - 0.5f64.sqrt() * 2f64.powf(-0.2)).abs() < 1e-12);
    // The KDE: a standard normal for one point and h = 1; integrates to 1.
    assert!(
        (metrics::kde(&[0.0], 1.0, 0.0) - 1.0 / (2.0 * std::f64::consts::PI).sqrt()).abs() < 1e-12
    );
    let xs = [0.3, 0.35, 0.6];
    let h = metrics::scott_bandwidth(&xs);
    let integral: f64 = (-4000..8000)
        .map(|i| metrics::kde(&xs, h, i as f64 * 1e-3) * 1e-3)
        .sum();
    assert!((integral - 1.0).abs() < 1e-6, "{integral}");
}

#[test]
fn pointing_game_by_hand() {
    let on = [false, true, false, true];
    // Peaked on the mask: hit; off it: miss.
    assert_eq!(metrics::pointing(&[0.0, 0.0, 0.0, 5.0], &on).0, 1.0);
    assert_eq!(metrics::pointing(&[0.0, 0.0, 5.0, 1.0], &on).0, 0.0);
    // Mass on the mask: (2 + 4) / 10.
    let (hit, mass) = metrics::pointing(&[1.0, 2.0, 3.0, 4.0], &on);
    assert_eq!(hit, 1.0);
    assert!(close(mass, 0.6));
    // Negative values are clamped before the mass is taken.
    let (_, mass) = metrics::pointing(&[-3.0, 1.0, 1.0, 0.0], &on);
    assert!(close(mass, 0.5));
    // A tie between an on and an off patch: half a hit. No preference at all: the mask's share.
    assert_eq!(metrics::pointing(&[1.0, 1.0, 0.0, 0.0], &on).0, 0.5);
    let (hit, mass) = metrics::pointing(&[0.0; 4], &[true, false, false, false]);
    assert!(close(hit, 0.25) && close(mass, 0.25));
    // The plot's curve: the share of tokens with at least x of their mass on the target.
    assert_eq!(
        metrics::at_least(&[0.2, 0.5, 1.0], &[0.0, 0.2, 0.3, 0.6, 1.0]),
        vec![1.0, 1.0, 2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]
    );
    assert_eq!(metrics::at_least(&[], &[0.0, 1.0]), vec![0.0, 0.0]);
}

#[test]
fn masks_map_through_the_image_geometry() {
    // 60x60 image, CLIP 30: a 2x downscale, 5x5 grid of 6-pixel patches. The top-left 24x24
    // block of the mask is the top-left 2x2 patches after the resize.
    let cfg = PreprocessConfig::clip(30);
    let mut data = vec![0u8; 60 * 60 * 3];
    for y in 0..24 {
        for x in 0..24 {
            data[(y * 60 + x) * 3..(y * 60 + x) * 3 + 3].copy_from_slice(&[7, 7, 7]);
        }
    }
    let mask = RgbImage::new(60, 60, data).unwrap();
    let on = metrics::mask_patches(&mask, (60, 60), &cfg, 5).unwrap();
    let want: Vec<bool> = (0..25).map(|j| [0, 1, 5, 6].contains(&j)).collect();
    assert_eq!(on, want);
    // A landscape image is centre-cropped: 90x60 → 45x30 → columns 7..37 (or 8..38) kept. A
    // mask on the leftmost 30 columns (15 after the resize) covers patch column 0 fully and
    // patch column 1 not at all (its pixels 6..12 sit at resized 13..19 or 14..20, past 15 only
    // partly: under half).
    let mut data = vec![0u8; 90 * 60 * 3];
    for y in 0..60 {
        for x in 0..30 {
            data[(y * 90 + x) * 3] = 255;
        }
    }
    let mask = RgbImage::new(90, 60, data).unwrap();
    let on = metrics::mask_patches(&mask, (90, 60), &cfg, 5).unwrap();
    for r in 0..5 {
        assert!(on[r * 5], "row {r}: {on:?}");
        assert!(!on[r * 5 + 2], "row {r}: {on:?}");
    }
    // A mask that does not match its image is refused.
    let err = metrics::mask_patches(&mask, (60, 60), &cfg, 5).unwrap_err();
    assert!(err.to_string().contains("90x60"), "{err}");
}

// ------------------------------------------------------------------------------ masked attention

fn rand_tensor(rng: &mut SplitMix64, rows: usize, cols: usize) -> (Vec<f32>, usize, usize) {
    (
        (0..rows * cols).map(|_| rng.uniform_sym()).collect(),
        rows,
        cols,
    )
}

fn up(t: &(Vec<f32>, usize, usize)) -> <Cpu as Backend>::Tensor {
    Cpu.upload(&t.0, t.1, t.2).unwrap()
}

/// Attention by the definition, in f64: softmax over the keys that are both causally visible and
/// kept.
fn reference(q: &[f32], k: &[f32], v: &[f32], nq: usize, s: AttnShape, keep: &[bool]) -> Vec<f64> {
    let (h, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
    let mut out = vec![0.0; nq * h * d];
    for i in 0..nq {
        let visible = s.causal_q_pos0.map_or(s.kv_len, |p0| p0 + i + 1);
        for hi in 0..h {
            let g = hi / (h / hk);
            let keys: Vec<usize> = (0..visible).filter(|&j| keep[j]).collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    (0..d)
                        .map(|c| {
                            q[i * h * d + hi * d + c] as f64 * k[j * hk * d + g * d + c] as f64
                        })
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for (w, &j) in e.iter().zip(&keys) {
                for c in 0..d {
                    out[i * h * d + hi * d + c] += w / z * v[j * hk * d + g * d + c] as f64;
                }
            }
        }
    }
    out
}

fn max_err(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn masked_attention_against_plain_attention_and_a_reference() {
    let b = Cpu;
    let mut rng = SplitMix64::new(11);
    // Non-causal (vision-tower shape): keeping everything is the plain op bit for bit; hiding
    // keys 1 and 3 equals the plain op on k and v with those rows deleted.
    let (nq, kv, h, d) = (5, 7, 2, 4);
    let q = rand_tensor(&mut rng, nq, h * d);
    let k = rand_tensor(&mut rng, kv, h * d);
    let v = rand_tensor(&mut rng, kv, h * d);
    let s = AttnShape {
        n_heads: h,
        n_kv_heads: h,
        head_dim: d,
        causal_q_pos0: None,
        kv_len: kv,
    };
    let plain = b
        .download(&b.attention(&up(&q), &up(&k), &up(&v), s).unwrap())
        .unwrap();
    let all = b
        .download(
            &b.attention_masked(&up(&q), &up(&k), &up(&v), s, &[true; 7])
                .unwrap(),
        )
        .unwrap();
    assert_eq!(plain, all);
    let keep = [true, false, true, false, true, true, true];
    let masked = b
        .download(
            &b.attention_masked(&up(&q), &up(&k), &up(&v), s, &keep)
                .unwrap(),
        )
        .unwrap();
    let del = |t: &(Vec<f32>, usize, usize)| {
        let rows: Vec<f32> = (0..kv)
            .filter(|&j| keep[j])
            .flat_map(|j| t.0[j * t.2..(j + 1) * t.2].to_vec())
            .collect();
        (rows, 5, t.2)
    };
    let deleted = b
        .download(
            &b.attention(
                &up(&q),
                &up(&del(&k)),
                &up(&del(&v)),
                AttnShape { kv_len: 5, ..s },
            )
            .unwrap(),
        )
        .unwrap();
    assert!(
        max_err(
            &masked,
            &deleted.iter().map(|&x| x as f64).collect::<Vec<_>>()
        ) < 1e-6
    );
    assert!(
        max_err(
            &masked,
            &plain.iter().map(|&x| x as f64).collect::<Vec<_>>()
        ) > 1e-3
    );

    // Causal grouped-query decode block over a longer cache (rows past kv_len ignored, mask longer
    // than kv_len), against the f64 reference; a query whose only visible key is hidden gets 0.
    let (nq, cap, h, hk, d) = (3, 12, 4, 2, 8);
    let s = AttnShape {
        n_heads: h,
        n_kv_heads: hk,
        head_dim: d,
        causal_q_pos0: Some(6),
        kv_len: 9,
    };
    let q = rand_tensor(&mut rng, nq, h * d);
    let k = rand_tensor(&mut rng, cap, hk * d);
    let v = rand_tensor(&mut rng, cap, hk * d);
    let plain = b
        .download(&b.attention(&up(&q), &up(&k), &up(&v), s).unwrap())
        .unwrap();
    let all = b
        .download(
            &b.attention_masked(&up(&q), &up(&k), &up(&v), s, &[true; 12])
                .unwrap(),
        )
        .unwrap();
    assert_eq!(plain, all);
    let mut keep = [true; 12];
    keep[0] = false;
    keep[2] = false;
    keep[7] = false; // the second query's own position: visible to the third only
    let masked = b
        .download(
            &b.attention_masked(&up(&q), &up(&k), &up(&v), s, &keep)
                .unwrap(),
        )
        .unwrap();
    let want = reference(&q.0, &k.0, &v.0, nq, s, &keep);
    assert!(
        max_err(&masked, &want) < 1e-5,
        "{}",
        max_err(&masked, &want)
    );
    let s1 = AttnShape {
        causal_q_pos0: Some(0),
        kv_len: 1,
        ..s
    };
    let q1 = rand_tensor(&mut rng, 1, h * d);
    let none = b
        .download(
            &b.attention_masked(&up(&q1), &up(&k), &up(&v), s1, &[false])
                .unwrap(),
        )
        .unwrap();
    assert!(none.iter().all(|&x| x == 0.0), "{none:?}");
    // Too short a mask is an error, not a panic.
    let Err(err) = b.attention_masked(&up(&q), &up(&k), &up(&v), s, &[true; 8]) else {
        panic!("a short mask must be refused");
    };
    assert!(err.to_string().contains("key_keep"), "{err}");
}

#[test]
fn hidden_positions_cannot_influence_the_rest() {
    // Decoder level: with position j hidden, changing row j's input changes no other row's output
    // (bit for bit); without the mask it does. Masking nothing is the plain forward exactly.
    let engine = Engine::load(Cpu, &fixture_dir("tiny")).unwrap();
    let (b, m) = (engine.backend(), engine.model());
    let dm = m.cfg.text.hidden_size;
    let n = 9;
    let mut rng = SplitMix64::new(5);
    let x1: Vec<f32> = (0..n * dm).map(|_| rng.uniform_sym()).collect();
    let mut x2 = x1.clone();
    for v in &mut x2[3 * dm..4 * dm] {
        *v = rng.uniform_sym() * 3.0;
    }
    let run = |x: &[f32], keep: Option<&[bool]>| -> Vec<f32> {
        let mut cache = m.kv.admit(b, n).unwrap();
        let t = b.upload(x, n, dm).unwrap();
        let h = match keep {
            None => m.llm.forward(b, t, &mut cache).unwrap(),
            Some(k) => m.llm.run(b, t, &mut cache, Pass::Masked(k), None).unwrap(),
        };
        b.download(&h).unwrap()
    };
    assert_eq!(run(&x1, None), run(&x1, Some(&[true; 9])));
    let mut keep = [true; 9];
    keep[3] = false;
    let (a, c) = (run(&x1, Some(&keep)), run(&x2, Some(&keep)));
    for r in (0..n).filter(|&r| r != 3) {
        assert_eq!(a[r * dm..(r + 1) * dm], c[r * dm..(r + 1) * dm], "row {r}");
    }
    let (a, c) = (run(&x1, None), run(&x2, None));
    assert_ne!(a[8 * dm..], c[8 * dm..]);

    // Generation level: every image position hidden, the answer and every step's logits no
    // longer depend on the image.
    let prompt = engine.prompt("What is it?").unwrap();
    let ids = prompt.ids().to_vec();
    let img_id = m.cfg.image_token_id;
    let keep: Vec<bool> = ids.iter().map(|&i| i != img_id).collect();
    let opts = GenerateOptions {
        max_new_tokens: 4,
        stop_at_eos: false,
        keep_steps: true,
        ..Default::default()
    };
    let pix = |seed: u64| -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..3 * 30 * 30).map(|_| r.uniform_sym() * 2.0).collect()
    };
    let session = |f: &_, mode: Mode| Session::prefill(b, m, prompt.clone(), f, &opts, mode);
    let gen = |seed: u64, keep: Option<&[bool]>| {
        let (_, f) = m.encode_image(b, &pix(seed)).unwrap();
        let mode = keep.map_or(Mode::Plain, |k| Mode::Masked(k.to_vec()));
        let mut s = session(&f, mode).unwrap();
        s.run_to_end().unwrap();
        s.finish()
    };
    let (g1, g2) = (gen(1, Some(&keep)), gen(2, Some(&keep)));
    assert_eq!(g1.generated_ids, g2.generated_ids);
    assert_eq!(g1.step_logits, g2.step_logits);
    let (u1, u2) = (gen(1, None), gen(2, None));
    assert_ne!(u1.step_logits, u2.step_logits);
    // No mask through the session = the model's plain generation.
    let plain = m.generate(b, prompt.clone(), &pix(1), &opts).unwrap();
    assert_eq!(plain.step_logits, u1.step_logits);
    assert_eq!(
        gen(1, Some(&vec![true; ids.len()])).step_logits,
        u1.step_logits
    );
    // A mask of the wrong length is refused.
    let (_, f) = m.encode_image(b, &pix(1)).unwrap();
    assert!(session(&f, Mode::Masked(vec![true; 3])).is_err());
}

// ------------------------------------------------------------------------------ CLI

fn fastrm(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    o
}

fn write_grey_png(path: &Path, w: usize, h: usize, on: impl Fn(usize, usize) -> bool) {
    let data: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| if on(x, y) { 255 } else { 0 })
        .collect();
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w as u32, h as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(&data).unwrap();
}

#[test]
fn cli_end_to_end_with_a_pointing_set() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let model = fixture_dir("tiny");
    let m = model.to_str().unwrap();
    let suffix = fastrm::distill::SUFFIX;
    // The hand-made set: the distill fixture's 45x37 image, a mask on its left half.
    std::fs::create_dir_all(root.join("set/scenes")).unwrap();
    std::fs::create_dir_all(root.join("set/masks")).unwrap();
    let img = root.join("set/scenes/00001.png");
    std::fs::copy(fixture_dir("distill").join("images/tiny.png"), &img).unwrap();
    write_grey_png(&root.join("set/masks/00001.png"), 45, 37, |x, _| x < 22);
    // Ground truth: the model's own answer to question 1 (correct), a wrong one for question 2.
    let q1 = "What colour is the ball?";
    let q2 = "How many balls are there?";
    let answer = |q: &str| -> String {
        let o = fastrm(&[
            "generate",
            "--model",
            m,
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            &format!("{q}{suffix}"),
            "--max-new-tokens",
            "2",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let a1 = answer(q1);
    let lines = [
        serde_json::json!({"image": "scenes/00001.png", "question": q1, "answers": [a1],
            "type": "color", "target_mask": "masks/00001.png", "n_objects": 3}),
        serde_json::json!({"image": "scenes/00001.png", "question": q2,
            "answers": ["no such answer"], "type": "count", "target_mask": null, "n_objects": 1}),
    ];
    let qfile = root.join("set/questions.jsonl");
    std::fs::write(
        &qfile,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let data = root.join("data");
    ok(&fastrm(&[
        "distill",
        "--model",
        m,
        "--questions",
        qfile.to_str().unwrap(),
        "--images",
        root.join("set").to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--max-new-tokens",
        "2",
    ]));
    // The extra JSONL keys travel into the shard records.
    let man = fastrm::distill::Manifest::read(&data).unwrap();
    let shard = fastrm::distill::Shard::read(&data.join(&man.shards[0].file)).unwrap();
    assert_eq!(shard.samples[0].qtype.as_deref(), Some("color"));
    assert_eq!(shard.samples[0].n_objects, Some(3));
    assert_eq!(
        shard.samples[0].target_mask.as_deref(),
        Some("masks/00001.png")
    );
    assert_eq!(shard.samples[1].target_mask, None);

    let head = root.join("head.safetensors");
    HeadWeights::random(64, 16, 3).save(&head).unwrap();
    let out = root.join("eval");
    let o = fastrm(&[
        "eval",
        "--model",
        m,
        "--head",
        head.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
        "--write-threshold",
    ]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(file["classification"], v["classification"]);
    for png in [
        "classification.png",
        "entropy_kde.png",
        "perturbation_positive.png",
        "perturbation_negative.png",
        "pointing.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
    assert_eq!(v["samples"], 2);

    // Classification: 9 thresholds, counts covering every token × patch.
    let rows = v["classification"].as_array().unwrap();
    assert_eq!(rows.len(), 9);
    let tokens = v["tokens"].as_u64().unwrap();
    for r in rows {
        let total: u64 = ["tp", "fp", "tn", "fn"]
            .iter()
            .map(|k| r[k].as_u64().unwrap())
            .sum();
        assert_eq!(total, tokens * 25);
        let f1 = r["f1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&f1));
        // The interval over the two questions holds values a resample can take.
        let [lo, hi] = [0, 1].map(|i| r["f1_ci95"][i].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&lo) && lo <= hi && hi <= 1.0, "{r}");
    }
    // Per question type: one question each, so every resample is that question and the
    // interval is the value itself; the best row is the largest F1.
    let by_type = v["classification_by_type"].as_object().unwrap();
    assert_eq!(by_type.keys().collect::<Vec<_>>(), ["color", "count"]);
    for (t, c) in by_type {
        assert_eq!(c["samples"], 1, "{t}");
        let rows = c["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 9);
        for r in rows {
            let f1 = r["f1"].as_f64().unwrap();
            assert_eq!(r["f1_ci95"], serde_json::json!([f1, f1]), "{t}: {r}");
        }
        let best = rows
            .iter()
            .map(|r| r["f1"].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert_eq!(c["best"]["f1"].as_f64().unwrap(), best, "{t}");
    }

    // Perturbation: 21 steps per curve, the unperturbed point shared, AUC = the curve's
    // trapezoid, everything removed shared too.
    let p = &v["perturbation"];
    let fr: Vec<f64> = p["fractions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(fr.len(), 21);
    let methods = p["methods"].as_object().unwrap();
    assert_eq!(methods.len(), 4);
    for name in ["fastrm", "baseline", "gradcam", "random"] {
        for dir in ["positive", "negative"] {
            let c = &methods[name][dir];
            let acc: Vec<f64> = c["accuracy"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(acc.len(), 21);
            assert_eq!(acc[0], 0.5, "{name} {dir}: one of the two answers is right");
            assert_eq!(
                acc[20],
                methods["fastrm"]["positive"]["accuracy"][20]
                    .as_f64()
                    .unwrap()
            );
            let auc = c["auc"].as_f64().unwrap();
            assert!((auc - metrics::trapezoid_auc(&fr, &acc)).abs() < 1e-12);
        }
    }

    // Confidence: one correct and one incorrect answer, threshold the mean of their entropies,
    // written into the head.
    let c = &v["confidence"];
    let per = v["per_sample"].as_array().unwrap();
    assert_eq!(per[0]["correct"], true);
    assert_eq!(per[1]["correct"], false);
    let e: Vec<f64> = per
        .iter()
        .map(|s| s["mean_entropy"].as_f64().unwrap())
        .collect();
    let t = c["threshold"].as_f64().unwrap();
    assert!((t - (e[0] + e[1]) / 2.0).abs() < 1e-6);
    assert_eq!(c["bandwidth_rule"], "scott");
    let n: u64 = [
        &c["below"]["tp"],
        &c["below"]["fp"],
        &c["above"]["fn"],
        &c["above"]["tn"],
    ]
    .iter()
    .map(|x| x.as_u64().unwrap())
    .sum();
    assert_eq!(n, 2);
    assert_eq!(c["written_to_head"], true);
    let w = HeadWeights::load(&head).unwrap();
    assert!((w.cfg.confidence_threshold.unwrap() as f64 - t).abs() < 1e-6);

    // Pointing: one sample has a target; every method scored; random = the mask's patch share.
    let pt = &v["pointing"];
    assert_eq!(pt["samples"], 1);
    let pm = pt["methods"].as_object().unwrap();
    assert_eq!(pm.len(), 5);
    let engine = Engine::load(Cpu, &model).unwrap();
    let mask = fastrm::vision::load_image(&root.join("set/masks/00001.png")).unwrap();
    let on = metrics::mask_patches(&mask, (45, 37), engine.preprocess(), 5).unwrap();
    let share = on.iter().filter(|&&x| x).count() as f64 / 25.0;
    assert!(share > 0.0 && share < 1.0);
    for (name, r) in pm {
        let hit = r["hit_rate"].as_f64().unwrap();
        let mass = r["mask_mass"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&hit) && (0.0..=1.0).contains(&mass),
            "{name}"
        );
        assert!(r["tokens"].as_u64().unwrap() >= 1);
    }
    assert!((pm["random"]["hit_rate"].as_f64().unwrap() - share).abs() < 1e-9);
    assert!((pm["random"]["mask_mass"].as_f64().unwrap() - share).abs() < 1e-9);
    // One scored question: its intervals are its values, and its type's table is the whole's.
    for (name, r) in pm {
        for k in ["hit_rate", "mask_mass"] {
            let x = r[k].as_f64().unwrap();
            assert_eq!(
                r[format!("{k}_ci95")],
                serde_json::json!([x, x]),
                "{name} {k}"
            );
        }
        assert_eq!(r["samples"], 1, "{name}");
    }
    let types = pt["by_type"].as_object().unwrap();
    assert_eq!(types.keys().collect::<Vec<_>>(), ["color"]);
    assert_eq!(types["color"], pt["methods"]);

    // Accuracy per type and on multi-object scenes.
    let a = &v["accuracy"];
    assert_eq!(a["overall"]["accuracy"], 0.5);
    assert_eq!(a["by_type"]["color"]["accuracy"], 1.0);
    assert_eq!(a["by_type"]["count"]["accuracy"], 0.0);
    assert_eq!(a["multi_object"]["samples"], 1);
    assert_eq!(a["multi_object"]["accuracy"], 1.0);

    // Only the first (correct) answer: no threshold, said so, and the head is left as it was.
    let before = std::fs::read(&head).unwrap();
    let o = fastrm(&[
        "eval",
        "--model",
        m,
        "--head",
        head.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        "--limit",
        "1",
        "--no-perturbation",
        "--write-threshold",
    ]);
    let v1: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v1["samples"], 1);
    assert!(v1["perturbation"].is_null());
    assert!(v1["confidence"]["threshold"].is_null());
    assert!(v1["confidence"]["note"]
        .as_str()
        .unwrap()
        .contains("every answer is correct"));
    assert_eq!(v1["confidence"]["written_to_head"], false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("left unchanged"));
    assert_eq!(std::fs::read(&head).unwrap(), before);

    // The table form runs too (no perturbation, quick).
    let table = ok(&fastrm(&[
        "eval",
        "--model",
        m,
        "--head",
        head.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--no-perturbation",
    ]));
    assert!(
        table.contains("threshold") && table.contains("Pointing"),
        "{table}"
    );

    // Bad input: a missing head, a head of the wrong size, a missing data folder, a folder that
    // is not a data set.
    let h = head.to_str().unwrap();
    let d = data.to_str().unwrap();
    let missing = root.join("nope.safetensors");
    fails(
        &fastrm(&[
            "eval",
            "--model",
            m,
            "--head",
            missing.to_str().unwrap(),
            "--data",
            d,
        ]),
        &["nope.safetensors"],
    );
    let small = root.join("small.safetensors");
    HeadWeights::random(32, 8, 1).save(&small).unwrap();
    fails(
        &fastrm(&[
            "eval",
            "--model",
            m,
            "--head",
            small.to_str().unwrap(),
            "--data",
            d,
        ]),
        &["hidden size 32", "64"],
    );
    fails(
        &fastrm(&[
            "eval",
            "--model",
            m,
            "--head",
            h,
            "--data",
            root.join("none").to_str().unwrap(),
        ]),
        &["--data", "no such folder"],
    );
    fails(
        &fastrm(&[
            "eval",
            "--model",
            m,
            "--head",
            h,
            "--data",
            root.join("set").to_str().unwrap(),
        ]),
        &["manifest.json"],
    );
    fails(
        &fastrm(&[
            "eval", "--model", m, "--head", h, "--data", d, "--limit", "0",
        ]),
        &["--limit"],
    );
}

#[test]
fn jsonl_reader_carries_and_checks_the_pointing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.jsonl");
    std::fs::write(
        &q,
        concat!(
            r#"{"image": "a.png", "question": "Q?", "answers": ["red"], "type": "color", "target_mask": "masks/a.png", "n_objects": 3}"#,
            "\n",
            r#"{"image": "a.png", "question": "Q?", "target_mask": null, "type": null}"#,
            "\n"
        ),
    )
    .unwrap();
    let d = fastrm::distill::Dataset::load(&q).unwrap();
    let e = &d.entries;
    assert_eq!(e[0].qtype.as_deref(), Some("color"));
    assert_eq!(e[0].n_objects, Some(3));
    assert_eq!(e[0].target_mask.as_deref(), Some("masks/a.png"));
    assert_eq!(
        (e[1].qtype.clone(), e[1].n_objects, e[1].target_mask.clone()),
        (None, None, None)
    );
    for (bad, key) in [
        (
            r#"{"image": "a.png", "question": "Q?", "n_objects": "three"}"#,
            "n_objects",
        ),
        (
            r#"{"image": "a.png", "question": "Q?", "target_mask": 5}"#,
            "target_mask",
        ),
        (
            r#"{"image": "a.png", "question": "Q?", "type": ["a"]}"#,
            "type",
        ),
    ] {
        std::fs::write(&q, bad).unwrap();
        let err = fastrm::distill::Dataset::load(&q).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("line 1"), "{err}");
    }
}

/// `eval --device sim`: the head's maps and the reference generation (a saving session) run
/// through the CUDA backend's code (f16 storage, on the host simulator), and the figures are the
/// CPU's: the same answers, classification scores within 0.01 (f16 moves probabilities by ~1e-3,
/// which flips a patch only next to a threshold; here none flips), mean entropies within 1e-4 (f16
/// gives 1e-6). The perturbation
/// curves are left out: ~300 masked generations a sample take minutes on the simulator.
#[cfg(feature = "sim")]
#[test]
fn cli_eval_on_the_simulator_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let model = fixture_dir("tiny");
    let m = model.to_str().unwrap();
    let data = root.join("data");
    ok(&fastrm(&[
        "distill",
        "--model",
        m,
        "--questions",
        fixture_dir("distill")
            .join("vqa_questions.json")
            .to_str()
            .unwrap(),
        "--images",
        fixture_dir("distill").join("images").to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
    ]));
    let head = root.join("head.safetensors");
    HeadWeights::random(64, 16, 3).save(&head).unwrap();
    let run = |device: &str| -> serde_json::Value {
        let o = fastrm(&[
            "eval",
            "--model",
            m,
            "--head",
            head.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
            "--no-perturbation",
            "--device",
            device,
        ]);
        serde_json::from_str(&ok(&o)).unwrap()
    };
    let (sim, cpu) = (run("sim"), run("cpu"));
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    assert_eq!(sim["samples"], cpu["samples"]);
    assert_eq!(sim["tokens"], cpu["tokens"]);
    assert_eq!(sim["generations"], cpu["generations"]);
    let mut worst = [0f64; 2];
    for (a, b) in sim["classification"]
        .as_array()
        .unwrap()
        .iter()
        .zip(cpu["classification"].as_array().unwrap())
    {
        for k in ["accuracy", "precision", "recall", "f1"] {
            let d = (f(&a[k]) - f(&b[k])).abs();
            worst[0] = worst[0].max(d);
            assert!(
                d <= 0.01,
                "classification {k} at {}: {a} vs {b}",
                a["threshold"]
            );
        }
    }
    for (a, b) in sim["per_sample"]
        .as_array()
        .unwrap()
        .iter()
        .zip(cpu["per_sample"].as_array().unwrap())
    {
        assert_eq!(a["answer"], b["answer"]);
        let d = (f(&a["mean_entropy"]) - f(&b["mean_entropy"])).abs();
        worst[1] = worst[1].max(d);
        assert!(d <= 1e-4, "mean entropy {a} vs {b}");
    }
    assert!(sim["perturbation"].is_null());
    eprintln!(
        "sim vs cpu: classification {:.2e}, mean entropy {:.2e}",
        worst[0], worst[1]
    );
}
