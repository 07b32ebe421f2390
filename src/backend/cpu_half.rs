//! Half-precision weights on the CPU backend: an f16 or bf16 matrix kept as the checkpoint stores
//! it — a view of the memory-mapped file, so its pages are the page cache's and nothing is copied —
//! and consumed by the products with f32 arithmetic. Activations stay f32.
//!
//! Products convert the weight in panels sized for the cache (a per-thread buffer) and multiply
//! each panel in f32: a decode step's GEMV takes a dot per weight row, a prefill's GEMM hands the
//! panel to the f32 GEMM. f16 and bf16 convert to f32 exactly, so a product differs from the same
//! product over an f32 copy of the weight only in the order of its f32 sums.

use std::sync::Arc;

use gemm::Parallelism;
use half::slice::HalfFloatSliceExt;
use memmap2::Mmap;
use rayon::prelude::*;

use super::cpu::{matmul, View};
use crate::checkpoint::{DType, TensorRef};

/// Which half-precision format a weight is held in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    Bf16,
}

impl HalfKind {
    pub fn of(dtype: DType) -> Option<HalfKind> {
        match dtype {
            DType::F16 => Some(HalfKind::F16),
            DType::BF16 => Some(HalfKind::Bf16),
            DType::F32 => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HalfKind::F16 => "f16",
            HalfKind::Bf16 => "bf16",
        }
    }
}

/// A row-major half-precision matrix's bits: in a mapped file, or owned (converted from another
/// dtype, or copied where the file's bytes are not 2-byte aligned).
#[derive(Clone)]
enum Bits {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<[u16]>),
}

#[derive(Clone)]
pub struct HalfWeight {
    kind: HalfKind,
    bits: Bits,
}

impl std::fmt::Debug for HalfWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match self.bits {
            Bits::Mapped { .. } => "mapped",
            Bits::Owned(_) => "owned",
        };
        write!(
            f,
            "HalfWeight({}, {place}, {} values)",
            self.kind.name(),
            self.len()
        )
    }
}

impl PartialEq for HalfWeight {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.bits() == other.bits()
    }
}

impl HalfWeight {
    /// `t` held as `kind`: a view of the mapped file when it is stored so, else converted.
    pub fn from_tensor(t: &TensorRef<'_>, kind: HalfKind) -> HalfWeight {
        let len = t.bytes.len() / t.dtype.size();
        if HalfKind::of(t.dtype) == Some(kind) {
            if let Some(map) = t.mapping {
                let start = t.bytes.as_ptr() as usize - map.as_ptr() as usize;
                // A mapping starts on a page, so the offset decides the alignment of the `u16`s.
                if start.is_multiple_of(2) {
                    return HalfWeight {
                        kind,
                        bits: Bits::Mapped {
                            map: Arc::clone(map),
                            start,
                            len,
                        },
                    };
                }
            }
            let bits: Vec<u16> = t
                .bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            return HalfWeight {
                kind,
                bits: Bits::Owned(bits.into()),
            };
        }
        HalfWeight::from_f32(&t.to_f32(), kind)
    }

    /// f32 values rounded to `kind` (nearest, ties to even).
    pub fn from_f32(values: &[f32], kind: HalfKind) -> HalfWeight {
        let bits: Vec<u16> = match kind {
            HalfKind::F16 => values
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect(),
            HalfKind::Bf16 => values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect(),
        };
        HalfWeight {
            kind,
            bits: Bits::Owned(bits.into()),
        }
    }

    pub fn kind(&self) -> HalfKind {
        self.kind
    }

    /// Whether the values are a view of a mapped file (no copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self.bits, Bits::Mapped { .. })
    }

    pub fn len(&self) -> usize {
        match &self.bits {
            Bits::Mapped { len, .. } => *len,
            Bits::Owned(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bits(&self) -> &[u16] {
        match &self.bits {
            // Alignment was checked when the view was made; the range lies inside the file
            // because the checkpoint's header validation put the tensor there.
            Bits::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[*start..*start + 2 * len])
            }
            Bits::Owned(b) => b,
        }
    }

    /// Values `range` converted into `dst` (of the same length).
    pub fn to_f32_into(&self, range: std::ops::Range<usize>, dst: &mut [f32]) {
        convert(self.kind, &self.bits()[range], dst);
    }

    /// Values `range` as f32.
    pub fn to_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0.0f32; range.len()];
        self.to_f32_into(range, &mut out);
        out
    }
}

fn convert(kind: HalfKind, src: &[u16], dst: &mut [f32]) {
    match kind {
        // Vectorised (F16C where the CPU has it, detected at run time).
        HalfKind::F16 => bytemuck::cast_slice::<u16, half::f16>(src).convert_to_f32_slice(dst),
        // bf16 is the top half of an f32.
        HalfKind::Bf16 => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &b)| *d = f32::from_bits((b as u32) << 16)),
    }
}

/// A prefill's weight panels (f32 values, 4 MiB): the GEMM re-reads the activations once per
/// panel, so panels are as large as the cache allows.
const GEMM_PANEL_VALUES: usize = 1 << 20;
/// Up to this many activation rows take the dot-product (GEMV) path: each weight row is read from
/// memory once and dotted, straight from its half-precision bits, with every activation row (each
/// output by the same dot whatever the other rows: [`crate::backend::INVARIANT_ROWS`]).
const GEMV_ROWS: usize = crate::backend::INVARIANT_ROWS;
/// Weight rows per GEMV block (one rayon task).
const GEMV_BLOCK: usize = 64;

/// Column blocks of about `want` columns, but at least four per thread when `n` allows, so every
/// core has work.
fn block_width(n: usize, want: usize) -> usize {
    let spread = n.div_ceil(4 * rayon::current_num_threads().max(1));
    want.min(spread).max(1)
}

/// `x[m, k] · wᵀ` for a half weight `w` `[n, k]` → `[m, n]` row-major.
pub fn linear(x: &[f32], m: usize, k: usize, w: &HalfWeight, n: usize) -> Vec<f32> {
    let bits = w.bits();
    if m <= GEMV_ROWS {
        return by_column_blocks(m, n, GEMV_BLOCK, |r0, r1, _| {
            let nb = r1 - r0;
            let mut out = vec![0.0f32; m * nb];
            let mut col = vec![0.0f32; m];
            for (j, wr) in bits[r0 * k..r1 * k].chunks_exact(k).enumerate() {
                dots(w.kind, x, k, wr, &mut col);
                for (i, &v) in col.iter().enumerate() {
                    out[i * nb + j] = v;
                }
            }
            out
        });
    }
    let rows = block_width(n, GEMM_PANEL_VALUES / k.max(1));
    by_column_blocks(m, n, rows, |r0, r1, panel| {
        let nb = r1 - r0;
        panel.resize(nb * k, 0.0);
        w.to_f32_into(r0 * k..r1 * k, panel);
        let mut out = vec![0.0f32; m * nb];
        // The panel is W[r0..r1] row-major: as wᵀ, a [k, nb] view with column stride k.
        let lhs = View::rows(x, k);
        let rhs = View::cols(panel, k);
        matmul(m, nb, k, &mut out, nb, lhs, rhs, Parallelism::None);
        out
    })
}

/// `dy[m, n] · w` for a half weight `w` `[n, k]` → `[m, k]` row-major (the input gradient of a
/// linear layer).
pub fn linear_bwd(dy: &[f32], m: usize, n: usize, w: &HalfWeight, k: usize) -> Vec<f32> {
    let cols = block_width(k, GEMM_PANEL_VALUES / n.max(1));
    by_column_blocks(m, k, cols, |c0, c1, panel| {
        let cb = c1 - c0;
        panel.resize(n * cb, 0.0);
        for (r, dst) in panel.chunks_exact_mut(cb).enumerate() {
            w.to_f32_into(r * k + c0..r * k + c1, dst);
        }
        let mut out = vec![0.0f32; m * cb];
        let lhs = View::rows(dy, n);
        let rhs = View::rows(panel, cb);
        matmul(m, cb, n, &mut out, cb, lhs, rhs, Parallelism::None);
        out
    })
}

/// An `[m, n]` row-major result assembled from column blocks of `width`, each computed on the
/// rayon pool by `block(c0, c1, scratch)` as an `[m, c1 - c0]` row-major matrix; `scratch` is a
/// per-thread buffer that lives across blocks.
fn by_column_blocks(
    m: usize,
    n: usize,
    width: usize,
    block: impl Fn(usize, usize, &mut Vec<f32>) -> Vec<f32> + Sync,
) -> Vec<f32> {
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let starts: Vec<usize> = (0..n).step_by(width.max(1)).collect();
    let blocks: Vec<(usize, Vec<f32>)> = starts
        .into_par_iter()
        .map_init(Vec::new, |scratch, c0| {
            let c1 = (c0 + width).min(n);
            (c0, block(c0, c1, scratch))
        })
        .collect();
    let mut out = vec![0.0f32; m * n];
    for (c0, b) in blocks {
        let w = b.len() / m;
        for (dst, src) in out.chunks_exact_mut(n).zip(b.chunks_exact(w)) {
            dst[c0..c0 + w].copy_from_slice(src);
        }
    }
    out
}

/// `out[i] = x_i · w` for the `out.len()` rows of `x` (each `k` long) and the half-precision
/// bits `w`: exactly [`dot`] per row, three rows per pass over `w` where the AVX2 kernels run
/// (each weight vector widened once for the three), so a row's result never depends on the rows
/// beside it.
fn dots(kind: HalfKind, x: &[f32], k: usize, w: &[u16], out: &mut [f32]) {
    assert_eq!(w.len(), k, "dots: the weight row is not {k} long");
    assert_eq!(
        x.len(),
        out.len() * k,
        "dots: x is not [{}, {k}]",
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features the kernels are compiled for (checked just above);
        // every row and `w` are `k` long (asserted above).
        super::cpu_gemm::row_blocks(x, k, out, |rows: [&[f32]; 3]| unsafe {
            match kind {
                HalfKind::F16 => x86::dots_f16(rows, w),
                HalfKind::Bf16 => x86::dots_bf16(rows, w),
            }
        });
        return;
    }
    for (o, xr) in out.iter_mut().zip(x.chunks_exact(k.max(1))) {
        *o = dot(kind, xr, w);
    }
}

/// `Σ x_i · w_i` over f32 `x` and half-precision bits `w` of the same length, accumulated in f32.
fn dot(kind: HalfKind, x: &[f32], w: &[u16]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot: operands of different lengths");
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features the kernels are compiled for (checked just above),
        // and the kernels read only indices below the common length (asserted above).
        return unsafe {
            match kind {
                HalfKind::F16 => x86::dots_f16([x], w)[0],
                HalfKind::Bf16 => x86::dots_bf16([x], w)[0],
            }
        };
    }
    // Portable: convert a stretch at a time into a buffer on the stack, then independent lanes
    // (which the compiler vectorises).
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let mut buf = [0.0f32; 256];
    let mut tail = 0.0f32;
    for (xs, ws) in x.chunks(buf.len()).zip(w.chunks(buf.len())) {
        let b = &mut buf[..ws.len()];
        convert(kind, ws, b);
        let (cx, cb) = (xs.chunks_exact(L), b.chunks_exact(L));
        for (a, c) in cx.remainder().iter().zip(cb.remainder()) {
            tail += a * c;
        }
        for (a, c) in cx.zip(cb) {
            for l in 0..L {
                acc[l] += a[l] * c[l];
            }
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// AVX2 + FMA + F16C kernels for [`dots`]: half values widened eight at a time in registers,
/// four independent accumulators per row.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; every row of `xs` must be as long as `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_f16<const N: usize>(xs: [&[f32]; N], w: &[u16]) -> [f32; N] {
        dots_with(xs, w, |p| {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        })
    }

    /// # Safety
    /// As [`dots_f16`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_bf16<const N: usize>(xs: [&[f32]; N], w: &[u16]) -> [f32; N] {
        dots_with(xs, w, |p| {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        })
    }

    /// `widen(p)`: the eight half values at `p` as f32 lanes. Per row: four accumulators over
    /// 32-value steps, one over the 8-value steps, the zero-padded tail in the second, the lanes
    /// summed as a tree — the same whatever `N` is.
    #[inline(always)]
    unsafe fn dots_with<const N: usize>(
        xs: [&[f32]; N],
        w: &[u16],
        widen: impl Fn(*const u16) -> __m256,
    ) -> [f32; N] {
        let n = w.len();
        let wp = w.as_ptr();
        let xp = xs.map(|x| x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        let mut i = 0;
        while i + 32 <= n {
            for j in 0..4 {
                let o = i + 8 * j;
                let wv = widen(wp.add(o));
                for (a, x) in acc.iter_mut().zip(xp) {
                    a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(o)), wv, a[j]);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = widen(wp.add(i));
            for (a, x) in acc.iter_mut().zip(xp) {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i)), wv, a[0]);
            }
            i += 8;
        }
        if i < n {
            // The last few values, zero-padded to a full register.
            let mut wt = [0u16; 8];
            wt[..n - i].copy_from_slice(&w[i..n]);
            let wv = widen(wt.as_ptr());
            for (a, x) in acc.iter_mut().zip(&xs) {
                let mut xt = [0.0f32; 8];
                xt[..n - i].copy_from_slice(&x[i..n]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xt.as_ptr()), wv, a[1]);
            }
        }
        acc.map(|a| {
            let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            crate::backend::cpu_gemm::reduce8(sum)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of rows at once gives each row its own dot, bit for bit (the batch invariance of
    /// the half-weight decode linears), in both half formats, for full and short blocks and
    /// lengths on and off the eight-value grid; and each dot is close to the f64 sum.
    #[test]
    fn row_blocked_half_dots_are_each_rows_dot() {
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            for k in [1usize, 7, 8, 9, 31, 33, 64, 65, 200] {
                for rows in 1..=7 {
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
                        .collect();
                    let wf: Vec<f32> = (0..k)
                        .map(|i| ((i * 53 % 89) as f32 - 44.0) / 32.0)
                        .collect();
                    let w = HalfWeight::from_f32(&wf, kind);
                    let wq = w.to_f32(0..k);
                    let mut out = vec![f32::NAN; rows];
                    dots(kind, &x, k, w.bits(), &mut out);
                    for (i, o) in out.iter().enumerate() {
                        let xr = &x[i * k..(i + 1) * k];
                        let alone = dot(kind, xr, w.bits());
                        assert_eq!(
                            o.to_bits(),
                            alone.to_bits(),
                            "{kind:?} k {k} row {i}/{rows}"
                        );
                        let exact: f64 =
                            xr.iter().zip(&wq).map(|(a, b)| *a as f64 * *b as f64).sum();
                        assert!(
                            (*o as f64 - exact).abs() <= 1e-5 * k as f64,
                            "{kind:?} k {k}: {o} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
