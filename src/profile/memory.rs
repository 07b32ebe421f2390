//! Memory measurement for profile runs: a [`Sampler`] thread that reads a [`MemoryProbe`] at a
//! fixed interval, and [`PhaseMemory`], which brackets one run and reports its baseline and peak.
//!
//! Two sources:
//! - **Device memory through NVML** ([`NvmlProbe`]): `nvml-wrapper` loads `libnvidia-ml.so.1` at
//!   run time, so the binary runs (and this module compiles) on machines without a driver; there
//!   opening the probe is an error with a clear message, never a panic. The device's used memory is
//!   sampled; its peak over a run is the maximum sample, so allocations that live shorter than the
//!   interval can be missed (the CUDA backend allocates from one arena up front, so its peaks are
//!   long-lived).
//! - **Process memory on the CPU** ([`RssProbe`], Linux `/proc/self/status`). `VmHWM` is the
//!   kernel's exact peak RSS but over the process's whole life, so for a per-run peak
//!   [`PhaseMemory`] first returns freed heap to the system (`malloc_trim`, glibc), then resets
//!   `VmHWM` to the current RSS by writing `5` to `/proc/self/clear_refs` (Linux ≥ 4.0, allowed for
//!   the process's own owner), and reads `VmHWM` at the end: an exact peak, no sampling error.
//!   Where the reset is refused (old kernels, some sandboxes), the peak is the maximum of the
//!   sampler's `VmRSS` readings instead, and the report says so. RSS counts every resident page of
//!   the process (weights, caches, the allocator's slack), so a run's own cost is its peak minus
//!   the RSS at its start.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Something that reports a memory figure in bytes; read repeatedly from the sampler thread.
pub trait MemoryProbe: Send {
    fn read(&mut self) -> Result<u64>;
}

/// Reads one `kB` field (`VmRSS`, `VmHWM`) of `/proc/self/status`, in bytes.
fn status_field(field: &str) -> Result<u64> {
    let path = "/proc/self/status";
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("process memory is read from /proc (Linux only): {e}"),
            ),
        )
    })?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kib * 1024)
        })
        .ok_or_else(|| Error::Backend(format!("{path} has no `{field}` line in kB")))
}

/// The process's resident set size now, in bytes.
pub fn rss_bytes() -> Result<u64> {
    status_field("VmRSS")
}

/// The process's peak resident set size (since start or the last [`reset_peak_rss`]), in bytes.
pub fn peak_rss_bytes() -> Result<u64> {
    status_field("VmHWM")
}

/// Resets the peak RSS to the current RSS (`echo 5 > /proc/self/clear_refs`). `false` where the
/// kernel or the sandbox refuses. Process-wide: concurrent measurements in one process interfere.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Returns freed heap memory to the system where the allocator can (glibc's `malloc_trim`), so
/// that memory a previous run freed does not count as resident at the start of the next.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointers and only touches the allocator's own state, which
        // is thread-safe in glibc.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Keeps freed memory in the allocator instead of returning it to the system at once (glibc:
/// allocations up to 64 MiB from the heap, trimmed only past 256 MiB free). The CPU backend frees
/// and reallocates buffers of megabytes every layer; returned to the system, each comes back as
/// fresh pages the kernel must zero, a seventh of an exact-baseline token's time. Process-wide, so
/// the binary and the benches call it once at start; [`trim_heap`] still returns everything.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers and only sets the allocator's own parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The process's RSS (`VmRSS`).
#[derive(Debug, Default, Clone, Copy)]
pub struct RssProbe;

impl MemoryProbe for RssProbe {
    fn read(&mut self) -> Result<u64> {
        rss_bytes()
    }
}

#[cfg(feature = "cuda")]
/// Used memory of one GPU as NVML reports it (all processes on the device; the run's own share
/// is its peak minus the reading at its start).
pub struct NvmlProbe {
    nvml: nvml_wrapper::Nvml,
    index: u32,
}

/// The library `nvml-wrapper` loads (its default on Linux).
#[cfg(feature = "cuda")]
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

#[cfg(feature = "cuda")]
impl NvmlProbe {
    /// Loads NVML and checks that device `index` exists and reports its memory.
    pub fn open(index: u32) -> Result<Self> {
        use nvml_wrapper::error::NvmlError;
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(e) => Error::Backend(format!(
                "NVML is not available: {NVML_LIBRARY} could not be loaded ({e}); device memory \
                 cannot be sampled on this machine (is the NVIDIA driver installed?)"
            )),
            NvmlError::FailedToLoadSymbol(e) => Error::Backend(format!(
                "NVML is not usable: {NVML_LIBRARY} lacks a function this build needs ({e}); \
                 the NVIDIA driver is too old"
            )),
            e => Error::Backend(format!("NVML failed to initialise: {e}")),
        })?;
        let probe = NvmlProbe { nvml, index };
        let count = probe
            .nvml
            .device_count()
            .map_err(|e| Error::Backend(format!("NVML: cannot count devices: {e}")))?;
        if index >= count {
            return Err(Error::Backend(format!(
                "NVML: no GPU {index} (this machine has {count})"
            )));
        }
        let mut probe = probe;
        probe.read()?;
        Ok(probe)
    }
}

#[cfg(feature = "cuda")]
impl MemoryProbe for NvmlProbe {
    fn read(&mut self) -> Result<u64> {
        let dev = self
            .nvml
            .device_by_index(self.index)
            .map_err(|e| Error::Backend(format!("NVML: GPU {}: {e}", self.index)))?;
        let info = dev
            .memory_info()
            .map_err(|e| Error::Backend(format!("NVML: GPU {} memory: {e}", self.index)))?;
        Ok(info.used)
    }
}

/// One reading: seconds since the sampler started, bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t_s: f64,
    pub bytes: u64,
}

/// A background thread reading a probe every `interval` until stopped. The probe is made on the
/// thread itself (NVML handles stay on the thread that opened them); a probe that cannot be made
/// or read at the start is reported by [`Sampler::start`].
pub struct Sampler {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<Result<Vec<Sample>>>,
}

impl Sampler {
    pub fn start<F>(make_probe: F, interval: Duration) -> Result<Sampler>
    where
        F: FnOnce() -> Result<Box<dyn MemoryProbe>> + Send + 'static,
    {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let handle = std::thread::Builder::new()
            .name("fastrm-memory-sampler".into())
            .spawn(move || -> Result<Vec<Sample>> {
                let t0 = Instant::now();
                let mut probe = match make_probe() {
                    Ok(p) => p,
                    Err(e) => {
                        let msg = e.to_string();
                        let _ = ready_tx.send(Err(e));
                        return Err(Error::Backend(msg));
                    }
                };
                let mut samples = Vec::new();
                match probe.read() {
                    Ok(bytes) => {
                        samples.push(Sample { t_s: 0.0, bytes });
                        let _ = ready_tx.send(Ok(()));
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let _ = ready_tx.send(Err(e));
                        return Err(Error::Backend(msg));
                    }
                }
                loop {
                    match stop_rx.recv_timeout(interval) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // Stopped (or the owner is gone): one last reading, then done.
                        _ => {
                            if let Ok(bytes) = probe.read() {
                                let t_s = t0.elapsed().as_secs_f64();
                                samples.push(Sample { t_s, bytes });
                            }
                            return Ok(samples);
                        }
                    }
                    let bytes = probe.read()?;
                    samples.push(Sample {
                        t_s: t0.elapsed().as_secs_f64(),
                        bytes,
                    });
                }
            })
            .map_err(|e| Error::Backend(format!("cannot start the memory sampler thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Sampler {
                stop: stop_tx,
                handle,
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(match handle.join() {
                Ok(Err(e)) => e,
                _ => Error::Backend("the memory sampler thread died while starting".into()),
            }),
        }
    }

    /// Stops the thread and returns every reading, in time order (at least two: one at the start,
    /// one at the stop).
    pub fn stop(self) -> Result<Vec<Sample>> {
        let _ = self.stop.send(());
        self.handle
            .join()
            .map_err(|_| Error::Backend("the memory sampler thread panicked".into()))?
    }
}

/// Where a profile run's memory figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// The process's resident memory (CPU backend).
    ProcessRss,
    /// A GPU's used memory through NVML (device backends).
    Nvml { device: u32 },
}

/// One run's memory: what was in use when it started, the most in use while it ran.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryUse {
    pub baseline_bytes: u64,
    pub peak_bytes: u64,
    /// How many sampler readings the run got.
    pub samples: usize,
    /// Whether the peak is exact (kernel `VmHWM` after a reset) rather than the largest sample.
    pub exact_peak: bool,
}

impl MemoryUse {
    /// Peak minus baseline: what the run itself added.
    pub fn run_bytes(&self) -> u64 {
        self.peak_bytes.saturating_sub(self.baseline_bytes)
    }
}

/// Brackets one run: [`PhaseMemory::begin`] before it, [`PhaseMemory::end`] after.
pub struct PhaseMemory {
    source: MemorySource,
    sampler: Sampler,
    baseline: u64,
    hwm_reset: bool,
}

impl PhaseMemory {
    pub fn begin(source: MemorySource, interval: Duration) -> Result<Self> {
        match source {
            MemorySource::ProcessRss => {
                trim_heap();
                let hwm_reset = reset_peak_rss();
                let baseline = rss_bytes()?;
                let sampler = Sampler::start(|| Ok(Box::new(RssProbe) as _), interval)?;
                Ok(PhaseMemory {
                    source,
                    sampler,
                    baseline,
                    hwm_reset,
                })
            }
            #[cfg(not(feature = "cuda"))]
            MemorySource::Nvml { .. } => Err(Error::input(format!(
                "NVML memory sampling: {}",
                crate::backend::NO_CUDA
            ))),
            #[cfg(feature = "cuda")]
            MemorySource::Nvml { device } => {
                let sampler = Sampler::start(
                    move || Ok(Box::new(NvmlProbe::open(device)?) as _),
                    interval,
                )?;
                Ok(PhaseMemory {
                    source,
                    sampler,
                    baseline: 0,
                    hwm_reset: false,
                })
            }
        }
    }

    pub fn end(self) -> Result<MemoryUse> {
        let samples = self.sampler.stop()?;
        let sampled_peak = samples.iter().map(|s| s.bytes).max().unwrap_or(0);
        let (baseline, peak) = match self.source {
            MemorySource::ProcessRss => {
                let peak = if self.hwm_reset {
                    sampled_peak.max(peak_rss_bytes()?)
                } else {
                    sampled_peak.max(rss_bytes()?)
                };
                (self.baseline, peak)
            }
            MemorySource::Nvml { .. } => (samples.first().map_or(0, |s| s.bytes), sampled_peak),
        };
        Ok(MemoryUse {
            baseline_bytes: baseline,
            peak_bytes: peak.max(baseline),
            samples: samples.len(),
            exact_peak: self.hwm_reset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_positive_and_below_the_peak() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 0);
        assert!(peak_rss_bytes().unwrap() >= rss / 2);
    }

    #[test]
    fn a_probe_that_fails_at_start_is_an_error_not_a_panic() {
        let r = Sampler::start(
            || Err(Error::Backend("no such device".into())),
            Duration::from_millis(5),
        );
        assert!(r.err().unwrap().to_string().contains("no such device"));
    }
}
