//! The server's counters in Prometheus' text exposition format, written by hand: a handful of
//! counters, two gauges and four histograms do not justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds in seconds, shared by the latency histograms: from well under a demo-model decode
/// step to a slow 7B prefill.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the map-entropy histogram: entropies are normalised to [0, 1].
const ENTROPY_BUCKETS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&BUCKETS)
    }
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, &le) in self.counts.iter_mut().zip(self.bounds) {
            if v <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, le) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Every number `/metrics` shows. Shared by the HTTP handlers and the engine's worker.
#[derive(Default)]
pub struct Metrics {
    /// `(route, status)` → responses.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub tokens_generated: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    /// Jobs accepted and not yet taken by the worker.
    pub queue_depth: AtomicU64,
    /// Jobs the engine is running (a batch, and the runs being prepared to join it).
    pub busy: AtomicU64,
    /// Batched decode steps, and the rows (runs) they decoded: their ratio is the mean batch.
    pub decode_steps: AtomicU64,
    pub decode_rows: AtomicU64,
    /// Prompts run through the decoder, counted in chunks (`--prefill-chunk`; a whole prompt is
    /// one).
    pub prefill_chunks: AtomicU64,
    /// KV cache pages in use (runs and the prefix cache), the pool's limit, and the prefix
    /// cache's share.
    pub kv_pages_used: AtomicU64,
    pub kv_pages_limit: AtomicU64,
    pub prefix_pages: AtomicU64,
    /// Prompt positions of finished answers, and those of them read from the prefix cache.
    pub prompt_tokens: AtomicU64,
    pub prompt_tokens_cached: AtomicU64,
    /// Answers with maps by the confidence's verdict.
    answers: Mutex<BTreeMap<&'static str, u64>>,
    ttft: Mutex<Histogram>,
    token_latency: Mutex<Histogram>,
    map_time: Mutex<Histogram>,
    request_time: Mutex<Histogram>,
    queue_wait: Mutex<Histogram>,
    entropy: Mutex<EntropyHistogram>,
}

/// The map-entropy histogram: its own buckets, over [0, 1].
struct EntropyHistogram(Histogram);

impl Default for EntropyHistogram {
    fn default() -> Self {
        EntropyHistogram(Histogram::new(&ENTROPY_BUCKETS))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding a metrics lock leaves plain numbers behind; keep counting.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        *lock(&self.requests).entry((route, status)).or_default() += 1;
    }

    pub fn time_to_first_token(&self, s: f64) {
        lock(&self.ttft).observe(s)
    }

    pub fn token_latency(&self, s: f64) {
        lock(&self.token_latency).observe(s)
    }

    pub fn map_time(&self, s: f64) {
        lock(&self.map_time).observe(s)
    }

    pub fn request_time(&self, s: f64) {
        lock(&self.request_time).observe(s)
    }

    pub fn queue_wait(&self, s: f64) {
        lock(&self.queue_wait).observe(s)
    }

    /// A token's map entropy (normalised, in [0, 1]).
    pub fn map_entropy(&self, h: f32) {
        lock(&self.entropy).0.observe(h as f64)
    }

    /// An answer with maps, by its confidence's verdict (`confident`, `uncertain`,
    /// `uncalibrated`).
    pub fn answer(&self, verdict: &'static str) {
        *lock(&self.answers).entry(verdict).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP fastrm_http_requests_total HTTP responses by route and status.\n\
             # TYPE fastrm_http_requests_total counter\n",
        );
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "fastrm_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        scalar(
            &mut out,
            "fastrm_tokens_generated_total",
            "counter",
            "Tokens the engine generated, for every request (cancelled ones included).",
            &self.tokens_generated,
        );
        scalar(
            &mut out,
            "fastrm_cancelled_total",
            "counter",
            "Runs stopped early because their client went away.",
            &self.cancelled,
        );
        scalar(
            &mut out,
            "fastrm_rejected_queue_full_total",
            "counter",
            "Requests answered 429 because the queue was full.",
            &self.rejected_queue_full,
        );
        scalar(
            &mut out,
            "fastrm_queue_depth",
            "gauge",
            "Requests waiting for the engine.",
            &self.queue_depth,
        );
        scalar(
            &mut out,
            "fastrm_busy",
            "gauge",
            "Requests the engine is running.",
            &self.busy,
        );
        scalar(
            &mut out,
            "fastrm_decode_steps_total",
            "counter",
            "Batched decode steps.",
            &self.decode_steps,
        );
        scalar(
            &mut out,
            "fastrm_decode_rows_total",
            "counter",
            "Tokens decoded by the batched steps (rows per step, summed).",
            &self.decode_rows,
        );
        scalar(
            &mut out,
            "fastrm_prefill_chunks_total",
            "counter",
            "Prompt chunks run through the decoder (a prompt run whole is one).",
            &self.prefill_chunks,
        );
        for (name, help, v) in [
            (
                "fastrm_kv_pages_used",
                "KV cache pages in use (runs and the prefix cache).",
                &self.kv_pages_used,
            ),
            (
                "fastrm_kv_pages_limit",
                "KV cache pages the pool may hold.",
                &self.kv_pages_limit,
            ),
            (
                "fastrm_prefix_cache_pages",
                "KV cache pages the prefix cache holds.",
                &self.prefix_pages,
            ),
        ] {
            scalar(&mut out, name, "gauge", help, v);
        }
        scalar(
            &mut out,
            "fastrm_prompt_tokens_total",
            "counter",
            "Prompt positions of finished answers.",
            &self.prompt_tokens,
        );
        scalar(
            &mut out,
            "fastrm_prompt_tokens_cached_total",
            "counter",
            "Prompt positions read from the prefix cache instead of computed.",
            &self.prompt_tokens_cached,
        );
        out.push_str(
            "# HELP fastrm_answers_total Answers with maps by their confidence's verdict \
             (uncertain: the maps say the answer is not grounded in the image).\n\
             # TYPE fastrm_answers_total counter\n",
        );
        for (verdict, n) in lock(&self.answers).iter() {
            let _ = writeln!(out, "fastrm_answers_total{{verdict=\"{verdict}\"}} {n}");
        }
        lock(&self.queue_wait).write(
            &mut out,
            "fastrm_queue_wait_seconds",
            "From a request's arrival to the engine taking it.",
        );
        lock(&self.entropy).0.write(
            &mut out,
            "fastrm_map_entropy",
            "Normalised entropy of each answer token's map (low: focused on a few patches).",
        );
        lock(&self.ttft).write(
            &mut out,
            "fastrm_time_to_first_token_seconds",
            "From a request's arrival to its first generated token (queueing included).",
        );
        lock(&self.token_latency).write(
            &mut out,
            "fastrm_token_latency_seconds",
            "Between consecutive generated tokens of a request (its map included).",
        );
        lock(&self.map_time).write(
            &mut out,
            "fastrm_map_seconds",
            "Time a request spent on relevancy maps.",
        );
        lock(&self.request_time).write(
            &mut out,
            "fastrm_request_seconds",
            "From a request's arrival to the end of its run.",
        );
        out
    }
}
