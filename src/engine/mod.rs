//! The public entry point: a model folder (HF `llava-hf` layout) opened on a backend, turning an
//! image and a question into an answer with a relevancy map per token — streamed ([`Stream`]) or
//! collected ([`Engine::generate`], [`Engine::explain`]). [`AnyEngine`] picks the backend at run
//! time.

mod any;
pub mod chat;
pub mod report;
mod scheduler;
mod stream;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::{with_memory_tag, Backend, MemTag};
use crate::checkpoint::{Checkpoint, DType, StoredTensor};
use crate::config::LlavaConfig;
use crate::error::{Error, Result};
use crate::explain::fastrm::{FastRmHead, HeadWeights};
pub use crate::model::session::{Mode, Prompt, Session};
use crate::model::{Llava, Synthetic};
use crate::text::{Role, TextProcessor, Turn};
use crate::vision::{self, ImageLayout, PreprocessConfig, RgbImage};

pub use crate::explain::{Confidence, Method};
pub use crate::model::llava::{GenerateOptions, StopReason, Timings};
pub use any::{
    check_synthetic_dtype, cpu_backend, with_backend, AnyBackend, AnyEngine, Device, Dtype,
    WithBackend,
};
pub use scheduler::{Scheduler, SeqId};
pub use stream::{
    collect, collect_items, CancelToken, Collected, Item, RunOptions, Stream, Summary,
    TokenLogprobs, TokenStep, TopLogprob,
};

/// A model on a backend, with its tokenizer, image preprocessing and (once loaded) FastRM head.
/// Its parts are read through accessors: an engine is changed only through its own calls.
pub struct Engine<B: Backend> {
    backend: B,
    model: Llava<B>,
    /// Absent for synthetic models, which run at the id level only.
    text: Option<TextProcessor>,
    preprocess: PreprocessConfig,
    dir: Option<PathBuf>,
    /// The FastRM head, once loaded with [`Engine::load_head`].
    head: Option<FastRmHead<B>>,
    /// Projected features of recently seen images ([`Engine::set_image_cache`]).
    images: std::sync::Mutex<ImageCache<B>>,
}

/// The last few images' projected features, most recently used first, each with the pixels it
/// was computed from: a hit compares the pixels themselves, so two different images never share
/// features (no hash to collide).
struct ImageCache<B: Backend> {
    capacity: usize,
    entries: std::collections::VecDeque<(Vec<f32>, ImageLayout, std::sync::Arc<B::Tensor>)>,
}

/// An image's projected features on the engine's backend ([`Engine::encode`]).
pub struct EncodedImage<B: Backend> {
    features: B::Tensor,
}

/// An image as a request carries it.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A PNG or JPEG file.
    Path(PathBuf),
    /// An encoded PNG or JPEG in memory (an upload, a `data:` URL's payload).
    Bytes(Vec<u8>),
    /// Already decoded 8-bit RGB.
    Decoded(RgbImage),
}

impl ImageInput {
    /// Decoded RGB; errors name the file, or `<bytes>` for an in-memory image.
    pub fn decode(&self) -> Result<RgbImage> {
        match self {
            ImageInput::Path(p) => vision::load_image(p),
            ImageInput::Bytes(b) => vision::load_image_bytes(b, Path::new("<bytes>")),
            ImageInput::Decoded(img) => Ok(img.clone()),
        }
    }

    /// What error messages call the image: its file, or what stands in for one.
    pub fn name(&self) -> PathBuf {
        match self {
            ImageInput::Path(p) => p.clone(),
            ImageInput::Bytes(_) => PathBuf::from("<bytes>"),
            ImageInput::Decoded(_) => PathBuf::from("<pixels>"),
        }
    }

    /// The file, when the image is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ImageInput::Path(p) => Some(p),
            _ => None,
        }
    }
}

impl From<&Path> for ImageInput {
    fn from(p: &Path) -> Self {
        ImageInput::Path(p.to_path_buf())
    }
}

impl From<PathBuf> for ImageInput {
    fn from(p: PathBuf) -> Self {
        ImageInput::Path(p)
    }
}

impl From<RgbImage> for ImageInput {
    fn from(img: RgbImage) -> Self {
        ImageInput::Decoded(img)
    }
}

/// What a run answers.
#[derive(Debug, Clone)]
pub enum Request {
    /// A question about an image (needs the model's tokenizer).
    Question { image: ImageInput, question: String },
    /// A conversation (system, user and assistant messages, rendered by LLaVA's chat template)
    /// and its images in the template's order ([`chat::Conversation`] reads OpenAI's `messages`):
    /// any number, in any user messages, each with its own patch span and its own map; none for
    /// a text-only conversation (answered, without maps).
    Chat {
        turns: Vec<Turn>,
        images: Vec<ImageInput>,
    },
    /// An id-level request for models without a tokenizer (synthetic weights): BOS, the image
    /// tokens, `n_text` seeded text ids, and seeded pixel values.
    Ids { n_text: usize, seed: u64 },
    /// A prompt and preprocessed CHW pixels made earlier ([`Engine::resolve`]; several images one
    /// after another): repeated runs of one request (benchmarks) skip decoding and tokenizing.
    Prepared { prompt: Prompt, pixels: Vec<f32> },
}

impl Request {
    pub fn question(image: impl Into<ImageInput>, question: impl Into<String>) -> Self {
        Request::Question {
            image: image.into(),
            question: question.into(),
        }
    }
}

/// Input errors about a decoded image (preprocessing) as image errors naming it.
fn name_image(image: &ImageInput, e: Error) -> Error {
    match e {
        Error::Input(msg) => Error::Image {
            path: image.name(),
            msg,
        },
        e => e,
    }
}

/// A finished generation, ready for JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub input_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
    /// One per generated token, when asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprobs>,
    /// How each of the prompt's images became its tokens.
    #[serde(skip)]
    pub layouts: Vec<ImageLayout>,
    /// The logits that chose the first token, when asked for ([`RunOptions::first_logits`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_step_logits: Option<Vec<f32>>,
}

/// One generated token with its relevancy map.
#[derive(Debug, Clone, Serialize)]
pub struct TokenMap {
    pub index: usize,
    pub id: u32,
    /// The token's own text (special tokens shown as themselves).
    pub text: String,
    /// How many images the map covers (the prompt's, in order).
    pub images: usize,
    /// Each image's layout: its token count and where its values lie on the picture.
    #[serde(skip)]
    pub layouts: Vec<ImageLayout>,
    /// Raw relevancy over the image tokens, image after image (row-major over a square view's
    /// grid; a tiled image's in its [`ImageLayout`]'s order, which [`ImageLayout::place`] puts
    /// on the picture).
    pub map: Vec<f32>,
    /// Normalised entropy of the whole map (every image's patches), in [0, 1] (see
    /// [`crate::explain::map_entropy`]).
    pub entropy: f32,
}

impl TokenMap {
    /// The map of each image, in the prompt's order.
    pub fn per_image(&self) -> Vec<&[f32]> {
        let mut rest = &self.map[..];
        self.layouts
            .iter()
            .map(|l| {
                let n = l.tokens();
                let (part, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                part
            })
            .collect()
    }

    /// Each image's map placed on its picture ([`ImageLayout::place`]): `(rows, cols)` and the
    /// values, row-major — a square view's patch grid as it is, a tiled image's kept-tile grid.
    pub fn placed(&self) -> Result<Vec<vision::Placed>> {
        self.per_image()
            .into_iter()
            .zip(&self.layouts)
            .map(|(part, layout)| layout.place(part))
            .collect()
    }
}

/// A finished explain run.
#[derive(Debug, Clone, Serialize)]
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
        let t0 = std::time::Instant::now();
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: "not a folder (expected a model folder with config.json and safetensors weights)".into(),
            });
        }
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let text = TextProcessor::from_dir(dir)?;
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
        if let Some(pins) = &preprocess.grid_pinpoints {
            let model = cfg.anyres.as_ref().map(|a| &a.pinpoints);
            if model != Some(pins) {
                return Err(Error::Config {
                    path: pp_path,
                    msg: format!(
                        "image_grid_pinpoints {pins:?} differ from config.json's {model:?}"
                    ),
                });
            }
        }
        let ck = Checkpoint::open(dir)?;
        backend.check_weight_memory(&ck.census())?;
        let model = with_memory_tag(&backend, MemTag::Weights, || {
            Llava::load(&backend, &ck, &cfg)
        })?;
        tracing::info!(
            dir = %dir.display(),
            backend = %backend.name(),
            parameters = ck.total_elements(),
            layers = cfg.text.num_hidden_layers,
            hidden = cfg.text.hidden_size,
            patches = cfg.vision.num_patches(),
            seconds = t0.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(Engine {
            backend,
            model,
            text: Some(text),
            preprocess,
            dir: Some(dir.to_path_buf()),
            head: None,
            images: Default::default(),
        })
    }

    /// Random weights of the shapes `cfg` implies; no tokenizer.
    pub fn synthetic(backend: B, cfg: &LlavaConfig, seed: u64) -> Result<Self> {
        let t0 = std::time::Instant::now();
        // Synthetic weights are drawn in f32 wherever they are made.
        backend.check_weight_memory(&[StoredTensor {
            dtype: DType::F32,
            rows: 1,
            cols: cfg.loaded_parameters(),
        }])?;
        let model = with_memory_tag(&backend, MemTag::Weights, || {
            Llava::load(&backend, &Synthetic { seed }, cfg)
        })?;
        tracing::info!(
            backend = %backend.name(),
            parameters = cfg.loaded_parameters(),
            seed,
            seconds = t0.elapsed().as_secs_f64(),
            "synthetic model made"
        );
        Ok(Engine {
            backend,
            model,
            text: None,
            preprocess: PreprocessConfig::clip(cfg.vision.image_size),
            dir: None,
            head: None,
            images: Default::default(),
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

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The model program: for tests and benches that drive its stages directly.
    pub fn model(&self) -> &Llava<B> {
        &self.model
    }

    /// The tokenizer and chat template; `None` for synthetic models.
    pub fn text(&self) -> Option<&TextProcessor> {
        self.text.as_ref()
    }

    pub fn preprocess(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// The model folder; `None` for synthetic models.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    /// The FastRM head, once loaded.
    pub fn head(&self) -> Option<&FastRmHead<B>> {
        self.head.as_ref()
    }

    /// An image decoded and preprocessed: its views' CHW pixels (one view after another) and how
    /// its tokens come from them.
    pub fn pixels(&self, image: &ImageInput) -> Result<(Vec<f32>, ImageLayout)> {
        self.inputs().pixels(image)
    }

    /// The image as the model sees it, before rescaling, the base that heatmaps are drawn on:
    /// resized and center-cropped 8-bit RGB (LLaVA-1.5), or the whole picture at the size its
    /// tiles hold it (LLaVA-NeXT; a tiled map covers the picture, the letterbox cut away).
    pub fn model_view(&self, image: &ImageInput) -> Result<vision::RgbImage> {
        let img = image.decode()?;
        let view = match &self.model.cfg.anyres {
            None => vision::resize_and_crop(&img, &self.preprocess),
            Some(a) => {
                let size = (img.height, img.width);
                let best = vision::anyres::best_resolution(size, &a.pinpoints);
                let (h, w) = vision::anyres::fitted_size(size, best);
                vision::resize_bicubic(&img, w, h)
            }
        };
        view.map_err(|e| name_image(image, e))
    }

    /// An image run through the vision tower and the projector once, for many runs over it
    /// ([`Engine::session`]): eval's perturbations answer the same question about one image
    /// hundreds of times with different patches hidden.
    pub fn encode(&self, pixels: &[f32]) -> Result<EncodedImage<B>> {
        let (_, features) = self.model.encode_image(&self.backend, pixels)?;
        Ok(EncodedImage { features })
    }

    /// A generation session over an [`EncodedImage`], prefilled: `Mode::Masked` hides prompt
    /// positions from attention, `Mode::SaveAll` keeps what the gradient methods' backwards need.
    pub fn session(
        &self,
        prompt: Prompt,
        image: &EncodedImage<B>,
        opts: &GenerateOptions,
        mode: Mode,
    ) -> Result<Session<'_, B>> {
        Session::prefill(
            &self.backend,
            &self.model,
            prompt,
            &image.features,
            opts,
            mode,
        )
    }

    /// The checked prompt of a question.
    pub fn prompt(&self, question: &str) -> Result<Prompt> {
        self.inputs().prompt(question)
    }

    /// The prompt and the preprocessed pixels of a request.
    pub fn resolve(&self, req: &Request) -> Result<(Prompt, Vec<f32>)> {
        self.inputs().resolve(req)
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            cfg: self.config(),
            text: self.text.as_ref(),
            preprocess: &self.preprocess,
        }
    }

    /// What turns requests into prompts and pixels, without the model: a server tokenises and
    /// preprocesses on its request threads with it, so the engine's thread only runs the model.
    pub fn preparer(&self) -> Preparer {
        Preparer {
            cfg: self.config().clone(),
            text: self.text.clone(),
            preprocess: self.preprocess.clone(),
        }
    }

    /// Text of generated ids: the tokenizer's decoding, or the ids themselves for a synthetic
    /// model, which has no tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.text {
            Some(t) => t.decode(ids),
            None => Ok(ids.iter().map(|id| format!("<{id}>")).collect()),
        }
    }

    /// A token's text and bytes as they stand inside the answer (see
    /// [`TextProcessor::token_piece`]); ids for a synthetic model.
    pub fn token_piece(&self, id: u32) -> (String, Vec<u8>) {
        match &self.text {
            Some(t) => t.token_piece(id),
            None => {
                let s = format!("<{id}>");
                let b = s.as_bytes().to_vec();
                (s, b)
            }
        }
    }

    /// A token's own text, as shown next to its map.
    pub fn token_text(&self, id: u32) -> String {
        match &self.text {
            Some(t) => t.token_text(id),
            None => format!("<{id}>"),
        }
    }

    /// Runs `req` step by step: see [`Stream`]. `opts.method` `None` is plain generation.
    pub fn stream<'e>(
        &'e self,
        req: &Request,
        opts: &RunOptions,
        cancel: &CancelToken,
    ) -> Stream<'e, B> {
        Stream::new(self, req.clone(), opts.clone(), cancel.clone())
    }

    /// Greedy generation, collected.
    pub fn generate(&self, req: &Request, opts: &GenerateOptions) -> Result<Generation> {
        let run = RunOptions {
            generate: opts.clone(),
            ..Default::default()
        };
        Ok(collect(self.stream(req, &run, &CancelToken::default()), &mut |_| {})?.generation)
    }

    /// Greedy generation with a relevancy map per generated token, collected; `observer` sees
    /// every item as it comes (progress displays).
    pub fn explain(
        &self,
        req: &Request,
        opts: &GenerateOptions,
        method: Method,
        observer: &mut dyn FnMut(&Item),
    ) -> Result<Explained> {
        let run = RunOptions {
            generate: opts.clone(),
            method: Some(method),
            ..Default::default()
        };
        let c = collect(self.stream(req, &run, &CancelToken::default()), observer)?;
        Ok(c.explained(method))
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// Fixes the KV cache at `bytes` (taken at its first use, never more; a sequence that does
    /// not fit gets [`Error::KvFull`]), or lets it grow with demand (`None`, the default). Refused
    /// while runs hold pages.
    pub fn set_kv_memory(&self, bytes: Option<u64>) -> Result<()> {
        self.model.kv.set_budget(&self.backend, bytes)
    }

    /// Keeps up to `bytes` of KV pages (whole pages) of finished prompts and answers, so a run
    /// whose prompt starts the same way — a conversation's next turn, another question about the
    /// same image, a shared system prompt — reads those positions instead of computing them
    /// (`None` or 0, the default: off, and the cache emptied). Plain and FastRM runs use it; the
    /// gradient methods and masked runs need every position computed. An image matches only
    /// through the image cache ([`Self::set_image_cache`]), which gives one set of features per
    /// picture: with it off, only the text before an image can match. Cached pages never turn a
    /// run away: one that needs room takes them, least recently used first.
    pub fn set_prefix_cache(&self, bytes: Option<u64>) {
        let per = self.model.kv.page_bytes(&self.backend) as u64;
        let pages = bytes.map_or(0, |b| b / per) as usize;
        self.model.kv.set_prefix_cache(pages);
    }

    /// Pages the prefix cache holds.
    pub fn prefix_pages(&self) -> usize {
        self.model.kv.prefix_pages()
    }

    /// Bytes one KV page takes ([`crate::model::kv::PAGE`] positions of every layer).
    pub fn kv_page_bytes(&self) -> usize {
        self.model.kv.page_bytes(&self.backend)
    }

    /// Keeps the projected features of the last `capacity` images (0, the default: none), so a
    /// run whose image was seen recently — a conversation's next turn resending it — skips the
    /// vision tower. Off by default because runs that time the tower (`profile`) must run it.
    pub fn set_image_cache(&self, capacity: usize) {
        let mut c = self.images.lock().unwrap_or_else(|e| e.into_inner());
        c.capacity = capacity;
        c.entries.truncate(capacity);
    }

    /// The features of an image's `pixels` laid out as `layout` says from the cache, or from the
    /// vision tower (then kept), and whether the tower ran.
    pub(crate) fn image_features(
        &self,
        pixels: &[f32],
        layout: &ImageLayout,
    ) -> Result<(std::sync::Arc<B::Tensor>, bool)> {
        let lock = || self.images.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut c = lock();
            let hit = c
                .entries
                .iter()
                .position(|(p, l, _)| l == layout && p[..] == *pixels);
            if let Some(i) = hit {
                let hit = c.entries.remove(i).expect("the position was just found");
                let features = std::sync::Arc::clone(&hit.2);
                c.entries.push_front(hit);
                return Ok((features, false));
            }
        }
        let features = self.model.encode_layout(&self.backend, pixels, layout)?;
        let features = std::sync::Arc::new(features);
        let mut c = lock();
        if c.capacity > 0 {
            let keep = c.capacity - 1;
            c.entries.truncate(keep);
            let entry = (
                pixels.to_vec(),
                layout.clone(),
                std::sync::Arc::clone(&features),
            );
            c.entries.push_front(entry);
        }
        Ok((features, true))
    }

    /// `(pages in use, pages the KV cache may hold)`; a page is [`crate::model::kv::PAGE`]
    /// positions of every layer.
    pub fn kv_usage(&self) -> (usize, usize) {
        self.model.kv.usage()
    }
}

/// What [`Engine::resolve`] needs, borrowed from an engine or owned by a [`Preparer`].
struct Inputs<'a> {
    cfg: &'a LlavaConfig,
    text: Option<&'a TextProcessor>,
    preprocess: &'a PreprocessConfig,
}

impl Inputs<'_> {
    fn pixels(&self, image: &ImageInput) -> Result<(Vec<f32>, ImageLayout)> {
        let img = image.decode()?;
        let layout = self.cfg.image_layout(img.height, img.width);
        let pixels = match &self.cfg.anyres {
            None => vision::preprocess(&img, self.preprocess),
            Some(a) => vision::anyres::preprocess_views(
                &img,
                self.preprocess,
                self.cfg.vision.image_size,
                &a.pinpoints,
            ),
        };
        Ok((pixels.map_err(|e| name_image(image, e))?, layout))
    }

    fn text(&self) -> Result<&TextProcessor> {
        self.text.ok_or_else(|| {
            Error::input("this model has no tokenizer (synthetic models run on token ids only)")
        })
    }

    /// A conversation's prompt and its images' pixels, one image after another.
    fn chat(&self, turns: &[Turn], images: &[ImageInput]) -> Result<(Prompt, Vec<f32>)> {
        let placed: usize = turns.iter().map(|t| t.images).sum();
        if placed != images.len() {
            return Err(Error::input(format!(
                "the messages place {placed} images but {} were given",
                images.len()
            )));
        }
        // A conversation with too many images for the context is refused before any of them
        // is decoded.
        self.check_fits(turns)?;
        let (mut pixels, mut layouts) = (Vec::new(), Vec::with_capacity(images.len()));
        for image in images {
            let (p, l) = self.pixels(image)?;
            pixels.extend(p);
            layouts.push(l);
        }
        Ok((self.chat_prompt(turns, layouts)?, pixels))
    }

    /// The prompt of a question about one square-view image (LLaVA-1.5's; a LLaVA-NeXT image's
    /// tokens depend on its size, so its prompt comes with the image: [`Request::Question`]).
    fn prompt(&self, question: &str) -> Result<Prompt> {
        let turns = question_turn(question)?;
        if self.cfg.anyres.is_some() {
            return Err(Error::input(
                "on this model an image's prompt depends on the image's size: ask with the image",
            ));
        }
        let grid = self.cfg.vision.grid();
        self.chat_prompt(&turns, vec![ImageLayout::Square { grid }])
    }

    /// A conversation's prompt, its images laid out as `layouts` say.
    fn chat_prompt(&self, turns: &[Turn], layouts: Vec<ImageLayout>) -> Result<Prompt> {
        let counts: Vec<usize> = layouts.iter().map(ImageLayout::tokens).collect();
        let ids = self
            .text()?
            .chat_ids(turns, self.cfg.image_token_id, &counts)?;
        Prompt::with_layouts(self.cfg, ids, layouts)
    }

    /// Whether a conversation can fit the context before its images are seen: each counted at
    /// the fewest tokens an image takes on this model (exact for LLaVA-1.5's square images).
    fn check_fits(&self, turns: &[Turn]) -> Result<()> {
        let n: usize = turns.iter().map(|t| t.images).sum();
        let fewest = self.cfg.vision.num_patches();
        let ids = self
            .text()?
            .chat_ids(turns, self.cfg.image_token_id, &vec![fewest; n])?;
        let ctx = self.cfg.text.max_position_embeddings;
        if ids.len() >= ctx {
            return Err(Error::ContextLength(format!(
                "the prompt is at least {} tokens ({} of them for {n} images) but the model's \
                 context is {ctx}; shorten the conversation or send fewer images",
                ids.len(),
                n * fewest
            )));
        }
        Ok(())
    }

    fn resolve(&self, req: &Request) -> Result<(Prompt, Vec<f32>)> {
        let cfg = self.cfg;
        match req {
            Request::Prepared { prompt, pixels } => {
                let prompt =
                    Prompt::with_layouts(cfg, prompt.ids().to_vec(), prompt.layouts().to_vec())?;
                let side = cfg.vision.image_size;
                let views: usize = prompt.layouts().iter().map(ImageLayout::views).sum();
                if pixels.len() != views * cfg.vision.pixels_per_image() {
                    return Err(Error::input(format!(
                        "prepared pixels: {} values for a prompt of {} images in {views} views; \
                         the model takes 3x{side}x{side} per view",
                        pixels.len(),
                        prompt.images()
                    )));
                }
                Ok((prompt, pixels.clone()))
            }
            Request::Question { image, question } => {
                self.chat(&question_turn(question)?, std::slice::from_ref(image))
            }
            Request::Chat { turns, images } => self.chat(turns, images),
            &Request::Ids { n_text, seed } => {
                // One picture of the tower's side (tiled, on LLaVA-NeXT, as such a picture is).
                let side = cfg.vision.image_size;
                let layout = cfg.image_layout(side, side);
                let n_img = layout.tokens();
                let vocab = cfg.text.vocab_size as u64;
                let mut rng = crate::util::SplitMix64::new(seed);
                let mut ids = vec![cfg.bos_token_id];
                ids.extend(std::iter::repeat_n(cfg.image_token_id, n_img));
                // Ordinary text ids: below the image token, which the llava-hf vocabularies
                // place after the base vocabulary.
                let text_vocab = vocab.min(cfg.image_token_id as u64).max(4);
                ids.extend((0..n_text).map(|_| 3 + (rng.next_u64() % (text_vocab - 3)) as u32));
                let pixels = (0..layout.views() * 3 * side * side)
                    .map(|_| 2.0 * rng.uniform_sym())
                    .collect();
                Ok((Prompt::with_layouts(cfg, ids, vec![layout])?, pixels))
            }
        }
    }
}

/// One user message: a question about one image.
fn question_turn(question: &str) -> Result<[Turn; 1]> {
    if question.trim().is_empty() {
        return Err(Error::input("the question is empty"));
    }
    Ok([Turn::new(Role::User, 1, question)])
}

/// An engine's tokenizer, preprocessing and configuration, owned and `Send`: turns requests into
/// a [`Request::Prepared`] away from the engine's thread ([`Engine::preparer`]).
#[derive(Clone)]
pub struct Preparer {
    cfg: LlavaConfig,
    text: Option<TextProcessor>,
    preprocess: PreprocessConfig,
}

impl Preparer {
    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            cfg: &self.cfg,
            text: self.text.as_ref(),
            preprocess: &self.preprocess,
        }
    }

    /// The request's prompt and pixels, checked as [`Engine::resolve`] checks them.
    pub fn prepare(&self, req: &Request) -> Result<Request> {
        let (prompt, pixels) = self.inputs().resolve(req)?;
        Ok(Request::Prepared { prompt, pixels })
    }

    /// Whether a conversation can fit the context with its images counted at the fewest
    /// tokens one takes, none decoded: a server refuses one that cannot before it decodes an image.
    pub fn check_fits(&self, turns: &[Turn]) -> Result<()> {
        self.inputs().check_fits(turns)
    }

    /// A conversation's checked prompt, its images laid out as `layouts` say.
    pub fn chat_prompt(&self, turns: &[Turn], layouts: Vec<ImageLayout>) -> Result<Prompt> {
        self.inputs().chat_prompt(turns, layouts)
    }

    /// An image's preprocessed views and layout (one image of a [`Request::Prepared`]).
    pub fn pixels(&self, image: &ImageInput) -> Result<(Vec<f32>, ImageLayout)> {
        self.inputs().pixels(image)
    }
}

impl<B: Backend> Default for ImageCache<B> {
    fn default() -> Self {
        ImageCache {
            capacity: 0,
            entries: Default::default(),
        }
    }
}
