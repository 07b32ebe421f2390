//! `fastrm eval`: how good a FastRM head is, on a distilled data set (issue 4 item 5, issue 7
//! item 5).
//!
//! 1. **Classification**: the head's per-patch probabilities against the binarised baseline map
//!    (`y_j = 1[r_j ≥ τ·max r]`, τ the head's `label_threshold`), accuracy / precision / recall /
//!    F1 at thresholds 0.1 … 0.9, micro-averaged over every token and patch of the set.
//! 2. **Perturbation** (needs the model): image patches removed in relevance order (positive:
//!    most relevant first; negative: least relevant first) at 0, 5 … 100%, by hiding the removed
//!    image positions' keys from every query ([`crate::backend::Backend::attention_masked`]);
//!    accuracy per step and its trapezoid AUC, for fastrm, the data set's baseline maps, GradCAM
//!    and random orders (mean of 5 seeds).
//! 3. **Entropy confidence**: per answer the mean normalised entropy of its FastRM maps; Gaussian
//!    KDEs (Scott's bandwidth) of correct and incorrect answers; threshold = mean of the two
//!    means; TP/FP below, FN/TN above it.
//! 4. **Pointing game** when the question file has `target_mask`s: per answer token and method,
//!    whether the map's maximum lies on the target and the share of its mass there; model accuracy
//!    per question `type` and on multi-object scenes.
//!
//! See `docs/NOTES.md` ("Eval") for the decisions.

pub mod metrics;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::backend::Backend;
use crate::distill::{dataset, Manifest, SampleRecord, Shard};
use crate::engine::{AnyEngine, Engine, GenerateOptions, Method};
use crate::error::{Error, Result};
use crate::explain::fastrm::{FastRmHead, HeadWeights};
use crate::explain::report::Staging;
use crate::explain::{
    default_gradcam_layer, gradient_map, incremental_maps, map_entropy, Confidence, RowMode,
};
use crate::model::session::{Mode, Session};
use crate::render::plot::{line_plot, Axis, LinePlot, Marker, Series, PALETTE};
use crate::render::write_png;
use crate::status::StatusLine;
use metrics::Counts;

pub const JSON_FILE: &str = "eval.json";
pub const CLASSIFICATION_PNG: &str = "classification.png";
pub const POSITIVE_PNG: &str = "perturbation_positive.png";
pub const NEGATIVE_PNG: &str = "perturbation_negative.png";
pub const ENTROPY_PNG: &str = "entropy_kde.png";
pub const POINTING_PNG: &str = "pointing.png";
/// Random removal orders averaged per curve.
pub const RANDOM_SEEDS: u64 = 5;

/// `fastrm eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model folder the data set was distilled with (the perturbation and pointing sections run it).
    #[arg(long)]
    pub model: PathBuf,
    /// The FastRM head file (head.safetensors).
    #[arg(long)]
    pub head: PathBuf,
    /// A `fastrm distill` output folder (manifest.json and shards).
    #[arg(long)]
    pub data: PathBuf,
    /// Write eval.json and the plots (classification, perturbation, entropy KDE) into this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as one JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
    /// The question file, when it is no longer where the manifest says (must be the same file).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// The images folder, when it is no longer where the manifest says.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Only the first N samples of the data set.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip the perturbation curves (the expensive part: ~300 masked generations per sample).
    #[arg(long)]
    pub no_perturbation: bool,
    /// Store the calibrated entropy threshold in the head file (`confidence_threshold`).
    #[arg(long)]
    pub write_threshold: bool,
    /// GradCAM's decoder layer (default: the middle one).
    #[arg(long)]
    pub layer: Option<usize>,
    #[command(flatten)]
    pub device: crate::cli::DeviceArgs,
}

/// One sample of the data set with its maps.
struct Sample {
    record: SampleRecord,
    /// Per generated token: id, the data set's baseline map, the head's map.
    ids: Vec<u32>,
    baseline: Vec<Vec<f32>>,
    fastrm: Vec<Vec<f32>>,
}

impl Sample {
    /// Indices of the answer's tokens: EOS left out (all tokens if every one is EOS).
    fn answer_tokens(&self, eos: &[u32]) -> Vec<usize> {
        let v: Vec<usize> = (0..self.ids.len())
            .filter(|&i| !eos.contains(&self.ids[i]))
            .collect();
        if v.is_empty() {
            (0..self.ids.len()).collect()
        } else {
            v
        }
    }
}

/// The sample bar with the current step, on the status line.
fn sample_bar(status: &StatusLine, done: usize, total: usize, step: &str) {
    let t = status.elapsed();
    let eta = if done > 0 {
        format!(" ETA {:.0}s", t / done as f64 * (total - done) as f64)
    } else {
        String::new()
    };
    status.say(&format!(
        "samples [{}] {done}/{total}{eta} · {step}",
        crate::status::bar(done, total)
    ));
}

/// The pointing game for one method: the hits' sum and every answer token's mask mass.
#[derive(Default, Clone)]
struct PointSums {
    hits: f64,
    masses: Vec<f64>,
}

const POINT_METHODS: [&str; 5] = [
    "fastrm",
    "baseline",
    "baseline-incremental",
    "gradcam",
    "random",
];
const PERTURB_METHODS: [&str; 4] = ["fastrm", "baseline", "gradcam", "random"];

/// `fastrm eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    if args.limit == Some(0) {
        return Err(Error::input("--limit must be at least 1"));
    }
    let (device, dtype) = args.device.get()?;
    if !args.data.is_dir() {
        return Err(Error::input(format!(
            "--data {}: no such folder (make one with `fastrm distill`)",
            args.data.display()
        )));
    }
    Error::require_dir("--model", &args.model)?;
    let manifest = Manifest::read(&args.data)?;
    let head_w = HeadWeights::load(&args.head)?;
    if head_w.cfg.hidden_size != manifest.hidden_size {
        return Err(Error::input(format!(
            "--head {} was made for hidden size {}, but the data set {} has hidden size {}",
            args.head.display(),
            head_w.cfg.hidden_size,
            args.data.display(),
            manifest.hidden_size
        )));
    }
    if manifest.shards.is_empty() {
        return Err(Error::input(format!(
            "data set {} has no samples",
            args.data.display()
        )));
    }
    // Fail on an unusable output folder before any expensive work.
    let staging = args.out.as_deref().map(Staging::new).transpose()?;
    let progress = StatusLine::timed();
    progress.say(&format!("loading {}", args.model.display()));
    let engine = AnyEngine::load(device, dtype, &args.model)?;
    crate::with_engine!(&engine, |e| run_on(
        e, &args, &manifest, head_w, staging, progress, t0
    ))
}

/// Everything after the model is loaded, on its backend: the head's maps, the generations, the
/// report.
fn run_on<B: Backend>(
    engine: &Engine<B>,
    args: &EvalArgs,
    manifest: &Manifest,
    mut head_w: HeadWeights,
    staging: Option<Staging>,
    progress: StatusLine,
    t0: Instant,
) -> Result<()> {
    // The data set, with the head's maps.
    progress.say("reading the data set");
    let b = &engine.backend;
    let head = FastRmHead::new(b, &head_w, manifest.hidden_size)?;
    let (p, d) = (manifest.n_patches, manifest.hidden_size);
    let mut samples: Vec<Sample> = Vec::new();
    'shards: for s in &manifest.shards {
        let shard = Shard::read(&args.data.join(&s.file))?;
        if (shard.n_patches, shard.hidden_size) != (p, d) {
            return Err(Error::input(format!(
                "{}: {} patches and hidden size {}, the manifest says {p} and {d}",
                s.file, shard.n_patches, shard.hidden_size
            )));
        }
        for (si, record) in shard.samples.iter().enumerate() {
            if args.limit.is_some_and(|l| samples.len() >= l) {
                break 'shards;
            }
            let rows: Vec<usize> = (0..shard.n_tokens())
                .filter(|&r| shard.token_sample[r] == si as i64)
                .collect();
            let img = b.upload(&shard.image_hidden[si * p * d..(si + 1) * p * d], p, d)?;
            let folded = head.fold(b, &img)?;
            let mut hidden = Vec::with_capacity(rows.len() * d);
            for &r in &rows {
                hidden.extend_from_slice(&shard.token_hidden[r * d..(r + 1) * d]);
            }
            let fastrm = if rows.is_empty() {
                Vec::new()
            } else {
                let scores =
                    b.download(&head.scores(b, &folded, &b.upload(&hidden, rows.len(), d)?)?)?;
                scores.chunks_exact(p).map(|c| c.to_vec()).collect()
            };
            samples.push(Sample {
                record: record.clone(),
                ids: rows.iter().map(|&r| shard.token_ids[r] as u32).collect(),
                baseline: rows
                    .iter()
                    .map(|&r| shard.maps[r * p..(r + 1) * p].to_vec())
                    .collect(),
                fastrm,
            });
        }
    }
    let n_tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    if n_tokens == 0 {
        return Err(Error::input(format!(
            "data set {} has no tokens",
            args.data.display()
        )));
    }

    // 1. Classification against the binarised baseline.
    let tau = head_w.cfg.label_threshold;
    let mut counts = [Counts::default(); metrics::THRESHOLDS.len()];
    for s in &samples {
        for (probs, map) in s.fastrm.iter().zip(&s.baseline) {
            let labels = crate::train::labels(map, tau);
            for (c, &t) in counts.iter_mut().zip(&metrics::THRESHOLDS) {
                metrics::classify_into(c, probs, &labels, t);
            }
        }
    }

    // 2–4 need the model, the question file and the images.
    let cfg = engine.config().clone();
    if (cfg.text.hidden_size, cfg.vision.num_patches()) != (d, p) {
        return Err(Error::input(format!(
            "--model {} has hidden size {} and {} patches; the data set was made with {d} and {p}",
            args.model.display(),
            cfg.text.hidden_size,
            cfg.vision.num_patches()
        )));
    }
    let qpath = args
        .questions
        .clone()
        .unwrap_or_else(|| PathBuf::from(&manifest.input.path));
    let questions = dataset::Dataset::load(&qpath).map_err(|e| {
        Error::input(format!(
            "the data set's question file: {e} (pass --questions FILE if it moved)"
        ))
    })?;
    if questions.fingerprint != manifest.input.fingerprint {
        return Err(Error::input(format!(
            "{} is not the question file the data set was made from (fingerprint {} vs {})",
            qpath.display(),
            questions.fingerprint,
            manifest.input.fingerprint
        )));
    }
    let qdir = qpath
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let images_dir = args
        .images
        .clone()
        .unwrap_or_else(|| PathBuf::from(&manifest.images));
    let text = engine
        .text
        .as_ref()
        .ok_or_else(|| Error::input("the model has no tokenizer"))?;
    let eos = cfg.eos_token_ids.clone();
    let gradcam_layer = args
        .layer
        .unwrap_or_else(|| default_gradcam_layer(cfg.text.num_hidden_layers));
    if gradcam_layer >= cfg.text.num_hidden_layers {
        return Err(Error::input(format!(
            "--layer {gradcam_layer} does not exist: the decoder has layers 0..{}",
            cfg.text.num_hidden_layers - 1
        )));
    }
    let opts = GenerateOptions {
        max_new_tokens: manifest.max_new_tokens,
        stop_at_eos: manifest.stop_at_eos,
        keep_steps: false,
    };
    let baseline_method = manifest.method.clone();
    let schedule = metrics::removal_schedule(p, metrics::PERTURBATION_STEPS);
    let n_steps = schedule.len();
    // [method][direction][step] → sum of correctness over samples (random: over seeds too).
    let mut curves: HashMap<&str, [Vec<f64>; 2]> = PERTURB_METHODS
        .iter()
        .map(|&m| (m, [vec![0.0; n_steps], vec![0.0; n_steps]]))
        .collect();
    let mut points: HashMap<&str, PointSums> = HashMap::new();
    let (mut with_target, mut empty_targets) = (0usize, 0usize);
    let mut per_sample: Vec<Value> = Vec::new();
    let (mut entropies, mut correct) = (Vec::new(), Vec::new());
    // Accuracy over samples with ground truth: overall, per type, multi-object.
    let mut acc_all = (0usize, 0usize);
    let mut acc_type: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let mut acc_multi = (0usize, 0usize);
    let mut generations = 0usize;

    let total = samples.len();
    for (k, s) in samples.iter().enumerate() {
        sample_bar(&progress, k, total, "answer");
        let entry = questions.entries.get(s.record.sample).ok_or_else(|| {
            Error::input(format!(
                "sample {} is past the end of {} ({} questions)",
                s.record.sample,
                qpath.display(),
                questions.entries.len()
            ))
        })?;
        let image_path = {
            let recorded = PathBuf::from(&s.record.image);
            if args.images.is_none() && recorded.is_file() {
                recorded
            } else {
                dataset::resolve_image(&images_dir, entry)?
            }
        };
        let ctx = |e: Error| {
            Error::input(format!(
                "sample {} ({}): {e}",
                s.record.sample,
                image_path.display()
            ))
        };
        let img = crate::vision::load_image(&image_path).map_err(ctx)?;
        let pixels = crate::vision::preprocess(&img, &engine.preprocess).map_err(ctx)?;
        let prompt = engine
            .prompt(&format!("{}{}", entry.question, manifest.suffix))
            .map_err(ctx)?;
        let image_pos = prompt.image_positions().to_vec();
        let (_, features) = engine.model.encode_image(b, &pixels).map_err(ctx)?;
        // One saving run answers the question again (checked against the data set) and serves
        // every gradient method's maps.
        let mut reference = Session::prefill(
            b,
            &engine.model,
            prompt.clone(),
            &features,
            &opts,
            Mode::SaveAll,
        )
        .map_err(ctx)?;
        reference.run_to_end().map_err(ctx)?;
        generations += 1;
        if s.ids != s.record.generated_ids {
            return Err(Error::input(format!(
                "sample {}: the shard's token rows give the answer {:?} but its record says {:?}: \
                 the shard is inconsistent",
                s.record.sample, s.ids, s.record.generated_ids
            )));
        }
        if reference.generated() != s.record.generated_ids {
            return Err(Error::input(format!(
                "sample {}: the model answers {:?} but the data set recorded {:?}: was the data set \
                 made with another model or question file?",
                s.record.sample,
                reference.generated(),
                s.record.generated_ids
            )));
        }
        let answers = entry.answers.as_deref();
        let has_answers = answers.is_some_and(|a| !a.is_empty());
        let ok0 = metrics::answer_correct(&s.record.answer, answers, &s.record.answer);
        if has_answers {
            let bump = |t: &mut (usize, usize)| {
                t.0 += ok0 as usize;
                t.1 += 1;
            };
            bump(&mut acc_all);
            if let Some(t) = &entry.qtype {
                bump(acc_type.entry(t.clone()).or_default());
            }
            if entry.n_objects.is_some_and(|n| n > 1) {
                bump(&mut acc_multi);
            }
        }
        let answer_tok = s.answer_tokens(&eos);
        let fastrm_entropies: Vec<f32> = s.fastrm.iter().map(|m| map_entropy(m)).collect();
        let conf = Confidence::of_answer(&fastrm_entropies, &s.ids, &eos, None);
        // Only answers with ground truth can be right or wrong.
        if has_answers {
            entropies.push(conf.mean_entropy as f64);
            correct.push(ok0);
        }

        // Maps of the methods the data set does not hold, computed on demand.
        let teacher = |method: Method| -> Result<Vec<Vec<f32>>> {
            (0..s.ids.len())
                .map(|i| gradient_map(&reference, method, i))
                .collect::<Result<_>>()
                .map_err(ctx)
        };
        let mut gradcam: Option<Vec<Vec<f32>>> = None;
        let mut gradcam_maps = || -> Result<Vec<Vec<f32>>> {
            if gradcam.is_none() {
                sample_bar(&progress, k, total, "gradcam maps");
                gradcam = Some(teacher(Method::GradCam {
                    layer: gradcam_layer,
                })?);
            }
            Ok(gradcam.clone().expect("just computed"))
        };

        // 2. Perturbation.
        if !args.no_perturbation {
            let sel = |maps: &[Vec<f32>]| -> Vec<f64> {
                let picked: Vec<&[f32]> = answer_tok.iter().map(|&i| maps[i].as_slice()).collect();
                metrics::combine_maps(&picked)
            };
            let gc = gradcam_maps()?;
            let mut orders: Vec<(&str, Vec<usize>, Vec<usize>)> = vec![];
            for (name, rel) in [
                ("fastrm", sel(&s.fastrm)),
                ("baseline", sel(&s.baseline)),
                ("gradcam", sel(&gc)),
            ] {
                orders.push((
                    name,
                    metrics::removal_order(&rel, true),
                    metrics::removal_order(&rel, false),
                ));
            }
            for seed in 0..RANDOM_SEEDS {
                // Negative removal with a random order is the reversed positive order: random
                // either way, and a different draw than the positive one.
                let o =
                    metrics::random_order(p, seed.wrapping_mul(0x9E37) ^ s.record.sample as u64);
                let rev: Vec<usize> = o.iter().rev().copied().collect();
                orders.push(("random", o, rev));
            }
            // Results by removed set: 0% and 100% are shared by every order, and orders agree
            // on many prefixes.
            let mut cache: HashMap<Vec<usize>, bool> = HashMap::new();
            let n_orders = orders.len();
            for (oi, (name, pos, neg)) in orders.iter().enumerate() {
                sample_bar(
                    &progress,
                    k,
                    total,
                    &format!("perturbation {}/{n_orders} ({name})", oi + 1),
                );
                for (dir, order) in [pos, neg].into_iter().enumerate() {
                    for (si, &(_, n_removed)) in schedule.iter().enumerate() {
                        let mut removed: Vec<usize> = order[..n_removed].to_vec();
                        removed.sort_unstable();
                        let ok = match cache.get(&removed) {
                            Some(&ok) => ok,
                            None => {
                                let ok = if n_removed == 0 {
                                    ok0
                                } else {
                                    let mut keep = vec![true; prompt.len()];
                                    for &j in &removed {
                                        keep[image_pos[j]] = false;
                                    }
                                    let mut run = Session::prefill(
                                        b,
                                        &engine.model,
                                        prompt.clone(),
                                        &features,
                                        &opts,
                                        Mode::Masked(keep),
                                    )
                                    .map_err(ctx)?;
                                    run.run_to_end().map_err(ctx)?;
                                    generations += 1;
                                    let answer = text.decode(run.generated())?;
                                    metrics::answer_correct(&answer, answers, &s.record.answer)
                                };
                                cache.insert(removed, ok);
                                ok
                            }
                        };
                        curves.get_mut(name).expect("a known method")[dir][si] +=
                            if ok { 1.0 } else { 0.0 };
                    }
                }
            }
        }

        // 4. Pointing game.
        if let Some(mask_rel) = &entry.target_mask {
            sample_bar(&progress, k, total, "pointing game");
            let mp = Path::new(mask_rel);
            let mask_path = if mp.is_absolute() {
                mp.to_path_buf()
            } else {
                qdir.join(mp)
            };
            let mask = crate::vision::load_image(&mask_path).map_err(|e| {
                Error::input(format!("sample {}: target mask: {e}", s.record.sample))
            })?;
            let on = metrics::mask_patches(
                &mask,
                (img.width, img.height),
                &engine.preprocess,
                cfg.vision.grid(),
            )
            .map_err(|e| {
                Error::input(format!(
                    "sample {}: target mask {}: {e}",
                    s.record.sample,
                    mask_path.display()
                ))
            })?;
            if on.iter().any(|&x| x) {
                with_target += 1;
                let incremental = || incremental_maps(&reference).map_err(ctx);
                let (exact, incr) = if baseline_method == "baseline-incremental" {
                    (
                        teacher(Method::Baseline {
                            mode: RowMode::Streamed,
                        })?,
                        s.baseline.clone(),
                    )
                } else {
                    (s.baseline.clone(), incremental()?)
                };
                let uniform = vec![vec![1.0f32; p]; s.ids.len()];
                let gc = gradcam_maps()?;
                for (name, maps) in [
                    ("fastrm", &s.fastrm),
                    ("baseline", &exact),
                    ("baseline-incremental", &incr),
                    ("gradcam", &gc),
                    ("random", &uniform),
                ] {
                    let e = points.entry(name).or_default();
                    for &t in &answer_tok {
                        let (hit, mass) = metrics::pointing(&maps[t], &on);
                        e.hits += hit;
                        e.masses.push(mass);
                    }
                }
            } else {
                empty_targets += 1;
            }
        }
        per_sample.push(json!({
            "sample": s.record.sample,
            "question_id": s.record.question_id,
            "answer": s.record.answer,
            "correct": if has_answers { json!(ok0) } else { Value::Null },
            "mean_entropy": conf.mean_entropy,
            "tokens": s.ids.len(),
        }));
    }
    progress.clear();

    // 3. Entropy confidence.
    let cal = metrics::calibrate(&entropies, &correct);
    let has_gt = acc_all.1 > 0;
    let cal_note = match (cal.correct.is_empty(), cal.incorrect.is_empty()) {
        _ if !has_gt => Some(
            "no question has ground-truth answers: correctness is unknown, no threshold can be \
             calibrated",
        ),
        (_, true) => Some("every answer is correct: no threshold can be calibrated"),
        (true, _) => Some("every answer is wrong: no threshold can be calibrated"),
        _ => None,
    };
    let mut written = false;
    if args.write_threshold {
        match cal.threshold {
            Some(t) => {
                head_w.cfg.confidence_threshold = Some(t as f32);
                head_w.save(&args.head)?;
                written = true;
            }
            None => eprintln!(
                "note: {}; {} left unchanged",
                cal_note.unwrap_or("no threshold"),
                args.head.display()
            ),
        }
    }

    // The report.
    let fractions: Vec<f64> = schedule.iter().map(|&(f, _)| f).collect();
    let n = samples.len() as f64;
    let classification: Vec<Value> = counts
        .iter()
        .zip(&metrics::THRESHOLDS)
        .map(|(c, &t)| {
            json!({
                "threshold": t, "accuracy": c.accuracy(), "precision": c.precision(),
                "recall": c.recall(), "f1": c.f1(),
                "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn_,
            })
        })
        .collect();
    let mut curve_values: Vec<(&str, [Vec<f64>; 2])> = Vec::new();
    let perturbation = if args.no_perturbation {
        Value::Null
    } else {
        let mut methods = serde_json::Map::new();
        for &m in &PERTURB_METHODS {
            let div = if m == "random" {
                n * RANDOM_SEEDS as f64
            } else {
                n
            };
            let c = &curves[m];
            let acc = [
                c[0].iter().map(|v| v / div).collect::<Vec<f64>>(),
                c[1].iter().map(|v| v / div).collect::<Vec<f64>>(),
            ];
            methods.insert(
                m.to_string(),
                json!({
                    "positive": {"accuracy": acc[0], "auc": metrics::trapezoid_auc(&fractions, &acc[0])},
                    "negative": {"accuracy": acc[1], "auc": metrics::trapezoid_auc(&fractions, &acc[1])},
                }),
            );
            curve_values.push((m, acc));
        }
        json!({
            "fractions": fractions,
            "removed_patches": schedule.iter().map(|&(_, k)| k).collect::<Vec<_>>(),
            "random_seeds": RANDOM_SEEDS,
            "gradcam_layer": gradcam_layer,
            "correct_means": "matches a ground-truth answer, or equals the unperturbed answer where the question has none",
            "methods": Value::Object(methods),
        })
    };
    let side = |xs: &[f64], mean: Option<f64>, h: f64| json!({"count": xs.len(), "mean_entropy": mean, "bandwidth": h});
    let c = cal.counts;
    let confidence = json!({
        "bandwidth_rule": "scott",
        "correct_means": "matches a ground-truth answer (questions without `answers` are left out)",
        "correct": side(&cal.correct, cal.mean_correct, cal.bandwidth_correct),
        "incorrect": side(&cal.incorrect, cal.mean_incorrect, cal.bandwidth_incorrect),
        "threshold": cal.threshold,
        "note": cal_note,
        "below": {"tp": c.tp, "fp": c.fp,
                  "tp_rate": cal.threshold.map(|_| frac(c.tp, c.tp + c.fp))},
        "above": {"fn": c.fn_, "tn": c.tn,
                  "tn_rate": cal.threshold.map(|_| frac(c.tn, c.tn + c.fn_))},
        "written_to_head": written,
    });
    let pointing = if with_target + empty_targets == 0 {
        Value::Null
    } else {
        let mut methods = serde_json::Map::new();
        for &m in &POINT_METHODS {
            let e = points.get(m).cloned().unwrap_or_default();
            let n = e.masses.len();
            let mass: f64 = e.masses.iter().sum();
            methods.insert(
                m.to_string(),
                json!({"hit_rate": (n > 0).then(|| e.hits / n as f64),
                       "mask_mass": (n > 0).then(|| mass / n as f64), "tokens": n}),
            );
        }
        json!({
            "samples": with_target,
            "empty_targets": empty_targets,
            "random": "expected value of a uniformly random map (the target's share of the patches)",
            "methods": Value::Object(methods),
        })
    };
    let acc = |t: (usize, usize)| -> Value {
        json!({"accuracy": (t.1 > 0).then(|| t.0 as f64 / t.1 as f64), "correct": t.0, "samples": t.1})
    };
    let accuracy = if has_gt {
        json!({
            "overall": acc(acc_all),
            "by_type": acc_type.iter().map(|(k, &v)| (k.clone(), acc(v))).collect::<serde_json::Map<_, _>>(),
            "multi_object": acc(acc_multi),
        })
    } else {
        Value::Null
    };
    let doc = json!({
        "data": args.data.display().to_string(),
        "model": args.model.display().to_string(),
        "head": args.head.display().to_string(),
        "baseline_method": baseline_method,
        "samples": samples.len(),
        "tokens": n_tokens,
        "n_patches": p,
        "grid": manifest.grid,
        "label_threshold": tau,
        "classification": classification,
        "perturbation": perturbation,
        "confidence": confidence,
        "pointing": pointing,
        "accuracy": accuracy,
        "per_sample": per_sample,
        "generations": generations,
        "seconds": t0.elapsed().as_secs_f64(),
    });

    if let Some(st) = staging {
        let mut names = vec![CLASSIFICATION_PNG, ENTROPY_PNG];
        write_png(&st.path(CLASSIFICATION_PNG), &classification_plot(&counts)?)?;
        write_png(&st.path(ENTROPY_PNG), &entropy_plot(&cal)?)?;
        if !curve_values.is_empty() {
            for (dir, name) in [(0, POSITIVE_PNG), (1, NEGATIVE_PNG)] {
                write_png(
                    &st.path(name),
                    &perturbation_plot(&fractions, &curve_values, dir)?,
                )?;
                names.push(name);
            }
        }
        if points.values().any(|e| !e.masses.is_empty()) {
            write_png(&st.path(POINTING_PNG), &pointing_plot(&points)?)?;
            names.push(POINTING_PNG);
        }
        let text =
            serde_json::to_string_pretty(&doc).map_err(|e| Error::input(format!("JSON: {e}")))?;
        std::fs::write(st.path(JSON_FILE), text).map_err(|e| Error::io(st.path(JSON_FILE), e))?;
        names.push(JSON_FILE);
        st.commit(&names)?;
    }
    if args.json {
        println!("{doc}");
    } else {
        print_report(&doc);
    }
    Ok(())
}

fn frac(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

fn classification_plot(counts: &[Counts]) -> Result<crate::vision::RgbImage> {
    let ts = metrics::THRESHOLDS;
    let series = |i: usize, name: &str, f: &dyn Fn(&Counts) -> f64| Series {
        name: name.into(),
        color: PALETTE[i],
        points: ts
            .iter()
            .zip(counts)
            .map(|(&t, c)| (t as f64, f(c)))
            .collect(),
        markers: true,
    };
    let mut plot = LinePlot::new(
        "FastRM vs binarised baseline",
        fixed(Axis::linear("classification threshold"), 0.1, 0.9),
        fixed(Axis::linear("score"), 0.0, 1.0),
    );
    plot.series = vec![
        series(0, "accuracy", &|c| c.accuracy()),
        series(1, "precision", &|c| c.precision()),
        series(2, "recall", &|c| c.recall()),
        series(3, "F1", &|c| c.f1()),
    ];
    line_plot(&plot)
}

fn fixed(axis: Axis, lo: f64, hi: f64) -> Axis {
    Axis {
        range: Some((lo, hi)),
        ..axis
    }
}

fn perturbation_plot(
    fractions: &[f64],
    curves: &[(&str, [Vec<f64>; 2])],
    dir: usize,
) -> Result<crate::vision::RgbImage> {
    let mut plot = LinePlot::new(
        if dir == 0 {
            "positive perturbation (most relevant removed first)"
        } else {
            "negative perturbation (least relevant removed first)"
        },
        fixed(Axis::linear("fraction of image patches removed"), 0.0, 1.0),
        fixed(Axis::linear("accuracy"), 0.0, 1.0),
    );
    plot.series = curves
        .iter()
        .enumerate()
        .map(|(i, (name, acc))| {
            let auc = metrics::trapezoid_auc(fractions, &acc[dir]);
            Series {
                name: format!("{name} (AUC {auc:.3})"),
                color: PALETTE[i % PALETTE.len()],
                points: fractions
                    .iter()
                    .copied()
                    .zip(acc[dir].iter().copied())
                    .collect(),
                markers: false,
            }
        })
        .collect();
    line_plot(&plot)
}

/// Share of answer tokens whose map puts at least x of its mass on the target, per method (the
/// hit rate and mean mass in the legend).
fn pointing_plot(points: &HashMap<&str, PointSums>) -> Result<crate::vision::RgbImage> {
    let xs: Vec<f64> = (0..=100).map(|i| i as f64 / 100.0).collect();
    let mut plot = LinePlot::new(
        "pointing game: map mass on the target object",
        fixed(
            Axis::linear("share of the map's mass on the target, at least"),
            0.0,
            1.0,
        ),
        fixed(Axis::linear("share of answer tokens"), 0.0, 1.0),
    );
    plot.series = POINT_METHODS
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let e = points.get(m).filter(|e| !e.masses.is_empty())?;
            let n = e.masses.len() as f64;
            let mean = e.masses.iter().sum::<f64>() / n;
            Some(Series {
                name: format!("{m} (hit {:.3}, mass {mean:.3})", e.hits / n),
                color: PALETTE[i % PALETTE.len()],
                points: xs
                    .iter()
                    .copied()
                    .zip(metrics::at_least(&e.masses, &xs))
                    .collect(),
                markers: false,
            })
        })
        .collect();
    line_plot(&plot)
}

fn entropy_plot(cal: &metrics::Calibration) -> Result<crate::vision::RgbImage> {
    const N: usize = 400;
    // The x range: the data ± 3 bandwidths, within [0, 1] (entropies are normalised).
    let all = cal.correct.iter().chain(&cal.incorrect);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
        (a.min(x), b.max(x))
    });
    let h = cal.bandwidth_correct.max(cal.bandwidth_incorrect);
    let (lo, hi) = if lo.is_finite() {
        ((lo - 3.0 * h).max(0.0), (hi + 3.0 * h).min(1.0))
    } else {
        (0.0, 1.0)
    };
    let (lo, hi) = if hi - lo < 1e-6 { (0.0, 1.0) } else { (lo, hi) };
    let curve = |xs: &[f64], h: f64| -> Vec<(f64, f64)> {
        (0..=N)
            .map(|i| {
                let x = lo + (hi - lo) * i as f64 / N as f64;
                (x, metrics::kde(xs, h, x))
            })
            .collect()
    };
    let mut series = Vec::new();
    if !cal.correct.is_empty() {
        series.push(Series {
            name: format!("correct ({})", cal.correct.len()),
            color: PALETTE[2],
            points: curve(&cal.correct, cal.bandwidth_correct),
            markers: false,
        });
    }
    if !cal.incorrect.is_empty() {
        series.push(Series {
            name: format!("incorrect ({})", cal.incorrect.len()),
            color: PALETTE[3],
            points: curve(&cal.incorrect, cal.bandwidth_incorrect),
            markers: false,
        });
    }
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1e-9, f64::max);
    let mut plot = LinePlot::new(
        "mean map entropy per answer (Gaussian KDE, Scott)",
        fixed(Axis::linear("normalised entropy"), lo, hi),
        fixed(Axis::linear("density"), 0.0, ymax * 1.08),
    );
    plot.series = series;
    plot.markers = cal
        .threshold
        .map(|t| Marker {
            x: t,
            label: format!("threshold {t:.3}"),
            color: [200, 0, 0],
        })
        .into_iter()
        .collect();
    line_plot(&plot)
}

/// The human-readable report.
fn print_report(doc: &Value) {
    let f = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.4}"));
    println!(
        "{} samples, {} tokens, {} patches; label threshold {}",
        doc["samples"],
        doc["tokens"],
        doc["n_patches"],
        f(&doc["label_threshold"])
    );
    println!(
        "\nFastRM vs binarised {} map",
        doc["baseline_method"].as_str().unwrap_or("")
    );
    println!(
        "{:>9} {:>9} {:>9} {:>9} {:>9}",
        "threshold", "accuracy", "precision", "recall", "F1"
    );
    for r in doc["classification"].as_array().into_iter().flatten() {
        println!(
            "{:>9} {:>9} {:>9} {:>9} {:>9}",
            f(&r["threshold"]).trim_end_matches('0'),
            f(&r["accuracy"]),
            f(&r["precision"]),
            f(&r["recall"]),
            f(&r["f1"])
        );
    }
    if let Some(m) = doc["perturbation"]["methods"].as_object() {
        println!("\nPerturbation AUC (positive: lower is better; negative: higher is better)");
        println!("{:<22} {:>9} {:>9}", "method", "positive", "negative");
        for (name, v) in m {
            println!(
                "{:<22} {:>9} {:>9}",
                name,
                f(&v["positive"]["auc"]),
                f(&v["negative"]["auc"])
            );
        }
    }
    let c = &doc["confidence"];
    println!("\nEntropy confidence (Gaussian KDE, Scott's bandwidth)");
    println!(
        "correct: {} answers, mean {}; incorrect: {} answers, mean {}",
        c["correct"]["count"],
        f(&c["correct"]["mean_entropy"]),
        c["incorrect"]["count"],
        f(&c["incorrect"]["mean_entropy"])
    );
    match c["threshold"].as_f64() {
        Some(t) => println!(
            "threshold {t:.4}: below TP {} FP {}, above FN {} TN {}{}",
            c["below"]["tp"],
            c["below"]["fp"],
            c["above"]["fn"],
            c["above"]["tn"],
            if c["written_to_head"] == json!(true) {
                " (written to the head)"
            } else {
                ""
            }
        ),
        None => println!("{}", c["note"].as_str().unwrap_or("no threshold")),
    }
    if let Some(m) = doc["pointing"]["methods"].as_object() {
        println!(
            "\nPointing game ({} samples with a target)",
            doc["pointing"]["samples"]
        );
        println!(
            "{:<22} {:>9} {:>9} {:>7}",
            "method", "hit rate", "mass", "tokens"
        );
        for (name, v) in m {
            println!(
                "{:<22} {:>9} {:>9} {:>7}",
                name,
                f(&v["hit_rate"]),
                f(&v["mask_mass"]),
                v["tokens"]
            );
        }
    }
    if let Some(a) = doc["accuracy"].as_object() {
        println!("\nModel accuracy: {}", f(&a["overall"]["accuracy"]));
        if let Some(t) = a["by_type"].as_object() {
            for (k, v) in t {
                println!("  {k}: {} ({} samples)", f(&v["accuracy"]), v["samples"]);
            }
        }
        println!(
            "  multi-object scenes: {} ({} samples)",
            f(&a["multi_object"]["accuracy"]),
            a["multi_object"]["samples"]
        );
    }
}
