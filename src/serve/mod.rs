//! `fastrm serve`: OpenAI's chat-completions protocol over HTTP, with each token's relevancy map as
//! an opt-in extension.
//!
//! Handlers check a request (JSON, the image's `data:` URL or — opted in — its fetch, its decoding)
//! off the engine, then hand
//! it to the engine's worker ([`worker`]) through a bounded queue: a full queue answers 429 at
//! once rather than letting latency grow without bound. Each job streams its items back over its
//! own channel; when the client goes away the handler's side is dropped and the job's
//! [`CancelToken`] stops the run before its next unit of work.

pub mod conn;
pub mod fetch;
pub mod metrics;
pub mod openai;
pub mod viewer;
pub mod worker;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{AnyEngine, CancelToken, Item, Method};
use crate::error::{Error, Result};
use metrics::Metrics;
use openai::{ApiError, Limits};
use worker::{Event, Job};

/// What `serve` is asked for (the `fastrm serve` flags, as values; errors name the flags).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Model folder in the HF llava-hf layout; default: the bundled demo model and its head.
    pub model: Option<PathBuf>,
    /// FastRM head file; default with the demo model: its own head.
    pub head: Option<PathBuf>,
    pub device: crate::engine::Device,
    pub dtype: Option<crate::engine::Dtype>,
    pub host: String,
    /// 0 picks a free port (the chosen address is reported).
    pub port: u16,
    /// Requests that may wait for the engine while it runs another; more get 429.
    pub max_queue: usize,
    /// Largest accepted image, in bytes after base64 decoding.
    pub max_image_bytes: usize,
    /// Largest accepted image, in pixels.
    pub max_image_pixels: usize,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Origins (`scheme://host[:port]`) whose browser requests are accepted besides the server's
    /// own; any other `Origin` is refused (403).
    pub cors_origins: Vec<String>,
    /// Requests decoded together in one batched step; more wait in the queue.
    pub max_batch: usize,
    /// Prompt positions one step runs through the decoder, so a new request's prefill stalls the
    /// answers being decoded for no longer than that; `None` (the default): each prompt whole.
    /// Off by default: on the CPU every chunk repacks the weights for its products, so chunks
    /// cost prefill time (docs/PERF.md).
    pub prefill_chunk: Option<usize>,
    /// A fixed KV cache size in bytes; `None`: it grows with demand.
    pub kv_memory: Option<u64>,
    /// KV pages of finished prompts and answers kept for the runs that start the same way, in
    /// bytes (0: none); `None`: one full context's worth.
    pub prefix_cache: Option<u64>,
    /// Request head, body and shutdown time limits.
    pub timeouts: conn::Timeouts,
    /// Image URLs are fetched (`Some`) or refused (`None`, the default).
    pub image_urls: Option<fetch::ImageUrls>,
    /// A sleep after each decode step that made tokens, for tests that must observe a queue or a
    /// disconnect.
    pub test_token_delay_ms: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model: None,
            head: None,
            device: crate::engine::Device::Cpu,
            dtype: None,
            host: "127.0.0.1".into(),
            port: 8080,
            max_queue: 16,
            max_image_bytes: 16 << 20,
            max_image_pixels: 50_000_000,
            max_body_bytes: 24 << 20,
            cors_origins: Vec::new(),
            max_batch: 8,
            prefill_chunk: None,
            kv_memory: None,
            prefix_cache: None,
            timeouts: conn::Timeouts::default(),
            image_urls: None,
            test_token_delay_ms: 0,
        }
    }
}

struct AppState {
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    model_id: String,
    limits: Limits,
    max_body_bytes: usize,
    cors_origins: Vec<String>,
    /// The address the server listens on, as given (`--host`).
    bind_host: String,
    n_layers: usize,
    has_head: bool,
    /// The FastRM head's calibrated entropy threshold, when it has one.
    threshold: Option<f32>,
    started: u64,
    next_id: AtomicU64,
    /// Requests checked and decoded at once (as many as the queue holds): each holds an image
    /// of up to the pixel limit while it is decoded.
    decodes: tokio::sync::Semaphore,
    /// Tokenises and preprocesses on the request threads, so the engine's thread only runs the
    /// model.
    preparer: crate::engine::Preparer,
    /// Present with `--allow-image-urls`.
    fetcher: Option<Arc<fetch::ImageFetcher>>,
    /// How long a request body may take to arrive.
    body_timeout: std::time::Duration,
    /// Set when shutdown's deadline passes: running streams end.
    deadline: conn::ShutdownDeadline,
    eos: Vec<u32>,
}

/// Images whose projected features the server keeps (a few MB each on a 7B model).
const IMAGE_CACHE: usize = 16;

/// glibc gives threads that contend for the heap arenas of their own, up to eight per core, and
/// a long-running server whose requests allocate and free on the engine's, rayon's and tokio's
/// threads fragments them: measured, RSS crept by ~11 MiB a minute under a steady mixed load
/// with every cache full, and stayed flat with two arenas (docs/PERF.md). Two, unless the
/// operator set `MALLOC_ARENA_MAX` themselves.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before the server's threads
        // start allocating in earnest.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// `fastrm serve`: loads the engine, serves until SIGINT/SIGTERM, then finishes the requests in
/// flight and returns.
pub fn run(args: ServeOptions) -> Result<()> {
    limit_malloc_arenas();
    if args.max_queue == 0 {
        return Err(Error::input("--max-queue must be at least 1"));
    }
    if args.prefill_chunk == Some(0) {
        return Err(Error::input(
            "--prefill-chunk must be at least 1 position (leave it out, or give 0 on the \
             command line, for whole prompts)",
        ));
    }
    let rows = crate::backend::INVARIANT_ROWS;
    if !(1..=rows).contains(&args.max_batch) {
        return Err(Error::input(format!(
            "--max-batch must be 1 to {rows}, not {}",
            args.max_batch
        )));
    }
    let (device, dtype) = (args.device, args.dtype);
    let (model_dir, head, model_id) = match &args.model {
        None => (
            crate::demo::model_dir()?,
            Some(match &args.head {
                Some(h) => h.clone(),
                None => crate::demo::head_path()?,
            }),
            "fastrm-demo".to_string(),
        ),
        Some(m) => {
            Error::require_dir("--model", m)?;
            let id = m
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| m.display().to_string());
            (m.clone(), args.head.clone(), id)
        }
    };
    let mut engine = AnyEngine::load(device, dtype, &model_dir)?;
    if let Some(h) = &head {
        engine.load_head(h)?;
    }
    engine
        .set_kv_memory(args.kv_memory)
        .map_err(|e| e.for_flag("--kv-memory"))?;
    // A conversation resends its image every turn: its features are kept for the next one,
    // and its earlier turns' pages for the next turn's prefill.
    engine.set_image_cache(IMAGE_CACHE);
    let prefix = args.prefix_cache.unwrap_or_else(|| {
        let cfg = engine.config();
        let pages = cfg
            .text
            .max_position_embeddings
            .div_ceil(crate::model::kv::PAGE);
        (pages * engine.kv_page_bytes()) as u64
    });
    engine.set_prefix_cache(Some(prefix));
    let cfg = engine.config();
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = mpsc::channel::<Job>(args.max_queue);
    let (deadline_tx, deadline) = conn::deadline();
    let state = Arc::new(AppState {
        jobs,
        metrics: Arc::clone(&metrics),
        model_id,
        limits: Limits {
            max_image_bytes: args.max_image_bytes,
            image_urls: args.image_urls.is_some(),
            max_image_pixels: args.max_image_pixels,
            context: cfg.text.max_position_embeddings,
        },
        max_body_bytes: args.max_body_bytes,
        cors_origins: args.cors_origins.clone(),
        bind_host: args.host.clone(),
        n_layers: cfg.text.num_hidden_layers,
        has_head: engine.has_head(),
        threshold: engine.confidence_threshold(),
        started: unix_now(),
        decodes: tokio::sync::Semaphore::new(args.max_queue),
        preparer: engine.preparer(),
        fetcher: args
            .image_urls
            .map(|o| Arc::new(fetch::ImageFetcher::new(o, args.max_image_bytes))),
        eos: cfg.eos_token_ids.clone(),
        next_id: AtomicU64::new(1),
        body_timeout: args.timeouts.body,
        deadline,
    });
    let worker_metrics = Arc::clone(&metrics);
    let delay = std::time::Duration::from_millis(args.test_token_delay_ms);
    let batching = worker::Batching {
        max_batch: args.max_batch,
        prefill_chunk: args.prefill_chunk,
    };
    let worker = std::thread::Builder::new()
        .name("fastrm-engine".into())
        .spawn(move || worker::run(engine, queue, worker_metrics, delay, batching))
        .map_err(|e| Error::Backend(format!("cannot start the engine thread: {e}")))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Backend(format!("cannot start the async runtime: {e}")))?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|e| {
                Error::input(format!("cannot listen on {}:{}: {e}", args.host, args.port))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Backend(format!("listener address: {e}")))?;
        // Scripts and tests read the address (the port may have been 0) from this line.
        crate::status::out(&format!("listening on http://{addr}"))?;
        conn::serve(
            listener,
            router(state),
            args.timeouts,
            shutdown_signal(),
            deadline_tx,
        )
        .await;
        Ok(())
    });
    // Every sender of the queue is gone with the router: the worker drains and ends.
    drop(rt);
    let _ = worker.join();
    crate::status::note("fastrm serve: stopped");
    served
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    crate::status::note("fastrm serve: shutting down (finishing requests in flight)");
}

fn router(state: Arc<AppState>) -> Router {
    let max_body = state.max_body_bytes;
    Router::new()
        .route("/", get(viewer_page))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            count_responses,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/" => "/",
        _ => "other",
    }
}

async fn count_responses(
    State(st): State<Arc<AppState>>,
    req: HttpRequest,
    next: Next,
) -> Response {
    let route = route_label(req.uri().path());
    let resp = next.run(req).await;
    st.metrics.request(route, resp.status().as_u16());
    resp
}

/// What is checked before a request reaches its handler: its origin (a page on another site may
/// not drive this server from a visitor's browser), and for the chat endpoint its content type
/// (a browser sends `text/plain` cross-site without asking first) and its declared length (refused
/// at once rather than after waiting for a body that may never come).
async fn guard(State(st): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    // DNS rebinding: a page on another site whose name was pointed at 127.0.0.1 reaches a
    // loopback server with its own name in Host (and in Origin). A loopback server answers only
    // to loopback names.
    let host_name = host
        .rsplit_once(':')
        .filter(|(h, port)| !h.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let loopback = |h: &str| matches!(h, "localhost" | "127.0.0.1" | "[::1]" | "::1");
    if loopback(&st.bind_host) && !loopback(host_name) {
        return ApiError {
            status: 421,
            message: format!(
                "this server listens on {} and answers only to a loopback Host, not {host:?}",
                st.bind_host
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("misdirected_request"),
        }
        .into_response();
    }
    let allowed = match &origin {
        None => true,
        Some(o) => {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                == Some(host)
                || st.cors_origins.iter().any(|c| c == o)
        }
    };
    if !allowed {
        return ApiError {
            status: 403,
            message: format!(
                "requests from the web origin {} are refused (start the server with \
                 --cors-origin {} to accept them)",
                origin.as_deref().unwrap_or(""),
                origin.as_deref().unwrap_or("")
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("origin_not_allowed"),
        }
        .into_response();
    }
    // A cross-origin page that is allowed: the browser's preflight, then the headers it checks.
    let cross = origin
        .as_deref()
        .filter(|o| st.cors_origins.iter().any(|c| c == o));
    let with_cors = |mut r: Response| {
        if let Some(o) = cross {
            cors_headers(&mut r, o);
        }
        r
    };
    if req.method() == axum::http::Method::OPTIONS && cross.is_some() {
        // The preflight names the headers the page will send (client libraries add their own):
        // set after the defaults, so they are the ones allowed.
        let mut r = with_cors(StatusCode::NO_CONTENT.into_response());
        if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            r.headers_mut()
                .insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        return r;
    }
    if req.method() == axum::http::Method::POST && req.uri().path() == "/v1/chat/completions" {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return with_cors(
                ApiError {
                    status: 415,
                    message: "the body must be JSON sent as Content-Type: application/json".into(),
                    kind: "invalid_request_error",
                    param: None,
                    code: Some("unsupported_media_type"),
                }
                .into_response(),
            );
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > st.max_body_bytes as u64) {
            return with_cors(
                ApiError::too_large(
                    None,
                    "body_too_large",
                    format!(
                        "the request body is declared as {} bytes, over the server's limit of {}",
                        declared.unwrap_or(0),
                        st.max_body_bytes
                    ),
                )
                .into_response(),
            );
        }
    }
    with_cors(next.run(req).await)
}

fn cors_headers(r: &mut Response, origin: &str) {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, authorization"),
    );
}

async fn method_not_allowed(req: HttpRequest) -> ApiError {
    ApiError {
        status: 405,
        message: format!("{} is not allowed on {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
}

/// The most bytes one token of text takes (the longest vocabulary entries are about this long):
/// questions longer than the context times this are refused before they are tokenised.
const MAX_TOKEN_BYTES: usize = 32;

fn param_of(p: &str) -> Option<String> {
    Some(p.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: 404,
        message: "no such endpoint: POST /v1/chat/completions, GET / (the viewer), /v1/models, \
             /health, /metrics"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}

async fn viewer_page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(viewer::CONTENT_SECURITY_POLICY),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        viewer::page(),
    )
        .into_response()
}

async fn health() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

async fn models(State(st): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({
        "object": "list",
        "data": [model_object(&st)],
    }))
}

/// `GET /v1/models/{id}`: the served model, or a 404 naming the one that is.
async fn model_by_id(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == st.model_id {
        axum::Json(model_object(&st)).into_response()
    } else {
        model_not_found(&st, &id).into_response()
    }
}

fn model_object(st: &AppState) -> Value {
    json!({
        "id": st.model_id,
        "object": "model",
        "created": st.started,
        "owned_by": "fastrm",
    })
}

fn model_not_found(st: &AppState, id: &str) -> ApiError {
    ApiError {
        status: 404,
        message: format!(
            "the model {id:?} does not exist here; this server serves {:?}",
            st.model_id
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    }
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// Cancels its run when dropped: held by the handler and then by the response body, so a client
/// that disconnects at any point stops the engine's work for it.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn chat(State(st): State<Arc<AppState>>, body: Body) -> Response {
    match chat_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The request body, within the body limit and the body timeout (a client that declares a body
/// and does not send it is answered 408, not waited for).
async fn read_body(st: &AppState, body: Body) -> std::result::Result<Bytes, ApiError> {
    let limit = st.max_body_bytes;
    match tokio::time::timeout(st.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError {
            status: 408,
            message: format!(
                "the request body did not arrive within {} s",
                st.body_timeout.as_secs_f64()
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        }),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            // The limit is the only error a complete body can meet; anything else is the
            // connection's.
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if over {
                ApiError::too_large(
                    None,
                    "body_too_large",
                    format!("the request body is over the server's limit of {limit} bytes"),
                )
            } else {
                ApiError::invalid(None, "invalid_body", format!("cannot read the body: {e}"))
            })
        }
    }
}

/// A request's body read as a chat: parsed, its text bounded, its prompt built (images counted)
/// and its images decoded into the model's pixels, one at a time. Blocking CPU work.
fn prepare_chat(
    body: &[u8],
    limits: Limits,
    n_layers: usize,
    preparer: &crate::engine::Preparer,
    fetcher: Option<&fetch::ImageFetcher>,
) -> std::result::Result<(openai::ChatRequest, crate::engine::Request), ApiError> {
    let req = openai::parse_chat(body, limits, n_layers)?;
    // The conversation's text is bounded before it is tokenised: no token takes more than
    // MAX_TOKEN_BYTES, so a longer text cannot fit the context anyway.
    let max_prompt = limits.context * MAX_TOKEN_BYTES;
    let text_bytes: usize = req
        .turns
        .iter()
        .flat_map(|t| &t.texts)
        .map(String::len)
        .sum();
    if text_bytes > max_prompt {
        return Err(ApiError::invalid(
            param_of("messages"),
            "context_length_exceeded",
            format!(
                "the messages hold {text_bytes} bytes of text; the model's context of {} \
                 positions holds no more than {max_prompt}",
                limits.context
            ),
        ));
    }
    // The prompt's length, images counted, before any image is decoded: a conversation with
    // more images than the context holds costs no decoding.
    let messages_error = |e| worker::engine_error(e, param_of("messages"));
    preparer.check_fits(&req.turns).map_err(messages_error)?;
    let (mut pixels, mut layouts) = (Vec::new(), Vec::new());
    for (source, at) in &req.images {
        // One image at a time, fetched and decoded, kept only as the model's pixels.
        let fetched;
        let bytes = match source {
            openai::ImageSource::Inline(b) => b,
            openai::ImageSource::Url(url) => {
                // parse_chat takes URLs only when the server fetches them.
                let f = fetcher.ok_or_else(|| ApiError::server("no image fetcher"))?;
                fetched = f.fetch(url, at)?;
                &fetched
            }
        };
        let image = decode_image(bytes, at, limits.max_image_pixels)?;
        let (p, layout) = preparer
            .pixels(&crate::engine::ImageInput::Decoded(image))
            .map_err(|e| worker::engine_error(e, Some(at.clone())))?;
        pixels.extend(p);
        layouts.push(layout);
    }
    let prompt = preparer
        .chat_prompt(&req.turns, layouts)
        .map_err(messages_error)?;
    let prepared = crate::engine::Request::Prepared { prompt, pixels };
    Ok((req, prepared))
}

/// The request's options this server cannot serve, refused by name; the `ungrounded` mode with
/// the head's threshold when asked for.
fn refuse_unsupported(
    st: &AppState,
    req: &openai::ChatRequest,
) -> std::result::Result<Option<(openai::Ungrounded, f32)>, ApiError> {
    if let Some(m) = req.model.as_deref().filter(|m| *m != st.model_id) {
        return Err(model_not_found(st, m));
    }
    let ungrounded = match (req.ungrounded, st.threshold) {
        (None, _) => None,
        (Some(mode), Some(t)) => Some((mode, t)),
        (Some(_), None) => {
            return Err(ApiError::invalid(
                Some("relevancy.ungrounded".into()),
                "unsupported_value",
                "this server's FastRM head has no calibrated threshold to call an answer \
                 ungrounded by (`fastrm eval` calibrates one into the head file)",
            ))
        }
    };
    if req.relevancy == Some(Method::FastRm) && !st.has_head {
        return Err(ApiError::invalid(
            Some("relevancy.method".into()),
            "unsupported_value",
            "this server has no FastRM head (start it with --head FILE); the gradient methods \
             (baseline, baseline-incremental, gradcam) need none",
        ));
    }
    Ok(ungrounded)
}

/// 429 with `Retry-After`: the queue of waiting requests is full.
fn queue_full() -> Response {
    let mut r = ApiError {
        status: 429,
        message: "the server is busy: its queue is full; retry shortly".into(),
        kind: "rate_limit_error",
        param: None,
        code: Some("queue_full"),
    }
    .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

async fn chat_inner(st: Arc<AppState>, body: Body) -> std::result::Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = read_body(&st, body).await?;
    // Parsing, base64 and the image's decoding are CPU work off the async threads and off the
    // engine: a bad image is refused before it takes a place in the queue.
    let (limits, n_layers) = (st.limits, st.n_layers);
    let preparer = st.preparer.clone();
    let fetcher = st.fetcher.clone();
    let decoding = st
        .decodes
        .acquire()
        .await
        .map_err(|_| ApiError::server("the server is shutting down"))?;
    let (req, prepared) = tokio::task::spawn_blocking(move || {
        prepare_chat(&body, limits, n_layers, &preparer, fetcher.as_deref())
    })
    .await
    .map_err(|e| ApiError::server(format!("request check failed: {e}")))??;
    drop(decoding);
    let ungrounded = refuse_unsupported(&st, &req)?;
    let layouts = match &prepared {
        crate::engine::Request::Prepared { prompt, .. } => prompt.layouts().to_vec(),
        _ => Vec::new(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let cancel = CancelToken::new();
    let guard = CancelOnDrop(cancel.clone());
    let job = Job {
        request: prepared,
        max_tokens: req.max_tokens,
        max_tokens_param: req.max_tokens_param,
        method: req.relevancy,
        ignore_eos: req.ignore_eos,
        sampling: req.sampling.clone(),
        stop: req.stop.clone(),
        n: req.n,
        cancel,
        events: tx,
        arrived,
    };
    // Counted before sending: the worker may take the job (and decrement) at once.
    st.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = st.jobs.try_send(job) {
        st.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        return Err(match e {
            mpsc::error::TrySendError::Full(_) => {
                st.metrics
                    .rejected_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(queue_full());
            }
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::unavailable("shutting_down", "the server is shutting down")
            }
        });
    }
    // Waiting for the engine to take the request, until the shutdown deadline.
    let mut deadline = st.deadline.clone();
    let started = tokio::select! {
        ev = rx.recv() => ev,
        () = deadline.passed() => return Err(cut_by_shutdown()),
    };
    let prompt_tokens = match started {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(e),
        Some(Event::Item { .. }) | None => {
            return Err(ApiError::server(
                "the engine ended the request without an answer",
            ))
        }
    };
    let id = format!("chatcmpl-{}", st.next_id.fetch_add(1, Ordering::Relaxed));
    let ctx = Reply {
        id,
        created: unix_now(),
        model: st.model_id.clone(),
        layouts,
        method: req.relevancy,
        prompt_tokens,
        n: req.n,
        ungrounded,
        // With ignore_eos an end-of-sequence id is just another token of the answer.
        eos: if req.ignore_eos {
            Vec::new()
        } else {
            st.eos.clone()
        },
    };
    if req.stream {
        Ok(stream_response(
            ctx,
            rx,
            guard,
            req.include_usage,
            st.deadline.clone(),
        ))
    } else {
        let out = collect_response(&ctx, &mut rx, st.deadline.clone()).await;
        drop(guard);
        out.map(|v| axum::Json(v).into_response())
    }
}

/// An uploaded image decoded, its size read from its header and checked against the pixel limit
/// first (a small file can declare an image of gigabytes); `at` names the field it came from.
fn decode_image(
    bytes: &[u8],
    at: &str,
    max_pixels: usize,
) -> std::result::Result<crate::vision::RgbImage, ApiError> {
    let (w, h) = crate::vision::image_dimensions(bytes)
        .map_err(|msg| ApiError::invalid(Some(at.to_string()), "invalid_image", msg))?;
    if w.saturating_mul(h) > max_pixels {
        return Err(ApiError::too_large(
            Some(at.to_string()),
            "image_too_large",
            format!(
                "the image is {w}x{h} = {} pixels, over the server's limit of {max_pixels}",
                w.saturating_mul(h),
            ),
        ));
    }
    let image = crate::vision::load_image_bytes(bytes, Path::new("image"))
        .map_err(|e| worker::engine_error(e, Some(at.to_string())))?;
    // The decoded image is the truth (a header that lied is refused by the decoder or here).
    if (image.width, image.height) != (w, h) {
        return Err(ApiError::invalid(
            Some(at.to_string()),
            "invalid_image",
            format!(
                "the image header says {w}x{h} but the image is {}x{}",
                image.width, image.height
            ),
        ));
    }
    Ok(image)
}

/// What every chunk or response of one request repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    /// Each image's layout: where its map's values lie on the picture.
    layouts: Vec<crate::vision::ImageLayout>,
    method: Option<Method>,
    prompt_tokens: usize,
    /// Choices.
    n: usize,
    /// `relevancy.ungrounded` and the threshold it compares with.
    ungrounded: Option<(openai::Ungrounded, f32)>,
    /// End-of-sequence ids: not answer tokens (no chunk of their own, no map, not in `usage`),
    /// as OpenAI counts them.
    eos: Vec<u32>,
}

impl Reply {
    fn chunk(&self, choice: usize, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": choice,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish,
            }],
        })
    }

    /// `cached`: prompt positions read from the prefix cache.
    fn usage(&self, completion: usize, cached: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }
}

/// `chunk` with the `usage: null` every chunk but the last carries when usage was asked for.
fn with_usage_slot(mut chunk: Value, include_usage: bool) -> Value {
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

struct Streaming {
    reply: Reply,
    rx: mpsc::UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
    include_usage: bool,
    /// Answer tokens of every choice.
    completion: usize,
    /// Prompt positions read from the prefix cache.
    cached: usize,
    /// Choices that have ended.
    ended: usize,
    done: bool,
    deadline: conn::ShutdownDeadline,
    /// The answer's running confidence, with `relevancy.ungrounded`.
    running: openai::RunningConfidence,
}

impl Streaming {
    /// The stream's last frames after `text`: the usage chunk when asked for, then `[DONE]`.
    fn end(&mut self, mut text: String) -> String {
        self.done = true;
        if self.include_usage {
            let mut u = self.reply.chunk(0, json!({}), None);
            u["choices"] = json!([]);
            u["usage"] = self.reply.usage(self.completion, self.cached);
            text.push_str(&sse(&u));
        }
        text.push_str("data: [DONE]\n\n");
        text
    }
}

/// The error a response cut by the shutdown deadline ends with.
fn cut_by_shutdown() -> ApiError {
    ApiError::unavailable(
        "shutting_down",
        "the server is shutting down and its deadline has passed: this answer ends here, \
         incomplete",
    )
}

fn stream_response(
    reply: Reply,
    rx: mpsc::UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
    deadline: conn::ShutdownDeadline,
) -> Response {
    let mut first = String::new();
    for choice in 0..reply.n {
        let c = reply.chunk(choice, json!({"role": "assistant", "content": ""}), None);
        first.push_str(&sse(&with_usage_slot(c, include_usage)));
    }
    let head =
        futures_util::stream::once(std::future::ready(Ok::<_, Infallible>(Bytes::from(first))));
    let state = Streaming {
        reply,
        rx,
        _guard: guard,
        include_usage,
        completion: 0,
        cached: 0,
        ended: 0,
        done: false,
        deadline,
        running: Default::default(),
    };
    let rest = futures_util::stream::unfold(state, |mut s| async move {
        let text = next_frames(&mut s).await?;
        Some((Ok::<_, Infallible>(Bytes::from(text)), s))
    });
    use futures_util::StreamExt;
    let mut r = Body::from_stream(head.chain(rest)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The SSE text of the next event worth sending; `None` once `[DONE]` went out.
async fn next_frames(s: &mut Streaming) -> Option<String> {
    if s.done {
        return None;
    }
    loop {
        let ev = tokio::select! {
            ev = s.rx.recv() => ev,
            () = s.deadline.passed() => {
                s.done = true;
                return Some(format!("{}data: [DONE]\n\n", sse(&cut_by_shutdown().body())));
            }
        };
        let r = &s.reply;
        let chunk = match ev {
            Some(Event::Item {
                choice,
                item: Item::Token(t),
            }) if r.eos.contains(&t.id) => {
                // Text held back until the end (a partial stop string, a byte run) still goes out.
                if t.text_delta.is_empty() {
                    continue;
                }
                r.chunk(choice, json!({"content": t.text_delta}), None)
            }
            Some(Event::Item {
                choice,
                item: Item::Token(t),
            }) => {
                s.completion += 1;
                let mut c = r.chunk(choice, json!({"content": t.text_delta}), None);
                if let Some(l) = &t.logprobs {
                    c["choices"][0]["logprobs"] = json!({"content": [openai::logprob_json(l)]});
                }
                if let Some(m) = &t.map {
                    c["relevancy"] = openai::token_map_json(m);
                    if let Some((mode, threshold)) = r.ungrounded {
                        let crossed = s.running.add(m.index, m.entropy, threshold);
                        if crossed && mode == openai::Ungrounded::Stop {
                            // The answer ends here: this token, then the end of the choice (the
                            // run is cancelled when the stream is dropped).
                            let mut text = sse(&with_usage_slot(c, s.include_usage));
                            let mut end = r.chunk(choice, json!({}), Some("content_filter"));
                            end["ungrounded"] = s.running.json(threshold);
                            text.push_str(&sse(&with_usage_slot(end, s.include_usage)));
                            return Some(s.end(text));
                        }
                    }
                }
                c
            }
            Some(Event::Item {
                item: Item::Map(m), ..
            }) if r.eos.contains(&m.id) => continue,
            Some(Event::Item {
                choice,
                item: Item::Map(m),
            }) => {
                let mut c = r.chunk(choice, json!({}), None);
                c["relevancy"] = openai::token_map_json(&m);
                c
            }
            Some(Event::Item {
                choice,
                item: Item::Done(sum),
            }) => {
                s.ended += 1;
                let mut c = r.chunk(
                    choice,
                    json!({}),
                    Some(openai::finish_reason(sum.stop_reason)),
                );
                if let Some(conf) = &sum.confidence {
                    c["confidence"] = openai::confidence_json(conf);
                }
                if let Some((_, threshold)) = r.ungrounded {
                    c["ungrounded"] = s.running.json(threshold);
                }
                let text = sse(&with_usage_slot(c, s.include_usage));
                if s.ended < r.n {
                    return Some(text);
                }
                return Some(s.end(text));
            }
            // The prompt's cached positions are known from the prefill: an answer the server
            // ends early (`ungrounded: stop`) reports them too.
            Some(Event::Item {
                item: Item::Prefilled { cached_len, .. },
                ..
            }) => {
                s.cached = cached_len;
                continue;
            }
            Some(Event::Item { .. }) | Some(Event::Started { .. }) => continue,
            Some(Event::Failed(e)) => {
                s.done = true;
                return Some(format!("{}data: [DONE]\n\n", sse(&e.body())));
            }
            None => {
                s.done = true;
                let e = ApiError::server("the engine ended the request without an answer");
                return Some(format!("{}data: [DONE]\n\n", sse(&e.body())));
            }
        };
        return Some(sse(&with_usage_slot(chunk, s.include_usage)));
    }
}

async fn collect_response(
    r: &Reply,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    mut deadline: conn::ShutdownDeadline,
) -> std::result::Result<Value, ApiError> {
    let mut maps: Vec<Vec<Value>> = vec![Vec::new(); r.n];
    let mut ends: Vec<Option<crate::engine::Summary>> = vec![None; r.n];
    while ends.iter().any(Option::is_none) {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            () = deadline.passed() => return Err(cut_by_shutdown()),
        };
        match ev {
            Some(Event::Item { choice, item }) => match item {
                Item::Token(t) => {
                    if let Some(m) = t.map.as_ref().filter(|m| !r.eos.contains(&m.id)) {
                        maps[choice].push(openai::token_map_json(m));
                    }
                }
                Item::Map(m) if !r.eos.contains(&m.id) => {
                    maps[choice].push(openai::token_map_json(&m))
                }
                Item::Done(sum) => ends[choice] = Some(sum),
                _ => {}
            },
            Some(Event::Started { .. }) => {}
            Some(Event::Failed(e)) => return Err(e),
            None => {
                return Err(ApiError::server(
                    "the engine ended the request without an answer",
                ))
            }
        }
    }
    let mut choices = Vec::with_capacity(r.n);
    let mut completion = 0;
    let cached = ends
        .iter()
        .flatten()
        .map(|s| s.cached_tokens)
        .max()
        .unwrap_or(0);
    for (index, (sum, maps)) in ends.into_iter().flatten().zip(maps).enumerate() {
        // Per answer token, end-of-sequence ids left out.
        let answer: Vec<usize> = (0..sum.generated_ids.len())
            .filter(|&i| !r.eos.contains(&sum.generated_ids[i]))
            .collect();
        completion += answer.len();
        let logprobs: Vec<Value> = answer
            .iter()
            .filter_map(|&i| sum.logprobs.get(i))
            .map(openai::logprob_json)
            .collect();
        let relevancy = r.method.map(|m| {
            let mut rel = json!({
                "method": m.name(),
                "tokens": maps,
                "confidence": sum.confidence.as_ref().map(openai::confidence_json),
                "maps_ms": sum.maps_s * 1e3,
            });
            rel.as_object_mut()
                .unwrap()
                .extend(openai::layout_fields(&r.layouts));
            if let Some((_, threshold)) = r.ungrounded {
                let mut running = openai::RunningConfidence::default();
                for t in &maps {
                    let (index, entropy) = (t["index"].as_u64(), t["entropy"].as_f64());
                    if let (Some(i), Some(h)) = (index, entropy) {
                        running.add(i as usize, h as f32, threshold);
                    }
                }
                rel["ungrounded"] = running.json(threshold);
            }
            rel
        });
        let mut choice = json!({
            "index": index,
            "message": {"role": "assistant", "content": sum.text, "refusal": null},
            "logprobs": if sum.logprobs.is_empty() {
                Value::Null
            } else {
                json!({"content": logprobs})
            },
            "finish_reason": openai::finish_reason(sum.stop_reason),
        });
        // Several choices carry their maps each; one choice keeps them beside `choices`.
        if r.n > 1 {
            if let Some(rel) = &relevancy {
                choice["relevancy"] = rel.clone();
            }
        }
        choices.push((choice, relevancy));
    }
    let top = if r.n == 1 {
        choices.first().and_then(|c| c.1.clone())
    } else {
        None
    };
    let mut v = json!({
        "id": r.id,
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "system_fingerprint": null,
        "choices": choices.into_iter().map(|c| c.0).collect::<Vec<_>>(),
        "usage": r.usage(completion, cached),
    });
    if let Some(rel) = top {
        v["relevancy"] = rel;
    }
    Ok(v)
}
