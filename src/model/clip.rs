//! CLIP ViT vision tower as LLaVA-1.5 uses it: patch embedding (a stride-p convolution, computed as
//! one GEMM over patch vectors), class token, position embedding, `pre_layrnorm`, pre-norm encoder
//! layers. Only the layers up to `vision_feature_layer` run; `post_layernorm` is never used.

use super::WeightSource;
use crate::backend::{AttnShape, Backend};
use crate::config::{LlavaConfig, VisionAct, VisionConfig};
use crate::error::{Error, Result};

pub struct ClipLayer<B: Backend> {
    ln1_w: B::Tensor,
    ln1_b: B::Tensor,
    q_w: B::Tensor,
    q_b: B::Tensor,
    k_w: B::Tensor,
    k_b: B::Tensor,
    v_w: B::Tensor,
    v_b: B::Tensor,
    o_w: B::Tensor,
    o_b: B::Tensor,
    ln2_w: B::Tensor,
    ln2_b: B::Tensor,
    fc1_w: B::Tensor,
    fc1_b: B::Tensor,
    fc2_w: B::Tensor,
    fc2_b: B::Tensor,
}

pub struct ClipVision<B: Backend> {
    pub cfg: VisionConfig,
    /// Conv weight `[D, 3, p, p]` viewed as `[D, 3·p·p]` (channel-major patch vectors).
    patch_w: B::Tensor,
    /// Position embedding with the class embedding folded into row 0: `[1 + P, D]`. The patch
    /// matrix gets a zero row 0, so one GEMM plus one add yields `[cls; patches] + pos`.
    pos_cls: B::Tensor,
    pre_ln_w: B::Tensor,
    pre_ln_b: B::Tensor,
    layers: Vec<ClipLayer<B>>,
}

const PREFIX: &str = "vision_tower.vision_model";

impl<B: Backend> ClipVision<B> {
    pub fn load(b: &B, src: &dyn WeightSource<B>, cfg: &LlavaConfig) -> Result<Self> {
        let v = cfg.vision.clone();
        let (d, i, p) = (v.hidden_size, v.intermediate_size, v.patch_size);
        let np = v.num_patches();
        let mat =
            |name: &str, r: usize, c: usize| src.get(b, &format!("{PREFIX}.{name}"), &[r, c], r, c);
        let vec = |name: &str, n: usize| src.get(b, &format!("{PREFIX}.{name}"), &[n], 1, n);

        let patch_w = src.get(
            b,
            &format!("{PREFIX}.embeddings.patch_embedding.weight"),
            &[d, v.num_channels, p, p],
            d,
            v.num_channels * p * p,
        )?;
        let cls = b.download(&vec("embeddings.class_embedding", d)?)?;
        let mut pos = b.download(&mat("embeddings.position_embedding.weight", np + 1, d)?)?;
        for (x, c) in pos[..d].iter_mut().zip(&cls) {
            *x += c;
        }
        let pos_cls = b.upload(&pos, np + 1, d)?;

        let mut layers = Vec::new();
        for l in 0..cfg.vision_layers_used() {
            let n = |s: &str| format!("encoder.layers.{l}.{s}");
            layers.push(ClipLayer {
                ln1_w: vec(&n("layer_norm1.weight"), d)?,
                ln1_b: vec(&n("layer_norm1.bias"), d)?,
                q_w: mat(&n("self_attn.q_proj.weight"), d, d)?,
                q_b: vec(&n("self_attn.q_proj.bias"), d)?,
                k_w: mat(&n("self_attn.k_proj.weight"), d, d)?,
                k_b: vec(&n("self_attn.k_proj.bias"), d)?,
                v_w: mat(&n("self_attn.v_proj.weight"), d, d)?,
                v_b: vec(&n("self_attn.v_proj.bias"), d)?,
                o_w: mat(&n("self_attn.out_proj.weight"), d, d)?,
                o_b: vec(&n("self_attn.out_proj.bias"), d)?,
                ln2_w: vec(&n("layer_norm2.weight"), d)?,
                ln2_b: vec(&n("layer_norm2.bias"), d)?,
                fc1_w: mat(&n("mlp.fc1.weight"), i, d)?,
                fc1_b: vec(&n("mlp.fc1.bias"), i)?,
                fc2_w: mat(&n("mlp.fc2.weight"), d, i)?,
                fc2_b: vec(&n("mlp.fc2.bias"), d)?,
            });
        }
        Ok(ClipVision {
            cfg: v,
            patch_w,
            pos_cls,
            pre_ln_w: vec("pre_layrnorm.weight", d)?,
            pre_ln_b: vec("pre_layrnorm.bias", d)?,
            layers,
        })
    }

    /// Image features `[P, D]`: the hidden state after the last layer run, CLS row dropped.
    /// `pixels` is CHW `[3, S, S]`, already preprocessed.
    pub fn forward(&self, b: &B, pixels: &[f32]) -> Result<B::Tensor> {
        let v = &self.cfg;
        let (s, p, c) = (v.image_size, v.patch_size, v.num_channels);
        if pixels.len() != c * s * s {
            return Err(Error::input(format!(
                "pixel values have {} values, the vision tower expects [{c}, {s}, {s}]",
                pixels.len()
            )));
        }
        let patches = patchify(pixels, c, s, p);
        let x = b.upload(&patches, v.num_patches() + 1, c * p * p)?;
        let x = b.linear(&x, &self.patch_w, None)?;
        let x = b.add(&x, &self.pos_cls)?;
        let eps = v.layer_norm_eps as f32;
        let mut x = b.layer_norm(&x, &self.pre_ln_w, &self.pre_ln_b, eps)?;
        let n = v.num_patches() + 1;
        let attn = AttnShape {
            n_heads: v.num_attention_heads,
            n_kv_heads: v.num_attention_heads,
            head_dim: v.head_dim(),
            causal_q_pos0: None,
            kv_len: n,
        };
        for l in &self.layers {
            let h = b.layer_norm(&x, &l.ln1_w, &l.ln1_b, eps)?;
            let q = b.linear(&h, &l.q_w, Some(&l.q_b))?;
            let k = b.linear(&h, &l.k_w, Some(&l.k_b))?;
            let vv = b.linear(&h, &l.v_w, Some(&l.v_b))?;
            let a = b.attention(&q, &k, &vv, attn)?;
            x = b.add(&x, &b.linear(&a, &l.o_w, Some(&l.o_b))?)?;
            let h = b.layer_norm(&x, &l.ln2_w, &l.ln2_b, eps)?;
            let h = b.linear(&h, &l.fc1_w, Some(&l.fc1_b))?;
            let h = match v.hidden_act {
                VisionAct::QuickGelu => b.quick_gelu(&h)?,
                VisionAct::Gelu => b.gelu(&h)?,
            };
            x = b.add(&x, &b.linear(&h, &l.fc2_w, Some(&l.fc2_b))?)?;
        }
        b.slice_rows(&x, 1, v.num_patches())
    }
}

/// CHW image → `[1 + P, C·p·p]` patch vectors in the conv weight's (c, ky, kx) order, patches
/// row-major over the grid, with an all-zero row 0 standing in for the class token.
pub fn patchify(pixels: &[f32], c: usize, s: usize, p: usize) -> Vec<f32> {
    let g = s / p;
    let k = c * p * p;
    let mut out = vec![0.0f32; (g * g + 1) * k];
    for gy in 0..g {
        for gx in 0..g {
            let row = &mut out[(1 + gy * g + gx) * k..(2 + gy * g + gx) * k];
            for ch in 0..c {
                for ky in 0..p {
                    let src = ch * s * s + (gy * p + ky) * s + gx * p;
                    row[ch * p * p + ky * p..ch * p * p + ky * p + p]
                        .copy_from_slice(&pixels[src..src + p]);
                }
            }
        }
    }
    out
}
