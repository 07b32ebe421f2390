//! The public entry point: a model folder (HF `llava-hf` layout) opened on a backend, turning an
//! image file and a question into an answer.

use std::path::{Path, PathBuf};

use crate::backend::{with_memory_tag, Backend, MemTag};
use crate::checkpoint::Checkpoint;
use crate::config::LlavaConfig;
use crate::error::{Error, Result};
use crate::explain::fastrm::{FastRmHead, HeadWeights};
use crate::model::llava::{StopReason, Timings};
use crate::model::{Llava, Synthetic};
use crate::text::TextProcessor;
use crate::vision::{self, PreprocessConfig};

pub use crate::explain::{Confidence, Method};
pub use crate::model::llava::{Event, GenerateOptions};

pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Llava<B>,
    /// Absent for synthetic models, which run at the id level only.
    pub text: Option<TextProcessor>,
    pub preprocess: PreprocessConfig,
    pub dir: Option<PathBuf>,
    /// The FastRM head, once loaded with [`Engine::load_head`].
    pub head: Option<FastRmHead<B>>,
}

/// What a run answers.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// A question about an image file (needs the model's tokenizer).
    Question { image: &'a Path, question: &'a str },
    /// An id-level request for models without a tokenizer (synthetic weights): BOS, the image
    /// tokens, `n_text` seeded text ids, and seeded pixel values.
    Ids { n_text: usize, seed: u64 },
}

/// A finished generation, ready for JSON.
#[derive(Debug, Clone)]
pub struct Generation {
    pub input_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// One generated token with its relevancy map.
#[derive(Debug, Clone)]
pub struct TokenMap {
    pub index: usize,
    pub id: u32,
    /// The token's own text (special tokens shown as themselves).
    pub text: String,
    /// Raw relevancy over the image patches, row-major over the grid.
    pub map: Vec<f32>,
    /// Normalised entropy of the map, in [0, 1] (see [`crate::explain::map_entropy`]).
    pub entropy: f32,
}

/// A finished explain run.
#[derive(Debug, Clone)]
pub struct Explained {
    pub generation: Generation,
    pub method: Method,
    /// `[rows, cols]` of the patch grid the maps cover.
    pub grid: (usize, usize),
    pub tokens: Vec<TokenMap>,
    /// Seconds spent on the maps alone.
    pub maps_s: f64,
    /// Mean entropy over the answer and its verdict (calibrated for FastRM heads that carry a
    /// threshold).
    pub confidence: Confidence,
}

impl<B: Backend> Engine<B> {
    /// Opens `dir`: `config.json`, the safetensors weights, `tokenizer.json`, and
    /// `preprocessor_config.json` when present (CLIP defaults at the tower's size otherwise).
    pub fn load(backend: B, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: "not a folder (expected a model folder with config.json and safetensors weights)".into(),
            });
        }
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let text = TextProcessor::from_file(&dir.join("tokenizer.json"))?;
        let pp_path = dir.join("preprocessor_config.json");
        let preprocess = if pp_path.is_file() {
            PreprocessConfig::from_file(&pp_path)?
        } else {
            PreprocessConfig::clip(cfg.vision.image_size)
        };
        if preprocess.crop_height != cfg.vision.image_size
            || preprocess.crop_width != cfg.vision.image_size
        {
            return Err(Error::Config {
                path: pp_path,
                msg: format!(
                    "crop size {}x{} does not match the vision tower's image_size {}",
                    preprocess.crop_width, preprocess.crop_height, cfg.vision.image_size
                ),
            });
        }
        let ck = Checkpoint::open(dir)?;
        backend.check_weight_memory(ck.total_elements())?;
        let model = with_memory_tag(&backend, MemTag::Weights, || {
            Llava::load(&backend, &ck, &cfg)
        })?;
        Ok(Engine {
            backend,
            model,
            text: Some(text),
            preprocess,
            dir: Some(dir.to_path_buf()),
            head: None,
        })
    }

    /// Random weights of the shapes `cfg` implies; no tokenizer.
    pub fn synthetic(backend: B, cfg: &LlavaConfig, seed: u64) -> Result<Self> {
        backend.check_weight_memory(cfg.loaded_parameters())?;
        let model = with_memory_tag(&backend, MemTag::Weights, || {
            Llava::load(&backend, &Synthetic { seed }, cfg)
        })?;
        Ok(Engine {
            backend,
            model,
            text: None,
            preprocess: PreprocessConfig::clip(cfg.vision.image_size),
            dir: None,
            head: None,
        })
    }

    /// Loads a FastRM head file (`head.safetensors`) for `explain` with [`Method::FastRm`].
    pub fn load_head(&mut self, path: &Path) -> Result<()> {
        self.set_head(&HeadWeights::load(path)?)
    }

    /// Uses the head `w` (checked against the model's hidden size).
    pub fn set_head(&mut self, w: &HeadWeights) -> Result<()> {
        let hidden = self.config().text.hidden_size;
        self.head = Some(with_memory_tag(&self.backend, MemTag::Head, || {
            FastRmHead::new(&self.backend, w, hidden)
        })?);
        Ok(())
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.model.cfg
    }

    fn text(&self) -> Result<&TextProcessor> {
        self.text.as_ref().ok_or_else(|| {
            Error::input("this model has no tokenizer (synthetic models run on token ids only)")
        })
    }

    /// Decoded, preprocessed CHW pixels of an image file.
    pub fn pixels(&self, image: &Path) -> Result<Vec<f32>> {
        let img = vision::load_image(image)?;
        vision::preprocess(&img, &self.preprocess)
    }

    /// The image as the model sees it, before rescaling: resized and center-cropped 8-bit RGB, the
    /// base that heatmaps are drawn on.
    pub fn model_view(&self, image: &Path) -> Result<vision::RgbImage> {
        vision::resize_and_crop(&vision::load_image(image)?, &self.preprocess)
    }

    /// Expanded prompt ids for a question.
    pub fn prompt_ids(&self, question: &str) -> Result<Vec<u32>> {
        let cfg = self.config();
        self.text()?
            .prompt_ids(question, cfg.image_token_id, cfg.vision.num_patches())
    }

    pub fn generate(
        &self,
        image: &Path,
        question: &str,
        opts: &GenerateOptions,
    ) -> Result<Generation> {
        self.generate_observed(image, question, opts, &mut |_| {})
    }

    /// [`Self::generate`], reporting progress to `observer`.
    pub fn generate_observed(
        &self,
        image: &Path,
        question: &str,
        opts: &GenerateOptions,
        observer: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        self.generate_request(&Request::Question { image, question }, opts, observer)
    }

    /// Greedy generation for any [`Request`].
    pub fn generate_request(
        &self,
        req: &Request<'_>,
        opts: &GenerateOptions,
        observer: &mut dyn FnMut(Event),
    ) -> Result<Generation> {
        let (input_ids, pixels) = self.resolve(req)?;
        let g =
            self.model
                .generate_ids_observed(&self.backend, &input_ids, &pixels, opts, observer)?;
        let text = self.decode(&g.generated_ids)?;
        Ok(Generation {
            input_ids,
            generated_ids: g.generated_ids,
            text,
            stop_reason: g.stop_reason,
            timings: g.timings,
        })
    }

    /// Prompt ids and pixel values for a request.
    pub fn resolve(&self, req: &Request<'_>) -> Result<(Vec<u32>, Vec<f32>)> {
        match *req {
            Request::Question { image, question } => {
                Ok((self.prompt_ids(question)?, self.pixels(image)?))
            }
            Request::Ids { n_text, seed } => {
                let cfg = self.config();
                let n_img = cfg.vision.num_patches();
                let vocab = cfg.text.vocab_size as u64;
                let mut rng = crate::model::SplitMix64::new(seed);
                let mut ids = vec![cfg.bos_token_id];
                ids.extend(std::iter::repeat_n(cfg.image_token_id, n_img));
                // Ordinary text ids: below the image token, which the llava-hf vocabularies
                // place after the base vocabulary.
                let text_vocab = vocab.min(cfg.image_token_id as u64).max(4);
                ids.extend((0..n_text).map(|_| 3 + (rng.next_u64() % (text_vocab - 3)) as u32));
                let side = cfg.vision.image_size;
                let pixels = (0..3 * side * side)
                    .map(|_| 2.0 * rng.uniform_sym())
                    .collect();
                Ok((ids, pixels))
            }
        }
    }

    /// Text of generated ids: the tokenizer's decoding, or the ids themselves for a synthetic
    /// model, which has no tokenizer.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.text {
            Some(t) => t.decode(ids),
            None => Ok(ids
                .iter()
                .map(|id| format!("<{id}>"))
                .collect::<Vec<_>>()
                .join("")),
        }
    }

    fn token_text(&self, id: u32) -> String {
        match &self.text {
            Some(t) => t.token_text(id),
            None => format!("<{id}>"),
        }
    }

    /// Greedy generation with a relevancy map per generated token.
    pub fn explain_observed(
        &self,
        image: &Path,
        question: &str,
        opts: &GenerateOptions,
        method: Method,
        observer: &mut dyn FnMut(Event),
    ) -> Result<Explained> {
        self.explain_request(
            &Request::Question { image, question },
            opts,
            method,
            observer,
        )
    }

    /// Greedy generation with a relevancy map per generated token, for any [`Request`].
    pub fn explain_request(
        &self,
        req: &Request<'_>,
        opts: &GenerateOptions,
        method: Method,
        observer: &mut dyn FnMut(Event),
    ) -> Result<Explained> {
        let (input_ids, pixels) = self.resolve(req)?;
        let (b, m) = (&self.backend, &self.model);
        let e = match (method, &self.head) {
            (Method::FastRm, Some(head)) => {
                crate::explain::explain_fastrm(b, m, head, &input_ids, &pixels, opts, observer)?
            }
            (Method::FastRm, None) => {
                return Err(Error::input(
                    "no FastRM head loaded: pass --head FILE (head.safetensors)",
                ))
            }
            _ => crate::explain::explain_ids(b, m, &input_ids, &pixels, opts, method, observer)?,
        };
        let tokens: Vec<TokenMap> = e
            .generated_ids
            .iter()
            .zip(e.maps)
            .enumerate()
            .map(|(index, (&id, map))| TokenMap {
                index,
                id,
                text: self.token_text(id),
                entropy: crate::explain::map_entropy(&map),
                map,
            })
            .collect();
        let g = self.config().vision.grid();
        let threshold = match (method, &self.head) {
            (Method::FastRm, Some(h)) => h.cfg.confidence_threshold,
            _ => None,
        };
        let entropies: Vec<f32> = tokens.iter().map(|t: &TokenMap| t.entropy).collect();
        let confidence = Confidence::of_answer(
            &entropies,
            &e.generated_ids,
            &self.config().eos_token_ids,
            threshold,
        );
        Ok(Explained {
            generation: Generation {
                input_ids,
                text: self.decode(&e.generated_ids)?,
                generated_ids: e.generated_ids,
                stop_reason: e.stop_reason,
                timings: e.timings,
            },
            method,
            grid: (g, g),
            tokens,
            maps_s: e.maps_s,
            confidence,
        })
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }
}
