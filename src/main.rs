//! The `fastrm` command line. Errors print one line naming the problem and exit non-zero; nothing
//! here panics on user input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use fastrm::backend::cpu::Cpu;
use fastrm::engine::{Event, Explained, Generation, Method};
use fastrm::explain::{default_gradcam_layer, report, RowMode};
use fastrm::{Engine, Error, GenerateOptions, Result};

/// The bundled demo model and image, used when `--model` / `--image` are left out.
const DEMO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo");

#[derive(Parser)]
#[command(
    name = "fastrm",
    version,
    about = "LLaVA-1.5 inference with per-token visual relevancy maps"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum MethodArg {
    /// Exact Chefer gradient relevancy per token (one backward over the whole prefix each).
    Baseline,
    /// LVLM-Interpret's incremental rows: about two decode steps per later token.
    BaselineIncremental,
    /// LLM-layer GradCAM at one decoder layer (`--layer`, default the middle one).
    Gradcam,
    /// The learned FastRM head (`--head FILE`): one fused op per token on the decode step.
    Fastrm,
}

/// What every run needs: which model, which image, which question, how long an answer.
#[derive(Args)]
struct RunArgs {
    /// Model folder in the HF llava-hf layout (config.json, safetensors, tokenizer.json).
    /// Default: the bundled tiny demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Image file (PNG or JPEG). Default with the demo model: the bundled demo scene.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The user's question; the LLaVA-1.5 chat template is applied by the engine.
    #[arg(long)]
    prompt: String,
    /// Stop after this many generated tokens (EOS stops earlier).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// Print one JSON object on stdout instead of the human-readable answer.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Greedy generation: answer a question about an image.
    Generate {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Generation with a relevancy map over the image patches for every generated token.
    Explain {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, value_enum, default_value = "baseline")]
        method: MethodArg,
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
    },
    /// Train the FastRM head on a distilled data set: Adam on per-patch BCE; head + loss curve.
    Train(fastrm::train::TrainArgs),
    /// Build a FastRM training set: answers, baseline maps and hidden states, sharded; resumable.
    Distill(fastrm::distill::DistillArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate { run } => {
            let (engine, image, progress) = start(&run)?;
            let opts = options(&run);
            let g =
                engine.generate_observed(&image, &run.prompt, &opts, &mut |e| progress.event(e));
            progress.clear();
            let g = g?;
            if run.json {
                println!("{}", generation_json(&engine, &run, &image, &g));
            } else {
                println!("{}", g.text.trim());
            }
            Ok(())
        }
        Cmd::Explain {
            run,
            method,
            full_r,
            layer,
            head,
            out,
        } => {
            if full_r && method != MethodArg::Baseline {
                return Err(Error::input("--full-r applies to --method baseline only"));
            }
            if layer.is_some() && method != MethodArg::Gradcam {
                return Err(Error::input("--layer applies to --method gradcam only"));
            }
            if head.is_some() != (method == MethodArg::Fastrm) {
                return Err(Error::input(if head.is_some() {
                    "--head applies to --method fastrm only"
                } else {
                    "--method fastrm needs --head FILE (no trained head is bundled yet)"
                }));
            }
            // Fail on an unusable output folder before any expensive work.
            let staging = out.as_deref().map(report::Staging::new).transpose()?;
            let (mut engine, image, progress) = start(&run)?;
            if let Some(h) = &head {
                engine.load_head(h)?;
            }
            let n_layers = engine.config().text.num_hidden_layers;
            let method = match method {
                MethodArg::Baseline => Method::Baseline {
                    mode: if full_r {
                        RowMode::FullR
                    } else {
                        RowMode::Streamed
                    },
                },
                MethodArg::BaselineIncremental => Method::BaselineIncremental,
                MethodArg::Gradcam => Method::GradCam {
                    layer: layer.unwrap_or_else(|| default_gradcam_layer(n_layers)),
                },
                MethodArg::Fastrm => Method::FastRm,
            };
            let opts = options(&run);
            let ex = engine.explain_observed(&image, &run.prompt, &opts, method, &mut |e| {
                progress.event(e)
            });
            let ex = match ex {
                Ok(ex) => ex,
                Err(e) => {
                    progress.clear();
                    return Err(e);
                }
            };
            let mut doc = generation_json(&engine, &run, &image, &ex.generation);
            add_maps(&mut doc, &ex);
            if let Some(staging) = staging {
                progress.say("writing heatmaps");
                let view = legible(engine.model_view(&image)?);
                let written = staging.write(&view, &ex, &doc);
                progress.clear();
                written?;
            }
            progress.clear();
            if run.json {
                println!("{doc}");
            } else {
                print_table(&ex);
            }
            Ok(())
        }
        Cmd::Distill(args) => fastrm::distill::run(args),
        Cmd::Train(args) => fastrm::train::run(args),
    }
}

/// Heatmaps are drawn on the image as the model sees it; a small model's view (the demo model's is
/// 112x112) is enlarged by an integer factor, nearest neighbour, to at least 336 pixels wide so the
/// maps and their captions stay legible.
fn legible(view: fastrm::vision::RgbImage) -> fastrm::vision::RgbImage {
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
    fastrm::vision::RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// Loads the engine, resolving the demo defaults, with a progress line started.
fn start(run: &RunArgs) -> Result<(Engine<Cpu>, PathBuf, Progress)> {
    if run.max_new_tokens == 0 {
        return Err(Error::input("--max-new-tokens must be at least 1"));
    }
    let demo = Path::new(DEMO_DIR);
    let (model_dir, image) = match (&run.model, &run.image) {
        (None, image) => (
            demo.join("model"),
            image.clone().unwrap_or_else(|| demo.join("image.png")),
        ),
        (Some(m), Some(i)) => (m.clone(), i.clone()),
        (Some(_), None) => return Err(Error::input("--image is required with --model")),
    };
    let progress = Progress::new(run.max_new_tokens);
    progress.say(&format!("loading {}", model_dir.display()));
    let engine = match run.device {
        Device::Cpu => Engine::load(Cpu, &model_dir),
        Device::Cuda => Err(Error::Backend(
            "this build has no CUDA backend yet; use --device cpu".into(),
        )),
    };
    progress.clear();
    Ok((engine?, image, progress))
}

fn options(run: &RunArgs) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: run.max_new_tokens,
        ..Default::default()
    }
}

fn generation_json(engine: &Engine<Cpu>, run: &RunArgs, image: &Path, g: &Generation) -> Value {
    let grid = engine.config().vision.grid();
    let model = engine.dir.as_ref().map(|d| d.display().to_string());
    json!({
        "model": model,
        "image": image.display().to_string(),
        "prompt": run.prompt,
        "device": engine.backend_name(),
        "input_ids": g.input_ids,
        "generated_ids": g.generated_ids,
        "text": g.text,
        "stop_reason": g.stop_reason.as_str(),
        "grid": [grid, grid],
        "timings_ms": {
            "vision": g.timings.vision_s * 1e3,
            "prefill": g.timings.prefill_s * 1e3,
            "decode": g.timings.decode_s * 1e3,
        },
    })
}

fn add_maps(doc: &mut Value, ex: &Explained) {
    doc["method"] = json!(ex.method.name());
    if let Method::GradCam { layer } = ex.method {
        doc["layer"] = json!(layer);
    }
    if let Method::Baseline { mode } = ex.method {
        doc["full_r"] = json!(mode == RowMode::FullR);
    }
    doc["timings_ms"]["maps"] = json!(ex.maps_s * 1e3);
    doc["confidence"] = json!({
        "mean_entropy": ex.confidence.mean_entropy,
        "threshold": ex.confidence.threshold,
        "verdict": ex.confidence.verdict(),
        "tokens": ex.confidence.tokens,
    });
    doc["tokens"] = ex
        .tokens
        .iter()
        .map(|t| json!({"index": t.index, "id": t.id, "text": t.text, "map": t.map, "entropy": t.entropy}))
        .collect();
}

/// The human-readable form: the answer, then one line per token with its entropy and the grid
/// cell holding the most relevance.
fn print_table(ex: &Explained) {
    println!("{}", ex.generation.text.trim());
    println!(
        "{:>4}  {:<16} {:>8}  peak (row, col)",
        "#", "token", "entropy"
    );
    for t in &ex.tokens {
        let (best, _) =
            t.map
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        let shown: String = format!("{:?}", t.text).chars().take(16).collect();
        println!(
            "{:>4}  {:<16} {:>8.4}  ({}, {})",
            t.index,
            shown,
            t.entropy,
            best / ex.grid.1,
            best % ex.grid.1
        );
    }
    let c = &ex.confidence;
    match c.threshold {
        Some(t) => println!(
            "confidence: {} (mean entropy {:.4} vs threshold {t:.4})",
            c.verdict(),
            c.mean_entropy
        ),
        None => println!(
            "mean entropy {:.4} (no calibrated threshold)",
            c.mean_entropy
        ),
    }
}

/// A one-line status with a progress bar on stderr, redrawn in place. It appears only once a run
/// has taken more than a second (short runs stay quiet) and only when stderr is a terminal, so
/// scripts and `--json` consumers never see it.
struct Progress {
    enabled: bool,
    max_new: usize,
    start: std::time::Instant,
    shown: std::cell::Cell<bool>,
    tokens: std::cell::Cell<usize>,
}

impl Progress {
    fn new(max_new: usize) -> Self {
        use std::io::IsTerminal;
        Progress {
            enabled: std::io::stderr().is_terminal(),
            max_new,
            start: std::time::Instant::now(),
            shown: std::cell::Cell::new(false),
            tokens: std::cell::Cell::new(0),
        }
    }

    fn say(&self, msg: &str) {
        let t = self.start.elapsed().as_secs_f64();
        if self.enabled && t > 1.0 {
            eprint!("\r\x1b[2K[{t:6.1}s] {msg}");
            self.shown.set(true);
        }
    }

    fn bar(&self, what: &str, done: usize, total: usize) {
        const W: usize = 24;
        let total = total.max(done);
        let fill = W * done / total.max(1);
        let bar: String = (0..W).map(|i| if i < fill { '#' } else { '.' }).collect();
        self.say(&format!("{what} [{bar}] {done}/{total}"));
    }

    fn event(&self, e: Event) {
        match e {
            Event::ImageEncoded => self.say("prefill"),
            Event::Prefilled { prompt_len } => {
                self.say(&format!("prefilled {prompt_len} positions"))
            }
            Event::Token { index, .. } => {
                self.tokens.set(index + 1);
                self.bar("tokens", index + 1, self.max_new)
            }
            // Maps follow generation (or interleave with it): count against the tokens so far.
            Event::Explained { index } => self.bar("maps  ", index + 1, self.tokens.get()),
        }
    }

    fn clear(&self) {
        if self.shown.get() {
            eprint!("\r\x1b[2K");
        }
    }
}
