//! `fastrm profile`: latency and peak memory of plain generation, FastRM and the gradient
//! baselines over forced output lengths — the paper's latency/memory comparison (figure 14).
//!
//! For every output length and method the same prompt runs `--repeat` times (default 5: the
//! median and the spread are reported, the largest peak) with EOS ignored, so every run produces
//! exactly the asked number of tokens. Every method runs once, unrecorded, before anything is
//! measured (first-call costs: kernel loading, library handles, the pool's growth). Before each
//! measured run the backend is synchronised and its memory pool trimmed
//! ([`Backend::trim_and_sync`]), so the run's memory figures are its own whatever ran before.
//! Each run is bracketed by a [`timer::PhaseClock`] (wall clock on the CPU; device events on a
//! device backend) and a [`memory::PhaseMemory`] (process peak RSS on the CPU; NVML device memory
//! on a GPU); a backend with a memory ledger also gives the run's peak of live tensor bytes. A
//! method's map latency is the engine's own synchronised timer around its map work, never a
//! difference of two runs. [`report`] turns the runs into a table, JSON and plots.
//!
//! The backend is chosen in exactly one place, [`run`]; a device backend plugs in there with its
//! clock and memory source and reuses [`profile`] unchanged.

pub mod memory;
pub mod report;
pub mod roofline;
pub mod timer;

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::Backend;
use crate::config::LlavaConfig;
use crate::engine::{
    collect, with_backend, AnyBackend, CancelToken, Device, Dtype, Engine, Request, RunOptions,
    WithBackend,
};
use crate::error::{Error, Result};
use crate::explain::fastrm::HeadWeights;
use crate::explain::MethodName;
use crate::model::llava::{GenerateOptions, Timings};
use crate::status;

use memory::{MemorySource, MemoryUse, PhaseMemory};
pub use report::Profiled;
use report::{Report, RunRecord};
use timer::{BackendClock, PhaseClock};

const TINY_CONFIG: &str = include_str!("../../assets/demo/model/config.json");
const MIDSIZE_CONFIG: &str = include_str!("../../benches/midsize_config.json");
/// Seed of the synthetic weights and of the random FastRM head.
const SEED: u64 = 0;
/// Text ids after the image in a synthetic prompt: a LLaVA-1.5 VQA prompt has about 20–35.
const SYNTHETIC_TEXT_IDS: usize = 24;
/// Largest `--repeat` and `--tokens` length accepted.
const MAX_REPEAT: usize = 1000;
const MAX_TOKENS: usize = 1 << 20;
const DEFAULT_QUESTION: &str = "What color is the star?";

/// What `profile` is asked for (the `fastrm profile` flags, as values; errors name the flags).
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// A model folder, or `synthetic:tiny|midsize|llava-1.5-7b|llava-1.5-13b`; default: the
    /// bundled demo model.
    pub model: Option<String>,
    pub device: Device,
    pub dtype: Option<Dtype>,
    /// Output lengths: every run generates exactly this many tokens.
    pub tokens: Vec<usize>,
    /// The methods measured; generate is always added (the maps' cost is measured against it).
    pub methods: Vec<ProfMethod>,
    /// The baseline materialises every layer's cam and the full R.
    pub full_r: bool,
    /// FastRM head file; default: a random head of the model's size.
    pub head: Option<PathBuf>,
    /// The prompt's image (default: the bundled demo photo).
    pub image: Option<PathBuf>,
    /// The question, for models with a tokenizer.
    pub prompt: Option<String>,
    /// Runs per method and length.
    pub repeat: usize,
    /// Memory sampling interval in milliseconds.
    pub sample_ms: u64,
    /// Where profile.json, profile.txt and the plots go.
    pub out: Option<PathBuf>,
}

/// What `profile` can measure: plain generation, or generation with one relevancy method's maps
/// (named as [`MethodName`] names them; GradCAM is not profiled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProfMethod {
    Generate,
    FastRm,
    Baseline,
    BaselineIncremental,
}

impl ProfMethod {
    pub const ALL: [ProfMethod; 4] = [
        ProfMethod::Generate,
        ProfMethod::FastRm,
        ProfMethod::Baseline,
        ProfMethod::BaselineIncremental,
    ];

    /// The relevancy method measured, `None` for plain generation.
    pub fn relevancy(self) -> Option<MethodName> {
        match self {
            ProfMethod::Generate => None,
            ProfMethod::FastRm => Some(MethodName::Fastrm),
            ProfMethod::Baseline => Some(MethodName::Baseline),
            ProfMethod::BaselineIncremental => Some(MethodName::BaselineIncremental),
        }
    }

    pub fn name(self) -> &'static str {
        self.relevancy().map_or("generate", MethodName::as_str)
    }

    pub fn parse(s: &str) -> Result<Self> {
        let known = Self::ALL.map(|m| m.name());
        match known.iter().position(|&n| n == s) {
            Some(i) => Ok(Self::ALL[i]),
            None => Err(Error::input(format!(
                "unknown method `{s}` in --methods: expected {}",
                known.join(", ")
            ))),
        }
    }
}

/// `--methods`: known names, generate added first when missing, duplicates dropped, in the order
/// given otherwise.
pub fn parse_methods(s: &str) -> Result<Vec<ProfMethod>> {
    let given = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(ProfMethod::parse)
        .collect::<Result<Vec<_>>>()?;
    methods_plan(&given)
}

/// Generate first, then the others in the order given, once each.
fn methods_plan(given: &[ProfMethod]) -> Result<Vec<ProfMethod>> {
    if given.is_empty() {
        return Err(Error::input("--methods is empty"));
    }
    let mut out = vec![ProfMethod::Generate];
    for &m in given {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// `--tokens`: positive integers, sorted ascending, duplicates dropped.
pub fn parse_tokens(s: &str) -> Result<Vec<usize>> {
    let given = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            part.parse().map_err(|_| {
                Error::input(format!(
                    "--tokens: `{part}` is not a whole number (expected e.g. 10,20,50,100)"
                ))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    tokens_plan(given)
}

fn tokens_plan(mut tokens: Vec<usize>) -> Result<Vec<usize>> {
    if tokens.is_empty() {
        return Err(Error::input(
            "--tokens is empty (expected output lengths, e.g. 10,20,50,100)",
        ));
    }
    if tokens.contains(&0) {
        return Err(Error::input("--tokens: output lengths must be at least 1"));
    }
    if let Some(n) = tokens.iter().find(|&&n| n > MAX_TOKENS) {
        return Err(Error::input(format!(
            "--tokens: `{n}` is more than {MAX_TOKENS}, far past any model's context"
        )));
    }
    tokens.sort_unstable();
    tokens.dedup();
    Ok(tokens)
}

/// Synthetic models `profile` knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticModel {
    Tiny,
    Midsize,
    Llava7b,
    Llava13b,
}

impl SyntheticModel {
    const NAMES: [(&'static str, SyntheticModel); 4] = [
        ("tiny", SyntheticModel::Tiny),
        ("midsize", SyntheticModel::Midsize),
        ("llava-1.5-7b", SyntheticModel::Llava7b),
        ("llava-1.5-13b", SyntheticModel::Llava13b),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, m)| *m == self).unwrap().0
    }

    /// The config on `device`: the LLaVA-1.5 sizes only on a GPU.
    pub fn config(self, device: Device) -> Result<LlavaConfig> {
        match (self, device) {
            (SyntheticModel::Llava7b | SyntheticModel::Llava13b, Device::Cuda(_)) => {
                LlavaConfig::named(self.name()).map_err(Error::Input)
            }
            _ => self.cpu_config(),
        }
    }

    /// The config for the CPU backend; the LLaVA-1.5 sizes are refused there (28 / 53 GB of f32
    /// weights, hours per profile on a few cores).
    pub fn cpu_config(self) -> Result<LlavaConfig> {
        let text =
            match self {
                SyntheticModel::Tiny => TINY_CONFIG,
                SyntheticModel::Midsize => MIDSIZE_CONFIG,
                SyntheticModel::Llava7b | SyntheticModel::Llava13b => {
                    return Err(Error::input(format!(
                    "synthetic:{} is too big for the CPU backend ({} GB of f32 weights); it is \
                     for --device cuda. On the CPU use synthetic:tiny or synthetic:midsize",
                    self.name(),
                    if self == SyntheticModel::Llava7b { 28 } else { 53 }
                )))
                }
            };
        LlavaConfig::from_json_str(text)
            .map_err(|e| Error::input(format!("built-in config of synthetic:{}: {e}", self.name())))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    Dir(PathBuf),
    Synthetic(SyntheticModel),
}

impl ModelSpec {
    pub fn parse(s: Option<&str>) -> Result<Self> {
        let Some(s) = s else {
            return Ok(ModelSpec::Dir(crate::demo::model_dir()?));
        };
        match s.strip_prefix("synthetic:") {
            Some(name) => SyntheticModel::NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, m)| ModelSpec::Synthetic(*m))
                .ok_or_else(|| {
                    Error::input(format!(
                        "unknown synthetic model `{name}`: expected one of {}",
                        SyntheticModel::NAMES
                            .map(|(n, _)| format!("synthetic:{n}"))
                            .join(", ")
                    ))
                }),
            None => Ok(ModelSpec::Dir(PathBuf::from(s))),
        }
    }

    pub fn label(&self) -> String {
        match self {
            ModelSpec::Dir(d) => d.display().to_string(),
            ModelSpec::Synthetic(m) => format!("synthetic:{}", m.name()),
        }
    }
}

/// Everything `profile` needs, validated before any model loads.
#[derive(Debug, Clone)]
pub struct Plan {
    pub model: ModelSpec,
    pub device: Device,
    /// The storage type (CUDA default f16, as the paper's measurements; CPU default: as stored).
    pub dtype: Option<Dtype>,
    pub tokens: Vec<usize>,
    pub methods: Vec<ProfMethod>,
    pub full_r: bool,
    pub head: Option<PathBuf>,
    pub image: PathBuf,
    pub prompt: String,
    pub repeat: usize,
    pub interval: Duration,
    pub out: Option<PathBuf>,
}

impl Plan {
    pub fn new(a: &ProfileOptions) -> Result<Self> {
        let (device, dtype) = (a.device, a.dtype);
        let methods = methods_plan(&a.methods)?;
        let tokens = tokens_plan(a.tokens.clone())?;
        let model = ModelSpec::parse(a.model.as_deref())?;
        if a.full_r && !methods.contains(&ProfMethod::Baseline) {
            return Err(Error::input("--full-r applies to the baseline method only"));
        }
        if a.head.is_some() && !methods.contains(&ProfMethod::FastRm) {
            return Err(Error::input("--head applies to the fastrm method only"));
        }
        // Bounds a run can reach in a working day; beyond them a typo, not a plan.
        if !(1..=MAX_REPEAT).contains(&a.repeat) {
            return Err(Error::input(format!("--repeat must be 1 to {MAX_REPEAT}")));
        }
        if !(1..=60_000).contains(&a.sample_ms) {
            return Err(Error::input("--sample-ms must be 1 to 60000"));
        }
        if let (ModelSpec::Synthetic(_), Some(_)) = (&model, &a.prompt) {
            return Err(Error::input(
                "--prompt needs a model with a tokenizer; synthetic models use a fixed id prompt",
            ));
        }
        if !matches!(device, Device::Cuda(_)) {
            if let ModelSpec::Synthetic(m) = model {
                m.cpu_config()?;
                crate::engine::check_synthetic_dtype(device, dtype)?;
            }
        }
        if let Some(h) = &a.head {
            if !h.is_file() {
                return Err(Error::input(format!(
                    "--head {}: no such file",
                    h.display()
                )));
            }
        }
        let image = match &a.image {
            Some(i) => i.clone(),
            None => crate::demo::image_path()?,
        };
        Ok(Plan {
            model,
            device,
            dtype,
            tokens,
            methods,
            full_r: a.full_r,
            head: a.head.clone(),
            image,
            prompt: a.prompt.clone().unwrap_or_else(|| DEFAULT_QUESTION.into()),
            repeat: a.repeat,
            interval: Duration::from_millis(a.sample_ms),
            out: a.out.clone(),
        })
    }
}

/// `fastrm profile`: validates everything cheap first (arguments, the output folder), then opens
/// the model on the chosen backend ([`with_backend`], as every job does) and runs [`profile`].
pub fn run(args: ProfileOptions) -> Result<Profiled> {
    let plan = Plan::new(&args)?;
    if let Some(out) = &plan.out {
        report::prepare_out(out)?;
    }
    let memory = memory_source(plan.device)?;
    let report = with_backend(
        plan.device,
        plan.dtype,
        ProfileOn {
            plan: &plan,
            memory,
        },
    )?;
    let files = match &plan.out {
        Some(out) => report.write(out)?,
        None => Vec::new(),
    };
    Ok(Profiled { report, files })
}

/// Where a run's memory figures come from: the process on the CPU and the simulated device (the
/// simulator's memory is the host's), NVML's view of GPU `N` for `cuda:N`. NVML numbers GPUs in
/// PCI bus order, which is the driver's order on single-GPU hosts and wherever
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID` is set without `CUDA_VISIBLE_DEVICES`.
fn memory_source(device: Device) -> Result<MemorySource> {
    Ok(match device {
        Device::Cpu | Device::Sim => MemorySource::ProcessRss,
        Device::Cuda(n) => MemorySource::Nvml {
            device: u32::try_from(n)
                .map_err(|_| Error::input(format!("--device cuda:{n}: no such GPU")))?,
        },
    })
}

/// [`profile`] as a body for [`with_backend`]: the backend's own clock, the plan's memory source.
struct ProfileOn<'a> {
    plan: &'a Plan,
    memory: MemorySource,
}

impl WithBackend for ProfileOn<'_> {
    type Output = Report;
    fn run<B: AnyBackend>(self, backend: B) -> Result<Report> {
        let plan = self.plan;
        let engine = open_engine(backend, plan)?;
        let card = match plan.device {
            Device::Cpu => cpu_card(),
            _ => engine.backend_name(),
        };
        profile(
            &engine,
            &BackendClock(engine.backend()),
            self.memory,
            &card,
            plan,
        )
    }
}

/// The model the plan names, on backend `b`, with the plan's head.
pub fn open_engine<B: Backend>(b: B, plan: &Plan) -> Result<Engine<B>> {
    let mut engine = match &plan.model {
        ModelSpec::Dir(dir) => Engine::load(b, dir),
        ModelSpec::Synthetic(m) => Engine::synthetic(b, &m.config(plan.device)?, SEED),
    }?;
    install_head(&mut engine, plan)?;
    Ok(engine)
}

/// "AMD EPYC (2 threads)": the CPU's model name from /proc/cpuinfo and the worker threads used.
pub fn cpu_card() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{name} ({} threads)", rayon::current_num_threads())
}

/// What one measured call returned.
struct Outcome {
    generated: usize,
    timings: Timings,
    maps_s: f64,
}

/// Puts the plan's FastRM head on the engine (`--head`, else a random head of the model's size)
/// when the plan measures FastRM.
pub fn install_head<B: Backend>(engine: &mut Engine<B>, plan: &Plan) -> Result<()> {
    if !plan.methods.contains(&ProfMethod::FastRm) {
        return Ok(());
    }
    let d = engine.config().text.hidden_size;
    let w = match &plan.head {
        Some(p) => HeadWeights::load(p)?,
        None => HeadWeights::random(d, d, SEED),
    };
    engine.set_head(&w)
}

/// How the report describes the head.
fn head_note<B: Backend>(engine: &Engine<B>, plan: &Plan) -> Option<String> {
    let h = engine.head()?;
    let d = engine.config().text.hidden_size;
    Some(match &plan.head {
        Some(p) => format!("head {} ({})", p.display(), h.cfg.provenance),
        None => format!(
            "random head (hidden {d}, head dim {d}, seed {SEED}): a random head costs exactly \
             what a trained head of the same size does"
        ),
    })
}

/// One call of `method` producing exactly `n` tokens, through the engine's stream like every
/// other run.
fn call<B: Backend>(
    engine: &Engine<B>,
    method: ProfMethod,
    n: usize,
    req: &Request,
    full_r: bool,
) -> Result<Outcome> {
    let run = RunOptions {
        generate: GenerateOptions {
            max_new_tokens: n,
            stop_at_eos: false,
            keep_steps: false,
            ..Default::default()
        },
        method: method
            .relevancy()
            .map(|m| m.method(full_r && m == MethodName::Baseline, None, 0))
            .transpose()?,
        ..Default::default()
    };
    let c = collect(
        engine.stream(req, &run, &CancelToken::default()),
        &mut |_| {},
    )?;
    let (maps, generated) = (c.tokens.len(), c.generation.generated_ids.len());
    if run.method.is_some() && maps != generated {
        return Err(Error::Backend(format!(
            "{}: {maps} maps for {generated} tokens",
            method.name()
        )));
    }
    Ok(Outcome {
        generated,
        timings: c.generation.timings,
        maps_s: c.maps_s,
    })
}

/// Runs the plan on an open engine: every method once unrecorded at the shortest length, then at
/// each length an unrecorded plain generation and every method (`generate` first) `plan.repeat`
/// times.
pub fn profile<B: Backend, C: PhaseClock>(
    engine: &Engine<B>,
    clock: &C,
    memory: MemorySource,
    card: &str,
    plan: &Plan,
) -> Result<Report> {
    let cfg = engine.config().clone();
    // The prompt: tokenized question with the image when the model has a tokenizer, else the
    // engine's id-level request (what `--model synthetic:…` runs everywhere).
    let (req, prompt_desc) = if engine.text().is_some() {
        (
            Request::question(plan.image.as_path(), plan.prompt.as_str()),
            format!("{:?} with the image", plan.prompt),
        )
    } else {
        let req = Request::Ids {
            n_text: SYNTHETIC_TEXT_IDS,
            seed: SEED,
        };
        let desc = format!(
            "synthetic ids: BOS + {} image tokens + {SYNTHETIC_TEXT_IDS} text ids, seeded pixels",
            cfg.vision.num_patches()
        );
        (req, desc)
    };
    // Resolved once: the runs measure the model, not decoding the image file.
    let (prompt, pixels) = engine.resolve(&req)?;
    let ids = prompt.ids().to_vec();
    let req = Request::Prepared { prompt, pixels };
    let longest = *plan.tokens.last().expect("validated non-empty");
    let ctx = cfg.text.max_position_embeddings;
    if ids.len() + longest - 1 > ctx {
        return Err(Error::input(format!(
            "--tokens {longest}: the prompt's {} positions plus {longest} generated tokens exceed \
             the model's context of {ctx}",
            ids.len()
        )));
    }
    status::say("profile: measuring the memory bandwidth");
    let roofline = roofline::Roofline::measure(
        engine.backend(),
        &engine.model().llm,
        engine.kv_page_bytes(),
        plan.device,
    )?;
    let result = run_all(engine, clock, memory, plan, &req);
    status::clear();
    let runs = result?;
    Ok(Report::new(
        report::Meta {
            model: plan.model.label(),
            device: plan.device.to_string(),
            backend: engine.backend_name(),
            card: card.into(),
            date_utc: report::utc_now(),
            timer: clock.describe().into(),
            memory: String::new(),
            hidden_size: cfg.text.hidden_size,
            layers: cfg.text.num_hidden_layers,
            patches: cfg.vision.num_patches(),
            prompt_len: ids.len(),
            prompt: prompt_desc,
            tokens: plan.tokens.clone(),
            methods: plan.methods.clone(),
            full_r: plan.full_r,
            repeat: plan.repeat,
            head: head_note(engine, plan),
            warmup: format!(
                "every method once at {} tokens before any measurement, and one plain generation \
                 at each length before its runs; none recorded",
                plan.tokens[0]
            ),
            roofline,
        },
        memory,
        plan.interval,
        runs,
    ))
}

fn run_all<B: Backend, C: PhaseClock>(
    engine: &Engine<B>,
    clock: &C,
    memory: MemorySource,
    plan: &Plan,
    req: &Request,
) -> Result<Vec<RunRecord>> {
    let total = plan.tokens.len() * plan.methods.len() * plan.repeat;
    let mut done = 0;
    let mut runs = Vec::new();
    // Each method's first call pays for what later calls reuse (device kernels loaded on first
    // launch, cuBLAS's per-shape setup, the pool's first growth); none of that is the method's
    // cost.
    for &method in &plan.methods {
        status::say(&format!("profile: warm-up of {}", method.name()));
        call(engine, method, plan.tokens[0], req, plan.full_r)?;
    }
    for &n in &plan.tokens {
        // Warm-up, not recorded: the first run after a heavy one (the previous length's
        // baselines) pays for the allocator's changed state — fresh page faults, a moved mmap
        // threshold — which would be charged to plain generation and make the maps' cost of the
        // method measured next look negative.
        status::say(&format!("profile: warm-up at {n} tokens"));
        call(engine, ProfMethod::Generate, n, req, false)?;
        for &method in &plan.methods {
            let mut reps = Vec::with_capacity(plan.repeat);
            for _ in 0..plan.repeat {
                done += 1;
                status::say(&format!(
                    "profile: {} at {n} tokens (run {done}/{total})",
                    method.name()
                ));
                // What the previous run left in the pool is released and the ledger's peaks
                // restart, so this run's peaks are its own.
                engine.backend().trim_and_sync()?;
                let mem = PhaseMemory::begin(memory, plan.interval)?;
                let timed = clock.time(|| call(engine, method, n, req, plan.full_r));
                let used: MemoryUse = mem.end()?;
                let (out, secs) = timed?;
                let ledger = report::LedgerUse {
                    peak_bytes: engine.backend().memory_peak().map(|b| b as u64),
                    tag_peaks: engine
                        .backend()
                        .memory_breakdown()
                        .into_iter()
                        .map(|(tag, _, peak)| (tag, peak as u64))
                        .collect(),
                };
                if out.generated != n {
                    return Err(Error::Backend(format!(
                        "{} produced {} tokens where {n} were forced",
                        method.name(),
                        out.generated
                    )));
                }
                reps.push((out, secs, used, ledger));
            }
            runs.push(RunRecord::from_repeats(
                method,
                n,
                reps.into_iter()
                    .map(|(o, s, u, l)| report::Rep {
                        latency_s: s,
                        vision_s: o.timings.vision_s,
                        prefill_s: o.timings.prefill_s,
                        decode_s: o.timings.decode_s,
                        maps_s: o.maps_s,
                        memory: u,
                        ledger: l,
                    })
                    .collect(),
            ));
        }
    }
    Ok(runs)
}
