//! The Llama decoder with a KV cache. One `forward` serves prefill (many rows) and decode (one
//! row): rows are positions `pos0 .. pos0 + n`, keys and values are appended to the cache at those
//! positions, and attention runs over the cache's first `pos0 + n` rows with a causal offset.

use super::WeightSource;
use crate::backend::{with_memory_tag, AttnShape, Backend, MemTag};
use crate::config::{LlavaConfig, TextConfig};
use crate::error::{Error, Result};

pub struct LlamaLayer<B: Backend> {
    pub attn_norm: B::Tensor,
    pub q: B::Tensor,
    pub k: B::Tensor,
    pub v: B::Tensor,
    pub o: B::Tensor,
    pub mlp_norm: B::Tensor,
    pub gate: B::Tensor,
    pub up: B::Tensor,
    pub down: B::Tensor,
}

pub struct Llama<B: Backend> {
    pub cfg: TextConfig,
    pub embed: B::Tensor,
    pub layers: Vec<LlamaLayer<B>>,
    pub norm: B::Tensor,
    pub lm_head: B::Tensor,
}

/// Keys and values of every layer for positions `0 .. len`, with room for `capacity` positions.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Tensor>,
    pub v: Vec<B::Tensor>,
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(b: &B, cfg: &TextConfig, capacity: usize) -> Result<Self> {
        let w = cfg.num_key_value_heads * cfg.head_dim;
        let mut k = Vec::new();
        let mut v = Vec::new();
        with_memory_tag(b, MemTag::KvCache, || -> Result<()> {
            for _ in 0..cfg.num_hidden_layers {
                k.push(b.zeros(capacity, w)?);
                v.push(b.zeros(capacity, w)?);
            }
            Ok(())
        })?;
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }
}

/// Activations of one decoder layer kept for the backward, all `[m, ·]` over the positions the
/// saving forward ran.
pub struct SavedLayer<B: Backend> {
    /// Residual stream entering the layer (input of the attention RMSNorm).
    pub x_in: B::Tensor,
    /// Queries after RoPE.
    pub q: B::Tensor,
    /// Residual stream after attention (input of the MLP RMSNorm).
    pub x_mid: B::Tensor,
    pub gate: B::Tensor,
    pub up: B::Tensor,
}

/// Everything a saving forward kept for positions `pos0 ..`: per layer, plus the final residual
/// stream (input of the final norm).
pub struct Saved<B: Backend> {
    pub pos0: usize,
    pub layers: Vec<SavedLayer<B>>,
    pub x_out: Option<B::Tensor>,
}

impl<B: Backend> Saved<B> {
    /// Bytes the saved activations occupy at f32 (what the backward holds beyond the forward).
    pub fn f32_bytes(&self, b: &B) -> usize {
        let size = |t: &B::Tensor| {
            let (r, c) = b.dims(t);
            r * c * 4
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| size(&l.x_in) + size(&l.q) + size(&l.x_mid) + size(&l.gate) + size(&l.up))
            .sum();
        layers + self.x_out.as_ref().map_or(0, size)
    }
}

const PREFIX: &str = "language_model.model";

impl<B: Backend> Llama<B> {
    pub fn load(b: &B, src: &dyn WeightSource<B>, cfg: &LlavaConfig) -> Result<Self> {
        let t = cfg.text.clone();
        let (d, hd) = (t.hidden_size, t.head_dim);
        let (qd, kvd, ff) = (
            t.num_attention_heads * hd,
            t.num_key_value_heads * hd,
            t.intermediate_size,
        );
        let mat = |name: &str, r: usize, c: usize| src.get(b, name, &[r, c], r, c);
        let vec = |name: &str, n: usize| src.get(b, name, &[n], 1, n);
        let mut layers = Vec::new();
        for l in 0..t.num_hidden_layers {
            let n = |s: &str| format!("{PREFIX}.layers.{l}.{s}");
            layers.push(LlamaLayer {
                attn_norm: vec(&n("input_layernorm.weight"), d)?,
                q: mat(&n("self_attn.q_proj.weight"), qd, d)?,
                k: mat(&n("self_attn.k_proj.weight"), kvd, d)?,
                v: mat(&n("self_attn.v_proj.weight"), kvd, d)?,
                o: mat(&n("self_attn.o_proj.weight"), d, qd)?,
                mlp_norm: vec(&n("post_attention_layernorm.weight"), d)?,
                gate: mat(&n("mlp.gate_proj.weight"), ff, d)?,
                up: mat(&n("mlp.up_proj.weight"), ff, d)?,
                down: mat(&n("mlp.down_proj.weight"), d, ff)?,
            });
        }
        Ok(Llama {
            embed: mat(&format!("{PREFIX}.embed_tokens.weight"), t.vocab_size, d)?,
            norm: vec(&format!("{PREFIX}.norm.weight"), d)?,
            lm_head: mat("language_model.lm_head.weight", t.vocab_size, d)?,
            layers,
            cfg: t,
        })
    }

    /// Runs the decoder on input embeddings `x` `[n, D]` at positions `cache.len ..`, appending to
    /// the cache. Returns the last hidden states after the final RMSNorm, `[n, D]`.
    pub fn forward(&self, b: &B, x: B::Tensor, cache: &mut KvCache<B>) -> Result<B::Tensor> {
        self.forward_impl(b, x, cache, None, None)
    }

    /// [`Self::forward`] with some cache positions hidden from attention: position `j`'s key and
    /// value are invisible to every query of every layer when `key_keep[j]` is false
    /// ([`Backend::attention_masked`]). The hidden positions still run through the layers (their
    /// own rows are computed and cached as usual); nothing reads them. `key_keep` must cover
    /// positions `0 .. cache.len + n` (one mask sized to the cache's capacity serves the prefill
    /// and every decode step). The perturbation tests of `fastrm eval` remove image patches this
    /// way.
    pub fn forward_masked(
        &self,
        b: &B,
        x: B::Tensor,
        cache: &mut KvCache<B>,
        key_keep: &[bool],
    ) -> Result<B::Tensor> {
        self.forward_impl(b, x, cache, None, Some(key_keep))
    }

    /// [`Self::forward`] that also keeps what the activation backward needs (DESIGN §4): per layer
    /// the residual stream before attention and before the MLP, the rotated queries, and the MLP's
    /// gate and up projections, for the rows this call runs; keys and values stay in the cache.
    pub fn forward_saving(
        &self,
        b: &B,
        x: B::Tensor,
        cache: &mut KvCache<B>,
    ) -> Result<(B::Tensor, Saved<B>)> {
        let mut saved = Saved {
            pos0: cache.len,
            layers: Vec::with_capacity(self.layers.len()),
            x_out: None,
        };
        let h = self.forward_impl(b, x, cache, Some(&mut saved), None)?;
        Ok((h, saved))
    }

    fn forward_impl(
        &self,
        b: &B,
        x: B::Tensor,
        cache: &mut KvCache<B>,
        mut save: Option<&mut Saved<B>>,
        key_keep: Option<&[bool]>,
    ) -> Result<B::Tensor> {
        let t = &self.cfg;
        let (n, _) = b.dims(&x);
        let pos0 = cache.len;
        if pos0 + n > cache.capacity {
            return Err(Error::input(format!(
                "sequence of {} positions exceeds the KV cache capacity of {}",
                pos0 + n,
                cache.capacity
            )));
        }
        let eps = t.rms_norm_eps as f32;
        let theta = t.rope_theta as f32;
        let shape = AttnShape {
            n_heads: t.num_attention_heads,
            n_kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            causal_q_pos0: Some(pos0),
            kv_len: pos0 + n,
        };
        let mut x = x;
        for (li, l) in self.layers.iter().enumerate() {
            let h = b.rms_norm(&x, &l.attn_norm, eps)?;
            let q = b.rope(&b.linear(&h, &l.q, None)?, t.head_dim, pos0, theta)?;
            let k = b.rope(&b.linear(&h, &l.k, None)?, t.head_dim, pos0, theta)?;
            let v = b.linear(&h, &l.v, None)?;
            b.copy_rows_into(&mut cache.k[li], pos0, &k)?;
            b.copy_rows_into(&mut cache.v[li], pos0, &v)?;
            let a = match key_keep {
                None => b.attention(&q, &cache.k[li], &cache.v[li], shape)?,
                Some(keep) => b.attention_masked(&q, &cache.k[li], &cache.v[li], shape, keep)?,
            };
            let x_mid = b.add(&x, &b.linear(&a, &l.o, None)?)?;
            let h = b.rms_norm(&x_mid, &l.mlp_norm, eps)?;
            let gate = b.linear(&h, &l.gate, None)?;
            let up = b.linear(&h, &l.up, None)?;
            let g = b.silu_mul(&gate, &up)?;
            let x_out = b.add(&x_mid, &b.linear(&g, &l.down, None)?)?;
            let x_in = std::mem::replace(&mut x, x_out);
            if let Some(s) = save.as_deref_mut() {
                s.layers.push(SavedLayer {
                    x_in,
                    q,
                    x_mid,
                    gate,
                    up,
                });
            }
        }
        cache.len = pos0 + n;
        let out = b.rms_norm(&x, &self.norm, eps)?;
        if let Some(s) = save {
            s.x_out = Some(x);
        }
        Ok(out)
    }

    pub fn logits(&self, b: &B, hidden: &B::Tensor) -> Result<B::Tensor> {
        b.linear(hidden, &self.lm_head, None)
    }
}
