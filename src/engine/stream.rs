//! The streaming run: one request worked step by step, each step an [`Item`] as soon as it exists.
//!
//! Order of items: [`Item::ImageEncoded`], [`Item::Prefilled`], one [`Item::Token`] per generated
//! token, then — for the exact baseline and GradCAM, whose backwards need the whole answer's
//! activations — one [`Item::Map`] per token after generation, and last [`Item::Done`]. FastRM and
//! the incremental baseline put each token's map in its `Token` item. A [`CancelToken`] stops the
//! run before its next unit of work (decoding the image, the vision tower, the prefill or a chunk
//! of it, a decode step, a map) with [`Error::Cancelled`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{Engine, Explained, Generation, Request, TokenMap};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::explain::{map_entropy, Confidence, Mapper, Method};
use crate::model::llava::{GenerateOptions, StopReason, Timings};
use crate::model::sampling::Choice;
use crate::model::session::{check_finite, Mode, Prefill, Prompt, Session};
use crate::vision::ImageLayout;

/// Stops a run from another thread: clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a run does.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub generate: GenerateOptions,
    /// The relevancy method; `None` generates only.
    pub method: Option<Method>,
    /// Attach the final-norm hidden states (what a FastRM head reads) to the items: the image
    /// positions' after prefill, each token's with its step (`fastrm distill`).
    pub hidden_states: bool,
    /// Keep the logits that chose the first token ([`Summary::first_step_logits`]): parity with
    /// another implementation checked from outside (`generate --json`).
    pub first_logits: bool,
}

/// One generated token, as soon as it exists.
#[derive(Debug, Clone, Serialize)]
pub struct TokenStep {
    pub index: usize,
    pub id: u32,
    /// The text this token adds to the answer: the deltas joined are exactly the answer's decoded
    /// text, spaces included. A byte-fallback token's text waits for the first token after its
    /// run of bytes (its delta is empty until then).
    pub text_delta: String,
    /// The token's map, for the methods that map during generation.
    pub map: Option<TokenMap>,
    /// With [`crate::model::sampling::Sampling::logprobs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<TokenLogprobs>,
    /// `[D]`, with [`RunOptions::hidden_states`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden: Option<Vec<f32>>,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub input_ids: Vec<u32>,
    /// Prompt positions read from the prefix cache rather than computed
    /// ([`super::Engine::set_prefix_cache`]).
    pub cached_tokens: usize,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
    /// Seconds spent on the maps alone (folds, scores, backwards).
    pub maps_s: f64,
    /// The answer's confidence, for runs with maps.
    pub confidence: Option<Confidence>,
    /// One per generated token, with [`crate::model::sampling::Sampling::logprobs`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprobs>,
    /// How each of the prompt's images became its tokens (where each token's map sits).
    #[serde(skip)]
    pub layouts: Vec<ImageLayout>,
    /// With [`RunOptions::first_logits`]: the logits that chose the first token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_step_logits: Option<Vec<f32>>,
}

/// A generated token's log-probability under the model and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprobs {
    /// The token as it stands in the answer (leading space included).
    pub token: String,
    /// Its bytes (one raw byte for a byte-fallback token).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub id: u32,
    /// The token as it would stand in the answer.
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Item {
    /// The vision tower and projector are done.
    ImageEncoded,
    /// The prompt has been run through the decoder (its first `cached_len` positions read from
    /// the prefix cache). `image_hidden` `[P·D]` with [`RunOptions::hidden_states`].
    Prefilled {
        prompt_len: usize,
        cached_len: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        image_hidden: Option<Vec<f32>>,
    },
    Token(TokenStep),
    /// A token's map made after generation (exact baseline, GradCAM).
    Map(TokenMap),
    Done(Summary),
}

enum State<'e, B: Backend> {
    Start(Request),
    Resolved {
        prompt: Prompt,
        pixels: Vec<f32>,
    },
    Encoded {
        prompt: Prompt,
        images: Vec<std::sync::Arc<B::Tensor>>,
    },
    /// The prompt partly run through the decoder (chunked prefill).
    Prefilling(Prefill<'e, B>),
    Decoding(Session<'e, B>),
    Maps(Session<'e, B>, usize),
    Finished,
}

/// The iterator [`Engine::stream`] returns. After an error or [`Item::Done`] it yields nothing.
pub struct Stream<'e, B: Backend> {
    engine: &'e Engine<B>,
    opts: RunOptions,
    cancel: CancelToken,
    state: State<'e, B>,
    mapper: Option<Mapper<'e, B>>,
    pending: VecDeque<Item>,
    timings: Timings,
    maps_s: f64,
    /// Text already given out in deltas.
    emitted: String,
    /// The answer's text once a stop string cut it.
    cut: Option<String>,
    logprobs: Vec<TokenLogprobs>,
    /// Per token: id and map entropy, for the confidence.
    entropies: Vec<f32>,
    first_step_logits: Option<Vec<f32>>,
    /// Prompt rows a unit of prefill work runs; `None`: the whole prompt in one unit.
    prefill_chunk: Option<usize>,
    /// Prompt rows the latest unit of work ran.
    prefilled_rows: usize,
}

impl<'e, B: Backend> Stream<'e, B> {
    pub(super) fn new(
        engine: &'e Engine<B>,
        req: Request,
        opts: RunOptions,
        cancel: CancelToken,
    ) -> Self {
        Stream {
            engine,
            opts,
            cancel,
            state: State::Start(req),
            mapper: None,
            pending: VecDeque::new(),
            timings: Timings::default(),
            maps_s: 0.0,
            emitted: String::new(),
            cut: None,
            logprobs: Vec::new(),
            entropies: Vec::new(),
            first_step_logits: None,
            prefill_chunk: None,
            prefilled_rows: 0,
        }
    }

    /// Runs the prompt through the decoder `rows` at a time, one chunk per unit of work
    /// ([`super::Scheduler::set_prefill_chunk`]).
    pub(super) fn set_prefill_chunk(&mut self, rows: Option<usize>) {
        self.prefill_chunk = rows;
    }

    /// Whether the run's next unit of work runs prompt rows through the decoder.
    pub(super) fn is_prefilling(&self) -> bool {
        matches!(self.state, State::Encoded { .. } | State::Prefilling(_))
    }

    /// Prompt rows the latest unit of work ran.
    pub(super) fn prefilled_rows(&self) -> usize {
        self.prefilled_rows
    }

    /// One unit of work; its items go to `pending`.
    fn advance(&mut self) -> Result<()> {
        let e = self.engine;
        let (b, model) = (&e.backend, &e.model);
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Start(req) => {
                // Every option checked before any work.
                self.opts.generate.validate()?;
                if let Some(m) = self.opts.method {
                    self.mapper = Some(Mapper::new(m, e.head.as_ref(), model)?);
                }
                let (prompt, pixels) = e.resolve(&req)?;
                if self.opts.method.is_some() && prompt.images() == 0 {
                    return Err(Error::input(
                        "the prompt holds no image: a relevancy map needs one (send an image, or \
                         ask without a map)",
                    ));
                }
                self.state = State::Resolved { prompt, pixels };
            }
            State::Resolved { prompt, pixels } => {
                let mut images = Vec::with_capacity(prompt.images());
                let mut tower_s = 0.0;
                let per_view = e.config().vision.pixels_per_image();
                let mut at = 0;
                for layout in prompt.layouts() {
                    let p = &pixels[at..at + layout.views() * per_view];
                    at += p.len();
                    let ((image, ran), secs) = timed(b, || e.image_features(p, layout))?;
                    // A cached image took no tower time.
                    tower_s += if ran { secs } else { 0.0 };
                    images.push(image);
                }
                self.timings.vision_s = tower_s;
                self.pending.push_back(Item::ImageEncoded);
                self.state = State::Encoded { prompt, images };
            }
            State::Encoded { prompt, images } => {
                let mode = self.mapper.as_ref().map_or(Mode::Plain, |m| m.mode());
                let refs: Vec<&B::Tensor> = images.iter().map(|a| &**a).collect();
                // Plain runs take part in the prefix cache.
                let shared = (mode == Mode::Plain).then_some(&images[..]);
                let o = &self.opts.generate;
                match Prefill::begin(b, model, prompt.clone(), &refs, shared, o, mode) {
                    Ok(p) => self.prefill(p)?,
                    // No pages now: the run can wait for them (a scheduler retries it).
                    Err(e @ Error::KvFull(_)) => {
                        self.state = State::Encoded { prompt, images };
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            State::Prefilling(p) => self.prefill(p)?,
            State::Decoding(mut s) => {
                let step = s.step();
                self.stepped(s, step)?;
            }
            State::Maps(s, index) => {
                let m = self
                    .mapper
                    .as_ref()
                    .expect("maps after generation need a mapper");
                let (map, secs) = timed(b, || m.after(&s, index))?;
                self.maps_s += secs;
                let id = s.generated()[index];
                let tm = self.token_map(s.prompt(), index, id, map)?;
                self.pending.push_back(Item::Map(tm));
                if index + 1 < s.generated().len() {
                    self.state = State::Maps(s, index + 1);
                } else {
                    self.done(s)?;
                }
            }
            State::Finished => {}
        }
        Ok(())
    }

    /// The next chunk of the prompt (all of it without a chunk size); once the last has run, the
    /// session starts decoding.
    fn prefill(&mut self, mut p: Prefill<'e, B>) -> Result<()> {
        let b = &self.engine.backend;
        let before = p.remaining();
        p.advance(self.prefill_chunk.unwrap_or(usize::MAX))?;
        self.prefilled_rows = before - p.remaining();
        if p.remaining() > 0 {
            self.state = State::Prefilling(p);
            return Ok(());
        }
        let s = p.finish()?;
        if let Some(m) = self.mapper.as_mut() {
            let ((), secs) = timed(b, || m.prefilled(&s))?;
            self.maps_s += secs;
        }
        let item = self.prefilled(&s)?;
        self.pending.push_back(item);
        self.state = State::Decoding(s);
        Ok(())
    }

    /// The session of a run that is decoding, for a batched step ([`super::Scheduler`]); the
    /// step's result goes back through [`Self::stepped`].
    pub(super) fn decoding(&mut self) -> Option<&mut Session<'e, B>> {
        match &mut self.state {
            State::Decoding(s) => Some(s),
            _ => None,
        }
    }

    /// Another continuation of this run's prompt with its sampler seeded by `seed`, taken after
    /// the prefill and before the first token ([`Session::fork`]): its items start with the
    /// same `ImageEncoded` and `Prefilled` as this run's.
    pub(super) fn fork(&self, seed: u64) -> Result<Stream<'e, B>> {
        let State::Decoding(s) = &self.state else {
            return Err(Error::input(
                "a run forks after its prefill, before its first token",
            ));
        };
        let e = self.engine;
        let fork = s.fork(seed)?;
        let mut opts = self.opts.clone();
        opts.generate.sampling.seed = seed;
        let mut run = Stream::new(
            e,
            Request::Ids { n_text: 0, seed: 0 },
            opts,
            CancelToken::new(),
        );
        run.timings = self.timings;
        if let Some(m) = self.opts.method {
            let mut mapper = Mapper::new(m, e.head.as_ref(), &e.model)?;
            mapper.prefilled(&fork)?;
            run.mapper = Some(mapper);
        }
        run.pending.push_back(Item::ImageEncoded);
        let item = run.prefilled(&fork)?;
        run.pending.push_back(item);
        run.state = State::Decoding(fork);
        Ok(run)
    }

    /// The `Prefilled` item of a session just prefilled (or forked).
    fn prefilled(&self, s: &Session<'e, B>) -> Result<Item> {
        let image_hidden = if self.opts.hidden_states {
            Some(self.engine.backend.download(&s.image_hidden()?)?)
        } else {
            None
        };
        Ok(Item::Prefilled {
            prompt_len: s.prompt().len(),
            cached_len: s.cached_len(),
            image_hidden,
        })
    }

    /// Whether the run's next unit of work is a decode step.
    pub(super) fn is_decoding(&self) -> bool {
        matches!(self.state, State::Decoding(_))
    }

    /// Whether the run has ended (its last item given out or an error met).
    pub(super) fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// Ends the run where it stands (its session's pages go back to the pool).
    pub(super) fn finish(&mut self) {
        self.state = State::Finished;
    }

    /// One unit of work; its items wait in the run's queue ([`Self::take_items`]).
    pub(super) fn work(&mut self) -> Result<()> {
        self.prefilled_rows = 0;
        if self.cancel.is_cancelled() {
            self.state = State::Finished;
            return Err(Error::Cancelled);
        }
        self.advance()
    }

    pub(super) fn take_items(&mut self) -> impl Iterator<Item = Item> + '_ {
        self.pending.drain(..)
    }

    /// What follows a decode step of the run's session (taken from the decoding state): the
    /// token's map, text and item, and the end of generation when the step ended it.
    pub(super) fn stepped_from_state(&mut self, step: Result<Option<u32>>) -> Result<()> {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Decoding(s) => self.stepped(s, step),
            other => {
                self.state = other;
                Err(Error::input("a step result for a run that is not decoding"))
            }
        }
    }

    fn stepped(&mut self, mut s: Session<'e, B>, step: Result<Option<u32>>) -> Result<()> {
        let b = &self.engine.backend;
        let Some(id) = step? else {
            return self.after_generation(s);
        };
        let index = s.generated().len() - 1;
        if index == 0 && self.opts.first_logits {
            if let Some(l) = s.logits() {
                self.first_step_logits = Some(b.download(l)?);
            }
        }
        let map = match self.mapper.as_mut() {
            Some(m) => {
                let (map, secs) = timed(b, || m.token(&s))?;
                self.maps_s += secs;
                map.map(|map| self.token_map(s.prompt(), index, id, map))
                    .transpose()?
            }
            None => None,
        };
        let hidden = if self.opts.hidden_states {
            Some(b.download(s.hidden())?)
        } else {
            None
        };
        let text_delta = self.delta(&mut s)?;
        let logprobs = s.choice().and_then(|c| self.token_logprobs(c));
        if let Some(l) = &logprobs {
            self.logprobs.push(l.clone());
        }
        self.pending.push_back(Item::Token(TokenStep {
            index,
            id,
            text_delta,
            map,
            hidden,
            logprobs,
        }));
        if s.stop_reason().is_some() {
            return self.after_generation(s);
        }
        self.state = State::Decoding(s);
        Ok(())
    }

    fn after_generation(&mut self, s: Session<'e, B>) -> Result<()> {
        if self.mapper.as_ref().is_some_and(|m| m.after_generation()) {
            self.state = State::Maps(s, 0);
            Ok(())
        } else {
            self.done(s)
        }
    }

    fn done(&mut self, s: Session<'e, B>) -> Result<()> {
        let e = self.engine;
        let st = s.timings();
        let timings = Timings {
            vision_s: self.timings.vision_s,
            prefill_s: st.prefill_s,
            decode_s: st.decode_s,
        };
        let confidence = self.opts.method.map(|m| {
            let threshold = match (m, &e.head) {
                (Method::FastRm, Some(h)) => h.cfg.confidence_threshold,
                _ => None,
            };
            Confidence::of_answer(
                &self.entropies,
                s.generated(),
                &e.config().eos_token_ids,
                threshold,
            )
        });
        let generated_ids = s.generated().to_vec();
        tracing::debug!(
            prompt_len = s.prompt().ids().len(),
            generated = generated_ids.len(),
            vision_s = timings.vision_s,
            prefill_s = timings.prefill_s,
            decode_s = timings.decode_s,
            maps_s = self.maps_s,
            method = self.opts.method.map(|m| m.name()),
            "run finished"
        );
        let text = match self.cut.take() {
            Some(text) => text,
            None => e.decode(&generated_ids)?,
        };
        self.pending.push_back(Item::Done(Summary {
            input_ids: s.prompt().ids().to_vec(),
            cached_tokens: s.cached_len(),
            text,
            generated_ids,
            stop_reason: s.stop_reason().unwrap_or(StopReason::MaxNewTokens),
            timings,
            maps_s: self.maps_s,
            confidence,
            logprobs: std::mem::take(&mut self.logprobs),
            layouts: s.prompt().layouts().to_vec(),
            first_step_logits: self.first_step_logits.take(),
        }));
        Ok(())
    }

    /// A token's map, split per image as `prompt` lays its images out.
    fn token_map(
        &mut self,
        prompt: &Prompt,
        index: usize,
        id: u32,
        map: Vec<f32>,
    ) -> Result<TokenMap> {
        check_finite(&map, &format!("the relevancy map of token {index}"))?;
        let entropy = map_entropy(&map);
        self.entropies.push(entropy);
        Ok(TokenMap {
            index,
            id,
            text: self.engine.token_text(id),
            images: prompt.images(),
            layouts: prompt.layouts().to_vec(),
            map,
            entropy,
        })
    }

    fn token_logprobs(&self, c: &Choice) -> Option<TokenLogprobs> {
        let (token, bytes) = self.engine.token_piece(c.id);
        Some(TokenLogprobs {
            token,
            bytes,
            logprob: c.logprob?,
            top_logprobs: c
                .top_logprobs
                .iter()
                .map(|&(id, logprob)| {
                    let (token, bytes) = self.engine.token_piece(id);
                    TopLogprob {
                        id,
                        token,
                        bytes,
                        logprob,
                    }
                })
                .collect(),
        })
    }

    /// The new text of the answer so far: the decoding of every id minus what was given out. A
    /// run of byte-fallback tokens waits until it ends (its decoding can change with each byte
    /// added), unless this is the last token, so the deltas join to exactly the final decoding.
    /// A stop string ends the answer where it first appears, left out; text that could still
    /// become one waits until it cannot.
    fn delta(&mut self, s: &mut Session<'e, B>) -> Result<String> {
        let e = self.engine;
        let ids = s.generated();
        let mut last = s.stop_reason().is_some();
        let open_run = e.text.as_ref().is_some_and(|t| t.ends_in_byte_run(ids));
        let stops = &self.opts.generate.stop;
        if open_run && !last && stops.is_empty() {
            return Ok(String::new());
        }
        let mut full = e.decode(ids)?;
        if open_run && !last {
            // The run's text may still change, but what its complete characters already spell
            // cannot: a stop string there (a "\n" is a byte token) ends the answer now.
            let settled = full.trim_end_matches('\u{FFFD}');
            if !stops.iter().any(|stop| settled.contains(stop.as_str())) {
                return Ok(String::new());
            }
            full.truncate(settled.len());
        }
        if let Some(at) = stops
            .iter()
            .filter_map(|stop| full.find(stop.as_str()))
            .min()
        {
            full.truncate(at);
            s.stop_now(StopReason::Stop)?;
            self.cut = Some(full.clone());
            last = true;
        }
        let shown = if last {
            full.len()
        } else {
            full.len() - held_back(&full, stops)
        };
        let full = &full[..shown];
        let delta = match full.strip_prefix(self.emitted.as_str()) {
            Some(d) => d.to_string(),
            // The decoder re-spelled text already given out (not seen with closed byte runs):
            // what was sent cannot be taken back, so only the text past its length goes out.
            None => full
                .char_indices()
                .nth(self.emitted.chars().count())
                .map_or(String::new(), |(i, _)| full[i..].to_string()),
        };
        self.emitted = full.to_string();
        Ok(delta)
    }
}

/// How many bytes at the end of `text` could be the start of a stop string (on a character
/// boundary): they wait for the next token.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|stop| {
            (1..stop.len())
                .filter(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
                .max()
        })
        .max()
        .unwrap_or(0)
}

impl<B: Backend> Iterator for Stream<'_, B> {
    type Item = Result<Item>;

    fn next(&mut self) -> Option<Result<Item>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if matches!(self.state, State::Finished) {
                return None;
            }
            if self.cancel.is_cancelled() {
                self.state = State::Finished;
                return Some(Err(Error::Cancelled));
            }
            if let Err(e) = self.advance() {
                self.state = State::Finished;
                self.pending.clear();
                return Some(Err(e));
            }
        }
    }
}

/// A stream's items gathered: the generation, the maps in token order, what the maps cost and
/// the answer's confidence.
pub struct Collected {
    pub generation: Generation,
    pub grid: (usize, usize),
    pub tokens: Vec<TokenMap>,
    pub maps_s: f64,
    pub confidence: Option<Confidence>,
}

/// Runs a stream to its end, showing `observer` every item first.
pub fn collect<B: Backend>(
    stream: Stream<'_, B>,
    observer: &mut dyn FnMut(&Item),
) -> Result<Collected> {
    let g = stream.engine.config().vision.grid();
    collect_items(stream, (g, g), observer)
}

/// Gathers a run's items, from a [`Stream`] or from wherever they were carried (another thread,
/// a channel), up to its [`Item::Done`]; `grid` is the model's patch grid.
pub fn collect_items(
    items: impl IntoIterator<Item = Result<Item>>,
    grid: (usize, usize),
    observer: &mut dyn FnMut(&Item),
) -> Result<Collected> {
    let mut tokens = Vec::new();
    for item in items {
        let item = item?;
        observer(&item);
        match item {
            Item::Token(TokenStep { map: Some(m), .. }) | Item::Map(m) => tokens.push(m),
            Item::Done(summary) => {
                return Ok(Collected {
                    generation: Generation {
                        input_ids: summary.input_ids,
                        generated_ids: summary.generated_ids,
                        text: summary.text,
                        stop_reason: summary.stop_reason,
                        timings: summary.timings,
                        logprobs: summary.logprobs,
                        layouts: summary.layouts,
                        first_step_logits: summary.first_step_logits,
                    },
                    grid,
                    tokens,
                    maps_s: summary.maps_s,
                    confidence: summary.confidence,
                })
            }
            _ => {}
        }
    }
    Err(Error::Backend("the run ended without a summary".into()))
}

impl Collected {
    /// The explain run these items make, for the relevancy `method` they were run with.
    pub fn explained(self, method: Method) -> Explained {
        Explained {
            generation: self.generation,
            method,
            grid: self.grid,
            tokens: self.tokens,
            maps_s: self.maps_s,
            confidence: self.confidence.unwrap_or(Confidence {
                mean_entropy: 1.0,
                threshold: None,
                tokens: 0,
            }),
        }
    }
}

/// Runs `f` and returns its seconds from a synchronised start to a synchronised end: a device
/// backend queues work and returns early, so without the waits a phase's clock would stop
/// before its work ran (and the next phase would be charged for it). Between decode steps the
/// stream is already idle (each step reads its token back), so the first wait costs nothing.
fn timed<B: Backend, T>(b: &B, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    b.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    b.synchronize()?;
    Ok((out, t0.elapsed().as_secs_f64()))
}
