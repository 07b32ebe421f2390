//! The FastRM head: LayerNorm → single-head attention scores → sigmoid.
//!
//! `u = LN(h_t)`, `q = W_q u + b_q`; keys `K_j = W_k LN(h_j) + b_k` over the image positions' last
//! hidden states (after the decoder's final norm); `z_j = q·K_j / √d`; `map = sigmoid(z)`.
//!
//! The keys are fixed once the prompt is prefilled, so they are folded into the query projection:
//! `P = K W_q` (`[n_patches, D]`) and `c = K b_q`, after which each decode step is one fused op,
//! [`crate::backend::Backend::fastrm_scores`] — LayerNorm of h_t, a GEMV with P, `+ c`, scale,
//! sigmoid — reading `n_patches·D` values instead of `D·d + n_patches·d`.
//!
//! The weights and their file (`head.safetensors`) are [`crate::checkpoint::head`].

use crate::backend::{with_memory_tag, Backend, MemTag};
use crate::error::{Error, Result};

pub use crate::checkpoint::head::{HeadConfig, HeadWeights, HIDDEN_STATE, MAX_HEAD_HEADER};

/// A head on a backend.
pub struct FastRmHead<B: Backend> {
    pub cfg: HeadConfig,
    // Crate-visible so training runs its forward and backward on the same device tensors.
    pub(crate) ln_w: B::Tensor,
    pub(crate) ln_b: B::Tensor,
    pub(crate) wq: B::Tensor,
    pub(crate) bq: B::Tensor,
    pub(crate) wk: B::Tensor,
    pub(crate) bk: B::Tensor,
}

/// The keys folded into the query projection for one prompt: `P = K·W_q` `[n_patches, D]` and
/// `c = K·b_q` `[1, n_patches]`.
pub struct Folded<B: Backend> {
    pub p: B::Tensor,
    pub c: B::Tensor,
}

impl<B: Backend> FastRmHead<B> {
    pub fn new(b: &B, w: &HeadWeights, model_hidden: usize) -> Result<Self> {
        let (dm, d) = (w.cfg.hidden_size, w.cfg.head_dim);
        if dm != model_hidden {
            return Err(Error::input(format!(
                "the head was made for hidden size {dm} but the model's is {model_hidden}"
            )));
        }
        Ok(FastRmHead {
            ln_w: b.upload(&w.ln_w, 1, dm)?,
            ln_b: b.upload(&w.ln_b, 1, dm)?,
            wq: b.upload(&w.wq, d, dm)?,
            bq: b.upload(&w.bq, 1, d)?,
            wk: b.upload(&w.wk, d, dm)?,
            bk: b.upload(&w.bk, 1, d)?,
            cfg: w.cfg.clone(),
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    /// Keys of the image positions' hidden states `[n_patches, D]`: `W_k·LN(h_j) + b_k` →
    /// `[n_patches, d]`.
    pub fn keys(&self, b: &B, image_hidden: &B::Tensor) -> Result<B::Tensor> {
        let u = b.layer_norm(
            image_hidden,
            &self.ln_w,
            &self.ln_b,
            self.cfg.layer_norm_eps,
        )?;
        b.linear(&u, &self.wk, Some(&self.bk))
    }

    /// The once-per-prefill fold.
    pub fn fold(&self, b: &B, image_hidden: &B::Tensor) -> Result<Folded<B>> {
        let k = self.keys(b, image_hidden)?;
        with_memory_tag(b, MemTag::Head, || {
            Ok(Folded {
                p: b.matmul(&k, &self.wq)?,
                c: b.linear(&self.bq, &k, None)?,
            })
        })
    }

    /// The per-token decode form: one fused op over the folded keys. `h` `[m, D]` → `[m, P]`.
    pub fn scores(&self, b: &B, folded: &Folded<B>, h: &B::Tensor) -> Result<B::Tensor> {
        let eps = self.cfg.layer_norm_eps;
        b.fastrm_scores(
            h,
            &self.ln_w,
            &self.ln_b,
            eps,
            &folded.p,
            &folded.c,
            self.scale(),
        )
    }

    /// The paper's unfolded formula per token, `sigmoid(q·Kᵀ/√d)` with `q = W_q·LN(h) + b_q` and
    /// `keys` from [`Self::keys`], the sigmoid on the host: the reference the folded form is tested
    /// and benchmarked against.
    pub fn scores_unfolded(&self, b: &B, keys: &B::Tensor, h: &B::Tensor) -> Result<Vec<f32>> {
        let k = keys;
        let u = b.layer_norm(h, &self.ln_w, &self.ln_b, self.cfg.layer_norm_eps)?;
        let q = b.linear(&u, &self.wq, Some(&self.bq))?;
        let z = b.linear(&q, k, None)?;
        let s = self.scale();
        Ok(b.download(&z)?
            .into_iter()
            .map(|v| 1.0 / (1.0 + (-s * v).exp()))
            .collect())
    }
}
