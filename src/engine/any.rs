//! The backend chosen at run time: [`Device`] and [`Dtype`] name it, [`AnyEngine`] holds an
//! engine on it. Code generic over the backend runs on any of them through [`crate::with_engine`].

use std::path::Path;
use std::str::FromStr;

use super::{CancelToken, Engine, Item, Request, RunOptions};
use crate::backend::cpu::{Cpu, CpuWeights};
use crate::backend::cpu_half::HalfKind;
#[cfg(any(feature = "cuda", feature = "sim"))]
use crate::backend::cuda::Cuda;
use crate::backend::{Backend, MemTag};
use crate::config::LlavaConfig;
use crate::error::{Error, Result};
use crate::explain::fastrm::HeadWeights;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (f32 arithmetic; weights as [`Dtype`] says).
    Cpu,
    /// A GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The simulated CUDA device (builds with the `sim` feature): the CUDA backend's code and
    /// kernels run on the CPU, slowly; for rehearsing GPU runs where no GPU exists.
    Sim,
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "sim" => Ok(Device::Sim),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!(
                    "unknown device {s:?}: use cpu, cuda, cuda:N (GPU ordinal N) or sim"
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Sim => write!(f, "sim"),
        }
    }
}

/// Storage type of the weights and activations on a CUDA device, of the weight matrices on the CPU
/// (arithmetic is f32 either way). Default: f16 on a CUDA device; on the CPU the checkpoint's own
/// dtype (its f16/bf16 matrices stay memory-mapped), see [`cpu_backend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
}

/// An engine on the backend a [`Device`] and [`Dtype`] chose at run time.
/// The CUDA variants exist in builds with the `cuda` or `sim` feature.
pub enum AnyEngine {
    Cpu(Engine<Cpu>),
    #[cfg(any(feature = "cuda", feature = "sim"))]
    F16(Engine<Cuda<half::f16>>),
    #[cfg(any(feature = "cuda", feature = "sim"))]
    Bf16(Engine<Cuda<half::bf16>>),
    #[cfg(any(feature = "cuda", feature = "sim"))]
    F32(Engine<Cuda<f32>>),
}

/// Runs `$body` with `$e` bound to the engine inside an [`AnyEngine`] (by reference, or by value
/// with `move`), once per backend type: each backend gets its own monomorphised copy of `$body`.
// Two definitions rather than `#[cfg]` on the arms: a macro's body is expanded in the caller's
// crate, where this crate's features are not what `cfg` would test.
#[cfg(not(any(feature = "cuda", feature = "sim")))]
#[macro_export]
macro_rules! with_engine {
    ($any:expr, |$e:ident| $body:expr) => {
        match $any {
            $crate::engine::AnyEngine::Cpu($e) => $body,
        }
    };
}

/// Runs `$body` with `$e` bound to the engine inside an [`AnyEngine`] (by reference, or by value
/// with `move`), once per backend type: each backend gets its own monomorphised copy of `$body`.
#[cfg(any(feature = "cuda", feature = "sim"))]
#[macro_export]
macro_rules! with_engine {
    ($any:expr, |$e:ident| $body:expr) => {
        match $any {
            $crate::engine::AnyEngine::Cpu($e) => $body,
            $crate::engine::AnyEngine::F16($e) => $body,
            $crate::engine::AnyEngine::Bf16($e) => $body,
            $crate::engine::AnyEngine::F32($e) => $body,
        }
    };
}

/// A body generic over the backend, run by [`with_backend`] on the backend a [`Device`] and
/// [`Dtype`] chose (closures cannot be generic, so the body is a type implementing this).
pub trait WithBackend {
    type Output;
    fn run<B: AnyBackend>(self, backend: B) -> Result<Self::Output>;
}

/// The backends a [`Device`] and [`Dtype`] can name; an engine on one of them goes into an
/// [`AnyEngine`].
pub trait AnyBackend: Backend + Sized {
    fn wrap(engine: Engine<Self>) -> AnyEngine;
}

impl AnyBackend for Cpu {
    fn wrap(engine: Engine<Self>) -> AnyEngine {
        AnyEngine::Cpu(engine)
    }
}

#[cfg(any(feature = "cuda", feature = "sim"))]
impl AnyBackend for Cuda<half::f16> {
    fn wrap(engine: Engine<Self>) -> AnyEngine {
        AnyEngine::F16(engine)
    }
}

#[cfg(any(feature = "cuda", feature = "sim"))]
impl AnyBackend for Cuda<half::bf16> {
    fn wrap(engine: Engine<Self>) -> AnyEngine {
        AnyEngine::Bf16(engine)
    }
}

#[cfg(any(feature = "cuda", feature = "sim"))]
impl AnyBackend for Cuda<f32> {
    fn wrap(engine: Engine<Self>) -> AnyEngine {
        AnyEngine::F32(engine)
    }
}

/// Runs `body` on the backend of `device` and `dtype` (CUDA storage default: f16). The one place
/// that maps a device and dtype to a backend type: engines and model-less jobs (`train`) both
/// come through here.
pub fn with_backend<W: WithBackend>(
    device: Device,
    dtype: Option<Dtype>,
    body: W,
) -> Result<W::Output> {
    match (device, dtype) {
        (Device::Cpu, dtype) => body.run(cpu_backend(dtype)),
        #[cfg(any(feature = "cuda", feature = "sim"))]
        (device, None | Some(Dtype::F16)) => body.run(cuda_backend::<half::f16>(device)?),
        #[cfg(any(feature = "cuda", feature = "sim"))]
        (device, Some(Dtype::Bf16)) => body.run(cuda_backend::<half::bf16>(device)?),
        #[cfg(any(feature = "cuda", feature = "sim"))]
        (device, Some(Dtype::F32)) => body.run(cuda_backend::<f32>(device)?),
        #[cfg(not(any(feature = "cuda", feature = "sim")))]
        (device, _) => Err(no_cuda_backend(device)),
    }
}

/// [`Engine::load`] or [`Engine::synthetic`] as a [`WithBackend`] body.
enum Open<'a> {
    Dir(&'a Path),
    Synthetic(&'a LlavaConfig, u64),
}

impl WithBackend for Open<'_> {
    type Output = AnyEngine;
    fn run<B: AnyBackend>(self, backend: B) -> Result<AnyEngine> {
        let engine = match self {
            Open::Dir(dir) => Engine::load(backend, dir)?,
            Open::Synthetic(cfg, seed) => Engine::synthetic(backend, cfg, seed)?,
        };
        Ok(B::wrap(engine))
    }
}

/// Why a build without the CUDA backend cannot open `device`.
#[cfg(not(any(feature = "cuda", feature = "sim")))]
fn no_cuda_backend(device: Device) -> Error {
    match device {
        Device::Sim => Error::input(
            "--device sim: this build has no simulated device (build with --features sim)",
        ),
        _ => Error::input(format!("--device {device}: {}", crate::backend::NO_CUDA)),
    }
}

/// The CPU backend for `--dtype`: f32 copies of every weight (`f32`, the exact-parity path), the
/// weight matrices in f16 or bf16 (`f16`, `bf16`: mapped where the checkpoint stores that type),
/// or, by default, as the checkpoint stores them. Half-precision values widen to f32 exactly, so
/// the default computes what `f32` does (up to the order of f32 sums) in half the memory, none of
/// it copied.
pub fn cpu_backend(dtype: Option<Dtype>) -> Cpu {
    Cpu::with_weights(match dtype {
        None => CpuWeights::Stored,
        Some(Dtype::F32) => CpuWeights::F32,
        Some(Dtype::F16) => CpuWeights::Half(HalfKind::F16),
        Some(Dtype::Bf16) => CpuWeights::Half(HalfKind::Bf16),
    })
}

/// Synthetic weights are drawn in f32 on the CPU: a half-precision `--dtype` there would be
/// silently ignored, so it is refused.
pub fn check_synthetic_dtype(device: Device, dtype: Option<Dtype>) -> Result<()> {
    match (device, dtype) {
        (Device::Cpu, Some(d @ (Dtype::F16 | Dtype::Bf16))) => Err(Error::input(format!(
            "--dtype {} on the CPU applies to model folders (how their weights are held); \
             synthetic weights are f32 there",
            crate::util::Named::name(d)
        ))),
        _ => Ok(()),
    }
}

impl crate::util::Named for Dtype {
    const ALL: &'static [Self] = &[Dtype::F16, Dtype::Bf16, Dtype::F32];
    fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Dtype::F16 => "IEEE half precision",
            Dtype::Bf16 => "bfloat16",
            Dtype::F32 => "single precision",
        }
    }
}

/// The CUDA backend `device` names: a GPU, or the simulated device.
#[cfg(any(feature = "cuda", feature = "sim"))]
fn cuda_backend<T: crate::backend::cuda::Elem>(device: Device) -> Result<Cuda<T>> {
    match device {
        Device::Cuda(n) => Cuda::new(n),
        #[cfg(feature = "sim")]
        Device::Sim => Cuda::simulated_from_env(),
        #[cfg(not(feature = "sim"))]
        Device::Sim => Err(Error::input(
            "--device sim: this build has no simulated device (build with --features sim)",
        )),
        Device::Cpu => unreachable!("the CPU is not a CUDA device"),
    }
}

impl AnyEngine {
    /// Opens a model folder on `device` (`dtype`: the CUDA storage type, default f16).
    pub fn load(device: Device, dtype: Option<Dtype>, dir: &Path) -> Result<Self> {
        tracing::debug!(%device, ?dtype, dir = %dir.display(), "opening a model");
        with_backend(device, dtype, Open::Dir(dir))
    }

    /// Random weights of `cfg`'s shapes on `device`.
    pub fn synthetic(
        device: Device,
        dtype: Option<Dtype>,
        cfg: &LlavaConfig,
        seed: u64,
    ) -> Result<Self> {
        tracing::debug!(%device, ?dtype, "making a synthetic model");
        check_synthetic_dtype(device, dtype)?;
        with_backend(device, dtype, Open::Synthetic(cfg, seed))
    }

    /// `synthetic:NAME` (random weights of a named configuration, see
    /// [`LlavaConfig::named`]) or a model folder.
    pub fn open(device: Device, dtype: Option<Dtype>, model: &str) -> Result<Self> {
        match model.strip_prefix("synthetic:") {
            Some(name) => {
                let cfg = LlavaConfig::named(name).map_err(Error::Input)?;
                Self::synthetic(device, dtype, &cfg, 0)
            }
            None => Self::load(device, dtype, Path::new(model)),
        }
    }

    pub fn config(&self) -> &LlavaConfig {
        with_engine!(self, |e| e.config())
    }

    pub fn load_head(&mut self, path: &Path) -> Result<()> {
        with_engine!(self, |e| e.load_head(path))
    }

    pub fn set_head(&mut self, w: &HeadWeights) -> Result<()> {
        with_engine!(self, |e| e.set_head(w))
    }

    pub fn has_head(&self) -> bool {
        with_engine!(self, |e| e.head.is_some())
    }

    /// The FastRM head's calibrated entropy threshold, when a head with one is loaded.
    pub fn confidence_threshold(&self) -> Option<f32> {
        with_engine!(self, |e| e.head().and_then(|h| h.cfg.confidence_threshold))
    }

    pub fn has_tokenizer(&self) -> bool {
        with_engine!(self, |e| e.text.is_some())
    }

    /// See [`Engine::text`].
    pub fn text(&self) -> Option<&crate::text::TextProcessor> {
        with_engine!(self, |e| e.text())
    }

    pub fn backend_name(&self) -> String {
        with_engine!(self, |e| e.backend_name())
    }

    /// See [`Engine::set_image_cache`].
    pub fn set_image_cache(&self, capacity: usize) {
        with_engine!(self, |e| e.set_image_cache(capacity))
    }

    /// See [`Engine::set_prefix_cache`].
    pub fn set_prefix_cache(&self, bytes: Option<u64>) {
        with_engine!(self, |e| e.set_prefix_cache(bytes))
    }

    /// See [`Engine::prefix_pages`].
    pub fn prefix_pages(&self) -> usize {
        with_engine!(self, |e| e.prefix_pages())
    }

    /// See [`Engine::kv_page_bytes`].
    pub fn kv_page_bytes(&self) -> usize {
        with_engine!(self, |e| e.kv_page_bytes())
    }

    /// See [`Engine::set_kv_memory`].
    pub fn set_kv_memory(&self, bytes: Option<u64>) -> Result<()> {
        with_engine!(self, |e| e.set_kv_memory(bytes))
    }

    /// `(tag, live bytes, peak bytes)` per memory tag, where the backend keeps a breakdown.
    pub fn memory_breakdown(&self) -> Vec<(MemTag, usize, usize)> {
        with_engine!(self, |e| e.backend.memory_breakdown())
    }

    /// See [`Engine::stream`].
    pub fn stream<'e>(
        &'e self,
        req: &Request,
        opts: &RunOptions,
        cancel: &CancelToken,
    ) -> Box<dyn Iterator<Item = Result<Item>> + 'e> {
        with_engine!(self, |e| Box::new(e.stream(req, opts, cancel)))
    }

    pub fn model_view(&self, image: &super::ImageInput) -> Result<crate::vision::RgbImage> {
        with_engine!(self, |e| e.model_view(image))
    }

    /// See [`Engine::preparer`].
    pub fn preparer(&self) -> super::Preparer {
        with_engine!(self, |e| e.preparer())
    }

    pub fn dir(&self) -> Option<&Path> {
        with_engine!(self, |e| e.dir.as_deref())
    }
}
