//! `fastrm generate` and `fastrm explain`: one request through the engine, printed as the answer
//! (and a table of maps) or as one JSON object, with the heatmaps written on request.

use std::path::PathBuf;

use clap::Args;
use std::collections::BTreeMap;

use serde::Serialize;

use super::args::named;
use super::term::{outln, StatusLine};
use crate::engine::report;
use crate::engine::TokenLogprobs;
use crate::engine::{
    collect, AnyEngine, CancelToken, Confidence, Explained, Generation, ImageInput, Item, Method,
    Request, RunOptions, TokenMap,
};
use crate::explain::{MethodName, RowMode};
use crate::model::llava::StopReason;
use crate::model::sampling::Sampling;
use crate::text::Turn;
use crate::{Error, GenerateOptions, Result};

fn to_json(doc: &impl Serialize) -> Result<String> {
    crate::util::json_text(doc, false)
}

/// Text tokens after the image in an id-level (synthetic model) request: about a short question.
const SYNTHETIC_TEXT_TOKENS: usize = 40;

/// What every run needs: which model, which image, which question, how long an answer.
#[derive(Args)]
pub struct RunArgs {
    /// Model folder in the HF llava-hf layout (config.json, safetensors, tokenizer.json), or
    /// `synthetic:llava-1.5-7b` / `synthetic:llava-1.5-13b` (random weights of those shapes, made
    /// on the device; id-level: the prompt is a fixed image + 40 text ids, the answer is ids).
    /// Default: the bundled tiny demo model.
    #[arg(short, long)]
    model: Option<String>,
    /// Image file (PNG or JPEG); repeat for several images, placed in this order before the
    /// question (one `<image>` each). Default with the demo model: the bundled demo scene.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// The user's question (`-`: read it from standard input); the LLaVA-1.5 chat template is
    /// applied by the engine.
    #[arg(short, long, required_unless_present = "messages", default_value = "")]
    prompt: String,
    /// A conversation instead of --prompt and --image: a JSON file holding OpenAI's `messages`
    /// array (system, user and assistant messages; text as a string or parts), its images (any
    /// number, none included) as `image_url` parts of user messages: file paths (relative to the
    /// JSON file's folder) or data:image/png;base64,... URLs.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "image"])]
    messages: Option<PathBuf>,
    /// Stop after this many generated tokens (EOS stops earlier).
    #[arg(short = 'n', long, default_value_t = 64)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    device: super::args::DeviceArgs,
    /// A fixed KV cache size (e.g. 2GiB), taken once and never exceeded; a run that does not
    /// fit is refused with the pages it needs. Default: what the run needs.
    #[arg(long, value_parser = crate::util::parse_bytes)]
    kv_memory: Option<u64>,
    /// Print one JSON object on stdout instead of the human-readable answer.
    #[arg(long)]
    json: bool,
}

/// How tokens are chosen; the defaults are greedy decoding.
#[derive(Args)]
struct SamplingArgs {
    /// Sample at this temperature (0: greedy, the default).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample only from the most likely tokens whose probabilities add up to this (0 < p ≤ 1).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Sample only from the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// The random stream's seed: the same seed, the same answer.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Penalise tokens already in the answer (transformers' repetition_penalty; 1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Subtract this from the logits of tokens already in the answer (-2 … 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtract this per occurrence from the logits of tokens already in the answer (-2 … 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// End the answer where this text first appears (left out); repeat for several.
    #[arg(long)]
    stop: Vec<String>,
    /// Report each token's log-probability and its N most likely alternatives (0 … 20).
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
}

impl SamplingArgs {
    fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            logprobs: self.logprobs,
            stop_ids: Vec::new(),
        }
    }
}

/// `--prompt -`: the question from standard input, without its final line break. Synthetic
/// models run at the id level and take no question, so nothing is read for them.
fn read_prompt(run: &mut RunArgs) -> Result<()> {
    if run.prompt != "-" || is_synthetic(run) || run.messages.is_some() {
        return Ok(());
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
        .map_err(|e| Error::io("<stdin>", e))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::input("--prompt -: standard input is not UTF-8 text"))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(Error::input("--prompt -: standard input is empty"));
    }
    run.prompt = text.to_string();
    Ok(())
}

/// What `explain` adds to a run.
#[derive(Args)]
pub struct ExplainArgs {
    /// Default: fastrm (the bundled demo model carries its trained head; other models need
    /// --head).
    #[arg(long, value_parser = named::<MethodName>(), default_value = "fastrm")]
    method: MethodName,
    /// Baseline only: materialise every layer's cam and the full relevance matrix R, as the
    /// paper's baseline does (same maps, the paper's cost).
    #[arg(long)]
    full_r: bool,
    /// GradCAM only: the decoder layer (0-based; default: the middle layer).
    #[arg(long)]
    layer: Option<usize>,
    /// FastRM only: the head file (head.safetensors).
    #[arg(long)]
    head: Option<PathBuf>,
    /// Write one heatmap PNG per token, a contact sheet and explain.json into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `fastrm generate`.
pub fn generate(mut run: RunArgs) -> Result<()> {
    read_prompt(&mut run)?;
    if run.max_new_tokens == 0 {
        return Err(Error::input("--max-new-tokens must be at least 1"));
    }
    let run = &run;
    let opts = options(run)?;
    let (engine, input, progress) = start(run)?;
    let req = input.request(run);
    let run_opts = RunOptions {
        generate: opts,
        // The document carries them, so another implementation can be checked against this one.
        first_logits: run.json,
        ..Default::default()
    };
    let c = crate::with_engine!(&engine, |e| collect(
        e.stream(&req, &run_opts, &CancelToken::default()),
        &mut |item| progress.event(item)
    ));
    progress.clear();
    let g = c?.generation;
    if run.json {
        outln!("{}", to_json(&run_doc(&engine, run, &input, &g, None))?)
    } else {
        outln!("{}", g.text.trim())
    }
}

/// `fastrm explain`.
pub fn explain(mut run: RunArgs, args: ExplainArgs) -> Result<()> {
    if run.max_new_tokens == 0 {
        return Err(Error::input("--max-new-tokens must be at least 1"));
    }
    read_prompt(&mut run)?;
    let method = args.method;
    if args.full_r && method != MethodName::Baseline {
        return Err(Error::input("--full-r applies to --method baseline only"));
    }
    if args.layer.is_some() && method != MethodName::Gradcam {
        return Err(Error::input("--layer applies to --method gradcam only"));
    }
    if args.head.is_some() && method != MethodName::Fastrm {
        return Err(Error::input("--head applies to --method fastrm only"));
    }
    let (run, args) = (&run, &args);
    // FastRM's head: --head, else the bundled demo model's own head, else (synthetic models) a
    // random head of the model's size, which costs what a trained one does.
    let head = match (&args.head, run.model.is_none()) {
        (Some(h), _) => Some(h.clone()),
        (None, true) if args.method == MethodName::Fastrm => Some(crate::demo::head_path()?),
        _ => None,
    };
    if head.is_none() && args.method == MethodName::Fastrm && !is_synthetic(run) {
        return Err(Error::input(
            "--method fastrm needs --head FILE (only the bundled demo model comes with a head)",
        ));
    }
    let opts = options(run)?;
    // Fail on an unusable output folder before any expensive work.
    let staging = args.out.as_deref().map(report::Staging::new).transpose()?;
    let (mut engine, input, progress) = start(run)?;
    if let Some(h) = &head {
        engine.load_head(h)?;
    } else if args.method == MethodName::Fastrm {
        // A synthetic model gets a random head of its size: it costs what a trained one does.
        let d = engine.config().text.hidden_size;
        engine.set_head(&crate::explain::fastrm::HeadWeights::random(d, d, 7))?;
    }
    let n_layers = engine.config().text.num_hidden_layers;
    let method = args.method.method(args.full_r, args.layer, n_layers)?;
    let req = input.request(run);
    let ex = crate::with_engine!(&engine, |e| e
        .explain(&req, &opts, method, &mut |item| { progress.event(item) }));
    let ex = match ex {
        Ok(ex) => ex,
        Err(e) => {
            progress.clear();
            return Err(e);
        }
    };
    let doc = run_doc(&engine, run, &input, &ex.generation, Some(&ex));
    if let Some(staging) = staging {
        let images = input.images();
        if images.is_empty() {
            progress.clear();
            return Err(Error::input(
                "--out needs an image to draw on; synthetic models and text-only prompts have none",
            ));
        }
        progress.say("writing heatmaps");
        let views = images
            .iter()
            .map(|i| Ok(legible(engine.model_view(i)?)))
            .collect::<Result<Vec<_>>>()?;
        let written = staging.write(&views, &ex, &doc);
        progress.clear();
        written?;
    }
    progress.clear();
    if run.json {
        outln!("{}", to_json(&doc)?)
    } else {
        print_table(&ex)
    }
}

/// Where a run's inputs come from.
enum Input {
    /// `--image` (one or more) and `--prompt`.
    Images(Vec<PathBuf>),
    /// `--messages`: the conversation and its images, each with what reports call it.
    Chat {
        turns: Vec<Turn>,
        images: Vec<(ImageInput, String)>,
    },
    Synthetic,
}

impl Input {
    fn request(&self, run: &RunArgs) -> Request {
        match self {
            Input::Images(paths) => match &paths[..] {
                [one] => Request::question(one.as_path(), run.prompt.as_str()),
                several => Request::Chat {
                    turns: vec![Turn::new(
                        crate::text::Role::User,
                        several.len(),
                        run.prompt.as_str(),
                    )],
                    images: several
                        .iter()
                        .map(|p| ImageInput::Path(p.clone()))
                        .collect(),
                },
            },
            Input::Chat { turns, images } => Request::Chat {
                turns: turns.clone(),
                images: images.iter().map(|(i, _)| i.clone()).collect(),
            },
            Input::Synthetic => Request::Ids {
                n_text: SYNTHETIC_TEXT_TOKENS,
                seed: 0,
            },
        }
    }

    /// The images to draw heatmaps on, in the prompt's order.
    fn images(&self) -> Vec<ImageInput> {
        match self {
            Input::Images(paths) => paths.iter().map(|p| ImageInput::Path(p.clone())).collect(),
            Input::Chat { images, .. } => images.iter().map(|(i, _)| i.clone()).collect(),
            Input::Synthetic => Vec::new(),
        }
    }

    /// What reports call the images.
    fn image_names(&self) -> Vec<String> {
        match self {
            Input::Images(paths) => paths.iter().map(|p| p.display().to_string()).collect(),
            Input::Chat { images, .. } => images.iter().map(|(_, n)| n.clone()).collect(),
            Input::Synthetic => Vec::new(),
        }
    }
}

/// `--messages FILE`: the conversation, its images read from paths beside the file or `data:`
/// URLs.
fn read_messages(path: &std::path::Path) -> Result<Input> {
    let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let at = |e: crate::engine::chat::MessageError| {
        Error::input(format!(
            "--messages {}: {}: {}",
            path.display(),
            e.param,
            e.message
        ))
    };
    let conv = crate::engine::chat::parse_messages(&json).map_err(at)?;
    let mut images = Vec::with_capacity(conv.images.len());
    for img in &conv.images {
        // Files up to the largest image the server takes by default are read whole.
        images.push(
            match crate::engine::chat::data_url_bytes(&img.url, &img.param, 64 << 20).map_err(at)? {
                Some(bytes) => (
                    ImageInput::Bytes(bytes),
                    format!("{} ({})", img.param, "data URL"),
                ),
                None => {
                    let file = path
                        .parent()
                        .unwrap_or(std::path::Path::new("."))
                        .join(&img.url);
                    let name = file.display().to_string();
                    (ImageInput::Path(file), name)
                }
            },
        );
    }
    Ok(Input::Chat {
        turns: conv.turns,
        images,
    })
}

fn is_synthetic(run: &RunArgs) -> bool {
    run.model
        .as_deref()
        .is_some_and(|m| m.starts_with("synthetic:"))
}

/// Heatmaps are drawn on the image as the model sees it; a small model's view (the demo model's is
/// 112x112) is enlarged by an integer factor, nearest neighbour, to at least 336 pixels wide so the
/// maps and their captions stay legible.
fn legible(view: crate::vision::RgbImage) -> crate::vision::RgbImage {
    const MIN_WIDTH: usize = 336;
    let k = MIN_WIDTH.div_ceil(view.width.max(1));
    if k <= 1 {
        return view;
    }
    let (w, h) = (view.width * k, view.height * k);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let i = ((y / k) * view.width + x / k) * 3;
            data.extend_from_slice(&view.data[i..i + 3]);
        }
    }
    crate::vision::RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// Loads the engine, resolving the demo defaults, with a progress line started and the KV cache
/// sized.
fn start(run: &RunArgs) -> Result<(AnyEngine, Input, Progress)> {
    let (engine, input, progress) = load(run)?;
    engine
        .set_kv_memory(run.kv_memory)
        .map_err(|e| e.for_flag("--kv-memory"))?;
    Ok((engine, input, progress))
}

fn load(run: &RunArgs) -> Result<(AnyEngine, Input, Progress)> {
    let progress = Progress::new(run.max_new_tokens);
    let (device, dtype) = run.device.get()?;
    if let Some(name) = run
        .model
        .as_deref()
        .and_then(|m| m.strip_prefix("synthetic:"))
    {
        if !run.image.is_empty() {
            return Err(Error::input(
                "--image does not apply to synthetic models (they run at the id level)",
            ));
        }
        if run.messages.is_some() {
            return Err(Error::input(
                "--messages does not apply to synthetic models (they run at the id level)",
            ));
        }
        let cfg = crate::config::LlavaConfig::named(name).map_err(Error::Input)?;
        progress.say(&format!("making random weights for {name}"));
        let engine = AnyEngine::synthetic(device, dtype, &cfg, 0);
        progress.clear();
        return Ok((engine?, Input::Synthetic, progress));
    }
    if let Some(m) = &run.messages {
        let input = read_messages(m)?;
        let model_dir = match &run.model {
            Some(m) => PathBuf::from(m),
            None => crate::demo::model_dir()?,
        };
        progress.say(&format!("loading {}", model_dir.display()));
        let engine = AnyEngine::load(device, dtype, &model_dir);
        progress.clear();
        return Ok((engine?, input, progress));
    }
    let (model_dir, images) = match (&run.model, &run.image[..]) {
        (None, []) => (crate::demo::model_dir()?, vec![crate::demo::image_path()?]),
        (None, images) => (crate::demo::model_dir()?, images.to_vec()),
        (Some(_), []) => return Err(Error::input("--image is required with --model")),
        (Some(m), images) => (PathBuf::from(m), images.to_vec()),
    };
    progress.say(&format!("loading {}", model_dir.display()));
    let engine = AnyEngine::load(device, dtype, &model_dir);
    progress.clear();
    Ok((engine?, Input::Images(images), progress))
}

fn options(run: &RunArgs) -> Result<GenerateOptions> {
    let opts = GenerateOptions {
        max_new_tokens: run.max_new_tokens,
        sampling: run.sampling.sampling(),
        stop: run.sampling.stop.clone(),
        ..Default::default()
    };
    opts.validate()?;
    Ok(opts)
}

/// The `--json` document (and `--out`'s explain.json): the run's context, the generation, and
/// for `explain` its maps.
#[derive(Serialize)]
struct RunDoc<'a> {
    model: Option<String>,
    /// The prompt's images, in order.
    images: Vec<String>,
    /// The question, or a conversation as the chat template renders it.
    prompt: String,
    device: String,
    /// A square view's patch grid (LLaVA-1.5); each image's own geometry is in `image_layouts`.
    grid: [usize; 2],
    /// How each image became its tokens: `square` (one `grid` view), or `any_res` (LLaVA-NeXT:
    /// the picture's size, its tiles, the kept `rows` x `cols` of the tiles' patch grid from
    /// `offset`); a token's map lists the image's tokens in that order.
    image_layouts: &'a [crate::vision::ImageLayout],
    input_ids: &'a [u32],
    /// `generate --json`: the logits that chose the first token (the whole vocabulary).
    #[serde(skip_serializing_if = "Option::is_none")]
    first_step_logits: Option<&'a [f32]>,
    generated_ids: &'a [u32],
    text: &'a str,
    stop_reason: StopReason,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    logprobs: &'a [TokenLogprobs],
    timings_ms: TimingsMs,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    memory_bytes: BTreeMap<&'static str, MemoryUse>,
    #[serde(flatten)]
    maps: Option<MapsDoc<'a>>,
}

/// The phases in milliseconds, the maps' with `explain`.
#[derive(Serialize)]
struct TimingsMs {
    vision: f64,
    prefill: f64,
    decode: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    maps: Option<f64>,
}

#[derive(Serialize)]
struct MemoryUse {
    live: usize,
    peak: usize,
}

/// What `explain` adds.
#[derive(Serialize)]
struct MapsDoc<'a> {
    method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    layer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_r: Option<bool>,
    confidence: Confidence,
    tokens: &'a [TokenMap],
}

fn run_doc<'a>(
    engine: &AnyEngine,
    run: &'a RunArgs,
    input: &Input,
    g: &'a Generation,
    ex: Option<&'a Explained>,
) -> RunDoc<'a> {
    let grid = engine.config().vision.grid();
    let model = match engine.dir() {
        Some(d) => Some(d.display().to_string()),
        None => run.model.clone(),
    };
    let prompt = match input {
        Input::Chat { turns, .. } => match engine.text().map(|t| t.render_chat(turns)) {
            Some(Ok(text)) => text,
            _ => run.prompt.clone(),
        },
        _ => run.prompt.clone(),
    };
    RunDoc {
        model,
        images: input.image_names(),
        prompt,
        device: engine.backend_name(),
        grid: [grid, grid],
        image_layouts: &g.layouts,
        input_ids: &g.input_ids,
        first_step_logits: g.first_step_logits.as_deref(),
        generated_ids: &g.generated_ids,
        text: &g.text,
        stop_reason: g.stop_reason,
        logprobs: &g.logprobs,
        timings_ms: TimingsMs {
            vision: g.timings.vision_s * 1e3,
            prefill: g.timings.prefill_s * 1e3,
            decode: g.timings.decode_s * 1e3,
            maps: ex.map(|ex| ex.maps_s * 1e3),
        },
        memory_bytes: engine
            .memory_breakdown()
            .into_iter()
            .map(|(tag, live, peak)| (tag.name(), MemoryUse { live, peak }))
            .collect(),
        maps: ex.map(|ex| MapsDoc {
            method: ex.method.name(),
            layer: match ex.method {
                Method::GradCam { layer } => Some(layer),
                _ => None,
            },
            full_r: match ex.method {
                Method::Baseline { mode } => Some(mode == RowMode::FullR),
                _ => None,
            },
            confidence: ex.confidence,
            tokens: &ex.tokens,
        }),
    }
}

/// The human-readable form: the answer, then one line per token with its entropy and the grid
/// cell holding the most relevance.
fn print_table(ex: &Explained) -> Result<()> {
    outln!("{}", ex.generation.text.trim())?;
    outln!(
        "{:>4}  {:<16} {:>8}  peak (row, col)",
        "#",
        "token",
        "entropy"
    )?;
    for t in &ex.tokens {
        // The cell holding the most relevance, on the picture's grid of its image.
        let mut best = (0, (0, 0), f32::MIN);
        for (k, (part, layout)) in t
            .per_image()
            .into_iter()
            .zip(&ex.generation.layouts)
            .enumerate()
        {
            let ((_, cols), placed) = layout.place(part)?;
            for (i, &v) in placed.iter().enumerate() {
                if v > best.2 {
                    best = (k, (i / cols, i % cols), v);
                }
            }
        }
        let shown: String = format!("{:?}", t.text).chars().take(16).collect();
        let (image, (row, col), _) = best;
        let which = if t.images > 1 {
            format!("image {} ", image + 1)
        } else {
            String::new()
        };
        outln!(
            "{:>4}  {:<16} {:>8.4}  {which}({row}, {col})",
            t.index,
            shown,
            t.entropy,
        )?;
    }
    let c = &ex.confidence;
    match c.threshold {
        Some(t) => outln!(
            "confidence: {} (mean entropy {:.4} vs threshold {t:.4})",
            c.verdict(),
            c.mean_entropy
        ),
        None => outln!(
            "mean entropy {:.4} (no calibrated threshold)",
            c.mean_entropy
        ),
    }
}

/// Token and map progress of one generation on the status line.
struct Progress {
    status: StatusLine,
    max_new: usize,
    tokens: std::cell::Cell<usize>,
}

impl Progress {
    fn new(max_new: usize) -> Self {
        Progress {
            status: StatusLine::timed(),
            max_new,
            tokens: std::cell::Cell::new(0),
        }
    }

    fn say(&self, msg: &str) {
        self.status.say(msg)
    }

    fn bar(&self, what: &str, done: usize, total: usize) {
        self.status.progress(what, done, total, "")
    }

    fn event(&self, item: &Item) {
        match item {
            Item::ImageEncoded => self.say("prefill"),
            Item::Prefilled { prompt_len, .. } => {
                self.say(&format!("prefilled {prompt_len} positions"))
            }
            Item::Token(t) => {
                self.tokens.set(t.index + 1);
                self.bar("tokens", t.index + 1, self.max_new)
            }
            // Maps after generation: count against the tokens generated.
            Item::Map(m) => self.bar("maps  ", m.index + 1, self.tokens.get()),
            _ => {}
        }
    }

    fn clear(&self) {
        self.status.clear()
    }
}
