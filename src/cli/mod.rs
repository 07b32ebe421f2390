//! The `fastrm` command line (the `cli` feature): clap's argument types, the terminal, and each
//! command's translation into a library call. Errors print one line naming the problem and exit
//! non-zero; nothing here panics on user input. The library below never sees clap.

pub mod args;
mod reports;
pub mod run;
pub mod term;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{Error, Result};
use args::{DistillArgs, EvalArgs, MergeArgs, ProfileArgs, SynthModelArgs, TrainArgs};
use run::{ExplainArgs, RunArgs};
use term::{outln, StatusLine, Terminal};

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
        #[command(flatten)]
        ex: ExplainArgs,
    },
    /// Train the FastRM head on a distilled data set: Adam on per-patch BCE; head + loss curve.
    Train(TrainArgs),
    /// Build a FastRM training set: answers, baseline maps and hidden states, sharded; resumable.
    Distill(DistillArgs),
    /// Join the folders of `distill --shard I/N` runs into the data set one unsharded run writes.
    Merge(MergeArgs),
    /// Evaluate a FastRM head on a distilled set: F1 vs the baseline, perturbation AUCs, entropy
    /// confidence calibration, pointing game.
    Eval(EvalArgs),
    /// Latency and peak memory of generate, FastRM and the baselines over forced output lengths:
    /// a table, JSON and plots (the paper's latency/memory figure).
    Profile(ProfileArgs),
    /// An OpenAI-compatible chat-completions server (SSE streaming) whose answers can carry each
    /// token's relevancy map; one engine behind a bounded queue.
    #[cfg(feature = "serve")]
    Serve(args::ServeArgs),
    /// Write a model folder in the llava-hf hub layout with seeded synthetic weights (sharded
    /// safetensors + index, config, preprocessor config, tokenizer, a random FastRM head): a
    /// real-size checkpoint without a download.
    SynthModel(SynthModelArgs),
    /// Device check's pre-flight: open the CUDA backend, run one cuBLAS GEMM against the CPU and
    /// print the loaded driver/cuBLAS/NVML files, driver version and device name as JSON.
    #[command(hide = true)]
    GpuCheck {
        /// The simulated device instead of GPU 0 (builds with `--features sim`).
        #[arg(long)]
        sim: bool,
    },
}

/// The `fastrm` binary's whole body.
pub fn main() -> ExitCode {
    term::default_sigpipe();
    crate::profile::memory::keep_freed_memory();
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Library events go to stderr, filtered by `RUST_LOG` (e.g. `RUST_LOG=fastrm=debug`). The
/// default shows warnings only, so normal output stays the answer and the status line.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate { run } => run::generate(run),
        Cmd::Explain { run, ex } => run::explain(run, ex),
        // The library's jobs draw nothing themselves: they report through this terminal.
        Cmd::Distill(args) => job(StatusLine::timed(), || {
            reports::distilled(&crate::distill::run(args.options()?)?)
        }),
        Cmd::Merge(args) => job(StatusLine::plain(), || {
            reports::merged(&crate::distill::merge(args.options())?)
        }),
        Cmd::Train(args) => job(StatusLine::plain(), || {
            reports::trained(&crate::train::run(args.job()?)?)
        }),
        Cmd::Eval(args) => job(StatusLine::timed(), || {
            let json = args.json;
            let report = crate::eval::run(args.options()?)?;
            reports::eval(&report, json)
        }),
        Cmd::Profile(args) => job(StatusLine::plain(), || {
            let json = args.json;
            reports::profile(&crate::profile::run(args.options()?)?, json)
        }),
        #[cfg(feature = "serve")]
        Cmd::Serve(args) => job(StatusLine::plain(), || crate::serve::run(args.options()?)),
        Cmd::SynthModel(args) => job(StatusLine::timed(), || synth_model(&args)),
        Cmd::GpuCheck { sim } => gpu_check(sim),
    }
}

/// Runs a library job with the terminal as its [`crate::status::Ui`].
fn job(line: StatusLine, f: impl FnOnce() -> Result<()>) -> Result<()> {
    crate::status::install(Box::new(Terminal(line)));
    let r = f();
    crate::status::clear();
    r
}

fn synth_model(args: &SynthModelArgs) -> Result<()> {
    use crate::checkpoint::DType;
    use crate::synth;
    let config = match (&args.like, &args.config) {
        (Some(name), _) => match crate::config::hub_config(name) {
            Some(c) => c.to_string(),
            None => {
                return Err(Error::input(format!(
                    "--like {name}: known: llava-1.5-7b, llava-v1.6-mistral-7b (or pass \
                     --config FILE)"
                )))
            }
        },
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?,
        (None, None) => return Err(Error::input("give --like NAME or --config FILE")),
    };
    let opts = synth::SynthOptions {
        dtype: match args.dtype {
            crate::Dtype::F16 => DType::F16,
            crate::Dtype::Bf16 => DType::BF16,
            crate::Dtype::F32 => DType::F32,
        },
        shards: args.shards,
        seed: args.seed,
    };
    let t0 = std::time::Instant::now();
    let w = synth::write_model(&args.out, &config, &opts)?;
    crate::status::clear();
    outln!(
        "{}: {} tensors, {:.2} B parameters, {:.2} GB in {} shard(s), {:.1} s",
        w.dir.display(),
        w.tensors,
        w.parameters as f64 / 1e9,
        w.bytes as f64 / 1e9,
        w.shards.len(),
        t0.elapsed().as_secs_f64()
    )
}

/// `fastrm gpu-check`: see [`crate::backend::cuda::preflight`].
#[cfg(any(feature = "cuda", feature = "sim"))]
fn gpu_check(sim: bool) -> Result<()> {
    use crate::backend::cuda::{preflight, Cuda};
    let b = if sim {
        #[cfg(feature = "sim")]
        {
            Cuda::<half::f16>::simulated()
        }
        #[cfg(not(feature = "sim"))]
        return Err(Error::input(
            "gpu-check --sim needs a build with --features sim",
        ));
    } else {
        Cuda::<half::f16>::new(0)?
    };
    println!("{}", preflight::check(&b)?);
    Ok(())
}

#[cfg(not(any(feature = "cuda", feature = "sim")))]
fn gpu_check(_sim: bool) -> Result<()> {
    Err(Error::input(crate::backend::NO_CUDA))
}
