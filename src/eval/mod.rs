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

//!
//! The sections live in their modules (`classification`, `perturbation`, `confidence`, `pointing`);
//! this one runs them over the samples; `report` is what the job returns and writes.

pub mod bootstrap;
mod classification;
mod confidence;
pub mod metrics;
mod perturbation;
mod pointing;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::Backend;
use crate::distill::{dataset, Entry, Manifest, SampleRecord};
use crate::engine::report::Staging;
use crate::engine::{
    AnyEngine, Device, Dtype, EncodedImage, Engine, GenerateOptions, Method, Mode, Session,
};
use crate::error::{Error, Result};
use crate::explain::fastrm::{FastRmHead, HeadWeights};
use crate::explain::{default_gradcam_layer, gradient_map, map_entropy, Confidence};
use crate::status;
use confidence::{calibration_note, CalibrationReport};
use perturbation::Perturbation;
pub use pointing::PointingScore;
use pointing::{Accuracy, Pointing};
pub use report::{EvalReport, SampleReport};

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
    status::progress("samples", done, total, &format!("{eta} · {step}"));
}

/// `fastrm eval`.
pub fn run(args: EvalOptions) -> Result<EvalReport> {
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
) -> Result<EvalReport> {
    status::say("reading the data set");
    let samples = load_samples(engine, &head_w, manifest, &args.data, args.limit)?;
    let n_tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    let counts = classification::classify(&samples, head_w.cfg.label_threshold);

    let setup = Setup::new(engine, args, manifest)?;
    let p = manifest.n_patches;
    let mut accuracy = Accuracy::default();
    let (mut entropies, mut correct) = (Vec::new(), Vec::new());
    let mut perturbation = (!args.no_perturbation).then(|| Perturbation::new(&setup.schedule));
    let mut pointing = Pointing::default();
    let mut per_sample = Vec::new();
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
        per_sample.push(SampleReport {
            sample: s.record.sample,
            question_id: s.record.question_id,
            answer: s.record.answer.clone(),
            correct: w.has_answers.then_some(w.ok0),
            mean_entropy: conf.mean_entropy,
            tokens: s.ids.len(),
        });
    }
    status::clear();

    let cal = metrics::calibrate(&entropies, &correct);
    let cal_note = calibration_note(&cal, accuracy.has_ground_truth());
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

    let report = EvalReport {
        data: args.data.display().to_string(),
        model: args.model.display().to_string(),
        head: args.head.display().to_string(),
        baseline_method: manifest.method.clone(),
        samples: samples.len(),
        tokens: n_tokens,
        n_patches: p,
        grid: manifest.grid,
        label_threshold: head_w.cfg.label_threshold,
        classification: classification::rows(&counts),
        classification_by_type: classification::by_type(&samples, &counts),
        perturbation: perturbation
            .map(|pert| pert.report(samples.len(), &setup.schedule, setup.gradcam_layer)),
        confidence: CalibrationReport::new(&cal, cal_note, written),
        pointing: pointing.report(),
        accuracy: accuracy.report(),
        per_sample,
        generations,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if let Some(st) = staging {
        report::write_files(
            st,
            &report,
            &classification::total(&counts),
            &cal,
            &pointing,
        )?;
    }
    Ok(report)
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
                ..Default::default()
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
