//! A model folder in the hub's layout with seeded synthetic weights: the path a downloaded
//! llava-hf checkpoint takes (sharded safetensors with `model.safetensors.index.json`, hub tensor
//! names, `config.json`, `preprocessor_config.json`, `tokenizer.json`) at any size, including
//! LLaVA-1.5-7B's 14 GB, without a download.
//!
//! Every tensor the hub's files hold is written (all vision layers and `post_layernorm`, which the
//! engine never runs, included), in `state_dict` order, split into shards of about equal size.
//! Values follow [`Synthetic`]: loading the folder gives the weights `synthetic:NAME` draws,
//! rounded to the written dtype. The tokenizer is the demo model's, its vocabulary padded with
//! filler tokens (`▁w<id>`, never produced by encoding) up to the config's `<image>` id, so
//! questions encode as in the demo and every generated id has a text. A random FastRM head of the
//! model's size is written too (`head.safetensors`), for `explain --method fastrm`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::checkpoint::write::{self, Data, Tensor};
use crate::checkpoint::{DType, INDEX_FILE};
use crate::config::LlavaConfig;
use crate::error::{Error, Result};
use crate::explain::fastrm::HeadWeights;
use crate::model::Synthetic;
use crate::util::SplitMix64;

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub dtype: DType,
    /// Number of safetensors shards (the 7B hub folder has 3).
    pub shards: usize,
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            dtype: DType::F16,
            shards: 3,
            seed: 0,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub dir: PathBuf,
    pub tensors: usize,
    pub parameters: usize,
    /// Bytes of tensor data over all shards.
    pub bytes: u64,
    pub shards: Vec<String>,
}

/// The seed of the random FastRM head written beside the weights (the CLI's random head's).
const HEAD_SEED: u64 = 7;

/// Writes the model `config_json` describes into `out`, which must not exist yet: the folder is
/// filled under a temporary name beside it and renamed into place, so an interrupted run leaves
/// no folder that looks complete.
pub fn write_model(out: &Path, config_json: &str, opts: &SynthOptions) -> Result<Written> {
    let cfg = LlavaConfig::from_json_str(config_json).map_err(|msg| Error::Config {
        path: out.join("config.json"),
        msg,
    })?;
    if opts.shards == 0 {
        return Err(Error::input("--shards must be at least 1"));
    }
    if out.exists() {
        return Err(Error::input(format!(
            "{} already exists; choose a new folder (nothing is overwritten)",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::input(format!("{}: not a folder name", out.display())))?;
    let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let r = fill(&tmp, config_json, &cfg, opts).and_then(|mut w| {
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        w.dir = out.to_path_buf();
        Ok(w)
    });
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

fn fill(dir: &Path, config_json: &str, cfg: &LlavaConfig, opts: &SynthOptions) -> Result<Written> {
    let tensors = hub_tensors(cfg);
    let size = opts.dtype.size() as u64;
    let bytes: Vec<u64> = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * size)
        .collect();
    let total: u64 = bytes.iter().sum();
    // Greedy split into `shards` parts of about total/shards bytes, in order (as the hub's
    // writer fills shards up to a size limit).
    let n_shards = opts.shards.min(tensors.len());
    let target = total.div_ceil(n_shards as u64);
    let mut shard_of = Vec::with_capacity(tensors.len());
    let (mut shard, mut filled) = (0usize, 0u64);
    for &b in &bytes {
        if filled > 0 && filled + b > target && shard + 1 < n_shards {
            shard += 1;
            filled = 0;
        }
        shard_of.push(shard);
        filled += b;
    }
    let n_shards = shard + 1;
    let file = |i: usize| {
        if n_shards == 1 {
            crate::checkpoint::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", i + 1)
        }
    };
    let draw = Synthetic { seed: opts.seed };
    for s in 0..n_shards {
        let members: Vec<usize> = (0..tensors.len()).filter(|&i| shard_of[i] == s).collect();
        let path = dir.join(file(s));
        write_shard(&path, &members, &tensors, &draw, opts.dtype)?;
        crate::status::say(&format!("wrote {}", path.display()));
    }
    if n_shards > 1 {
        let weight_map: BTreeMap<&str, String> = tensors
            .iter()
            .zip(&shard_of)
            .map(|((n, _), &s)| (n.as_str(), file(s)))
            .collect();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    let config: Value =
        serde_json::from_str(config_json).map_err(|e| Error::input(format!("config: {e}")))?;
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_config(cfg),
    )?;
    write_json(&dir.join("tokenizer.json"), &tokenizer(cfg)?)?;
    let d = cfg.text.hidden_size;
    HeadWeights::random(d, d, HEAD_SEED).save(&dir.join("head.safetensors"))?;
    Ok(Written {
        dir: dir.to_path_buf(),
        tensors: tensors.len(),
        parameters: tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum(),
        bytes: total,
        shards: (0..n_shards).map(file).collect(),
    })
}

/// Every tensor of a llava-hf LLaVA-1.5 or LLaVA-NeXT checkpoint with its shape, in
/// `state_dict` order.
pub fn hub_tensors(cfg: &LlavaConfig) -> Vec<(String, Vec<usize>)> {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| t.push((name, shape));
    let v = &cfg.vision;
    let (dv, iv) = (v.hidden_size, v.intermediate_size);
    let vp = "vision_tower.vision_model";
    add(format!("{vp}.embeddings.class_embedding"), vec![dv]);
    add(
        format!("{vp}.embeddings.patch_embedding.weight"),
        vec![dv, v.num_channels, v.patch_size, v.patch_size],
    );
    add(
        format!("{vp}.embeddings.position_embedding.weight"),
        vec![v.num_patches() + 1, dv],
    );
    add(format!("{vp}.pre_layrnorm.weight"), vec![dv]);
    add(format!("{vp}.pre_layrnorm.bias"), vec![dv]);
    for l in 0..v.num_hidden_layers {
        let p = format!("{vp}.encoder.layers.{l}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            add(format!("{p}.self_attn.{proj}.weight"), vec![dv, dv]);
            add(format!("{p}.self_attn.{proj}.bias"), vec![dv]);
        }
        add(format!("{p}.layer_norm1.weight"), vec![dv]);
        add(format!("{p}.layer_norm1.bias"), vec![dv]);
        add(format!("{p}.mlp.fc1.weight"), vec![iv, dv]);
        add(format!("{p}.mlp.fc1.bias"), vec![iv]);
        add(format!("{p}.mlp.fc2.weight"), vec![dv, iv]);
        add(format!("{p}.mlp.fc2.bias"), vec![dv]);
        add(format!("{p}.layer_norm2.weight"), vec![dv]);
        add(format!("{p}.layer_norm2.bias"), vec![dv]);
    }
    add(format!("{vp}.post_layernorm.weight"), vec![dv]);
    add(format!("{vp}.post_layernorm.bias"), vec![dv]);
    let tc = &cfg.text;
    let d = tc.hidden_size;
    let (qd, kvd) = (
        tc.num_attention_heads * tc.head_dim,
        tc.num_key_value_heads * tc.head_dim,
    );
    let mp = "multi_modal_projector";
    add(format!("{mp}.linear_1.weight"), vec![d, dv]);
    add(format!("{mp}.linear_1.bias"), vec![d]);
    add(format!("{mp}.linear_2.weight"), vec![d, d]);
    add(format!("{mp}.linear_2.bias"), vec![d]);
    if cfg.anyres.is_some() {
        add("image_newline".into(), vec![d]);
    }
    let lp = "language_model.model";
    add(format!("{lp}.embed_tokens.weight"), vec![tc.vocab_size, d]);
    for l in 0..tc.num_hidden_layers {
        let p = format!("{lp}.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), vec![qd, d]);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kvd, d]);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kvd, d]);
        add(format!("{p}.self_attn.o_proj.weight"), vec![d, qd]);
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![tc.intermediate_size, d],
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![tc.intermediate_size, d],
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![d, tc.intermediate_size],
        );
        add(format!("{p}.input_layernorm.weight"), vec![d]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![d]);
    }
    add(format!("{lp}.norm.weight"), vec![d]);
    add(
        "language_model.lm_head.weight".into(),
        vec![tc.vocab_size, d],
    );
    t
}

/// One safetensors file (`{"format": "pt"}` metadata, as transformers writes), each tensor's
/// values drawn and rounded when its turn comes, so memory stays at one tensor whatever the
/// model's size.
fn write_shard(
    path: &Path,
    members: &[usize],
    tensors: &[(String, Vec<usize>)],
    draw: &Synthetic,
    dtype: DType,
) -> Result<()> {
    let st_dtype = match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
    };
    let files: Vec<Tensor<'_>> = members
        .iter()
        .map(|&i| {
            let (name, shape) = &tensors[i];
            Tensor {
                name: name.clone(),
                dtype: st_dtype,
                shape: shape.clone(),
                data: Data::Made(Box::new(move || values(draw, name, shape, dtype))),
            }
        })
        .collect();
    write::write_file(path, &[("format", "pt".into())], &files)
}

/// A tensor's values as `dtype` little-endian bytes, drawn in parallel stretches of the seeded
/// stream (the same values [`Synthetic`] draws in one pass).
fn values(draw: &Synthetic, name: &str, shape: &[usize], dtype: DType) -> Vec<u8> {
    const STRETCH: usize = 1 << 16;
    let d = draw.draw(name, shape);
    let n: usize = shape.iter().product();
    let size = dtype.size();
    let mut out = vec![0u8; n * size];
    out.par_chunks_mut(STRETCH * size)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = SplitMix64::skipped(d.seed, (c * STRETCH) as u64);
            for b in chunk.chunks_exact_mut(size) {
                let v = d.center + d.spread * rng.uniform_sym();
                match dtype {
                    DType::F32 => b.copy_from_slice(&v.to_le_bytes()),
                    DType::F16 => b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    DType::BF16 => b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                }
            }
        });
    out
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// llava-hf's `preprocessor_config.json` for the model: CLIPImageProcessor at the tower's side,
/// or LlavaNextImageProcessor with the model's pinpoints.
fn preprocessor_config(cfg: &LlavaConfig) -> Value {
    let side = cfg.vision.image_size;
    let mut v = json!({
        "crop_size": {"height": side, "width": side},
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": side}
    });
    if let Some(a) = &cfg.anyres {
        v["image_processor_type"] = json!("LlavaNextImageProcessor");
        v["processor_class"] = json!("LlavaNextProcessor");
        v["do_pad"] = json!(true);
        v["image_grid_pinpoints"] = json!(a.pinpoints);
    }
    v
}

/// The demo tokenizer with `<image>` and `<pad>` moved to the config's ids and the vocabulary
/// padded with filler tokens up to `<image>`.
fn tokenizer(cfg: &LlavaConfig) -> Result<Value> {
    let bad = |msg: String| Error::input(format!("the bundled tokenizer: {msg}"));
    let mut tok: Value = serde_json::from_slice(crate::demo::tokenizer_json())
        .map_err(|e| bad(format!("not JSON: {e}")))?;
    let vocab = tok
        .pointer_mut("/model/vocab")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| bad("no model.vocab".into()))?;
    let base = vocab.len() as u32;
    let image = cfg.image_token_id;
    if image < base {
        return Err(Error::input(format!(
            "image_token_index {image} is inside the bundled tokenizer's {base}-token vocabulary; \
             the synthetic folder needs it at {base} or above"
        )));
    }
    for id in base..image {
        vocab.insert(format!("\u{2581}w{id}"), json!(id));
    }
    let pad = cfg.pad_token_id.unwrap_or(image + 1);
    if pad <= image {
        return Err(Error::input(format!(
            "pad_token_id {pad} must come after image_token_index {image} for the bundled tokenizer"
        )));
    }
    let added = tok
        .get_mut("added_tokens")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("no added_tokens".into()))?;
    for t in added.iter_mut() {
        match t.get("content").and_then(Value::as_str) {
            Some("<image>") => t["id"] = json!(image),
            Some("<pad>") => t["id"] = json!(pad),
            _ => {}
        }
    }
    Ok(tok)
}
