//! Command-line arguments that several commands share (clap derives; flattened into each).

use crate::engine::{Device, Dtype};
use crate::error::{Error, Result};

/// Where a command runs.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda (GPU 0), cuda:N (GPU N), or sim (the simulated CUDA device, in builds with
    /// `--features sim`: the CUDA backend's code and kernels on the CPU, slowly).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Storage type on a CUDA device: f16 (default), bf16 or f32; the CPU computes in f32.
    #[arg(long)]
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
        if self.device == Device::Cpu && matches!(self.dtype, Some(Dtype::F16 | Dtype::Bf16)) {
            return Err(Error::input(
                "--dtype f16/bf16 applies to CUDA devices; the CPU backend computes in f32",
            ));
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
