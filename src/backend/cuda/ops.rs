//! The op set on the GPU: shape checks first, then one launch (or one cuBLAS call) per op.
//!
//! Row-major `[rows, cols]` tensors are, to column-major cuBLAS, their transposes; every product
//! below is written as the transposed product cuBLAS computes (`yᵀ = w·xᵀ` for `y = x·wᵀ`).

use super::LaunchConfig;

use super::{grid_1d, per_row, Cuda, CudaTensor, Elem, Gemm};
use crate::backend::{
    check_paged, check_weight_view, shape_err, AttnGrads, AttnShape, Backend, Cam, KvStore, MemTag,
    PagedRow, INVARIANT_ROWS,
};
use crate::checkpoint::{StoredTensor, TensorRef};
use crate::error::{Error, Result};

const NORM_BLOCK: u32 = 256;
/// One flash-decoding launch: its key splits, the dense geometry (`kv_len`, `q_pos0`, the key
/// mask's device address or 0), and for paged keys `(page table, pages per row, page size, key
/// counts)` as device addresses and sizes.
struct Decode {
    splits: usize,
    kv_len: i32,
    q_pos0: i32,
    key_keep: u64,
    pages: Option<(u64, i32, i32, u64)>,
}

/// Rows of x that `linear_gemv_fwd` takes (its `GEMV_MAX_ROWS`); more go to cuBLAS.
const GEMV_MAX_ROWS: usize = 4;
/// Warps per `linear_gemv_fwd` block, one output column each.
const GEMV_WARPS: usize = 8;

/// `x · wᵀ` needs as many columns in `w` as in `x`.
fn linear_shape<T: Elem>(op: &str, x: &CudaTensor<T>, w: &CudaTensor<T>) -> Result<()> {
    if x.cols == w.cols {
        return Ok(());
    }
    Err(shape_err(
        op,
        format!("x {:?} · wᵀ with w {:?}", x.dims(), w.dims()),
    ))
}

/// The GEMV kernels' launch over `rows` output columns in all: one warp each.
fn gemv_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(GEMV_WARPS) as u32, 1, 1),
        block_dim: (GEMV_WARPS as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    }
}
/// Threads per block of the argmax kernels (their shared arrays hold 256).
const ARGMAX_BLOCK: usize = 256;
/// Query rows up to which attention takes the flash-decoding kernels rather than cuBLAS.
const DECODE_MAX_QUERIES: usize = 8;
/// Keys per block in the decoding kernel.
const DECODE_CHUNK: usize = 128;
/// The largest model the simulated device accepts (weights, any storage type).
const SIM_MAX_WEIGHTS: usize = 100_000_000;

fn same(op: &str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a != b {
        return Err(shape_err(op, format!("shapes {a:?} and {b:?} differ")));
    }
    Ok(())
}

fn row_vec(op: &str, v: (usize, usize), cols: usize) -> Result<()> {
    if v != (1, cols) {
        return Err(shape_err(op, format!("expected [1, {cols}], got {v:?}")));
    }
    Ok(())
}

/// Rotary embedding needs whole heads of even size.
fn check_heads<T: Elem>(x: &CudaTensor<T>, head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !x.cols.is_multiple_of(head_dim) {
        return Err(shape_err(
            "rope",
            format!(
                "{} columns do not split into heads of even size {head_dim}",
                x.cols
            ),
        ));
    }
    Ok(())
}

fn i32_dim(op: &str, n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| shape_err(op, format!("dimension {n} exceeds the kernels' i32 range")))
}

/// Attention geometry for the per-head products.
#[derive(Clone, Copy)]
struct Heads {
    nq: usize,
    kv: usize,
    h: usize,
    hk: usize,
    d: usize,
}

impl<T: Elem> Cuda<T> {
    /// What the RoPE launchers check before launching: one position per row of q and k, whole
    /// heads, positions in i32. Their column counts and head size as the kernels take them.
    fn rope_qk_dims(
        op: &str,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        head_dim: usize,
        positions: &[u32],
    ) -> Result<(i32, i32, i32)> {
        if q.rows != k.rows || positions.len() != q.rows {
            return Err(shape_err(
                op,
                format!(
                    "queries {:?}, keys {:?} and {} positions",
                    q.dims(),
                    k.dims(),
                    positions.len()
                ),
            ));
        }
        for x in [q, k] {
            check_heads(x, head_dim)?;
        }
        if let Some(&p) = positions.iter().find(|&&p| p > i32::MAX as u32) {
            return Err(shape_err(op, format!("position {p} over i32")));
        }
        Ok((i32_dim(op, q.cols)?, i32_dim(op, k.cols)?, head_dim as i32))
    }

    fn unary(&self, op: &'static str, x: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        let out = self.alloc(x.rows, x.cols)?;
        let n = x.len() as i64;
        self.launch(
            op,
            grid_1d(x.len(), 256),
            &[&self.ptr(&out), &self.ptr(x), &n],
        )?;
        Ok(out)
    }

    fn rotate(
        &self,
        x: &CudaTensor<T>,
        head_dim: usize,
        pos0: usize,
        theta: f32,
        sign: f32,
    ) -> Result<CudaTensor<T>> {
        check_heads(x, head_dim)?;
        let inv = self.inv_freq(head_dim, theta)?;
        let out = self.alloc(x.rows, x.cols)?;
        if x.rows > 0 {
            // The kernel forms pos0 + row in int: the last position must fit.
            let (cols, hd, p0) = (
                i32_dim("rope", x.cols)?,
                head_dim as i32,
                i32_dim("rope", pos0 + x.rows)? - x.rows as i32,
            );
            self.launch(
                "rope_fwd",
                per_row(x.rows, 128, 0),
                &[&self.ptr(&out), &self.ptr(x), &inv, &cols, &hd, &p0, &sign],
            )?;
        }
        Ok(out)
    }

    fn check_attention(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        s: AttnShape,
    ) -> Result<()> {
        let (h, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
        if h == 0
            || hk == 0
            || h % hk != 0
            || q.cols != h * d
            || k.cols != hk * d
            || v.cols != hk * d
        {
            return Err(shape_err(
                "attention",
                format!(
                    "q {:?}, k {:?}, v {:?} do not fit {h} heads / {hk} kv heads of {d}",
                    q.dims(),
                    k.dims(),
                    v.dims()
                ),
            ));
        }
        if k.rows < s.kv_len || v.rows < s.kv_len || s.kv_len == 0 {
            return Err(shape_err(
                "attention",
                format!(
                    "kv_len {} with k rows {}, v rows {}",
                    s.kv_len, k.rows, v.rows
                ),
            ));
        }
        if d > 1024 {
            return Err(shape_err("attention", format!("head_dim {d} over 1024")));
        }
        Ok(())
    }

    /// The shared body of attention with and without a key mask (`key_keep`: one flag per key).
    pub(crate) fn attention_impl(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        s: AttnShape,
        key_keep: Option<&[bool]>,
    ) -> Result<CudaTensor<T>> {
        self.check_attention(q, k, v, s)?;
        let (h, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let kv = s.kv_len;
        let keep = match key_keep {
            Some(m) if m.len() < kv => {
                return Err(shape_err(
                    "attention",
                    format!("key mask of {} for {kv} keys", m.len()),
                ))
            }
            Some(m) => {
                let bytes: Vec<u8> = m[..kv].iter().map(|&b| b as u8).collect();
                Some(self.to_device(&bytes, MemTag::Scratch)?)
            }
            None => None,
        };
        let keep_ptr: u64 = keep.as_ref().map_or(0, |b| self.addr(b));
        let q_pos0: i32 = match s.causal_q_pos0 {
            Some(p) => i32_dim("attention", p)?,
            None => -1,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let nq = q.rows;
        let out = self.alloc(nq, q.cols)?;
        if nq == 0 {
            return Ok(out);
        }
        let kv_i = i32_dim("attention", kv)?;
        if nq <= DECODE_MAX_QUERIES {
            let dense = Decode {
                splits: kv.div_ceil(DECODE_CHUNK),
                kv_len: kv_i,
                q_pos0,
                key_keep: keep_ptr,
                pages: None,
            };
            self.decode_attention(q, k, v, s, dense, &out)?;
            return Ok(out);
        }
        // Many queries: S = Q Kᵀ (f32) per head, softmax to P, O = P V.
        let heads = Heads { nq, kv, h, hk, d };
        let scores = self.scratch::<f32>(h * nq * kv)?;
        let probs = self.scratch::<T>(h * nq * kv)?;
        self.per_head_scores(heads, self.ptr(q), self.ptr(k), self.addr(&scores))?;
        let nq_i = i32_dim("attention", nq)?;
        self.launch(
            "attn_softmax_fwd",
            per_row(h * nq, 256, 0),
            &[
                &self.addr(&probs),
                &self.addr(&scores),
                &nq_i,
                &kv_i,
                &q_pos0,
                &scale,
                &keep_ptr,
            ],
        )?;
        self.per_head_times(heads, self.addr(&probs), self.ptr(v), self.ptr(&out))?;
        Ok(out)
    }

    /// Flash-decoding (`attn_decode_fwd` + `attn_decode_combine`) of `q`'s rows into `out`, over
    /// dense or paged keys.
    fn decode_attention(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        s: AttnShape,
        dec: Decode,
        out: &CudaTensor<T>,
    ) -> Result<()> {
        let (h, d, nq) = (s.n_heads, s.head_dim, q.rows);
        let (h_i, hk_i, d_i) = (h as i32, s.n_kv_heads as i32, d as i32);
        let scale = 1.0 / (d as f32).sqrt();
        let parts = nq * h * dec.splits;
        let part_o = self.scratch::<f32>(parts * d)?;
        let part_ml = self.scratch::<f32>(parts * 2)?;
        let chunk = DECODE_CHUNK as i32;
        let esz = std::mem::size_of::<T>();
        let packs = d * esz / 16;
        // 16-byte loads where a head's row is whole packs (a divisor of 32 of them) and every
        // row of the cache starts on a 16-byte boundary; element loads otherwise.
        let lanes = |t: &CudaTensor<T>| -> i32 {
            let aligned = (d * esz).is_multiple_of(16)
                && (t.cols * esz).is_multiple_of(16)
                && self.ptr(t).is_multiple_of(16);
            if aligned && packs > 0 && 32 % packs == 0 {
                packs as i32
            } else {
                0
            }
        };
        let (key_lanes, val_lanes) = (lanes(k), lanes(v));
        const BLOCK: usize = 128;
        let reduce = if val_lanes > 0 { BLOCK * 16 / esz } else { 0 };
        let cfg = LaunchConfig {
            grid_dim: (h as u32, dec.splits as u32, nq as u32),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: ((d + DECODE_CHUNK + reduce) * 4) as u32,
        };
        let (pages, max_pages, page, lens) = dec.pages.unwrap_or((0, 0, 0, 0));
        self.launch(
            "attn_decode_fwd",
            cfg,
            &[
                &self.addr(&part_o),
                &self.addr(&part_ml),
                &self.ptr(q),
                &self.ptr(k),
                &self.ptr(v),
                &dec.kv_len,
                &h_i,
                &hk_i,
                &d_i,
                &dec.q_pos0,
                &scale,
                &chunk,
                &dec.key_keep,
                &key_lanes,
                &val_lanes,
                &pages,
                &max_pages,
                &page,
                &lens,
            ],
        )?;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, nq as u32, 1),
            block_dim: (d.next_multiple_of(32).min(1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let n_splits = dec.splits as i32;
        self.launch(
            "attn_decode_combine",
            cfg,
            &[
                &self.ptr(out),
                &self.addr(&part_o),
                &self.addr(&part_ml),
                &h_i,
                &d_i,
                &n_splits,
            ],
        )
    }

    /// Per head, `S_h = X_h · Y_hᵀ` into f32 `[H, n_q, kv]`: X `[n_q, H·d]` (queries, or dO),
    /// Y `[≥kv, Hkv·d]` (keys, or values). Heads are strided views of the packed columns; with
    /// grouped queries, head h = g·kvh + j reads kv head kvh, so one batched call per j walks the
    /// kv heads.
    fn per_head_scores(&self, s: Heads, x: u64, y: u64, out: u64) -> Result<()> {
        let g = s.h / s.hk;
        let esz = std::mem::size_of::<T>() as u64;
        for j in 0..g {
            self.gemm(Gemm {
                ta: true,
                tb: false,
                m: s.kv,
                n: s.nq,
                k: s.d,
                a: y,
                lda: s.hk * s.d,
                sa: s.d,
                b: x + (j * s.d) as u64 * esz,
                ldb: s.h * s.d,
                sb: g * s.d,
                c: out + (j * s.nq * s.kv * 4) as u64,
                ldc: s.kv,
                sc: g * s.nq * s.kv,
                batch: s.hk,
                alpha: 1.0,
                beta: 0.0,
                c_f32: true,
            })?;
        }
        Ok(())
    }

    /// Per head, `O_h = P_h · Y_h` into `out` `[n_q, H·d]`: P `[H, n_q, kv]` in `T` (probabilities,
    /// or dS), Y `[≥kv, Hkv·d]` (values, or keys).
    fn per_head_times(&self, s: Heads, p: u64, y: u64, out: u64) -> Result<()> {
        let g = s.h / s.hk;
        let esz = std::mem::size_of::<T>() as u64;
        for j in 0..g {
            self.gemm(Gemm {
                ta: false,
                tb: false,
                m: s.d,
                n: s.nq,
                k: s.kv,
                a: y,
                lda: s.hk * s.d,
                sa: s.d,
                b: p + (j * s.nq * s.kv) as u64 * esz,
                ldb: s.kv,
                sb: g * s.nq * s.kv,
                c: out + (j * s.d) as u64 * esz,
                ldc: s.h * s.d,
                sc: g * s.d,
                batch: s.hk,
                alpha: 1.0,
                beta: 0.0,
                c_f32: false,
            })?;
        }
        Ok(())
    }

    /// Per kv head, `out_kvh = Σ_{h in its group} P_hᵀ · X_h` into `out` `[kv, Hkv·d]`: P
    /// `[H, n_q, kv]` in `T`, X `[n_q, H·d]` (dO for dV, Q for dK).
    fn per_head_transposed(&self, s: Heads, p: u64, x: u64, out: u64) -> Result<()> {
        let g = s.h / s.hk;
        let esz = std::mem::size_of::<T>() as u64;
        for j in 0..g {
            self.gemm(Gemm {
                ta: false,
                tb: true,
                m: s.d,
                n: s.kv,
                k: s.nq,
                a: x + (j * s.d) as u64 * esz,
                lda: s.h * s.d,
                sa: g * s.d,
                b: p + (j * s.nq * s.kv) as u64 * esz,
                ldb: s.kv,
                sb: g * s.nq * s.kv,
                c: out,
                ldc: s.hk * s.d,
                sc: s.d,
                batch: s.hk,
                alpha: 1.0,
                beta: if j == 0 { 0.0 } else { 1.0 },
                c_f32: false,
            })?;
        }
        Ok(())
    }

    /// `x · wᵀ (+ b)` for a decode step's few rows, by `linear_gemv_fwd` (shapes checked by
    /// `linear`). The 16-byte path needs every row of `x` and `w` to start on 16 bytes.
    /// The GEMV kernel over `x` in launches of at most [`GEMV_MAX_ROWS`] rows: every row's sums
    /// are the same whatever the other rows (batch invariance up to
    /// [`crate::backend::INVARIANT_ROWS`] rows; each launch re-reads `w`).
    fn gemv(
        &self,
        x: &CudaTensor<T>,
        w: &CudaTensor<T>,
        bias: Option<&CudaTensor<T>>,
    ) -> Result<CudaTensor<T>> {
        let y = self.alloc(x.rows, w.rows)?;
        let bp = bias.map_or(0, |b| self.ptr(b));
        let (k, n) = (i32_dim("linear", x.cols)?, i32_dim("linear", w.rows)?);
        let vec = self.gemv_vec(x, &[w]);
        let esz = std::mem::size_of::<T>() as u64;
        for r0 in (0..x.rows).step_by(GEMV_MAX_ROWS) {
            let m = GEMV_MAX_ROWS.min(x.rows - r0) as i32;
            self.launch(
                "linear_gemv_fwd",
                gemv_config(w.rows),
                &[
                    &(self.ptr(&y) + (r0 * w.rows) as u64 * esz),
                    &(self.ptr(x) + (r0 * x.cols) as u64 * esz),
                    &self.ptr(w),
                    &bp,
                    &m,
                    &k,
                    &n,
                    &vec,
                ],
            )?;
        }
        Ok(y)
    }

    /// 1 when the GEMV kernels may read `x` and every weight in 16-byte packs: rows a multiple of
    /// 16 bytes, every pointer on 16 bytes.
    fn gemv_vec(&self, x: &CudaTensor<T>, ws: &[&CudaTensor<T>]) -> i32 {
        let row_bytes = x.cols * std::mem::size_of::<T>();
        i32::from(
            row_bytes.is_multiple_of(16)
                && self.ptr(x).is_multiple_of(16)
                && ws.iter().all(|w| self.ptr(w).is_multiple_of(16)),
        )
    }

    /// Row-major `out[m, n] = a[m, k] · b` where `b` is `[k, n]` (`b_t = false`) or `[n, k]`
    /// (`b_t = true`).
    fn product(
        &self,
        a: &CudaTensor<T>,
        b: &CudaTensor<T>,
        b_t: bool,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<CudaTensor<T>> {
        let out = self.alloc(m, n)?;
        if m == 0 || n == 0 {
            return Ok(out);
        }
        if k == 0 {
            return Err(shape_err("matmul", "inner dimension 0"));
        }
        self.gemm(Gemm {
            ta: b_t,
            tb: false,
            m: n,
            n: m,
            k,
            a: self.ptr(b),
            lda: if b_t { k } else { n },
            sa: 0,
            b: self.ptr(a),
            ldb: k,
            sb: 0,
            c: self.ptr(&out),
            ldc: n,
            sc: 0,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            c_f32: false,
        })?;
        Ok(out)
    }

    fn add_into(&self, out: &CudaTensor<T>, a: &CudaTensor<T>, b: &CudaTensor<T>) -> Result<()> {
        let (n, blen) = (a.len() as i64, b.len().max(1) as i64);
        self.launch(
            "add_fwd",
            grid_1d(a.len(), 256),
            &[&self.ptr(out), &self.ptr(a), &self.ptr(b), &n, &blen],
        )
    }
}

impl<T: Elem> Backend for Cuda<T> {
    type Tensor = CudaTensor<T>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", T::NAME, self.device_name())
    }

    fn dims(&self, t: &CudaTensor<T>) -> (usize, usize) {
        t.dims()
    }

    fn check_weight_memory(&self, weights: &[StoredTensor]) -> Result<()> {
        let n_values: usize = weights.iter().map(|w| w.rows * w.cols).sum();
        let need = n_values as u64 * std::mem::size_of::<T>() as u64;
        let Some((free, total)) = self.memory_info()? else {
            // The simulator runs every CUDA thread as a fiber on one core: a model of LLaVA's
            // size would fill host memory and run for hours, so it is refused up front.
            if n_values > SIM_MAX_WEIGHTS {
                return Err(Error::Backend(format!(
                    "the simulated device is for small models (at most {} M weights); this one \
                     has {} M: use --device cuda on a GPU",
                    SIM_MAX_WEIGHTS / 1_000_000,
                    n_values / 1_000_000
                )));
            }
            return Ok(());
        };
        if need > free as u64 {
            return Err(Error::OutOfMemory(format!(
                "the model's weights need {:.1} GB at {} but the GPU has {:.1} GB free of {:.1} GB",
                need as f64 / 1e9,
                T::NAME,
                free as f64 / 1e9,
                total as f64 / 1e9
            )));
        }
        Ok(())
    }

    fn set_memory_tag(&self, tag: MemTag) -> MemTag {
        let prev = self.ledger.current();
        self.ledger
            .tag
            .store(tag as u8, std::sync::atomic::Ordering::Relaxed);
        prev
    }

    fn memory_breakdown(&self) -> Vec<(MemTag, usize, usize)> {
        self.ledger.report().0
    }

    fn memory_peak(&self) -> Option<usize> {
        Some(self.ledger.report().1)
    }

    fn synchronize(&self) -> Result<()> {
        Cuda::synchronize(self)
    }

    fn trim_and_sync(&self) -> Result<()> {
        Cuda::trim_and_sync(self)
    }

    fn mark(&self) -> Result<crate::backend::Mark> {
        self.record_event().map(crate::backend::Mark::Device)
    }

    fn clock_name(&self) -> &'static str {
        "CUDA events"
    }

    fn storage_bytes(&self) -> usize {
        std::mem::size_of::<T>()
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor<T>> {
        if data.len() != rows * cols {
            return Err(shape_err(
                "upload",
                format!("{} values for [{rows}, {cols}]", data.len()),
            ));
        }
        let host: Vec<T> = data.iter().map(|&v| T::from_f32(v)).collect();
        let t = self.alloc(rows, cols)?;
        self.write(self.ptr(&t), &host)?;
        Ok(t)
    }

    fn load_weight(&self, t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<CudaTensor<T>> {
        check_weight_view(t, rows, cols)?;
        self.upload(&t.to_f32(), rows, cols)
    }

    fn download(&self, t: &CudaTensor<T>) -> Result<Vec<f32>> {
        let mut host = vec![T::default(); t.len()];
        self.read(self.ptr(t), &mut host)?;
        Ok(host.into_iter().map(T::to_f32).collect())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor<T>> {
        let t = self.alloc(rows, cols)?;
        self.fill_bytes(self.ptr(&t), 0, t.len() * std::mem::size_of::<T>())?;
        Ok(t)
    }

    fn uniform(
        &self,
        rows: usize,
        cols: usize,
        seed: u64,
        center: f32,
        spread: f32,
    ) -> Result<CudaTensor<T>> {
        let out = self.alloc(rows, cols)?;
        let n = out.len() as i64;
        self.launch(
            "fill_uniform",
            grid_1d(out.len(), 256),
            &[&self.ptr(&out), &n, &seed, &center, &spread],
        )?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor<T>,
        w: &CudaTensor<T>,
        bias: Option<&CudaTensor<T>>,
    ) -> Result<CudaTensor<T>> {
        linear_shape("linear", x, w)?;
        if let Some(b) = bias {
            row_vec("linear bias", b.dims(), w.rows)?;
        }
        if self.gemv_enabled() && x.rows <= INVARIANT_ROWS && x.len() > 0 && w.len() > 0 {
            return self.gemv(x, w, bias);
        }
        let y = self.product(x, w, true, x.rows, w.rows, x.cols)?;
        if let Some(b) = bias {
            if y.len() > 0 {
                self.add_into(&y, &y, b)?;
            }
        }
        Ok(y)
    }

    fn linear_group(&self, x: &CudaTensor<T>, ws: &[&CudaTensor<T>]) -> Result<Vec<CudaTensor<T>>> {
        let one_launch = self.fuse_enabled()
            && self.gemv_enabled()
            && (2..=3).contains(&ws.len())
            && x.rows <= INVARIANT_ROWS
            && x.len() > 0
            && ws.iter().all(|w| w.len() > 0);
        if !one_launch {
            return ws.iter().map(|w| self.linear(x, w, None)).collect();
        }
        for w in ws {
            linear_shape("linear_group", x, w)?;
        }
        let ys = ws
            .iter()
            .map(|w| self.alloc(x.rows, w.rows))
            .collect::<Result<Vec<_>>>()?;
        // A third slot of zero rows when there are two weights; the kernel never reads it.
        let slot = |i: usize| {
            ws.get(i)
                .map_or((0, 0, 0), |w| (self.ptr(w), self.ptr(&ys[i]), w.rows))
        };
        let ((w0, y0, n0), (w1, y1, n1), (w2, y2, n2)) = (slot(0), slot(1), slot(2));
        let k = i32_dim("linear_group", x.cols)?;
        // Each height fits an i32 when their sum does.
        let total = i32_dim("linear_group", n0 + n1 + n2)? as usize;
        let (n0i, n1i, n2i) = (n0 as i32, n1 as i32, n2 as i32);
        let vec = self.gemv_vec(x, ws);
        let esz = std::mem::size_of::<T>() as u64;
        // As `gemv`: launches of at most GEMV_MAX_ROWS rows, each row's sums its own.
        for r0 in (0..x.rows).step_by(GEMV_MAX_ROWS) {
            let m = GEMV_MAX_ROWS.min(x.rows - r0) as i32;
            let at = |y: u64, n: usize| if y == 0 { 0 } else { y + (r0 * n) as u64 * esz };
            self.launch(
                "linear_gemv_group_fwd",
                gemv_config(total),
                &[
                    &at(y0, n0),
                    &at(y1, n1),
                    &at(y2, n2),
                    &(self.ptr(x) + (r0 * x.cols) as u64 * esz),
                    &w0,
                    &w1,
                    &w2,
                    &m,
                    &k,
                    &n0i,
                    &n1i,
                    &n2i,
                    &vec,
                ],
            )?;
        }
        Ok(ys)
    }

    fn add(&self, a: &CudaTensor<T>, b: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        if b.dims() != a.dims() && b.dims() != (1, a.cols) {
            return Err(shape_err("add", format!("{:?} + {:?}", a.dims(), b.dims())));
        }
        let out = self.alloc(a.rows, a.cols)?;
        if a.len() > 0 {
            self.add_into(&out, a, b)?;
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor<T>, w: &CudaTensor<T>, eps: f32) -> Result<CudaTensor<T>> {
        row_vec("rms_norm weight", w.dims(), x.cols)?;
        let out = self.alloc(x.rows, x.cols)?;
        if x.len() > 0 {
            let cols = i32_dim("rms_norm", x.cols)?;
            self.launch(
                "rms_norm_fwd",
                per_row(x.rows, NORM_BLOCK, 0),
                &[&self.ptr(&out), &self.ptr(x), &self.ptr(w), &cols, &eps],
            )?;
        }
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        a: &CudaTensor<T>,
        b: &CudaTensor<T>,
        w: &CudaTensor<T>,
        eps: f32,
    ) -> Result<(CudaTensor<T>, CudaTensor<T>)> {
        if a.dims() != b.dims() {
            return Err(shape_err(
                "add_rms_norm",
                format!("{:?} + {:?}", a.dims(), b.dims()),
            ));
        }
        row_vec("rms_norm weight", w.dims(), a.cols)?;
        if !self.fuse_enabled() {
            let sum = self.add(a, b)?;
            let out = self.rms_norm(&sum, w, eps)?;
            return Ok((sum, out));
        }
        let (sum, out) = (self.alloc(a.rows, a.cols)?, self.alloc(a.rows, a.cols)?);
        if a.len() > 0 {
            let cols = i32_dim("add_rms_norm", a.cols)?;
            self.launch(
                "add_rms_norm_fwd",
                per_row(a.rows, NORM_BLOCK, 0),
                &[
                    &self.ptr(&sum),
                    &self.ptr(&out),
                    &self.ptr(a),
                    &self.ptr(b),
                    &self.ptr(w),
                    &cols,
                    &eps,
                ],
            )?;
        }
        Ok((sum, out))
    }

    fn layer_norm(
        &self,
        x: &CudaTensor<T>,
        w: &CudaTensor<T>,
        b: &CudaTensor<T>,
        eps: f32,
    ) -> Result<CudaTensor<T>> {
        row_vec("layer_norm weight", w.dims(), x.cols)?;
        row_vec("layer_norm bias", b.dims(), x.cols)?;
        let out = self.alloc(x.rows, x.cols)?;
        if x.len() > 0 {
            let cols = i32_dim("layer_norm", x.cols)?;
            self.launch(
                "layer_norm_fwd",
                per_row(x.rows, NORM_BLOCK, 0),
                &[
                    &self.ptr(&out),
                    &self.ptr(x),
                    &self.ptr(w),
                    &self.ptr(b),
                    &cols,
                    &eps,
                ],
            )?;
        }
        Ok(out)
    }

    fn gelu(&self, x: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        self.unary("gelu_fwd", x)
    }

    fn quick_gelu(&self, x: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        self.unary("quick_gelu_fwd", x)
    }

    fn silu_mul(&self, gate: &CudaTensor<T>, up: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        same("silu_mul", gate.dims(), up.dims())?;
        let out = self.alloc(gate.rows, gate.cols)?;
        let n = gate.len() as i64;
        self.launch(
            "silu_mul_fwd",
            grid_1d(gate.len(), 256),
            &[&self.ptr(&out), &self.ptr(gate), &self.ptr(up), &n],
        )?;
        Ok(out)
    }

    fn rope(
        &self,
        x: &CudaTensor<T>,
        head_dim: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CudaTensor<T>> {
        self.rotate(x, head_dim, pos0, theta, 1.0)
    }

    fn rope_qk(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        head_dim: usize,
        positions: &[u32],
        theta: f32,
    ) -> Result<(CudaTensor<T>, CudaTensor<T>)> {
        let (qc, kc, hd) = Self::rope_qk_dims("rope", q, k, head_dim, positions)?;
        let inv = self.inv_freq(head_dim, theta)?;
        let (q_out, k_out) = (self.alloc(q.rows, q.cols)?, self.alloc(k.rows, k.cols)?);
        if q.rows > 0 {
            let pos = self.indices(positions)?;
            self.launch(
                "rope_qk_fwd",
                per_row(q.rows, 128, 0),
                &[
                    &self.ptr(&q_out),
                    &self.ptr(q),
                    &self.ptr(&k_out),
                    &self.ptr(k),
                    &inv,
                    &qc,
                    &kc,
                    &hd,
                    &pos,
                ],
            )?;
        }
        Ok((q_out, k_out))
    }

    fn rope_qk_store(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        head_dim: usize,
        positions: &[u32],
        theta: f32,
        dst: KvStore<'_, CudaTensor<T>>,
    ) -> Result<CudaTensor<T>> {
        if !self.fuse_enabled() {
            let (q, k) = self.rope_qk(q, k, head_dim, positions, theta)?;
            self.scatter_rows(dst.keys, dst.slots, &k)?;
            self.scatter_rows(dst.values, dst.slots, v)?;
            return Ok(q);
        }
        let n = q.rows;
        let (qc, kc, hd) = Self::rope_qk_dims("rope_qk_store", q, k, head_dim, positions)?;
        if v.rows != n || dst.slots.len() != n {
            return Err(shape_err(
                "rope_qk_store",
                format!(
                    "values {:?} and {} slots for {n} rows",
                    v.dims(),
                    dst.slots.len()
                ),
            ));
        }
        for pool in [&*dst.keys, &*dst.values] {
            if pool.cols != k.cols || v.cols != k.cols {
                return Err(shape_err(
                    "rope_qk_store",
                    format!(
                        "keys {:?} and values {:?} into a pool of {:?}",
                        k.dims(),
                        v.dims(),
                        pool.dims()
                    ),
                ));
            }
            if let Some(&r) = dst.slots.iter().find(|&&r| r as usize >= pool.rows) {
                return Err(shape_err(
                    "rope_qk_store",
                    format!("slot {r} outside the pool's {:?}", pool.dims()),
                ));
            }
        }
        let inv = self.inv_freq(head_dim, theta)?;
        let q_out = self.alloc(q.rows, q.cols)?;
        if n > 0 {
            let (pos, slots) = (self.indices(positions)?, self.indices(dst.slots)?);
            self.launch(
                "rope_qk_store_fwd",
                per_row(n, 128, 0),
                &[
                    &self.ptr(&q_out),
                    &self.ptr(q),
                    &self.ptr(dst.keys),
                    &self.ptr(k),
                    &self.ptr(dst.values),
                    &self.ptr(v),
                    &inv,
                    &qc,
                    &kc,
                    &hd,
                    &pos,
                    &slots,
                ],
            )?;
        }
        Ok(q_out)
    }

    fn attention(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        shape: AttnShape,
    ) -> Result<CudaTensor<T>> {
        self.attention_impl(q, k, v, shape, None)
    }

    fn attention_masked(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        shape: AttnShape,
        key_keep: &[bool],
    ) -> Result<CudaTensor<T>> {
        self.attention_impl(q, k, v, shape, Some(key_keep))
    }

    fn embedding(&self, table: &CudaTensor<T>, ids: &[u32]) -> Result<CudaTensor<T>> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(shape_err(
                "embedding",
                format!("token id {bad} outside the vocabulary of {}", table.rows),
            ));
        }
        let out = self.alloc(ids.len(), table.cols)?;
        if !ids.is_empty() {
            let dev_ids = self.indices(ids)?;
            let d = i32_dim("embedding", table.cols)?;
            self.launch(
                "embedding_fwd",
                per_row(ids.len(), 256, 0),
                &[&self.ptr(&out), &self.ptr(table), &dev_ids, &d],
            )?;
        }
        Ok(out)
    }

    fn scatter_rows(
        &self,
        dst: &mut CudaTensor<T>,
        rows: &[u32],
        src: &CudaTensor<T>,
    ) -> Result<()> {
        if src.cols != dst.cols || src.rows != rows.len() {
            return Err(shape_err(
                "scatter_rows",
                format!(
                    "{:?} to {} rows of {:?}",
                    src.dims(),
                    rows.len(),
                    dst.dims()
                ),
            ));
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= dst.rows) {
            return Err(shape_err(
                "scatter_rows",
                format!("row {r} outside {:?}", dst.dims()),
            ));
        }
        if !rows.is_empty() {
            let dev_rows = self.indices(rows)?;
            let d = i32_dim("scatter_rows", dst.cols)?;
            self.launch(
                "scatter_rows",
                per_row(rows.len(), 256, 0),
                &[&self.ptr(dst), &self.ptr(src), &dev_rows, &d],
            )?;
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        rows: &[PagedRow<'_>],
        page: usize,
        shape: AttnShape,
    ) -> Result<CudaTensor<T>> {
        check_paged(q.rows, rows, page, k.rows.min(v.rows))?;
        let longest = rows.iter().map(|r| r.len).max().unwrap_or(0);
        self.check_attention(
            q,
            k,
            v,
            AttnShape {
                kv_len: longest.max(1).min(k.rows),
                ..shape
            },
        )?;
        let out = self.alloc(q.rows, q.cols)?;
        if rows.is_empty() {
            return Ok(out);
        }
        // Every row's page table padded to the longest, as i32 [B, max_pages].
        let max_pages = rows.iter().map(|r| r.len.div_ceil(page)).max().unwrap_or(1);
        let mut table = vec![0i32; rows.len() * max_pages];
        for (i, r) in rows.iter().enumerate() {
            for (slot, &p) in table[i * max_pages..]
                .iter_mut()
                .zip(&r.pages[..r.len.div_ceil(page)])
            {
                *slot = p as i32;
            }
        }
        let lens: Vec<i32> = rows.iter().map(|r| r.len as i32).collect();
        let (table, lens) = (self.indices(&table)?, self.indices(&lens)?);
        let paged = Decode {
            splits: longest.div_ceil(DECODE_CHUNK),
            kv_len: i32_dim("paged_attention", longest)?,
            q_pos0: -1,
            key_keep: 0,
            pages: Some((
                table,
                i32_dim("paged_attention", max_pages)?,
                i32_dim("paged_attention", page)?,
                lens,
            )),
        };
        self.decode_attention(q, k, v, shape, paged, &out)?;
        Ok(out)
    }

    fn slice_rows(&self, x: &CudaTensor<T>, start: usize, n: usize) -> Result<CudaTensor<T>> {
        if start + n > x.rows {
            return Err(shape_err(
                "slice_rows",
                format!("rows {start}..{} of {}", start + n, x.rows),
            ));
        }
        let out = self.alloc(n, x.cols)?;
        let esz = std::mem::size_of::<T>();
        self.copy(
            self.ptr(&out),
            self.ptr(x) + (start * x.cols * esz) as u64,
            n * x.cols * esz,
        )?;
        Ok(out)
    }

    fn copy_rows_into(
        &self,
        dst: &mut CudaTensor<T>,
        dst_row: usize,
        src: &CudaTensor<T>,
    ) -> Result<()> {
        if src.cols != dst.cols || dst_row + src.rows > dst.rows {
            return Err(shape_err(
                "copy_rows_into",
                format!("{:?} at row {dst_row} of {:?}", src.dims(), dst.dims()),
            ));
        }
        let esz = std::mem::size_of::<T>();
        self.copy(
            self.ptr(dst) + (dst_row * dst.cols * esz) as u64,
            self.ptr(src),
            src.len() * esz,
        )
    }

    fn argmax_rows(&self, x: &CudaTensor<T>) -> Result<Vec<u32>> {
        if x.cols == 0 {
            return Err(shape_err("argmax_rows", "tensor has no columns"));
        }
        if x.rows == 0 {
            return Ok(Vec::new());
        }
        let cols = i32_dim("argmax_rows", x.cols)?;
        // Four columns a thread per split; at most 256 splits, so the second pass is one load a
        // thread.
        let per_split = (ARGMAX_BLOCK * 4).max(x.cols.div_ceil(ARGMAX_BLOCK));
        let splits = x.cols.div_ceil(per_split);
        let part_v = self.scratch::<f32>(x.rows * splits)?;
        let part_i = self.scratch::<i32>(x.rows * splits)?;
        let out = self.scratch::<u32>(x.rows)?;
        let (per_split_arg, splits_arg) = (per_split as i32, splits as i32);
        self.launch(
            "argmax_split",
            LaunchConfig {
                grid_dim: (splits as u32, x.rows as u32, 1),
                block_dim: (ARGMAX_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                &self.addr(&part_v),
                &self.addr(&part_i),
                &self.ptr(x),
                &cols,
                &per_split_arg,
            ],
        )?;
        self.launch(
            "argmax_rows",
            per_row(x.rows, ARGMAX_BLOCK as u32, 0),
            &[
                &self.addr(&out),
                &self.addr(&part_v),
                &self.addr(&part_i),
                &splits_arg,
                &cols,
            ],
        )?;
        let mut host = vec![0u32; x.rows];
        self.read(self.addr(&out), &mut host)?;
        Ok(host)
    }

    fn fastrm_scores(
        &self,
        x: &CudaTensor<T>,
        ln_w: &CudaTensor<T>,
        ln_b: &CudaTensor<T>,
        eps: f32,
        folded: &CudaTensor<T>,
        c: &CudaTensor<T>,
        scale: f32,
    ) -> Result<CudaTensor<T>> {
        if folded.cols != x.cols {
            return Err(shape_err(
                "fastrm_scores",
                format!("folded keys {:?} for hidden size {}", folded.dims(), x.cols),
            ));
        }
        row_vec("fastrm_scores layer norm weight", ln_w.dims(), x.cols)?;
        row_vec("fastrm_scores layer norm bias", ln_b.dims(), x.cols)?;
        row_vec("fastrm_scores bias", c.dims(), folded.rows)?;
        let (dm, p) = (x.cols, folded.rows);
        let out = self.alloc(x.rows, p)?;
        if x.rows == 0 || p == 0 {
            return Ok(out);
        }
        // One warp per patch, eight per block: 72 blocks for LLaVA's 576 patches.
        let per_block: i32 = 8;
        let cfg = LaunchConfig {
            grid_dim: (p.div_ceil(per_block as usize) as u32, x.rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (dm * 4) as u32,
        };
        if dm * 4 > 48 * 1024 {
            return Err(shape_err(
                "fastrm_scores",
                format!("hidden size {dm} over the kernel's 12288"),
            ));
        }
        let (d_i, p_i) = (i32_dim("fastrm_scores", dm)?, i32_dim("fastrm_scores", p)?);
        self.launch(
            "fastrm_scores_fwd",
            cfg,
            &[
                &self.ptr(&out),
                &self.ptr(x),
                &self.ptr(ln_w),
                &self.ptr(ln_b),
                &self.ptr(folded),
                &self.ptr(c),
                &d_i,
                &p_i,
                &eps,
                &scale,
                &per_block,
            ],
        )?;
        Ok(out)
    }

    fn matmul(&self, a: &CudaTensor<T>, b: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        if a.cols != b.rows {
            return Err(shape_err(
                "matmul",
                format!("{:?} · {:?}", a.dims(), b.dims()),
            ));
        }
        self.product(a, b, false, a.rows, b.cols, a.cols)
    }

    fn linear_bwd(&self, dy: &CudaTensor<T>, w: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        if dy.cols != w.rows {
            return Err(shape_err(
                "linear_bwd",
                format!("dy {:?} · w {:?}", dy.dims(), w.dims()),
            ));
        }
        self.product(dy, w, false, dy.rows, w.cols, dy.cols)
    }

    fn rms_norm_bwd(
        &self,
        x: &CudaTensor<T>,
        w: &CudaTensor<T>,
        dy: &CudaTensor<T>,
        eps: f32,
    ) -> Result<CudaTensor<T>> {
        row_vec("rms_norm_bwd weight", w.dims(), x.cols)?;
        same("rms_norm_bwd", x.dims(), dy.dims())?;
        let dx = self.alloc(x.rows, x.cols)?;
        if x.len() > 0 {
            let cols = i32_dim("rms_norm_bwd", x.cols)?;
            self.launch(
                "rms_norm_bwd",
                per_row(x.rows, NORM_BLOCK, 0),
                &[
                    &self.ptr(&dx),
                    &self.ptr(x),
                    &self.ptr(w),
                    &self.ptr(dy),
                    &cols,
                    &eps,
                ],
            )?;
        }
        Ok(dx)
    }

    fn silu_mul_bwd(
        &self,
        gate: &CudaTensor<T>,
        up: &CudaTensor<T>,
        dy: &CudaTensor<T>,
    ) -> Result<(CudaTensor<T>, CudaTensor<T>)> {
        same("silu_mul_bwd", gate.dims(), up.dims())?;
        same("silu_mul_bwd", gate.dims(), dy.dims())?;
        let dgate = self.alloc(gate.rows, gate.cols)?;
        let dup = self.alloc(gate.rows, gate.cols)?;
        let n = gate.len() as i64;
        self.launch(
            "silu_mul_bwd",
            grid_1d(gate.len(), 256),
            &[
                &self.ptr(&dgate),
                &self.ptr(&dup),
                &self.ptr(gate),
                &self.ptr(up),
                &self.ptr(dy),
                &n,
            ],
        )?;
        Ok((dgate, dup))
    }

    fn rope_bwd(
        &self,
        dy: &CudaTensor<T>,
        head_dim: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CudaTensor<T>> {
        self.rotate(dy, head_dim, pos0, theta, -1.0)
    }

    fn attention_bwd(
        &self,
        q: &CudaTensor<T>,
        k: &CudaTensor<T>,
        v: &CudaTensor<T>,
        dout: &CudaTensor<T>,
        shape: AttnShape,
        cam: Option<Cam>,
    ) -> Result<AttnGrads<CudaTensor<T>>> {
        self.check_attention(q, k, v, shape)?;
        same("attention_bwd dout", q.dims(), dout.dims())?;
        let (h, hk, d, kv, nq) = (
            shape.n_heads,
            shape.n_kv_heads,
            shape.head_dim,
            shape.kv_len,
            q.rows,
        );
        if nq == 0 {
            // No query: nothing flows back.
            let cam = match cam {
                Some(_) => Some(self.alloc(0, kv)?),
                None => None,
            };
            return Ok(AttnGrads {
                dq: self.alloc(0, h * d)?,
                dk: self.zeros(kv, hk * d)?,
                dv: self.zeros(kv, hk * d)?,
                cam,
            });
        }
        let dq = self.alloc(nq, h * d)?;
        let dk = self.alloc(kv, hk * d)?;
        let dv = self.alloc(kv, hk * d)?;
        let heads = Heads { nq, kv, h, hk, d };
        // Scores and dP in f32, P and dS in the storage type for the products that follow.
        let scores = self.scratch::<f32>(h * nq * kv)?;
        let dp = self.scratch::<f32>(h * nq * kv)?;
        let probs = self.scratch::<T>(h * nq * kv)?;
        let ds = self.scratch::<T>(h * nq * kv)?;
        self.per_head_scores(heads, self.ptr(q), self.ptr(k), self.addr(&scores))?;
        self.per_head_scores(heads, self.ptr(dout), self.ptr(v), self.addr(&dp))?;
        let q_pos0: i32 = match shape.causal_q_pos0 {
            Some(p) => i32_dim("attention_bwd", p)?,
            None => -1,
        };
        let cam_kind: i32 = match cam {
            None => 0,
            Some(Cam::Chefer) => 1,
            Some(Cam::GradCam) => 2,
        };
        let (nq_i, kv_i) = (i32_dim("attention_bwd", nq)?, i32_dim("attention_bwd", kv)?);
        let scale = 1.0 / (d as f32).sqrt();
        self.launch(
            "attn_softmax_bwd",
            per_row(h * nq, 256, 0),
            &[
                &self.addr(&probs),
                &self.addr(&ds),
                &self.addr(&dp),
                &self.addr(&scores),
                &nq_i,
                &kv_i,
                &q_pos0,
                &scale,
                &cam_kind,
            ],
        )?;
        self.per_head_times(heads, self.addr(&ds), self.ptr(k), self.ptr(&dq))?;
        self.per_head_transposed(heads, self.addr(&ds), self.ptr(q), self.ptr(&dk))?;
        self.per_head_transposed(heads, self.addr(&probs), self.ptr(dout), self.ptr(&dv))?;
        let cam = match cam {
            Some(_) => {
                let c = self.alloc(nq, kv)?;
                let (n, h_i) = ((nq * kv) as i64, h as i32);
                self.launch(
                    "attn_cam_mean",
                    grid_1d(nq * kv, 256),
                    &[&self.ptr(&c), &self.addr(&dp), &h_i, &n],
                )?;
                Some(c)
            }
            None => None,
        };
        Ok(AttnGrads { dq, dk, dv, cam })
    }

    fn layer_norm_bwd(
        &self,
        x: &CudaTensor<T>,
        w: &CudaTensor<T>,
        dy: &CudaTensor<T>,
        eps: f32,
    ) -> Result<(CudaTensor<T>, CudaTensor<T>, CudaTensor<T>)> {
        row_vec("layer_norm_bwd weight", w.dims(), x.cols)?;
        same("layer_norm_bwd", x.dims(), dy.dims())?;
        let dx = self.alloc(x.rows, x.cols)?;
        let dw = self.alloc(1, x.cols)?;
        let db = self.alloc(1, x.cols)?;
        let stats = self.scratch::<f32>(2 * x.rows)?;
        let (rows, cols) = (
            i32_dim("layer_norm_bwd", x.rows)?,
            i32_dim("layer_norm_bwd", x.cols)?,
        );
        if x.rows > 0 {
            self.launch(
                "layer_norm_bwd",
                per_row(x.rows, NORM_BLOCK, 0),
                &[
                    &self.ptr(&dx),
                    &self.addr(&stats),
                    &self.ptr(x),
                    &self.ptr(w),
                    &self.ptr(dy),
                    &cols,
                    &eps,
                ],
            )?;
        }
        self.launch(
            "layer_norm_param_bwd",
            grid_1d(x.cols, 256),
            &[
                &self.ptr(&dw),
                &self.ptr(&db),
                &self.addr(&stats),
                &self.ptr(x),
                &self.ptr(dy),
                &rows,
                &cols,
            ],
        )?;
        Ok((dx, dw, db))
    }

    fn linear_wgrad(&self, dy: &CudaTensor<T>, x: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        if dy.rows != x.rows {
            return Err(shape_err(
                "linear_wgrad",
                format!("dy {:?}ᵀ · x {:?}", dy.dims(), x.dims()),
            ));
        }
        let (m, n, k) = (dy.rows, dy.cols, x.cols);
        if m == 0 {
            return self.zeros(n, k);
        }
        let out = self.alloc(n, k)?;
        // dWᵀ [k, n] (column-major) = xᵀ · dy.
        self.gemm(Gemm {
            ta: false,
            tb: true,
            m: k,
            n,
            k: m,
            a: self.ptr(x),
            lda: k,
            sa: 0,
            b: self.ptr(dy),
            ldb: n,
            sb: 0,
            c: self.ptr(&out),
            ldc: k,
            sc: 0,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            c_f32: false,
        })?;
        Ok(out)
    }

    fn sum_rows(&self, x: &CudaTensor<T>) -> Result<CudaTensor<T>> {
        let out = self.alloc(1, x.cols)?;
        let (rows, cols) = (i32_dim("sum_rows", x.rows)?, i32_dim("sum_rows", x.cols)?);
        self.launch(
            "sum_rows",
            grid_1d(x.cols, 256),
            &[&self.ptr(&out), &self.ptr(x), &rows, &cols],
        )?;
        Ok(out)
    }
}
