//! `fastrm distill`: both input formats, stored maps and hidden states against the engine,
//! resumption without loss or duplication, refusal of a mismatched folder, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{cli_fails as fails, cli_ok as ok, fixture_dir};
use fastrm::backend::cpu::Cpu;
use fastrm::backend::Backend;
use fastrm::distill::{Manifest, Shard, SUFFIX};
use fastrm::engine::Method;
use fastrm::explain::RowMode;
use fastrm::{Engine, GenerateOptions, Request};

fn data_dir() -> PathBuf {
    fixture_dir("distill")
}

fn images() -> PathBuf {
    data_dir().join("images")
}

fn distill(questions: &Path, out: &Path, extra: &[&str]) -> Output {
    distill_with(&fixture_dir("tiny"), questions, out, extra)
}

fn distill_with(model: &Path, questions: &Path, out: &Path, extra: &[&str]) -> Output {
    distill_from(model, questions, &images(), out, extra)
}

/// `fastrm distill` over the images in `imgs`.
fn distill_from(model: &Path, questions: &Path, imgs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "distill".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--questions".into(),
        questions.display().to_string(),
        "--images".into(),
        imgs.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    o
}

fn vqa() -> PathBuf {
    data_dir().join("vqa_questions.json")
}

fn jsonl() -> PathBuf {
    data_dir().join("questions.jsonl")
}

fn shards(dir: &Path) -> (Manifest, Vec<Shard>) {
    let m = Manifest::read(dir).unwrap();
    let s = m
        .shards
        .iter()
        .map(|s| Shard::read(&dir.join(&s.file)).unwrap())
        .collect();
    (m, s)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Every stored sample against the engine: maps equal to `explain`'s, hidden states equal to the
/// teacher-forced forward's rows on prompt + generated ids.
fn check_against_engine(dir: &Path, method: Method, suffix: &str) {
    let engine = Engine::load(Cpu, &fixture_dir("tiny")).unwrap();
    let (m, shards) = shards(dir);
    let (d, p) = (m.hidden_size, m.n_patches);
    assert_eq!((d, p), (64, 25));
    assert_eq!(m.grid, [5, 5]);
    let opts = GenerateOptions {
        max_new_tokens: m.max_new_tokens,
        ..Default::default()
    };
    let mut next = 0;
    for (si, sh) in shards.iter().enumerate() {
        assert_eq!(sh.first_sample, next);
        assert_eq!(m.shards[si].samples, sh.samples.len());
        assert_eq!(m.shards[si].tokens, sh.token_ids.len());
        assert_eq!(sh.image_hidden.len(), sh.samples.len() * p * d);
        let mut t = 0;
        for (k, rec) in sh.samples.iter().enumerate() {
            assert_eq!(rec.sample, next + k);
            let image = Path::new(&rec.image);
            let prompt = format!("{}{suffix}", rec.question);
            let ex = engine
                .explain(
                    &Request::question(image, prompt),
                    &opts,
                    method,
                    &mut |_| {},
                )
                .unwrap();
            assert_eq!(ex.generation.generated_ids, rec.generated_ids);
            assert_eq!(ex.generation.text, rec.answer);
            let n = rec.generated_ids.len();
            let ids = &ex.generation.input_ids;
            let mut full = ids.clone();
            full.extend_from_slice(&rec.generated_ids[..n - 1]);
            let (pixels, _) = engine.pixels(&image.into()).unwrap();
            let h = engine
                .model()
                .forward_full(engine.backend(), &full, &pixels)
                .unwrap();
            let h = engine.backend().download(&h).unwrap();
            let img_pos: Vec<usize> = (0..ids.len())
                .filter(|&i| ids[i] == engine.config().image_token_id)
                .collect();
            assert_eq!(img_pos.len(), p);
            let want_img: Vec<f32> = img_pos
                .iter()
                .flat_map(|&i| h[i * d..(i + 1) * d].to_vec())
                .collect();
            let got_img = &sh.image_hidden[k * p * d..(k + 1) * p * d];
            assert!(
                max_rel(got_img, &want_img) < 1e-4,
                "image hidden, sample {}",
                rec.sample
            );
            for (j, tok) in ex.tokens.iter().enumerate() {
                assert_eq!(sh.token_ids[t], tok.id as i64);
                assert_eq!(sh.token_sample[t], k as i64);
                assert_eq!(sh.token_index[t], j as i64);
                assert_eq!(
                    &sh.maps[t * p..(t + 1) * p],
                    &tok.map[..],
                    "map, sample {}",
                    rec.sample
                );
                let row = ids.len() - 1 + j;
                let want = &h[row * d..(row + 1) * d];
                let got = &sh.token_hidden[t * d..(t + 1) * d];
                assert!(
                    max_rel(got, want) < 1e-4,
                    "token hidden, sample {} token {j}",
                    rec.sample
                );
                t += 1;
            }
        }
        assert_eq!(t, sh.token_ids.len());
        next += sh.samples.len();
    }
    assert_eq!(m.samples, next);
}

#[test]
fn vqa_questions_maps_and_hidden_states() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("set");
    let line = ok(&distill(
        &vqa(),
        &out,
        &["--limit", "4", "--shard-size", "3", "--max-new-tokens", "4"],
    ));
    assert!(line.contains("distilled 4 samples"), "{line}");
    assert_eq!(line.trim().lines().count(), 1);
    let (m, sh) = shards(&out);
    assert_eq!(m.method, "baseline");
    assert_eq!(m.suffix, SUFFIX);
    assert_eq!(m.input.format, "vqa");
    assert_eq!(m.input.entries, 10);
    assert_eq!(m.label_threshold, 0.3);
    assert_eq!(
        m.shards.iter().map(|s| s.samples).collect::<Vec<_>>(),
        [3, 1]
    );
    assert_eq!(m.shards[1].file, "shard-00001.safetensors");
    let recs: Vec<_> = sh.iter().flat_map(|s| s.samples.clone()).collect();
    assert_eq!(
        recs.iter().map(|r| r.question_id).collect::<Vec<_>>(),
        [420, 70, 90, 421]
    );
    // The three COCO naming schemes.
    assert!(recs[0].image.ends_with("COCO_val2014_000000000042.jpg"));
    assert!(recs[1].image.ends_with("COCO_train2014_000000000007.jpg"));
    assert!(recs[2].image.ends_with("000000000009.jpg"));
    assert!(recs.iter().all(|r| r.answers.is_none()));
    // `fastrm train` reads the set as written.
    let ds = fastrm::train::Dataset::open(&out).unwrap();
    assert_eq!(ds.samples.len(), 4);
    assert_eq!(ds.tokens.len(), m.tokens);
    assert_eq!((ds.hidden_size, ds.n_patches), (64, 25));
    assert_eq!(ds.label_threshold, 0.3);
    check_against_engine(
        &out,
        Method::Baseline {
            mode: RowMode::Streamed,
        },
        SUFFIX,
    );
}

#[test]
fn jsonl_incremental_without_suffix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("set");
    ok(&distill(
        &jsonl(),
        &out,
        &[
            "--method",
            "baseline-incremental",
            "--no-suffix",
            "--max-new-tokens",
            "3",
        ],
    ));
    let (m, sh) = shards(&out);
    assert_eq!(m.method, "baseline-incremental");
    assert_eq!(m.suffix, "");
    assert_eq!(m.input.format, "jsonl");
    assert_eq!(m.shard_size, 16);
    assert_eq!(sh.len(), 1);
    let recs = &sh[0].samples;
    // Ids are line numbers; line 3 is blank.
    assert_eq!(
        recs.iter().map(|r| r.question_id).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    assert_eq!(
        recs[0].answers,
        Some(vec!["sleeping".to_string(), "resting".to_string()])
    );
    assert_eq!(recs[1].answers, None);
    assert!(recs[1].image.ends_with("sub/coffee.jpg"));
    check_against_engine(&out, Method::BaselineIncremental, "");

    // Absolute image paths are taken as they are.
    let abs = tmp.path().join("abs.jsonl");
    let img = images().join("tiny.png");
    std::fs::write(
        &abs,
        format!(
            "{}\n",
            serde_json::json!({"image": img.display().to_string(), "question": "What is it?"})
        ),
    )
    .unwrap();
    let out2 = tmp.path().join("abs");
    ok(&distill(&abs, &out2, &["--max-new-tokens", "2"]));
    let (_, sh) = shards(&out2);
    assert_eq!(
        sh[0].samples[0].image,
        std::fs::canonicalize(&img).unwrap().display().to_string()
    );
}

fn all_samples(dir: &Path) -> (Manifest, Vec<Shard>) {
    shards(dir)
}

#[test]
fn resume_without_loss_or_duplication() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let common = ["--shard-size", "2", "--max-new-tokens", "3"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        common
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect()
    };
    // Reference: one uninterrupted run.
    ok(&distill(&vqa(), &b, &with(&["--limit", "9"])));
    let (mb, sb) = all_samples(&b);
    assert_eq!(mb.samples, 9);
    assert_eq!(sb.len(), 5);

    // Interrupted by a limit (ending on a short shard), then resumed.
    ok(&distill(&vqa(), &a, &with(&["--limit", "5"])));
    assert_eq!(Manifest::read(&a).unwrap().samples, 5);
    let line = ok(&distill(&vqa(), &a, &with(&["--limit", "9"])));
    assert!(line.contains("distilled 4 samples"), "{line}");
    let (ma, sa) = all_samples(&a);
    assert_eq!(ma.shards, mb.shards);
    assert_eq!(sa, sb);

    // Nothing left to do (the folder keeps its shard size without --shard-size).
    let line = ok(&distill(
        &vqa(),
        &a,
        &["--limit", "9", "--max-new-tokens", "3"],
    ));
    assert!(line.contains("distilled 0 samples"), "{line}");
    assert_eq!(all_samples(&a).1, sb);

    // A crash after a shard was written but before the manifest listed it, with a temporary file
    // left behind: the shard is redone.
    let mut m = Manifest::read(&a).unwrap();
    m.shards.pop();
    m.samples = m.shards.iter().map(|s| s.samples).sum();
    std::fs::write(a.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    std::fs::write(a.join(".shard-00004.safetensors.tmp-99999"), b"half").unwrap();
    let line = ok(&distill(&vqa(), &a, &with(&["--limit", "9"])));
    assert!(line.contains("distilled 1 samples"), "{line}");
    assert_eq!(all_samples(&a), (mb.clone(), sb.clone()));
    assert!(!a.join(".shard-00004.safetensors.tmp-99999").exists());

    // The last shard's file and its manifest entry both gone.
    let mut m = Manifest::read(&a).unwrap();
    let last = m.shards.pop().unwrap();
    std::fs::remove_file(a.join(&last.file)).unwrap();
    let last = m.shards.pop().unwrap();
    std::fs::remove_file(a.join(&last.file)).unwrap();
    std::fs::write(a.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    let line = ok(&distill(&vqa(), &a, &with(&["--limit", "9"])));
    assert!(line.contains("distilled 3 samples"), "{line}");
    assert_eq!(all_samples(&a), (mb.clone(), sb.clone()));

    // A listed shard truncated on disk: redone from its first sample, later ones too.
    let p = a.join("shard-00003.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let o = distill(&vqa(), &a, &with(&["--limit", "9"]));
    let line = ok(&o);
    assert!(line.contains("distilled 3 samples"), "{line}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("shard-00003"));
    assert_eq!(all_samples(&a), (mb, sb));
}

#[test]
fn refuses_a_mismatched_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("set");
    let base = ["--limit", "1", "--max-new-tokens", "2"];
    ok(&distill(&vqa(), &out, &base));
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails(
        &distill(&vqa(), &out, &with(&["--method", "baseline-incremental"])),
        &["method", "baseline-incremental"],
    );
    fails(&distill(&vqa(), &out, &with(&["--no-suffix"])), &["suffix"]);
    fails(&distill(&jsonl(), &out, &base), &["questions file"]);
    fails(
        &distill(&vqa(), &out, &["--limit", "1", "--max-new-tokens", "3"]),
        &["--max-new-tokens"],
    );
    fails(
        &distill(&vqa(), &out, &with(&["--shard-size", "4"])),
        &["--shard-size"],
    );
    // Another model folder (a copy of the same weights still counts as another model).
    let model2 = tmp.path().join("model2");
    std::fs::create_dir(&model2).unwrap();
    for f in std::fs::read_dir(fixture_dir("tiny")).unwrap() {
        let f = f.unwrap();
        if f.path().is_file() {
            std::fs::copy(f.path(), model2.join(f.file_name())).unwrap();
        }
    }
    fails(&distill_with(&model2, &vqa(), &out, &base), &["model"]);
    // A model retrained in place (same folder, weight file rewritten) is another model too.
    let out2 = tmp.path().join("set2");
    ok(&distill_with(&model2, &vqa(), &out2, &base));
    let weights = model2.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(later)
        .unwrap();
    fails(
        &distill_with(
            &model2,
            &vqa(),
            &out2,
            &["--limit", "2", "--max-new-tokens", "2"],
        ),
        &["other weights", "rewritten"],
    );
    assert_eq!(Manifest::read(&out2).unwrap().samples, 1);
    // The folder is untouched and still resumes with its own settings.
    assert_eq!(Manifest::read(&out).unwrap().samples, 1);
    ok(&distill(
        &vqa(),
        &out,
        &["--limit", "2", "--max-new-tokens", "2"],
    ));
    assert_eq!(Manifest::read(&out).unwrap().samples, 2);
}

#[test]
fn bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("out");
    let write = |name: &str, text: &str| -> PathBuf {
        let p = t.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // A missing COCO image: every tried name is listed, nothing is written.
    let q = write(
        "missing.json",
        r#"{"questions": [{"image_id": 42, "question": "Why?", "question_id": 1},
                          {"image_id": 5, "question": "Why?", "question_id": 2}]}"#,
    );
    fails(
        &distill(&q, &out, &[]),
        &[
            "question 2",
            "COCO_val2014_000000000005.jpg",
            "COCO_train2014_000000000005.jpg",
            "000000000005.jpg",
        ],
    );
    assert!(!out.join("shard-00000.safetensors").exists());
    let q = write(
        "missing.jsonl",
        "{\"image\": \"nope.png\", \"question\": \"Why?\"}\n",
    );
    fails(&distill(&q, &t.join("o1"), &[]), &["nope.png", "not found"]);
    // Malformed JSONL lines and VQA entries name the file and the line or entry.
    let q = write(
        "bad.jsonl",
        "{\"image\": \"tiny.png\", \"question\": \"Why?\"}\n{\"image\": \"tiny.png\", \"question\": \n",
    );
    fails(
        &distill(&q, &t.join("o2"), &[]),
        &["bad.jsonl", "line 2", "invalid JSON"],
    );
    let q = write(
        "noq.jsonl",
        "{\"image\": \"tiny.png\", \"question\": \"Why?\"}\n{\"image\": \"tiny.png\"}\n",
    );
    fails(
        &distill(&q, &t.join("o3"), &[]),
        &["line 2", "missing field `question`"],
    );
    let q = write(
        "ans.jsonl",
        "{\"image\": \"tiny.png\", \"question\": \"Why?\", \"answers\": [1]}\n",
    );
    fails(&distill(&q, &t.join("o4"), &[]), &["line 1", "answers"]);
    let q = write(
        "badvqa.json",
        r#"{"questions": [{"image_id": 42, "question": "Why?", "question_id": 1},
                          {"image_id": 42, "question": "Why?"}]}"#,
    );
    fails(
        &distill(&q, &t.join("o5"), &[]),
        &["badvqa.json", "questions[1]", "question_id"],
    );
    let q = write("trunc.json", "{\"questions\": [\n {\"image_id\": 42,\n");
    fails(&distill(&q, &t.join("o6"), &[]), &["trunc.json", "neither"]);
    // Empty data sets.
    let q = write("empty.jsonl", "\n\n");
    fails(&distill(&q, &t.join("o7"), &[]), &["empty"]);
    let q = write("none.json", r#"{"questions": []}"#);
    fails(&distill(&q, &t.join("o8"), &[]), &["no questions"]);
    fails(
        &distill(&t.join("absent.json"), &t.join("o9"), &[]),
        &["absent.json"],
    );
    // Bad arguments.
    fails(
        &distill(&vqa(), &t.join("o10"), &["--limit", "0"]),
        &["--limit"],
    );
    fails(
        &distill(&vqa(), &t.join("o11"), &["--max-new-tokens", "0"]),
        &["--max-new-tokens"],
    );
    fails(
        &distill(&vqa(), &t.join("o12"), &["--shard-size", "0"]),
        &["--shard-size"],
    );
    // An unreadable image fails naming it; earlier shards stay and the run resumes after a fix.
    let imgs = t.join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    std::fs::copy(images().join("tiny.png"), imgs.join("good.png")).unwrap();
    std::fs::write(imgs.join("bad.png"), b"not an image at all").unwrap();
    let q = write(
        "unreadable.jsonl",
        "{\"image\": \"good.png\", \"question\": \"Why?\"}\n{\"image\": \"bad.png\", \"question\": \"Why?\"}\n",
    );
    let run = |out: &Path| {
        distill_from(
            &fixture_dir("tiny"),
            &q,
            &imgs,
            out,
            &["--shard-size", "1", "--max-new-tokens", "2"],
        )
    };
    let o13 = t.join("o13");
    fails(&run(&o13), &["question 2", "bad.png"]);
    assert_eq!(Manifest::read(&o13).unwrap().samples, 1);
    std::fs::copy(images().join("tiny.png"), imgs.join("bad.png")).unwrap();
    let line = ok(&run(&o13));
    assert!(line.contains("distilled 1 samples"), "{line}");
    // A folder another distill is writing (here: this test holding the lock) is refused; a lock
    // file its process left behind (a crash) holds no lock and is taken over, and released at
    // the end.
    let locked = t.join("locked");
    std::fs::create_dir(&locked).unwrap();
    let held = std::fs::File::create(locked.join(".distill.lock")).unwrap();
    held.try_lock().unwrap();
    fails(
        &distill(&vqa(), &locked, &["--limit", "1"]),
        &["another distill", "wait for it to end"],
    );
    drop(held);
    std::fs::write(locked.join(".distill.lock"), "4000000000").unwrap();
    ok(&distill(
        &vqa(),
        &locked,
        &["--limit", "1", "--max-new-tokens", "2"],
    ));
    assert!(!locked.join(".distill.lock").exists());
    // An output folder holding something else.
    let busy = t.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    fails(&distill(&vqa(), &busy, &["--limit", "1"]), &["not empty"]);
}

// ---- --shard I/N and merge

fn distill_spawn(questions: &Path, out: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .arg("distill")
        .arg("--model")
        .arg(fixture_dir("tiny"))
        .arg("--questions")
        .arg(questions)
        .arg("--images")
        .arg(images())
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn merge(out: &Path, inputs: &[&Path]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .arg("merge")
        .arg("--out")
        .arg(out)
        .args(inputs)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    o
}

/// Three `--shard I/3` processes side by side (one of them resuming an earlier, shorter run),
/// merged, give the single run's data set: the same manifest, and the same shard files' tensors
/// and records, the maps bit for bit.
#[test]
fn three_shard_processes_merged_equal_a_single_run() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let common = ["--shard-size", "3", "--max-new-tokens", "3"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        common.iter().chain(extra).copied().collect()
    };
    let single = t.join("single");
    ok(&distill(&vqa(), &single, &with(&["--limit", "8"])));

    let parts: Vec<PathBuf> = (0..3).map(|i| t.join(format!("part{i}"))).collect();
    // Shard 1 first stops early (questions 1 and 4), then resumes with the others.
    let line = ok(&distill(
        &vqa(),
        &parts[1],
        &with(&["--limit", "5", "--shard", "1/3"]),
    ));
    assert!(line.contains("distilled 2 samples"), "{line}");
    let specs = ["0/3", "1/3", "2/3"];
    let children: Vec<_> = parts
        .iter()
        .zip(specs)
        .map(|(p, s)| distill_spawn(&vqa(), p, &with(&["--limit", "8", "--shard", s])))
        .collect();
    let lines: Vec<String> = children
        .into_iter()
        .map(|c| ok(&c.wait_with_output().unwrap()))
        .collect();
    assert!(lines[1].contains("distilled 1 samples"), "{}", lines[1]);
    assert!(lines[0].contains("(shard 0/3)"), "{}", lines[0]);
    // Question k went to shard k mod 3, recorded with its index in the whole file.
    for (i, p) in parts.iter().enumerate() {
        let (m, sh) = shards(p);
        assert_eq!(m.shard.map(|s| (s.index, s.count)), Some((i, 3)));
        let recs: Vec<usize> = sh
            .iter()
            .flat_map(|s| s.samples.iter().map(|r| r.sample))
            .collect();
        assert_eq!(recs, (i..8).step_by(3).collect::<Vec<_>>());
        assert_eq!(sh[0].first_sample, i);
    }

    // Merged in any order: the single run's set.
    let merged = t.join("merged");
    let line = ok(&merge(&merged, &[&parts[2], &parts[0], &parts[1]]));
    assert!(line.contains("merged 3 shards"), "{line}");
    let (mm, sm) = shards(&merged);
    let (ms, ss) = shards(&single);
    assert_eq!(mm, ms);
    assert_eq!(sm.len(), 3);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for (a, b) in sm.iter().zip(&ss) {
        assert_eq!(bits(&a.maps), bits(&b.maps));
        assert_eq!(bits(&a.image_hidden), bits(&b.image_hidden));
        assert_eq!(bits(&a.token_hidden), bits(&b.token_hidden));
    }
    assert_eq!(sm, ss);
    // The merged folder is a whole set: distill extends it like the single run's.
    let line = ok(&distill(&vqa(), &merged, &with(&["--limit", "9"])));
    assert!(line.contains("distilled 1 samples"), "{line}");
    ok(&distill(&vqa(), &single, &with(&["--limit", "9"])));
    assert_eq!(shards(&merged), shards(&single));

    // Refusals: a shard folder resumed as another shard, a missing shard, a short shard, a
    // folder twice, a whole set, a non-empty output folder.
    fails(
        &distill(
            &vqa(),
            &parts[0],
            &with(&["--limit", "8", "--shard", "1/3"]),
        ),
        &["--shard", "0/3", "1/3"],
    );
    fails(
        &merge(&t.join("m1"), &[&parts[0], &parts[1]]),
        &["shard 2/3 missing"],
    );
    fails(
        &merge(&t.join("m2"), &[&parts[0], &parts[0], &parts[2]]),
        &["both shard 0/3"],
    );
    let short = t.join("short");
    ok(&distill(
        &vqa(),
        &short,
        &with(&["--limit", "3", "--shard", "2/3"]),
    ));
    fails(
        &merge(&t.join("m3"), &[&parts[0], &parts[1], &short]),
        &["different --limit"],
    );
    fails(
        &merge(&t.join("m4"), &[&single, &parts[1]]),
        &["not a shard folder"],
    );
    fails(
        &merge(&merged, &[&parts[0], &parts[1], &parts[2]]),
        &["--out", "not empty"],
    );
}

#[test]
fn bad_shard_specs_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    for (spec, why) in [
        ("0/0", "at least 1"),
        ("3/3", "below the count"),
        ("a/b", "not a non-negative integer"),
        ("2", "I/N"),
        ("-1/3", "not a non-negative integer"),
    ] {
        let out = tmp.path().join(format!("o{}", spec.replace('/', "_")));
        fails(
            &distill(&vqa(), &out, &[&format!("--shard={spec}")]),
            &["--shard", spec, why],
        );
        assert!(!out.exists(), "{spec}: nothing written");
    }
}

/// `distill --device sim` (the CUDA backend's code and kernels, f16 storage, on the host) gives the
/// CPU's answers, and maps that agree per token: Pearson ≥ 0.999 (f16 storage gives 0.9999 and
/// more on the tiny model; another token's map correlates at 0.6 at most, so a map of the wrong
/// token or an unconverged one fails).
#[cfg(feature = "sim")]
#[test]
fn distill_on_the_simulator_matches_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |device: &str| {
        let out = tmp.path().join(device);
        let line = ok(&distill(
            &vqa(),
            &out,
            &["--limit", "3", "--max-new-tokens", "3", "--device", device],
        ));
        (line, shards(&out))
    };
    let (line, (ms, ss)) = run("sim");
    assert!(line.contains("on cuda:f16 (simulated"), "{line}");
    let (_, (mc, sc)) = run("cpu");
    assert_eq!(ms.samples, 3);
    assert_eq!(ms.tokens, mc.tokens);
    let p = mc.n_patches;
    let mut worst = 1.0f64;
    for (a, b) in ss.iter().zip(&sc) {
        for (ra, rb) in a.samples.iter().zip(&b.samples) {
            assert_eq!(ra.generated_ids, rb.generated_ids);
            assert_eq!(ra.answer, rb.answer);
        }
        assert_eq!(a.token_ids, b.token_ids);
        for (t, (x, y)) in a.maps.chunks(p).zip(b.maps.chunks(p)).enumerate() {
            let r = common::pearson(x, y);
            worst = worst.min(r);
            assert!(r >= 0.999, "token {t}: Pearson {r:.5}");
            // A wrong map would not pass: another token's CPU map.
            let other = &b.maps[((t + 1) % (b.maps.len() / p)) * p..][..p];
            eprintln!(
                "token {t}: Pearson {r:.5}, against another token's map {:.3}",
                common::pearson(x, other)
            );
        }
        assert!(max_rel(&a.token_hidden, &b.token_hidden) < 0.02);
        assert!(max_rel(&a.image_hidden, &b.image_hidden) < 0.02);
    }
    eprintln!("worst per-map Pearson sim vs cpu: {worst:.5}");
}

/// A run whose first sample fails (a truncated image) completes no shard; the corrected rerun —
/// here with another question file — starts afresh instead of being refused by the empty set's
/// manifest.
#[test]
fn a_failed_first_sample_does_not_bind_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let good = images().join("000000000009.jpg");
    let bytes = std::fs::read(&good).unwrap();
    let cut = t.join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let line = |img: &Path| {
        format!(
            "{{\"image\": \"{}\", \"question\": \"Why?\"}}\n",
            img.display()
        )
    };
    let out = t.join("out");
    let bad_q = t.join("bad.jsonl");
    std::fs::write(&bad_q, line(&cut)).unwrap();
    fails(
        &distill(&bad_q, &out, &["--max-new-tokens", "2"]),
        &["cut.jpg"],
    );
    let good_q = t.join("good.jsonl");
    std::fs::write(&good_q, line(&good)).unwrap();
    let o = distill(&good_q, &out, &["--max-new-tokens", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (m, _) = shards(&out);
    assert_eq!(m.samples, 1);
}

/// A run whose first question fails (a corrupt image) leaves nothing behind: no manifest binding
/// the folder's settings, and no folder when the run made it.
#[test]
fn a_run_failing_on_its_first_question_leaves_no_empty_data_set() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    std::fs::write(
        imgs.join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot a png at all",
    )
    .unwrap();
    let q = tmp.path().join("q.jsonl");
    std::fs::write(
        &q,
        "{\"image\": \"broken.png\", \"question\": \"What is it?\"}\n",
    )
    .unwrap();
    let run = |out: &Path| distill_from(&fixture_dir("tiny"), &q, &imgs, out, &[]);
    let fresh = tmp.path().join("fresh");
    fails(&run(&fresh), &["broken.png"]);
    assert!(!fresh.exists(), "the failed run left its new folder behind");
    // A folder that existed stays, empty: the manifest the run wrote before failing is gone.
    let given = tmp.path().join("given");
    std::fs::create_dir(&given).unwrap();
    fails(&run(&given), &["broken.png"]);
    let left: Vec<_> = std::fs::read_dir(&given).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
