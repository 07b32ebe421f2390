//! One generation session: a [`Prompt`] (ids and image span, checked once), a prefill, and greedy
//! decode steps. Every path that generates — `generate`, every explain method, distill, eval's
//! perturbation runs, profile — runs this one loop.
//!
//! The session is pulled, not pushed: [`Session::step`] chooses one token, and between steps the
//! caller reads what it needs on the device — the prompt's hidden states after prefill, the hidden
//! state and logits that chose the token, the saved activations and the KV cache for a backward —
//! and can stop at any point (cancellation, a client that left). What other engines pass as hooks
//! is the caller's own code between two steps.

use std::sync::Arc;
use std::time::Instant;

use super::kv::{SeqKv, PAGE};
use super::llama::{Pass, Saved};
use super::llava::{GenerateOptions, IdGeneration, StopReason, Timings};
use super::prefix::{PageKey, Tok};
use super::sampling::{Choice, Sampler};
use super::Llava;
use crate::backend::Backend;
use crate::config::LlavaConfig;
use crate::error::{Error, Result};
use crate::vision::ImageLayout;

/// An error naming `what` when `values` hold a NaN or an infinity: greedy decoding would go on
/// choosing token 0 from garbage and report success.
pub fn check_finite(values: &[f32], what: &str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite(format!(
            "{what} holds {} at element {i}: the weights (or the input) produce NaN/Inf",
            values[i]
        ))),
    }
}

/// Expanded prompt ids with the positions of their image tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    ids: Vec<u32>,
    image_pos: Vec<usize>,
    /// How each image became its tokens; image `i` holds the `i`-th block of image tokens.
    layouts: Vec<ImageLayout>,
}

impl Prompt {
    /// Checks `ids` against a model whose images are one square view each (LLaVA-1.5): a whole
    /// number of images' patch tokens (none for a text-only prompt), and what
    /// [`Prompt::with_layouts`] checks. A model whose images' token counts depend on their sizes
    /// (LLaVA-NeXT) takes text-only prompts here.
    pub fn new(cfg: &LlavaConfig, ids: Vec<u32>) -> Result<Self> {
        let n_img = ids.iter().filter(|&&i| i == cfg.image_token_id).count();
        let layout = cfg.image_layout(cfg.vision.image_size, cfg.vision.image_size);
        if n_img > 0 && cfg.anyres.is_some() {
            return Err(Error::input(format!(
                "the prompt has {n_img} image tokens; on this model an image's token count \
                 depends on its size, so the prompt needs its images' layouts"
            )));
        }
        let per = layout.tokens();
        if !n_img.is_multiple_of(per) {
            return Err(Error::input(format!(
                "prompt has {n_img} image tokens (id {}) but each image yields {per} features",
                cfg.image_token_id
            )));
        }
        Self::with_layouts(cfg, ids, vec![layout; n_img / per])
    }

    /// Checks `ids` against the model and its images' layouts: not empty, every id in the
    /// vocabulary, the image tokens exactly the layouts' (image `i` is the `i`-th block of
    /// `layouts[i].tokens()` of them), each layout the model's for its picture, and room in the
    /// context for at least one generated token.
    pub fn with_layouts(
        cfg: &LlavaConfig,
        ids: Vec<u32>,
        layouts: Vec<ImageLayout>,
    ) -> Result<Self> {
        let vocab = cfg.text.vocab_size;
        let ctx = cfg.text.max_position_embeddings;
        if ids.is_empty() {
            return Err(Error::input("the prompt is empty"));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::input(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        let image_pos: Vec<usize> = (0..ids.len())
            .filter(|&i| ids[i] == cfg.image_token_id)
            .collect();
        for l in &layouts {
            let want = match *l {
                ImageLayout::Square { .. } => {
                    cfg.image_layout(cfg.vision.image_size, cfg.vision.image_size)
                }
                ImageLayout::AnyRes { size, .. } => cfg.image_layout(size.0, size.1),
            };
            if *l != want {
                return Err(Error::input(format!(
                    "image layout {l:?} is not this model's ({want:?})"
                )));
            }
        }
        let tokens: usize = layouts.iter().map(ImageLayout::tokens).sum();
        if tokens != image_pos.len() {
            return Err(Error::input(format!(
                "prompt has {} image tokens (id {}) but its {} images yield {tokens} features",
                image_pos.len(),
                cfg.image_token_id,
                layouts.len()
            )));
        }
        if ids.len() >= ctx {
            return Err(Error::ContextLength(format!(
                "the prompt is {} tokens ({tokens} of them for {} images) but the model's \
                 context is {ctx}; shorten the conversation or send fewer images",
                ids.len(),
                layouts.len()
            )));
        }
        Ok(Prompt {
            ids,
            image_pos,
            layouts,
        })
    }

    /// How many images the prompt holds.
    pub fn images(&self) -> usize {
        self.layouts.len()
    }

    /// How each image became its tokens, in order.
    pub fn layouts(&self) -> &[ImageLayout] {
        &self.layouts
    }

    /// For each image token in order, its image and its index among that image's tokens.
    pub fn image_token_owners(&self) -> Vec<(usize, usize)> {
        self.layouts
            .iter()
            .enumerate()
            .flat_map(|(i, l)| (0..l.tokens()).map(move |k| (i, k)))
            .collect()
    }

    /// The prompt positions of each image's tokens.
    pub fn image_spans(&self) -> Vec<&[usize]> {
        let mut rest = &self.image_pos[..];
        self.layouts
            .iter()
            .map(|l| {
                let (span, tail) = rest.split_at(l.tokens());
                rest = tail;
                span
            })
            .collect()
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Positions of the image tokens, in order.
    pub fn image_positions(&self) -> &[usize] {
        &self.image_pos
    }

    /// The image columns of a row over positions (a relevance row) — the token's map.
    pub fn image_columns(&self, row: &[f32]) -> Vec<f32> {
        self.image_pos.iter().map(|&j| row[j]).collect()
    }

    /// KV-cache positions a run of at most `max_new` tokens needs within a context of `ctx`: the
    /// last generated token is never fed back.
    pub fn capacity(&self, max_new: usize, ctx: usize) -> usize {
        self.len()
            .saturating_add(max_new.max(1) - 1)
            .min(ctx)
            .max(self.len())
    }
}

/// How the decoder runs during a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Plain,
    /// The prompt positions `j` with `keep[j] == false` (one entry per prompt position) are hidden
    /// from attention in every layer, for the prefill and every decode step; generated positions
    /// are always visible (eval's perturbation tests remove image patches this way).
    Masked(Vec<bool>),
    /// Keep every position's saved activations (prefill and decode steps in one [`Saved`]) for
    /// backwards over the whole sequence after generation: the exact baseline and GradCAM.
    SaveAll,
    /// Keep only the latest forward's saved activations (the prefill's, then each decode step's):
    /// the incremental baseline's per-step backward.
    SaveStep,
}

/// A prefilled prompt and its greedy decode steps.
pub struct Session<'m, B: Backend> {
    b: &'m B,
    model: &'m Llava<B>,
    prompt: Prompt,
    opts: GenerateOptions,
    /// The key mask extended over the whole cache (generated positions visible).
    keep: Option<Vec<bool>>,
    mode: Mode,
    cache: SeqKv<'m, B>,
    saved: Option<Saved<B>>,
    /// `[n - cached, D]` final-norm hidden states of the prompt positions computed by the
    /// prefill, until the first decode forward.
    prompt_hidden: Option<B::Tensor>,
    /// Prompt positions read from the prefix cache (a multiple of the page size).
    cached: usize,
    /// `[k, D]` final-norm hidden states of the image positions below `cached`, from the cache.
    cached_image: Option<B::Tensor>,
    /// The images' features, when the run takes part in the prefix cache (their addresses name
    /// the images in the cache's keys).
    shared: Option<Vec<Arc<B::Tensor>>>,
    /// `[1, D]` the hidden state that chose the latest token (before the first step: the prompt's
    /// last position).
    last: B::Tensor,
    logits: Option<B::Tensor>,
    generated: Vec<u32>,
    stop: Option<StopReason>,
    timings: Timings,
    step_logits: Vec<Vec<f32>>,
    step_hidden: Vec<Vec<f32>>,
    sampler: Sampler,
    /// The latest token's choice (its log-probabilities when asked for).
    choice: Option<Choice>,
}

impl<'m, B: Backend> Session<'m, B> {
    /// Embeds the prompt with the projected image features `image` `[P, D]`
    /// ([`Llava::encode_image`]) and runs it through the decoder: [`Self::prefill_images`] of one
    /// image.
    pub fn prefill(
        b: &'m B,
        model: &'m Llava<B>,
        prompt: Prompt,
        image: &B::Tensor,
        opts: &GenerateOptions,
        mode: Mode,
    ) -> Result<Self> {
        Self::prefill_with(b, model, prompt, &[image], None, opts, mode)
    }

    /// Embeds the prompt with each of its images' projected features `[P, D]`, in order (none
    /// for a text-only prompt), and runs it through the decoder.
    pub fn prefill_images(
        b: &'m B,
        model: &'m Llava<B>,
        prompt: Prompt,
        images: &[&B::Tensor],
        opts: &GenerateOptions,
        mode: Mode,
    ) -> Result<Self> {
        Self::prefill_with(b, model, prompt, images, None, opts, mode)
    }

    /// A plain session through the model's prefix cache ([`KvPool::set_prefix_cache`]): the
    /// longest cached prefix of the prompt is read, not computed, and the prompt's full pages
    /// (then, when the run ends, its answer's) are cached for later runs. Each image is named in
    /// the cache by its features: the same features (the engine's image cache hands out one per
    /// picture) match, anything else does not.
    ///
    /// [`KvPool::set_prefix_cache`]: super::kv::KvPool::set_prefix_cache
    pub fn prefill_cached(
        b: &'m B,
        model: &'m Llava<B>,
        prompt: Prompt,
        images: &[Arc<B::Tensor>],
        opts: &GenerateOptions,
    ) -> Result<Self> {
        let refs: Vec<&B::Tensor> = images.iter().map(|a| &**a).collect();
        Self::prefill_with(b, model, prompt, &refs, Some(images), opts, Mode::Plain)
    }

    fn prefill_with(
        b: &'m B,
        model: &'m Llava<B>,
        prompt: Prompt,
        images: &[&B::Tensor],
        shared: Option<&[Arc<B::Tensor>]>,
        opts: &GenerateOptions,
        mode: Mode,
    ) -> Result<Self> {
        let mut p = Prefill::begin(b, model, prompt, images, shared, opts, mode)?;
        p.advance(usize::MAX)?;
        p.finish()
    }

    /// Chooses the next token (feeding the previous one back first) and returns it, or `None`
    /// once the run has stopped ([`Self::stop_reason`]): [`step_all`] of this session alone.
    pub fn step(&mut self) -> Result<Option<u32>> {
        step_all(&mut [self])?.remove(0)
    }

    /// Another continuation of this session's prompt, taken before the first token: the prompt's
    /// full KV pages shared, the partly filled one copied ([`SeqKv::fork`]), its own sampler
    /// seeded with `seed`. Its tokens are those a run of the same prompt with that seed gives
    /// alone. Plain sessions only (the masked and saving modes keep per-run state).
    pub fn fork(&self, seed: u64) -> Result<Session<'m, B>> {
        if self.mode != Mode::Plain {
            return Err(Error::input(
                "only plain and FastRM runs have several continuations (n)",
            ));
        }
        if !self.generated.is_empty() {
            return Err(Error::input("a run forks before its first token"));
        }
        let b = self.b;
        let copy = |t: &B::Tensor| b.slice_rows(t, 0, b.dims(t).0);
        let mut opts = self.opts.clone();
        opts.sampling.seed = seed;
        Ok(Session {
            b,
            model: self.model,
            prompt: self.prompt.clone(),
            sampler: Sampler::new(&opts.sampling),
            opts,
            keep: None,
            mode: Mode::Plain,
            cache: self.cache.fork(b, self.cache.capacity)?,
            saved: None,
            prompt_hidden: self.prompt_hidden.as_ref().map(copy).transpose()?,
            cached: self.cached,
            cached_image: self.cached_image.as_ref().map(copy).transpose()?,
            shared: self.shared.clone(),
            last: copy(&self.last)?,
            logits: None,
            generated: Vec::new(),
            stop: None,
            timings: self.timings,
            step_logits: Vec::new(),
            step_hidden: Vec::new(),
            choice: None,
        })
    }

    /// The token to feed back before the next choice, when there is one and the run goes on.
    fn pending(&self) -> Option<u32> {
        match self.stop {
            Some(_) => None,
            None => self.generated.last().copied(),
        }
    }

    /// Feeds the previous token back through the decoder alone (masked or saving runs).
    fn forward_alone(&mut self, prev: u32) -> Result<()> {
        let (b, llm) = (self.b, &self.model.llm);
        self.prompt_hidden = None;
        let x = b.embedding(&llm.embed, &[prev])?;
        let pass = self.keep.as_deref().map_or(Pass::Plain, Pass::Masked);
        if self.mode == Mode::SaveStep {
            self.saved = Some(Saved::new(self.cache.len, 1));
        }
        self.last = llm.run(b, x, &mut self.cache, pass, self.saved.as_mut())?;
        Ok(())
    }

    /// Chooses the next token from `logits` `[1, vocab]`, which [`Self::hidden`] gave.
    fn choose(&mut self, logits: B::Tensor) -> Result<u32> {
        let b = self.b;
        let index = self.generated.len();
        if index > 0 {
            check_finite(
                &b.download(&self.last)?,
                &format!("the hidden state that chooses token {index}"),
            )?;
        }
        // The whole row once (a non-finite lm_head row shows there); after that the hidden state
        // each step is the cheaper check of everything upstream.
        if index == 0 {
            check_finite(&b.download(&logits)?, "the logits of token 0")?;
        }
        // Greedy without log-probabilities needs only the device's argmax; anything else
        // chooses from the row on the host.
        let (next, row) = if self.opts.sampling.on_device() {
            (b.argmax_rows(&logits)?[0], None)
        } else {
            let row = b.download(&logits)?;
            let choice = self.sampler.choose(&row);
            let id = choice.id;
            self.choice = Some(choice);
            (id, Some(row))
        };
        if self.opts.keep_steps {
            self.step_logits.push(match row {
                Some(row) => row,
                None => b.download(&logits)?,
            });
            self.step_hidden.push(b.download(&self.last)?);
        }
        self.logits = Some(logits);
        self.generated.push(next);
        self.stop = self.check_stop();
        if self.stop.is_some() {
            self.remember_answer()?;
        }
        Ok(next)
    }

    /// At the end of a run in the prefix cache: its answer's full pages too, for the
    /// conversation's next turn (the prompt's are cached already; an image page no longer cached
    /// cannot be, its hidden states are gone).
    fn remember_answer(&self) -> Result<()> {
        let Some(imgs) = &self.shared else {
            return Ok(());
        };
        let keys = page_keys(&self.prompt, &self.generated, imgs, self.cache.len / PAGE);
        self.model
            .kv
            .remember(&self.cache, &keys, imgs, |_| Ok(None))
    }

    /// Whether greedy generation ends after the token just chosen.
    fn check_stop(&self) -> Option<StopReason> {
        let last = *self.generated.last()?;
        if self.opts.stop_at_eos && self.model.cfg.eos_token_ids.contains(&last) {
            Some(StopReason::Eos)
        } else if self.opts.sampling.stop_ids.contains(&last) {
            Some(StopReason::Stop)
        } else if self.generated.len() >= self.opts.max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else if self.cache.len >= self.cache.capacity {
            Some(StopReason::Context)
        } else {
            None
        }
    }

    /// Ends the run after the token just chosen, for `reason` (a stop string the caller found in
    /// the text: it names why the text ends even when the token also reached the length limit).
    pub fn stop_now(&mut self, reason: StopReason) -> Result<()> {
        self.stop = Some(reason);
        self.remember_answer()
    }

    /// How the latest token was chosen, when it was chosen on the host (sampling, penalties or
    /// log-probabilities); `None` for the device's greedy argmax.
    pub fn choice(&self) -> Option<&Choice> {
        self.choice.as_ref()
    }

    /// Runs the remaining steps.
    pub fn run_to_end(&mut self) -> Result<()> {
        while self.step()?.is_some() {}
        Ok(())
    }

    /// The id-level result (after [`Self::run_to_end`] or the caller's own steps).
    pub fn finish(self) -> IdGeneration {
        IdGeneration {
            generated_ids: self.generated,
            stop_reason: self.stop.unwrap_or(StopReason::MaxNewTokens),
            step_logits: self.step_logits,
            step_hidden: self.step_hidden,
            timings: self.timings,
        }
    }

    pub fn prompt(&self) -> &Prompt {
        &self.prompt
    }

    pub fn backend(&self) -> &'m B {
        self.b
    }

    pub fn model(&self) -> &'m Llava<B> {
        self.model
    }

    /// Prompt positions the prefill read from the prefix cache instead of computing.
    pub fn cached_len(&self) -> usize {
        self.cached
    }

    /// The final-norm hidden states of the image positions, `[P, D]` in order: available after
    /// prefill, until the first token is fed back (those below [`Self::cached_len`] come from
    /// the prefix cache).
    pub fn image_hidden(&self) -> Result<B::Tensor> {
        let b = self.b;
        let hidden = self.prompt_hidden.as_ref().ok_or_else(|| {
            Error::input("the prompt's hidden states are gone once decoding has started")
        })?;
        let rows: Vec<u32> = self
            .prompt
            .image_pos
            .iter()
            .filter(|&&j| j >= self.cached)
            .map(|&j| (j - self.cached) as u32)
            .collect();
        let computed = b.embedding(hidden, &rows)?;
        match &self.cached_image {
            None => Ok(computed),
            Some(c) => concat_rows_opt(b, &[b.slice_rows(c, 0, b.dims(c).0)?, computed])
                .map(|t| t.expect("two parts")),
        }
    }

    /// `[1, D]`: the final-norm hidden state that chose the latest token.
    pub fn hidden(&self) -> &B::Tensor {
        &self.last
    }

    /// `[1, vocab]`: the logits that chose the latest token.
    pub fn logits(&self) -> Option<&B::Tensor> {
        self.logits.as_ref()
    }

    /// What the saving modes kept: with [`Mode::SaveAll`] every position so far; with
    /// [`Mode::SaveStep`] the forward that produced [`Self::hidden`].
    pub fn saved(&self) -> Option<&Saved<B>> {
        self.saved.as_ref()
    }

    pub fn cache(&self) -> &SeqKv<'m, B> {
        &self.cache
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Position of the hidden state that chose generated token `index`.
    pub fn position_of(&self, index: usize) -> usize {
        self.prompt.len() - 1 + index
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }
}

/// A prompt on its way through the decoder, in chunks of rows ([`Prefill::advance`]), so that a
/// scheduler can run decode steps of other sequences between them; [`Prefill::finish`] makes the
/// session. Every row computes what a whole prefill computes for it (to rounding: a chunk is
/// another row count for the same products); the KV pages are all taken at [`Prefill::begin`].
pub struct Prefill<'m, B: Backend> {
    b: &'m B,
    model: &'m Llava<B>,
    prompt: Prompt,
    opts: GenerateOptions,
    keep: Option<Vec<bool>>,
    mode: Mode,
    cache: SeqKv<'m, B>,
    saved: Option<Saved<B>>,
    /// `[rows, D]`: the embedded rows past the cached ones (taken whole by a one-chunk prefill).
    x: Option<B::Tensor>,
    rows: usize,
    /// Rows of `x` already run.
    done: usize,
    /// The final-norm hidden states of the chunks run so far.
    hidden: Vec<B::Tensor>,
    cached: usize,
    cached_image: Option<B::Tensor>,
    shared: Option<Vec<Arc<B::Tensor>>>,
    /// Seconds of work so far (not the wall time between chunks).
    secs: f64,
}

impl<'m, B: Backend> Prefill<'m, B> {
    /// Checks the request, takes the KV pages (reading the prompt's longest cached prefix when
    /// `shared` names its images for the prefix cache) and embeds the prompt; no decoder row runs
    /// yet. [`Error::KvFull`] when the pool has no room now: nothing has been done.
    pub fn begin(
        b: &'m B,
        model: &'m Llava<B>,
        prompt: Prompt,
        images: &[&B::Tensor],
        shared: Option<&[Arc<B::Tensor>]>,
        opts: &GenerateOptions,
        mode: Mode,
    ) -> Result<Self> {
        opts.validate()?;
        if images.len() != prompt.images() {
            return Err(Error::input(format!(
                "the prompt holds {} images but {} were given",
                prompt.images(),
                images.len()
            )));
        }
        let t0 = Instant::now();
        let n = prompt.len();
        let capacity = prompt.capacity(opts.max_new_tokens, model.cfg.text.max_position_embeddings);
        let keep = match &mode {
            Mode::Masked(k) if k.len() != n => {
                return Err(Error::input(format!(
                    "key mask has {} entries for a prompt of {n} positions",
                    k.len()
                )))
            }
            Mode::Masked(k) => {
                let mut v = k.clone();
                v.resize(capacity, true);
                Some(v)
            }
            _ => None,
        };
        if shared.is_some() && mode != Mode::Plain {
            return Err(Error::input("the prefix cache serves plain sessions only"));
        }
        // Pages first: a run that must wait for them has done no work yet.
        let (cache, cached_image) = match shared {
            Some(imgs) => {
                // The last position is always computed: its hidden state chooses token 0.
                let keys = page_keys(&prompt, &[], imgs, (n - 1) / PAGE);
                let hit = model.kv.admit_prefix(b, capacity, &keys)?;
                (hit.kv, concat_rows_opt(b, &hit.image_hidden)?)
            }
            None => (model.kv.admit(b, capacity)?, None),
        };
        let cached = cache.len;
        let mut x = model.embed_prompt(b, &prompt, images)?;
        if cached > 0 {
            x = b.slice_rows(&x, cached, n - cached)?;
        }
        let saved = match mode {
            Mode::SaveAll => Some(Saved::new(0, capacity)),
            Mode::SaveStep => Some(Saved::new(0, n)),
            _ => None,
        };
        Ok(Prefill {
            b,
            model,
            prompt,
            opts: opts.clone(),
            keep,
            mode,
            cache,
            saved,
            rows: n - cached,
            x: Some(x),
            done: 0,
            hidden: Vec::new(),
            cached,
            cached_image,
            shared: shared.map(<[_]>::to_vec),
            secs: t0.elapsed().as_secs_f64(),
        })
    }

    /// Prompt rows still to run.
    pub fn remaining(&self) -> usize {
        self.rows - self.done
    }

    /// Runs the next `rows` rows (at most what remains) through the decoder.
    pub fn advance(&mut self, rows: usize) -> Result<()> {
        let t0 = Instant::now();
        let b = self.b;
        let rows = rows.min(self.remaining());
        if rows == 0 {
            return Ok(());
        }
        let x = if rows == self.rows {
            // The whole prompt at once: the embedded rows are the input as they are.
            self.x.take()
        } else {
            match &self.x {
                Some(x) => Some(b.slice_rows(x, self.done, rows)?),
                None => None,
            }
        }
        .ok_or_else(|| Error::input("the prefill's rows were already run"))?;
        let pass = self.keep.as_deref().map_or(Pass::Plain, Pass::Masked);
        let hidden = self
            .model
            .llm
            .run(b, x, &mut self.cache, pass, self.saved.as_mut())?;
        self.hidden.push(hidden);
        self.done += rows;
        self.secs += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The session, once every row has run: its first token's hidden state checked, the
    /// prompt's full pages offered to the prefix cache.
    pub fn finish(self) -> Result<Session<'m, B>> {
        let t0 = Instant::now();
        let b = self.b;
        if self.remaining() > 0 {
            return Err(Error::input(format!(
                "the prefill has {} rows still to run",
                self.remaining()
            )));
        }
        let (prompt, cached) = (self.prompt, self.cached);
        let n = prompt.len();
        let hidden = stack_rows(b, self.hidden)?;
        let last = b.slice_rows(&hidden, n - 1 - cached, 1)?;
        check_finite(
            &b.download(&last)?,
            "the hidden state at the end of prefill",
        )?;
        if let Some(imgs) = &self.shared {
            let keys = page_keys(&prompt, &[], imgs, n / PAGE);
            self.model.kv.remember(&self.cache, &keys, imgs, |page| {
                // The others' image rows are in this prefill's hidden states. Pages below
                // `cached` were read from the cache; one evicted meanwhile has its image rows
                // nowhere at hand, so the chain stops there.
                if page < cached / PAGE {
                    return Ok(None);
                }
                let rows: Vec<u32> = prompt
                    .image_positions()
                    .iter()
                    .filter(|&&j| j / PAGE == page && j >= cached)
                    .map(|&j| (j - cached) as u32)
                    .collect();
                Ok(Some(b.embedding(&hidden, &rows)?))
            })?;
        }
        let sampler = Sampler::new(&self.opts.sampling);
        Ok(Session {
            b,
            model: self.model,
            prompt,
            opts: self.opts,
            keep: self.keep,
            mode: self.mode,
            cache: self.cache,
            saved: self.saved,
            prompt_hidden: Some(hidden),
            cached,
            cached_image: self.cached_image,
            shared: self.shared,
            last,
            logits: None,
            generated: Vec::new(),
            stop: None,
            timings: Timings {
                prefill_s: self.secs + t0.elapsed().as_secs_f64(),
                ..Default::default()
            },
            step_logits: Vec::new(),
            step_hidden: Vec::new(),
            sampler,
            choice: None,
        })
    }
}

/// Advances every session by one token: one result per session, in order — its token, `None` when
/// it had already stopped, or the error that ended it (a non-finite hidden state). The plain
/// sessions that feed a token back go through one batched decoder step ([`Llama::decode`]) and one
/// lm_head product; masked and saving sessions, and sessions choosing their first token, run
/// alone. A session's token is the one it chooses alone: every row's arithmetic is independent of
/// its batch-mates. An error of the batched step itself (the backend's) fails the call.
///
/// [`Llama::decode`]: super::llama::Llama::decode
pub fn step_all<'m, B: Backend>(
    sessions: &mut [&mut Session<'m, B>],
) -> Result<Vec<Result<Option<u32>>>> {
    let t0 = Instant::now();
    let Some(first) = sessions.first() else {
        return Ok(Vec::new());
    };
    let (b, model) = (first.b, first.model);
    let llm = &model.llm;
    if sessions.iter().any(|s| !std::ptr::eq(s.model, model)) {
        return Err(Error::input(
            "sessions stepped together must share one model",
        ));
    }
    let mut results: Vec<Option<Result<Option<u32>>>> = sessions.iter().map(|_| None).collect();
    let mut batch: Vec<usize> = Vec::new();
    for (i, s) in sessions.iter_mut().enumerate() {
        if s.stop.is_some() {
            results[i] = Some(Ok(None));
            continue;
        }
        match s.pending() {
            Some(_) if s.mode == Mode::Plain => batch.push(i),
            Some(prev) => {
                if let Err(e) = s.forward_alone(prev) {
                    results[i] = Some(Err(e));
                }
            }
            None => {}
        }
    }
    // The batch: one embedding, one decoder step, one lm_head product.
    let mut batch_logits = None;
    if !batch.is_empty() {
        let ids: Vec<u32> = batch
            .iter()
            .filter_map(|&i| sessions[i].pending())
            .collect();
        let x = b.embedding(&llm.embed, &ids)?;
        let mut kvs: Vec<&mut SeqKv<'m, B>> = Vec::with_capacity(batch.len());
        for (i, s) in sessions.iter_mut().enumerate() {
            if batch.contains(&i) {
                s.prompt_hidden = None;
                kvs.push(&mut s.cache);
            }
        }
        let hidden = llm.decode(b, x, &mut kvs)?;
        for (r, &i) in batch.iter().enumerate() {
            sessions[i].last = b.slice_rows(&hidden, r, 1)?;
        }
        batch_logits = Some(llm.logits(b, &hidden)?);
    }
    for (i, s) in sessions.iter_mut().enumerate() {
        if results[i].is_some() {
            continue;
        }
        let logits = match (&batch_logits, batch.iter().position(|&j| j == i)) {
            (Some(all), Some(r)) => b.slice_rows(all, r, 1),
            _ => llm.logits(b, &s.last),
        };
        results[i] = Some(logits.and_then(|l| s.choose(l)).map(Some));
    }
    let secs = t0.elapsed().as_secs_f64();
    for (s, r) in sessions.iter_mut().zip(&results) {
        if !matches!(r, Some(Ok(None))) {
            s.timings.decode_s += secs;
        }
    }
    Ok(results.into_iter().map(|r| r.unwrap_or(Ok(None))).collect())
}

/// The cache keys of the first `pages` full pages of `prompt` followed by `generated`; image `i`'s
/// patches are named by `images[i]`'s address.
fn page_keys<T>(
    prompt: &Prompt,
    generated: &[u32],
    images: &[Arc<T>],
    pages: usize,
) -> Vec<PageKey> {
    let owners = prompt.image_token_owners();
    let mut next_image = prompt.image_pos.iter().enumerate().peekable();
    let toks = prompt
        .ids
        .iter()
        .enumerate()
        .map(|(j, &id)| match next_image.next_if(|&(_, &p)| p == j) {
            Some((k, _)) => Tok::Image {
                image: Arc::as_ptr(&images[owners[k].0]) as usize,
                patch: owners[k].1 as u32,
            },
            None => Tok::Text(id),
        })
        .chain(generated.iter().map(|&id| Tok::Text(id)))
        .collect::<Vec<_>>();
    toks.chunks_exact(PAGE)
        .take(pages)
        .map(|c| c.try_into().expect("a chunk of PAGE"))
        .collect()
}

/// The chunks' rows as one tensor (the only chunk as it is).
fn stack_rows<B: Backend>(b: &B, mut parts: Vec<B::Tensor>) -> Result<B::Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    concat_rows(b, &parts)
}

/// `parts` (at least one) stacked into one tensor.
pub(crate) fn concat_rows<B: Backend>(b: &B, parts: &[B::Tensor]) -> Result<B::Tensor> {
    concat_rows_opt(b, parts)?.ok_or_else(|| Error::input("no rows to stack"))
}

/// `parts` stacked into one tensor (`None` for no parts).
fn concat_rows_opt<B: Backend>(b: &B, parts: &[B::Tensor]) -> Result<Option<B::Tensor>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    if parts.len() == 1 {
        return Ok(Some(b.slice_rows(first, 0, b.dims(first).0)?));
    }
    let rows: usize = parts.iter().map(|t| b.dims(t).0).sum();
    let mut out = b.zeros(rows, b.dims(first).1)?;
    let mut at = 0;
    for t in parts {
        b.copy_rows_into(&mut out, at, t)?;
        at += b.dims(t).0;
    }
    Ok(Some(out))
}
