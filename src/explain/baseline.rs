//! The gradient baseline (Chefer et al., DESIGN §4): for a generated token t produced at position
//! p, backward from its raw logit `s = logits[p, y_t]` through the decoder (activation gradients
//! only, stopping at layer 0's input), taking each layer's cam `C_l = mean_h max(0, ∂s/∂A_l ⊙ A_l)`
//! and the last row of `R = (I + C_{L-1}) … (I + C_0)`.
//!
//! Only row p of R is needed, and it can be folded in as the backward reaches each layer:
//! `v = e_p; for l = L-1 … 0: v = v + v·C_l`, which is O(L·n²) and never holds more than one cam.
//! [`RowMode::FullR`] instead keeps every `C_l` and multiplies out the full `n×n` R, as the paper's
//! baseline does, so its cost can be reproduced; both give the same row.
//!
//! The backward runs over positions `0 ..= p` only: causality makes every later position irrelevant
//! to `s`, and the saved activations of a forward over a longer sequence are, row for row, those of
//! the shorter one.

use crate::backend::{AttnShape, Backend, Cam};
use crate::error::{Error, Result};
use crate::model::llama::{KvCache, Llama, Saved};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowMode {
    /// Fold each cam into the relevance row as soon as it exists (default).
    Streamed,
    /// Keep every layer's cam and materialise `R` (the paper's baseline; same result, more cost).
    FullR,
}

/// One backward's products: the relevance row over positions `0 ..= p` and, when asked, every
/// layer's cam (index = layer).
pub struct Relevance {
    pub row: Vec<f32>,
    pub cams: Vec<Vec<f32>>,
}

/// Relevance row of the token `target` produced at position `p`, from a forward over at least
/// `p + 1` positions (`saved` and `cache` from [`Llama::forward_saving`]).
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
    let t = &llm.cfg;
    let n = p + 1;
    if n > cache.len {
        return Err(Error::input(format!(
            "position {p} is past the {} positions of the saved forward",
            cache.len
        )));
    }
    if target as usize >= t.vocab_size {
        return Err(Error::input(format!(
            "target id {target} is outside the vocabulary"
        )));
    }
    let x_out = saved
        .x_out
        .as_ref()
        .ok_or_else(|| Error::input("the saved forward is incomplete"))?;
    let eps = t.rms_norm_eps as f32;
    let theta = t.rope_theta as f32;
    let d = t.hidden_size;

    // Seed: s = norm(x_L[p]) · lm_head[target], so ∂s/∂x_L is non-zero in row p only.
    let w_row = b.slice_rows(&llm.lm_head, target as usize, 1)?;
    let d_last = b.rms_norm_bwd(&b.slice_rows(x_out, p, 1)?, &llm.norm, &w_row, eps)?;
    let mut dx = b.zeros(n, d)?;
    b.copy_rows_into(&mut dx, p, &d_last)?;

    let mut e_p = vec![0.0f32; n];
    e_p[p] = 1.0;
    let mut v = b.upload(&e_p, 1, n)?;
    let mut cams: Vec<Option<B::Tensor>> = (0..llm.layers.len()).map(|_| None).collect();
    let shape = AttnShape {
        n_heads: t.num_attention_heads,
        n_kv_heads: t.num_key_value_heads,
        head_dim: t.head_dim,
        causal_q_pos0: Some(0),
        kv_len: n,
    };
    for (li, l) in llm.layers.iter().enumerate().rev() {
        let s = &saved.layers[li];
        let rows = |x: &B::Tensor| b.slice_rows(x, 0, n);
        // MLP: x_out = x_mid + down(silu(gate) ⊙ up), gate/up = W · rms(x_mid).
        let dg = b.linear_bwd(&dx, &l.down)?;
        let (dgate, dup) = b.silu_mul_bwd(&rows(&s.gate)?, &rows(&s.up)?, &dg)?;
        let dh = b.add(&b.linear_bwd(&dgate, &l.gate)?, &b.linear_bwd(&dup, &l.up)?)?;
        let dx_mid = b.add(
            &dx,
            &b.rms_norm_bwd(&rows(&s.x_mid)?, &l.mlp_norm, &dh, eps)?,
        )?;
        // Attention: x_mid = x_in + o(attn(rope(q), rope(k), v)), q/k/v = W · rms(x_in).
        let da = b.linear_bwd(&dx_mid, &l.o)?;
        let g = b.attention_bwd(
            &rows(&s.q)?,
            &cache.k[li],
            &cache.v[li],
            &da,
            shape,
            Some(Cam::Chefer),
        )?;
        let dq = b.rope_bwd(&g.dq, t.head_dim, 0, theta)?;
        let dk = b.rope_bwd(&g.dk, t.head_dim, 0, theta)?;
        let dh = b.add(
            &b.add(&b.linear_bwd(&dq, &l.q)?, &b.linear_bwd(&dk, &l.k)?)?,
            &b.linear_bwd(&g.dv, &l.v)?,
        )?;
        dx = b.add(
            &dx_mid,
            &b.rms_norm_bwd(&rows(&s.x_in)?, &l.attn_norm, &dh, eps)?,
        )?;

        let cam = g
            .cam
            .ok_or_else(|| Error::Backend("attention_bwd returned no cam".into()))?;
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
