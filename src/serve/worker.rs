//! The engine's own thread. One job at a time: CUDA engines are not `Sync`, and a GPU runs one
//! request's steps at a time anyway, so every backend gets the same design — jobs wait in a bounded
//! queue, each job's items go back over its own channel, and a job whose client is gone is cancelled
//! at its next unit of work.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::openai::ApiError;
use crate::engine::{AnyEngine, CancelToken, Item, Request, RunOptions};
use crate::error::Error;
use crate::{GenerateOptions, Method};

/// What the worker sends a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The request was checked against the model and its run begins.
    Started {
        prompt_tokens: usize,
    },
    Item(Item),
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
    pub cancel: CancelToken,
    /// Unbounded: the engine never waits for a client, so a slow reader cannot stall the
    /// requests queued behind it; one answer's chunks are at most a context's worth.
    pub events: mpsc::UnboundedSender<Event>,
    pub arrived: Instant,
}

/// Answers up to this many tokens when a request names no limit (and the context has room).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Runs jobs until every sender of the queue is gone.
pub fn run(
    engine: AnyEngine,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    token_delay: Duration,
) {
    while let Some(job) = jobs.blocking_recv() {
        metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if job.cancel.is_cancelled() {
            // Its client left while it waited.
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        metrics.busy.store(1, Ordering::Relaxed);
        let events = job.events.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run_job(&engine, job, &metrics, token_delay)
        }));
        if let Err(panic) = outcome {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let _ = events.send(Event::Failed(ApiError::server(format!(
                "the engine failed on this request: {what}"
            ))));
        }
        metrics.busy.store(0, Ordering::Relaxed);
    }
}

fn run_job(engine: &AnyEngine, job: Job, metrics: &Metrics, token_delay: Duration) {
    let send = |ev: Event| -> bool {
        if job.events.send(ev).is_err() {
            // The handler is gone (its client disconnected): stop before the next unit of work.
            job.cancel.cancel();
            false
        } else {
            true
        }
    };
    let Request::Prepared { prompt, .. } = &job.request else {
        send(Event::Failed(ApiError::server("a job must come prepared")));
        return;
    };
    let ctx = engine.config().text.max_position_embeddings;
    let room = ctx.saturating_sub(prompt.len());
    let max_new = match job.max_tokens {
        Some(n) if n > room => {
            send(Event::Failed(ApiError::invalid(
                Some(job.max_tokens_param.to_string()),
                "context_length_exceeded",
                format!(
                    "`{}` is {n} but the prompt takes {} of the model's {ctx} context positions, \
                     leaving room for {room} tokens",
                    job.max_tokens_param,
                    prompt.len()
                ),
            )));
            return;
        }
        Some(n) => n,
        None => room.min(DEFAULT_MAX_TOKENS),
    };
    if !send(Event::Started {
        prompt_tokens: prompt.len(),
    }) {
        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let opts = RunOptions {
        generate: GenerateOptions {
            max_new_tokens: max_new,
            stop_at_eos: !job.ignore_eos,
            keep_steps: false,
            sampling: job.sampling.clone(),
            stop: job.stop.clone(),
        },
        method: job.method,
        hidden_states: false,
    };
    let mut last: Option<Instant> = None;
    for item in engine.stream(&job.request, &opts, &job.cancel) {
        match item {
            Ok(item) => {
                match &item {
                    Item::Token(_) => {
                        metrics.tokens_generated.fetch_add(1, Ordering::Relaxed);
                        let now = Instant::now();
                        match last {
                            None => metrics.time_to_first_token((now - job.arrived).as_secs_f64()),
                            Some(t) => metrics.token_latency((now - t).as_secs_f64()),
                        }
                        last = Some(now);
                        if !token_delay.is_zero() {
                            std::thread::sleep(token_delay);
                        }
                    }
                    Item::Done(s) => {
                        if job.method.is_some() {
                            metrics.map_time(s.maps_s);
                        }
                        metrics.request_time(job.arrived.elapsed().as_secs_f64());
                    }
                    _ => {}
                }
                // A failed send cancels; the stream then ends with `Cancelled`.
                send(Event::Item(item));
            }
            Err(Error::Cancelled) => {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                send(Event::Failed(engine_error(e, None)));
                return;
            }
        }
    }
}

/// The HTTP form of an engine error: what the request caused is a 400, the rest is the server's.
pub fn engine_error(e: Error, param: Option<String>) -> ApiError {
    match e {
        Error::Input(msg) => ApiError::invalid(param, "invalid_value", msg),
        Error::ContextLength(msg) => ApiError::invalid(param, "context_length_exceeded", msg),
        Error::Image { msg, .. } => ApiError::invalid(param, "invalid_image", msg),
        Error::OutOfMemory(msg) => ApiError {
            status: 503,
            message: format!("out of memory: {msg}"),
            kind: "server_error",
            param: None,
            code: Some("out_of_memory"),
        },
        Error::KvFull(msg) => ApiError {
            status: 503,
            message: format!("KV cache full: {msg}"),
            kind: "server_error",
            param: None,
            code: Some("kv_cache_full"),
        },
        other => ApiError::server(other.to_string()),
    }
}
