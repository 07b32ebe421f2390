//! `fastrm distill`: the training set of the FastRM head.
//!
//! For every question, in one pass ([`distill_sample`] over [`crate::Engine::stream`]): the greedy
//! answer with the baseline's raw map per generated token, and the hidden states the head reads —
//! per generated token the decoder's final-norm state that produced it, per sample the image
//! positions' final-norm states after prefill. Any backend (`--device`) runs it.
//!
//! On disk (`--out DIR`), in the format [`format`] reads and writes: `manifest.json`
//! ([`Manifest`]), rewritten after each shard, and `shard-NNNNN.safetensors` ([`Shard`]) of up to
//! `shard_size` samples each.
//!
//! Rerunning the same command resumes: samples of completed shards are skipped, a short last shard
//! (an earlier, smaller `--limit`) is read back and continued, and a shard lost in a crash is redone
//! from its first sample. The layout is a function of the input, the limit and the shard size only,
//! so an interrupted and resumed run writes the same shards as an uninterrupted one.
//!
//! `--shard I/N` splits the question file among N processes: question k belongs to shard
//! `k mod N`. Interleaving rather than contiguous blocks keeps a shard's questions the same
//! whatever `--limit` is (so each shard folder resumes on its own, and a larger limit extends
//! every shard), and spreads files sorted by kind or length evenly. A shard folder's files hold
//! its own samples in file order, each recorded with its index in the whole file, and its
//! manifest records the spec; [`merge`] interleaves the N folders back into the data set one
//! unsharded run writes, shard files and manifest included.

pub mod dataset;
pub mod format;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::engine::{
    AnyEngine, CancelToken, Device, Dtype, Engine, GenerateOptions, Item, Method, Request,
    RunOptions,
};
use crate::error::{Error, Result};
use crate::explain::MethodName;
use crate::status;

pub use dataset::{Dataset, Entry, Format, ImageRef};
pub use format::{
    shard_name, InputInfo, Manifest, SampleRecord, SampleRef, Shard, ShardFile, ShardInfo, Token,
    TokenSet, MANIFEST_FORMAT, MANIFEST_VERSION, SHARD_FORMAT,
};

use format::{is_shard_name, is_temp_name, read_shard_header, MANIFEST};

/// What the paper appends to every VQA question.
pub const SUFFIX: &str = " Answer the question using up to two words.";
/// The labelling threshold the head is trained with (fraction of a map's max), recorded for
/// `train`.
pub const LABEL_THRESHOLD: f32 = 0.3;
pub const DEFAULT_SHARD_SIZE: usize = 16;

/// `--shard I/N`: the questions whose index k has `k mod N = I`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl ShardSpec {
    /// Parses `I/N`; errors name `--shard`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::input(format!("--shard {text:?}: {why}"));
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| bad("expected I/N, e.g. 0/4 (shard I of N, counting from 0)"))?;
        let num = |v: &str, what: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| bad(&format!("{what} {v:?} is not a non-negative integer")))
        };
        let (index, count) = (num(i, "the index")?, num(n, "the count")?);
        if count == 0 {
            return Err(bad("the count N must be at least 1"));
        }
        if index >= count {
            return Err(bad(&format!(
                "the index must be below the count (0..{}; shards count from 0)",
                count - 1
            )));
        }
        Ok(ShardSpec { index, count })
    }

    /// The index in the whole file of this shard's `pos`-th question.
    pub fn global(&self, pos: usize) -> usize {
        self.index + pos * self.count
    }

    /// How many of the first `n` questions of the file are this shard's.
    pub fn share_of(&self, n: usize) -> usize {
        n.saturating_sub(self.index).div_ceil(self.count)
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What `distill` is asked for (the `fastrm distill` flags, as values; errors name the flags).
#[derive(Debug, Clone)]
pub struct DistillOptions {
    /// Model folder in the HF llava-hf layout.
    pub model: PathBuf,
    /// The VQA v2 questions JSON or JSONL.
    pub questions: PathBuf,
    /// Images folder (the base of relative paths).
    pub images: PathBuf,
    /// Output folder; an existing one made with the same settings is resumed.
    pub out: PathBuf,
    /// The gradient method that labels the maps (baseline or baseline-incremental).
    pub method: MethodName,
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
    /// Leave the questions as they are instead of appending [`SUFFIX`].
    pub no_suffix: bool,
    /// Samples per shard (default [`DEFAULT_SHARD_SIZE`]; a resumed folder keeps its own).
    pub shard_size: Option<usize>,
    /// Only this share of the question file.
    pub shard: Option<ShardSpec>,
    pub device: Device,
    pub dtype: Option<Dtype>,
}

/// What `merge` joins: the folders of `distill --shard I/N` runs into `out`.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub out: PathBuf,
    pub inputs: Vec<PathBuf>,
}

const LOCK: &str = ".distill.lock";

/// `DIR/.distill.lock`, locked by the writer for as long as it runs (an OS file lock, so it ends
/// with the process however the process ends) and holding its pid for the message: a second
/// `distill` into the same folder is refused instead of deleting the first one's temporary files.
/// The file is removed when the run ends.
struct Lock {
    path: PathBuf,
    _file: std::fs::File,
}

impl Lock {
    fn take(dir: &Path) -> Result<Self> {
        use std::io::Write;
        let path = dir.join(LOCK);
        // The holder removes the file when it is done: a lock taken on a file that was removed
        // meanwhile guards nothing, so it is taken again on the file now at `path`.
        for _ in 0..3 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    return Err(Error::input(format!(
                        "{} is being written by another distill (pid {}); wait for it to end",
                        dir.display(),
                        pid.trim()
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            if !same_file(&file, &path) {
                continue;
            }
            file.set_len(0)
                .and_then(|()| write!(file, "{}", std::process::id()))
                .map_err(|e| Error::io(&path, e))?;
            return Ok(Lock { path, _file: file });
        }
        Err(Error::input(format!(
            "{}: could not take the lock",
            path.display()
        )))
    }
}

/// Whether `path` still names the open `file`.
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this), so no one locks it in between.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// FNV-1a of each `*.safetensors` file's name, length and modification time, in name order: cheap for
/// a 14 GB checkpoint, and it changes whenever a file is rewritten.
fn weights_fingerprint(model: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(model)
        .map_err(|e| Error::io(model, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut desc = String::new();
    for f in &files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        desc.push_str(&format!("{name}:{}:{mtime};", meta.len()));
    }
    Ok(format!("{:016x}", crate::util::fnv1a64(desc.as_bytes())))
}

fn canonical(p: &Path) -> Result<String> {
    Ok(std::fs::canonicalize(p)
        .map_err(|e| Error::io(p, e))?
        .display()
        .to_string())
}

/// A sample worked through: its record, image hidden states `[P·D]` and per token (id, hidden
/// `[D]`, map `[P]`).
pub struct Distilled {
    pub record: SampleRecord,
    pub image_hidden: Vec<f32>,
    pub tokens: Vec<(u32, Vec<f32>, Vec<f32>)>,
}

/// Runs one sample in one pass — one vision pass, one prefill, the decode steps — that gives the
/// answer, the baseline's maps and the hidden states together; every item goes to `observer`.
#[allow(clippy::too_many_arguments)]
pub fn distill_sample<B: Backend>(
    engine: &Engine<B>,
    sample: usize,
    entry: &Entry,
    image: &Path,
    suffix: &str,
    method: Method,
    opts: &GenerateOptions,
    observer: &mut dyn FnMut(&Item),
) -> Result<Distilled> {
    let ctx = |e: Error| match e {
        Error::Cancelled => e,
        e => Error::input(format!("question {} ({}): {e}", entry.id, image.display())),
    };
    let req = Request::question(image, format!("{}{suffix}", entry.question));
    let run = RunOptions {
        generate: opts.clone(),
        method: Some(method),
        hidden_states: true,
        ..Default::default()
    };
    let mut image_hidden = Vec::new();
    let mut hidden: Vec<Vec<f32>> = Vec::new();
    let mut maps: Vec<Option<Vec<f32>>> = Vec::new();
    for item in engine.stream(&req, &run, &CancelToken::default()) {
        let item = item.map_err(ctx)?;
        observer(&item);
        match item {
            Item::Prefilled {
                image_hidden: Some(h),
                ..
            } => image_hidden = h,
            Item::Token(t) => {
                hidden.push(t.hidden.unwrap_or_default());
                maps.push(t.map.map(|m| m.map));
            }
            Item::Map(m) => {
                if let Some(slot) = maps.get_mut(m.index) {
                    *slot = Some(m.map);
                }
            }
            Item::Done(summary) => {
                let tokens = summary
                    .generated_ids
                    .iter()
                    .zip(hidden)
                    .zip(maps)
                    .map(|((&id, h), m)| {
                        m.map(|m| (id, h, m)).ok_or_else(|| {
                            Error::Backend(format!("question {}: a token has no map", entry.id))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                return Ok(Distilled {
                    record: SampleRecord {
                        sample,
                        question_id: entry.id,
                        question: entry.question.clone(),
                        image: image.display().to_string(),
                        answer: summary.text,
                        answers: entry.answers.clone(),
                        generated_ids: summary.generated_ids,
                        stop_reason: summary.stop_reason.as_str().to_string(),
                        qtype: entry.qtype.clone(),
                        n_objects: entry.n_objects,
                        target_mask: entry.target_mask.clone(),
                    },
                    image_hidden,
                    tokens,
                });
            }
            _ => {}
        }
    }
    Err(Error::Backend("the run ended without a summary".into()))
}

/// A sample-level progress bar with an ETA on the status line, the current sample's step appended.
struct Progress {
    start: std::time::Instant,
    /// The sample bar's position, to which the current sample's step is appended.
    done: usize,
    total: usize,
    eta: String,
}

impl Progress {
    fn new() -> Self {
        Progress {
            start: std::time::Instant::now(),
            done: 0,
            total: 0,
            eta: String::new(),
        }
    }

    /// `done` of `total` samples, `fresh` of them in this run (the rate and ETA come from those).
    fn bar(&mut self, done: usize, total: usize, fresh: usize) {
        self.eta = status::eta(self.start.elapsed().as_secs_f64(), fresh, total - done);
        (self.done, self.total) = (done, total);
        status::progress("samples", done, total, &self.eta);
    }

    /// Within a sample: which token is generated or explained.
    fn event(&self, item: &Item) {
        let step = match item {
            Item::ImageEncoded => "prefill".to_string(),
            Item::Prefilled { .. } => "generating".to_string(),
            Item::Token(t) => format!("token {}", t.index + 1),
            Item::Map(m) => format!("map {}", m.index + 1),
            _ => return,
        };
        let detail = format!("{} · {step}", self.eta);
        status::progress("samples", self.done, self.total, &detail);
    }
}

/// `fastrm distill`.
pub fn run(args: DistillOptions) -> Result<DistillSummary> {
    let plan = Plan::new(&args)?;
    let created = !args.out.exists();
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let result = Lock::take(&args.out).and_then(|_lock| {
        let result = distill_locked(&args, &plan);
        if result.is_err() {
            forget_empty_manifest(&args.out);
        }
        result
    });
    if result.is_err() && created {
        // Fails, as it should, unless the folder is empty.
        let _ = std::fs::remove_dir(&args.out);
    }
    result
}

/// After a failed run, under its lock: a manifest that lists no shard holds no data, so it goes.
fn forget_empty_manifest(out: &Path) {
    let path = out.join(MANIFEST);
    if path.exists() && Manifest::read(out).is_ok_and(|m| m.shards.is_empty()) {
        let _ = std::fs::remove_file(&path);
    }
}

fn distill_locked(args: &DistillOptions, plan: &Plan) -> Result<DistillSummary> {
    let t0 = Instant::now();
    let out = args.out.as_path();
    let identity = Identity::of(args)?;
    let existing = if out.join(MANIFEST).exists() {
        Some(Manifest::read(out)?)
    } else {
        None
    };
    // A manifest without a completed shard holds no data (a run whose first samples failed): it
    // binds nothing, so a corrected rerun with other settings starts afresh.
    let existing = match existing {
        Some(m) if m.shards.is_empty() => {
            let path = out.join(MANIFEST);
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            None
        }
        other => other,
    };
    match &existing {
        Some(m) => check_same_run(m, args, plan, &identity)?,
        None => require_fresh(out)?,
    }
    let shard_size = existing
        .as_ref()
        .map(|m| m.shard_size)
        .or(args.shard_size)
        .unwrap_or(DEFAULT_SHARD_SIZE);

    let mut progress = Progress::new();
    let shards = existing
        .as_ref()
        .map_or(Vec::new(), |m| completed_prefix(out, m, plan));
    remove_leftovers(out, &shards)?;
    let listed_samples: usize = shards.iter().map(|s| s.samples).sum();
    // Every image of the run must exist before any expensive work starts.
    let images: Vec<PathBuf> = (listed_samples.min(plan.total)..plan.total)
        .map(|pos| &plan.data.entries[plan.global(pos)])
        .map(|e| {
            let p = dataset::resolve_image(&args.images, e)?;
            std::fs::canonicalize(&p).map_err(|err| Error::io(&p, err))
        })
        .collect::<Result<_>>()?;

    let engine = {
        status::say(&format!("loading {}", args.model.display()));
        let e = AnyEngine::load(plan.device, plan.dtype, &args.model);
        status::clear();
        e?
    };
    if engine.config().anyres.is_some() {
        // Each sample's maps and image keys are stored at the manifest's one `n_patches`; a tiled
        // image's token count follows its size.
        return Err(Error::input(format!(
            "{}: a LLaVA-NeXT model (images tiled by size, a token count per image) cannot be \
             distilled yet: training sets hold one patch count for every sample (LLaVA-1.5 models)",
            args.model.display()
        )));
    }
    let mut manifest = new_manifest(args, plan, identity, engine.config(), shard_size, shards);
    if let Some(m) = &existing {
        if (m.hidden_size, m.n_patches) != (manifest.hidden_size, manifest.n_patches) {
            return Err(Error::input(format!(
                "{}: made with hidden size {} and {} patches; the model has {} and {}",
                out.display(),
                m.hidden_size,
                m.n_patches,
                manifest.hidden_size,
                manifest.n_patches
            )));
        }
    }
    manifest.write(out)?;

    // A short last shard (an earlier, smaller --limit) is read back and continued; it stays
    // listed until its replacement is written.
    let mut writer = ShardWriter::new(out, shard_size);
    if listed_samples < plan.total {
        if let Some(last) = manifest.shards.last() {
            if last.samples < shard_size {
                writer.buf = Some(manifest.open_shard(out, last)?.into_shard()?);
            }
        }
    }

    let run = Remaining {
        args,
        plan,
        images: &images,
        first: listed_samples,
    };
    let (new_samples, new_tokens) =
        run.distill(&engine, &mut manifest, &mut writer, &mut progress)?;
    Ok(DistillSummary {
        out: out.to_path_buf(),
        shard: plan.spec,
        backend: engine.backend_name(),
        new_samples,
        new_tokens,
        seconds: t0.elapsed().as_secs_f64(),
        samples: manifest.samples,
        tokens: manifest.tokens,
        shards: manifest.shards.len(),
    })
}

/// What a `distill` run did, and the data set it leaves.
#[derive(Debug, Clone, Serialize)]
pub struct DistillSummary {
    pub out: PathBuf,
    pub shard: Option<ShardSpec>,
    pub backend: String,
    /// Samples and tokens this run added (a resumed run adds what was missing).
    pub new_samples: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// The data set's totals.
    pub samples: usize,
    pub tokens: usize,
    pub shards: usize,
}

/// What a `merge` made.
#[derive(Debug, Clone, Serialize)]
pub struct MergeSummary {
    pub out: PathBuf,
    /// How many shard folders went in.
    pub inputs: usize,
    pub seconds: f64,
    pub samples: usize,
    pub tokens: usize,
    pub shards: usize,
}

/// What a `distill` run is asked for, its arguments checked before anything is touched.
struct Plan {
    spec: Option<ShardSpec>,
    device: Device,
    dtype: Option<Dtype>,
    data: Dataset,
    suffix: &'static str,
    /// This folder's samples are positions `0..total` of its own sequence ([`Plan::global`]).
    total: usize,
}

impl Plan {
    fn new(args: &DistillOptions) -> Result<Self> {
        if !matches!(
            args.method,
            MethodName::Baseline | MethodName::BaselineIncremental
        ) {
            return Err(Error::input(format!(
                "--method {}: distill labels with a baseline (baseline or baseline-incremental)",
                args.method.as_str()
            )));
        }
        if args.limit == Some(0) {
            return Err(Error::input("--limit must be at least 1"));
        }
        if args.max_new_tokens == 0 {
            return Err(Error::input("--max-new-tokens must be at least 1"));
        }
        if args.shard_size == Some(0) {
            return Err(Error::input("--shard-size must be at least 1"));
        }
        let spec = args.shard;
        let (device, dtype) = (args.device, args.dtype);
        Error::require_dir("--model", &args.model)?;
        Error::require_dir("--images", &args.images)?;
        let data = Dataset::load(&args.questions)?;
        let target = args
            .limit
            .unwrap_or(data.entries.len())
            .min(data.entries.len());
        Ok(Plan {
            spec,
            device,
            dtype,
            data,
            suffix: if args.no_suffix { "" } else { SUFFIX },
            total: spec.map_or(target, |s| s.share_of(target)),
        })
    }

    /// The index in the file of this folder's `pos`-th sample (the identity without --shard).
    fn global(&self, pos: usize) -> usize {
        self.spec.map_or(pos, |s| s.global(pos))
    }
}

/// What a folder's samples were made from: the model (its folder and weight files), the
/// questions file and the images folder, as canonical paths.
struct Identity {
    model: String,
    weights: String,
    questions: String,
    images: String,
}

impl Identity {
    fn of(args: &DistillOptions) -> Result<Self> {
        Ok(Identity {
            model: canonical(&args.model)?,
            questions: canonical(&args.questions)?,
            images: canonical(&args.images)?,
            weights: weights_fingerprint(&args.model)?,
        })
    }
}

/// An existing folder is resumed only by the run that made it: the same model, weights, method,
/// suffix, questions, images and settings.
fn check_same_run(m: &Manifest, args: &DistillOptions, plan: &Plan, id: &Identity) -> Result<()> {
    let out = &args.out;
    let mismatch = |what: &str, was: &dyn std::fmt::Debug, now: &dyn std::fmt::Debug| {
        Err(Error::input(format!(
            "{} holds a distill set made with {what} {was:?}, not {now:?}: use another --out \
             or the same settings to resume",
            out.display()
        )))
    };
    let (data, suffix) = (&plan.data, plan.suffix);
    if m.model != id.model {
        return mismatch("model", &m.model, &id.model);
    }
    if m.model_weights != id.weights {
        return Err(Error::input(format!(
            "{} holds a distill set made with other weights in {} (the model was rewritten since: \
             fingerprint {:?}, now {:?}): use another --out",
            out.display(),
            m.model,
            m.model_weights,
            id.weights
        )));
    }
    if m.method != args.method.as_str() {
        return mismatch("method", &m.method, &args.method.as_str());
    }
    if m.suffix != suffix {
        return mismatch("suffix", &m.suffix, &suffix);
    }
    if m.input.fingerprint != data.fingerprint || m.input.format != data.format.as_str() {
        return mismatch(
            "questions file",
            &format!("{} ({})", m.input.path, m.input.fingerprint),
            &format!("{} ({})", id.questions, data.fingerprint),
        );
    }
    if m.images != id.images {
        return mismatch("images folder", &m.images, &id.images);
    }
    if m.max_new_tokens != args.max_new_tokens {
        return mismatch("--max-new-tokens", &m.max_new_tokens, &args.max_new_tokens);
    }
    if let Some(k) = args.shard_size {
        if k != m.shard_size {
            return mismatch("--shard-size", &m.shard_size, &k);
        }
    }
    if m.shard != plan.spec {
        let show = |s: Option<ShardSpec>| s.map_or("none".to_string(), |s| s.to_string());
        return mismatch("--shard", &show(m.shard), &show(plan.spec));
    }
    Ok(())
}

/// A folder without a manifest may hold only what an interrupted first run leaves.
fn require_fresh(out: &Path) -> Result<()> {
    let foreign = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            !(is_shard_name(&n) || is_temp_name(&n) || n == LOCK)
        });
    if foreign {
        return Err(Error::input(format!(
            "{}: not empty and has no {MANIFEST}; give an empty or new folder",
            out.display()
        )));
    }
    Ok(())
}

/// The completed prefix of a folder: its listed shards up to the first whose file is not whole
/// or does not agree with the manifest (that one and the rest are redone).
fn completed_prefix(out: &Path, m: &Manifest, plan: &Plan) -> Vec<ShardInfo> {
    let mut shards: Vec<ShardInfo> = Vec::new();
    let mut next = 0;
    for s in &m.shards {
        let path = out.join(&s.file);
        let global = |i: usize| plan.global(next + i);
        let ok = match read_shard_header(&path) {
            Ok((first, recs, tokens)) => {
                s.file == shard_name(shards.len())
                    && first == global(0)
                    && s.first_sample == global(0)
                    && recs.len() == s.samples
                    && tokens == s.tokens
                    && recs.iter().enumerate().all(|(i, r)| r.sample == global(i))
            }
            Err(_) => false,
        };
        if !ok {
            crate::status::note(&format!(
                "note: {} is missing or does not match the manifest; redoing from sample {}",
                path.display(),
                global(0)
            ));
            break;
        }
        next += s.samples;
        shards.push(s.clone());
    }
    shards
}

/// Removes the leftovers of an interrupted run: temporary files, and shards not in `shards`.
fn remove_leftovers(out: &Path, shards: &[ShardInfo]) -> Result<()> {
    for e in std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok())
    {
        let n = e.file_name().to_string_lossy().to_string();
        let listed = shards.iter().any(|s| s.file == n);
        if is_temp_name(&n) || (is_shard_name(&n) && !listed) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// The manifest of this run, listing the completed `shards`.
fn new_manifest(
    args: &DistillOptions,
    plan: &Plan,
    id: Identity,
    cfg: &crate::config::LlavaConfig,
    shard_size: usize,
    shards: Vec<ShardInfo>,
) -> Manifest {
    let g = cfg.vision.grid();
    let mut m = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        model: id.model,
        model_weights: id.weights,
        method: args.method.as_str().into(),
        suffix: plan.suffix.into(),
        max_new_tokens: args.max_new_tokens,
        stop_at_eos: true,
        hidden_size: cfg.text.hidden_size,
        n_patches: cfg.vision.num_patches(),
        grid: [g, g],
        label_threshold: LABEL_THRESHOLD,
        input: InputInfo {
            path: id.questions,
            format: plan.data.format.as_str().into(),
            fingerprint: plan.data.fingerprint.clone(),
            entries: plan.data.entries.len(),
        },
        images: id.images,
        shard_size,
        shard: plan.spec,
        shards,
        samples: 0,
        tokens: 0,
    };
    m.count();
    m
}

/// The samples a run still has to distill: this folder's positions `first..plan.total`.
struct Remaining<'a> {
    args: &'a DistillOptions,
    plan: &'a Plan,
    /// The images of those positions, in order.
    images: &'a [PathBuf],
    first: usize,
}

impl Remaining<'_> {
    /// Distills them in order, writing each shard as it fills and the manifest after it; returns
    /// the samples and tokens made.
    fn distill(
        &self,
        engine: &AnyEngine,
        manifest: &mut Manifest,
        writer: &mut ShardWriter,
        progress: &mut Progress,
    ) -> Result<(usize, usize)> {
        let n_layers = engine.config().text.num_hidden_layers;
        let method = self.args.method.method(false, None, n_layers)?;
        let opts = GenerateOptions {
            max_new_tokens: self.args.max_new_tokens,
            stop_at_eos: true,
            keep_steps: false,
            ..Default::default()
        };
        let (plan, total) = (self.plan, self.plan.total);
        let (mut new_samples, mut new_tokens) = (0usize, 0usize);
        for k in self.first..total {
            let g = plan.global(k);
            let (entry, image) = (&plan.data.entries[g], &self.images[k - self.first]);
            progress.bar(k, total, new_samples);
            let s = crate::with_engine!(engine, |e| distill_sample(
                e,
                g,
                entry,
                image,
                plan.suffix,
                method,
                &opts,
                &mut |ev| progress.event(ev)
            ));
            let s = s.inspect_err(|_| status::clear())?;
            new_tokens += s.tokens.len();
            new_samples += 1;
            if writer.push(manifest, g, s, k + 1 == total)? {
                manifest.write(&self.args.out)?;
            }
        }
        status::clear();
        Ok((new_samples, new_tokens))
    }
}

/// Gathers samples into shards of `shard_size`, writing each shard file when it is full (or
/// holds the last sample) and listing it in the manifest.
struct ShardWriter<'a> {
    out: &'a Path,
    shard_size: usize,
    /// The shard being filled.
    buf: Option<Shard>,
}

impl<'a> ShardWriter<'a> {
    fn new(out: &'a Path, shard_size: usize) -> Self {
        ShardWriter {
            out,
            shard_size,
            buf: None,
        }
    }

    /// Adds sample `g` (its index in the file); true when this wrote a shard file and listed it
    /// in `manifest`.
    fn push(
        &mut self,
        manifest: &mut Manifest,
        g: usize,
        s: Distilled,
        last: bool,
    ) -> Result<bool> {
        let (p, d) = (manifest.n_patches, manifest.hidden_size);
        let shard = self.buf.get_or_insert_with(|| Shard::new(g, p, d));
        shard.push(s.record, &s.image_hidden, &s.tokens);
        if shard.samples.len() < self.shard_size && !last {
            return Ok(false);
        }
        let shard = self.buf.take().expect("a shard is in progress");
        // A continued short shard replaces its listed entry.
        if manifest
            .shards
            .last()
            .is_some_and(|s| s.first_sample == shard.first_sample)
        {
            manifest.shards.pop();
        }
        let file = shard_name(manifest.shards.len());
        shard.write(&self.out.join(&file))?;
        manifest.shards.push(ShardInfo {
            file,
            first_sample: shard.first_sample,
            samples: shard.samples.len(),
            tokens: shard.n_tokens(),
        });
        manifest.count();
        Ok(true)
    }
}

/// One shard folder's samples in order, a shard file open at a time.
struct FolderSamples<'a> {
    dir: &'a Path,
    manifest: &'a Manifest,
    files: std::slice::Iter<'a, ShardInfo>,
    current: Option<ShardFile>,
    next: usize,
}

impl FolderSamples<'_> {
    /// The next sample: its record, image hidden states and tokens.
    fn next(&mut self) -> Result<Option<Distilled>> {
        loop {
            if let Some(sh) = &self.current {
                if self.next < sh.samples.len() {
                    self.next += 1;
                    return sh.sample(self.next - 1).map(Some);
                }
            }
            let Some(info) = self.files.next() else {
                return Ok(None);
            };
            self.current = Some(self.manifest.open_shard(self.dir, info)?);
            self.next = 0;
        }
    }
}

/// `fastrm merge`: the folders of `distill --shard I/N` for every I of one N, joined into the
/// folder one unsharded `distill` with the same settings writes (the same shard files and
/// manifest), which `train`, `eval` and a further `distill` (to extend it) take as their own.
pub fn merge(args: MergeOptions) -> Result<MergeSummary> {
    let t0 = Instant::now();
    let inputs = &args.inputs;
    let manifests: Vec<Manifest> = inputs
        .iter()
        .map(|d| {
            if !d.is_dir() {
                return Err(Error::input(format!(
                    "{}: no such folder (give the --out folders of distill --shard I/N)",
                    d.display()
                )));
            }
            Manifest::read(d)
        })
        .collect::<Result<_>>()?;
    check_same_settings(&manifests, inputs)?;
    let by_index = split_order(&manifests, inputs)?;
    let total = check_split_limits(&manifests, inputs)?;

    let out = args.out.as_path();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    if std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .next()
        .is_some()
    {
        return Err(Error::input(format!(
            "--out {}: not empty; give an empty or new folder",
            out.display()
        )));
    }
    let _lock = Lock::take(out)?;
    let mut readers: Vec<FolderSamples> = by_index
        .iter()
        .map(|&j| FolderSamples {
            dir: &inputs[j],
            manifest: &manifests[j],
            files: manifests[j].shards.iter(),
            current: None,
            next: 0,
        })
        .collect();
    let mut manifest = Manifest {
        shard: None,
        shards: Vec::new(),
        samples: 0,
        tokens: 0,
        ..manifests[0].clone()
    };
    let mut writer = ShardWriter::new(out, manifest.shard_size);
    let n = by_index.len();
    for g in 0..total {
        let reader = &mut readers[g % n];
        let s = reader.next()?.ok_or_else(|| {
            Error::input(format!(
                "{}: its shards end before its manifest's sample count",
                reader.dir.display()
            ))
        })?;
        if s.record.sample != g {
            return Err(Error::input(format!(
                "{}: holds sample {} where shard {}/{n} expects {g}",
                reader.dir.display(),
                s.record.sample,
                g % n
            )));
        }
        writer.push(&mut manifest, g, s, g + 1 == total)?;
    }
    // Listed only now, so that an interrupted merge leaves no folder that looks complete.
    manifest.write(out)?;
    Ok(MergeSummary {
        out: out.to_path_buf(),
        inputs: n,
        seconds: t0.elapsed().as_secs_f64(),
        samples: manifest.samples,
        tokens: manifest.tokens,
        shards: manifest.shards.len(),
    })
}

/// Every setting but the shard spec and the contents must agree between the folders of a split.
fn check_same_settings(manifests: &[Manifest], inputs: &[PathBuf]) -> Result<()> {
    let settings = |m: &Manifest| {
        let mut v = serde_json::to_value(Manifest {
            shard: None,
            shards: Vec::new(),
            samples: 0,
            tokens: 0,
            ..m.clone()
        })
        .unwrap_or_default();
        // The input's path may differ between machines; its fingerprint may not.
        if let Some(i) = v.get_mut("input").and_then(|i| i.as_object_mut()) {
            i.remove("path");
        }
        v
    };
    let first = settings(&manifests[0]);
    for (m, dir) in manifests.iter().zip(inputs).skip(1) {
        let this = settings(m);
        if this != first {
            let differ: Vec<String> = first
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| this.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            return Err(Error::input(format!(
                "{} and {} were distilled with different settings ({}): they are not shards of one run",
                inputs[0].display(),
                dir.display(),
                differ.join(", ")
            )));
        }
    }
    Ok(())
}

/// The folders as the N shards of one split: entry I is the index in `inputs` of shard I/N.
fn split_order(manifests: &[Manifest], inputs: &[PathBuf]) -> Result<Vec<usize>> {
    let specs: Vec<ShardSpec> = manifests
        .iter()
        .zip(inputs)
        .map(|(m, dir)| {
            m.shard.ok_or_else(|| {
                Error::input(format!(
                    "{} is not a shard folder (made without distill --shard I/N)",
                    dir.display()
                ))
            })
        })
        .collect::<Result<_>>()?;
    let n = specs[0].count;
    let mut by_index: Vec<Option<usize>> = vec![None; n];
    for (j, s) in specs.iter().enumerate() {
        if s.count != n {
            return Err(Error::input(format!(
                "{} is shard {s} but {} is shard {}: every folder must come from one --shard I/N split",
                inputs[j].display(),
                inputs[0].display(),
                specs[0]
            )));
        }
        if let Some(other) = by_index[s.index] {
            return Err(Error::input(format!(
                "{} and {} are both shard {s}",
                inputs[other].display(),
                inputs[j].display()
            )));
        }
        by_index[s.index] = Some(j);
    }
    let missing: Vec<String> = (0..n)
        .filter(|&i| by_index[i].is_none())
        .map(|i| format!("{i}/{n}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::input(format!(
            "shard {} missing: merge needs every shard of the split",
            missing.join(", ")
        )));
    }
    Ok(by_index.into_iter().flatten().collect())
}

/// The merged sample count; the union of the shard folders must be the file's first `total`
/// questions, as one run with `--limit total` covers.
fn check_split_limits(manifests: &[Manifest], inputs: &[PathBuf]) -> Result<usize> {
    let total: usize = manifests.iter().map(|m| m.samples).sum();
    for (m, dir) in manifests.iter().zip(inputs) {
        let Some(s) = m.shard else { continue };
        if m.samples != s.share_of(total) {
            return Err(Error::input(format!(
                "{} (shard {s}) holds {} samples, but the first {total} questions give it {}: \
                 the shards were run with different --limit; rerun the short ones with the largest",
                dir.display(),
                m.samples,
                s.share_of(total)
            )));
        }
    }
    Ok(total)
}
