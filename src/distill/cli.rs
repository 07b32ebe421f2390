//! `fastrm distill`'s arguments (flattened into the binary's subcommand enum).

use std::path::PathBuf;

use crate::explain::MethodName;

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
    #[arg(long, value_enum, default_value = "baseline")]
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
    pub device: crate::cli::DeviceArgs,
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
