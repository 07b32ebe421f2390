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
//! `head.safetensors` holds `ln.weight`, `ln.bias` `[D]`, `q.weight`, `k.weight` `[d, D]`,
//! `q.bias`, `k.bias` `[d]`, and the config in the header metadata ([`HeadConfig`]).

use std::path::Path;

use crate::backend::{with_memory_tag, Backend, MemTag};
use crate::error::{Error, Result};
use crate::util::SplitMix64;

/// Which hidden state the head reads. Only one exists so far; the name is in the file so a head
/// trained on another one is refused rather than silently misused.
pub const HIDDEN_STATE: &str = "decoder_final_norm";

#[derive(Debug, Clone, PartialEq)]
pub struct HeadConfig {
    pub hidden_size: usize,
    pub head_dim: usize,
    /// The fraction of a baseline map's max above which a patch was labelled relevant in training.
    pub label_threshold: f32,
    pub layer_norm_eps: f32,
    pub hidden_state: String,
    /// Free text: how the weights were made (training data, steps, seed), or "random".
    pub provenance: String,
    /// Mean map entropy below which an answer counts as confident, calibrated by `fastrm eval`
    /// (mean of the correct and incorrect answers' mean entropies); `None` until calibrated.
    pub confidence_threshold: Option<f32>,
}

/// Head weights on the host, as stored in `head.safetensors`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadWeights {
    pub cfg: HeadConfig,
    pub ln_w: Vec<f32>,
    pub ln_b: Vec<f32>,
    /// `[d, D]`
    pub wq: Vec<f32>,
    pub bq: Vec<f32>,
    /// `[d, D]`
    pub wk: Vec<f32>,
    pub bk: Vec<f32>,
}

/// Largest header a head file may have: its JSON names six tensors and a few metadata strings
/// (a few hundred bytes), so anything near this is not a head.
pub const MAX_HEAD_HEADER: usize = 1 << 20;

impl HeadWeights {
    /// Seeded random weights (tests, benches, and the starting point of training).
    pub fn random(hidden_size: usize, head_dim: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let spread = (3.0 / hidden_size as f32).sqrt();
        let mut draw = |n: usize, s: f32, base: f32| -> Vec<f32> {
            (0..n).map(|_| base + s * rng.uniform_sym()).collect()
        };
        HeadWeights {
            cfg: HeadConfig {
                hidden_size,
                head_dim,
                label_threshold: 0.3,
                layer_norm_eps: 1e-5,
                hidden_state: HIDDEN_STATE.into(),
                provenance: format!("random (seed {seed})"),
                confidence_threshold: None,
            },
            ln_w: draw(hidden_size, 0.1, 1.0),
            ln_b: draw(hidden_size, 0.1, 0.0),
            wq: draw(head_dim * hidden_size, spread, 0.0),
            bq: draw(head_dim, 0.1, 0.0),
            wk: draw(head_dim * hidden_size, spread, 0.0),
            bk: draw(head_dim, 0.1, 0.0),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let (dm, d) = (self.cfg.hidden_size, self.cfg.head_dim);
        let tensors: [(&str, &[f32], Vec<usize>); 6] = [
            ("ln.weight", &self.ln_w, vec![dm]),
            ("ln.bias", &self.ln_b, vec![dm]),
            ("q.weight", &self.wq, vec![d, dm]),
            ("q.bias", &self.bq, vec![d]),
            ("k.weight", &self.wk, vec![d, dm]),
            ("k.bias", &self.bk, vec![d]),
        ];
        // The file is written here rather than by `safetensors::serialize`, whose metadata map
        // comes out in hash order: with keys in a fixed order the same head is the same bytes.
        let c = &self.cfg;
        let mut meta = serde_json::Map::new();
        for (k, v) in [
            ("format", "fastrm-head-1".to_string()),
            ("hidden_size", c.hidden_size.to_string()),
            ("head_dim", c.head_dim.to_string()),
            ("label_threshold", c.label_threshold.to_string()),
            ("layer_norm_eps", c.layer_norm_eps.to_string()),
            ("hidden_state", c.hidden_state.clone()),
            ("provenance", c.provenance.clone()),
        ]
        .into_iter()
        .chain(
            c.confidence_threshold
                .map(|t| ("confidence_threshold", t.to_string())),
        ) {
            meta.insert(k.to_string(), serde_json::Value::String(v));
        }
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        let mut offset = 0usize;
        for (name, values, shape) in &tensors {
            let len = values.len() * 4;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        let mut head =
            serde_json::to_vec(&header).map_err(|e| Error::input(format!("head: {e}")))?;
        // Pad the header with spaces so the data starts 8-byte aligned, as safetensors writers do.
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let mut data = Vec::with_capacity(8 + head.len() + offset);
        data.extend_from_slice(&(head.len() as u64).to_le_bytes());
        data.extend_from_slice(&head);
        for (_, values, _) in &tensors {
            data.extend_from_slice(bytemuck::cast_slice(values));
        }
        // Atomic: never a half-written head.
        crate::util::write_atomic(path, &data)
    }

    /// Reads a head file: the header is read and checked first (its length, JSON, the metadata,
    /// and each tensor's dtype, shape and byte range against the file's length), and only then is
    /// the file memory-mapped and the six tensors copied out, so a corrupt or lying file is refused
    /// after reading at most [`MAX_HEAD_HEADER`] bytes.
    pub fn load(path: &Path) -> Result<Self> {
        use std::io::Read;
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| {
            bad(format!(
                "not a valid safetensors head file: {len} bytes, too short for the 8-byte header length (truncated?)"
            ))
        })?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEAD_HEADER as u64 || 8 + n > len {
            return Err(bad(format!(
                "not a valid safetensors head file: its header claims {n} bytes, but the file \
                 is {len} bytes and a head's header may take at most {MAX_HEAD_HEADER} (truncated or corrupt?)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| {
                bad(format!(
                    "not a valid safetensors head file: the header is not a JSON object ({e})"
                ))
            })?;
        let data_len = len - 8 - n;
        let mut meta = std::collections::HashMap::new();
        if let Some(m) = header.get("__metadata__") {
            let m = m
                .as_object()
                .ok_or_else(|| bad("header `__metadata__` is not an object".into()))?;
            for (k, v) in m {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad(format!("header metadata `{k}` is not a string")))?;
                meta.insert(k.clone(), v.to_string());
            }
        }
        let field = |k: &str| -> Result<&String> {
            meta.get(k).ok_or_else(|| {
                bad(format!(
                    "header metadata has no `{k}` (is this a FastRM head?)"
                ))
            })
        };
        let num = |k: &str| -> Result<f64> {
            field(k)?
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("metadata `{k}` is not a number")))
        };
        let int = |k: &str| -> Result<usize> {
            let v = num(k)?;
            if v < 1.0 || v.fract() != 0.0 {
                return Err(bad(format!("metadata `{k}` must be a positive integer")));
            }
            Ok(v as usize)
        };
        let cfg = HeadConfig {
            hidden_size: int("hidden_size")?,
            head_dim: int("head_dim")?,
            label_threshold: num("label_threshold")? as f32,
            layer_norm_eps: num("layer_norm_eps")? as f32,
            hidden_state: field("hidden_state")?.clone(),
            provenance: meta.get("provenance").cloned().unwrap_or_default(),
            confidence_threshold: match meta.get("confidence_threshold") {
                Some(_) => Some(num("confidence_threshold")? as f32),
                None => None,
            },
        };
        if cfg.hidden_state != HIDDEN_STATE {
            return Err(bad(format!(
                "the head reads hidden state {:?}; this engine provides {HIDDEN_STATE:?}",
                cfg.hidden_state
            )));
        }
        let (dm, d) = (cfg.hidden_size, cfg.head_dim);
        // Where each tensor's bytes lie in the data section, checked against the header's
        // claims and the file's length before anything is mapped.
        let tensor_err = |name: &str, msg: String| Error::Tensor {
            name: name.into(),
            msg: format!("{msg} in {}", path.display()),
        };
        let range = |name: &str, shape: &[usize]| -> Result<std::ops::Range<usize>> {
            let t = header
                .get(name)
                .ok_or_else(|| bad(format!("missing tensor `{name}`")))?;
            let want_shape: Vec<serde_json::Value> = shape.iter().map(|&v| v.into()).collect();
            if t["shape"].as_array() != Some(&want_shape) {
                return Err(tensor_err(
                    name,
                    format!("shape {}, the metadata implies {shape:?}", t["shape"]),
                ));
            }
            if t["dtype"] != "F32" {
                return Err(tensor_err(
                    name,
                    format!("dtype {}, expected F32", t["dtype"]),
                ));
            }
            let offsets = t["data_offsets"]
                .as_array()
                .and_then(|o| match o.as_slice() {
                    [a, b] => Some((a.as_u64()?, b.as_u64()?)),
                    _ => None,
                });
            let Some((start, end)) = offsets else {
                return Err(tensor_err(
                    name,
                    format!(
                        "data_offsets {} are not two byte offsets",
                        t["data_offsets"]
                    ),
                ));
            };
            let want = shape
                .iter()
                .try_fold(4u64, |acc, &d| acc.checked_mul(d as u64));
            if end < start || Some(end - start) != want {
                return Err(tensor_err(
                    name,
                    format!("data_offsets [{start}, {end}] do not hold {shape:?} F32 values"),
                ));
            }
            if end > data_len {
                return Err(tensor_err(
                    name,
                    format!(
                        "data ends at byte {end} of the data section, but the file holds only \
                         {data_len} bytes of data (truncated?)"
                    ),
                ));
            }
            Ok(start as usize..end as usize)
        };
        let names: [(&str, Vec<usize>); 6] = [
            ("ln.weight", vec![dm]),
            ("ln.bias", vec![dm]),
            ("q.weight", vec![d, dm]),
            ("q.bias", vec![d]),
            ("k.weight", vec![d, dm]),
            ("k.bias", vec![d]),
        ];
        let ranges = names
            .iter()
            .map(|(name, shape)| range(name, shape))
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: read-only mapping, dropped before returning; a head file rewritten while it is
        // being loaded is outside what any mmap-based loader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let data = &mmap[8 + n as usize..];
        let mut tensors = ranges.into_iter().map(|r| {
            data[r]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<f32>>()
        });
        let mut get = || tensors.next().expect("six ranges");
        Ok(HeadWeights {
            ln_w: get(),
            ln_b: get(),
            wq: get(),
            bq: get(),
            wk: get(),
            bk: get(),
            cfg,
        })
    }
}

/// A head on a backend.
pub struct FastRmHead<B: Backend> {
    pub cfg: HeadConfig,
    ln_w: B::Tensor,
    ln_b: B::Tensor,
    wq: B::Tensor,
    bq: B::Tensor,
    wk: B::Tensor,
    bk: B::Tensor,
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
