//! The decoder's activation backward, beside its forward in `llama.rs`: gradients of one scalar
//! target (a generated token's raw logit) with respect to the activations only — never the weights
//! — from the top layer down, each attention backward optionally yielding its layer's cam
//! ([`Cam`]). The relevancy methods in `crate::explain::baseline` are built from these.
//!
//! Every function reads what a saving forward kept ([`Saved`]: per layer the residual stream before
//! attention and before the MLP, the rotated queries, the MLP's gate and up) and the KV cache (keys
//! and values of every position).

use crate::backend::{AttnShape, Backend, Cam};
use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::model::kv::SeqKv;
use crate::model::llama::{Llama, LlamaLayer, Saved, SavedLayer};

/// Rows of one layer's saved activations: the stored tensors themselves when all their rows are
/// wanted, else copies of the wanted rows (the op set has no borrowed row views).
enum Rows<'a, B: Backend> {
    Whole(&'a SavedLayer<B>),
    Part(SavedLayer<B>),
}

impl<B: Backend> std::ops::Deref for Rows<'_, B> {
    type Target = SavedLayer<B>;
    fn deref(&self) -> &SavedLayer<B> {
        match self {
            Rows::Whole(s) => s,
            Rows::Part(s) => s,
        }
    }
}

/// Rows of positions `pos .. pos + m` of layer `li` in `saved`.
fn layer_rows<'a, B: Backend>(
    b: &B,
    saved: &'a Saved<B>,
    li: usize,
    pos: usize,
    m: usize,
) -> Result<Rows<'a, B>> {
    let s = saved
        .layers
        .get(li)
        .ok_or_else(|| Error::input("the saved forward is incomplete"))?;
    if pos < saved.pos0 || pos + m > saved.pos0 + saved.len {
        return Err(Error::input(format!(
            "positions {pos}..{} are not in the saved forward (positions {}..{})",
            pos + m,
            saved.pos0,
            saved.pos0 + saved.len
        )));
    }
    let start = pos - saved.pos0;
    if start == 0 && b.dims(&s.x_in).0 == m {
        return Ok(Rows::Whole(s));
    }
    Ok(Rows::Part(SavedLayer {
        x_in: b.slice_rows(&s.x_in, start, m)?,
        q: b.slice_rows(&s.q, start, m)?,
        x_mid: b.slice_rows(&s.x_mid, start, m)?,
        gate: b.slice_rows(&s.gate, start, m)?,
        up: b.slice_rows(&s.up, start, m)?,
    }))
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

impl<B: Backend> Llama<B> {
    /// The final residual stream at position `p` (input of the final norm), from a saving forward.
    pub fn saved_output(&self, b: &B, saved: &Saved<B>, p: usize) -> Result<B::Tensor> {
        let x_out = saved
            .x_out
            .as_ref()
            .ok_or_else(|| Error::input("the saved forward is incomplete"))?;
        if p < saved.pos0 || p >= saved.pos0 + saved.len {
            return Err(Error::input(format!(
                "position {p} is not in the saved forward (positions {}..{})",
                saved.pos0,
                saved.pos0 + saved.len
            )));
        }
        b.slice_rows(x_out, p - saved.pos0, 1)
    }

    /// `∂s/∂x_L` `[1, D]` for the raw logit of `target` at the row whose final residual is
    /// `x_last` (every other row's gradient is zero).
    pub fn backward_seed(&self, b: &B, x_last: &B::Tensor, target: u32) -> Result<B::Tensor> {
        if target as usize >= self.cfg.vocab_size {
            return Err(Error::input(format!(
                "target id {target} is outside the vocabulary"
            )));
        }
        let w_row = b.slice_rows(&self.lm_head, target as usize, 1)?;
        b.rms_norm_bwd(x_last, &self.norm, &w_row, self.cfg.rms_norm_eps as f32)
    }

    /// The top layer of a backward for the token at position `p`, where the incoming gradient
    /// `d_last` is non-zero in row p only: the MLP, the output projection, the query path and the
    /// attention rows run on that one row, and only keys and values carry gradient to every
    /// position `0 ..= p`. The same numbers as [`Self::backward_layer`] over all rows, at a fraction
    /// of the work. `saved` must start at position 0. Returns `∂s/∂x_in` `[p+1, D]` and row p of
    /// the layer's cam `[1, p+1]` when asked (the other rows of this layer's cam are zero).
    pub fn backward_top(
        &self,
        b: &B,
        saved: &Saved<B>,
        cache: &SeqKv<'_, B>,
        p: usize,
        d_last: &B::Tensor,
        cam: Option<Cam>,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        let t = &self.cfg;
        let li = self.layers.len() - 1;
        let l = &self.layers[li];
        let eps = t.rms_norm_eps as f32;
        let theta = t.rope_theta as f32;
        let n = p + 1;
        let s = layer_rows(b, saved, li, p, 1)?;
        let dx_mid = mlp_backward(b, l, &s, d_last, eps)?;
        let da = b.linear_bwd(&dx_mid, &l.o)?;
        let (k, v) = cache.layer(b, li, n)?;
        let g = b.attention_bwd(&s.q, &k, &v, &da, attn_shape(t, p, 1), cam)?;
        let dq = b.rope_bwd(&g.dq, t.head_dim, p, theta)?;
        let dk = b.rope_bwd(&g.dk, t.head_dim, 0, theta)?;
        let mut dh = b.add(&b.linear_bwd(&dk, &l.k)?, &b.linear_bwd(&g.dv, &l.v)?)?;
        let dh_p = b.add(&b.slice_rows(&dh, p, 1)?, &b.linear_bwd(&dq, &l.q)?)?;
        b.copy_rows_into(&mut dh, p, &dh_p)?;
        let x_in = layer_rows(b, saved, li, 0, n)?;
        let mut dx = b.rms_norm_bwd(&x_in.x_in, &l.attn_norm, &dh, eps)?;
        let dx_p = b.add(&b.slice_rows(&dx, p, 1)?, &dx_mid)?;
        b.copy_rows_into(&mut dx, p, &dx_p)?;
        Ok((dx, g.cam))
    }

    /// Backward through decoder layer `li` for the `m` rows at positions `pos0 .. pos0 + m` (the
    /// rows `dx` holds; `saved` must hold them). Keys and values of positions before `pos0` are
    /// constants (the cache); those of the rows themselves get their gradient. Returns `∂s/∂x_in`
    /// `[m, D]` and the cam rows `[m, pos0 + m]` when asked.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_layer(
        &self,
        b: &B,
        li: usize,
        saved: &Saved<B>,
        cache: &SeqKv<'_, B>,
        pos0: usize,
        dx: &B::Tensor,
        cam: Option<Cam>,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        let t = &self.cfg;
        let l = &self.layers[li];
        let eps = t.rms_norm_eps as f32;
        let theta = t.rope_theta as f32;
        let (m, _) = b.dims(dx);
        let s = layer_rows(b, saved, li, pos0, m)?;
        let dx_mid = mlp_backward(b, l, &s, dx, eps)?;
        // Attention: x_mid = x_in + o(attn(rope(q), rope(k), v)), q/k/v = W · rms(x_in).
        let da = b.linear_bwd(&dx_mid, &l.o)?;
        let shape = attn_shape(t, pos0, m);
        let (k, v) = cache.layer(b, li, pos0 + m)?;
        let g = b.attention_bwd(&s.q, &k, &v, &da, shape, cam)?;
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
}
