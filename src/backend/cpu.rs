//! The CPU reference backend: f32 everywhere, GEMMs through the `gemm` crate (multi-threaded with
//! rayon), everything else plain loops. It is the oracle the CUDA backend is tested against and the
//! engine CI runs, so it favours obvious code over cleverness, except for the matrix products that
//! dominate its time.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{shape_err, AttnShape, Backend};
use crate::checkpoint::TensorRef;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(shape_err(
                "tensor",
                format!("{} values cannot form [{rows}, {cols}]", data.len()),
            ));
        }
        Ok(CpuTensor { rows, cols, data })
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

#[derive(Default, Clone, Copy, Debug)]
pub struct Cpu;

/// A strided matrix view for [`matmul`]: element (i, j) lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` over strided views, `dst` row-major with row stride `dst_rs`.
/// Bounds are checked here so the unsafe call below only sees in-range strides.
fn matmul(
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
    let last = |v: &View, r: usize, c: usize| (r - 1) * v.rs + (c - 1) * v.cs;
    assert!(
        dst.len() > (m - 1) * dst_rs + (n - 1),
        "matmul: dst too small"
    );
    if k == 0 {
        for i in 0..m {
            dst[i * dst_rs..i * dst_rs + n].fill(0.0);
        }
        return;
    }
    assert!(lhs.data.len() > last(&lhs, m, k), "matmul: lhs too small");
    assert!(rhs.data.len() > last(&rhs, k, n), "matmul: rhs too small");
    // SAFETY: every index gemm touches is (i, j) with i < rows, j < cols of each operand; the
    // asserts above prove the largest such offset is inside each slice, and `dst` does not alias
    // the inputs (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
}

fn same_shape(op: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(shape_err(
            op,
            format!("[{}, {}] vs [{}, {}]", a.rows, a.cols, b.rows, b.cols),
        ));
    }
    Ok(())
}

fn row_vector(op: &str, v: &CpuTensor, cols: usize) -> Result<()> {
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

impl Backend for Cpu {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        format!("cpu (f32, {} threads)", rayon::current_num_threads())
    }

    fn dims(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        CpuTensor::new(data.to_vec(), rows, cols)
    }

    fn load_weight(&self, t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<CpuTensor> {
        let n: usize = t.shape.iter().product();
        if n != rows * cols {
            return Err(shape_err(
                "load_weight",
                format!(
                    "`{}` has {n} values, cannot view as [{rows}, {cols}]",
                    t.name
                ),
            ));
        }
        CpuTensor::new(t.to_f32(), rows, cols)
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
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
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if let Some(b) = bias {
            row_vector("linear bias", b, n)?;
        }
        let mut out = vec![0.0f32; m * n];
        matmul(
            m,
            n,
            k,
            &mut out,
            n,
            View {
                data: &x.data,
                rs: k,
                cs: 1,
            },
            // wᵀ as a [k, n] view of the row-major [n, k] weight.
            View {
                data: &w.data,
                rs: 1,
                cs: k,
            },
            Parallelism::Rayon(0),
        );
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
        let data = a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect();
        CpuTensor::new(data, a.rows, a.cols)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        row_vector("rms_norm weight", w, x.cols)?;
        let mut out = x.clone();
        for row in out.data.chunks_exact_mut(x.cols) {
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.cols as f64;
            // transformers: hidden * rsqrt(variance + eps) in f32, then weight * hidden.
            let inv = 1.0f32 / ((ms as f32) + eps).sqrt();
            for (o, wv) in row.iter_mut().zip(&w.data) {
                *o = wv * (*o * inv);
            }
        }
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
        Ok(map(x, |v| {
            let v = v as f64;
            (0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))) as f32
        }))
    }

    fn quick_gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(map(x, |v| v * (1.0 / (1.0 + (-1.702 * v).exp()))))
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        same_shape("silu_mul", gate, up)?;
        let data = gate
            .data
            .iter()
            .zip(&up.data)
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        CpuTensor::new(data, gate.rows, gate.cols)
    }

    fn rope(&self, x: &CpuTensor, head_dim: usize, pos0: usize, theta: f32) -> Result<CpuTensor> {
        if head_dim == 0 || head_dim % 2 != 0 || x.cols % head_dim != 0 {
            return Err(shape_err(
                "rope",
                format!(
                    "{} columns do not split into heads of even size {head_dim}",
                    x.cols
                ),
            ));
        }
        let inv = rope_inv_freq(head_dim, theta);
        let half = head_dim / 2;
        let mut out = x.clone();
        for (r, row) in out.data.chunks_exact_mut(x.cols).enumerate() {
            let pos = (pos0 + r) as f32;
            // cos/sin of the f32 angle, evaluated accurately and rounded once, like torch.
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv
                .iter()
                .map(|&f| {
                    let a = (f * pos) as f64;
                    (a.cos() as f32, a.sin() as f32)
                })
                .unzip();
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
        Ok(out)
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        s: AttnShape,
    ) -> Result<CpuTensor> {
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
                    "q [{}, {}], k [{}, {}], v [{}, {}] do not fit {h} heads / {hk} kv heads of {d}",
                    q.rows, q.cols, k.rows, k.cols, v.rows, v.cols
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
        if let Some(p0) = s.causal_q_pos0 {
            if p0 + q.rows > s.kv_len {
                return Err(shape_err(
                    "attention",
                    format!(
                        "queries at {p0}..{} attend past kv_len {}",
                        p0 + q.rows,
                        s.kv_len
                    ),
                ));
            }
        }
        let (nq, kv) = (q.rows, s.kv_len);
        let scale = 1.0 / (d as f32).sqrt();
        let group = h / hk;
        // One [nq, d] output block per head, computed independently on the rayon pool.
        let heads: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hi| {
                let kvh = hi / group;
                let mut scores = vec![0.0f32; nq * kv];
                matmul(
                    nq,
                    kv,
                    d,
                    &mut scores,
                    kv,
                    View {
                        data: &q.data[hi * d..],
                        rs: q.cols,
                        cs: 1,
                    },
                    View {
                        data: &k.data[kvh * d..],
                        rs: 1,
                        cs: k.cols,
                    },
                    Parallelism::None,
                );
                for (i, row) in scores.chunks_exact_mut(kv).enumerate() {
                    let visible = match s.causal_q_pos0 {
                        Some(p0) => p0 + i + 1,
                        None => kv,
                    };
                    let row = &mut row[..visible];
                    let mut mx = f32::NEG_INFINITY;
                    for x in row.iter_mut() {
                        *x *= scale;
                        mx = mx.max(*x);
                    }
                    let mut sum = 0.0f32;
                    for x in row.iter_mut() {
                        *x = (*x - mx).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                if s.causal_q_pos0.is_some() {
                    for (i, row) in scores.chunks_exact_mut(kv).enumerate() {
                        row[s.causal_q_pos0.unwrap() + i + 1..].fill(0.0);
                    }
                }
                let mut out = vec![0.0f32; nq * d];
                matmul(
                    nq,
                    d,
                    kv,
                    &mut out,
                    d,
                    View {
                        data: &scores,
                        rs: kv,
                        cs: 1,
                    },
                    View {
                        data: &v.data[kvh * d..],
                        rs: v.cols,
                        cs: 1,
                    },
                    Parallelism::None,
                );
                out
            })
            .collect();
        let mut out = vec![0.0f32; nq * h * d];
        for (hi, block) in heads.iter().enumerate() {
            for i in 0..nq {
                out[i * h * d + hi * d..i * h * d + (hi + 1) * d]
                    .copy_from_slice(&block[i * d..(i + 1) * d]);
            }
        }
        CpuTensor::new(out, nq, h * d)
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
            data.extend_from_slice(table.row(id as usize));
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
        CpuTensor::new(
            x.data[start * x.cols..(start + n) * x.cols].to_vec(),
            n,
            x.cols,
        )
    }

    fn copy_rows_into(&self, dst: &mut CpuTensor, dst_row: usize, src: &CpuTensor) -> Result<()> {
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

    fn argmax_rows(&self, x: &CpuTensor) -> Result<Vec<u32>> {
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
}
