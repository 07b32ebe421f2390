//! LLaVA-1.5 = CLIP tower → projector (linear, GELU, linear) → image features spliced into the
//! prompt's embeddings at the image-token positions → Llama decoder; greedy generation.
//! LLaVA-NeXT runs the same program on each of an image's views (the squashed whole and its
//! tiles) and lays their features out by the image's [`ImageLayout`], a learned newline after
//! each row of the tiles' grid.

use super::clip::ClipVision;
use super::kv::KvPool;
use super::llama::Llama;
use super::sampling::Sampling;
use super::session::{concat_rows, Mode, Prompt, Session};
use super::WeightSource;
use crate::backend::Backend;
use crate::config::LlavaConfig;
use crate::error::{Error, Result};
use crate::vision::ImageLayout;

pub struct Projector<B: Backend> {
    w1: B::Tensor,
    b1: B::Tensor,
    w2: B::Tensor,
    b2: B::Tensor,
}

pub struct Llava<B: Backend> {
    pub cfg: LlavaConfig,
    pub vision: ClipVision<B>,
    pub projector: Projector<B>,
    pub llm: Llama<B>,
    /// `[1, D]` LLaVA-NeXT's row separator in an image's tiled features (`image_newline`).
    pub image_newline: Option<B::Tensor>,
    /// The KV cache every sequence of this model takes its pages from.
    pub kv: KvPool<B>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxNewTokens,
    /// The context (`max_position_embeddings`) is full.
    Context,
    /// A stop id or stop string ended the answer.
    Stop,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::Context => "context",
            StopReason::Stop => "stop",
        }
    }
}

/// What one greedy run produced at the id level.
pub struct IdGeneration {
    pub generated_ids: Vec<u32>,
    pub stop_reason: StopReason,
    /// Per step, when asked for: the logits row that chose each generated token.
    pub step_logits: Vec<Vec<f32>>,
    /// Per step, when asked for: the final-norm hidden state that produced each token.
    pub step_hidden: Vec<Vec<f32>>,
    pub timings: Timings,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Timings {
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop at an EOS id (default). Off: always run `max_new_tokens` steps (comparable timings).
    pub stop_at_eos: bool,
    /// Keep each step's logits and hidden state (tests, tools).
    pub keep_steps: bool,
    /// How each token is chosen (default: greedy).
    pub sampling: Sampling,
    /// Strings that end the answer where they first appear in its text (across token
    /// boundaries), left out of the text (checked by the engine's stream, which decodes).
    pub stop: Vec<String>,
}

impl GenerateOptions {
    /// The most stop strings a request may give, and their longest length in bytes.
    pub const MAX_STOPS: usize = 8;
    pub const MAX_STOP_BYTES: usize = 256;

    /// Errors name the option.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(Error::input("max_new_tokens must be at least 1"));
        }
        self.sampling.validate()?;
        if self.stop.len() > Self::MAX_STOPS {
            return Err(Error::input(format!(
                "at most {} stop strings, not {}",
                Self::MAX_STOPS,
                self.stop.len()
            )));
        }
        for s in &self.stop {
            if s.is_empty() || s.len() > Self::MAX_STOP_BYTES {
                return Err(Error::input(format!(
                    "a stop string must be 1 to {} bytes long, not {}",
                    Self::MAX_STOP_BYTES,
                    s.len()
                )));
            }
        }
        Ok(())
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            stop_at_eos: true,
            keep_steps: false,
            sampling: Sampling::default(),
            stop: Vec::new(),
        }
    }
}

impl<B: Backend> Llava<B> {
    pub fn load(b: &B, src: &dyn WeightSource<B>, cfg: &LlavaConfig) -> Result<Self> {
        let (dv, dt) = (cfg.vision.hidden_size, cfg.text.hidden_size);
        let projector = Projector {
            w1: src.get(
                b,
                "multi_modal_projector.linear_1.weight",
                &[dt, dv],
                dt,
                dv,
            )?,
            b1: src.get(b, "multi_modal_projector.linear_1.bias", &[dt], 1, dt)?,
            w2: src.get(
                b,
                "multi_modal_projector.linear_2.weight",
                &[dt, dt],
                dt,
                dt,
            )?,
            b2: src.get(b, "multi_modal_projector.linear_2.bias", &[dt], 1, dt)?,
        };
        let image_newline = match cfg.anyres {
            Some(_) => Some(src.get(b, "image_newline", &[dt], 1, dt)?),
            None => None,
        };
        Ok(Llava {
            vision: ClipVision::load(b, src, cfg)?,
            projector,
            image_newline,
            llm: Llama::load(b, src, cfg)?,
            kv: KvPool::new(&cfg.text),
            cfg: cfg.clone(),
        })
    }

    /// Vision features `[P, Dv]` and projected features `[P, D]` for one view's preprocessed CHW
    /// pixels (a LLaVA-1.5 image).
    pub fn encode_image(&self, b: &B, pixels: &[f32]) -> Result<(B::Tensor, B::Tensor)> {
        let feats = self.vision.forward(b, pixels)?;
        let proj = self.project(b, &feats)?;
        Ok((feats, proj))
    }

    fn project(&self, b: &B, feats: &B::Tensor) -> Result<B::Tensor> {
        let p = &self.projector;
        let h = b.gelu(&b.linear(feats, &p.w1, Some(&p.b1))?)?;
        b.linear(&h, &p.w2, Some(&p.b2))
    }

    /// An image's projected features in its token order, `[layout.tokens(), D]`, from its views'
    /// preprocessed CHW pixels (one view after another): each view through the tower, the
    /// projector over them all, then the tokens gathered as the layout places them.
    pub fn encode_layout(&self, b: &B, pixels: &[f32], layout: &ImageLayout) -> Result<B::Tensor> {
        let per = self.cfg.vision.pixels_per_image();
        let views = layout.views();
        if pixels.len() != views * per {
            return Err(Error::input(format!(
                "{} pixel values for an image of {views} views of {per}",
                pixels.len()
            )));
        }
        if let ImageLayout::Square { .. } = layout {
            return Ok(self.encode_image(b, pixels)?.1);
        }
        let newline = self.image_newline.as_ref().ok_or_else(|| {
            Error::input("a tiled image on a model without an image_newline embedding")
        })?;
        let feats = pixels
            .chunks(per)
            .map(|v| self.vision.forward(b, v))
            .collect::<Result<Vec<_>>>()?;
        let proj = self.project(b, &concat_rows(b, &feats)?)?;
        // The newline row goes last; the gather lays out every token, newlines included, at once.
        let rows = b.dims(&proj).0;
        let table = concat_rows(b, &[proj, b.slice_rows(newline, 0, 1)?])?;
        let idx: Vec<u32> = layout
            .token_sources()
            .into_iter()
            .map(|s| s.unwrap_or(rows) as u32)
            .collect();
        b.embedding(&table, &idx)
    }
    /// Prompt embeddings `[n, D]`: token embeddings with image `i`'s block of image-token rows
    /// replaced, in order, by its projected features `images[i]` `[P, D]`.
    pub fn embed_prompt(&self, b: &B, prompt: &Prompt, images: &[&B::Tensor]) -> Result<B::Tensor> {
        if images.len() != prompt.images() {
            return Err(Error::input(format!(
                "prompt holds {} images but {} were encoded",
                prompt.images(),
                images.len()
            )));
        }
        let mut x = b.embedding(&self.llm.embed, prompt.ids())?;
        for (img, positions) in images.iter().zip(prompt.image_spans()) {
            let (rows, _) = b.dims(img);
            let tokens = positions.len();
            if rows != tokens {
                return Err(Error::input(format!(
                    "an image's features have {rows} rows; the prompt gives it {tokens} tokens"
                )));
            }
            // Contiguous runs of the image's tokens, each one copy.
            let mut row = 0;
            while row < tokens {
                let start = positions[row];
                let n = positions[row..]
                    .iter()
                    .enumerate()
                    .take_while(|&(k, &p)| p == start + k)
                    .count();
                b.copy_rows_into(&mut x, start, &b.slice_rows(img, row, n)?)?;
                row += n;
            }
        }
        Ok(x)
    }

    /// Each image of `pixels` (preprocessed CHW values of its views, one image after another,
    /// laid out as `layouts` say) through the vision tower and the projector: projected features
    /// `[tokens, D]` per image.
    pub fn encode_images(
        &self,
        b: &B,
        pixels: &[f32],
        layouts: &[ImageLayout],
    ) -> Result<Vec<B::Tensor>> {
        let per = self.cfg.vision.pixels_per_image();
        let want: usize = layouts.iter().map(|l| l.views() * per).sum();
        if pixels.len() != want {
            return Err(Error::input(format!(
                "{} pixel values for {} images that take {want}",
                pixels.len(),
                layouts.len()
            )));
        }
        let mut at = 0;
        layouts
            .iter()
            .map(|l| {
                let n = l.views() * per;
                at += n;
                self.encode_layout(b, &pixels[at - n..at], l)
            })
            .collect()
    }

    /// Greedy generation from a prompt and preprocessed pixels: the image encoded, then one
    /// [`Session`] run to the end.
    pub fn generate(
        &self,
        b: &B,
        prompt: Prompt,
        pixels: &[f32],
        opts: &GenerateOptions,
    ) -> Result<IdGeneration> {
        // Synchronised at both ends so the clock times the tower's device work, not its queueing.
        b.synchronize()?;
        let t0 = std::time::Instant::now();
        let images = self.encode_images(b, pixels, prompt.layouts())?;
        b.synchronize()?;
        let vision_s = t0.elapsed().as_secs_f64();
        let images: Vec<&B::Tensor> = images.iter().collect();
        let mut s = Session::prefill_images(b, self, prompt, &images, opts, Mode::Plain)?;
        s.run_to_end()?;
        let mut g = s.finish();
        g.timings.vision_s = vision_s;
        Ok(g)
    }

    /// A prompt of these ids, checked against this model.
    pub fn prompt(&self, ids: Vec<u32>) -> Result<Prompt> {
        Prompt::new(&self.cfg, ids)
    }

    /// Teacher-forced full recompute (no reuse of a cache across calls): final hidden states of
    /// every position of `ids` `[N, D]`. The oracle's layout for parity tests.
    pub fn forward_full(&self, b: &B, ids: &[u32], pixels: &[f32]) -> Result<B::Tensor> {
        let prompt = Prompt::new(&self.cfg, ids.to_vec())?;
        let images = self.encode_images(b, pixels, prompt.layouts())?;
        let x = self.embed_prompt(b, &prompt, &images.iter().collect::<Vec<_>>())?;
        let mut kv = self.kv.admit(b, ids.len())?;
        self.llm.forward(b, x, &mut kv)
    }
}
