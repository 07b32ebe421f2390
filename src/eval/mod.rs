//! `fastrm eval`: how good a FastRM head is, on a distilled data set.
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
use crate::distill::{dataset, Entry, Manifest, SampleRecord};
use crate::engine::report::Staging;
use crate::engine::{
    AnyEngine, Device, Dtype, EncodedImage, Engine, GenerateOptions, Method, Mode, Session,
};
use crate::error::{Error, Result};
use crate::explain::fastrm::{FastRmHead, HeadWeights};
use crate::explain::{
    default_gradcam_layer, gradient_map, incremental_maps, map_entropy, Confidence, RowMode,
};
use crate::render::plot::{line_plot, Axis, LinePlot, Marker, Series, PALETTE};
use crate::render::write_png;
use crate::status;
use metrics::Counts;

pub const JSON_FILE: &str = "eval.json";
pub const CLASSIFICATION_PNG: &str = "classification.png";
pub const POSITIVE_PNG: &str = "perturbation_positive.png";
pub const NEGATIVE_PNG: &str = "perturbation_negative.png";
pub const ENTROPY_PNG: &str = "entropy_kde.png";
pub const POINTING_PNG: &str = "pointing.png";
/// Random removal orders averaged per curve.
pub const RANDOM_SEEDS: u64 = 5;

/// What `eval` is asked for (the `fastrm eval` flags, as values; errors name the flags).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Model folder the data set was distilled with.
    pub model: PathBuf,
    /// The FastRM head file.
    pub head: PathBuf,
    /// A `distill` output folder.
    pub data: PathBuf,
    /// Where eval.json and the plots go.
    pub out: Option<PathBuf>,
    /// The report as one JSON object on stdout instead of tables.
    pub json: bool,
    /// The question file, when it is no longer where the manifest says (the same file).
    pub questions: Option<PathBuf>,
    /// The images folder, when it is no longer where the manifest says.
    pub images: Option<PathBuf>,
    pub limit: Option<usize>,
    /// Skip the perturbation curves.
    pub no_perturbation: bool,
    /// Store the calibrated entropy threshold in the head file.
    pub write_threshold: bool,
    /// GradCAM's decoder layer (default: the middle one).
    pub layer: Option<usize>,
    pub device: Device,
    pub dtype: Option<Dtype>,
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
fn sample_bar(start: Instant, done: usize, total: usize, step: &str) {
    let t = start.elapsed().as_secs_f64();
    let eta = status::eta(t, done, total - done);
    status::say(&format!(
        "samples [{}] {done}/{total} {eta} · {step}",
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
pub fn run(args: EvalOptions) -> Result<()> {
    let t0 = Instant::now();
    if args.limit == Some(0) {
        return Err(Error::input("--limit must be at least 1"));
    }
    let (device, dtype) = (args.device, args.dtype);
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
    status::say(&format!("loading {}", args.model.display()));
    let engine = AnyEngine::load(device, dtype, &args.model)?;
    crate::with_engine!(&engine, |e| run_on(
        e, &args, &manifest, head_w, staging, t0
    ))
}

/// Everything after the model is loaded, on its backend: the sections in turn, then the report.
fn run_on<B: Backend>(
    engine: &Engine<B>,
    args: &EvalOptions,
    manifest: &Manifest,
    mut head_w: HeadWeights,
    staging: Option<Staging>,
    t0: Instant,
) -> Result<()> {
    status::say("reading the data set");
    let samples = load_samples(engine, &head_w, manifest, &args.data, args.limit)?;
    let n_tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    let counts = classify(&samples, head_w.cfg.label_threshold);

    let setup = Setup::new(engine, args, manifest)?;
    let p = manifest.n_patches;
    let mut accuracy = Accuracy::default();
    let (mut entropies, mut correct) = (Vec::new(), Vec::new());
    let mut perturbation = (!args.no_perturbation).then(|| Perturbation::new(&setup.schedule));
    let mut pointing = Pointing::default();
    let mut per_sample: Vec<Value> = Vec::new();
    let mut generations = 0usize;
    let total = samples.len();
    for (k, s) in samples.iter().enumerate() {
        let bar = |step: &str| sample_bar(t0, k, total, step);
        bar("answer");
        let mut w = SampleRun::start(&setup, s)?;
        accuracy.add(w.entry, w.ok0, w.has_answers);
        let conf = w.confidence();
        // Only answers with ground truth can be right or wrong.
        if w.has_answers {
            entropies.push(conf.mean_entropy as f64);
            correct.push(w.ok0);
        }
        if let Some(pert) = perturbation.as_mut() {
            pert.add(&mut w, p, &bar)?;
        }
        pointing.add(&mut w, &bar)?;
        generations += w.generations;
        per_sample.push(json!({
            "sample": s.record.sample,
            "question_id": s.record.question_id,
            "answer": s.record.answer,
            "correct": if w.has_answers { json!(w.ok0) } else { Value::Null },
            "mean_entropy": conf.mean_entropy,
            "tokens": s.ids.len(),
        }));
    }
    status::clear();

    let cal = metrics::calibrate(&entropies, &correct);
    let cal_note = calibration_note(&cal, accuracy.all.1 > 0);
    let mut written = false;
    if args.write_threshold {
        match cal.threshold {
            Some(t) => {
                head_w.cfg.confidence_threshold = Some(t as f32);
                head_w.save(&args.head)?;
                written = true;
            }
            None => crate::status::note(&format!(
                "note: {}; {} left unchanged",
                cal_note.unwrap_or("no threshold"),
                args.head.display()
            )),
        }
    }

    let (perturbation_json, curves) = match &perturbation {
        Some(pert) => {
            let (v, c) = pert.report(samples.len(), &setup.schedule, setup.gradcam_layer);
            (v, c)
        }
        None => (Value::Null, Vec::new()),
    };
    let doc = json!({
        "data": args.data.display().to_string(),
        "model": args.model.display().to_string(),
        "head": args.head.display().to_string(),
        "baseline_method": manifest.method,
        "samples": samples.len(),
        "tokens": n_tokens,
        "n_patches": p,
        "grid": manifest.grid,
        "label_threshold": head_w.cfg.label_threshold,
        "classification": classification_json(&counts),
        "perturbation": perturbation_json,
        "confidence": calibration_json(&cal, cal_note, written),
        "pointing": pointing.report(),
        "accuracy": accuracy.report(),
        "per_sample": per_sample,
        "generations": generations,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if let Some(st) = staging {
        write_report(st, &doc, &counts, &cal, &setup.schedule, &curves, &pointing)?;
    }
    if args.json {
        crate::status::out(&format!("{doc}"))?;
    } else {
        print_report(&doc)?;
    }
    Ok(())
}

/// The data set's samples (the first `limit`), each with the head's maps of its tokens.
fn load_samples<B: Backend>(
    engine: &Engine<B>,
    head_w: &HeadWeights,
    manifest: &Manifest,
    data: &Path,
    limit: Option<usize>,
) -> Result<Vec<Sample>> {
    let b = engine.backend();
    let head = FastRmHead::new(b, head_w, manifest.hidden_size)?;
    let (p, d) = (manifest.n_patches, manifest.hidden_size);
    let mut samples: Vec<Sample> = Vec::new();
    'shards: for info in &manifest.shards {
        let shard = manifest.open_shard(data, info)?;
        for (si, record) in shard.samples.iter().enumerate() {
            if limit.is_some_and(|l| samples.len() >= l) {
                break 'shards;
            }
            let rows = shard.rows(si);
            let img = b.upload(&shard.image_hidden(si)?, p, d)?;
            let folded = head.fold(b, &img)?;
            let hidden: Vec<f32> = rows
                .iter()
                .flat_map(|&r| shard.token_hidden(r))
                .copied()
                .collect();
            let fastrm = if rows.is_empty() {
                Vec::new()
            } else {
                let scores =
                    b.download(&head.scores(b, &folded, &b.upload(&hidden, rows.len(), d)?)?)?;
                scores.chunks_exact(p).map(|c| c.to_vec()).collect()
            };
            samples.push(Sample {
                record: record.clone(),
                // The shard's check makes these the record's answer.
                ids: record.generated_ids.clone(),
                baseline: rows.iter().map(|&r| shard.token_map(r).to_vec()).collect(),
                fastrm,
            });
        }
    }
    if samples.iter().all(|s| s.ids.is_empty()) {
        return Err(Error::input(format!(
            "data set {} has no tokens",
            data.display()
        )));
    }
    Ok(samples)
}

/// Step 1, classification: confusion counts of the head's probabilities against the binarised
/// baseline maps (labels at `tau`·max), at every threshold of [`metrics::THRESHOLDS`].
fn classify(samples: &[Sample], tau: f32) -> [Counts; metrics::THRESHOLDS.len()] {
    let mut counts = [Counts::default(); metrics::THRESHOLDS.len()];
    for s in samples {
        for (probs, map) in s.fastrm.iter().zip(&s.baseline) {
            let labels = crate::train::labels(map, tau);
            for (c, &t) in counts.iter_mut().zip(&metrics::THRESHOLDS) {
                metrics::classify_into(c, probs, &labels, t);
            }
        }
    }
    counts
}

fn classification_json(counts: &[Counts]) -> Vec<Value> {
    counts
        .iter()
        .zip(&metrics::THRESHOLDS)
        .map(|(c, &t)| {
            json!({
                "threshold": t, "accuracy": c.accuracy(), "precision": c.precision(),
                "recall": c.recall(), "f1": c.f1(),
                "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn_,
            })
        })
        .collect()
}

/// What the sections that run the model share: the question file, where images are, the
/// generation options the data set was made with.
struct Setup<'e, B: Backend> {
    engine: &'e Engine<B>,
    manifest: &'e Manifest,
    questions: dataset::Dataset,
    qpath: PathBuf,
    qdir: PathBuf,
    images_dir: PathBuf,
    /// Look up the recorded image path first (it is where distill found it).
    images_given: bool,
    opts: GenerateOptions,
    gradcam_layer: usize,
    schedule: Vec<(f64, usize)>,
}

impl<'e, B: Backend> Setup<'e, B> {
    fn new(engine: &'e Engine<B>, args: &EvalOptions, manifest: &'e Manifest) -> Result<Self> {
        let cfg = engine.config();
        let (p, d) = (manifest.n_patches, manifest.hidden_size);
        if (cfg.text.hidden_size, cfg.vision.num_patches()) != (d, p) {
            return Err(Error::input(format!(
                "--model {} has hidden size {} and {} patches; the data set was made with {d} and {p}",
                args.model.display(),
                cfg.text.hidden_size,
                cfg.vision.num_patches()
            )));
        }
        if engine.text().is_none() {
            return Err(Error::input("the model has no tokenizer"));
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
        let layers = cfg.text.num_hidden_layers;
        let gradcam_layer = args.layer.unwrap_or_else(|| default_gradcam_layer(layers));
        if gradcam_layer >= layers {
            return Err(Error::input(format!(
                "--layer {gradcam_layer} does not exist: the decoder has layers 0..{}",
                layers - 1
            )));
        }
        Ok(Setup {
            engine,
            manifest,
            qdir: qpath
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            qpath,
            questions,
            images_dir: args
                .images
                .clone()
                .unwrap_or_else(|| PathBuf::from(&manifest.images)),
            images_given: args.images.is_some(),
            opts: GenerateOptions {
                max_new_tokens: manifest.max_new_tokens,
                stop_at_eos: manifest.stop_at_eos,
                keep_steps: false,
            },
            gradcam_layer,
            schedule: metrics::removal_schedule(p, metrics::PERTURBATION_STEPS),
        })
    }
}

/// One sample worked on with the model: its question, image and prompt, and one saving run that
/// answers the question again (checked against the data set) and serves every gradient map.
struct SampleRun<'s, 'e, B: Backend> {
    setup: &'s Setup<'e, B>,
    sample: &'s Sample,
    entry: &'s Entry,
    image_path: PathBuf,
    /// Width and height of the image file (the target masks are drawn at its size).
    image_size: (usize, usize),
    features: EncodedImage<B>,
    reference: Session<'e, B>,
    ok0: bool,
    has_answers: bool,
    gradcam: Option<Vec<Vec<f32>>>,
    /// Generations run for this sample.
    generations: usize,
}

impl<'s, 'e, B: Backend> SampleRun<'s, 'e, B> {
    fn start(setup: &'s Setup<'e, B>, s: &'s Sample) -> Result<Self> {
        let engine = setup.engine;
        let entry = setup
            .questions
            .entries
            .get(s.record.sample)
            .ok_or_else(|| {
                Error::input(format!(
                    "sample {} is past the end of {} ({} questions)",
                    s.record.sample,
                    setup.qpath.display(),
                    setup.questions.entries.len()
                ))
            })?;
        let recorded = PathBuf::from(&s.record.image);
        let image_path = if !setup.images_given && recorded.is_file() {
            recorded
        } else {
            dataset::resolve_image(&setup.images_dir, entry)?
        };
        let ctx = |e: Error| sample_error(s, &image_path, e);
        let img = crate::vision::load_image(&image_path).map_err(ctx)?;
        let pixels = crate::vision::preprocess(&img, engine.preprocess()).map_err(ctx)?;
        let prompt = engine
            .prompt(&format!("{}{}", entry.question, setup.manifest.suffix))
            .map_err(ctx)?;
        let features = engine.encode(&pixels).map_err(ctx)?;
        let mut reference = engine
            .session(prompt, &features, &setup.opts, Mode::SaveAll)
            .map_err(ctx)?;
        reference.run_to_end().map_err(ctx)?;
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
        Ok(SampleRun {
            setup,
            sample: s,
            entry,
            image_size: (img.width, img.height),
            features,
            reference,
            ok0: metrics::answer_correct(&s.record.answer, answers, &s.record.answer),
            has_answers: answers.is_some_and(|a| !a.is_empty()),
            gradcam: None,
            generations: 1,
            image_path,
        })
    }

    fn ctx(&self, e: Error) -> Error {
        sample_error(self.sample, &self.image_path, e)
    }

    /// The answer's confidence from the head's maps.
    fn confidence(&self) -> Confidence {
        let s = self.sample;
        let entropies: Vec<f32> = s.fastrm.iter().map(|m| map_entropy(m)).collect();
        let eos = &self.setup.engine.config().eos_token_ids;
        Confidence::of_answer(&entropies, &s.ids, eos, None)
    }

    /// Maps of a gradient method the data set does not hold, by backwards over the saving run.
    fn maps(&self, method: Method) -> Result<Vec<Vec<f32>>> {
        (0..self.sample.ids.len())
            .map(|i| gradient_map(&self.reference, method, i))
            .collect::<Result<_>>()
            .map_err(|e| self.ctx(e))
    }

    fn gradcam_maps(&mut self) -> Result<Vec<Vec<f32>>> {
        if self.gradcam.is_none() {
            let layer = self.setup.gradcam_layer;
            self.gradcam = Some(self.maps(Method::GradCam { layer })?);
        }
        Ok(self.gradcam.clone().expect("just computed"))
    }

    /// Whether the answer is still correct with the image patches `removed` hidden from
    /// attention.
    fn correct_without(&mut self, removed: &[usize]) -> Result<bool> {
        if removed.is_empty() {
            return Ok(self.ok0);
        }
        let engine = self.setup.engine;
        let prompt = self.reference.prompt().clone();
        let mut keep = vec![true; prompt.len()];
        for &j in removed {
            keep[prompt.image_positions()[j]] = false;
        }
        let mut run = engine
            .session(prompt, &self.features, &self.setup.opts, Mode::Masked(keep))
            .map_err(|e| self.ctx(e))?;
        run.run_to_end().map_err(|e| self.ctx(e))?;
        self.generations += 1;
        let answer = engine.decode(run.generated())?;
        let s = self.sample;
        Ok(metrics::answer_correct(
            &answer,
            self.entry.answers.as_deref(),
            &s.record.answer,
        ))
    }
}

fn sample_error(s: &Sample, image: &Path, e: Error) -> Error {
    Error::input(format!(
        "sample {} ({}): {e}",
        s.record.sample,
        image.display()
    ))
}

/// Model accuracy over the samples with ground truth: overall, per question type, on
/// multi-object scenes (`(correct, samples)` each).
#[derive(Default)]
struct Accuracy {
    all: (usize, usize),
    by_type: std::collections::BTreeMap<String, (usize, usize)>,
    multi: (usize, usize),
}

impl Accuracy {
    fn add(&mut self, entry: &Entry, ok: bool, has_answers: bool) {
        if !has_answers {
            return;
        }
        let bump = |t: &mut (usize, usize)| {
            t.0 += ok as usize;
            t.1 += 1;
        };
        bump(&mut self.all);
        if let Some(t) = &entry.qtype {
            bump(self.by_type.entry(t.clone()).or_default());
        }
        if entry.n_objects.is_some_and(|n| n > 1) {
            bump(&mut self.multi);
        }
    }

    fn report(&self) -> Value {
        let acc = |t: (usize, usize)| -> Value {
            json!({"accuracy": (t.1 > 0).then(|| t.0 as f64 / t.1 as f64), "correct": t.0, "samples": t.1})
        };
        if self.all.1 == 0 {
            return Value::Null;
        }
        json!({
            "overall": acc(self.all),
            "by_type": self.by_type.iter().map(|(k, &v)| (k.clone(), acc(v))).collect::<serde_json::Map<_, _>>(),
            "multi_object": acc(self.multi),
        })
    }
}

/// Step 2, perturbation: per method, direction and step, the sum over samples of whether the answer
/// survived (random orders: summed over seeds too).
/// A method's accuracy curves under perturbation: (name, [positive, negative]).
type MethodCurves = (&'static str, [Vec<f64>; 2]);

struct Perturbation {
    curves: HashMap<&'static str, [Vec<f64>; 2]>,
}

impl Perturbation {
    fn new(schedule: &[(f64, usize)]) -> Self {
        let n = schedule.len();
        Perturbation {
            curves: PERTURB_METHODS
                .iter()
                .map(|&m| (m, [vec![0.0; n], vec![0.0; n]]))
                .collect(),
        }
    }

    fn add<B: Backend>(
        &mut self,
        w: &mut SampleRun<'_, '_, B>,
        p: usize,
        bar: &dyn Fn(&str),
    ) -> Result<()> {
        let s = w.sample;
        let answer_tok = s.answer_tokens(&w.setup.engine.config().eos_token_ids);
        let sel = |maps: &[Vec<f32>]| -> Vec<f64> {
            let picked: Vec<&[f32]> = answer_tok.iter().map(|&i| maps[i].as_slice()).collect();
            metrics::combine_maps(&picked)
        };
        bar("gradcam maps");
        let gc = w.gradcam_maps()?;
        let mut orders: Vec<(&'static str, Vec<usize>, Vec<usize>)> = vec![];
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
            // Negative removal with a random order is the reversed positive order: random either
            // way, and a different draw than the positive one.
            let o = metrics::random_order(p, seed.wrapping_mul(0x9E37) ^ s.record.sample as u64);
            let rev: Vec<usize> = o.iter().rev().copied().collect();
            orders.push(("random", o, rev));
        }
        // Results by removed set: 0% and 100% are shared by every order, and orders agree on many
        // prefixes.
        let mut cache: HashMap<Vec<usize>, bool> = HashMap::new();
        let n_orders = orders.len();
        let schedule = w.setup.schedule.clone();
        for (oi, (name, pos, neg)) in orders.iter().enumerate() {
            bar(&format!("perturbation {}/{n_orders} ({name})", oi + 1));
            for (dir, order) in [pos, neg].into_iter().enumerate() {
                for (si, &(_, n_removed)) in schedule.iter().enumerate() {
                    let mut removed: Vec<usize> = order[..n_removed].to_vec();
                    removed.sort_unstable();
                    let ok = match cache.get(&removed) {
                        Some(&ok) => ok,
                        None => {
                            let ok = w.correct_without(&removed)?;
                            cache.insert(removed, ok);
                            ok
                        }
                    };
                    self.curves.get_mut(name).expect("a known method")[dir][si] +=
                        if ok { 1.0 } else { 0.0 };
                }
            }
        }
        Ok(())
    }

    /// The section's JSON and its accuracy curves (per method: positive, negative).
    fn report(
        &self,
        n_samples: usize,
        schedule: &[(f64, usize)],
        gradcam_layer: usize,
    ) -> (Value, Vec<MethodCurves>) {
        let fractions: Vec<f64> = schedule.iter().map(|&(f, _)| f).collect();
        let n = n_samples as f64;
        let mut methods = serde_json::Map::new();
        let mut curves = Vec::new();
        for &m in &PERTURB_METHODS {
            let div = if m == "random" {
                n * RANDOM_SEEDS as f64
            } else {
                n
            };
            let c = &self.curves[m];
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
            curves.push((m, acc));
        }
        let doc = json!({
            "fractions": fractions,
            "removed_patches": schedule.iter().map(|&(_, k)| k).collect::<Vec<_>>(),
            "random_seeds": RANDOM_SEEDS,
            "gradcam_layer": gradcam_layer,
            "correct_means": "matches a ground-truth answer, or equals the unperturbed answer where the question has none",
            "methods": Value::Object(methods),
        });
        (doc, curves)
    }
}

/// Step 3, entropy confidence: why no threshold could be calibrated, when none could.
fn calibration_note(cal: &metrics::Calibration, has_ground_truth: bool) -> Option<&'static str> {
    match (cal.correct.is_empty(), cal.incorrect.is_empty()) {
        _ if !has_ground_truth => Some(
            "no question has ground-truth answers: correctness is unknown, no threshold can be \
             calibrated",
        ),
        (_, true) => Some("every answer is correct: no threshold can be calibrated"),
        (true, _) => Some("every answer is wrong: no threshold can be calibrated"),
        _ => None,
    }
}

fn calibration_json(cal: &metrics::Calibration, note: Option<&str>, written: bool) -> Value {
    let side = |xs: &[f64], mean: Option<f64>, h: f64| json!({"count": xs.len(), "mean_entropy": mean, "bandwidth": h});
    let c = cal.counts;
    json!({
        "bandwidth_rule": "scott",
        "correct_means": "matches a ground-truth answer (questions without `answers` are left out)",
        "correct": side(&cal.correct, cal.mean_correct, cal.bandwidth_correct),
        "incorrect": side(&cal.incorrect, cal.mean_incorrect, cal.bandwidth_incorrect),
        "threshold": cal.threshold,
        "note": note,
        "below": {"tp": c.tp, "fp": c.fp,
                  "tp_rate": cal.threshold.map(|_| frac(c.tp, c.tp + c.fp))},
        "above": {"fn": c.fn_, "tn": c.tn,
                  "tn_rate": cal.threshold.map(|_| frac(c.tn, c.tn + c.fn_))},
        "written_to_head": written,
    })
}

/// Step 4, pointing game, for samples whose question has a target mask.
#[derive(Default)]
struct Pointing {
    points: HashMap<&'static str, PointSums>,
    with_target: usize,
    empty_targets: usize,
}

impl Pointing {
    fn add<B: Backend>(&mut self, w: &mut SampleRun<'_, '_, B>, bar: &dyn Fn(&str)) -> Result<()> {
        let Some(mask_rel) = &w.entry.target_mask else {
            return Ok(());
        };
        bar("pointing game");
        let s = w.sample;
        let setup = w.setup;
        let mp = Path::new(mask_rel);
        let mask_path = if mp.is_absolute() {
            mp.to_path_buf()
        } else {
            setup.qdir.join(mp)
        };
        let mask = crate::vision::load_image(&mask_path)
            .map_err(|e| Error::input(format!("sample {}: target mask: {e}", s.record.sample)))?;
        let on = metrics::mask_patches(
            &mask,
            w.image_size,
            setup.engine.preprocess(),
            setup.engine.config().vision.grid(),
        )
        .map_err(|e| {
            Error::input(format!(
                "sample {}: target mask {}: {e}",
                s.record.sample,
                mask_path.display()
            ))
        })?;
        if !on.iter().any(|&x| x) {
            self.empty_targets += 1;
            return Ok(());
        }
        self.with_target += 1;
        let (exact, incr) = if setup.manifest.method == "baseline-incremental" {
            let mode = RowMode::Streamed;
            (w.maps(Method::Baseline { mode })?, s.baseline.clone())
        } else {
            let incr = incremental_maps(&w.reference).map_err(|e| w.ctx(e))?;
            (s.baseline.clone(), incr)
        };
        let uniform = vec![vec![1.0f32; setup.manifest.n_patches]; s.ids.len()];
        let gc = w.gradcam_maps()?;
        let answer_tok = s.answer_tokens(&setup.engine.config().eos_token_ids);
        for (name, maps) in [
            ("fastrm", &s.fastrm),
            ("baseline", &exact),
            ("baseline-incremental", &incr),
            ("gradcam", &gc),
            ("random", &uniform),
        ] {
            let e = self.points.entry(name).or_default();
            for &t in &answer_tok {
                let (hit, mass) = metrics::pointing(&maps[t], &on);
                e.hits += hit;
                e.masses.push(mass);
            }
        }
        Ok(())
    }

    fn report(&self) -> Value {
        if self.with_target + self.empty_targets == 0 {
            return Value::Null;
        }
        let mut methods = serde_json::Map::new();
        for &m in &POINT_METHODS {
            let e = self.points.get(m).cloned().unwrap_or_default();
            let n = e.masses.len();
            let mass: f64 = e.masses.iter().sum();
            methods.insert(
                m.to_string(),
                json!({"hit_rate": (n > 0).then(|| e.hits / n as f64),
                       "mask_mass": (n > 0).then(|| mass / n as f64), "tokens": n}),
            );
        }
        json!({
            "samples": self.with_target,
            "empty_targets": self.empty_targets,
            "random": "expected value of a uniformly random map (the target's share of the patches)",
            "methods": Value::Object(methods),
        })
    }
}

/// Step 5, the report's files: eval.json and the plots, moved into `--out` together.
fn write_report(
    st: Staging,
    doc: &Value,
    counts: &[Counts],
    cal: &metrics::Calibration,
    schedule: &[(f64, usize)],
    curves: &[(&str, [Vec<f64>; 2])],
    pointing: &Pointing,
) -> Result<()> {
    let mut names = vec![CLASSIFICATION_PNG, ENTROPY_PNG];
    write_png(&st.path(CLASSIFICATION_PNG), &classification_plot(counts)?)?;
    write_png(&st.path(ENTROPY_PNG), &entropy_plot(cal)?)?;
    if !curves.is_empty() {
        let fractions: Vec<f64> = schedule.iter().map(|&(f, _)| f).collect();
        for (dir, name) in [(0, POSITIVE_PNG), (1, NEGATIVE_PNG)] {
            write_png(&st.path(name), &perturbation_plot(&fractions, curves, dir)?)?;
            names.push(name);
        }
    }
    if pointing.points.values().any(|e| !e.masses.is_empty()) {
        write_png(&st.path(POINTING_PNG), &pointing_plot(&pointing.points)?)?;
        names.push(POINTING_PNG);
    }
    let text = serde_json::to_string_pretty(doc).map_err(|e| Error::input(format!("JSON: {e}")))?;
    std::fs::write(st.path(JSON_FILE), text).map_err(|e| Error::io(st.path(JSON_FILE), e))?;
    names.push(JSON_FILE);
    st.commit(&names).map(|_| ())
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
    let groups = [
        ("correct", &cal.correct, cal.bandwidth_correct, PALETTE[2]),
        (
            "incorrect",
            &cal.incorrect,
            cal.bandwidth_incorrect,
            PALETTE[3],
        ),
    ];
    let series: Vec<Series> = groups
        .into_iter()
        .filter(|(_, xs, _, _)| !xs.is_empty())
        .map(|(name, xs, bw, color)| Series {
            name: format!("{name} ({})", xs.len()),
            color,
            points: curve(xs, bw),
            markers: false,
        })
        .collect();
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
fn print_report(doc: &Value) -> Result<()> {
    let f = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.4}"));
    crate::status::out(&format!(
        "{} samples, {} tokens, {} patches; label threshold {}",
        doc["samples"],
        doc["tokens"],
        doc["n_patches"],
        f(&doc["label_threshold"])
    ))?;
    crate::status::out(&format!(
        "\nFastRM vs binarised {} map",
        doc["baseline_method"].as_str().unwrap_or("")
    ))?;
    crate::status::out(&format!(
        "{:>9} {:>9} {:>9} {:>9} {:>9}",
        "threshold", "accuracy", "precision", "recall", "F1"
    ))?;
    for r in doc["classification"].as_array().into_iter().flatten() {
        crate::status::out(&format!(
            "{:>9} {:>9} {:>9} {:>9} {:>9}",
            f(&r["threshold"]).trim_end_matches('0'),
            f(&r["accuracy"]),
            f(&r["precision"]),
            f(&r["recall"]),
            f(&r["f1"])
        ))?;
    }
    if let Some(m) = doc["perturbation"]["methods"].as_object() {
        crate::status::out(
            "\nPerturbation AUC (positive: lower is better; negative: higher is better)",
        )?;
        crate::status::out(&format!(
            "{:<22} {:>9} {:>9}",
            "method", "positive", "negative"
        ))?;
        for (name, v) in m {
            crate::status::out(&format!(
                "{:<22} {:>9} {:>9}",
                name,
                f(&v["positive"]["auc"]),
                f(&v["negative"]["auc"])
            ))?;
        }
    }
    let c = &doc["confidence"];
    crate::status::out("\nEntropy confidence (Gaussian KDE, Scott's bandwidth)")?;
    crate::status::out(&format!(
        "correct: {} answers, mean {}; incorrect: {} answers, mean {}",
        c["correct"]["count"],
        f(&c["correct"]["mean_entropy"]),
        c["incorrect"]["count"],
        f(&c["incorrect"]["mean_entropy"])
    ))?;
    match c["threshold"].as_f64() {
        Some(t) => crate::status::out(&format!(
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
        ))?,
        None => crate::status::out(c["note"].as_str().unwrap_or("no threshold"))?,
    }
    if let Some(m) = doc["pointing"]["methods"].as_object() {
        crate::status::out(&format!(
            "\nPointing game ({} samples with a target)",
            doc["pointing"]["samples"]
        ))?;
        crate::status::out(&format!(
            "{:<22} {:>9} {:>9} {:>7}",
            "method", "hit rate", "mass", "tokens"
        ))?;
        for (name, v) in m {
            crate::status::out(&format!(
                "{:<22} {:>9} {:>9} {:>7}",
                name,
                f(&v["hit_rate"]),
                f(&v["mask_mass"]),
                v["tokens"]
            ))?;
        }
    }
    if let Some(a) = doc["accuracy"].as_object() {
        crate::status::out(&format!(
            "\nModel accuracy: {}",
            f(&a["overall"]["accuracy"])
        ))?;
        if let Some(t) = a["by_type"].as_object() {
            for (k, v) in t {
                crate::status::out(&format!(
                    "  {k}: {} ({} samples)",
                    f(&v["accuracy"]),
                    v["samples"]
                ))?;
            }
        }
        crate::status::out(&format!(
            "  multi-object scenes: {} ({} samples)",
            f(&a["multi_object"]["accuracy"]),
            a["multi_object"]["samples"]
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(baseline: Vec<Vec<f32>>, fastrm: Vec<Vec<f32>>) -> Sample {
        let ids = vec![5; baseline.len()];
        Sample {
            record: SampleRecord {
                sample: 0,
                question_id: 0,
                question: String::new(),
                image: String::new(),
                answer: String::new(),
                answers: None,
                generated_ids: ids.clone(),
                stop_reason: "eos".into(),
                qtype: None,
                n_objects: None,
                target_mask: None,
            },
            ids,
            baseline,
            fastrm,
        }
    }

    #[test]
    fn classification_section_counts_every_token_and_patch() {
        // Labels at 0.3·max: [1, 0, 1, 0]; probabilities at threshold 0.5 → [1, 1, 0, 0].
        let s = sample(
            vec![vec![1.0, 0.1, 0.5, 0.0]],
            vec![vec![0.9, 0.6, 0.2, 0.1]],
        );
        let counts = classify(&[s], 0.3);
        let at_half = metrics::THRESHOLDS.iter().position(|&t| t == 0.5).unwrap();
        let c = counts[at_half];
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (1, 1, 1, 1));
        let json = classification_json(&counts);
        assert_eq!(json.len(), metrics::THRESHOLDS.len());
        assert_eq!(json[at_half]["f1"], json!(0.5));
    }

    #[test]
    fn accuracy_section_counts_only_answers_with_ground_truth() {
        let entry = |qtype: &str, n: u64| Entry {
            id: 0,
            image: dataset::ImageRef::Path(String::new()),
            question: String::new(),
            answers: None,
            qtype: Some(qtype.into()),
            n_objects: Some(n),
            target_mask: None,
        };
        let mut a = Accuracy::default();
        assert_eq!(a.report(), Value::Null);
        a.add(&entry("colour", 1), true, true);
        a.add(&entry("colour", 3), false, true);
        a.add(&entry("shape", 2), true, true);
        a.add(&entry("shape", 2), false, false);
        let r = a.report();
        assert_eq!(r["overall"]["samples"], json!(3));
        assert_eq!(r["by_type"]["colour"]["correct"], json!(1));
        assert_eq!(r["multi_object"]["samples"], json!(2));
    }

    #[test]
    fn calibration_section_says_why_there_is_no_threshold() {
        let cal = metrics::calibrate(&[0.2, 0.3], &[true, true]);
        assert!(calibration_note(&cal, true)
            .unwrap()
            .contains("every answer is correct"));
        assert!(calibration_note(&cal, false)
            .unwrap()
            .contains("no question"));
        let cal = metrics::calibrate(&[0.2, 0.8], &[true, false]);
        assert_eq!(calibration_note(&cal, true), None);
        assert_eq!(calibration_json(&cal, None, false)["threshold"], json!(0.5));
    }
}
