//! The op set: every tensor operation the LLaVA program uses, as one trait that each backend
//! implements. The model code in `crate::model` is written only against this trait, so the
//! CPU reference and the CUDA backend run the same orchestration (shapes, offsets, KV-cache
//! indexing); op-level parity against [`cpu::Cpu`] is then all a new backend has to prove.
//!
//! Every tensor is a row-major matrix `[rows, cols]` with f32 semantics; a backend may store it in a
//! narrower type (the CUDA backend keeps f16/bf16 with f32 accumulation; the CPU backend can keep
//! checkpoint weights in f16/bf16, see [`cpu::CpuWeights`]). Sequences are rows,
//! features are columns; multi-head tensors pack heads along the columns (`[n, heads * head_dim]`),
//! exactly the layout of the projections' outputs, so no op needs a transpose.
//!
//! Ops return fresh tensors except those named `*_into`, which write into an existing one (the KV
//! cache, image-feature scatter). Shape errors are `Error::Backend`; a backend checks shapes before
//! touching memory.

pub mod cpu;
pub(crate) mod cpu_gemm;
pub mod cpu_half;
/// Built with the `cuda` feature (GPUs through cudarc) or the `sim` feature (the simulated device
/// alone, which needs no cudarc).
#[cfg(any(feature = "cuda", feature = "sim"))]
pub mod cuda;

/// Products ([`Backend::linear`], [`Backend::linear_group`]) of at most this many rows compute
/// each output row by the same arithmetic whatever the other rows are: a batched decode step of
/// up to this many sequences gives each sequence the numbers it gets alone.
pub const INVARIANT_ROWS: usize = 32;

/// What a request for a GPU gets in a build without the `cuda` feature.
pub const NO_CUDA: &str = "this build has no CUDA backend; rebuild with the `cuda` feature";

use crate::checkpoint::{StoredTensor, TensorRef};
use crate::error::{Error, Result};

/// A point in a backend's timeline, for timing phases of work ([`Backend::mark`]).
pub enum Mark {
    /// The host's clock: right for backends whose ops finish before they return.
    Wall(std::time::Instant),
    /// An event recorded on a device's stream.
    #[cfg(any(feature = "cuda", feature = "sim"))]
    Device(cuda::Event),
}

impl Mark {
    /// Seconds from `self` to `end` (on a device: waits for `end` to complete).
    pub fn seconds_to(&self, end: &Mark) -> Result<f64> {
        match (self, end) {
            (Mark::Wall(a), Mark::Wall(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64()),
            #[cfg(any(feature = "cuda", feature = "sim"))]
            (Mark::Device(a), Mark::Device(b)) => a.seconds_to(b),
            #[cfg(any(feature = "cuda", feature = "sim"))]
            _ => Err(Error::Backend("marks of two different clocks".into())),
        }
    }
}

/// Attention geometry shared by the vision tower (no mask, all heads distinct) and the decoder
/// (causal, grouped-query).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Causal masking with the queries at absolute positions `q_pos0 .. q_pos0 + n_q`; keys sit at
    /// positions `0 .. kv_len`. `None`: every query sees every key (vision tower).
    pub causal_q_pos0: Option<usize>,
    /// Number of leading key/value rows to attend over (the filled part of a KV cache).
    pub kv_len: usize,
}

/// One row of a [`Backend::paged_attention`]: its sequence's page table and how many keys its
/// query sees.
#[derive(Debug, Clone, Copy)]
pub struct PagedRow<'a> {
    pub pages: &'a [u32],
    pub len: usize,
}

/// Where [`Backend::rope_qk_store`] writes a decode step's keys and values: rows `slots` of one
/// layer's key and value pools.
pub struct KvStore<'a, T> {
    pub keys: &'a mut T,
    pub values: &'a mut T,
    pub slots: &'a [u32],
}

/// The row of a KV pool holding position `j` of a sequence whose page table is `pages` (pages of
/// `page` positions).
pub fn page_slot(pages: &[u32], page: usize, j: usize) -> usize {
    pages[j / page] as usize * page + j % page
}

/// Shape errors of a paged decode attention, shared by the backends: `q` has one row per entry of
/// `rows`, every row sees at least one key, its pages cover its keys and lie in the pool of
/// `pool_rows` rows.
pub(crate) fn check_paged(
    q_rows: usize,
    rows: &[PagedRow<'_>],
    page: usize,
    pool_rows: usize,
) -> Result<()> {
    let op = "paged_attention";
    if q_rows != rows.len() {
        return Err(shape_err(
            op,
            format!("{q_rows} queries for {} rows", rows.len()),
        ));
    }
    if page == 0 {
        return Err(shape_err(op, "pages of 0 positions"));
    }
    for (i, r) in rows.iter().enumerate() {
        if r.len == 0 || r.pages.len() * page < r.len {
            return Err(shape_err(
                op,
                format!(
                    "row {i}: {} keys in {} pages of {page}",
                    r.len,
                    r.pages.len()
                ),
            ));
        }
        if let Some(p) = r
            .pages
            .iter()
            .find(|&&p| (p as usize + 1) * page > pool_rows)
        {
            return Err(shape_err(
                op,
                format!("row {i}: page {p} outside a pool of {pool_rows} rows"),
            ));
        }
    }
    Ok(())
}

pub trait Backend {
    type Tensor;

    fn name(&self) -> String;

    /// `[rows, cols]` of a tensor.
    fn dims(&self, t: &Self::Tensor) -> (usize, usize);

    /// Fails with a clear message when `weights` (as stored) cannot fit in this backend's memory,
    /// so a model too large for the machine is refused before loading starts rather than killed
    /// midway.
    fn check_weight_memory(&self, weights: &[StoredTensor]) -> Result<()>;

    /// Bytes a value takes in the tensors this backend makes (activations, the KV cache).
    fn storage_bytes(&self) -> usize {
        4
    }
    /// Bytes `t`'s values take as held (a weight kept in a narrower type than the backend's
    /// own counts at its own width): what reading it whole moves.
    fn tensor_bytes(&self, t: &Self::Tensor) -> usize {
        let (rows, cols) = self.dims(t);
        rows * cols * self.storage_bytes()
    }
    /// Host f32 data, row-major, to a tensor.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A checkpoint tensor (any supported dtype) viewed as `[rows, cols]`.
    fn load_weight(&self, t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Tensor to host f32, row-major.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// `[rows, cols]` of `center + spread · u_i`, where `u_i ∈ [-1, 1)` is the i-th draw of
    /// [`crate::util::SplitMix64`] seeded with `seed`: synthetic weights, made where they live
    /// (on the GPU for a 7B model) and identical on every backend.
    fn uniform(
        &self,
        rows: usize,
        cols: usize,
        seed: u64,
        center: f32,
        spread: f32,
    ) -> Result<Self::Tensor> {
        let mut rng = crate::util::SplitMix64::new(seed);
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| center + spread * rng.uniform_sym())
            .collect();
        self.upload(&data, rows, cols)
    }
    /// Charges tensors allocated from now on to `tag` in the backend's memory breakdown and
    /// returns the previous tag. Backends without a breakdown ignore it.
    fn set_memory_tag(&self, tag: MemTag) -> MemTag {
        let _ = tag;
        MemTag::Activations
    }
    /// `(tag, live bytes, peak bytes)` per tag, for backends that keep a breakdown (empty
    /// otherwise). Peaks count from the start or the last [`Backend::trim_and_sync`].
    fn memory_breakdown(&self) -> Vec<(MemTag, usize, usize)> {
        Vec::new()
    }
    /// The most bytes live at once, all tags together, since the start or the last
    /// [`Backend::trim_and_sync`]; `None` for backends without a breakdown.
    fn memory_peak(&self) -> Option<usize> {
        None
    }
    /// Waits until every queued operation has finished, so a host clock read afterwards times
    /// the work itself, not its queueing. A no-op where ops finish before they return (the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Starts a measurement on a clean slate: waits for queued work, returns every cached free
    /// block to the driver (so device memory in use is exactly what is live) and restarts the
    /// breakdown's peaks from the live bytes. A no-op on the CPU, whose heap `profile` trims
    /// itself.
    fn trim_and_sync(&self) -> Result<()> {
        self.synchronize()
    }

    /// Marks "now" in the backend's timeline: on a device, after all the work queued so far, so
    /// the time between two marks is the device's time for the work queued between them, not the
    /// host's time to queue it.
    fn mark(&self) -> Result<Mark> {
        Ok(Mark::Wall(std::time::Instant::now()))
    }

    /// What [`Backend::mark`]s measure, for reports.
    fn clock_name(&self) -> &'static str {
        "wall clock"
    }

    /// [`Backend::linear`] of one `x` by each of `ws` (no bias): the decoder's q, k, v and its
    /// gate, up (one launch on a GPU for a decode step's rows). Exactly what separate linears give.
    fn linear_group(&self, x: &Self::Tensor, ws: &[&Self::Tensor]) -> Result<Vec<Self::Tensor>> {
        ws.iter().map(|w| self.linear(x, w, None)).collect()
    }
    /// `y = x · wᵀ (+ bias)`; x `[m, k]`, w `[n, k]` (PyTorch Linear layout), bias `[1, n]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// Elementwise `a + b`; `b` may also be a single row broadcast over `a`'s rows.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Row-wise RMSNorm (Llama): `x / sqrt(mean(x²) + eps) * w`, w `[1, cols]`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// `(a + b, rms_norm(a + b, w))`: a residual add and the norm after it (one launch on a
    /// GPU). Both results are exactly what [`Backend::add`] then [`Backend::rms_norm`] give.
    fn add_rms_norm(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let sum = self.add(a, b)?;
        let normed = self.rms_norm(&sum, w, eps)?;
        Ok((sum, normed))
    }
    /// Row-wise LayerNorm: `(x - mean) / sqrt(var + eps) * w + b`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// Exact (erf) GELU.
    fn gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// CLIP's `x * sigmoid(1.702 x)`.
    fn quick_gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rotary embedding, split-halves layout (HF `rotate_half`), on `[n, heads * head_dim]` rows at
    /// positions `pos0 .. pos0 + n`.
    fn rope(
        &self,
        x: &Self::Tensor,
        head_dim: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<Self::Tensor>;
    /// [`Backend::rope`] of the queries and of the keys of the same rows (one launch on a GPU),
    /// row `i` at position `positions[i]` (a prefill's rows are consecutive; a batched decode
    /// step's rows each sit at their own sequence's position).
    fn rope_qk(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        head_dim: usize,
        positions: &[u32],
        theta: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Scaled dot-product attention: q `[n_q, H·d]`, k and v `[≥kv_len, Hkv·d]` → `[n_q, H·d]`,
    /// softmax in f32, scale `1/√d`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<Self::Tensor>;
    /// [`Backend::attention`] with some keys hidden: key row `j` (with its value row) takes part
    /// only when `key_keep[j]` is true. A hidden key gets probability exactly 0 for every query —
    /// as if its score were −∞ before the softmax — on top of the causal mask when `shape` has one;
    /// the softmax renormalises over the keys that remain. With every entry true the result equals
    /// `attention` (the same numbers, not just close); for non-causal attention it equals
    /// `attention` on k and v with the hidden rows deleted. A query row that sees no key at all
    /// (every visible key hidden) gets a zero output row, never NaN.
    ///
    /// `key_keep.len()` must be at least `shape.kv_len`; entries past `kv_len` are ignored, so one
    /// mask sized to the KV cache's capacity serves the prefill and every decode step. Used by
    /// `fastrm eval`'s perturbation curves to remove image patches from the model's view (forward
    /// only: no backward op exists or is needed for it).
    fn attention_masked(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttnShape,
        key_keep: &[bool],
    ) -> Result<Self::Tensor>;
    /// Gathers rows of an embedding table `[vocab, d]`; every id must be `< vocab`. Also what
    /// reads a sequence's keys or values out of the pages of a KV pool.
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;
    /// Writes row `i` of `src` into row `rows[i]` of `dst` (keys and values into their pages);
    /// the rows must be distinct and inside `dst`.
    fn scatter_rows(&self, dst: &mut Self::Tensor, rows: &[u32], src: &Self::Tensor) -> Result<()>;
    /// A decode step's RoPE and cache writes: [`Backend::rope_qk`] of the rows, their rotated keys
    /// and their values `v` [`Backend::scatter_rows`]-written to `dst`; returns the rotated
    /// queries. One launch where a GPU backend fuses it, the same values either way.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk_store(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        head_dim: usize,
        positions: &[u32],
        theta: f32,
        dst: KvStore<'_, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let (q, k) = self.rope_qk(q, k, head_dim, positions, theta)?;
        self.scatter_rows(dst.keys, dst.slots, &k)?;
        self.scatter_rows(dst.values, dst.slots, v)?;
        Ok(q)
    }
    /// Decode attention of a batch over paged keys and values. Row `i` of `q` `[B, H·d]` is one
    /// query at position `rows[i].len - 1`, seeing keys `0 .. rows[i].len`; key `j` of row `i` is
    /// row `rows[i].pages[j / page] · page + j % page` of `k` and `v` (the pool's tensors of one
    /// layer). `shape` gives the heads (its `kv_len` and `causal_q_pos0` are not read). Each row's
    /// result is exactly what [`Backend::attention`] gives for its query over its keys gathered in
    /// order, whatever else is in the batch.
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        rows: &[PagedRow<'_>],
        page: usize,
        shape: AttnShape,
    ) -> Result<Self::Tensor>;
    /// Rows `start .. start + n` as a new tensor.
    fn slice_rows(&self, x: &Self::Tensor, start: usize, n: usize) -> Result<Self::Tensor>;
    /// Writes all of `src` into `dst` at row `dst_row` (KV-cache append, image-feature scatter).
    fn copy_rows_into(
        &self,
        dst: &mut Self::Tensor,
        dst_row: usize,
        src: &Self::Tensor,
    ) -> Result<()>;
    /// Index of the largest value in each row (first one on ties, as `torch.argmax`).
    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<u32>>;
    /// The FastRM head's decode step, fused: for each row `h` of `x` `[m, D]`,
    /// `sigmoid(scale · (folded · LayerNorm(h; ln_w, ln_b, eps) + c))` over the `P` image patches,
    /// with `folded` `[P, D]` and `c` `[1, P]` from the once-per-prefill fold → `[m, P]`.
    fn fastrm_scores(
        &self,
        x: &Self::Tensor,
        ln_w: &Self::Tensor,
        ln_b: &Self::Tensor,
        eps: f32,
        folded: &Self::Tensor,
        c: &Self::Tensor,
        scale: f32,
    ) -> Result<Self::Tensor>;
    /// Plain product `a · b`: a `[m, k]`, b `[k, n]` (relevancy folds and products of cams).
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- Backward ops: activation gradients only, never weight gradients. Each takes
    // what its forward saw plus the gradient of the forward's output, and sits beside its forward in
    // every backend so the two are implemented (and tested) together.

    /// `dx = dy · w` for `y = x · wᵀ`: dy `[m, n]`, w `[n, k]` → `[m, k]`.
    fn linear_bwd(&self, dy: &Self::Tensor, w: &Self::Tensor) -> Result<Self::Tensor>;
    /// Gradient of [`Backend::rms_norm`] with respect to its input.
    fn rms_norm_bwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// Gradients of [`Backend::silu_mul`] with respect to `gate` and `up`.
    fn silu_mul_bwd(
        &self,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Gradient of [`Backend::rope`]: the inverse rotation.
    fn rope_bwd(
        &self,
        dy: &Self::Tensor,
        head_dim: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<Self::Tensor>;
    /// Gradients of [`Backend::attention`] with respect to q, k and v (k and v: `[kv_len, Hkv·d]`),
    /// recomputing the probabilities from q and k, plus the layer's cam rows when asked.
    fn attention_bwd(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        shape: AttnShape,
        cam: Option<Cam>,
    ) -> Result<AttnGrads<Self::Tensor>>;

    // ---- Parameter gradients: only training the FastRM head (`fastrm train`) needs them; the
    // relevancy backward above never does.

    /// Gradients of [`Backend::layer_norm`] with respect to its input, weight and bias:
    /// `(dx [rows, cols], dw [1, cols], db [1, cols])`, the parameter gradients summed over rows.
    fn layer_norm_bwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    /// Weight gradient of `y = x · wᵀ`: `dW = dyᵀ · x`, dy `[m, n]`, x `[m, k]` → `[n, k]`.
    fn linear_wgrad(&self, dy: &Self::Tensor, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Column sums `[rows, cols]` → `[1, cols]` (a bias gradient).
    fn sum_rows(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
}

/// What a device allocation is for, in the memory breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MemTag {
    Activations = 0,
    Weights = 1,
    KvCache = 2,
    /// Activations saved by a forward for the relevancy backward.
    Saved = 3,
    /// The FastRM head and its folded keys.
    Head = 4,
    /// One op's intermediate buffers (attention scores, split-K partials), freed when it returns;
    /// and the few index arrays a decode step's layers share (bytes, kept until the next ones).
    Scratch = 5,
}

impl MemTag {
    pub const ALL: [MemTag; 6] = [
        MemTag::Activations,
        MemTag::Weights,
        MemTag::KvCache,
        MemTag::Saved,
        MemTag::Head,
        MemTag::Scratch,
    ];
    pub fn name(self) -> &'static str {
        match self {
            MemTag::Activations => "activations",
            MemTag::Weights => "weights",
            MemTag::KvCache => "kv cache",
            MemTag::Saved => "saved for backward",
            MemTag::Head => "fastrm head",
            MemTag::Scratch => "op scratch",
        }
    }
}

/// Which head-averaged map of the attention probabilities `A` and their gradient `∂s/∂A` an
/// attention backward also emits, `[n_q, kv_len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cam {
    /// Chefer et al.: `mean_h max(0, ∂s/∂A ⊙ A)`.
    Chefer,
    /// The LLM-layer GradCAM the paper compares against: `mean_h A ⊙ max(0, ∂s/∂A)`.
    GradCam,
}

pub struct AttnGrads<T> {
    pub dq: T,
    pub dk: T,
    pub dv: T,
    pub cam: Option<T>,
}

/// Runs `f` with new allocations charged to `tag`, restoring the previous tag afterwards (also
/// when `f` fails).
pub fn with_memory_tag<B: Backend, R>(b: &B, tag: MemTag, f: impl FnOnce() -> R) -> R {
    let prev = b.set_memory_tag(tag);
    let r = f();
    b.set_memory_tag(prev);
    r
}

pub(crate) fn shape_err(op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Backend(format!("{op}: {msg}"))
}

/// A checkpoint tensor may be viewed as `[rows, cols]` only when it holds exactly that many values.
pub(crate) fn check_weight_view(t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<()> {
    let n: usize = t.shape.iter().product();
    if n != rows * cols {
        return Err(shape_err(
            "load_weight",
            format!(
                "`{}` of shape {:?} ({n} values) cannot be viewed as [{rows}, {cols}]",
                t.name, t.shape
            ),
        ));
    }
    Ok(())
}
