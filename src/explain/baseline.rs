//! Gradient relevancy by our own activation backward through the decoder (DESIGN §4).
//!
//! For a generated token produced at position p, the target is its raw logit
//! `s = logits[p, y]`. The backward walks the layers from the top, computing activation gradients
//! only (never weight gradients) and stopping at layer 0's input; each layer's attention backward
//! also yields its cam.
//!
//! - **Exact** (Chefer et al.): `C_l = mean_h max(0, ∂s/∂A_l ⊙ A_l)` and the row p of
//!   `R = (I + C_{L-1}) … (I + C_0)`. Only that row is needed and it can be folded in as the backward
//!   reaches each layer: `v = e_p; for l = L-1 … 0: v = v + v·C_l` — O(L·n²), one cam alive at a
//!   time. [`RowMode::FullR`] keeps every `C_l` and multiplies out the full `n×n` R as the paper's
//!   baseline does, to reproduce its cost; both give the same row. The backward runs over positions
//!   `0 ..= p` only: causality makes later positions irrelevant to `s`.
//! - **GradCAM** (the paper's comparison): `mean_h A_l ⊙ max(0, ∂s/∂A_l)` at one layer, row p; the
//!   backward stops at that layer.
//! - **Incremental** (LVLM-Interpret): see [`Incremental`].

use crate::backend::{AttnShape, Backend, Cam};
use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::model::llama::{KvCache, Llama, LlamaLayer, Saved, SavedLayer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowMode {
    /// Fold each cam into the relevance row as soon as it exists (default).
    Streamed,
    /// Keep every layer's cam and materialise `R` (the paper's baseline; same result, more cost).
    FullR,
}

/// One exact backward's products: the relevance row over positions `0 ..= p` and, when asked,
/// every layer's cam `[p+1, p+1]` (index = layer).
pub struct Relevance {
    pub row: Vec<f32>,
    pub cams: Vec<Vec<f32>>,
}

/// Rows `start .. start + m` of every saved tensor of a layer.
fn layer_rows<B: Backend>(
    b: &B,
    s: &SavedLayer<B>,
    start: usize,
    m: usize,
) -> Result<SavedLayer<B>> {
    Ok(SavedLayer {
        x_in: b.slice_rows(&s.x_in, start, m)?,
        q: b.slice_rows(&s.q, start, m)?,
        x_mid: b.slice_rows(&s.x_mid, start, m)?,
        gate: b.slice_rows(&s.gate, start, m)?,
        up: b.slice_rows(&s.up, start, m)?,
    })
}

/// `∂s/∂x_L` `[1, D]` for the target's raw logit at the row whose final residual is `x_last`
/// (every other row's gradient is zero).
fn seed<B: Backend>(b: &B, llm: &Llama<B>, x_last: &B::Tensor, target: u32) -> Result<B::Tensor> {
    if target as usize >= llm.cfg.vocab_size {
        return Err(Error::input(format!(
            "target id {target} is outside the vocabulary"
        )));
    }
    let w_row = b.slice_rows(&llm.lm_head, target as usize, 1)?;
    b.rms_norm_bwd(x_last, &llm.norm, &w_row, llm.cfg.rms_norm_eps as f32)
}

/// Backward through a layer's MLP half, `x_out = x_mid + down(silu(gate) ⊙ up)` with
/// `gate/up = W · rms(x_mid)`: `∂s/∂x_mid` from `∂s/∂x_out`, for the rows `s` holds.
fn mlp_backward<B: Backend>(
    b: &B,
    l: &LlamaLayer<B>,
    s: &SavedLayer<B>,
    dx: &B::Tensor,
    eps: f32,
) -> Result<B::Tensor> {
    let dg = b.linear_bwd(dx, &l.down)?;
    let (dgate, dup) = b.silu_mul_bwd(&s.gate, &s.up, &dg)?;
    let dh = b.add(&b.linear_bwd(&dgate, &l.gate)?, &b.linear_bwd(&dup, &l.up)?)?;
    b.add(dx, &b.rms_norm_bwd(&s.x_mid, &l.mlp_norm, &dh, eps)?)
}

/// Causal attention geometry for `m` query rows at positions `pos0 ..` over keys `0 .. pos0 + m`.
fn attn_shape(t: &TextConfig, pos0: usize, m: usize) -> AttnShape {
    AttnShape {
        n_heads: t.num_attention_heads,
        n_kv_heads: t.num_key_value_heads,
        head_dim: t.head_dim,
        causal_q_pos0: Some(pos0),
        kv_len: pos0 + m,
    }
}

/// The top layer of an exact backward for the token at position `p`, where the incoming gradient
/// `d_last` is non-zero in row p only: the MLP, the output projection, the query path and the
/// attention rows run on that one row, and only keys and values carry gradient to every position
/// `0 ..= p`. The same numbers as [`layer_backward`] over all rows, at a fraction of the work.
/// Returns `∂s/∂x_in` `[p+1, D]` and row p of the layer's cam `[1, p+1]` when asked (the other
/// rows of this layer's cam are zero).
fn top_layer_backward<B: Backend>(
    b: &B,
    llm: &Llama<B>,
    saved: &Saved<B>,
    cache: &KvCache<B>,
    p: usize,
    d_last: &B::Tensor,
    cam: Option<Cam>,
) -> Result<(B::Tensor, Option<B::Tensor>)> {
    let t = &llm.cfg;
    let li = llm.layers.len() - 1;
    let l = &llm.layers[li];
    let eps = t.rms_norm_eps as f32;
    let theta = t.rope_theta as f32;
    let n = p + 1;
    let s = layer_rows(b, &saved.layers[li], p, 1)?;
    let dx_mid = mlp_backward(b, l, &s, d_last, eps)?;
    let da = b.linear_bwd(&dx_mid, &l.o)?;
    let g = b.attention_bwd(
        &s.q,
        &cache.k[li],
        &cache.v[li],
        &da,
        attn_shape(t, p, 1),
        cam,
    )?;
    let dq = b.rope_bwd(&g.dq, t.head_dim, p, theta)?;
    let dk = b.rope_bwd(&g.dk, t.head_dim, 0, theta)?;
    let mut dh = b.add(&b.linear_bwd(&dk, &l.k)?, &b.linear_bwd(&g.dv, &l.v)?)?;
    let dh_p = b.add(&b.slice_rows(&dh, p, 1)?, &b.linear_bwd(&dq, &l.q)?)?;
    b.copy_rows_into(&mut dh, p, &dh_p)?;
    let x_in = b.slice_rows(&saved.layers[li].x_in, 0, n)?;
    let mut dx = b.rms_norm_bwd(&x_in, &l.attn_norm, &dh, eps)?;
    let dx_p = b.add(&b.slice_rows(&dx, p, 1)?, &dx_mid)?;
    b.copy_rows_into(&mut dx, p, &dx_p)?;
    Ok((dx, g.cam))
}

/// Backward through decoder layer `li` for rows at positions `pos0 .. pos0 + m` (the rows `s` and
/// `dx` hold). Keys and values of positions before `pos0` are constants (the cache); those of the
/// rows themselves get their gradient. Returns `∂s/∂x_in` `[m, D]` and the cam rows
/// `[m, pos0 + m]` when asked.
fn layer_backward<B: Backend>(
    b: &B,
    llm: &Llama<B>,
    li: usize,
    s: &SavedLayer<B>,
    cache: &KvCache<B>,
    pos0: usize,
    dx: &B::Tensor,
    cam: Option<Cam>,
) -> Result<(B::Tensor, Option<B::Tensor>)> {
    let t = &llm.cfg;
    let l = &llm.layers[li];
    let eps = t.rms_norm_eps as f32;
    let theta = t.rope_theta as f32;
    let (m, _) = b.dims(dx);
    let dx_mid = mlp_backward(b, l, s, dx, eps)?;
    // Attention: x_mid = x_in + o(attn(rope(q), rope(k), v)), q/k/v = W · rms(x_in).
    let da = b.linear_bwd(&dx_mid, &l.o)?;
    let shape = attn_shape(t, pos0, m);
    let g = b.attention_bwd(&s.q, &cache.k[li], &cache.v[li], &da, shape, cam)?;
    let (dk, dv) = if pos0 == 0 {
        (g.dk, g.dv)
    } else {
        (b.slice_rows(&g.dk, pos0, m)?, b.slice_rows(&g.dv, pos0, m)?)
    };
    let dq = b.rope_bwd(&g.dq, t.head_dim, pos0, theta)?;
    let dk = b.rope_bwd(&dk, t.head_dim, pos0, theta)?;
    let dh = b.add(
        &b.add(&b.linear_bwd(&dq, &l.q)?, &b.linear_bwd(&dk, &l.k)?)?,
        &b.linear_bwd(&dv, &l.v)?,
    )?;
    let dx_in = b.add(&dx_mid, &b.rms_norm_bwd(&s.x_in, &l.attn_norm, &dh, eps)?)?;
    Ok((dx_in, g.cam))
}

fn check_saved<'a, B: Backend>(
    saved: &'a Saved<B>,
    cache: &KvCache<B>,
    p: usize,
) -> Result<&'a B::Tensor> {
    if saved.pos0 != 0 {
        return Err(Error::input(
            "the exact backward needs a saving forward from position 0",
        ));
    }
    if p >= cache.len {
        return Err(Error::input(format!(
            "position {p} is past the {} positions of the saved forward",
            cache.len
        )));
    }
    saved
        .x_out
        .as_ref()
        .ok_or_else(|| Error::input("the saved forward is incomplete"))
}

/// Exact relevance row of the token `target` produced at position `p`, from a saving forward over
/// at least `p + 1` positions starting at 0.
pub fn chefer_row<B: Backend>(
    b: &B,
    llm: &Llama<B>,
    saved: &Saved<B>,
    cache: &KvCache<B>,
    p: usize,
    target: u32,
    mode: RowMode,
    keep_cams: bool,
) -> Result<Relevance> {
    let x_out = check_saved(saved, cache, p)?;
    let n = p + 1;
    let no_cam = || Error::Backend("attention_bwd returned no cam".into());
    let d_last = seed(b, llm, &b.slice_rows(x_out, p, 1)?, target)?;
    let top = llm.layers.len() - 1;
    let (mut dx, cam_p) = top_layer_backward(b, llm, saved, cache, p, &d_last, Some(Cam::Chefer))?;
    let cam_p = cam_p.ok_or_else(no_cam)?;
    // v = e_p; the top layer's cam is zero outside row p, so v + v·C_top = e_p + C_top[p].
    let mut e_p = vec![0.0f32; n];
    e_p[p] = 1.0;
    let mut v = b.add(&b.upload(&e_p, 1, n)?, &cam_p)?;
    let mut cams: Vec<Option<B::Tensor>> = (0..llm.layers.len()).map(|_| None).collect();
    if mode == RowMode::FullR || keep_cams {
        let mut full = b.zeros(n, n)?;
        b.copy_rows_into(&mut full, p, &cam_p)?;
        cams[top] = Some(full);
    }
    for li in (0..top).rev() {
        let s = layer_rows(b, &saved.layers[li], 0, n)?;
        let (d, cam) = layer_backward(b, llm, li, &s, cache, 0, &dx, Some(Cam::Chefer))?;
        dx = d;
        let cam = cam.ok_or_else(no_cam)?;
        if mode == RowMode::Streamed {
            v = b.add(&v, &b.matmul(&v, &cam)?)?;
        }
        if mode == RowMode::FullR || keep_cams {
            cams[li] = Some(cam);
        }
    }
    let row = match mode {
        RowMode::Streamed => b.download(&v)?,
        RowMode::FullR => {
            // R = (I + C_{L-1}) … (I + C_0), built from the right as the paper's baseline does.
            let mut eye = vec![0.0f32; n * n];
            (0..n).for_each(|i| eye[i * n + i] = 1.0);
            let mut r = b.upload(&eye, n, n)?;
            for cam in cams.iter().flatten() {
                r = b.add(&r, &b.matmul(cam, &r)?)?;
            }
            b.download(&b.slice_rows(&r, p, 1)?)?
        }
    };
    let cams = if keep_cams {
        cams.iter()
            .flatten()
            .map(|c| b.download(c))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    Ok(Relevance { row, cams })
}

/// GradCAM row (over positions `0 ..= p`) at decoder layer `layer` for the token `target` produced
/// at position `p`. The backward stops at that layer.
pub fn gradcam_row<B: Backend>(
    b: &B,
    llm: &Llama<B>,
    saved: &Saved<B>,
    cache: &KvCache<B>,
    p: usize,
    target: u32,
    layer: usize,
) -> Result<Vec<f32>> {
    let n_layers = llm.layers.len();
    if layer >= n_layers {
        return Err(Error::input(format!(
            "GradCAM layer {layer} does not exist: the decoder has layers 0..{}",
            n_layers - 1
        )));
    }
    let x_out = check_saved(saved, cache, p)?;
    let n = p + 1;
    let d_last = seed(b, llm, &b.slice_rows(x_out, p, 1)?, target)?;
    let top = n_layers - 1;
    let cam = (layer == top).then_some(Cam::GradCam);
    let (mut dx, c) = top_layer_backward(b, llm, saved, cache, p, &d_last, cam)?;
    if let Some(c) = c {
        return b.download(&c);
    }
    for li in (layer..top).rev() {
        let s = layer_rows(b, &saved.layers[li], 0, n)?;
        let cam = (li == layer).then_some(Cam::GradCam);
        let (d, c) = layer_backward(b, llm, li, &s, cache, 0, &dx, cam)?;
        if let Some(c) = c {
            return b.download(&b.slice_rows(&c, p, 1)?);
        }
        dx = d;
    }
    unreachable!("the loop returns at `layer`")
}

/// The LVLM-Interpret relevancy, built up during generation. Each layer keeps a growing, lower
/// triangular cam matrix `Ĉ_l`: its prompt rows come from the first token's exact backward (over
/// the whole prompt); the row of each later position `p_k` comes from token k's own single-row
/// backward through its decode step, with the KV cache of earlier positions held constant (so no
/// gradient reaches earlier rows — the variant's defining approximation). The map of token k is row
/// `p_k` of `(I + Ĉ_{L-1}) … (I + Ĉ_0)`. Token 0's map therefore equals the exact one; each later
/// token costs about one decode step of backward plus an O(L·n²) fold on the host.
pub struct Incremental {
    /// Per layer, row-major `[capacity, capacity]`; rows beyond `len` are unused.
    cams: Vec<Vec<f32>>,
    capacity: usize,
    len: usize,
}

impl Incremental {
    /// Starts from the first generated token: `saved`/`cache` come from the saving prefill over the
    /// `n` prompt positions, `target` is the first generated id. Returns the tracker and the first
    /// token's row over positions `0 .. n`.
    pub fn start<B: Backend>(
        b: &B,
        llm: &Llama<B>,
        saved: &Saved<B>,
        cache: &KvCache<B>,
        target: u32,
        capacity: usize,
    ) -> Result<(Self, Vec<f32>)> {
        let n = cache.len;
        if capacity < n {
            return Err(Error::input(
                "incremental relevancy capacity is below the prompt length",
            ));
        }
        let r = chefer_row(b, llm, saved, cache, n - 1, target, RowMode::Streamed, true)?;
        let mut cams = vec![vec![0.0f32; capacity * capacity]; llm.layers.len()];
        for (dst, src) in cams.iter_mut().zip(&r.cams) {
            for i in 0..n {
                dst[i * capacity..i * capacity + n].copy_from_slice(&src[i * n..(i + 1) * n]);
            }
        }
        Ok((
            Incremental {
                cams,
                capacity,
                len: n,
            },
            r.row,
        ))
    }

    /// Token produced by a decode step that ran one row at position `p = len` with a saving
    /// forward (`saved.pos0 == p`, the cache holding `p + 1` positions): adds row p to every `Ĉ_l`
    /// and returns the token's relevance row over positions `0 ..= p`.
    pub fn step<B: Backend>(
        &mut self,
        b: &B,
        llm: &Llama<B>,
        saved: &Saved<B>,
        cache: &KvCache<B>,
        target: u32,
    ) -> Result<Vec<f32>> {
        let p = self.len;
        if saved.pos0 != p || cache.len != p + 1 || p >= self.capacity {
            return Err(Error::input(format!(
                "incremental step expects one new row at position {p} (saved from {}, cache {}, capacity {})",
                saved.pos0, cache.len, self.capacity
            )));
        }
        let x_out = saved
            .x_out
            .as_ref()
            .ok_or_else(|| Error::input("the saved decode step is incomplete"))?;
        let mut dx = seed(b, llm, x_out, target)?;
        let c = self.capacity;
        for li in (0..llm.layers.len()).rev() {
            let (d, cam) = layer_backward(
                b,
                llm,
                li,
                &saved.layers[li],
                cache,
                p,
                &dx,
                Some(Cam::Chefer),
            )?;
            dx = d;
            let cam = b.download(
                &cam.ok_or_else(|| Error::Backend("attention_bwd returned no cam".into()))?,
            )?;
            self.cams[li][p * c..p * c + p + 1].copy_from_slice(&cam);
        }
        self.len = p + 1;
        Ok(self.row(p))
    }

    /// Number of positions whose rows are in (the prompt plus every explained later token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Forgets the rows of positions `len ..` so they can be recomputed (benches re-run one step).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Row `p` of `(I + Ĉ_{L-1}) … (I + Ĉ_0)`: `v = e_p; v += v·Ĉ_l` from the top layer down.
    /// `v` is zero beyond `p` and `Ĉ_l` is lower triangular, so only the leading block is touched.
    fn row(&self, p: usize) -> Vec<f32> {
        let c = self.capacity;
        let mut v = vec![0.0f32; p + 1];
        v[p] = 1.0;
        for cam in self.cams.iter().rev() {
            let mut add = vec![0.0f32; p + 1];
            for (i, &vi) in v.iter().enumerate() {
                if vi != 0.0 {
                    for (a, &x) in add.iter_mut().zip(&cam[i * c..i * c + p + 1]) {
                        *a += vi * x;
                    }
                }
            }
            v.iter_mut().zip(&add).for_each(|(a, b)| *a += b);
        }
        v
    }
}
