//! The command line's arguments (clap derives) and their translation into the library's option
//! structs: every flag is described here once; the library never sees clap.

use std::ffi::OsStr;
use std::marker::PhantomData;
use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

use crate::distill::{DistillOptions, MergeOptions, ShardSpec};
use crate::engine::{Device, Dtype};
use crate::error::{Error, Result};
use crate::eval::EvalOptions;
use crate::explain::MethodName;
use crate::profile::{parse_methods, parse_tokens, ProfileOptions};
use crate::train::{TrainJob, TrainOptions};
use crate::util::Named;

/// Parses a [`Named`] enum; `--help` lists its values with their help lines.
#[derive(Clone)]
pub struct NamedParser<T>(PhantomData<T>);

pub fn named<T: Named>() -> NamedParser<T> {
    NamedParser(PhantomData)
}

impl<T: Named> NamedParser<T> {
    fn values() -> impl Iterator<Item = PossibleValue> {
        T::ALL
            .iter()
            .map(|v| PossibleValue::new(v.name()).help(v.help()))
    }
}

impl<T: Named> TypedValueParser for NamedParser<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> std::result::Result<T, clap::Error> {
        // The list parser's error names the flag, the value and the choices.
        let name = PossibleValuesParser::new(Self::values()).parse_ref(cmd, arg, value)?;
        T::from_name(&name)
            .ok_or_else(|| clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(Self::values()))
    }
}

/// Where a command runs.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda (GPU 0), cuda:N (GPU N), or sim (the simulated CUDA device, in builds with
    /// `--features sim`: the CUDA backend's code and kernels on the CPU, slowly).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Storage type on a CUDA device: f16 (default), bf16 or f32. On the CPU (f32 arithmetic),
    /// how weight matrices are held: by default as the checkpoint stores them (f16/bf16 stay
    /// memory-mapped, no copy); f32 copies everything (the exact-parity path, 4 bytes a value);
    /// f16/bf16 hold them in that type.
    #[arg(long, value_parser = named::<Dtype>())]
    pub dtype: Option<Dtype>,
    /// CPU worker threads (default: one per core; RAYON_NUM_THREADS works too).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

impl DeviceArgs {
    /// The device and storage type, after setting up the CPU thread pool.
    pub fn get(&self) -> Result<(Device, Option<Dtype>)> {
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(Error::input("--threads must be at least 1"));
            }
            // The global pool can be built once per process; a second call (tests running
            // several commands in one process) keeps the first.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
        }
        tracing::debug!(
            device = %self.device,
            dtype = ?self.dtype,
            cpu_threads = rayon::current_num_threads(),
            "device chosen"
        );
        Ok((self.device, self.dtype))
    }
}

/// Build a FastRM training set: greedy answers, baseline maps and last hidden states.
#[derive(Debug, Clone, clap::Args)]
pub struct DistillArgs {
    /// Model folder in the HF llava-hf layout.
    #[arg(long)]
    pub model: PathBuf,
    /// Questions: the VQA v2 questions JSON or JSONL ({"image","question","answers"?} per line).
    #[arg(long)]
    pub questions: PathBuf,
    /// Images folder (COCO file names for VQA; the base of relative JSONL paths).
    #[arg(long)]
    pub images: PathBuf,
    /// Output folder: manifest.json and shard-NNNNN.safetensors. Rerunning resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// The gradient method that labels the maps: baseline (exact, streamed rows) or
    /// baseline-incremental.
    #[arg(long, value_parser = named::<MethodName>(), default_value = "baseline")]
    pub method: MethodName,
    /// Only the first N questions of the file.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Stop each answer after this many generated tokens (EOS stops earlier).
    #[arg(long, default_value_t = 10)]
    pub max_new_tokens: usize,
    /// Do not append " Answer the question using up to two words." to each question.
    #[arg(long)]
    pub no_suffix: bool,
    /// Samples per shard (default 16; a resumed folder keeps its own).
    #[arg(long)]
    pub shard_size: Option<usize>,
    /// I/N: only the questions whose index k in the file has k mod N = I (0 ≤ I < N), for N
    /// processes sharing one question file; `fastrm merge` joins their folders into the set one
    /// run would write.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl DistillArgs {
    pub fn options(self) -> Result<DistillOptions> {
        let shard = self.shard.as_deref().map(ShardSpec::parse).transpose()?;
        let (device, dtype) = self.device.get()?;
        Ok(DistillOptions {
            model: self.model,
            questions: self.questions,
            images: self.images,
            out: self.out,
            method: self.method,
            limit: self.limit,
            max_new_tokens: self.max_new_tokens,
            no_suffix: self.no_suffix,
            shard_size: self.shard_size,
            shard,
            device,
            dtype,
        })
    }
}

/// Join the folders of `distill --shard I/N` runs (every I of one N) into the data set a single
/// `distill` over the whole question file writes.
#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    /// The merged data set's folder (new or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// The shard folders, in any order.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

impl MergeArgs {
    pub fn options(self) -> MergeOptions {
        MergeOptions {
            out: self.out,
            inputs: self.inputs,
        }
    }
}

/// `fastrm train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Data folder written by `fastrm distill` (manifest.json and shards).
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the head (head.safetensors); the loss curve goes next to it as
    /// `<out>.loss.csv` and `<out>.loss.png`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = TrainOptions::default().steps)]
    pub steps: usize,
    /// Tokens per step.
    #[arg(long, default_value_t = TrainOptions::default().batch)]
    pub batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().lr)]
    pub lr: f64,
    /// A patch is relevant when its baseline value is at least this fraction of the map's max.
    /// Default: the data set's (manifest.json).
    #[arg(long)]
    pub label_threshold: Option<f32>,
    /// The head's query/key width. Default: the hidden size.
    #[arg(long)]
    pub head_dim: Option<usize>,
    #[arg(long, default_value_t = TrainOptions::default().seed)]
    pub seed: u64,
    /// Fraction of the samples held out for the validation loss (0: none).
    #[arg(long, default_value_t = TrainOptions::default().val_fraction)]
    pub val_fraction: f64,
    /// Validation loss every N steps (default: about 50 points over the run).
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl TrainArgs {
    pub fn job(self) -> Result<TrainJob> {
        let options = TrainOptions {
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            label_threshold: self.label_threshold,
            head_dim: self.head_dim,
            seed: self.seed,
            val_fraction: self.val_fraction,
            eval_every: self.eval_every,
        };
        let (device, dtype) = self.device.get()?;
        Ok(TrainJob {
            data: self.data,
            out: self.out,
            options,
            device,
            dtype,
        })
    }
}

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
    pub device: DeviceArgs,
}

impl EvalArgs {
    pub fn options(self) -> Result<EvalOptions> {
        let (device, dtype) = self.device.get()?;
        Ok(EvalOptions {
            model: self.model,
            head: self.head,
            data: self.data,
            out: self.out,
            questions: self.questions,
            images: self.images,
            limit: self.limit,
            no_perturbation: self.no_perturbation,
            write_threshold: self.write_threshold,
            layer: self.layer,
            device,
            dtype,
        })
    }
}

/// `fastrm profile`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProfileArgs {
    /// Model folder (HF llava-hf layout), or synthetic:tiny (the demo model's shapes),
    /// synthetic:midsize (benches/midsize_config.json), synthetic:llava-1.5-7b / -13b (device
    /// backends only): random weights, no tokenizer. Default: the bundled demo model.
    #[arg(short, long)]
    pub model: Option<String>,
    // On a GPU memory comes from NVML (the GPU's used memory); on `sim` it is the process's own
    // (host memory, for rehearsals; the simulator's times mean nothing). Not a doc comment: clap
    // drops those on flattened groups.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Output lengths, comma-separated; every run generates exactly this many tokens (EOS is
    /// ignored so runs are comparable).
    #[arg(long, default_value = "10,20,50,100")]
    pub tokens: String,
    /// Comma-separated: generate, fastrm, baseline, baseline-incremental. generate is always run:
    /// the maps' cost is measured against it.
    #[arg(long, default_value = "generate,fastrm,baseline,baseline-incremental")]
    pub methods: String,
    /// baseline: materialise every layer's cam and the full R, as the paper's baseline does.
    #[arg(long)]
    pub full_r: bool,
    /// FastRM head file; default: a random head of the model's size (same cost as a trained one).
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// Image for the prompt (default: the bundled demo photo; its content does not change costs).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Question for models with a tokenizer (synthetic models use a fixed-length id prompt).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Runs per method and length: the median latency with its spread (min, max, standard
    /// deviation) and the largest peak are reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Memory sampling interval in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub sample_ms: u64,
    /// Write profile.json, profile.txt, latency.png and memory.png into this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl ProfileArgs {
    pub fn options(self) -> Result<ProfileOptions> {
        let (device, dtype) = self.device.get()?;
        Ok(ProfileOptions {
            methods: parse_methods(&self.methods)?,
            tokens: parse_tokens(&self.tokens)?,
            model: self.model,
            device,
            dtype,
            full_r: self.full_r,
            head: self.head,
            image: self.image,
            prompt: self.prompt,
            repeat: self.repeat,
            sample_ms: self.sample_ms,
            out: self.out,
        })
    }
}

/// `fastrm serve`.
#[cfg(feature = "serve")]
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model folder in the HF llava-hf layout. Default: the bundled demo model and its head.
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// FastRM head file (head.safetensors) for `"relevancy": {"method": "fastrm"}`. Default with
    /// the demo model: its own head.
    #[arg(long)]
    pub head: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long, default_value_t = ServeOptions::default().host)]
    pub host: String,
    /// 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value_t = ServeOptions::default().port)]
    pub port: u16,
    /// Requests that may wait for the engine while it runs another; more get 429.
    #[arg(long, default_value_t = ServeOptions::default().max_queue)]
    pub max_queue: usize,
    /// Largest accepted image, in bytes after base64 decoding.
    #[arg(long, default_value_t = ServeOptions::default().max_image_bytes)]
    pub max_image_bytes: usize,
    /// Largest accepted image, in pixels (width × height).
    #[arg(long, default_value_t = ServeOptions::default().max_image_pixels)]
    pub max_image_pixels: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = ServeOptions::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Accept browser requests from this origin (e.g. https://app.example.com; repeat for
    /// several). Requests whose Origin is another site are refused, so that a web page cannot
    /// drive a server on its visitor's machine; the viewer at / is same-origin.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Requests decoded together, one token each per batched step (1 to 32); more wait in the
    /// queue.
    #[arg(long, default_value_t = ServeOptions::default().max_batch)]
    pub max_batch: usize,
    /// Prompt positions one step runs through the decoder (default 0: each prompt whole): a
    /// new request's prefill is spread over steps, so the answers being decoded are held up by
    /// at most N positions' work a step. On the CPU each chunk costs extra (the weights are
    /// repacked for every product).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub prefill_chunk: usize,
    /// A fixed KV cache size (e.g. 4GiB, 512MiB, 2e9), taken once and never exceeded; a request
    /// that cannot get pages waits while others hold them. Default: grows with demand.
    #[arg(long, value_parser = crate::util::parse_bytes)]
    pub kv_memory: Option<u64>,
    /// KV pages of earlier prompts and answers kept so that a conversation's next turn, or
    /// another question about the same image, computes only its new tokens (e.g. 2GiB; 0: off).
    /// Cached pages are part of the KV cache and give way to requests that need room. Default:
    /// one full context's worth.
    #[arg(long, value_parser = crate::util::parse_bytes_or_zero)]
    pub prefix_cache: Option<u64>,
    /// Seconds a connection may take to send a whole request head — new, between two requests
    /// (idle) or sending slowly — before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_seconds)]
    pub header_timeout: f64,
    /// Seconds a request body may take to arrive after its head (408 otherwise).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = parse_seconds)]
    pub body_timeout: f64,
    /// Seconds requests in flight get to finish after SIGINT/SIGTERM; streams still running
    /// then end with an error chunk and stalled connections are dropped.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = parse_seconds)]
    pub shutdown_timeout: f64,
    /// Fetch http(s) image URLs in requests (otherwise refused by name): from public addresses
    /// only, every redirect checked again, under --image-url-timeout and --max-image-bytes.
    #[arg(long)]
    pub allow_image_urls: bool,
    /// With --allow-image-urls, fetch from private, loopback and link-local addresses too (a
    /// client could then make the server read from its own network).
    #[arg(long, requires = "allow_image_urls")]
    pub allow_private_image_urls: bool,
    /// With --allow-image-urls, seconds one image's whole fetch may take (redirects and body
    /// included).
    #[arg(long, value_name = "SECS", requires = "allow_image_urls", value_parser = parse_seconds)]
    pub image_url_timeout: Option<f64>,
    /// Sleep this many milliseconds after each decode step. For tests: the demo model answers
    /// faster than a test can observe a queue or a disconnect.
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_token_delay_ms: u64,
}

#[cfg(feature = "serve")]
use crate::serve::ServeOptions;

#[cfg(feature = "serve")]
impl ServeArgs {
    pub fn options(self) -> Result<ServeOptions> {
        let (device, dtype) = self.device.get()?;
        Ok(ServeOptions {
            model: self.model,
            head: self.head,
            device,
            dtype,
            host: self.host,
            port: self.port,
            max_queue: self.max_queue,
            max_image_bytes: self.max_image_bytes,
            max_image_pixels: self.max_image_pixels,
            max_body_bytes: self.max_body_bytes,
            cors_origins: self.cors_origins,
            max_batch: self.max_batch,
            prefill_chunk: (self.prefill_chunk > 0).then_some(self.prefill_chunk),
            kv_memory: self.kv_memory,
            prefix_cache: self.prefix_cache,
            timeouts: crate::serve::conn::Timeouts {
                header: std::time::Duration::from_secs_f64(self.header_timeout),
                body: std::time::Duration::from_secs_f64(self.body_timeout),
                shutdown: std::time::Duration::from_secs_f64(self.shutdown_timeout),
            },
            image_urls: self
                .allow_image_urls
                .then(|| crate::serve::fetch::ImageUrls {
                    allow_private: self.allow_private_image_urls,
                    timeout: self.image_url_timeout.map_or(
                        crate::serve::fetch::ImageUrls::default().timeout,
                        std::time::Duration::from_secs_f64,
                    ),
                }),
            test_token_delay_ms: self.test_token_delay_ms,
        })
    }
}

/// `fastrm synth-model`.
#[derive(clap::Args)]
pub struct SynthModelArgs {
    /// The folder to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// A published config to write: llava-1.5-7b (the llava-hf config.json, 14 GB in f16) or
    /// llava-v1.6-mistral-7b (15 GB).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    pub like: Option<String>,
    /// A config.json file to write instead (e.g. benches/midsize_config.json: 0.1 GB in f16).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Stored dtype of the weights.
    #[arg(long, value_parser = named::<Dtype>(), default_value = "f16")]
    pub dtype: Dtype,
    /// Number of safetensors shards (model-0000N-of-0000S.safetensors + index; 1: model.safetensors).
    #[arg(long, default_value_t = 3)]
    pub shards: usize,
    /// Seed of the weights (the values `synthetic:` models draw with the same seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A positive, finite number of seconds (at most a day).
#[cfg(feature = "serve")]
fn parse_seconds(text: &str) -> std::result::Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!("`{text}` is not a number of seconds in (0, 86400]")),
    }
}
