//! The CUDA backend: tensors in f16, bf16 or f32 storage with f32 arithmetic,
//! cuBLAS GEMMs (f32 accumulation) and our kernels from `kernels/*.cu`, embedded as PTX.
//!
//! Everything runs in order on one stream. cudarc's per-buffer event tracking is switched off
//! (it exists for multi-stream programs and costs an event per launch argument), so kernels take
//! raw device pointers; every launcher checks shapes before it builds a launch.
//!
//! Memory: allocations come from the device's stream-ordered pool with its release threshold set
//! to "never", so after the first decode step the pool already holds every block the loop needs
//! and the loop makes no `cudaMalloc` — one arena per engine without a hand-written allocator.
//! A [`Ledger`] attributes every live byte to a [`MemTag`] (weights, KV cache, activations, saved
//! tensors, head) and keeps each tag's peak, for the breakdown `--memory` and `profile` print.
//!
//! Where the driver, cuBLAS or a GPU is missing, [`Cuda::new`] returns an error naming what is
//! missing; nothing here panics on a machine without CUDA.

mod ops;
pub mod preflight;
#[cfg(feature = "sim")]
mod sim;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

#[cfg(feature = "cuda")]
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
#[cfg(feature = "cuda")]
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DevicePtr, DeviceRepr, PushKernelArg,
};
#[cfg(feature = "cuda")]
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};

use crate::backend::MemTag;
use crate::error::{Error, Result};

/// The kernels, compiled to PTX by `build.rs` / `tools/ptx.sh` from `kernels/*.cu`.
pub const PTX: &[(&str, &str)] = &[
    (
        "attention",
        include_str!("../../../kernels/ptx/attention.ptx"),
    ),
    (
        "elementwise",
        include_str!("../../../kernels/ptx/elementwise.ptx"),
    ),
    ("fastrm", include_str!("../../../kernels/ptx/fastrm.ptx")),
    ("linear", include_str!("../../../kernels/ptx/linear.ptx")),
    ("misc", include_str!("../../../kernels/ptx/misc.ptx")),
    ("norm", include_str!("../../../kernels/ptx/norm.ptx")),
    ("rope", include_str!("../../../kernels/ptx/rope.ptx")),
];

/// A plain value that device buffers hold and kernels take by value: cudarc's `DeviceRepr` where
/// the GPU path is built; without it (a simulator-only build) any `Copy` value, so the simulator
/// needs no cudarc.
#[cfg(feature = "cuda")]
pub trait Repr: DeviceRepr {}
#[cfg(feature = "cuda")]
impl<V: DeviceRepr> Repr for V {}
#[cfg(not(feature = "cuda"))]
pub trait Repr: Copy + 'static {}
// The plain numbers cudarc's `DeviceRepr` covers, not every `Copy` type: a reference must not be
// mistaken for a kernel argument.
#[cfg(not(feature = "cuda"))]
macro_rules! repr {
    ($($t:ty),*) => { $(impl Repr for $t {})* };
}
#[cfg(not(feature = "cuda"))]
repr!(bool, u8, i8, u16, i16, u32, i32, u64, i64, usize, isize, f32, f64, f16, bf16);

/// A kernel launch's shape, as cudarc's `LaunchConfig` (converted for the GPU, read directly by
/// the simulator).
#[derive(Debug, Clone, Copy)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

#[cfg(feature = "cuda")]
impl From<LaunchConfig> for cudarc::driver::LaunchConfig {
    fn from(c: LaunchConfig) -> Self {
        cudarc::driver::LaunchConfig {
            grid_dim: c.grid_dim,
            block_dim: c.block_dim,
            shared_mem_bytes: c.shared_mem_bytes,
        }
    }
}

/// A storage type: the kernels exist as `<op>_<NAME>` for each.
pub trait Elem: Repr + Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    const NAME: &'static str;
    #[cfg(feature = "cuda")]
    const BLAS: blas_sys::cudaDataType;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    #[cfg(feature = "cuda")]
    const BLAS: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    const NAME: &'static str = "f16";
    #[cfg(feature = "cuda")]
    const BLAS: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16F;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    #[cfg(feature = "cuda")]
    const BLAS: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Live and peak bytes per [`MemTag`].
#[derive(Default)]
pub struct Ledger {
    tag: AtomicU8,
    live: [AtomicUsize; MemTag::ALL.len()],
    peak: [AtomicUsize; MemTag::ALL.len()],
    total_peak: AtomicUsize,
}

impl Ledger {
    fn add(&self, tag: MemTag, bytes: usize) {
        let i = tag as usize;
        let now = self.live[i].fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak[i].fetch_max(now, Ordering::Relaxed);
        let total: usize = self.live.iter().map(|l| l.load(Ordering::Relaxed)).sum();
        self.total_peak.fetch_max(total, Ordering::Relaxed);
    }
    fn sub(&self, tag: MemTag, bytes: usize) {
        self.live[tag as usize].fetch_sub(bytes, Ordering::Relaxed);
    }
    /// Restarts every peak from the bytes live now, so the next peaks are one run's own.
    fn reset_peaks(&self) {
        let mut total = 0;
        for (live, peak) in self.live.iter().zip(&self.peak) {
            let now = live.load(Ordering::Relaxed);
            peak.store(now, Ordering::Relaxed);
            total += now;
        }
        self.total_peak.store(total, Ordering::Relaxed);
    }
    fn current(&self) -> MemTag {
        MemTag::ALL[self.tag.load(Ordering::Relaxed) as usize]
    }
    /// `(tag, live bytes, peak bytes)` for every tag, then the peak of the sum.
    pub fn report(&self) -> (Vec<(MemTag, usize, usize)>, usize) {
        let rows = MemTag::ALL
            .iter()
            .map(|&t| {
                let i = t as usize;
                (
                    t,
                    self.live[i].load(Ordering::Relaxed),
                    self.peak[i].load(Ordering::Relaxed),
                )
            })
            .collect();
        (rows, self.total_peak.load(Ordering::Relaxed))
    }
}

/// One device allocation of `U` values: driver memory from the stream-ordered pool, or a guarded
/// host buffer on the simulated device.
enum Mem<U> {
    #[cfg(feature = "cuda")]
    Gpu(CudaSlice<U>),
    /// The type parameter is otherwise unused where only the simulator is built.
    #[cfg(feature = "sim")]
    Sim(sim::HostMem, PhantomData<U>),
}

/// Bytes charged to a tag in the ledger until dropped.
struct Charge {
    tag: MemTag,
    bytes: usize,
    ledger: Arc<Ledger>,
}

impl Charge {
    fn new(ledger: &Arc<Ledger>, tag: MemTag, bytes: usize) -> Self {
        ledger.add(tag, bytes);
        Charge {
            tag,
            bytes,
            ledger: ledger.clone(),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.ledger.sub(self.tag, self.bytes);
    }
}

/// Device memory that is not a tensor (an op's scratch, uploaded indices), charged to a tag
/// while it lives like every tensor.
struct Buffer<U> {
    mem: Mem<U>,
    _charge: Charge,
}

impl<U> std::ops::Deref for Buffer<U> {
    type Target = Mem<U>;
    fn deref(&self) -> &Mem<U> {
        &self.mem
    }
}

/// A device matrix `[rows, cols]`, row-major. Its bytes stay charged to the tag that was current
/// when it was allocated until it is dropped.
pub struct CudaTensor<T: Elem> {
    buf: Mem<T>,
    rows: usize,
    cols: usize,
    _charge: Charge,
}

impl<T: Elem> CudaTensor<T> {
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// Bytes behind an allocation of `n` values (empty tensors still get one value: a valid address).
fn alloc_bytes<U>(n: usize) -> usize {
    n.max(1) * std::mem::size_of::<U>()
}

/// What the backend runs on: a GPU through the driver and cuBLAS, or the host simulator.
enum Device {
    #[cfg(feature = "cuda")]
    Gpu(Gpu),
    /// The host simulator, its memory a pool with an optional budget.
    #[cfg(feature = "sim")]
    Sim(Arc<sim::Pool>),
}

#[cfg(feature = "cuda")]
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    modules: Vec<Arc<CudaModule>>,
    functions: RefCell<HashMap<&'static str, CudaFunction>>,
}

/// A point in the stream's work, for timing (`profile`'s phase clock).
pub enum Event {
    #[cfg(feature = "cuda")]
    Gpu(cudarc::driver::CudaEvent),
    #[cfg(feature = "sim")]
    Sim(std::time::Instant),
}

impl Event {
    /// Seconds from `self` to `end` (waits for `end` to complete).
    pub fn seconds_to(&self, end: &Event) -> Result<f64> {
        match (self, end) {
            #[cfg(feature = "cuda")]
            (Event::Gpu(a), Event::Gpu(b)) => a
                .elapsed_ms(b)
                .map(|ms| ms as f64 / 1e3)
                .map_err(|e| drv_err("event timing", e)),
            #[cfg(feature = "sim")]
            (Event::Sim(a), Event::Sim(b)) => Ok(b.duration_since(*a).as_secs_f64()),
            #[cfg(all(feature = "cuda", feature = "sim"))]
            _ => Err(Error::Backend("events of two different devices".into())),
        }
    }
}

/// The CUDA backend over storage type `T` (`f16`, `bf16`, or `f32` for tight parity tests).
pub struct Cuda<T: Elem> {
    dev: Device,
    inv_freq: RefCell<HashMap<(usize, u32), Buffer<f32>>>,
    ledger: Arc<Ledger>,
    /// Fill every new allocation with NaN bytes (tests): a kernel that forgets to write an output
    /// element then shows up as NaN instead of passing on leftover zeros.
    poison: bool,
    /// Decode-sized linears (a few rows) by `linear_gemv_fwd` rather than cuBLAS; both stay
    /// available so one run can measure them side by side (`FASTRM_CUDA_GEMV=0` turns it off).
    gemv: Cell<bool>,
    /// The decoder's fused launches (residual add + RMSNorm, RoPE of q and k) rather than one
    /// launch per op, for the same side-by-side measurement (`FASTRM_CUDA_FUSE=0` turns it off).
    fuse: Cell<bool>,
    /// Kernel launches and cuBLAS calls queued so far (a decode step's count must not grow with
    /// its position).
    launches: Cell<u64>,
    /// Each launch's op and shape while recording (`record_launches`): what a CUDA graph of a
    /// step would capture, so tests can compare two steps' sequences.
    log: RefCell<Option<Vec<Launch>>>,
    /// The index arrays a decode step's layers pass to their kernels (positions, cache slots,
    /// page tables, lengths), on the device by content: every layer of a step sends the same
    /// ones, so each is copied once a step rather than once a layer (an upload is a driver call
    /// and a copy queued between the step's kernels). Never written on the device; the most
    /// recent [`INDEX_MEMO`] are kept, none after `trim_and_sync`.
    indices: RefCell<VecDeque<(Vec<u8>, Buffer<u8>)>>,
    /// Host-to-device uploads of index arrays so far (memoised ones not counted).
    uploads: Cell<u64>,
    _t: PhantomData<T>,
}

/// Index arrays kept on the device for reuse: a decode step passes four distinct ones (positions,
/// slots, page tables, lengths) and the embedding's ids; twice that covers a step and the next.
const INDEX_MEMO: usize = 8;

/// One queued launch as a captured graph would hold it, without its argument values: a kernel
/// with its grid and block, or a cuBLAS GEMM with its sizes (`grid` = (m, n, batch), `block` =
/// (k, 0, 0)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub op: &'static str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// The error of an allocation the device refused (the driver's `CUDA_ERROR_OUT_OF_MEMORY`, or
/// the simulator's pool running out); `what` names the allocation.
fn out_of_memory(what: &str) -> Error {
    Error::OutOfMemory(format!("GPU memory ({what})"))
}

#[cfg(feature = "cuda")]
fn drv_err(what: &str, e: drv::DriverError) -> Error {
    if e.0 == drv_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        out_of_memory(what)
    } else {
        Error::Backend(format!("CUDA {what}: {e:?}"))
    }
}

#[cfg(feature = "cuda")]
fn blas_err(what: &str, e: blas::CublasError) -> Error {
    Error::Backend(format!("cuBLAS {what}: {e:?}"))
}

/// Why this machine cannot run the CUDA backend, or `None` when it can (a driver, cuBLAS and at
/// least one GPU). Cheap enough for tests to call before each GPU test.
#[cfg(feature = "cuda")]
pub fn unavailable() -> Option<String> {
    // SAFETY: these only try to dlopen the libraries; nothing is called through them.
    if !unsafe { drv_sys::is_culib_present() } {
        return Some("no CUDA driver (libcuda.so) on this machine".into());
    }
    if !unsafe { blas_sys::is_culib_present() } {
        return Some("cuBLAS (libcublas) not found; add the CUDA 13 libraries to the library path (e.g. /usr/local/cuda/lib64)".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver sees no GPU".into()),
        Err(e) => Some(format!("the CUDA driver failed to start: {e:?}")),
    }
}

/// Why this machine cannot run the CUDA backend: a build without the `cuda` feature never can.
#[cfg(not(feature = "cuda"))]
pub fn unavailable() -> Option<String> {
    Some(crate::backend::NO_CUDA.into())
}

impl<T: Elem> Cuda<T> {
    /// No GPU in a build without the `cuda` feature (the simulator is all there is).
    #[cfg(not(feature = "cuda"))]
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(Error::input(crate::backend::NO_CUDA))
    }

    /// Opens GPU `ordinal`: context, one stream, cuBLAS, and every kernel module.
    #[cfg(feature = "cuda")]
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(why) = unavailable() {
            return Err(Error::Backend(format!(
                "--device cuda: {why}; use --device cpu"
            )));
        }
        let n = CudaContext::device_count().map_err(|e| drv_err("device count", e))? as usize;
        if ordinal >= n {
            return Err(Error::Backend(format!(
                "GPU {ordinal} does not exist ({n} visible)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv_err("context", e))?;
        // SAFETY: one stream only, and every buffer is used on it; see the module docs.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| drv_err("stream", e))?;
        if ctx.has_async_alloc() {
            keep_pool_memory(&ctx)?;
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_err("init", e))?;
        let modules = PTX
            .iter()
            .map(|(name, src)| {
                ctx.load_module(Ptx::from_src(*src))
                    .map_err(|e| drv_err(&format!("loading kernels {name}.ptx"), e))
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(
            ordinal,
            gpu = %ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            "CUDA backend on a GPU"
        );
        Ok(Self::on(Device::Gpu(Gpu {
            ctx,
            stream,
            blas,
            modules,
            functions: RefCell::new(HashMap::new()),
        })))
    }

    /// The simulated device (`kernels/sim/`): this backend's code and the kernels' sources run on
    /// the host, for tests where no GPU exists.
    #[cfg(feature = "sim")]
    pub fn simulated() -> Self {
        Self::simulated_with_memory(usize::MAX)
    }

    /// The simulated device holding at most `bytes` of allocations: one that would exceed it fails
    /// as a full GPU's does, with [`Error::OutOfMemory`].
    #[cfg(feature = "sim")]
    pub fn simulated_with_memory(bytes: usize) -> Self {
        Self::on(Device::Sim(sim::Pool::new(bytes)))
    }

    /// On the simulated device, `(bytes allocated now, most allocated at once)`.
    pub fn simulated_memory(&self) -> Option<(usize, usize)> {
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(_) => None,
            #[cfg(feature = "sim")]
            Device::Sim(pool) => Some(pool.usage()),
        }
    }

    /// The simulated device for the command line: its memory is bounded by the environment
    /// variable `FASTRM_SIM_DEVICE_MEMORY` (bytes) where set, so the CLI's and the server's
    /// handling of a full device can be tried without a GPU.
    #[cfg(feature = "sim")]
    pub fn simulated_from_env() -> Result<Self> {
        const VAR: &str = "FASTRM_SIM_DEVICE_MEMORY";
        match std::env::var(VAR) {
            Err(_) => Ok(Self::simulated()),
            Ok(v) => v
                .trim()
                .parse()
                .map(Self::simulated_with_memory)
                .map_err(|_| Error::input(format!("{VAR}={v:?}: expected a number of bytes"))),
        }
    }

    fn on(dev: Device) -> Self {
        Cuda {
            dev,
            inv_freq: RefCell::new(HashMap::new()),
            ledger: Arc::new(Ledger::default()),
            poison: false,
            gemv: Cell::new(std::env::var("FASTRM_CUDA_GEMV").map_or(true, |v| v != "0")),
            fuse: Cell::new(std::env::var("FASTRM_CUDA_FUSE").map_or(true, |v| v != "0")),
            launches: Cell::new(0),
            log: RefCell::new(None),
            indices: RefCell::new(VecDeque::new()),
            uploads: Cell::new(0),
            _t: PhantomData,
        }
    }

    /// Poisons every new allocation with NaN bytes (for tests).
    pub fn poisoned(mut self) -> Self {
        self.poison = true;
        self
    }

    /// Chooses the decode linears' path: `linear_gemv_fwd` (`true`) or cuBLAS.
    pub fn set_gemv(&self, on: bool) {
        self.gemv.set(on);
    }

    pub fn gemv_enabled(&self) -> bool {
        self.gemv.get()
    }

    /// Chooses between the fused decoder launches (`true`) and one launch per op.
    pub fn set_fuse(&self, on: bool) {
        self.fuse.set(on);
    }

    pub fn fuse_enabled(&self) -> bool {
        self.fuse.get()
    }

    /// Kernel launches plus cuBLAS calls queued on this backend so far.
    pub fn launch_count(&self) -> u64 {
        self.launches.get()
    }

    /// Starts (`true`) or stops recording each launch; stopping returns what was recorded.
    pub fn record_launches(&self, on: bool) -> Vec<Launch> {
        let old = self.log.replace(on.then(Vec::new));
        old.unwrap_or_default()
    }

    /// Index arrays copied to the device so far (a memoised one counts once).
    pub fn upload_count(&self) -> u64 {
        self.uploads.get()
    }

    /// The device address of `host`'s values, uploaded unless the same bytes are already there
    /// (see `indices`). Only for arrays kernels read and never write.
    fn indices<U: Repr>(&self, host: &[U]) -> Result<u64> {
        // SAFETY: any initialised slice is readable as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(host.as_ptr().cast::<u8>(), std::mem::size_of_val(host))
        };
        let mut memo = self.indices.borrow_mut();
        // Least recently used first: an array just used moves to the back, so the arrays of the
        // op being launched are never the one a new upload evicts.
        let entry = match memo.iter().position(|(k, _)| k == bytes) {
            Some(i) => memo.remove(i).expect("found above"),
            None => {
                let buf = self.to_device(bytes, MemTag::Scratch)?;
                self.uploads.set(self.uploads.get() + 1);
                (bytes.to_vec(), buf)
            }
        };
        let addr = self.addr(&entry.1);
        memo.push_back(entry);
        if memo.len() > INDEX_MEMO {
            memo.pop_front();
        }
        Ok(addr)
    }

    fn count_launch(&self, launch: impl FnOnce() -> Launch) {
        self.launches.set(self.launches.get() + 1);
        if let Some(log) = self.log.borrow_mut().as_mut() {
            log.push(launch());
        }
    }

    /// Whether this is the host simulator rather than a GPU.
    pub fn is_simulated(&self) -> bool {
        match self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(_) => false,
            #[cfg(feature = "sim")]
            Device::Sim(_) => true,
        }
    }

    pub fn device_name(&self) -> String {
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(g) => g.ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            #[cfg(feature = "sim")]
            Device::Sim(_) => "simulated device on the host".into(),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Waits for all queued work (timing, host reads).
    pub fn synchronize(&self) -> Result<()> {
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(g) => g
                .stream
                .synchronize()
                .map_err(|e| drv_err("synchronize", e)),
            #[cfg(feature = "sim")]
            Device::Sim(_) => Ok(()),
        }
    }

    /// Waits for queued work, returns the pool's cached free blocks to the driver (so the GPU's
    /// used memory is what is live: weights, caches the engine holds) and restarts the ledger's
    /// peaks. The next allocations come from the driver again, which a measured run pays for.
    pub fn trim_and_sync(&self) -> Result<()> {
        self.synchronize()?;
        self.indices.borrow_mut().clear();
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(g) if g.ctx.has_async_alloc() => {
                let pool = default_pool(&g.ctx)?;
                // SAFETY: a plain driver call on the device's own pool; after the synchronisation
                // every block freed on our stream is free in the pool.
                unsafe { drv_sys::cuMemPoolTrimTo(pool, 0) }
                    .result()
                    .map_err(|e| drv_err("memory pool trim", e))?;
            }
            _ => {}
        }
        self.ledger.reset_peaks();
        Ok(())
    }

    /// Records a timing event on the stream (`CU_EVENT_DEFAULT`: cudarc's default flags disable
    /// timing).
    pub fn record_event(&self) -> Result<Event> {
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(g) => {
                let e = g
                    .ctx
                    .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| drv_err("event", e))?;
                e.record(&g.stream).map_err(|e| drv_err("event", e))?;
                Ok(Event::Gpu(e))
            }
            #[cfg(feature = "sim")]
            Device::Sim(_) => Ok(Event::Sim(std::time::Instant::now())),
        }
    }

    /// Free and total device memory in bytes (`None` on the simulator, whose memory is the host's).
    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(g) => g
                .ctx
                .mem_get_info()
                .map(Some)
                .map_err(|e| drv_err("memory info", e)),
            #[cfg(feature = "sim")]
            Device::Sim(_) => Ok(None),
        }
    }

    /// A kernel by its op name; the storage type's suffix is added here.
    #[cfg(feature = "cuda")]
    fn func(g: &Gpu, op: &'static str) -> Result<CudaFunction> {
        if let Some(f) = g.functions.borrow().get(op) {
            return Ok(f.clone());
        }
        let name = format!("{op}_{}", T::NAME);
        let f = g
            .modules
            .iter()
            .find_map(|m| m.load_function(&name).ok())
            .ok_or_else(|| Error::Backend(format!("kernel {name} missing from the PTX")))?;
        g.functions.borrow_mut().insert(op, f.clone());
        Ok(f)
    }

    /// Uninitialised (or, with `poison`, NaN-filled) memory for `n` values of `U`; `what` names
    /// it in an out-of-memory error.
    fn mem<U: Repr>(&self, n: usize, what: impl FnOnce() -> String) -> Result<Mem<U>> {
        let bytes = alloc_bytes::<U>(n);
        let m = match &self.dev {
            #[cfg(feature = "cuda")]
            // SAFETY: every op writes all of its output before any read; `poison` makes a kernel
            // that does not show up in the tests.
            Device::Gpu(g) => {
                Mem::Gpu(unsafe { g.stream.alloc::<U>(n.max(1)) }.map_err(|e| drv_err(&what(), e))?)
            }
            #[cfg(feature = "sim")]
            Device::Sim(pool) => Mem::Sim(
                sim::HostMem::alloc(Some(pool), bytes).ok_or_else(|| out_of_memory(&what()))?,
                PhantomData,
            ),
        };
        if self.poison {
            self.fill_bytes(self.addr(&m), 0xff, bytes)?;
        }
        Ok(m)
    }

    fn addr<U>(&self, m: &Mem<U>) -> u64 {
        match (m, &self.dev) {
            #[cfg(feature = "cuda")]
            (Mem::Gpu(s), Device::Gpu(g)) => s.device_ptr(&g.stream).0,
            #[cfg(feature = "sim")]
            (Mem::Sim(h, _), _) => h.addr(),
            #[cfg(all(feature = "cuda", feature = "sim"))]
            (Mem::Gpu(_), Device::Sim(_)) => unreachable!("GPU memory on the simulator"),
        }
    }

    /// Copies `host` to device address `dst`.
    fn write<U: Repr>(&self, dst: u64, host: &[U]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        match &self.dev {
            #[cfg(feature = "cuda")]
            // SAFETY: callers pass a live allocation of at least host.len() values at dst; the
            // driver stages pageable memory before returning, so `host` may go after the call.
            Device::Gpu(g) => unsafe { drv::memcpy_htod_async(dst, host, g.stream.cu_stream()) }
                .map_err(|e| drv_err("upload", e)),
            #[cfg(feature = "sim")]
            // SAFETY: as above; dst is a host address of a simulator allocation.
            Device::Sim(_) => unsafe {
                std::ptr::copy_nonoverlapping(host.as_ptr(), dst as *mut U, host.len());
                Ok(())
            },
        }
    }

    /// Copies `host.len()` values from device address `src` and waits for them.
    fn read<U: Repr>(&self, src: u64, host: &mut [U]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(g) => {
                // SAFETY: callers pass a live allocation of at least host.len() values at src;
                // the synchronisation below completes the copy before `host` is used.
                unsafe { drv::memcpy_dtoh_async(host, src, g.stream.cu_stream()) }
                    .map_err(|e| drv_err("download", e))?;
                self.synchronize()
            }
            #[cfg(feature = "sim")]
            // SAFETY: as above; src is a host address of a simulator allocation.
            Device::Sim(_) => unsafe {
                std::ptr::copy_nonoverlapping(src as *const U, host.as_mut_ptr(), host.len());
                Ok(())
            },
        }
    }

    /// Device-to-device copy of `bytes` (the ranges do not overlap).
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        match &self.dev {
            #[cfg(feature = "cuda")]
            // SAFETY: callers derive both ranges from checked tensor shapes.
            Device::Gpu(g) => {
                unsafe { drv::memcpy_dtod_async(dst, src, bytes, g.stream.cu_stream()) }
                    .map_err(|e| drv_err("copy", e))
            }
            #[cfg(feature = "sim")]
            // SAFETY: as above.
            Device::Sim(_) => unsafe {
                std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes);
                Ok(())
            },
        }
    }

    fn fill_bytes(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        match &self.dev {
            #[cfg(feature = "cuda")]
            // SAFETY: dst is a live allocation of at least `bytes` bytes on our stream.
            Device::Gpu(g) => {
                unsafe { drv::memset_d8_async(dst, byte, bytes, g.stream.cu_stream()) }
                    .map_err(|e| drv_err("memset", e))
            }
            #[cfg(feature = "sim")]
            // SAFETY: as above.
            Device::Sim(_) => unsafe {
                std::ptr::write_bytes(dst as *mut u8, byte, bytes);
                Ok(())
            },
        }
    }

    /// An uninitialised (or poisoned) `[rows, cols]` tensor, charged to the current tag.
    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor<T>> {
        let bytes = alloc_bytes::<T>(rows * cols);
        let buf = self.mem::<T>(rows * cols, || {
            format!(
                "allocating {:.1} MB for a [{rows}, {cols}] tensor ({})",
                bytes as f64 / 1e6,
                self.ledger.current().name()
            )
        })?;
        Ok(CudaTensor {
            buf,
            rows,
            cols,
            _charge: Charge::new(&self.ledger, self.ledger.current(), bytes),
        })
    }

    /// `n` values of `U` charged to `tag` while they live.
    fn buffer<U: Repr>(&self, n: usize, tag: MemTag) -> Result<Buffer<U>> {
        let bytes = alloc_bytes::<U>(n);
        let mem = self.mem::<U>(n, || {
            format!("allocating {:.1} MB ({})", bytes as f64 / 1e6, tag.name())
        })?;
        Ok(Buffer {
            mem,
            _charge: Charge::new(&self.ledger, tag, bytes),
        })
    }

    /// Scratch memory for one op's intermediate values.
    fn scratch<U: Repr>(&self, n: usize) -> Result<Buffer<U>> {
        self.buffer(n, MemTag::Scratch)
    }

    /// `host` copied into fresh device memory charged to `tag`.
    fn to_device<U: Repr>(&self, host: &[U], tag: MemTag) -> Result<Buffer<U>> {
        let m = self.buffer::<U>(host.len(), tag)?;
        self.write(self.addr(&m), host)?;
        Ok(m)
    }

    fn ptr(&self, t: &CudaTensor<T>) -> u64 {
        self.addr(&t.buf)
    }

    /// Launches `op` with `args` (each a reference to a `DeviceRepr` value: raw pointers as u64).
    fn launch(&self, op: &'static str, cfg: LaunchConfig, args: &[&dyn KernelArg]) -> Result<()> {
        self.count_launch(|| Launch {
            op,
            grid: cfg.grid_dim,
            block: cfg.block_dim,
        });
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(g) => {
                let f = Self::func(g, op)?;
                let mut b = g.stream.launch_builder(&f);
                for a in args {
                    a.push(&mut b);
                }
                // SAFETY: each launcher checks the shapes its kernel indexes with before calling
                // here, and passes pointers to live buffers of at least those sizes.
                unsafe { b.launch(cfg.into()) }
                    .map(|_| ())
                    .map_err(|e| drv_err(&format!("launching {op}_{}", T::NAME), e))
            }
            #[cfg(feature = "sim")]
            Device::Sim(_) => {
                let ptrs: Vec<_> = args.iter().map(|a| a.host_ptr()).collect();
                let sizes: Vec<_> = args.iter().map(|a| a.width()).collect();
                sim::launch(
                    &format!("{op}_{}", T::NAME),
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    &ptrs,
                    &sizes,
                )
            }
        }
    }

    /// One cuBLAS GEMM (column-major, as cuBLAS sees it) with f32 accumulation; `c_f32` writes
    /// an f32 output instead of `T`. `batch > 1` strides every operand. `C = α·op(A)·op(B) + β·C`.
    fn gemm(&self, g: Gemm) -> Result<()> {
        self.count_launch(|| Launch {
            op: "cublas_gemm",
            grid: (g.m as u32, g.n as u32, g.batch as u32),
            block: (g.k as u32, 0, 0),
        });
        match &self.dev {
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => cublas_gemm(&gpu.blas, g, T::BLAS),
            #[cfg(feature = "sim")]
            Device::Sim(_) => sim::gemm(&g, T::NAME),
        }
    }

    /// The RoPE inverse frequencies for `(head_dim, theta)`, uploaded once.
    fn inv_freq(&self, head_dim: usize, theta: f32) -> Result<u64> {
        let key = (head_dim, theta.to_bits());
        if let Some(m) = self.inv_freq.borrow().get(&key) {
            return Ok(self.addr(m));
        }
        // A constant table kept for the engine's life, like the weights.
        let inv = crate::backend::cpu::rope_inv_freq(head_dim, theta);
        let m = self.to_device(&inv, MemTag::Weights)?;
        let p = self.addr(&m);
        self.inv_freq.borrow_mut().insert(key, m);
        Ok(p)
    }
}

/// One cuBLAS GEMM on `blas`'s stream; `ab` is the storage type of A and B (and of C unless
/// `c_f32`).
#[cfg(feature = "cuda")]
fn cublas_gemm(blas: &CudaBlas, g: Gemm, ab: blas_sys::cudaDataType) -> Result<()> {
    let (alpha, beta) = (g.alpha, g.beta);
    let op = |t: bool| {
        if t {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let c_type = if g.c_f32 {
        blas_sys::cudaDataType::CUDA_R_32F
    } else {
        ab
    };
    // SAFETY: the callers derive every dimension, leading dimension and stride from checked
    // tensor shapes, so cuBLAS stays inside the buffers behind a, b and c.
    unsafe {
        blas::gemm_strided_batched_ex(
            *blas.handle(),
            op(g.ta),
            op(g.tb),
            g.m as i32,
            g.n as i32,
            g.k as i32,
            (&alpha) as *const f32 as *const _,
            g.a as *const _,
            ab,
            g.lda as i32,
            g.sa as i64,
            g.b as *const _,
            ab,
            g.ldb as i32,
            g.sb as i64,
            (&beta) as *const f32 as *const _,
            g.c as *mut _,
            c_type,
            g.ldc as i32,
            g.sc as i64,
            g.batch as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| blas_err("gemm", e))
}

/// Lets the pool keep freed blocks instead of returning them to the driver at each
/// synchronisation, so steady-state decoding never allocates from the driver.
#[cfg(feature = "cuda")]
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    let pool = default_pool(ctx)?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: a plain driver call on the device's own pool with a valid value pointer.
    unsafe {
        drv_sys::cuMemPoolSetAttribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut _,
        )
        .result()
        .map_err(|e| drv_err("memory pool threshold", e))?;
    }
    Ok(())
}

/// The device's default stream-ordered pool, which `cuMemAllocAsync` allocates from.
#[cfg(feature = "cuda")]
fn default_pool(ctx: &Arc<CudaContext>) -> Result<drv_sys::CUmemoryPool> {
    let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver call on the context's own device with a valid out-pointer.
    unsafe { drv_sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| drv_err("memory pool", e))?;
    Ok(pool)
}

/// cuBLAS's view of one product `C = op(A)·op(B)` (column-major; pointers are raw device
/// addresses, strides in elements).
struct Gemm {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    sa: usize,
    b: u64,
    ldb: usize,
    sb: usize,
    c: u64,
    ldc: usize,
    sc: usize,
    batch: usize,
    alpha: f32,
    /// 0 overwrites C, 1 accumulates into it.
    beta: f32,
    c_f32: bool,
}

/// A kernel argument: anything cudarc can push by reference.
trait KernelArg {
    #[cfg(feature = "cuda")]
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
    /// The value's address and width, for the simulator's launch (which checks the widths
    /// against the kernel's parameters).
    #[cfg(feature = "sim")]
    fn host_ptr(&self) -> *const std::ffi::c_void;
    #[cfg(feature = "sim")]
    fn width(&self) -> usize;
}

impl<V: Repr> KernelArg for V {
    #[cfg(feature = "cuda")]
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
    #[cfg(feature = "sim")]
    fn host_ptr(&self) -> *const std::ffi::c_void {
        self as *const V as *const std::ffi::c_void
    }
    #[cfg(feature = "sim")]
    fn width(&self) -> usize {
        std::mem::size_of::<V>()
    }
}

fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_row(rows: usize, block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}
