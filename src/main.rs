//! The `fastrm` command line. Errors print one line naming the problem and exit non-zero; nothing
//! here panics on user input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use fastrm::backend::cpu::Cpu;
use fastrm::engine::Event;
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

#[derive(Subcommand)]
enum Cmd {
    /// Greedy generation: answer a question about an image.
    Generate {
        /// Model folder in the HF llava-hf layout (config.json, safetensors, tokenizer.json).
        /// Default: the bundled tiny demo model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Image file (PNG or JPEG). Default with the demo model: the bundled demo photo.
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
        /// Print one JSON object on stdout instead of the answer text.
        #[arg(long)]
        json: bool,
    },
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
        Cmd::Generate {
            model,
            image,
            prompt,
            max_new_tokens,
            device,
            json,
        } => {
            if max_new_tokens == 0 {
                return Err(Error::input("--max-new-tokens must be at least 1"));
            }
            let (model_dir, image) = model_and_image(model, image)?;
            let progress = Progress::new(max_new_tokens);
            progress.say(&format!("loading {}", model_dir.display()));
            let engine = open(device, &model_dir)?;
            let opts = GenerateOptions {
                max_new_tokens,
                ..Default::default()
            };
            progress.say("encoding the image");
            let g = engine.generate_observed(&image, &prompt, &opts, &mut |e| progress.event(e));
            progress.clear();
            let g = g?;
            if json {
                let grid = engine.config().vision.grid();
                let out = json!({
                    "model": model_dir.display().to_string(),
                    "image": image.display().to_string(),
                    "prompt": prompt,
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
                });
                println!("{out}");
            } else {
                println!("{}", g.text.trim());
            }
            Ok(())
        }
    }
}

fn model_and_image(model: Option<PathBuf>, image: Option<PathBuf>) -> Result<(PathBuf, PathBuf)> {
    let demo = Path::new(DEMO_DIR);
    match (model, image) {
        (None, image) => Ok((
            demo.join("model"),
            image.unwrap_or_else(|| demo.join("image.jpg")),
        )),
        (Some(m), Some(i)) => Ok((m, i)),
        (Some(_), None) => Err(Error::input("--image is required with --model")),
    }
}

/// The engine on the chosen device, type-erased behind the one thing the CLI needs from it.
fn open(device: Device, dir: &Path) -> Result<Engine<Cpu>> {
    match device {
        Device::Cpu => Engine::load(Cpu, dir),
        Device::Cuda => Err(Error::Backend(
            "this build has no CUDA backend yet; use --device cpu".into(),
        )),
    }
}

/// A one-line status on stderr, redrawn in place; silent unless stderr is a terminal, so scripts
/// and `--json` consumers never see it.
struct Progress {
    enabled: bool,
    max_new: usize,
    start: std::time::Instant,
}

impl Progress {
    fn new(max_new: usize) -> Self {
        use std::io::IsTerminal;
        Progress {
            enabled: std::io::stderr().is_terminal(),
            max_new,
            start: std::time::Instant::now(),
        }
    }

    fn say(&self, msg: &str) {
        if self.enabled {
            let t = self.start.elapsed().as_secs_f64();
            eprint!("\r\x1b[2K[{t:6.1}s] {msg}");
        }
    }

    fn event(&self, e: Event) {
        match e {
            Event::ImageEncoded => self.say("prefill"),
            Event::Prefilled { prompt_len } => {
                self.say(&format!("prefilled {prompt_len} positions"))
            }
            Event::Token { index, .. } => {
                self.say(&format!("token {}/{}", index + 1, self.max_new))
            }
        }
    }

    fn clear(&self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}
