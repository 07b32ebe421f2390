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
    /// Storage type on a CUDA device: f16 (default), bf16 or f32. On the CPU (f32 arithmetic),
    /// how weight matrices are held: by default as the checkpoint stores them (f16/bf16 stay
    /// memory-mapped, no copy); f32 copies everything (the exact-parity path, 4 bytes a value);
    /// f16/bf16 hold them in that type.
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
        tracing::debug!(
            device = %self.device,
            dtype = ?self.dtype,
            cpu_threads = rayon::current_num_threads(),
            "device chosen"
        );
        Ok((self.device, self.dtype))
    }
}
