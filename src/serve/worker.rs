//! The engine's own thread, which owns the engine (CUDA engines are not `Sync`) and runs every job
//! through one [`Scheduler`]: jobs wait in a bounded queue, join the running batch between two
//! decode steps (up to `--max-batch` at once), each job's items go back over its own channel, and a
//! job whose client is gone is cancelled at the next step.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::openai::ApiError;
use crate::backend::Backend;
use crate::engine::{AnyEngine, CancelToken, Engine, Item, Request, RunOptions, Scheduler, SeqId};
use crate::error::{Error, Result};
use crate::{GenerateOptions, Method};

/// What the worker sends a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The request was checked against the model and its run begins.
    Started {
        prompt_tokens: usize,
    },
    /// An item of choice `choice` (0 .. n).
    Item {
        choice: usize,
        item: Item,
    },
    Failed(ApiError),
}

pub struct Job {
    /// Tokenised and preprocessed by the handler ([`Request::Prepared`]).
    pub request: Request,
    pub max_tokens: Option<usize>,
    pub max_tokens_param: &'static str,
    pub method: Option<Method>,
    pub ignore_eos: bool,
    pub sampling: crate::model::sampling::Sampling,
    pub stop: Vec<String>,
    /// Continuations of the prompt (OpenAI's `n`).
    pub n: usize,
    pub cancel: CancelToken,
    /// Unbounded: the engine never waits for a client, so a slow reader cannot stall the
    /// requests queued behind it; one answer's chunks are at most a context's worth.
    pub events: mpsc::UnboundedSender<Event>,
    pub arrived: Instant,
}

/// Answers up to this many tokens when a request names no limit (and the context has room).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// How the worker batches: requests decoded together and the prefill's chunk size.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch: usize,
    /// Prompt positions a step runs (`None`: each prompt whole).
    pub prefill_chunk: Option<usize>,
}

impl Batching {
    fn scheduler<'e, B: Backend>(&self, engine: &'e Engine<B>) -> Result<Scheduler<'e, B>> {
        let mut s = engine.scheduler();
        s.set_max_batch(self.max_batch)?;
        s.set_prefill_chunk(self.prefill_chunk)?;
        Ok(s)
    }
}

/// Runs jobs until every sender of the queue is gone.
pub fn run(
    engine: AnyEngine,
    jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    token_delay: Duration,
    batching: Batching,
) {
    crate::with_engine!(&engine, |e| serve_jobs(
        e,
        jobs,
        &metrics,
        token_delay,
        batching
    ))
}

/// A job the scheduler runs: its choices' runs, `None` once ended.
struct Live {
    ids: Vec<Option<SeqId>>,
    events: mpsc::UnboundedSender<Event>,
    cancel: CancelToken,
    method: Option<Method>,
    arrived: Instant,
    /// When its latest token went out.
    last: Option<Instant>,
}

/// Continuous batching: jobs join the scheduler between its steps (up to `max_batch` at once,
/// the rest wait in the queue) and leave when they end; every step decodes all of them together.
fn serve_jobs<B: Backend>(
    engine: &Engine<B>,
    mut jobs: mpsc::Receiver<Job>,
    metrics: &Metrics,
    token_delay: Duration,
    batching: Batching,
) {
    let max_batch = batching.max_batch;
    let mut sched = match batching.scheduler(engine) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let mut live: Vec<Live> = Vec::new();
    // The scheduler's prefill units already added to the metric.
    let mut counted_units = 0;
    loop {
        // Wait for a job when nothing runs; otherwise take the ones already waiting.
        while live.len() < max_batch {
            let job = if live.is_empty() {
                match jobs.blocking_recv() {
                    Some(j) => j,
                    None => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            metrics.queue_wait(job.arrived.elapsed().as_secs_f64());
            if let Some(l) = admit(&mut sched, engine.config(), job, metrics) {
                live.push(l);
            }
        }
        metrics.busy.store(live.len() as u64, Ordering::Relaxed);
        if live.is_empty() {
            continue;
        }
        for l in &live {
            if l.cancel.is_cancelled() {
                for id in l.ids.iter().flatten() {
                    sched.cancel(*id);
                }
            }
        }
        let step = catch_unwind(AssertUnwindSafe(|| sched.step()));
        let units = sched.prefill_units();
        metrics
            .prefill_chunks
            .fetch_add(units - counted_units, Ordering::Relaxed);
        counted_units = units;
        match step {
            Ok(Ok(rows)) => {
                if rows > 0 {
                    metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
                    metrics
                        .decode_rows
                        .fetch_add(rows as u64, Ordering::Relaxed);
                }
            }
            // The runs in the failed step carry the error as their last event.
            Ok(Err(_)) => {}
            Err(panic) => {
                let what = crate::util::panic_message(&*panic);
                for l in live.drain(..) {
                    let _ = l.events.send(Event::Failed(ApiError::server(format!(
                        "the engine failed on this request: {what}"
                    ))));
                }
                // A fresh scheduler: the old one's runs (and their pages) are dropped with it.
                counted_units = 0;
                match batching.scheduler(engine) {
                    Ok(s) => sched = s,
                    Err(e) => {
                        tracing::error!("{e}");
                        return;
                    }
                }
                metrics.busy.store(0, Ordering::Relaxed);
                continue;
            }
        }
        let mut tokens = false;
        let eos = &engine.config().eos_token_ids;
        live.retain_mut(|l| deliver(&mut sched, l, metrics, eos, &mut tokens));
        metrics.busy.store(live.len() as u64, Ordering::Relaxed);
        let (used, limit) = engine.kv_usage();
        metrics.kv_pages_used.store(used as u64, Ordering::Relaxed);
        metrics
            .kv_pages_limit
            .store(limit as u64, Ordering::Relaxed);
        metrics
            .prefix_pages
            .store(engine.prefix_pages() as u64, Ordering::Relaxed);
        if tokens && !token_delay.is_zero() {
            std::thread::sleep(token_delay);
        }
    }
}

/// Checks a job against the context and hands it to the scheduler; `None` when it ends here
/// (refused, or its client already left).
fn admit<B: Backend>(
    sched: &mut Scheduler<'_, B>,
    cfg: &crate::config::LlavaConfig,
    job: Job,
    metrics: &Metrics,
) -> Option<Live> {
    if job.cancel.is_cancelled() {
        // Its client left while it waited.
        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let Request::Prepared { prompt, .. } = &job.request else {
        let _ = job
            .events
            .send(Event::Failed(ApiError::server("a job must come prepared")));
        return None;
    };
    let ctx = cfg.text.max_position_embeddings;
    let room = ctx.saturating_sub(prompt.len());
    let max_new = match job.max_tokens {
        Some(n) if n > room => {
            let _ = job.events.send(Event::Failed(ApiError::invalid(
                Some(job.max_tokens_param.to_string()),
                "context_length_exceeded",
                format!(
                    "`{}` is {n} but the prompt takes {} of the model's {ctx} context positions, \
                     leaving room for {room} tokens",
                    job.max_tokens_param,
                    prompt.len()
                ),
            )));
            return None;
        }
        Some(n) => n,
        None => room.min(DEFAULT_MAX_TOKENS),
    };
    let started = Event::Started {
        prompt_tokens: prompt.len(),
    };
    if job.events.send(started).is_err() {
        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let opts = RunOptions {
        generate: GenerateOptions {
            max_new_tokens: max_new,
            stop_at_eos: !job.ignore_eos,
            keep_steps: false,
            sampling: job.sampling,
            stop: job.stop,
        },
        method: job.method,
        ..Default::default()
    };
    let ids = match sched.submit_n(job.request, opts, job.n) {
        Ok(ids) => ids,
        Err(e) => {
            let _ = job
                .events
                .send(Event::Failed(engine_error(e, Some("n".into()))));
            return None;
        }
    };
    Some(Live {
        ids: ids.into_iter().map(Some).collect(),
        events: job.events,
        cancel: job.cancel,
        method: job.method,
        arrived: job.arrived,
        last: None,
    })
}

/// Sends a job's new events to its handler; `false` once every choice has ended. A choice that
/// fails ends the job (its other choices are cancelled) with that error.
fn deliver<B: Backend>(
    sched: &mut Scheduler<'_, B>,
    l: &mut Live,
    metrics: &Metrics,
    eos: &[u32],
    tokens: &mut bool,
) -> bool {
    // End-of-sequence maps are not answer tokens' (as in the confidence).
    let entropy = |m: &crate::engine::TokenMap| {
        if !eos.contains(&m.id) {
            metrics.map_entropy(m.entropy)
        }
    };
    for choice in 0..l.ids.len() {
        let Some(id) = l.ids[choice] else {
            continue;
        };
        for ev in sched.events(id) {
            match ev {
                Ok(item) => {
                    let done = matches!(item, Item::Done(_));
                    match &item {
                        Item::Token(t) => {
                            if let Some(m) = &t.map {
                                entropy(m);
                            }
                            *tokens = true;
                            metrics.tokens_generated.fetch_add(1, Ordering::Relaxed);
                            let now = Instant::now();
                            match l.last {
                                None => {
                                    metrics.time_to_first_token((now - l.arrived).as_secs_f64())
                                }
                                Some(t) => metrics.token_latency((now - t).as_secs_f64()),
                            }
                            l.last = Some(now);
                        }
                        Item::Map(m) => entropy(m),
                        Item::Done(s) => {
                            // One prompt per request, whatever its choices.
                            if choice == 0 {
                                metrics
                                    .prompt_tokens
                                    .fetch_add(s.input_ids.len() as u64, Ordering::Relaxed);
                                metrics
                                    .prompt_tokens_cached
                                    .fetch_add(s.cached_tokens as u64, Ordering::Relaxed);
                            }
                            if l.method.is_some() {
                                metrics.map_time(s.maps_s);
                            }
                            if let Some(c) = &s.confidence {
                                metrics.answer(c.verdict());
                            }
                        }
                        _ => {}
                    }
                    // A handler that is gone (its client disconnected) cancels the runs at the
                    // next step.
                    if l.events.send(Event::Item { choice, item }).is_err() {
                        l.cancel.cancel();
                    }
                    if done {
                        l.ids[choice] = None;
                    }
                }
                Err(e) => {
                    if matches!(e, Error::Cancelled) {
                        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let _ = l.events.send(Event::Failed(engine_error(e, None)));
                    }
                    for other in l.ids.iter_mut() {
                        if let Some(id) = other.take() {
                            sched.cancel(id);
                            // Its cancellation is this job's end, not another cancelled request.
                            let _ = sched.events(id);
                        }
                    }
                    return false;
                }
            }
        }
    }
    if l.ids.iter().all(Option::is_none) {
        metrics.request_time(l.arrived.elapsed().as_secs_f64());
        return false;
    }
    true
}

/// The HTTP form of an engine error: what the request caused is a 400, the rest is the server's.
pub fn engine_error(e: Error, param: Option<String>) -> ApiError {
    match e {
        Error::Input(msg) => ApiError::invalid(param, "invalid_value", msg),
        Error::ContextLength(msg) => ApiError::invalid(param, "context_length_exceeded", msg),
        Error::Image { msg, .. } => ApiError::invalid(param, "invalid_image", msg),
        Error::OutOfMemory(msg) => {
            ApiError::unavailable("out_of_memory", format!("out of memory: {msg}"))
        }
        Error::KvFull(msg) => {
            ApiError::unavailable("kv_cache_full", format!("KV cache full: {msg}"))
        }
        other => ApiError::server(other.to_string()),
    }
}
