//! The CPU reference backend: f32 arithmetic everywhere, GEMMs through the `gemm` crate
//! (multi-threaded with rayon), everything else plain loops. It is the oracle the CUDA backend is
//! tested against and the engine CI runs, so it favours obvious code over cleverness, except for
//! the matrix products that dominate its time.
//!
//! Weights are f32 copies ([`Cpu`], the exact-parity path) or, with [`CpuWeights::Stored`] and
//! [`CpuWeights::Half`], half-precision matrices kept in the memory-mapped checkpoint
//! ([`super::cpu_half`]), which the linear layers, the embedding lookup and the linear backward
//! read directly; everything else sees f32.

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu_gemm;
use super::cpu_half::{self, HalfKind, HalfWeight};
use super::{check_weight_view, shape_err, AttnGrads, AttnShape, Backend, Cam, PagedRow};
use crate::checkpoint::{DType, StoredTensor, TensorRef};
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    /// The values; empty for a half-precision weight.
    pub data: Vec<f32>,
    /// A weight matrix held in half precision (see [`CpuWeights`]): only the ops that take weights
    /// (linear, embedding, row slices, download, the linear backward) accept one.
    pub half: Option<HalfWeight>,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(shape_err(
                "tensor",
                format!("{} values cannot form [{rows}, {cols}]", data.len()),
            ));
        }
        Ok(CpuTensor {
            rows,
            cols,
            data,
            half: None,
        })
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// How the CPU backend holds a checkpoint's weights. Vectors (norms, biases) are f32 in every
/// mode; the choice is about the matrices, which are nearly all of a model's bytes.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuWeights {
    /// f32 copies of everything: the exact-parity path, and anonymous memory of 4 bytes a value.
    #[default]
    F32,
    /// As the checkpoint stores them: f16/bf16 matrices stay in the mapped file, f32 ones are
    /// copied. f16 and bf16 widen to f32 exactly, so this computes what `F32` does up to the order
    /// of f32 sums.
    Stored,
    /// In f16 or bf16: mapped where the checkpoint stores that type, rounded copies otherwise.
    Half(HalfKind),
}

#[derive(Default, Clone, Copy, Debug)]
pub struct Cpu {
    pub weights: CpuWeights,
}

/// The CPU backend with f32 weights. A constant of the type's own name, so `Cpu` reads as the
/// reference backend wherever one is passed by value.
#[allow(non_upper_case_globals)]
pub const Cpu: Cpu = Cpu {
    weights: CpuWeights::F32,
};

/// How a CPU backend holds one stored weight.
enum Held {
    /// A view of the mapped file: no anonymous memory.
    Mapped(HalfKind),
    /// A converted copy in this half format (2 bytes a value).
    HalfCopy(HalfKind),
    /// An f32 copy (4 bytes a value).
    F32,
}

impl Cpu {
    /// A backend holding weights as `weights` says.
    pub fn with_weights(weights: CpuWeights) -> Cpu {
        Cpu { weights }
    }

    /// The one rule both loading and the memory check follow.
    fn held(&self, dtype: DType, rows: usize) -> Held {
        if rows <= 1 {
            return Held::F32;
        }
        match (self.weights, HalfKind::of(dtype)) {
            (CpuWeights::F32, _) | (CpuWeights::Stored, None) => Held::F32,
            (CpuWeights::Stored, Some(k)) => Held::Mapped(k),
            (CpuWeights::Half(k), stored) if stored == Some(k) => Held::Mapped(k),
            (CpuWeights::Half(k), _) => Held::HalfCopy(k),
        }
    }
}

/// A half-precision weight where an op needs f32 values is a bug in the caller (weights only
/// reach the ops that take weights); it is an error rather than a wrong answer.
fn dense(op: &str, ts: &[&CpuTensor]) -> Result<()> {
    if ts.iter().any(|t| t.half.is_some()) {
        return Err(shape_err(
            op,
            "a half-precision weight where f32 values are needed",
        ));
    }
    Ok(())
}

/// A strided matrix view for [`matmul`]: element (i, j) lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        View { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `cs`: element (i, j) at `data[j · cs + i]`.
    pub fn cols(data: &'a [f32], cs: usize) -> Self {
        View { data, rs: 1, cs }
    }
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` over strided views, `dst` row-major with row stride `dst_rs`.
/// Bounds are checked here so the unsafe call below only sees in-range strides.
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View,
    rhs: View,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() > (m - 1) * dst_rs + (n - 1),
        "matmul: dst too small"
    );
    // SAFETY: `dst` holds every (i, j) written (asserted above) and is a distinct &mut.
    unsafe { matmul_into(m, n, k, dst.as_mut_ptr(), dst_rs, lhs, rhs, par) }
}

/// [`matmul`] into a raw destination, so that threads can fill disjoint column blocks of one
/// matrix. The operands' bounds are checked here.
///
/// # Safety
/// `dst + i·dst_rs + j` must be valid for writes for every `i < m`, `j < n`, must not alias `lhs`
/// or `rhs`, and no other thread may touch those elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: View,
    rhs: View,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            // 0.0 is all zero bits; the destination may be uninitialised, so no slice of it.
            std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
        }
        return;
    }
    let last = |v: &View, r: usize, c: usize| (r - 1) * v.rs + (c - 1) * v.cs;
    assert!(lhs.data.len() > last(&lhs, m, k), "matmul: lhs too small");
    assert!(rhs.data.len() > last(&rhs, k, n), "matmul: rhs too small");
    // SAFETY: every index gemm touches is (i, j) with i < rows, j < cols of each operand; the
    // asserts above prove the largest such offset is inside each slice, and the caller vouches
    // for `dst`. With `read_dst` false gemm only writes `dst`, so it may start uninitialised.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// A raw pointer that rayon tasks may share: each writes only its own elements.
#[derive(Clone, Copy)]
struct SharedDst(*mut f32);
// SAFETY: the tasks that share one write disjoint elements (see `par_matmul`,
// `causal_products`).
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// The element `offset` along (a method, so closures capture the Send wrapper, not the field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `lhs[m, k] · rhs[k, n]` as a new row-major `[m, n]` across the rayon pool, each task a
/// single-threaded GEMM (on few cores this scales better than the GEMM's own threading, whose
/// packing is shared and synchronised). The gemm crate packs `rhs` (it computes the transposed
/// product, so `rhs` is its left operand) and, where `lhs` is not contiguous along `k`, `lhs` too.
/// Where only `rhs` is packed (a linear layer's weight), tasks split the columns, so each packs
/// its own slice of `rhs` once; otherwise they split the rows. Short products (decode) use the
/// GEMM's threading. The output is not zeroed first: the GEMMs write every value.
fn par_matmul(m: usize, n: usize, k: usize, lhs: View, rhs: View) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    const MIN_ROWS: usize = 32;
    // Column blocks stay whole cache lines of the output where `n` allows.
    const MIN_COLS: usize = 64;
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let dst = SharedDst(out.spare_capacity_mut().as_mut_ptr().cast());
    if threads == 1 || m < 2 * MIN_ROWS {
        // SAFETY: the capacity holds [m, n] row-major; nothing else touches it.
        unsafe { matmul_into(m, n, k, dst.at(0), n, lhs, rhs, Parallelism::Rayon(0)) };
    } else if lhs.cs == 1 && n >= 2 * MIN_COLS {
        let block = n.div_ceil(threads).next_multiple_of(16).max(MIN_COLS);
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
            let (c0, c1) = (b * block, ((b + 1) * block).min(n));
            let sub = View {
                data: &rhs.data[c0 * rhs.cs..],
                ..rhs
            };
            // SAFETY: columns c0..c1 of rows 0..m lie inside the [m, n] capacity; the column
            // blocks are disjoint.
            unsafe { matmul_into(m, c1 - c0, k, dst.at(c0), n, lhs, sub, Parallelism::None) };
        });
    } else {
        let block = m.div_ceil(threads).max(MIN_ROWS);
        (0..m.div_ceil(block)).into_par_iter().for_each(|b| {
            let (r0, r1) = (b * block, ((b + 1) * block).min(m));
            let sub = View {
                data: &lhs.data[r0 * lhs.rs..],
                ..lhs
            };
            // SAFETY: rows r0..r1 lie inside the [m, n] capacity; the row blocks are disjoint.
            unsafe {
                matmul_into(
                    r1 - r0,
                    n,
                    k,
                    dst.at(r0 * n),
                    n,
                    sub,
                    rhs,
                    Parallelism::None,
                )
            };
        });
    }
    // SAFETY: the blocks above cover every row and column, and matmul_into writes every element
    // of its destination (zeros where k = 0).
    unsafe { out.set_len(m * n) };
    out
}

/// `MemAvailable` from /proc/meminfo (Linux); `None` where it cannot be read.
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Elementwise work is split into chunks of this many values across the rayon pool: large enough
/// that small tensors stay on one thread, small enough that prefill-sized ones use every core.
const PAR_CHUNK: usize = 1 << 14;

fn same_shape(op: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    dense(op, &[a, b])?;
    if a.rows != b.rows || a.cols != b.cols {
        return Err(shape_err(
            op,
            format!("[{}, {}] vs [{}, {}]", a.rows, a.cols, b.rows, b.cols),
        ));
    }
    Ok(())
}

fn row_vector(op: &str, v: &CpuTensor, cols: usize) -> Result<()> {
    dense(op, &[v])?;
    if v.rows != 1 || v.cols != cols {
        return Err(shape_err(
            op,
            format!(
                "expected a [1, {cols}] parameter, got [{}, {}]",
                v.rows, v.cols
            ),
        ));
    }
    Ok(())
}

fn map(x: &CpuTensor, f: impl Fn(f32) -> f32 + Sync) -> CpuTensor {
    CpuTensor {
        rows: x.rows,
        cols: x.cols,
        data: x.data.iter().map(|&v| f(v)).collect(),
        half: None,
    }
}

/// A tensor of `x`'s shape whose row `r` is `f(r, x's row r, out row)`, rows on the rayon pool,
/// written straight into the new buffer (no copy of `x` to overwrite, no zeroing).
///
/// # Safety
/// `f` must write every value of the output row it is given.
unsafe fn map_rows(
    x: &CpuTensor,
    f: impl Fn(usize, &[f32], &mut [MaybeUninit<f32>]) + Sync,
) -> CpuTensor {
    let (rows, cols) = (x.rows, x.cols);
    if cols == 0 {
        return x.clone();
    }
    let mut data: Vec<f32> = Vec::with_capacity(rows * cols);
    data.spare_capacity_mut()[..rows * cols]
        .par_chunks_exact_mut(cols)
        .zip(x.data.par_chunks_exact(cols))
        .enumerate()
        .for_each(|(r, (o, src))| f(r, src, o));
    // SAFETY: every row was written by `f` (the caller's promise).
    unsafe { data.set_len(rows * cols) };
    CpuTensor {
        rows,
        cols,
        data,
        half: None,
    }
}

/// The rotary inverse frequencies exactly as transformers computes them (f32 throughout), so angles
/// at positions in the hundreds agree to the last bit rather than to ~1e-5.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0f32 / theta.powf(e)
        })
        .collect()
}

fn check_attention(
    op: &str,
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    s: AttnShape,
) -> Result<()> {
    dense(op, &[q, k, v])?;
    let (h, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
    if h == 0 || hk == 0 || h % hk != 0 || q.cols != h * d || k.cols != hk * d || v.cols != hk * d {
        return Err(shape_err(
            op,
            format!(
                "q [{}, {}], k [{}, {}], v [{}, {}] do not fit {h} heads / {hk} kv heads of {d}",
                q.rows, q.cols, k.rows, k.cols, v.rows, v.cols
            ),
        ));
    }
    if k.rows < s.kv_len || v.rows < s.kv_len || s.kv_len == 0 {
        return Err(shape_err(
            op,
            format!(
                "kv_len {} with k rows {}, v rows {}",
                s.kv_len, k.rows, v.rows
            ),
        ));
    }
    if let Some(p0) = s.causal_q_pos0 {
        if p0 + q.rows > s.kv_len {
            return Err(shape_err(
                op,
                format!(
                    "queries at {p0}..{} attend past kv_len {}",
                    p0 + q.rows,
                    s.kv_len
                ),
            ));
        }
    }
    Ok(())
}

/// Head `hi`'s block of a multi-head k or v tensor (its kv group) as a `[rows, d]` view.
fn head_view(t: &CpuTensor, s: AttnShape, hi: usize) -> View<'_> {
    let col = if t.cols == s.n_heads * s.head_dim {
        hi * s.head_dim
    } else {
        (hi / (s.n_heads / s.n_kv_heads)) * s.head_dim
    };
    View::rows(&t.data[col..], t.cols)
}

/// Attention probabilities of head `hi`, `[n_q, kv_len]`, masked entries exactly 0 — the same
/// numbers for the forward and the backward (which recomputes rather than stores them).
fn head_probs(q: &CpuTensor, k: &CpuTensor, s: AttnShape, hi: usize) -> Vec<f32> {
    head_probs_masked(q, k, s, hi, None)
}

/// [`head_probs`] with hidden keys (`keep[j] == false`) at probability exactly 0; a row whose every
/// visible key is hidden is all zeros.
fn head_probs_masked(
    q: &CpuTensor,
    k: &CpuTensor,
    s: AttnShape,
    hi: usize,
    keep: Option<&[bool]>,
) -> Vec<f32> {
    let (kv, d) = (s.kv_len, s.head_dim);
    let scale = 1.0 / (d as f32).sqrt();
    let kt = View {
        rs: 1,
        cs: k.cols,
        ..head_view(k, s, hi)
    };
    let qv = View::rows(&q.data[hi * d..], q.cols);
    let mut scores = causal_products(q.rows, s, qv, kt);
    for (i, row) in scores.chunks_exact_mut(kv).enumerate() {
        let (row, masked) = row.split_at_mut(visible_keys(s, i));
        masked.fill(0.0);
        if let Some(keep) = keep {
            // Hidden keys: −∞ scores, so exp gives exactly 0 and the sum skips them.
            for (x, &kj) in row.iter_mut().zip(keep) {
                if !kj {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        // Every visible key hidden: all zeros, no attention at all.
        cpu_gemm::softmax_scaled(row, scale);
    }
    scores
}

/// `lhs[nq, d] · rhs[d, kv]` row-major over the query blocks of `s`: each block's product covers
/// only the keys its queries see, and the rest of its rows are 0 (attention logits, or the
/// gradient of the probabilities, for one head). Not zeroed first: every value is written once.
fn causal_products(nq: usize, s: AttnShape, lhs: View, rhs: View) -> Vec<f32> {
    let (kv, d) = (s.kv_len, s.head_dim);
    if nq == 1 && lhs.cs == 1 && rhs.rs == 1 {
        // One query (a decode step): a dot per visible key, as the paged decode computes it.
        let mut out = vec![0.0f32; kv];
        let width = visible_keys(s, 0);
        let key = |j: usize| &rhs.data[j * rhs.cs..j * rhs.cs + d];
        key_dots(&lhs.data[..d], key, &mut out[..width]);
        return out;
    }
    // `rhs` is Kᵀ or Vᵀ of one head: a strided view of row-major rows. The GEMM would re-pack it
    // for every query block, one scalar at a time (more time than the block's arithmetic at
    // d = 64); a contiguous [d, kv] copy made once packs with vector copies.
    let mut dense_rhs = Vec::new();
    let rhs = if rhs.rs == 1 && rhs.cs != 1 && kv > 0 && d > 0 {
        assert!(
            rhs.data.len() >= (kv - 1) * rhs.cs + d,
            "attention: keys too small"
        );
        dense_rhs.reserve_exact(d * kv);
        for r in 0..d {
            dense_rhs.extend((0..kv).map(|c| rhs.data[c * rhs.cs + r]));
        }
        View::rows(&dense_rhs, kv)
    } else {
        rhs
    };
    let mut out: Vec<f32> = Vec::with_capacity(nq * kv);
    let dst = SharedDst(out.spare_capacity_mut().as_mut_ptr().cast());
    for (i0, rows, width) in query_blocks(nq, s) {
        let block = View {
            data: &lhs.data[i0 * lhs.rs..],
            ..lhs
        };
        // SAFETY: rows i0..i0 + rows of the [nq, kv] capacity: columns ..width by the GEMM,
        // the rest of each row by write_bytes (0.0 is all zero bits).
        unsafe {
            matmul_into(
                rows,
                width,
                d,
                dst.at(i0 * kv),
                kv,
                block,
                rhs,
                Parallelism::None,
            );
            for i in i0..i0 + rows {
                std::ptr::write_bytes(dst.at(i * kv + width), 0, kv - width);
            }
        }
    }
    // SAFETY: the query blocks cover rows 0..nq and each row was written in full above.
    unsafe { out.set_len(nq * kv) };
    out
}

/// `out[j] = q · key(j)`: a decode query's scores, one dot per key in key order. The dense and the
/// paged decode attention both score through here, so a sequence's numbers do not depend on
/// where its keys are stored.
fn key_dots<'a>(q: &[f32], key: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    cpu_gemm::key_dots_best(q, key, out);
}

/// `out = Σ_j p[j] · row(j)`, summed in key order (a decode query's output for one head).
fn weighted_rows<'a>(p: &[f32], row: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    cpu_gemm::weighted_sum_best(p, row, out);
}

/// Keys query row `i` sees: those up to its position under a causal mask, all without one.
fn visible_keys(s: AttnShape, i: usize) -> usize {
    s.causal_q_pos0
        .map_or(s.kv_len, |p0| (p0 + i + 1).min(s.kv_len))
}

/// `(start, len)` blocks of `0..n` rows: 64 under a causal mask (whose products skip what each
/// block cannot see), one block over everything without one.
fn causal_blocks(n: usize, s: AttnShape) -> impl Iterator<Item = (usize, usize)> {
    let step = if s.causal_q_pos0.is_some() {
        64
    } else {
        n.max(1)
    };
    (0..n).step_by(step).map(move |i0| (i0, step.min(n - i0)))
}

/// Query row blocks `(first row, rows, visible keys)`: under a causal mask a block of queries sees
/// only the keys up to its last row's position, so products over the masked remainder (half of a
/// prefill's attention work) are skipped. Without a mask: one block over everything.
fn query_blocks(nq: usize, s: AttnShape) -> impl Iterator<Item = (usize, usize, usize)> {
    causal_blocks(nq, s).map(move |(i0, rows)| {
        let width = s
            .causal_q_pos0
            .map_or(s.kv_len, |p0| (p0 + i0 + rows).min(s.kv_len));
        (i0, rows, width)
    })
}

/// Key row blocks `(first key, keys, first query that sees any of them)` for the products over
/// queries (`dK = dSᵀ·Q`, `dV = Pᵀ·dO`): under a causal mask query `i` sees keys up to
/// `p0 + i`, so a block starting at key `j0` starts its sum at query `j0 − p0`. Keys no query
/// sees (none, for a prompt's own keys) get a zero-length sum. Without a mask: one block.
fn key_blocks(nq: usize, s: AttnShape) -> impl Iterator<Item = (usize, usize, usize)> {
    causal_blocks(s.kv_len, s).map(move |(j0, keys)| {
        let first = s
            .causal_q_pos0
            .map_or(0, |p0| j0.saturating_sub(p0).min(nq));
        (j0, keys, first)
    })
}

/// `out[nq, d] = P[nq, kv] · V_h[kv, d]` skipping the masked (zero) part of P.
fn probs_times(p: &[f32], v: View, nq: usize, s: AttnShape, out: &mut [f32]) {
    let (kv, d) = (s.kv_len, s.head_dim);
    if nq == 1 && v.cs == 1 {
        let width = visible_keys(s, 0);
        weighted_rows(
            &p[..width],
            |j| &v.data[j * v.rs..j * v.rs + d],
            &mut out[..d],
        );
        return;
    }
    for (i0, rows, width) in query_blocks(nq, s) {
        let pv = View::rows(&p[i0 * kv..], kv);
        matmul(
            rows,
            d,
            width,
            &mut out[i0 * d..],
            d,
            pv,
            v,
            Parallelism::None,
        );
    }
}

/// The attention forward for [`Backend::attention`] and [`Backend::attention_masked`] (shapes
/// already checked): one `[nq, d]` output block per head, computed independently on the rayon pool.
fn attention_impl(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    s: AttnShape,
    keep: Option<&[bool]>,
) -> Result<CpuTensor> {
    let (nq, d) = (q.rows, s.head_dim);
    let heads: Vec<Vec<f32>> = (0..s.n_heads)
        .into_par_iter()
        .map(|hi| {
            let probs = head_probs_masked(q, k, s, hi, keep);
            let mut out = vec![0.0f32; nq * d];
            probs_times(&probs, head_view(v, s, hi), nq, s, &mut out);
            out
        })
        .collect();
    let mut out = CpuTensor::new(vec![0.0f32; nq * q.cols], nq, q.cols)?;
    for (hi, block) in heads.iter().enumerate() {
        scatter_head(&mut out, hi, d, block);
    }
    Ok(out)
}

/// Writes a head's `[rows, d]` block into columns `hi·d ..` of a multi-head tensor.
fn scatter_head(out: &mut CpuTensor, hi: usize, d: usize, block: &[f32]) {
    let w = out.cols;
    for (i, src) in block.chunks_exact(d).enumerate() {
        out.data[i * w + hi * d..i * w + (hi + 1) * d].copy_from_slice(src);
    }
}

/// cos and sin of every rotary angle for positions `0..positions`, `[pos][head_dim / 2]`.
struct RopeTable {
    head_dim: usize,
    theta: f32,
    positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(head_dim: usize, theta: f32, positions: usize) -> RopeTable {
        let inv = rope_inv_freq(head_dim, theta);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..positions {
            angles(&inv, p, &mut cos, &mut sin);
        }
        RopeTable {
            head_dim,
            theta,
            positions,
            cos,
            sin,
        }
    }
}

/// Appends cos and sin of position `p`'s angles: the f32 angle evaluated accurately and rounded
/// once, like torch.
fn angles(inv: &[f32], p: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    for &f in inv {
        let a = (f * p as f32) as f64;
        cos.push(a.cos() as f32);
        sin.push(a.sin() as f32);
    }
}

/// Positions the shared table covers at most (32 MB at head size 128); rows past it compute
/// their angles directly, so a far position costs time, never a table of its size.
const ROPE_TABLE_MAX: usize = 1 << 16;

/// The table covering positions `..end` for this head size and base. Every layer's q and k (and
/// the backward's) rotate by the same angles, so they are computed once per process and grown by
/// doubling, not per call (sin/cos were 1% of a prefill).
fn rope_table(head_dim: usize, theta: f32, end: usize) -> std::sync::Arc<RopeTable> {
    use std::sync::{Arc, Mutex};
    static TABLE: Mutex<Option<Arc<RopeTable>>> = Mutex::new(None);
    let mut held = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = held.as_ref() {
        if t.head_dim == head_dim && t.theta.to_bits() == theta.to_bits() && t.positions >= end {
            return t.clone();
        }
    }
    let grown = match held.as_ref() {
        Some(t) if t.head_dim == head_dim && t.theta.to_bits() == theta.to_bits() => {
            end.max(2 * t.positions).min(ROPE_TABLE_MAX.max(end))
        }
        _ => end.max(64),
    };
    let t = Arc::new(RopeTable::new(head_dim, theta, grown));
    *held = Some(t.clone());
    t
}

/// Where the rows of a rotation sit: consecutive from a first position, or each its own.
#[derive(Clone, Copy)]
enum Positions<'a> {
    From(usize),
    Each(&'a [u32]),
}

impl Positions<'_> {
    fn at(self, row: usize) -> usize {
        match self {
            Positions::From(p0) => p0 + row,
            Positions::Each(ps) => ps[row] as usize,
        }
    }
}

/// RoPE rotation (`sign` = 1) or its inverse (`sign` = −1, the backward) on every head of every row.
fn rotate(
    op: &str,
    x: &CpuTensor,
    head_dim: usize,
    pos: Positions<'_>,
    theta: f32,
    sign: f32,
) -> Result<CpuTensor> {
    dense(op, &[x])?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !x.cols.is_multiple_of(head_dim) {
        return Err(shape_err(
            op,
            format!(
                "{} columns do not split into heads of even size {head_dim}",
                x.cols
            ),
        ));
    }
    let half = head_dim / 2;
    let end = match pos {
        Positions::From(p0) => p0
            .checked_add(x.rows)
            .ok_or_else(|| shape_err(op, format!("positions from {p0} overflow")))?,
        Positions::Each(ps) => {
            if ps.len() != x.rows {
                return Err(shape_err(
                    op,
                    format!("{} positions for {} rows", ps.len(), x.rows),
                ));
            }
            ps.iter().max().map_or(0, |&p| p as usize + 1)
        }
    };
    let table = (end <= ROPE_TABLE_MAX).then(|| rope_table(head_dim, theta, end));
    let inv = match table {
        Some(_) => Vec::new(),
        None => rope_inv_freq(head_dim, theta),
    };
    // SAFETY: each head's two halves are written in full.
    let out = unsafe {
        map_rows(x, |r, src, row| {
            let (mut c, mut s) = (Vec::new(), Vec::new());
            let (cos, sin) = match &table {
                Some(t) => {
                    let at = pos.at(r) * half;
                    (&t.cos[at..at + half], &t.sin[at..at + half])
                }
                None => {
                    angles(&inv, pos.at(r), &mut c, &mut s);
                    (&c[..], &s[..])
                }
            };
            for (head, x) in row
                .chunks_exact_mut(head_dim)
                .zip(src.chunks_exact(head_dim))
            {
                for i in 0..half {
                    let (a, b, s) = (x[i], x[i + half], sign * sin[i]);
                    head[i].write(a * cos[i] - b * s);
                    head[i + half].write(b * cos[i] + a * s);
                }
            }
        })
    };
    Ok(out)
}

impl Backend for Cpu {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        let weights = match self.weights {
            CpuWeights::F32 => "f32",
            CpuWeights::Stored => "f32, weights as stored",
            CpuWeights::Half(HalfKind::F16) => "f32, f16 weights",
            CpuWeights::Half(HalfKind::Bf16) => "f32, bf16 weights",
        };
        format!("cpu ({weights}, {} threads)", rayon::current_num_threads())
    }

    fn check_weight_memory(&self, weights: &[StoredTensor]) -> Result<()> {
        // Mapped weights are file pages: the kernel pages them in and out, so only the copies
        // count against the memory available; the mapped ones only decide whether running will
        // keep re-reading the disk.
        let (mut copies, mut mapped) = (0u64, 0u64);
        for w in weights {
            let n = (w.rows * w.cols) as u64;
            match self.held(w.dtype, w.rows) {
                Held::Mapped(_) => mapped += 2 * n,
                Held::HalfCopy(_) => copies += 2 * n,
                Held::F32 => copies += 4 * n,
            }
        }
        let Some(avail) = available_memory_bytes() else {
            return Ok(());
        };
        let gb = |b: u64| b as f64 / 1e9;
        if copies > avail {
            let what = match self.weights {
                CpuWeights::F32 => "at f32",
                _ => "in converted copies",
            };
            // A checkpoint that could stay mapped: say so.
            let could_map: u64 = weights
                .iter()
                .filter(|w| w.rows > 1 && HalfKind::of(w.dtype).is_some())
                .map(|w| (w.rows * w.cols) as u64 * 2)
                .sum();
            let hint = if self.weights == CpuWeights::F32 && could_map > 0 {
                format!(
                    "; without --dtype f32 its half-precision weights ({:.1} GB) stay memory-mapped as stored",
                    gb(could_map)
                )
            } else {
                String::new()
            };
            return Err(Error::OutOfMemory(format!(
                "the model's weights need {:.1} GB {what} on the CPU backend but only {:.1} GB of memory is available{hint}",
                gb(copies),
                gb(avail)
            )));
        }
        if copies + mapped > avail {
            tracing::warn!(
                mapped_gb = gb(mapped),
                copies_gb = gb(copies),
                available_gb = gb(avail),
                "the memory-mapped weights do not fit in the memory available: they will be re-read from disk as they are used (slow)"
            );
        }
        Ok(())
    }

    fn dims(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn tensor_bytes(&self, t: &CpuTensor) -> usize {
        let width = if t.half.is_some() { 2 } else { 4 };
        t.rows * t.cols * width
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        CpuTensor::new(data.to_vec(), rows, cols)
    }

    fn load_weight(&self, t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<CpuTensor> {
        check_weight_view(t, rows, cols)?;
        match self.held(t.dtype, rows) {
            Held::F32 => CpuTensor::new(t.to_f32(), rows, cols),
            Held::Mapped(kind) | Held::HalfCopy(kind) => Ok(CpuTensor {
                rows,
                cols,
                data: Vec::new(),
                half: Some(HalfWeight::from_tensor(t, kind)),
            }),
        }
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(match &t.half {
            Some(h) => h.to_f32(0..h.len()),
            None => t.data.clone(),
        })
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
            half: None,
        })
    }

    fn linear(&self, x: &CpuTensor, w: &CpuTensor, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
        if x.cols != w.cols {
            return Err(shape_err(
                "linear",
                format!(
                    "x [{}, {}] · wᵀ with w [{}, {}]",
                    x.rows, x.cols, w.rows, w.cols
                ),
            ));
        }
        dense("linear input", &[x])?;
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if let Some(b) = bias {
            row_vector("linear bias", b, n)?;
        }
        let mut out = if let Some(h) = &w.half {
            cpu_half::linear(&x.data, m, k, h, n)
        } else if m <= cpu_gemm::GEMV_ROWS {
            cpu_gemm::linear_rows(&x.data, m, k, &w.data, n)
        } else {
            par_matmul(
                m,
                n,
                k,
                View::rows(&x.data, k),
                // wᵀ as a [k, n] view of the row-major [n, k] weight.
                View::cols(&w.data, k),
            )
        };
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(n) {
                for (o, bv) in row.iter_mut().zip(&b.data) {
                    *o += bv;
                }
            }
        }
        CpuTensor::new(out, m, n)
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        if b.rows == 1 && a.rows != 1 {
            row_vector("add (broadcast)", b, a.cols)?;
            let mut out = a.clone();
            for row in out.data.chunks_exact_mut(a.cols) {
                for (o, bv) in row.iter_mut().zip(&b.data) {
                    *o += bv;
                }
            }
            return Ok(out);
        }
        same_shape("add", a, b)?;
        dense("add", &[a, b])?;
        let data = a
            .data
            .par_iter()
            .zip(&b.data)
            .with_min_len(PAR_CHUNK)
            .map(|(x, y)| x + y)
            .collect();
        CpuTensor::new(data, a.rows, a.cols)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        row_vector("rms_norm weight", w, x.cols)?;
        dense("rms_norm", &[x])?;
        // SAFETY: every value of the row is written (w has x.cols values, checked above).
        let out = unsafe {
            map_rows(x, |_, src, row| {
                let ms = src.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.cols as f64;
                // transformers: hidden * rsqrt(variance + eps) in f32, then weight * hidden.
                let inv = 1.0f32 / ((ms as f32) + eps).sqrt();
                for ((o, &v), wv) in row.iter_mut().zip(src).zip(&w.data) {
                    o.write(wv * (v * inv));
                }
            })
        };
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        row_vector("layer_norm weight", w, x.cols)?;
        row_vector("layer_norm bias", b, x.cols)?;
        let mut out = x.clone();
        let n = x.cols as f64;
        for row in out.data.chunks_exact_mut(x.cols) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for ((o, wv), bv) in row.iter_mut().zip(&w.data).zip(&b.data) {
                *o = (((*o as f64 - mean) * inv) as f32) * wv + bv;
            }
        }
        Ok(out)
    }

    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        dense("gelu", &[x])?;
        Ok(map(x, |v| {
            let v = v as f64;
            (0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))) as f32
        }))
    }

    fn quick_gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        dense("quick_gelu", &[x])?;
        let data = cpu_gemm::gate(cpu_gemm::Gate::QuickGelu, &x.data, &[]);
        CpuTensor::new(data, x.rows, x.cols)
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        same_shape("silu_mul", gate, up)?;
        dense("silu_mul", &[gate, up])?;
        let data = cpu_gemm::gate(cpu_gemm::Gate::SiluMul, &gate.data, &up.data);
        CpuTensor::new(data, gate.rows, gate.cols)
    }

    fn rope(&self, x: &CpuTensor, head_dim: usize, pos0: usize, theta: f32) -> Result<CpuTensor> {
        rotate("rope", x, head_dim, Positions::From(pos0), theta, 1.0)
    }

    fn rope_qk(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        head_dim: usize,
        positions: &[u32],
        theta: f32,
    ) -> Result<(CpuTensor, CpuTensor)> {
        let pos = Positions::Each(positions);
        Ok((
            rotate("rope", q, head_dim, pos, theta, 1.0)?,
            rotate("rope", k, head_dim, pos, theta, 1.0)?,
        ))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        s: AttnShape,
    ) -> Result<CpuTensor> {
        check_attention("attention", q, k, v, s)?;
        attention_impl(q, k, v, s, None)
    }

    fn attention_masked(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        s: AttnShape,
        key_keep: &[bool],
    ) -> Result<CpuTensor> {
        check_attention("attention_masked", q, k, v, s)?;
        if key_keep.len() < s.kv_len {
            return Err(shape_err(
                "attention_masked",
                format!(
                    "key_keep has {} entries for kv_len {}",
                    key_keep.len(),
                    s.kv_len
                ),
            ));
        }
        attention_impl(q, k, v, s, Some(&key_keep[..s.kv_len]))
    }

    fn embedding(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        let mut data = Vec::with_capacity(ids.len() * table.cols);
        for &id in ids {
            if id as usize >= table.rows {
                return Err(shape_err(
                    "embedding",
                    format!("token id {id} is outside the table of {} rows", table.rows),
                ));
            }
            let r = id as usize * table.cols;
            match &table.half {
                Some(h) => data.extend(h.to_f32(r..r + table.cols)),
                None => data.extend_from_slice(table.row(id as usize)),
            }
        }
        CpuTensor::new(data, ids.len(), table.cols)
    }

    fn slice_rows(&self, x: &CpuTensor, start: usize, n: usize) -> Result<CpuTensor> {
        if start + n > x.rows {
            return Err(shape_err(
                "slice_rows",
                format!("rows {start}..{} of a {}-row tensor", start + n, x.rows),
            ));
        }
        let range = start * x.cols..(start + n) * x.cols;
        let data = match &x.half {
            Some(h) => h.to_f32(range),
            None => x.data[range].to_vec(),
        };
        CpuTensor::new(data, n, x.cols)
    }

    fn copy_rows_into(&self, dst: &mut CpuTensor, dst_row: usize, src: &CpuTensor) -> Result<()> {
        dense("copy_rows_into", &[dst, src])?;
        if src.cols != dst.cols || dst_row + src.rows > dst.rows {
            return Err(shape_err(
                "copy_rows_into",
                format!(
                    "[{}, {}] at row {dst_row} of [{}, {}]",
                    src.rows, src.cols, dst.rows, dst.cols
                ),
            ));
        }
        dst.data[dst_row * dst.cols..(dst_row + src.rows) * dst.cols].copy_from_slice(&src.data);
        Ok(())
    }

    fn scatter_rows(&self, dst: &mut CpuTensor, rows: &[u32], src: &CpuTensor) -> Result<()> {
        dense("scatter_rows", &[dst, src])?;
        if src.cols != dst.cols || src.rows != rows.len() {
            return Err(shape_err(
                "scatter_rows",
                format!(
                    "[{}, {}] to {} rows of [{}, {}]",
                    src.rows,
                    src.cols,
                    rows.len(),
                    dst.rows,
                    dst.cols
                ),
            ));
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= dst.rows) {
            return Err(shape_err(
                "scatter_rows",
                format!("row {r} outside [{}, {}]", dst.rows, dst.cols),
            ));
        }
        let c = dst.cols;
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            dst.data[r * c..(r + 1) * c].copy_from_slice(src.row(i));
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        rows: &[PagedRow<'_>],
        page: usize,
        shape: AttnShape,
    ) -> Result<CpuTensor> {
        super::check_paged(q.rows, rows, page, k.rows.min(v.rows))?;
        dense("paged_attention", &[q, k, v])?;
        let (h, hk, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        if h == 0
            || hk == 0
            || h % hk != 0
            || q.cols != h * d
            || k.cols != hk * d
            || v.cols != k.cols
        {
            return Err(shape_err(
                "paged_attention",
                format!(
                    "q [{}, {}], pools [{}, {}] and [{}, {}] do not fit {h} heads / {hk} kv heads \
                     of {d}",
                    q.rows, q.cols, k.rows, k.cols, v.rows, v.cols
                ),
            ));
        }
        let scale = 1.0 / (d as f32).sqrt();
        let w = k.cols;
        // Every (row, head) on its own, straight from the pages: scores, softmax, weighted values
        // — the dense decode's arithmetic (`key_dots`, `weighted_rows`), so a row's numbers are the
        // same alone, in any batch, and with its keys gathered.
        let blocks: Vec<Vec<f32>> = (0..rows.len() * h)
            .into_par_iter()
            .map(|t| {
                let (i, hi) = (t / h, t % h);
                let r = &rows[i];
                let col = (hi / (h / hk)) * d;
                let at = |j: usize| super::page_slot(r.pages, page, j) * w + col;
                let mut p = vec![0.0f32; r.len];
                let qh = &q.data[i * q.cols + hi * d..i * q.cols + (hi + 1) * d];
                key_dots(qh, |j| &k.data[at(j)..at(j) + d], &mut p);
                cpu_gemm::softmax_scaled(&mut p, scale);
                let mut o = vec![0.0f32; d];
                weighted_rows(&p, |j| &v.data[at(j)..at(j) + d], &mut o);
                o
            })
            .collect();
        let mut out = CpuTensor::new(vec![0.0; q.rows * q.cols], q.rows, q.cols)?;
        for (t, o) in blocks.iter().enumerate() {
            let (i, hi) = (t / h, t % h);
            out.data[i * q.cols + hi * d..i * q.cols + (hi + 1) * d].copy_from_slice(o);
        }
        Ok(out)
    }

    fn fastrm_scores(
        &self,
        x: &CpuTensor,
        ln_w: &CpuTensor,
        ln_b: &CpuTensor,
        eps: f32,
        folded: &CpuTensor,
        c: &CpuTensor,
        scale: f32,
    ) -> Result<CpuTensor> {
        if folded.cols != x.cols {
            return Err(shape_err(
                "fastrm_scores",
                format!(
                    "folded keys [{}, {}] for hidden size {}",
                    folded.rows, folded.cols, x.cols
                ),
            ));
        }
        row_vector("fastrm_scores bias", c, folded.rows)?;
        dense("fastrm_scores", &[x, folded])?;
        let u = self.layer_norm(x, ln_w, ln_b, eps)?;
        let mut z = self.linear(&u, folded, Some(c))?;
        z.data
            .iter_mut()
            .for_each(|v| *v = 1.0 / (1.0 + (-scale * *v).exp()));
        Ok(z)
    }

    fn argmax_rows(&self, x: &CpuTensor) -> Result<Vec<u32>> {
        dense("argmax_rows", &[x])?;
        if x.cols == 0 {
            return Err(shape_err("argmax_rows", "tensor has no columns"));
        }
        Ok(x.data
            .chunks_exact(x.cols)
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    // NaN never wins; strict > keeps the first maximum like torch.argmax.
                    if v > row[best] || row[best].is_nan() && !v.is_nan() {
                        best = i;
                    }
                }
                best as u32
            })
            .collect())
    }

    fn matmul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        dense("matmul", &[a, b])?;
        if a.cols != b.rows {
            return Err(shape_err(
                "matmul",
                format!("[{}, {}] · [{}, {}]", a.rows, a.cols, b.rows, b.cols),
            ));
        }
        let out = par_matmul(
            a.rows,
            b.cols,
            a.cols,
            View::rows(&a.data, a.cols),
            View::rows(&b.data, b.cols),
        );
        CpuTensor::new(out, a.rows, b.cols)
    }

    fn linear_bwd(&self, dy: &CpuTensor, w: &CpuTensor) -> Result<CpuTensor> {
        if dy.cols != w.rows {
            return Err(shape_err(
                "linear_bwd",
                format!("dy [{}, {}] · w [{}, {}]", dy.rows, dy.cols, w.rows, w.cols),
            ));
        }
        if let Some(h) = &w.half {
            dense("linear_bwd dy", &[dy])?;
            let dx = cpu_half::linear_bwd(&dy.data, dy.rows, dy.cols, h, w.cols);
            return CpuTensor::new(dx, dy.rows, w.cols);
        }
        self.matmul(dy, w)
    }

    fn rms_norm_bwd(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        dy: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        row_vector("rms_norm_bwd weight", w, x.cols)?;
        same_shape("rms_norm_bwd", x, dy)?;
        let n = x.cols as f64;
        let mut out = vec![0.0f32; x.data.len()];
        out.par_chunks_exact_mut(x.cols)
            .zip(x.data.par_chunks_exact(x.cols))
            .zip(dy.data.par_chunks_exact(x.cols))
            .for_each(|((o, xr), gr)| {
                // y_j = w_j x_j r, r = (mean x² + eps)^-½  ⇒
                // dx_j = r w_j dy_j − x_j r³/n Σ_i dy_i w_i x_i
                let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
                let r = 1.0 / (ms + eps as f64).sqrt();
                let dot: f64 = (0..x.cols)
                    .map(|i| gr[i] as f64 * w.data[i] as f64 * xr[i] as f64)
                    .sum();
                let c = r * r * r * dot / n;
                for i in 0..x.cols {
                    o[i] = (r * w.data[i] as f64 * gr[i] as f64 - xr[i] as f64 * c) as f32;
                }
            });
        CpuTensor::new(out, x.rows, x.cols)
    }

    fn silu_mul_bwd(
        &self,
        gate: &CpuTensor,
        up: &CpuTensor,
        dy: &CpuTensor,
    ) -> Result<(CpuTensor, CpuTensor)> {
        same_shape("silu_mul_bwd", gate, up)?;
        same_shape("silu_mul_bwd", gate, dy)?;
        dense("silu_mul_bwd", &[gate, up, dy])?;
        let (dg, du) = cpu_gemm::silu_mul_bwd(&gate.data, &up.data, &dy.data);
        Ok((
            CpuTensor::new(dg, gate.rows, gate.cols)?,
            CpuTensor::new(du, gate.rows, gate.cols)?,
        ))
    }

    fn rope_bwd(
        &self,
        dy: &CpuTensor,
        head_dim: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CpuTensor> {
        rotate("rope_bwd", dy, head_dim, Positions::From(pos0), theta, -1.0)
    }

    fn attention_bwd(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        dout: &CpuTensor,
        s: AttnShape,
        cam: Option<Cam>,
    ) -> Result<AttnGrads<CpuTensor>> {
        check_attention("attention_bwd", q, k, v, s)?;
        same_shape("attention_bwd dout", q, dout)?;
        let (nq, kv, d) = (q.rows, s.kv_len, s.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        struct Head {
            dq: Vec<f32>,
            dk: Vec<f32>,
            dv: Vec<f32>,
            cam: Vec<f32>,
        }
        let heads: Vec<Head> = (0..s.n_heads)
            .into_par_iter()
            .map(|hi| {
                let p = head_probs(q, k, s, hi);
                let dov = head_view(dout, s, hi);
                // dP = dO · Vᵀ  (= ∂s/∂A for this head)
                let vt = View {
                    rs: 1,
                    cs: v.cols,
                    ..head_view(v, s, hi)
                };
                let dp = causal_products(nq, s, dov, vt);
                // Row i sees keys ..visible_keys(s, i); P and dS are exactly 0 past it, so the
                // element-wise work stops there and the block products skip what is all zeros.
                let mut cam_h = Vec::new();
                if let Some(kind) = cam {
                    cam_h.reserve_exact(nq * kv);
                    for (i, (a, g)) in p.chunks_exact(kv).zip(dp.chunks_exact(kv)).enumerate() {
                        let w = visible_keys(s, i);
                        cam_h.extend(a[..w].iter().zip(&g[..w]).map(|(&a, &g)| match kind {
                            Cam::Chefer => (a * g).max(0.0),
                            Cam::GradCam => a * g.max(0.0),
                        }));
                        cam_h.extend(std::iter::repeat_n(0.0, kv - w));
                    }
                }
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), scaled into the logits' units. Past a row's
                // visible keys dP holds products with masked keys; dS is 0 there.
                let mut ds = dp;
                for (i, (drow, prow)) in ds.chunks_exact_mut(kv).zip(p.chunks_exact(kv)).enumerate()
                {
                    let w = visible_keys(s, i);
                    let (drow, masked) = drow.split_at_mut(w);
                    masked.fill(0.0);
                    let dot = cpu_gemm::dot_best(drow, &prow[..w]);
                    for (x, &pp) in drow.iter_mut().zip(&prow[..w]) {
                        *x = pp * (*x - dot) * scale;
                    }
                }
                let mut dq = vec![0.0f32; nq * d];
                probs_times(&ds, head_view(k, s, hi), nq, s, &mut dq);
                // dK = dSᵀ · Q and dV = Pᵀ · dO over key blocks: a key is seen only by the
                // queries at or after it, so each block's product starts at its first such query.
                let mut dk = vec![0.0f32; kv * d];
                let mut dv = vec![0.0f32; kv * d];
                for (j0, keys, first) in key_blocks(nq, s) {
                    if first == nq {
                        continue; // seen by no query: its gradients stay 0
                    }
                    let n_q = nq - first;
                    let qv = View::rows(&q.data[first * q.cols + hi * d..], q.cols);
                    let dob = View {
                        data: &dov.data[first * dov.rs..],
                        ..dov
                    };
                    for (dst, probs, rhs) in [(&mut dk, &ds, qv), (&mut dv, &p, dob)] {
                        let lhs = View::cols(&probs[first * kv + j0..], kv);
                        matmul(
                            keys,
                            d,
                            n_q,
                            &mut dst[j0 * d..],
                            d,
                            lhs,
                            rhs,
                            Parallelism::None,
                        );
                    }
                }
                Head {
                    dq,
                    dk,
                    dv,
                    cam: cam_h,
                }
            })
            .collect();
        let kvw = s.n_kv_heads * d;
        let mut dq = CpuTensor::new(vec![0.0; nq * q.cols], nq, q.cols)?;
        let mut dk = CpuTensor::new(vec![0.0; kv * kvw], kv, kvw)?;
        let mut dv = CpuTensor::new(vec![0.0; kv * kvw], kv, kvw)?;
        let group = s.n_heads / s.n_kv_heads;
        let mut cam_sum = cam.map(|_| vec![0.0f32; nq * kv]);
        for (hi, h) in heads.iter().enumerate() {
            scatter_head(&mut dq, hi, d, &h.dq);
            let kvh = hi / group;
            for j in 0..kv {
                let dst = j * kvw + kvh * d;
                for t in 0..d {
                    dk.data[dst + t] += h.dk[j * d + t];
                    dv.data[dst + t] += h.dv[j * d + t];
                }
            }
            if let Some(c) = cam_sum.as_mut() {
                c.iter_mut().zip(&h.cam).for_each(|(a, b)| *a += b);
            }
        }
        let cam = match cam_sum {
            Some(mut c) => {
                let inv = 1.0 / s.n_heads as f32;
                c.iter_mut().for_each(|x| *x *= inv);
                Some(CpuTensor::new(c, nq, kv)?)
            }
            None => None,
        };
        Ok(AttnGrads { dq, dk, dv, cam })
    }

    fn layer_norm_bwd(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        dy: &CpuTensor,
        eps: f32,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        row_vector("layer_norm_bwd weight", w, x.cols)?;
        same_shape("layer_norm_bwd", x, dy)?;
        let c = x.cols;
        let n = c as f64;
        let mut dx = vec![0.0f32; x.data.len()];
        // Per row: x̂ = (x − μ) r, r = (var + eps)^-½, y = w x̂ + b  ⇒
        // dx = r (g − mean(g) − x̂ mean(g x̂)) with g = w ⊙ dy; dw = Σ dy x̂; db = Σ dy.
        let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_exact_mut(c.max(1))
            .zip(x.data.par_chunks_exact(c.max(1)))
            .zip(dy.data.par_chunks_exact(c.max(1)))
            .map(|((o, xr), gr)| {
                let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let r = 1.0 / (var + eps as f64).sqrt();
                let xh: Vec<f64> = xr.iter().map(|&v| (v as f64 - mean) * r).collect();
                let g: Vec<f64> = (0..c).map(|i| w.data[i] as f64 * gr[i] as f64).collect();
                let gm = g.iter().sum::<f64>() / n;
                let gx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n;
                for i in 0..c {
                    o[i] = (r * (g[i] - gm - xh[i] * gx)) as f32;
                }
                let dw: Vec<f64> = (0..c).map(|i| gr[i] as f64 * xh[i]).collect();
                let db: Vec<f64> = gr.iter().map(|&v| v as f64).collect();
                (dw, db)
            })
            .collect();
        // Summed in row order so the result does not depend on the thread count.
        let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
        for (pw, pb) in &partial {
            for i in 0..c {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        let f = |v: Vec<f64>| CpuTensor::new(v.into_iter().map(|x| x as f32).collect(), 1, c);
        Ok((CpuTensor::new(dx, x.rows, c)?, f(dw)?, f(db)?))
    }

    fn linear_wgrad(&self, dy: &CpuTensor, x: &CpuTensor) -> Result<CpuTensor> {
        dense("linear_wgrad", &[dy, x])?;
        if dy.rows != x.rows {
            return Err(shape_err(
                "linear_wgrad",
                format!(
                    "dy [{}, {}]ᵀ · x [{}, {}]",
                    dy.rows, dy.cols, x.rows, x.cols
                ),
            ));
        }
        let (m, n, k) = (dy.rows, dy.cols, x.cols);
        let out = par_matmul(
            n,
            k,
            m,
            // dyᵀ as an [n, m] view of the row-major [m, n] gradient.
            View::cols(&dy.data, n),
            View::rows(&x.data, k),
        );
        CpuTensor::new(out, n, k)
    }

    fn sum_rows(&self, x: &CpuTensor) -> Result<CpuTensor> {
        dense("sum_rows", &[x])?;
        let mut acc = vec![0.0f64; x.cols];
        for row in x.data.chunks_exact(x.cols.max(1)) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        CpuTensor::new(acc.into_iter().map(|v| v as f32).collect(), 1, x.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows past the shared table's reach compute the same angles directly; a far position
    /// allocates nothing of its size, and an overflowing one is an error.
    #[test]
    fn rope_past_the_table_matches_it_and_stays_small() {
        // Two equal rows, so one position's rotation can be compared across calls.
        let x =
            CpuTensor::new((0..16).map(|i| (i % 8) as f32 * 0.2 - 0.7).collect(), 2, 8).unwrap();
        let row0 = |t: CpuTensor| t.data[..8].to_vec();
        let inside = rotate("rope", &x, 8, Positions::From(ROPE_TABLE_MAX - 2), 1e4, 1.0).unwrap();
        let across = rotate("rope", &x, 8, Positions::From(ROPE_TABLE_MAX - 1), 1e4, 1.0).unwrap();
        // Row 1 of `inside` and row 0 of `across` are both at ROPE_TABLE_MAX − 1: from the table
        // and computed directly.
        assert_eq!(inside.data[8..].to_vec(), row0(across));
        let far = rotate("rope", &x, 8, Positions::From(1 << 40), 1e4, 1.0).unwrap();
        assert!(far.data.iter().all(|v| v.is_finite()));
        assert!(rotate("rope", &x, 8, Positions::From(usize::MAX - 1), 1e4, 1.0).is_err());
    }
}
