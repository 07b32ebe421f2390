//! `fastrm train`: the training loss's gradient against f64 finite differences, BCE / labels / Adam
//! against hand-computed cases, training on a planted rule, the trained head through the folded
//! inference form, determinism, and the CLI end to end (outputs and bad input).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use fastrm::backend::cpu::Cpu;
use fastrm::backend::Backend;
use fastrm::distill::{
    InputInfo, Manifest, SampleRecord, ShardInfo, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use fastrm::explain::fastrm::{FastRmHead, HeadWeights};
use fastrm::train::{
    bce_with_logits, head_pass, labels, probabilities, train, Adam, Batch, BatchToken, Dataset,
    Grads, TrainOptions,
};
use fastrm::util::SplitMix64;

// ---------------------------------------------------------------- f64 reference of the loss

fn ln_f64(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    (0..x.len())
        .map(|i| (x[i] - mean) * r * w[i] + b[i])
        .collect()
}

fn proj_f64(u: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let dm = u.len();
    (0..b.len())
        .map(|o| b[o] + (0..dm).map(|i| w[o * dm + i] * u[i]).sum::<f64>())
        .collect()
}

/// Parameters as f64 vectors in the order ln_w, ln_b, wq, bq, wk, bk.
fn params(w: &HeadWeights) -> Vec<Vec<f64>> {
    [&w.ln_w, &w.ln_b, &w.wq, &w.bq, &w.wk, &w.bk]
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect()
}

fn loss_f64(p: &[Vec<f64>], batch: &Batch, d: usize, eps: f64) -> f64 {
    let np = batch.n_patches;
    let dm = batch.hidden_size;
    let scale = 1.0 / (d as f64).sqrt();
    let mut sum = 0.0;
    for t in &batch.tokens {
        let h: Vec<f64> = t.hidden.iter().map(|&v| v as f64).collect();
        let q = proj_f64(&ln_f64(&h, &p[0], &p[1], eps), &p[2], &p[3]);
        for j in 0..np {
            let hj: Vec<f64> = batch.images[t.image][j * dm..(j + 1) * dm]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let k = proj_f64(&ln_f64(&hj, &p[0], &p[1], eps), &p[4], &p[5]);
            let z = scale * q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>();
            let y = t.labels[j] as f64;
            // The textbook form, −y ln σ − (1−y) ln(1−σ), independent of the stable one.
            let s = 1.0 / (1.0 + (-z).exp());
            sum -= y * s.ln() + (1.0 - y) * (1.0 - s).ln();
        }
    }
    sum / (batch.tokens.len() * np) as f64
}

fn rand_vec(rng: &mut SplitMix64, n: usize, scale: f32, base: f32) -> Vec<f32> {
    (0..n).map(|_| base + scale * rng.uniform_sym()).collect()
}

fn tiny_batch(seed: u64) -> Batch {
    let (dm, p) = (8, 5);
    let mut rng = SplitMix64::new(seed);
    let images = (0..2)
        .map(|_| rand_vec(&mut rng, p * dm, 1.5, 0.2))
        .collect();
    let maps = [
        vec![0.9, 0.1, 0.5, 0.0, 0.2],
        vec![0.0, 0.0, 0.0, 0.0, 0.0],
        vec![0.3, 1.0, 0.29, 0.31, 0.7],
    ];
    let tokens = [0usize, 1, 0]
        .iter()
        .zip(&maps)
        .map(|(&image, m)| BatchToken {
            image,
            hidden: rand_vec(&mut rng, dm, 1.5, -0.1),
            labels: labels(m, 0.3),
        })
        .collect();
    Batch {
        hidden_size: dm,
        n_patches: p,
        images,
        tokens,
    }
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let batch = tiny_batch(5);
    let mut w = HeadWeights::random(8, 4, 17);
    // Larger projections than the initialisation so the logits are O(1) and every term matters.
    for v in w.wq.iter_mut().chain(w.wk.iter_mut()) {
        *v *= 2.5;
    }
    let eps = w.cfg.layer_norm_eps as f64;
    let pass = head_pass(&Cpu, &w, &batch, true).unwrap();
    let p0 = params(&w);
    let want_loss = loss_f64(&p0, &batch, 4, eps);
    assert!(
        (pass.loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
        "loss {} vs f64 {want_loss}",
        pass.loss
    );
    let g: Grads = pass.grads.unwrap();
    let got = [&g.ln_w, &g.ln_b, &g.wq, &g.bq, &g.wk, &g.bk];
    let names = [
        "ln.weight",
        "ln.bias",
        "q.weight",
        "q.bias",
        "k.weight",
        "k.bias",
    ];
    let h = 1e-6;
    let mut max_grad = 0.0f64;
    for (pi, name) in names.iter().enumerate() {
        let mut p = p0.clone();
        let fd: Vec<f64> = (0..p0[pi].len())
            .map(|i| {
                p[pi][i] = p0[pi][i] + h;
                let lp = loss_f64(&p, &batch, 4, eps);
                p[pi][i] = p0[pi][i] - h;
                let lm = loss_f64(&p, &batch, 4, eps);
                p[pi][i] = p0[pi][i];
                (lp - lm) / (2.0 * h)
            })
            .collect();
        assert_eq!(got[pi].len(), fd.len(), "{name}: length");
        let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-9);
        max_grad = max_grad.max(scale);
        for (i, (&a, &b)) in got[pi].iter().zip(&fd).enumerate() {
            let e = (a as f64 - b).abs() / scale;
            assert!(
                e < 1e-3,
                "{name}[{i}]: analytic {a}, finite differences {b} (rel {e:e})"
            );
        }
    }
    assert!(max_grad > 1e-3, "gradients too small to test anything");
}

#[test]
fn bce_labels_and_adam_by_hand() {
    // BCE: −ln σ(2) for y = 1, −ln(1 − σ(2)) for y = 0, and ln 2 at z = 0, stable at huge |z|.
    let s2 = 1.0 / (1.0 + (-2.0f64).exp());
    assert!((bce_with_logits(2.0, 1.0) + s2.ln()).abs() < 1e-12);
    assert!((bce_with_logits(2.0, 0.0) + (1.0 - s2).ln()).abs() < 1e-12);
    assert!((bce_with_logits(0.0, 1.0) - 2f64.ln()).abs() < 1e-12);
    assert!((bce_with_logits(-1000.0, 1.0) - 1000.0).abs() < 1e-9);
    assert!(bce_with_logits(1000.0, 1.0).abs() < 1e-12);
    // Labels: ≥ threshold · max (ties count), all-zero maps have none.
    assert_eq!(
        labels(&[0.9, 0.27, 0.26, 0.0], 0.3),
        vec![1.0, 1.0, 0.0, 0.0]
    );
    assert_eq!(labels(&[0.0, 0.0], 0.3), vec![0.0, 0.0]);
    assert_eq!(labels(&[0.2, 0.1], 0.0), vec![1.0, 1.0]);
    // Adam, two steps on one parameter by hand: g1 = 0.5, g2 = −1, lr 0.1.
    let mut w = HeadWeights::random(1, 1, 0);
    w.ln_w = vec![1.0];
    let zero = |w: &HeadWeights| Grads {
        ln_w: vec![0.0; w.ln_w.len()],
        ln_b: vec![0.0; w.ln_b.len()],
        wq: vec![0.0; w.wq.len()],
        bq: vec![0.0; w.bq.len()],
        wk: vec![0.0; w.wk.len()],
        bk: vec![0.0; w.bk.len()],
    };
    let mut adam = Adam::new(0.1);
    let mut g = zero(&w);
    g.ln_w[0] = 0.5;
    adam.step(&mut w, &g).unwrap();
    // t=1: m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25 → step 0.1 · 0.5 / (0.5 + 1e-8)
    let w1 = 1.0 - 0.1 * 0.5 / (0.5 + 1e-8);
    assert!((w.ln_w[0] as f64 - w1).abs() < 1e-6, "{}", w.ln_w[0]);
    g.ln_w[0] = -1.0;
    adam.step(&mut w, &g).unwrap();
    let m2 = 0.9 * 0.05 - 0.1;
    let v2 = 0.999 * 0.00025 + 0.001 * 1.0;
    let mh = m2 / (1.0 - 0.81);
    let vh = v2 / (1.0 - 0.999f64 * 0.999);
    let w2 = w1 - 0.1 * mh / (vh.sqrt() + 1e-8);
    assert!(
        (w.ln_w[0] as f64 - w2).abs() < 1e-6,
        "{} vs {w2}",
        w.ln_w[0]
    );
    // A zero gradient leaves a parameter whose moments are zero where it was.
    assert_eq!(w.ln_b, HeadWeights::random(1, 1, 0).ln_b);
}

// ---------------------------------------------------------------- synthetic data sets

struct Shard {
    image_hidden: Vec<f32>,
    token_hidden: Vec<f32>,
    maps: Vec<f32>,
    token_sample: Vec<i64>,
    samples: usize,
}

/// Writes `s` through the crate's shard writer, with the records the format requires: sample
/// `first + i` answers with the ids of its token rows.
fn write_shard(path: &Path, first: usize, s: &Shard, dm: usize, p: usize) {
    let m = s.token_sample.len();
    let ids: Vec<i64> = (0..m as i64).map(|i| 100 + i).collect();
    let mut answers: Vec<Vec<u32>> = vec![vec![]; s.samples];
    let mut index = Vec::with_capacity(m);
    for (&ts, &id) in s.token_sample.iter().zip(&ids) {
        match answers.get_mut(ts as usize) {
            Some(a) => {
                index.push(a.len() as i64);
                a.push(id as u32);
            }
            // A row of no sample (a corrupt set): refused on reading.
            None => index.push(0),
        }
    }
    let samples = answers
        .into_iter()
        .enumerate()
        .map(|(i, generated_ids)| SampleRecord {
            sample: first + i,
            question_id: (first + i) as u64,
            question: "what?".into(),
            image: format!("img{i}.png"),
            answer: String::new(),
            answers: None,
            generated_ids,
            stop_reason: "eos".into(),
            qtype: None,
            n_objects: None,
            target_mask: None,
        })
        .collect();
    fastrm::distill::Shard {
        first_sample: first,
        n_patches: p,
        hidden_size: dm,
        samples,
        image_hidden: s.image_hidden.clone(),
        token_hidden: s.token_hidden.clone(),
        maps: s.maps.clone(),
        token_ids: ids,
        token_sample: s.token_sample.clone(),
        token_index: index,
    }
    .write(path)
    .unwrap();
}

/// A manifest listing `shards` (file, samples, tokens) in order.
fn write_manifest(dir: &Path, dm: usize, p: usize, shards: &[(String, usize, usize)]) {
    let mut first = 0;
    let shards = shards
        .iter()
        .map(|(file, samples, tokens)| {
            first += samples;
            ShardInfo {
                file: file.clone(),
                first_sample: first - samples,
                samples: *samples,
                tokens: *tokens,
            }
        })
        .collect();
    let mut m = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        model: "synthetic".into(),
        model_weights: String::new(),
        method: "baseline".into(),
        suffix: String::new(),
        max_new_tokens: 3,
        stop_at_eos: true,
        hidden_size: dm,
        n_patches: p,
        grid: [3, 3],
        label_threshold: 0.3,
        input: InputInfo {
            path: "synthetic".into(),
            format: "jsonl".into(),
            fingerprint: String::new(),
            entries: first,
        },
        images: "synthetic".into(),
        shard_size: 25,
        shard: None,
        shards,
        samples: 0,
        tokens: 0,
    };
    m.count();
    m.write(dir).unwrap();
}

/// A planted rule: each sample has a class c (of `classes`); a few of its patches carry a large
/// component along direction e_c, the rest are noise; each token carries e_c too and its baseline
/// map is high on exactly those patches. The head must learn that q·k is large when token and patch
/// share a direction.
fn planted(dir: &Path, seed: u64, n_samples: usize, per_shard: usize) {
    let (dm, p, classes) = (16, 9, 4);
    let mut rng = SplitMix64::new(seed);
    let mut shards = vec![];
    let mut s0 = 0;
    let mut shard_no = 0;
    while s0 < n_samples {
        let ns = per_shard.min(n_samples - s0);
        let mut sh = Shard {
            image_hidden: vec![],
            token_hidden: vec![],
            maps: vec![],
            token_sample: vec![],
            samples: ns,
        };
        for si in 0..ns {
            let c = (rng.next_u64() % classes as u64) as usize;
            let mut hot = vec![false; p];
            for _ in 0..3 {
                hot[(rng.next_u64() % p as u64) as usize] = true;
            }
            for &is_hot in &hot {
                let mut v = rand_vec(&mut rng, dm, 1.0, 0.0);
                if is_hot {
                    v[c] += 4.0;
                } else {
                    // Another class's direction, so the key alone does not give the label.
                    let o = (c + 1 + (rng.next_u64() % (classes as u64 - 1)) as usize) % classes;
                    if rng.next_u64().is_multiple_of(2) {
                        v[o] += 4.0;
                    }
                }
                sh.image_hidden.extend(v);
            }
            for _ in 0..3 {
                let mut h = rand_vec(&mut rng, dm, 1.0, 0.0);
                h[c] += 4.0;
                sh.token_hidden.extend(h);
                for &is_hot in &hot {
                    let r = if is_hot {
                        0.8 + 0.2 * rng.uniform_sym().abs()
                    } else {
                        0.2 * rng.uniform_sym().abs()
                    };
                    sh.maps.push(r);
                }
                sh.token_sample.push(si as i64);
            }
        }
        let name = format!("shard-{shard_no:05}.safetensors");
        write_shard(&dir.join(&name), s0, &sh, dm, p);
        shards.push((name, ns, sh.token_sample.len()));
        s0 += ns;
        shard_no += 1;
    }
    write_manifest(dir, dm, p, &shards);
}

fn opts(steps: usize, seed: u64) -> TrainOptions {
    TrainOptions {
        steps,
        batch: 32,
        lr: 1e-2,
        seed,
        val_fraction: 0.2,
        eval_every: Some(20),
        ..Default::default()
    }
}

#[test]
fn training_learns_a_planted_rule_and_the_folded_head_agrees() {
    let dir = tempfile::tempdir().unwrap();
    planted(dir.path(), 3, 60, 25);
    let data = Dataset::open(dir.path()).unwrap();
    assert_eq!((data.samples.len(), data.tokens.len()), (60, 180));
    let report = train(&Cpu, &data, &opts(300, 1), &mut |_, _, _| {}).unwrap();
    let init = report.initial_val_loss().unwrap();
    let fin = report.final_val_loss().unwrap();
    let mean = report.label_mean_val_loss.unwrap();
    eprintln!(
        "planted rule: val loss {init:.4} → {fin:.4}; label-mean predictor {mean:.4}; \
         train loss {:.4} → {:.4}",
        report.curve[0].train_loss,
        report.final_train_loss()
    );
    assert_eq!(report.val_samples, 12);
    assert_eq!(report.train_tokens + report.val_tokens, 180);
    assert!(fin < 0.2 * init, "val loss {init} → {fin}");
    assert!(fin < 0.2 * mean, "val loss {fin} vs label mean {mean}");
    assert!(report.head.cfg.provenance.contains("steps 300"));
    assert_eq!(report.head.cfg.label_threshold, 0.3);

    // On a fresh data set drawn from the same rule, F1 at classification threshold 0.5 beats the
    // trivial predictors: all-relevant (F1 = 2π/(1+π), π the positive rate) and none-relevant (0).
    let test_dir = tempfile::tempdir().unwrap();
    planted(test_dir.path(), 99, 20, 20);
    let test = Dataset::open(test_dir.path()).unwrap();
    let ids: Vec<usize> = (0..test.tokens.len()).collect();
    let batch = fastrm::train::make_batch(&test, &ids, 0.3).unwrap();
    let probs = probabilities(&Cpu, &report.head, &batch).unwrap();
    let (mut tp, mut fp, mut fneg, mut pos, mut all) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (t, pr) in batch.tokens.iter().zip(&probs) {
        for (&y, &p) in t.labels.iter().zip(pr) {
            let (y, hit) = (y > 0.5, p >= 0.5);
            tp += (y && hit) as u8 as f64;
            fp += (!y && hit) as u8 as f64;
            fneg += (y && !hit) as u8 as f64;
            pos += y as u8 as f64;
            all += 1.0;
        }
    }
    let f1 = 2.0 * tp / (2.0 * tp + fp + fneg);
    let rate = pos / all;
    let f1_all = 2.0 * rate / (1.0 + rate);
    eprintln!("planted rule, fresh set: F1@0.5 {f1:.3}; all-relevant {f1_all:.3}; none 0");
    assert!(f1 > f1_all + 0.2, "F1 {f1} vs all-relevant {f1_all}");

    // Through the file and the folded inference form.
    let path = dir.path().join("head.safetensors");
    report.head.save(&path).unwrap();
    let w = HeadWeights::load(&path).unwrap();
    assert_eq!(w, report.head);
    let batch = fastrm::train::make_batch(&data, &[0, 1, 2, 3, 4, 5], 0.3).unwrap();
    let want = probabilities(&Cpu, &w, &batch).unwrap();
    let head = FastRmHead::new(&Cpu, &w, 16).unwrap();
    for (t, want) in batch.tokens.iter().zip(&want) {
        let img = Cpu.upload(&batch.images[t.image], 9, 16).unwrap();
        let folded = head.fold(&Cpu, &img).unwrap();
        let h = Cpu.upload(&t.hidden, 1, 16).unwrap();
        let got = Cpu
            .download(&head.scores(&Cpu, &folded, &h).unwrap())
            .unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "folded {a} vs training forward {b}");
        }
    }
}

/// A head file's tensors (name, raw bytes; sorted) and its header metadata.
type FileContents = (Vec<(String, Vec<u8>)>, HashMap<String, String>);

fn file_tensors(path: &Path) -> FileContents {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut ts: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    ts.sort();
    (ts, md.metadata().clone().unwrap_or_default())
}

#[test]
fn same_seed_same_head_different_seed_different_head() {
    let dir = tempfile::tempdir().unwrap();
    planted(dir.path(), 4, 20, 20);
    let data = Dataset::open(dir.path()).unwrap();
    let run = |seed: u64, name: &str| {
        let r = train(&Cpu, &data, &opts(40, seed), &mut |_, _, _| {}).unwrap();
        let p = dir.path().join(name);
        r.head.save(&p).unwrap();
        (r, p)
    };
    let (a, pa) = run(7, "a.safetensors");
    let (b, pb) = run(7, "b.safetensors");
    let (c, pc) = run(8, "c.safetensors");
    assert_eq!(a.head, b.head);
    assert_eq!(a.curve, b.curve);
    // The files hold the same tensors, byte for byte, and the same metadata.
    assert_eq!(file_tensors(&pa), file_tensors(&pb));
    assert_ne!(a.head.wq, c.head.wq);
    assert_ne!(file_tensors(&pa).0, file_tensors(&pc).0);
}

// ---------------------------------------------------------------- the CLI

fn fastrm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn expect_error(args: &[&str], needle: &str) {
    let (ok, _, err) = fastrm(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one error line, got {err:?}");
    assert!(
        lines[0].starts_with("error:") && lines[0].contains(needle),
        "{args:?}: {err:?} should mention {needle:?}"
    );
}

#[test]
fn cli_trains_writes_curve_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    planted(&data, 5, 10, 4);
    let out = dir.path().join("head.safetensors");
    let (ds, os) = (data.to_str().unwrap(), out.to_str().unwrap());
    let (ok, stdout, err) = fastrm(&[
        "train",
        "--data",
        ds,
        "--out",
        os,
        "--steps",
        "30",
        "--batch",
        "8",
        "--lr",
        "1e-2",
        "--seed",
        "2",
        "--eval-every",
        "10",
        "--head-dim",
        "6",
    ]);
    assert!(ok, "train failed: {err}");
    assert!(stdout.starts_with("trained 30 steps"), "{stdout}");
    assert_eq!(stdout.lines().count(), 1);
    let w = HeadWeights::load(&out).unwrap();
    assert_eq!((w.cfg.hidden_size, w.cfg.head_dim), (16, 6));
    assert!(w.cfg.provenance.contains("seed 2"), "{}", w.cfg.provenance);
    let csv = std::fs::read_to_string(dir.path().join("head.safetensors.loss.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "step,train_loss,val_loss");
    let steps: Vec<usize> = rows[1..]
        .iter()
        .map(|r| r.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 10, 20, 30]);
    for r in &rows[1..] {
        let f: Vec<f64> = r.split(',').skip(1).map(|v| v.parse().unwrap()).collect();
        assert!(
            f.len() == 2 && f.iter().all(|v| v.is_finite() && *v > 0.0),
            "{r}"
        );
    }
    let png = std::fs::read(dir.path().join("head.safetensors.loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Same seed, different thread counts (the row-blocked products split differently): the same
    // head, tensor for tensor; another seed: another head.
    let run_threads = |threads: &str, seed: &str, name: &str| {
        let p = dir.path().join(name);
        let st = Command::new(env!("CARGO_BIN_EXE_fastrm"))
            .env("RAYON_NUM_THREADS", threads)
            .args([
                "train",
                "--data",
                ds,
                "--out",
                p.to_str().unwrap(),
                "--steps",
                "6",
                "--batch",
                "100",
                "--lr",
                "1e-2",
                "--seed",
                seed,
            ])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        file_tensors(&p)
    };
    let one = run_threads("1", "9", "t1.safetensors");
    assert_eq!(one, run_threads("3", "9", "t3.safetensors"));
    assert_ne!(one.0, run_threads("3", "10", "t4.safetensors").0);

    // A label threshold from the command line overrides the manifest's.
    let out2 = dir.path().join("h2.safetensors");
    let (ok, _, err) = fastrm(&[
        "train",
        "--data",
        ds,
        "--out",
        out2.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "4",
        "--label-threshold",
        "0.5",
        "--val-fraction",
        "0",
    ]);
    assert!(ok, "{err}");
    assert_eq!(HeadWeights::load(&out2).unwrap().cfg.label_threshold, 0.5);

    // Bad arguments.
    expect_error(
        &["train", "--data", ds, "--out", os, "--steps", "0"],
        "--steps",
    );
    expect_error(
        &["train", "--data", ds, "--out", os, "--batch", "0"],
        "--batch",
    );
    expect_error(
        &["train", "--data", ds, "--out", os, "--head-dim", "0"],
        "--head-dim",
    );
    // Absurd sizes are refused by name, not attempted (an allocation failure aborts).
    expect_error(
        &[
            "train",
            "--data",
            ds,
            "--out",
            os,
            "--batch",
            "1000000000000",
        ],
        "--batch",
    );
    expect_error(
        &[
            "train",
            "--data",
            ds,
            "--out",
            os,
            "--head-dim",
            "10000000000",
        ],
        "--head-dim",
    );
    let missing = dir.path().join("nope");
    expect_error(
        &["train", "--data", missing.to_str().unwrap(), "--out", os],
        "does not exist",
    );
    let bad_out = dir.path().join("nope/head.safetensors");
    expect_error(
        &["train", "--data", ds, "--out", bad_out.to_str().unwrap()],
        "does not exist",
    );

    // Corrupt data folders.
    let case = |name: &str, f: &dyn Fn(&Path)| -> String {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        f(&d);
        d.to_str().unwrap().to_string()
    };
    let no_manifest = case("empty-dir", &|_| {});
    expect_error(
        &["train", "--data", &no_manifest, "--out", os],
        "manifest.json",
    );
    let bad_json = case("bad-json", &|d| {
        std::fs::write(d.join("manifest.json"), "{\"version\": 1,").unwrap()
    });
    expect_error(
        &["train", "--data", &bad_json, "--out", os],
        "not valid JSON",
    );
    let missing_shard = case("missing-shard", &|d| {
        write_manifest(d, 16, 9, &[("shard-00000.safetensors".into(), 1, 1)])
    });
    expect_error(
        &["train", "--data", &missing_shard, "--out", os],
        "shard-00000.safetensors",
    );
    let truncated = case("truncated", &|d| {
        planted(d, 6, 4, 4);
        let p = d.join("shard-00000.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    expect_error(&["train", "--data", &truncated, "--out", os], "safetensors");
    let wrong_shape = case("wrong-shape", &|d| {
        planted(d, 6, 4, 4);
        write_manifest(d, 12, 9, &[("shard-00000.safetensors".into(), 4, 12)]);
    });
    expect_error(
        &["train", "--data", &wrong_shape, "--out", os],
        "image_hidden",
    );
    let empty = case("no-tokens", &|d| {
        let sh = Shard {
            image_hidden: vec![0.5; 2 * 9 * 16],
            token_hidden: vec![],
            maps: vec![],
            token_sample: vec![],
            samples: 2,
        };
        write_shard(&d.join("shard-00000.safetensors"), 0, &sh, 16, 9);
        write_manifest(d, 16, 9, &[("shard-00000.safetensors".into(), 2, 0)]);
    });
    expect_error(&["train", "--data", &empty, "--out", os], "empty");
    let no_shards = case("no-shards", &|d| write_manifest(d, 16, 9, &[]));
    expect_error(&["train", "--data", &no_shards, "--out", os], "empty");
    let bad_sample = case("bad-sample", &|d| {
        let sh = Shard {
            image_hidden: vec![0.5; 9 * 16],
            token_hidden: vec![0.1; 16],
            maps: vec![0.2; 9],
            token_sample: vec![3],
            samples: 1,
        };
        write_shard(&d.join("shard-00000.safetensors"), 0, &sh, 16, 9);
        write_manifest(d, 16, 9, &[("shard-00000.safetensors".into(), 1, 1)]);
    });
    expect_error(
        &["train", "--data", &bad_sample, "--out", os],
        "token_sample",
    );
}

/// `train --device sim`: the steps run through the CUDA backend's code (f16 storage, on the host
/// simulator). The loss falls as on the CPU (every validation loss within 0.5% of the CPU's; f16
/// gives about 0.05%), and the two heads, from one seed, predict alike: every probability on every
/// training token and patch within 0.01 of the CPU head's (f16 gives 0.0002; a head of another
/// seed differs by 0.7).
#[cfg(feature = "sim")]
#[test]
fn cli_trains_on_the_simulator_like_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    planted(&data, 5, 20, 8);
    let run = |device: &str, seed: &str| {
        let out = dir.path().join(format!("{device}-{seed}.safetensors"));
        let (ok, stdout, err) = fastrm(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "40",
            "--batch",
            "16",
            "--lr",
            "1e-2",
            "--seed",
            seed,
            "--eval-every",
            "10",
            "--device",
            device,
        ]);
        assert!(ok, "{device}: {err}");
        let csv = std::fs::read_to_string(
            dir.path()
                .join(format!("{device}-{seed}.safetensors.loss.csv")),
        )
        .unwrap();
        let val: Vec<f64> = csv
            .lines()
            .skip(1)
            .map(|r| r.split(',').nth(2).unwrap().parse().unwrap())
            .collect();
        (stdout, HeadWeights::load(&out).unwrap(), val)
    };
    let (line, sim, sim_val) = run("sim", "3");
    assert!(line.contains("on cuda:f16 (simulated"), "{line}");
    let (_, cpu, cpu_val) = run("cpu", "3");
    let (_, other, _) = run("cpu", "4");
    eprintln!("validation loss: sim {sim_val:?}\n                 cpu {cpu_val:?}");
    assert!(
        sim_val.last().unwrap() < &(0.7 * sim_val[0]),
        "sim: {sim_val:?}"
    );
    for (s, c) in sim_val.iter().zip(&cpu_val) {
        assert!((s - c).abs() < 0.005 * c, "val loss sim {s} vs cpu {c}");
    }
    let ds = Dataset::open(&data).unwrap();
    let ids: Vec<usize> = (0..ds.tokens.len()).collect();
    let batch = fastrm::train::make_batch(&ds, &ids, 0.3).unwrap();
    let probs = |w: &HeadWeights| probabilities(&Cpu, w, &batch).unwrap().concat();
    let (ps, pc, po) = (probs(&sim), probs(&cpu), probs(&other));
    let max_diff =
        |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let (d_sim, d_seed) = (max_diff(&ps, &pc), max_diff(&po, &pc));
    eprintln!("max |p| difference: sim vs cpu {d_sim:.4}; another seed vs cpu {d_seed:.4}");
    assert!(d_sim < 0.01, "sim vs cpu {d_sim}");
    assert!(d_seed > 0.01, "another seed {d_seed}");
}
