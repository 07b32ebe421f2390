//! `config.json` of a LLaVA-1.5 (`llava`) or LLaVA-NeXT (`llava_next`) checkpoint, its language
//! model a Llama or a Mistral (without sliding-window attention).
//!
//! Two field styles exist in the wild: the hub's transformers-4.x files, which leave most
//! of `text_config`/`vision_config` at the class defaults (LlamaConfig, CLIPVisionConfig), and
//! transformers-5 files, which spell everything out but rename a few keys (`image_token_id`,
//! `dtype`, `rope_parameters.rope_theta`). Missing fields therefore take the transformers class
//! defaults, so a hub file and a fully written one describe the same model.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::vision::ImageLayout;

#[derive(Debug, Clone, PartialEq)]
pub enum VisionAct {
    QuickGelu,
    Gelu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: VisionAct,
}

impl VisionConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Preprocessed values of one image (3 × side × side, CHW).
    pub fn pixels_per_image(&self) -> usize {
        3 * self.image_size * self.image_size
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Index into the vision tower's hidden states (including the embedding output), Python style.
    pub vision_feature_layer: i64,
    /// Checkpoint storage dtype as written in the config (informational; tensors carry their own).
    pub dtype: Option<String>,
    /// LLaVA-NeXT's any-resolution tiling; `None` for LLaVA-1.5's one square view per image.
    pub anyres: Option<AnyRes>,
}

/// `image_grid_pinpoints`: the `(height, width)` resolutions, whole multiples of the tower's
/// side, that an image may be resized into and tiled at.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyRes {
    pub pinpoints: Vec<(usize, usize)>,
}

impl LlavaConfig {
    /// How a `height × width` picture becomes image tokens on this model.
    pub fn image_layout(&self, height: usize, width: usize) -> ImageLayout {
        let grid = self.vision.grid();
        match &self.anyres {
            None => ImageLayout::Square { grid },
            Some(a) => crate::vision::anyres::layout(
                (height, width),
                self.vision.image_size,
                grid,
                &a.pinpoints,
            ),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Config {
                path: path.to_path_buf(),
                msg: "file not found (a LLaVA model folder has a config.json)".into(),
            },
            _ => Error::io(path, e),
        })?;
        Self::from_json_str(&text).map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// The shapes of a published checkpoint, for synthetic (random-weight) runs where none
    /// exists: `llava-1.5-7b`, `llava-1.5-13b` or `llava-v1.6-mistral-7b` (the llava-hf configs).
    pub fn named(name: &str) -> std::result::Result<Self, String> {
        let (hidden, inter, layers, heads) = match name {
            "llava-1.5-7b" => (4096, 11008, 32, 32),
            "llava-1.5-13b" => (5120, 13824, 40, 40),
            "llava-v1.6-mistral-7b" => return Self::from_json_str(HUB_NEXT_MISTRAL_7B),
            _ => {
                return Err(format!(
                    "unknown synthetic model {name:?}; known: llava-1.5-7b, llava-1.5-13b, \
                     llava-v1.6-mistral-7b"
                ))
            }
        };
        Self::from_json_str(&format!(
            r#"{{"model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001,
                "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                "projector_hidden_act": "gelu", "torch_dtype": "float16",
                "text_config": {{"model_type": "llama", "hidden_size": {hidden},
                    "intermediate_size": {inter}, "num_hidden_layers": {layers},
                    "num_attention_heads": {heads}, "num_key_value_heads": {heads},
                    "vocab_size": 32064, "max_position_embeddings": 4096,
                    "rms_norm_eps": 1e-5, "rope_theta": 10000.0}},
                "vision_config": {{"model_type": "clip_vision_model", "hidden_size": 1024,
                    "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                    "projection_dim": 768, "hidden_act": "quick_gelu"}}}}"#
        ))
    }

    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let root: RawConfig = parse_json(text)?;
        let next = match root.model_type.as_deref() {
            None | Some("llava") => false,
            Some("llava_next") => true,
            Some(mt) => {
                return Err(format!(
                    "model_type is {mt:?}; supported: \"llava\" (LLaVA-1.5), \"llava_next\" \
                     (LLaVA-NeXT)"
                ))
            }
        };
        let missing = |k: &str| format!("missing `{k}` (is this a LLaVA config.json?)");
        let tc = root
            .text_config
            .as_ref()
            .ok_or_else(|| missing("text_config"))?;
        let vc = root
            .vision_config
            .as_ref()
            .ok_or_else(|| missing("vision_config"))?;
        let mistral = match tc.model_type.as_deref() {
            None | Some("llama") => false,
            Some("mistral") => true,
            Some(mt) => {
                return Err(format!(
                    "text_config.model_type is {mt:?}; supported: \"llama\", \"mistral\""
                ))
            }
        };

        // Defaults: transformers' CLIPVisionConfig.
        let v_act = match vc.hidden_act.as_deref().unwrap_or("quick_gelu") {
            "quick_gelu" => VisionAct::QuickGelu,
            "gelu" => VisionAct::Gelu,
            other => {
                return Err(format!(
                    "vision_config.hidden_act {other:?} is not supported"
                ))
            }
        };
        let vision = VisionConfig {
            hidden_size: vc.hidden_size.unwrap_or(768),
            intermediate_size: vc.intermediate_size.unwrap_or(3072),
            num_hidden_layers: vc.num_hidden_layers.unwrap_or(12),
            num_attention_heads: vc.num_attention_heads.unwrap_or(12),
            image_size: vc.image_size.unwrap_or(224),
            patch_size: vc.patch_size.unwrap_or(32),
            num_channels: vc.num_channels.unwrap_or(3),
            layer_norm_eps: vc.layer_norm_eps.unwrap_or(1e-5),
            hidden_act: v_act,
        };

        // Defaults: transformers' LlamaConfig (what the hub's llava-1.5 files rely on) or
        // MistralConfig.
        let hidden = tc.hidden_size.unwrap_or(4096);
        let heads = tc.num_attention_heads.unwrap_or(32);
        let rope_theta = match (tc.rope_theta, &tc.rope_parameters) {
            (Some(t), _) => t,
            (None, Some(rp)) => {
                if let Some(kind) = rp.rope_type.as_deref().filter(|k| *k != "default") {
                    return Err(format!(
                        "text_config.rope_parameters.rope_type {kind:?} is not supported"
                    ));
                }
                rp.rope_theta.unwrap_or(10000.0)
            }
            (None, None) => 10000.0,
        };
        if tc.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(
                "text_config.rope_scaling is not supported (LLaVA-1.5 uses plain RoPE)".into(),
            );
        }
        let text = TextConfig {
            hidden_size: hidden,
            intermediate_size: tc
                .intermediate_size
                .unwrap_or(if mistral { 14336 } else { 11008 }),
            num_hidden_layers: tc.num_hidden_layers.unwrap_or(32),
            num_attention_heads: heads,
            num_key_value_heads: tc
                .num_key_value_heads
                .unwrap_or(if mistral { 8 } else { heads }),
            head_dim: tc
                .head_dim
                .unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            // The top-level vocab_size is the padded one on the hub (32064); text_config's wins
            // when both exist because it is what the embedding table was built with.
            vocab_size: tc.vocab_size.or(root.vocab_size).unwrap_or(32000),
            rms_norm_eps: tc.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: tc.max_position_embeddings.unwrap_or(if mistral {
                4096 * 32
            } else {
                2048
            }),
        };
        if mistral {
            // MistralConfig's default window is 4096; `null` turns it off.
            let window = match &tc.sliding_window {
                None => Some(4096),
                Some(v) if v.is_null() => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    format!("text_config.sliding_window must be a number or null, got {v}")
                })? as usize),
            };
            if let Some(w) = window.filter(|&w| w < text.max_position_embeddings) {
                return Err(format!(
                    "text_config.sliding_window {w} is shorter than the context ({}): \
                     sliding-window attention is not supported",
                    text.max_position_embeddings
                ));
            }
        }

        let image_token_id = root
            .image_token_index
            .or(root.image_token_id)
            .unwrap_or(32000);
        let eos_token_ids = match tc.eos_token_id.as_ref().or(root.eos_token_id.as_ref()) {
            None => vec![2],
            Some(OneOrMany::One(id)) => vec![*id],
            Some(OneOrMany::Many(ids)) => ids.clone(),
        };
        let bos_token_id = tc.bos_token_id.or(root.bos_token_id).unwrap_or(1);
        let pad_token_id = root.pad_token_id.or(tc.pad_token_id);
        let strategy = root
            .vision_feature_select_strategy
            .as_deref()
            .unwrap_or("default");
        if strategy != "default" {
            return Err(format!(
                "vision_feature_select_strategy {strategy:?} is not supported (LLaVA-1.5 uses \"default\")"
            ));
        }
        let vision_feature_layer = root.vision_feature_layer.unwrap_or(-2);
        if let Some(act) = root.projector_hidden_act.as_deref() {
            if act != "gelu" {
                return Err(format!(
                    "projector_hidden_act {act:?} is not supported (expected \"gelu\")"
                ));
            }
        }
        let dtype = root.torch_dtype.or(root.dtype);
        let anyres = next.then(|| AnyRes {
            // LlavaNextConfig's default: llava-hf's 336 px tiles, 1x2, 2x1, 2x2, 3x1, 1x3.
            pinpoints: root.image_grid_pinpoints.clone().unwrap_or_else(|| {
                vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
            }),
        });
        let cfg = LlavaConfig {
            vision,
            text,
            image_token_id,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            vision_feature_layer,
            dtype,
            anyres,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Number of vision encoder layers that actually run: features are taken from hidden state
    /// `vision_feature_layer` (Python indexing over `num_layers + 1` states), so later layers are
    /// skipped entirely.
    /// Number of weight values the engine loads for this config (the vision layers it runs,
    /// the projector, the decoder and its head), for the memory check before synthetic loads.
    pub fn loaded_parameters(&self) -> usize {
        let v = &self.vision;
        let (h, i) = (v.hidden_size, v.intermediate_size);
        let vision = h * v.num_channels * v.patch_size * v.patch_size
            + (v.num_patches() + 2) * h
            + 2 * h
            + self.vision_layers_used() * (4 * (h * h + h) + 4 * h + 2 * h * i + i + h);
        let t = &self.text;
        let (d, kv) = (t.hidden_size, t.num_key_value_heads * t.head_dim);
        let projector = h * d + d + d * d + d;
        let layer = 2 * d * (t.num_attention_heads * t.head_dim)
            + 2 * d * kv
            + 3 * d * t.intermediate_size
            + 2 * d;
        let text = 2 * t.vocab_size * d + t.num_hidden_layers * layer + d;
        let newline = if self.anyres.is_some() { d } else { 0 };
        vision + projector + text + newline
    }

    pub fn vision_layers_used(&self) -> usize {
        let n_states = self.vision.num_hidden_layers as i64 + 1;
        let idx = if self.vision_feature_layer < 0 {
            n_states + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        idx as usize
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.vision;
        let t = &self.text;
        let pos = |name: &str, x: usize| {
            if x == 0 {
                Err(format!("{name} must be positive"))
            } else {
                Ok(())
            }
        };
        for (n, x) in [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.head_dim", t.head_dim),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
        ] {
            pos(n, x)?;
        }
        if v.num_channels != 3 {
            return Err(format!(
                "vision_config.num_channels is {}, expected 3",
                v.num_channels
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(format!(
                "vision_config.hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(format!(
                "text_config.num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if !t.head_dim.is_multiple_of(2) {
            return Err(format!(
                "text_config head_dim {} must be even for RoPE",
                t.head_dim
            ));
        }
        let n_states = v.num_hidden_layers as i64 + 1;
        if self.vision_feature_layer >= n_states || self.vision_feature_layer < -n_states {
            return Err(format!(
                "vision_feature_layer {} is out of range for {} vision layers",
                self.vision_feature_layer, v.num_hidden_layers
            ));
        }
        if self.vision_layers_used() == 0 {
            return Err(
                "vision_feature_layer selects the embeddings; at least one layer must run".into(),
            );
        }
        if let Some(a) = &self.anyres {
            let side = v.image_size;
            if a.pinpoints.is_empty() {
                return Err("image_grid_pinpoints is empty".into());
            }
            if let Some(&(h, w)) = a.pinpoints.iter().find(|&&(h, w)| {
                h == 0
                    || w == 0
                    || !h.is_multiple_of(side)
                    || !w.is_multiple_of(side)
                    || h * w > 64 * side * side
            }) {
                return Err(format!(
                    "image_grid_pinpoints [{h}, {w}] must be whole multiples of the vision \
                     tower's image_size {side}, at most 64 tiles"
                ));
            }
        }
        if self.image_token_id as usize >= t.vocab_size {
            return Err(format!(
                "image token id {} is outside the vocabulary ({})",
                self.image_token_id, t.vocab_size
            ));
        }
        Ok(())
    }
}

/// `text` as `T`, errors naming the field's path (`vision_config.patch_size: invalid type: …`).
fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            format!("not valid JSON: {inner}")
        } else if path == "." {
            format!("top level must be a JSON object ({inner})")
        } else {
            format!("`{path}`: {inner}")
        }
    })
}

/// `config.json` as written: every field optional (transformers' class defaults fill the gaps),
/// other fields ignored.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    text_config: Option<RawText>,
    vision_config: Option<RawVision>,
    vocab_size: Option<usize>,
    image_token_index: Option<u32>,
    image_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    vision_feature_select_strategy: Option<String>,
    /// One layer; transformers also allows a list, which LLaVA-1.5 never uses.
    vision_feature_layer: Option<i64>,
    projector_hidden_act: Option<String>,
    image_grid_pinpoints: Option<Vec<(usize, usize)>>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

#[derive(Deserialize)]
struct RawText {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    /// `Some(Null)` when written as `null` (no window), `None` when absent (the class default).
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<serde_json::Value>,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

#[derive(Deserialize)]
struct RawVision {
    hidden_act: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
    layer_norm_eps: Option<f64>,
}

/// A field that is present, `null` included (serde reads a `null` `Option` as absent).
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// An id or a list of ids (`eos_token_id`).
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Ids;
        impl<'de> serde::de::Visitor<'de> for Ids {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id or a list of token ids")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<OneOrMany, E> {
                u32::try_from(v)
                    .map(OneOrMany::One)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<OneOrMany, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    ids.push(id);
                }
                Ok(OneOrMany::Many(ids))
            }
        }
        d.deserialize_any(Ids)
    }
}

/// The llava-hf/llava-1.5-7b-hf `config.json` as published (transformers 4.36 era): what
/// `fastrm synth-model --like llava-1.5-7b` writes.
pub const HUB_7B: &str = r#"{
  "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
  "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
  "projector_hidden_act": "gelu",
  "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
    "torch_dtype": "float16", "vocab_size": 32064},
  "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
    "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
    "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
}"#;

/// llava-hf's llava-v1.6-mistral-7b-hf as the hub writes it: LlavaNextConfig's and
/// MistralConfig's defaults fill in, no sliding window.
pub const HUB_NEXT_MISTRAL_7B: &str = r#"{
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
  "text_config": {"architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
    "torch_dtype": "bfloat16", "vocab_size": 32064},
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
    "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
    "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default"
}"#;

/// The hub `config.json` of a published checkpoint by short name (`synth-model --like`).
pub fn hub_config(name: &str) -> Option<&'static str> {
    match name {
        "llava-1.5-7b" => Some(HUB_7B),
        "llava-v1.6-mistral-7b" => Some(HUB_NEXT_MISTRAL_7B),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_7b_defaults_fill_in_llama_and_clip() {
        let c = LlavaConfig::from_json_str(HUB_7B).unwrap();
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_hidden_layers, 32);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.intermediate_size, 11008);
        assert_eq!(c.text.vocab_size, 32064);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.vision.num_patches(), 576);
        assert_eq!(c.vision.hidden_act, VisionAct::QuickGelu);
        assert_eq!(c.image_token_id, 32000);
        assert_eq!(c.vision_layers_used(), 23);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn transformers5_style_keys() {
        let t5 = HUB_7B
            .replace("\"image_token_index\"", "\"image_token_id\"")
            .replace("\"torch_dtype\"", "\"dtype\"")
            .replace(
                "\"rms_norm_eps\": 1e-05,",
                "\"rms_norm_eps\": 1e-05, \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 5000.0},",
            );
        let c = LlavaConfig::from_json_str(&t5).unwrap();
        assert_eq!(c.image_token_id, 32000);
        assert_eq!(c.text.rope_theta, 5000.0);
        assert_eq!(c.dtype.as_deref(), Some("float16"));
    }

    #[test]
    fn malformed_configs_are_errors_naming_the_field() {
        let cases = [
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"model_type":"llava"}"#, "text_config"),
            (
                &HUB_7B.replace("\"num_hidden_layers\": 24", "\"num_hidden_layers\": \"x\""),
                "vision_config.num_hidden_layers",
            ),
            (
                &HUB_7B.replace("\"patch_size\": 14", "\"patch_size\": 0"),
                "patch_size",
            ),
            (
                &HUB_7B.replace("\"patch_size\": 14", "\"patch_size\": 13"),
                "multiple of patch_size",
            ),
            (
                &HUB_7B.replace("\"model_type\": \"llava\"", "\"model_type\": \"qwen2_vl\""),
                "model_type",
            ),
            (
                &HUB_7B.replace(
                    "\"vision_feature_layer\": -2",
                    "\"vision_feature_layer\": -40",
                ),
                "out of range",
            ),
            (
                &HUB_7B.replace("\"pad_token_id\": 32001", "\"eos_token_id\": \"x\""),
                "`eos_token_id`: invalid type: string \"x\", expected a token id or a list",
            ),
            (
                &HUB_7B.replace(
                    "\"model_type\": \"llama\"",
                    "\"model_type\": \"llama\", \"eos_token_id\": [2, -1]",
                ),
                "`text_config.eos_token_id[1]`",
            ),
        ];
        for (text, needle) in cases {
            let err = LlavaConfig::from_json_str(text).unwrap_err();
            assert!(
                err.contains(needle),
                "error {err:?} should mention {needle:?}"
            );
        }
    }

    #[test]
    fn llava_next_with_mistral() {
        let c = LlavaConfig::from_json_str(HUB_NEXT_MISTRAL_7B).unwrap();
        assert_eq!(c.text.num_key_value_heads, 8);
        assert_eq!(c.text.max_position_embeddings, 32768);
        assert_eq!(c.text.rope_theta, 1e6);
        let pins = &c.anyres.as_ref().expect("tiled").pinpoints;
        assert_eq!(pins[2], (672, 672));
        // A 640x480 photo: 2x2 tiles, 36 of the 48 grid rows kept (see vision::anyres).
        assert_eq!(c.image_layout(480, 640).tokens(), 576 + 36 * 49);
        // Absent pinpoints take LlavaNextConfig's default (the same list).
        let no_pins = HUB_NEXT_MISTRAL_7B.replace(
            r#""image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],"#,
            "",
        );
        assert_eq!(
            LlavaConfig::from_json_str(&no_pins).unwrap().anyres,
            c.anyres
        );
        // LLaVA-1.5's images stay one square view.
        let old = LlavaConfig::from_json_str(HUB_7B).unwrap();
        assert_eq!(old.image_layout(480, 640), ImageLayout::Square { grid: 24 });

        for (from, to, needle) in [
            // A window shorter than the context, written or by MistralConfig's default.
            (
                r#""sliding_window": null"#,
                r#""sliding_window": 4096"#,
                "sliding_window 4096",
            ),
            (r#""sliding_window": null,"#, "", "sliding_window 4096"),
            ("[1008, 336]", "[1000, 336]", "whole multiples"),
            (
                r#""model_type": "mistral""#,
                r#""model_type": "qwen2""#,
                "text_config.model_type",
            ),
        ] {
            let err =
                LlavaConfig::from_json_str(&HUB_NEXT_MISTRAL_7B.replace(from, to)).unwrap_err();
            assert!(
                err.contains(needle),
                "error {err:?} should mention {needle:?}"
            );
        }
    }
}
