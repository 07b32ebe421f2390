//! Gradient relevancy by our own activation backward through the decoder.
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

use crate::backend::{Backend, Cam};
use crate::error::{Error, Result};
use crate::model::kv::SeqKv;
use crate::model::llama::{Llama, Saved};

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

/// The saved forward must start at position 0 and reach `p`.
fn check_saved<B: Backend>(saved: &Saved<B>, p: usize) -> Result<()> {
    if saved.pos0 != 0 {
        return Err(Error::input(
            "the exact backward needs a saving forward from position 0",
        ));
    }
    if p >= saved.len {
        return Err(Error::input(format!(
            "position {p} is past the {} positions of the saved forward",
            saved.len
        )));
    }
    Ok(())
}

/// Exact relevance row of the token `target` produced at position `p`, from a saving forward over
/// at least `p + 1` positions starting at 0.
pub fn chefer_row<B: Backend>(
    b: &B,
    llm: &Llama<B>,
    saved: &Saved<B>,
    cache: &SeqKv<'_, B>,
    p: usize,
    target: u32,
    mode: RowMode,
    keep_cams: bool,
) -> Result<Relevance> {
    check_saved(saved, p)?;
    let n = p + 1;
    let no_cam = || Error::Backend("attention_bwd returned no cam".into());
    let d_last = llm.backward_seed(b, &llm.saved_output(b, saved, p)?, target)?;
    let top = llm.layers.len() - 1;
    let (mut dx, cam_p) = llm.backward_top(b, saved, cache, p, &d_last, Some(Cam::Chefer))?;
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
        let (d, cam) = llm.backward_layer(b, li, saved, cache, 0, &dx, Some(Cam::Chefer))?;
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
    cache: &SeqKv<'_, B>,
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
    check_saved(saved, p)?;
    let d_last = llm.backward_seed(b, &llm.saved_output(b, saved, p)?, target)?;
    let top = n_layers - 1;
    let cam = (layer == top).then_some(Cam::GradCam);
    let (mut dx, c) = llm.backward_top(b, saved, cache, p, &d_last, cam)?;
    if let Some(c) = c {
        return b.download(&c);
    }
    for li in (layer..top).rev() {
        let cam = (li == layer).then_some(Cam::GradCam);
        let (d, c) = llm.backward_layer(b, li, saved, cache, 0, &dx, cam)?;
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
    /// Starts from the first generated token: `saved`/`cache` come from a saving forward from
    /// position 0 over at least the `n` prompt positions, `target` is the first generated id.
    /// Returns the tracker and the first token's row over positions `0 .. n`.
    pub fn start<B: Backend>(
        b: &B,
        llm: &Llama<B>,
        saved: &Saved<B>,
        cache: &SeqKv<'_, B>,
        n: usize,
        target: u32,
        capacity: usize,
    ) -> Result<(Self, Vec<f32>)> {
        if n == 0 || capacity < n {
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

    /// Token produced by the decode step at position `p = len`, whose saved activations `saved`
    /// holds (the step's own, or a whole sequence's), the cache holding at least `p + 1` positions
    /// (later ones are not read): adds row p to every `Ĉ_l` and returns the token's relevance row
    /// over positions `0 ..= p`.
    pub fn step<B: Backend>(
        &mut self,
        b: &B,
        llm: &Llama<B>,
        saved: &Saved<B>,
        cache: &SeqKv<'_, B>,
        target: u32,
    ) -> Result<Vec<f32>> {
        let p = self.len;
        if p < saved.pos0 || p >= saved.pos0 + saved.len || cache.len <= p || p >= self.capacity {
            return Err(Error::input(format!(
                "incremental step expects one new row at position {p} (saved from {}, cache {}, capacity {})",
                saved.pos0, cache.len, self.capacity
            )));
        }
        let mut dx = llm.backward_seed(b, &llm.saved_output(b, saved, p)?, target)?;
        let c = self.capacity;
        for li in (0..llm.layers.len()).rev() {
            let (d, cam) = llm.backward_layer(b, li, saved, cache, p, &dx, Some(Cam::Chefer))?;
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

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
