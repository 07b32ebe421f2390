//! The FastRM head's file, `head.safetensors`: `ln.weight`, `ln.bias` `[D]`, `q.weight`,
//! `k.weight` `[d, D]`, `q.bias`, `k.bias` `[d]` (F32), and the config in the header's metadata
//! ([`HeadConfig`], `format` = `fastrm-head-1`). What the head computes is `explain::fastrm`.

use std::collections::HashMap;
use std::path::Path;

use super::write::{self, Tensor};
use crate::error::{Error, Result};
use crate::util::SplitMix64;

/// The `format` metadata of a head file.
const FORMAT: &str = "fastrm-head-1";

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

    /// Writes the head file atomically; the same head is the same bytes.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (dm, d) = (self.cfg.hidden_size, self.cfg.head_dim);
        let c = &self.cfg;
        let meta: Vec<(&str, String)> = [
            ("format", FORMAT.to_string()),
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
        )
        .collect();
        let tensors = [
            Tensor::f32("ln.weight", vec![dm], &self.ln_w),
            Tensor::f32("ln.bias", vec![dm], &self.ln_b),
            Tensor::f32("q.weight", vec![d, dm], &self.wq),
            Tensor::f32("q.bias", vec![d], &self.bq),
            Tensor::f32("k.weight", vec![d, dm], &self.wk),
            Tensor::f32("k.bias", vec![d], &self.bk),
        ];
        write::write_file(path, &meta, &tensors)
    }

    /// Reads a head file: the header is read and checked first (its length, JSON, the metadata,
    /// and each tensor's dtype, shape and byte range against the file's length), and only then is
    /// the file memory-mapped and the six tensors copied out, so a corrupt or lying file is refused
    /// after reading at most [`MAX_HEAD_HEADER`] bytes.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let (header, data_len) = write::read_header(path, MAX_HEAD_HEADER as u64)?;
        let meta: HashMap<String, String> = write::metadata(path, &header)?
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
            .collect();
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
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping, dropped before returning; a head file rewritten while it is
        // being loaded is outside what any mmap-based loader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let start = mmap
            .len()
            .checked_sub(data_len as usize)
            .ok_or_else(|| bad("the file changed while it was being read".into()))?;
        let data = &mmap[start..];
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
