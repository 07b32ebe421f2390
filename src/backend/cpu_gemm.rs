//! f32 kernels of the CPU backend beside the `gemm` crate's GEMM: the product of a few activation
//! rows with a row-major weight (`x · wᵀ`, a decode step's linear layers), which is bound by
//! reading the weight once from memory. Each output is a dot product of an activation row with a
//! contiguous weight row; the weight rows are split across the rayon pool. And the attention's
//! softmax, whose `exp` is a third of a prefill's attention time when it is called per value, and
//! the MLP gates (SiLU·up, quick_gelu, the SiLU backward) with the same vector `exp`.
//!
//! The dots use AVX-512F where the CPU has it, AVX2 + FMA otherwise, and portable code (which the
//! compiler vectorises for its baseline) on other CPUs; the choice is made at run time.

use std::sync::OnceLock;

use rayon::prelude::*;

/// Up to this many activation rows take the dot-product path: each weight row is read from memory
/// once and dotted with every activation row while it is in the L1 cache, each output by the same
/// dot whatever the other rows (the batch invariance of [`crate::backend::INVARIANT_ROWS`]).
/// Taller products are GEMMs (the `gemm` crate), which reuse the weight from registers.
pub(crate) const GEMV_ROWS: usize = crate::backend::INVARIANT_ROWS;

/// Weight values per rayon task: large enough that scheduling is noise next to streaming them,
/// small enough that a decode step's small projections still spread over every core.
const TASK_VALUES: usize = 1 << 15;

/// The instruction sets the dot kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best one this CPU runs (detected once).
    pub(crate) fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub(crate) fn runs_here(self) -> bool {
        match (self, Isa::best()) {
            (Isa::Portable, _) => true,
            (Isa::Avx2, Isa::Avx512 | Isa::Avx2) => true,
            (a, b) => a == b,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "AVX-512F",
            Isa::Avx2 => "AVX2+FMA",
            Isa::Portable => "portable",
        }
    }
}

/// `out[m, n] = x[m, k] · wᵀ` for a row-major f32 weight `w` `[n, k]`, with the best kernel.
pub(crate) fn linear_rows(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    linear_rows_with(Isa::best(), x, m, k, w, n)
}

/// [`linear_rows`] with the kernel for `isa`, which must run on this CPU (the tests force each).
pub(crate) fn linear_rows_with(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
) -> Vec<f32> {
    assert!(
        isa.runs_here(),
        "linear_rows: {} is not available",
        isa.name()
    );
    assert_eq!(x.len(), m * k, "linear_rows: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "linear_rows: w is not [{n}, {k}]");
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    // Output transposed, [n, m]: a task owns a contiguous run of weight rows and their outputs.
    let mut out_t = vec![0.0f32; n * m];
    let rows_per_task = (TASK_VALUES / k.max(1)).max(1);
    out_t
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(t, chunk)| {
            let r0 = t * rows_per_task;
            for (j, o) in chunk.chunks_exact_mut(m).enumerate() {
                let wr = &w[(r0 + j) * k..(r0 + j + 1) * k];
                dots(isa, x, k, wr, o);
            }
        });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0.0f32; m * n];
    for (j, o) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in o.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// A row of attention logits in place: `x ← softmax(scale · x)`. Entries at −∞ (hidden keys)
/// come out exactly 0; a row with no finite entry comes out all zeros.
pub(crate) fn softmax_scaled(row: &mut [f32], scale: f32) {
    softmax_scaled_with(Isa::best(), row, scale)
}

/// [`softmax_scaled`] with the kernel for `isa`, which must run on this CPU. Only AVX-512 has a
/// vector kernel (its `exp` is within 2 ulp of the libm one); the others call libm per value.
pub(crate) fn softmax_scaled_with(isa: Isa, row: &mut [f32], scale: f32) {
    assert!(isa.runs_here(), "softmax: {} is not available", isa.name());
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F (asserted above); the kernel stays inside `row`.
        unsafe { x86::softmax_avx512(row, scale) };
        return;
    }
    let mut mx = f32::NEG_INFINITY;
    for x in row.iter_mut() {
        *x *= scale;
        mx = mx.max(*x);
    }
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = (*x - mx).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Values per rayon task of the element-wise gates below.
const GATE_CHUNK: usize = 1 << 14;

/// The element-wise gates of the MLPs, each defined once by its scalar formula and, where the CPU
/// has AVX-512F, computed by a vector kernel with the same operations in the same order and the
/// vector `exp` (within 2 ulp of libm's). A prefill spends 4% of its time in `expf` otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// SwiGLU's product `g / (1 + e^−g) · u`.
    SiluMul,
    /// CLIP's `x · 1 / (1 + e^(−1.702 x))` (the second operand is unused).
    QuickGelu,
}

impl Gate {
    fn scalar(self, a: f32, b: f32) -> f32 {
        match self {
            Gate::SiluMul => a / (1.0 + (-a).exp()) * b,
            Gate::QuickGelu => a * (1.0 / (1.0 + (-1.702 * a).exp())),
        }
    }
}

/// `gate` applied to `a` (and `b`, same length, for [`Gate::SiluMul`]) with the best kernel.
pub(crate) fn gate(g: Gate, a: &[f32], b: &[f32]) -> Vec<f32> {
    gate_with(Isa::best(), g, a, b)
}

/// [`gate`] with the kernel for `isa`, which must run on this CPU.
pub(crate) fn gate_with(isa: Isa, g: Gate, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(isa.runs_here(), "gate: {} is not available", isa.name());
    let b = match g {
        Gate::SiluMul => {
            assert_eq!(a.len(), b.len(), "silu_mul: operands of different lengths");
            b
        }
        Gate::QuickGelu => a,
    };
    let mut out: Vec<f32> = Vec::with_capacity(a.len());
    out.spare_capacity_mut()[..a.len()]
        .par_chunks_mut(GATE_CHUNK)
        .zip(a.par_chunks(GATE_CHUNK).zip(b.par_chunks(GATE_CHUNK)))
        .for_each(|(o, (a, b))| {
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                // SAFETY: the CPU has AVX-512F (asserted above); `o`, `a`, `b` have one length.
                unsafe { x86::gate_avx512(g, a, b, o) };
                return;
            }
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                o.write(g.scalar(x, y));
            }
        });
    // SAFETY: the chunks cover all `a.len()` values and every kernel writes each of its chunk's.
    unsafe { out.set_len(a.len()) };
    out
}

/// The gradients of `silu(g) · u` given the output's `dy`: `(dg, du)` with σ = 1 / (1 + e^−g),
/// `du = dy · g · σ` and `dg = dy · u · σ · (1 + g (1 − σ))`, vectorised like [`gate`].
pub(crate) fn silu_mul_bwd(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    silu_mul_bwd_with(Isa::best(), g, u, dy)
}

/// [`silu_mul_bwd`] with the kernel for `isa`, which must run on this CPU.
pub(crate) fn silu_mul_bwd_with(
    isa: Isa,
    g: &[f32],
    u: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        isa.runs_here(),
        "silu_mul_bwd: {} is not available",
        isa.name()
    );
    assert!(
        g.len() == u.len() && g.len() == dy.len(),
        "silu_mul_bwd: operands of different lengths"
    );
    let n = g.len();
    let (mut dg, mut du): (Vec<f32>, Vec<f32>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    dg.spare_capacity_mut()[..n]
        .par_chunks_mut(GATE_CHUNK)
        .zip(du.spare_capacity_mut()[..n].par_chunks_mut(GATE_CHUNK))
        .zip(g.par_chunks(GATE_CHUNK))
        .zip(u.par_chunks(GATE_CHUNK).zip(dy.par_chunks(GATE_CHUNK)))
        .for_each(|(((dg, du), g), (u, dy))| {
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                // SAFETY: the CPU has AVX-512F (asserted above); the five slices have one length.
                unsafe { x86::silu_mul_bwd_avx512(g, u, dy, dg, du) };
                return;
            }
            for i in 0..g.len() {
                let (g, u, d) = (g[i], u[i], dy[i]);
                let sig = 1.0 / (1.0 + (-g).exp());
                du[i].write(d * g * sig);
                dg[i].write(d * u * sig * (1.0 + g * (1.0 - sig)));
            }
        });
    // SAFETY: the chunks cover all `n` values and every kernel writes each of its chunk's.
    unsafe {
        dg.set_len(n);
        du.set_len(n);
    }
    (dg, du)
}

/// `out[i] = x_i · w` for the `out.len()` rows of `x` (each `k` long): exactly [`dot`] per row,
/// several rows per pass over `w` where the CPU has AVX2 or AVX-512F (each weight vector loaded
/// once for the block: four rows with AVX-512's 32 registers, three with AVX2's 16), so a row's
/// result never depends on the rows beside it.
fn dots(isa: Isa, x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY (both arms): `isa.runs_here()` was asserted by the caller; the rows and `w` are
        // each `k` long (`chunks_exact` of k, and the weight row).
        Isa::Avx512 => {
            return row_blocks(x, k, out, |q: [&[f32]; 4]| unsafe {
                x86::dots_avx512(q, w)
            });
        }
        Isa::Avx2 => {
            return row_blocks(x, k, out, |q: [&[f32]; 3]| unsafe { x86::dots_avx2(q, w) });
        }
        Isa::Portable => {}
    }
    for (o, xr) in out.iter_mut().zip(x.chunks_exact(k.max(1))) {
        *o = dot(isa, xr, w);
    }
}

/// `out[i] = f(rows)[i]` over the `out.len()` rows of `x` (each `k` long) taken `N` at a time;
/// a short last block is padded with copies of its first row, whose results are dropped.
pub(crate) fn row_blocks<const N: usize>(
    x: &[f32],
    k: usize,
    out: &mut [f32],
    f: impl Fn([&[f32]; N]) -> [f32; N],
) {
    for (o, xs) in out.chunks_mut(N).zip(x.chunks(N * k.max(1))) {
        let block: [&[f32]; N] = std::array::from_fn(|i| {
            let i = if i < o.len() { i } else { 0 };
            &xs[i * k..(i + 1) * k]
        });
        let r = f(block);
        o.copy_from_slice(&r[..o.len()]);
    }
}

/// `y += a · x` with the best kernel (a decode query's weighted sum of values, one key at a time;
/// AVX-512 and AVX2 fuse the multiply and the add).
pub(crate) fn axpy_best(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: operands of different lengths");
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F; `x` and `y` have one length.
        unsafe { x86::axpy_avx512(a, x, y) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA; `x` and `y` have one length.
        unsafe { x86::axpy_avx2(a, x, y) };
        return;
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `out[j] = q · key(j)` for every `j` with the best kernel: each score the dot [`dot_best`] gives
/// (bit for bit), in one call so the AVX-512 loop keeps no per-key call in it.
pub(crate) fn key_dots_best<'a>(q: &[f32], key: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F (the kernel checks every key's length).
        unsafe { x86::key_dots_avx512(q, key, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (the kernel checks every key's length).
        unsafe { x86::key_dots_avx2(q, key, out) };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_best(q, key(j));
    }
}

/// `out = Σ_j p[j] · row(j)` in key order with the best kernel: per value the fused multiply-adds
/// of [`axpy_best`] called once per key from zero, in the same order (bit for bit), with the sums
/// kept in registers across keys instead of stored and reloaded every key.
pub(crate) fn weighted_sum_best<'a>(p: &[f32], row: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F (the kernel checks every row's length).
        unsafe { x86::weighted_sum_avx512(p, row, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (the kernel checks every row's length).
        unsafe { x86::weighted_sum_avx2(p, row, out) };
        return;
    }
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        axpy_best(pj, row(j), out);
    }
}

/// `Σ a_i b_i` in f32 with the best kernel.
pub(crate) fn dot_best(a: &[f32], b: &[f32]) -> f32 {
    dot(Isa::best(), a, b)
}

/// `Σ a_i b_i` in f32 with the kernel for `isa` (which the caller has checked runs here).
fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: operands of different lengths");
    match isa {
        // SAFETY: `isa.runs_here()` was asserted by the caller, so the CPU has the features the
        // kernel is compiled for; the kernels read only indices below the common length.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::dots_avx512([a], b)[0] },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dot_avx2(a, b) },
        _ => dot_portable(a, b),
    }
}

/// Independent lanes the compiler can vectorise for any target.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::reduce8;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// A decode query's two key loops for one instruction set (`$lanes` f32 lanes a register):
    /// `$key_dots` scores the query against every key with the row dot `$dots` (bit for bit its
    /// per-key result), `$weighted_sum` sums the value rows weighted by `p` in blocks of up to
    /// eight registers, each block kept in registers across all keys by `$block::<V>` (per value
    /// what the set's `axpy` from a zeroed `out` computes, one key at a time).
    macro_rules! key_loops {
        ($feature:literal, $lanes:literal, $dots:ident, $block:ident, $key_dots:ident, $weighted_sum:ident) => {
            /// Scores of `q` against every key (see `key_loops!`).
            ///
            /// # Safety
            /// The CPU must have the instruction set's features.
            #[target_feature(enable = $feature)]
            pub unsafe fn $key_dots<'a>(
                q: &[f32],
                key: impl Fn(usize) -> &'a [f32],
                out: &mut [f32],
            ) {
                for (j, o) in out.iter_mut().enumerate() {
                    let k = key(j);
                    assert_eq!(
                        k.len(),
                        q.len(),
                        "key_dots: key {j} is not as long as the query"
                    );
                    *o = $dots([q], k)[0];
                }
            }

            /// `out = Σ_j p[j] · row(j)` in key order (see `key_loops!`).
            ///
            /// # Safety
            /// The CPU must have the instruction set's features.
            #[target_feature(enable = $feature)]
            pub unsafe fn $weighted_sum<'a>(
                p: &[f32],
                row: impl Fn(usize) -> &'a [f32],
                out: &mut [f32],
            ) {
                let d = out.len();
                let mut c0 = 0;
                while c0 < d {
                    let w = (d - c0).min(8 * $lanes);
                    match w.div_ceil($lanes) {
                        1 => $block::<1>(p, &row, c0, w, out),
                        2 => $block::<2>(p, &row, c0, w, out),
                        3 => $block::<3>(p, &row, c0, w, out),
                        4 => $block::<4>(p, &row, c0, w, out),
                        5 => $block::<5>(p, &row, c0, w, out),
                        6 => $block::<6>(p, &row, c0, w, out),
                        7 => $block::<7>(p, &row, c0, w, out),
                        _ => $block::<8>(p, &row, c0, w, out),
                    }
                    c0 += w;
                }
            }
        };
    }

    /// Lanes `i..min(i + 16, n)` as a mask.
    #[inline(always)]
    fn lanes(i: usize, n: usize) -> __mmask16 {
        let k = (n - i).min(16);
        ((1u32 << k) - 1) as __mmask16
    }

    /// `exp` of sixteen lanes (the single-precision Cephes scheme: `x = k ln 2 + r`, a degree-6
    /// polynomial in `r`, `2^k` by `scalef`); −∞ and anything below −104 give exactly 0, where
    /// libm gives 0 or a denormal.
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        let finite = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-104.0));
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.121_944_4e-4), r);
        let c = |v: f32| _mm512_set1_ps(v);
        let mut p = c(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, c(1.398_2e-3));
        p = _mm512_fmadd_ps(p, r, c(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, c(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, c(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, c(0.5));
        let r2 = _mm512_mul_ps(r, r);
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), c(1.0));
        _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(e, k))
    }

    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_avx512(row: &mut [f32], scale: f32) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let (vs, ninf) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut mx = ninf;
        for i in (0..n).step_by(16) {
            let m = lanes(i, n);
            let x = _mm512_mul_ps(_mm512_mask_loadu_ps(ninf, m, p.add(i)), vs);
            _mm512_mask_storeu_ps(p.add(i), m, x);
            mx = _mm512_max_ps(mx, x);
        }
        let mx = _mm512_reduce_max_ps(mx);
        if mx == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        let vmx = _mm512_set1_ps(mx);
        let mut sum = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let m = lanes(i, n);
            let e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, m, p.add(i)), vmx));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            sum = _mm512_add_ps(sum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in (0..n).step_by(16) {
            let m = lanes(i, n);
            let x = _mm512_maskz_loadu_ps(m, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(x, inv));
        }
    }

    /// Writes every value of `out`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a`, `b` and `out` must have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gate_avx512(g: super::Gate, a: &[f32], b: &[f32], out: &mut [MaybeUninit<f32>]) {
        let n = out.len().min(a.len()).min(b.len());
        let (ap, bp, op) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr().cast::<f32>());
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let m = lanes(i, n);
            let x = _mm512_maskz_loadu_ps(m, ap.add(i));
            let y = match g {
                super::Gate::SiluMul => {
                    let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
                    let y = _mm512_maskz_loadu_ps(m, bp.add(i));
                    _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), y)
                }
                super::Gate::QuickGelu => {
                    let e = exp16(_mm512_mul_ps(_mm512_set1_ps(-1.702), x));
                    _mm512_mul_ps(x, _mm512_div_ps(one, _mm512_add_ps(one, e)))
                }
            };
            _mm512_mask_storeu_ps(op.add(i), m, y);
        }
    }

    /// Writes every value of `dg` and `du`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; the five slices must have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul_bwd_avx512(
        g: &[f32],
        u: &[f32],
        dy: &[f32],
        dg: &mut [MaybeUninit<f32>],
        du: &mut [MaybeUninit<f32>],
    ) {
        let n = g
            .len()
            .min(u.len())
            .min(dy.len())
            .min(dg.len())
            .min(du.len());
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let m = lanes(i, n);
            let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
            let d = _mm512_maskz_loadu_ps(m, dy.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
            let dur = _mm512_mul_ps(_mm512_mul_ps(d, gv), sig);
            let t = _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, sig)));
            let dgr = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, uv), sig), t);
            _mm512_mask_storeu_ps(du.as_mut_ptr().cast::<f32>().add(i), m, dur);
            _mm512_mask_storeu_ps(dg.as_mut_ptr().cast::<f32>().add(i), m, dgr);
        }
    }

    /// `x · w` for each of the `N` rows `xs`: per row four independent accumulators of sixteen
    /// lanes, the tail a masked load (no value is read past the end), each weight vector loaded
    /// once for all `N` rows. A row's fused multiply-adds, accumulators and order are the same
    /// whatever `N` is, so `dots_avx512::<4>` gives every row bit for bit what
    /// `dots_avx512::<1>` gives it alone (the batch invariance of the decode linears).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every row of `xs` must be as long as `w`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn dots_avx512<const N: usize>(xs: [&[f32]; N], w: &[f32]) -> [f32; N] {
        let n = w.len();
        let wp = w.as_ptr();
        let xp = xs.map(|x| x.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; N];
        let mut i = 0;
        while i + 64 <= n {
            for j in 0..4 {
                let o = i + 16 * j;
                let wv = _mm512_loadu_ps(wp.add(o));
                for (a, x) in acc.iter_mut().zip(xp) {
                    a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(o)), wv, a[j]);
                }
            }
            i += 64;
        }
        while i + 16 <= n {
            let wv = _mm512_loadu_ps(wp.add(i));
            for (a, x) in acc.iter_mut().zip(xp) {
                a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(i)), wv, a[0]);
            }
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let wv = _mm512_maskz_loadu_ps(mask, wp.add(i));
            for (a, x) in acc.iter_mut().zip(xp) {
                a[1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x.add(i)), wv, a[1]);
            }
        }
        acc.map(|a| {
            let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            _mm512_reduce_add_ps(sum)
        })
    }

    key_loops!(
        "avx512f",
        16,
        dots_avx512,
        weighted_block,
        key_dots_avx512,
        weighted_sum_avx512
    );

    /// Values `c0..c0 + w` of [`weighted_sum_avx512`] (`V` = ⌈w / 16⌉ accumulators).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn weighted_block<'a, const V: usize>(
        p: &[f32],
        row: &impl Fn(usize) -> &'a [f32],
        c0: usize,
        w: usize,
        out: &mut [f32],
    ) {
        let masks: [__mmask16; V] = std::array::from_fn(|v| lanes(16 * v, w));
        let mut acc = [_mm512_setzero_ps(); V];
        for (j, &pj) in p.iter().enumerate() {
            let r = row(j);
            assert_eq!(
                r.len(),
                out.len(),
                "weighted_sum: row {j} is not as long as out"
            );
            let a = _mm512_set1_ps(pj);
            let rp = r.as_ptr().add(c0);
            for v in 0..V {
                let x = _mm512_maskz_loadu_ps(masks[v], rp.add(16 * v));
                acc[v] = _mm512_fmadd_ps(a, x, acc[v]);
            }
        }
        let op = out.as_mut_ptr().add(c0);
        for v in 0..V {
            _mm512_mask_storeu_ps(op.add(16 * v), masks[v], acc[v]);
        }
    }

    /// `y += a · x`, sixteen lanes at a time with a masked tail.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `x` and `y` must have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm512_set1_ps(a);
        for i in (0..n).step_by(16) {
            let m = lanes(i, n);
            let v = _mm512_fmadd_ps(
                va,
                _mm512_maskz_loadu_ps(m, xp.add(i)),
                _mm512_maskz_loadu_ps(m, yp.add(i)),
            );
            _mm512_mask_storeu_ps(yp.add(i), m, v);
        }
    }

    /// Lanes `i..min(i + 8, n)` as an AVX2 load mask (each selected lane's sign bit set).
    #[inline(always)]
    unsafe fn lanes8(i: usize, n: usize) -> __m256i {
        let k = (n - i).min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(k),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// `x · w` for each of the `N` rows `xs`, the AVX2 counterpart of [`dots_avx512`]: per row
    /// four independent accumulators of eight lanes, the tail a masked load (zeros past the end),
    /// each weight vector loaded once for all `N` rows, the lanes summed as a tree at the end. A
    /// row's arithmetic is the same whatever `N` is.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every row of `xs` must be as long as `w`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn dots_avx2<const N: usize>(xs: [&[f32]; N], w: &[f32]) -> [f32; N] {
        let n = w.len();
        let wp = w.as_ptr();
        let xp = xs.map(|x| x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        let mut i = 0;
        while i + 32 <= n {
            for j in 0..4 {
                let o = i + 8 * j;
                let wv = _mm256_loadu_ps(wp.add(o));
                for (a, x) in acc.iter_mut().zip(xp) {
                    a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(o)), wv, a[j]);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = _mm256_loadu_ps(wp.add(i));
            for (a, x) in acc.iter_mut().zip(xp) {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i)), wv, a[0]);
            }
            i += 8;
        }
        if i < n {
            let mask = lanes8(i, n);
            let wv = _mm256_maskload_ps(wp.add(i), mask);
            for (a, x) in acc.iter_mut().zip(xp) {
                a[1] = _mm256_fmadd_ps(_mm256_maskload_ps(x.add(i), mask), wv, a[1]);
            }
        }
        acc.map(|a| {
            let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            reduce8(sum)
        })
    }

    /// The eight lanes' sum as a tree (halves, then quarters, then pairs): three dependent adds,
    /// where a sum in lane order is seven — a decode query's dot with a 64-value key is mostly
    /// this reduction.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn reduce8(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
    }

    /// One row's [`dots_avx2`].
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` and `b` must have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        dots_avx2([a], b)[0]
    }

    key_loops!(
        "avx2,fma",
        8,
        dots_avx2,
        weighted_block8,
        key_dots_avx2,
        weighted_sum_avx2
    );

    /// Values `c0..c0 + w` of [`weighted_sum_avx2`] (`V` = ⌈w / 8⌉ accumulators).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_block8<'a, const V: usize>(
        p: &[f32],
        row: &impl Fn(usize) -> &'a [f32],
        c0: usize,
        w: usize,
        out: &mut [f32],
    ) {
        let masks: [__m256i; V] = std::array::from_fn(|v| lanes8(8 * v, w));
        let mut acc = [_mm256_setzero_ps(); V];
        for (j, &pj) in p.iter().enumerate() {
            let r = row(j);
            assert_eq!(
                r.len(),
                out.len(),
                "weighted_sum: row {j} is not as long as out"
            );
            let a = _mm256_set1_ps(pj);
            let rp = r.as_ptr().add(c0);
            for v in 0..V {
                let x = _mm256_maskload_ps(rp.add(8 * v), masks[v]);
                acc[v] = _mm256_fmadd_ps(a, x, acc[v]);
            }
        }
        let op = out.as_mut_ptr().add(c0);
        for v in 0..V {
            _mm256_maskstore_ps(op.add(8 * v), masks[v], acc[v]);
        }
    }

    /// `y += a · x`, eight lanes at a time with a masked tail.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` and `y` must have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(a);
        for i in (0..n).step_by(8) {
            let m = lanes8(i, n);
            let v = _mm256_fmadd_ps(
                va,
                _mm256_maskload_ps(xp.add(i), m),
                _mm256_maskload_ps(yp.add(i), m),
            );
            _mm256_maskstore_ps(yp.add(i), m, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of rows at once gives each row its own dot, bit for bit (batch invariance rests
    /// on it), with every kernel this CPU runs and any number of rows (full and short blocks).
    #[test]
    fn row_blocked_dots_are_each_rows_dot() {
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if !isa.runs_here() {
                continue;
            }
            for k in [1usize, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 200, 512] {
                for rows in 1..=9 {
                    let x = values(rows * k, k as u64);
                    let w = values(k, 7 + k as u64);
                    let mut out = vec![f32::NAN; rows];
                    dots(isa, &x, k, &w, &mut out);
                    for (i, o) in out.iter().enumerate() {
                        let alone = dot(isa, &x[i * k..(i + 1) * k], &w);
                        assert_eq!(o.to_bits(), alone.to_bits(), "{isa:?} k {k} row {i}/{rows}");
                    }
                }
            }
        }
    }

    /// The decode attention's key loops in one call give, bit for bit, the per-key dot and the
    /// per-key axpy they replace (the dense and paged decodes and every earlier result rest on
    /// it), for head sizes on and off the sixteen-lane grid and past one register block; and
    /// they are close to the f64 sums.
    #[test]
    fn key_loops_are_the_per_key_kernels() {
        for d in [1usize, 15, 16, 17, 64, 100, 128, 129, 300] {
            for keys in [0usize, 1, 7, 161] {
                let q = values(d, d as u64);
                let kv = values(keys * d, 11 + keys as u64);
                let p = values(keys, 5 + d as u64);
                let row = |j: usize| &kv[j * d..(j + 1) * d];
                let mut scores = vec![f32::NAN; keys];
                key_dots_best(&q, row, &mut scores);
                let mut sum = vec![f32::NAN; d];
                weighted_sum_best(&p, row, &mut sum);
                let mut want = vec![0.0f32; d];
                for j in 0..keys {
                    let dot = dot_best(&q, row(j));
                    assert_eq!(
                        scores[j].to_bits(),
                        dot.to_bits(),
                        "d {d} keys {keys} score {j}"
                    );
                    let exact: f64 = (0..d).map(|c| q[c] as f64 * row(j)[c] as f64).sum();
                    assert!((scores[j] as f64 - exact).abs() <= 1e-5 * d as f64);
                    axpy_best(p[j], row(j), &mut want);
                }
                for c in 0..d {
                    assert_eq!(
                        sum[c].to_bits(),
                        want[c].to_bits(),
                        "d {d} keys {keys} value {c}"
                    );
                    let exact: f64 = (0..keys).map(|j| p[j] as f64 * row(j)[c] as f64).sum();
                    assert!((sum[c] as f64 - exact).abs() <= 1e-5 * (keys.max(1)) as f64);
                }
            }
        }
    }

    /// Deterministic values in [−1, 1) with no structure a kernel could get right by accident.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The f64 triple loop every kernel is checked against: each value with the sum of its
    /// terms' magnitudes (what bounds the error of a sum in f32).
    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<(f64, f64)> {
        let mut out = vec![(0.0, 0.0); m * n];
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64);
                out[i * n + j] = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            }
        }
        out
    }

    #[test]
    fn linear_rows_matches_f64_on_odd_shapes_with_every_kernel() {
        let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|i| i.runs_here())
            .collect();
        assert!(isas.contains(&Isa::Portable));
        let dims = [1usize, 3, 15, 17, 64, 257];
        for isa in isas {
            for m in 1..=GEMV_ROWS {
                for &k in &dims {
                    for &n in &dims {
                        let x = values(m * k, (m * 1000 + k) as u64);
                        let w = values(n * k, (n * 7 + k) as u64);
                        let got = linear_rows_with(isa, &x, m, k, &w, n);
                        let want = naive(&x, m, k, &w, n);
                        assert_eq!(got.len(), want.len());
                        for (idx, (&g, &(e, mag))) in got.iter().zip(&want).enumerate() {
                            // Any order of f32 sums of k rounded products: |error| ≤ (k+1)·u·Σ|terms|.
                            let tol = (k + 1) as f64 * f32::EPSILON as f64 * mag;
                            assert!(
                                (g as f64 - e).abs() <= tol,
                                "{}: m {m} k {k} n {n} at {idx}: {g} vs {e}",
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn best_kernel_runs_here_and_agrees_with_portable() {
        let (m, k, n) = (2, 4099, 33);
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let best = linear_rows(&x, m, k, &w, n);
        let portable = linear_rows_with(Isa::Portable, &x, m, k, &w, n);
        for (a, b) in best.iter().zip(&portable) {
            assert!((a - b).abs() <= 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn softmax_matches_f64_with_every_kernel() {
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if !isa.runs_here() {
                continue;
            }
            for &n in &[1usize, 3, 15, 16, 17, 64, 257] {
                let mut row: Vec<f32> = values(n, n as u64).iter().map(|v| 40.0 * v).collect();
                // Hidden keys and a far-below-the-max logit (whose exp underflows to 0).
                if n > 2 {
                    row[1] = f32::NEG_INFINITY;
                    row[n - 1] = -1e4;
                }
                let scale = 0.125;
                let mx = row
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &v| m.max((v * scale) as f64));
                let e: Vec<f64> = row
                    .iter()
                    .map(|&v| ((v * scale) as f64 - mx).exp())
                    .collect();
                let total: f64 = e.iter().sum();
                let mut got = row.clone();
                softmax_scaled_with(isa, &mut got, scale);
                for (j, (&g, &w)) in got.iter().zip(&e).enumerate() {
                    let want = w / total;
                    // A few ulp per exp plus the f32 sum over n values.
                    let tol = 1e-6 * want + (n as f64 + 4.0) * f32::EPSILON as f64 * want + 1e-30;
                    assert!(
                        (g as f64 - want).abs() <= tol,
                        "{}: n {n} at {j}: {g} vs {want}",
                        isa.name()
                    );
                }
                if n > 2 {
                    assert_eq!(got[1], 0.0, "{}: a hidden key is exactly 0", isa.name());
                }
            }
            let mut hidden = vec![f32::NEG_INFINITY; 19];
            softmax_scaled_with(isa, &mut hidden, 0.5);
            assert!(hidden.iter().all(|&v| v == 0.0), "{}", isa.name());
        }
    }

    /// The vector gates against their scalar formulas in f64 (the libm path is one rounding of
    /// each operation; the vector `exp` adds at most a few ulp), over ordinary values, values
    /// whose `exp` overflows or underflows, zero and a tail that is not a multiple of 16.
    #[test]
    fn gates_match_f64_with_every_kernel() {
        let mut a: Vec<f32> = values(1000, 5).iter().map(|v| 12.0 * v).collect();
        a.extend([
            0.0, -0.0, 90.0, -90.0, 104.5, -104.5, 200.0, -200.0, 1e-6, -1e-6, 3.5,
        ]);
        let b = values(a.len(), 6);
        let dy = values(a.len(), 7);
        // `mag` bounds the terms' sizes: dg's `1 + g (1 − σ)` cancels near g ≈ −1.28, so its
        // error is relative to the terms, not to the result.
        let close_to = |got: f32, want: f64, mag: f64, what: &str| {
            let tol = 8.0 * f32::EPSILON as f64 * mag + 1e-37;
            assert!((got as f64 - want).abs() <= tol, "{what}: {got} vs {want}");
        };
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if !isa.runs_here() {
                continue;
            }
            let silu = gate_with(isa, Gate::SiluMul, &a, &b);
            let qg = gate_with(isa, Gate::QuickGelu, &a, &[]);
            let (dg, du) = silu_mul_bwd_with(isa, &a, &b, &dy);
            for i in 0..a.len() {
                let (x, y, d) = (a[i] as f64, b[i] as f64, dy[i] as f64);
                let sig = 1.0 / (1.0 + (-x).exp());
                let at = format!("{} at {i} (x = {x})", isa.name());
                let close = |got: f32, want: f64, what: &str| close_to(got, want, want.abs(), what);
                close(silu[i], x * sig * y, &format!("silu_mul {at}"));
                // The formula's argument is an f32 product; its rounding is part of the definition.
                let arg = (-1.702f32 * a[i]) as f64;
                close(qg[i], x / (1.0 + arg.exp()), &format!("quick_gelu {at}"));
                close(du[i], d * x * sig, &format!("du {at}"));
                let (p, t) = (d * y * sig, x * (1.0 - sig));
                let mag = p.abs() * (1.0 + t.abs());
                close_to(dg[i], p * (1.0 + t), mag, &format!("dg {at}"));
            }
        }
    }

    #[test]
    fn empty_shapes() {
        assert!(linear_rows(&[], 0, 3, &[0.0; 6], 2).is_empty());
        assert_eq!(linear_rows(&[1.0; 3], 1, 3, &[], 0), Vec::<f32>::new());
        assert_eq!(linear_rows(&[], 2, 0, &[], 3), vec![0.0; 6]);
    }
}
