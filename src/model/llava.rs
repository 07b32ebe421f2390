//! LLaVA-1.5 = CLIP tower → projector (linear, GELU, linear) → image features spliced into the
//! prompt's embeddings at the image-token positions → Llama decoder; greedy generation.

use super::clip::ClipVision;
use super::llama::{KvCache, Llama};
use super::WeightSource;
use crate::backend::Backend;
use crate::config::LlavaConfig;
use crate::error::{Error, Result};

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
}

/// Per-step access to the decoder's final-norm hidden states during generation, on the device
/// (what the FastRM head reads). Both methods default to doing nothing.
pub trait StepHook<B: Backend> {
    /// After prefill: the prompt's hidden states `[n, D]`.
    fn prefilled(&mut self, _b: &B, _hidden: &B::Tensor) -> Result<()> {
        Ok(())
    }
    /// Token `index` was chosen from `hidden` `[1, D]`, the state at the position before it.
    fn token(&mut self, _b: &B, _index: usize, _hidden: &B::Tensor) -> Result<()> {
        Ok(())
    }
}

impl<B: Backend> StepHook<B> for () {}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxNewTokens,
    /// The context (`max_position_embeddings`) is full.
    Context,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::Context => "context",
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

#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// What a generation run reports as it goes, for progress displays and per-token consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The vision tower and projector are done.
    ImageEncoded,
    /// The prompt has been run through the decoder.
    Prefilled { prompt_len: usize },
    /// Token `index` (0-based) was chosen.
    Token { index: usize, id: u32 },
    /// The relevancy map of token `index` is done (explain runs).
    Explained { index: usize },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop at an EOS id (default). Off: always run `max_new_tokens` steps (comparable timings).
    pub stop_at_eos: bool,
    /// Keep each step's logits and hidden state (tests, tools).
    pub keep_steps: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            stop_at_eos: true,
            keep_steps: false,
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
        Ok(Llava {
            vision: ClipVision::load(b, src, cfg)?,
            projector,
            llm: Llama::load(b, src, cfg)?,
            cfg: cfg.clone(),
        })
    }

    /// Vision features `[P, Dv]` and projected features `[P, D]` for preprocessed CHW pixels.
    pub fn encode_image(&self, b: &B, pixels: &[f32]) -> Result<(B::Tensor, B::Tensor)> {
        let feats = self.vision.forward(b, pixels)?;
        let p = &self.projector;
        let h = b.gelu(&b.linear(&feats, &p.w1, Some(&p.b1))?)?;
        let proj = b.linear(&h, &p.w2, Some(&p.b2))?;
        Ok((feats, proj))
    }

    /// Prompt embeddings `[n, D]`: token embeddings with the image-token rows replaced, in order, by
    /// the projected image features. The prompt must hold exactly one run-length's worth of image
    /// tokens (`n_patches`) — anything else means the prompt and the image disagree.
    pub fn embed_prompt(&self, b: &B, ids: &[u32], image: &B::Tensor) -> Result<B::Tensor> {
        let vocab = self.cfg.text.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::input(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        let img_id = self.cfg.image_token_id;
        let (n_img, _) = b.dims(image);
        let count = ids.iter().filter(|&&i| i == img_id).count();
        if count != n_img {
            return Err(Error::input(format!(
                "prompt has {count} image tokens (id {img_id}) but the image yields {n_img} features"
            )));
        }
        let mut x = b.embedding(&self.llm.embed, ids)?;
        // Copy feature rows run by run (LLaVA-1.5 prompts have one run; any layout works).
        let mut feat_row = 0;
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != img_id {
                i += 1;
                continue;
            }
            let start = i;
            while i < ids.len() && ids[i] == img_id {
                i += 1;
            }
            let run = b.slice_rows(image, feat_row, i - start)?;
            b.copy_rows_into(&mut x, start, &run)?;
            feat_row += i - start;
        }
        Ok(x)
    }

    /// Greedy generation from expanded prompt ids and preprocessed pixels.
    pub fn generate_ids(
        &self,
        b: &B,
        ids: &[u32],
        pixels: &[f32],
        opts: &GenerateOptions,
    ) -> Result<IdGeneration> {
        self.generate_ids_observed(b, ids, pixels, opts, &mut |_| {})
    }

    /// [`Self::generate_ids`], reporting each phase and token to `observer` as it happens.
    pub fn generate_ids_observed(
        &self,
        b: &B,
        ids: &[u32],
        pixels: &[f32],
        opts: &GenerateOptions,
        observer: &mut dyn FnMut(Event),
    ) -> Result<IdGeneration> {
        self.generate_ids_hooked(b, ids, pixels, opts, observer, &mut ())
    }

    /// [`Self::generate_ids_observed`] that also hands the hidden states, on the device, to `hook`:
    /// the prompt's after prefill and each generated token's as it is chosen.
    pub fn generate_ids_hooked(
        &self,
        b: &B,
        ids: &[u32],
        pixels: &[f32],
        opts: &GenerateOptions,
        observer: &mut dyn FnMut(Event),
        hook: &mut dyn StepHook<B>,
    ) -> Result<IdGeneration> {
        self.check_request(ids, opts)?;
        let t0 = std::time::Instant::now();
        let (_, image) = self.encode_image(b, pixels)?;
        let vision_s = t0.elapsed().as_secs_f64();
        observer(Event::ImageEncoded);
        let mut g = self.generate_from_features(b, ids, &image, opts, None, observer, hook)?;
        g.timings.vision_s = vision_s;
        Ok(g)
    }

    /// Greedy generation from expanded prompt ids and already projected image features `[P, D]`
    /// ([`Self::encode_image`]'s second output), so one image encoding can serve many runs.
    ///
    /// `key_keep`: when given, the prompt positions `j` with `key_keep[j] == false` are hidden from
    /// attention in every layer, for the prefill and every decode step
    /// ([`crate::backend::Backend::attention_masked`]); generated positions are always visible.
    /// Its length must be the prompt's. `None` runs the plain (unmasked) attention op.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_from_features(
        &self,
        b: &B,
        ids: &[u32],
        image: &B::Tensor,
        opts: &GenerateOptions,
        key_keep: Option<&[bool]>,
        observer: &mut dyn FnMut(Event),
        hook: &mut dyn StepHook<B>,
    ) -> Result<IdGeneration> {
        let ctx = self.cfg.text.max_position_embeddings;
        self.check_request(ids, opts)?;
        let mut timings = Timings::default();
        let t1 = std::time::Instant::now();
        let x = self.embed_prompt(b, ids, image)?;
        // The last generated token is never fed back, so `ids + max_new - 1` positions suffice.
        let capacity = (ids.len() + opts.max_new_tokens - 1).min(ctx);
        let keep: Option<Vec<bool>> = match key_keep {
            None => None,
            Some(k) if k.len() != ids.len() => {
                return Err(Error::input(format!(
                    "key mask has {} entries for a prompt of {} positions",
                    k.len(),
                    ids.len()
                )))
            }
            Some(k) => {
                let mut v = k.to_vec();
                v.resize(capacity.max(ids.len()), true);
                Some(v)
            }
        };
        let mut cache = KvCache::new(b, &self.cfg.text, capacity)?;
        let hidden = match &keep {
            None => self.llm.forward(b, x, &mut cache)?,
            Some(k) => self.llm.forward_masked(b, x, &mut cache, k)?,
        };
        let mut last = b.slice_rows(&hidden, ids.len() - 1, 1)?;
        hook.prefilled(b, &hidden)?;
        drop(hidden);
        timings.prefill_s = t1.elapsed().as_secs_f64();
        observer(Event::Prefilled {
            prompt_len: ids.len(),
        });

        let t2 = std::time::Instant::now();
        let mut out = IdGeneration {
            generated_ids: Vec::new(),
            stop_reason: StopReason::MaxNewTokens,
            step_logits: Vec::new(),
            step_hidden: Vec::new(),
            timings,
        };
        loop {
            let logits = self.llm.logits(b, &last)?;
            let next = b.argmax_rows(&logits)?[0];
            if opts.keep_steps {
                out.step_logits.push(b.download(&logits)?);
                out.step_hidden.push(b.download(&last)?);
            }
            out.generated_ids.push(next);
            hook.token(b, out.generated_ids.len() - 1, &last)?;
            observer(Event::Token {
                index: out.generated_ids.len() - 1,
                id: next,
            });
            if let Some(r) = self.stop_reason(opts, &out.generated_ids, cache.len) {
                out.stop_reason = r;
                break;
            }
            let x = b.embedding(&self.llm.embed, &[next])?;
            last = match &keep {
                None => self.llm.forward(b, x, &mut cache)?,
                Some(k) => self.llm.forward_masked(b, x, &mut cache, k)?,
            };
        }
        out.timings.decode_s = t2.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Rejects requests that cannot run: no tokens asked for, an empty prompt, or a prompt that
    /// leaves no room in the context for a generated token.
    pub fn check_request(&self, ids: &[u32], opts: &GenerateOptions) -> Result<()> {
        let ctx = self.cfg.text.max_position_embeddings;
        if opts.max_new_tokens == 0 {
            return Err(Error::input("max_new_tokens must be at least 1"));
        }
        if ids.is_empty() {
            return Err(Error::input("the prompt is empty"));
        }
        if ids.len() >= ctx {
            return Err(Error::input(format!(
                "the prompt is {} tokens (with the image's {} patch tokens) but the model's context is {ctx}; \
                 shorten the question",
                ids.len(),
                self.cfg.vision.num_patches()
            )));
        }
        Ok(())
    }

    /// Whether greedy generation ends after `generated` (the last id just chosen), with
    /// `cache_len` positions already in the KV cache.
    pub fn stop_reason(
        &self,
        opts: &GenerateOptions,
        generated: &[u32],
        cache_len: usize,
    ) -> Option<StopReason> {
        let last = *generated.last()?;
        if opts.stop_at_eos && self.cfg.eos_token_ids.contains(&last) {
            Some(StopReason::Eos)
        } else if generated.len() >= opts.max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else if cache_len >= self.cfg.text.max_position_embeddings {
            Some(StopReason::Context)
        } else {
            None
        }
    }

    /// Teacher-forced full recompute (no reuse of a cache across calls): final hidden states of
    /// every position of `ids` `[N, D]`. The oracle's layout for parity tests.
    pub fn forward_full(&self, b: &B, ids: &[u32], pixels: &[f32]) -> Result<B::Tensor> {
        let (_, image) = self.encode_image(b, pixels)?;
        let x = self.embed_prompt(b, ids, &image)?;
        let mut cache = KvCache::new(b, &self.cfg.text, ids.len())?;
        self.llm.forward(b, x, &mut cache)
    }
}
