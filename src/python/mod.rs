//! The Python package's native module, `fastrm._fastrm` (feature `python`; maturin builds it from
//! `pyproject.toml`, and `src/python/fastrm/` is the package around it: the exceptions, the type
//! stubs).
//!
//! Every run, collected (`explain`, `generate`) or streamed, is one [`Run`]: a thread that holds
//! the engine and works one stream item at a time, when the Python side asks for the next one.
//! The waiting side releases the GIL and wakes every few milliseconds to let Python deliver
//! signals (Ctrl-C cancels the run). Because the thread only works on demand, a stream that is
//! dropped, closed or abandoned after an exception stops where it stood: its thread sees the
//! request channel close, drops the engine's session and ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyType};

use crate::engine::{
    collect_items, AnyEngine, CancelToken, Device, Dtype, ImageInput, Item, Method, Request,
    RunOptions, TokenStep,
};
use crate::explain::MethodName;
use crate::util::Named;
use crate::vision::RgbImage;
use crate::{Error, GenerateOptions};

/// How often a waiting call wakes to let Python deliver signals.
const SIGNAL_POLL: Duration = Duration::from_millis(20);

/// Runs whose thread is alive, and runs that ended before their last item because their consumer
/// left (for the tests: a dropped stream must stop its work).
static LIVE_RUNS: AtomicUsize = AtomicUsize::new(0);
static ABANDONED_RUNS: AtomicUsize = AtomicUsize::new(0);

/// One live run thread, counted in [`LIVE_RUNS`] until dropped.
struct Live;

impl Live {
    fn new() -> Self {
        LIVE_RUNS.fetch_add(1, Ordering::SeqCst);
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE_RUNS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a run is reported to its caller; the engine itself holds no state between
    // runs that the panic could have left half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Errors: the engine's messages as the package's exceptions (defined in fastrm/__init__.py so
// that InputError can also be a ValueError).

fn to_py(e: Error) -> PyErr {
    let class = match &e {
        Error::Io { source, .. } => {
            let msg = e.to_string();
            return match source.kind() {
                std::io::ErrorKind::NotFound => pyo3::exceptions::PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => {
                    pyo3::exceptions::PyPermissionError::new_err(msg)
                }
                _ => PyOSError::new_err(msg),
            };
        }
        Error::Input(_) | Error::ContextLength(_) | Error::Image { .. } => "InputError",
        Error::Config { .. }
        | Error::Checkpoint { .. }
        | Error::Tensor { .. }
        | Error::Tokenizer { .. } => "ModelError",
        Error::OutOfMemory(_) | Error::KvFull(_) => "OutOfMemoryError",
        Error::Cancelled => "CancelledError",
        _ => "EngineError",
    };
    error(class, e.to_string())
}

/// An exception of the package's class `name` (a `FastrmError` subclass).
fn error(name: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        let class = py
            .import("fastrm")
            .and_then(|m| m.getattr(name))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match class {
            Ok(class) => PyErr::from_type(class, msg),
            // The native module imported without its package: plain Python errors.
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(msg),
        }
    })
}

fn input_error(msg: impl Into<String>) -> PyErr {
    to_py(Error::Input(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// The engine.

/// What the engine object and its runs share.
struct Shared {
    engine: Mutex<AnyEngine>,
    /// The Python thread whose unfinished stream holds `engine`: a run started from that thread
    /// would wait for a stream only that thread can advance, so it is refused instead.
    stream_owner: Mutex<Option<ThreadId>>,
    grid: usize,
    n_layers: usize,
}

/// A LLaVA model on a device, with its FastRM head when it has one.
#[pyclass(module = "fastrm", frozen)]
struct Engine {
    shared: Arc<Shared>,
    // Read once: the engine's lock may be held by a run for a long time.
    has_head: bool,
    device: String,
    model: Option<PathBuf>,
}

#[pymethods]
impl Engine {
    /// `model`: a folder in the HF llava-hf layout; `None` is the bundled demo model, which
    /// comes with its trained head. `device`: "cpu", "cuda", "cuda:N". `head`: a FastRM head
    /// file (head.safetensors). `dtype`: "f16", "bf16" or "f32" (see the CLI's --dtype).
    #[new]
    #[pyo3(signature = (model=None, device="cpu", head=None, dtype=None))]
    fn new(
        py: Python<'_>,
        model: Option<PathBuf>,
        device: &str,
        head: Option<PathBuf>,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        let device: Device = device.parse().map_err(input_error)?;
        let dtype = dtype
            .map(|d| {
                Dtype::from_name(d).ok_or_else(|| {
                    input_error(format!(
                        "unknown dtype {d:?}: use one of {}",
                        Dtype::ALL
                            .iter()
                            .map(|d| d.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
            })
            .transpose()?;
        if model
            .as_deref()
            .and_then(|m| m.to_str())
            .is_some_and(|m| m.starts_with("synthetic:"))
        {
            return Err(input_error(
                "synthetic models run at the id level and take no image or question; use the \
                 fastrm command's profile for them",
            ));
        }
        let engine = py
            .detach(|| -> crate::Result<AnyEngine> {
                let (dir, head) = match &model {
                    Some(dir) => (dir.clone(), head.clone()),
                    None => (
                        crate::demo::model_dir()?,
                        Some(head.clone().map_or_else(crate::demo::head_path, Ok)?),
                    ),
                };
                let mut engine = AnyEngine::load(device, dtype, &dir)?;
                if let Some(h) = head {
                    engine.load_head(&h)?;
                }
                Ok(engine)
            })
            .map_err(to_py)?;
        let cfg = engine.config();
        let (grid, n_layers) = (cfg.vision.grid(), cfg.text.num_hidden_layers);
        let device = engine.backend_name();
        let model = engine.dir().map(PathBuf::from);
        let has_head = engine.has_head();
        Ok(Engine {
            has_head,
            shared: Arc::new(Shared {
                engine: Mutex::new(engine),
                stream_owner: Mutex::new(None),
                grid,
                n_layers,
            }),
            device,
            model,
        })
    }

    /// The backend the engine runs on ("cpu", "cuda:0 (…)").
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    /// The model folder.
    #[getter]
    fn model(&self) -> Option<PathBuf> {
        self.model.clone()
    }

    /// `(rows, cols)` of the patch grid every map covers.
    #[getter]
    fn grid(&self) -> (usize, usize) {
        (self.shared.grid, self.shared.grid)
    }

    /// Whether a FastRM head is loaded (method "fastrm" needs one).
    #[getter]
    fn has_head(&self) -> bool {
        self.has_head
    }

    /// Greedy generation with one relevancy map per generated token.
    #[pyo3(signature = (image, prompt, method="fastrm", max_new_tokens=64, full_r=false, layer=None, **sampling))]
    #[allow(clippy::too_many_arguments)]
    fn explain(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        prompt: &Bound<'_, PyAny>,
        method: &str,
        max_new_tokens: i64,
        full_r: bool,
        layer: Option<usize>,
        sampling: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Explanation> {
        let method = self.method(method, full_r, layer)?;
        let opts = options(max_new_tokens, Some(method), sampling)?;
        let req = request(image, prompt)?;
        let mut run = self.start(py, req, opts, false)?;
        let items = run.drain(py)?;
        let grid = (self.shared.grid, self.shared.grid);
        let ex = collect_items(items.into_iter().map(Ok), grid, &mut |_| {}).map_err(to_py)?;
        Explanation::new(py, ex.explained(method))
    }

    /// Greedy generation without maps.
    #[pyo3(signature = (image, prompt, max_new_tokens=64, **sampling))]
    fn generate(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        sampling: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Generation> {
        let opts = options(max_new_tokens, None, sampling)?;
        let req = request(image, prompt)?;
        let mut run = self.start(py, req, opts, false)?;
        let items = run.drain(py)?;
        let grid = (self.shared.grid, self.shared.grid);
        let c = collect_items(items.into_iter().map(Ok), grid, &mut |_| {}).map_err(to_py)?;
        Ok(Generation::new(c.generation))
    }

    /// The run as an iterator of events, each as soon as it exists; `method=None` generates
    /// without maps. Dropping or closing the iterator stops the run.
    #[pyo3(signature = (image, prompt, method=Some("fastrm"), max_new_tokens=64, full_r=false, layer=None, **sampling))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        prompt: &Bound<'_, PyAny>,
        method: Option<&str>,
        max_new_tokens: i64,
        full_r: bool,
        layer: Option<usize>,
        sampling: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Stream> {
        let method = match method {
            Some(m) => Some(self.method(m, full_r, layer)?),
            None if full_r || layer.is_some() => {
                return Err(input_error("full_r and layer need a method"))
            }
            None => None,
        };
        let opts = options(max_new_tokens, method, sampling)?;
        let req = request(image, prompt)?;
        let run = self.start(py, req, opts, true)?;
        Ok(Stream {
            cancel: run.cancel.clone(),
            run: Mutex::new(run),
            grid: self.shared.grid,
        })
    }

    fn __repr__(&self) -> String {
        let model = match &self.model {
            Some(m) => m.display().to_string(),
            None => "?".into(),
        };
        format!("Engine(model={model:?}, device={:?})", self.device)
    }
}

impl Engine {
    fn method(&self, name: &str, full_r: bool, layer: Option<usize>) -> PyResult<Method> {
        let kind: MethodName = name.parse().map_err(to_py)?;
        kind.method(full_r, layer, self.shared.n_layers)
            .map_err(to_py)
    }

    /// Starts a run's thread; returns once the thread holds the engine.
    fn start(&self, py: Python<'_>, req: Request, opts: RunOptions, stream: bool) -> PyResult<Run> {
        let me = std::thread::current().id();
        if *lock(&self.shared.stream_owner) == Some(me) {
            return Err(error(
                "EngineBusyError",
                "this engine is held by an unfinished stream opened in this thread; exhaust it, \
                 close() it or drop it before starting another run"
                    .into(),
            ));
        }
        let mut run = Run::spawn(self.shared.clone(), req, opts)?;
        if !matches!(run.recv(py)?, Msg::Ready) {
            return Err(error(
                "EngineError",
                "a run's thread spoke before it held the engine".into(),
            ));
        }
        if stream {
            *lock(&self.shared.stream_owner) = Some(me);
            run.owner = Some(me);
        }
        Ok(run)
    }
}

/// A run's options; `sampling` holds the keyword arguments that choose tokens (the CLI's
/// sampling flags, with underscores). An unknown keyword is a TypeError, never ignored.
fn options(
    max_new_tokens: i64,
    method: Option<Method>,
    sampling: Option<&Bound<'_, PyDict>>,
) -> PyResult<RunOptions> {
    // Python ints of any sign: a negative one is the caller's mistake, named, not an overflow.
    let count = |name: &str, v: i64| {
        usize::try_from(v).map_err(|_| input_error(format!("{name} must be ≥ 0, not {v}")))
    };
    let mut generate = GenerateOptions {
        max_new_tokens: count("max_new_tokens", max_new_tokens)?,
        ..Default::default()
    };
    let s = &mut generate.sampling;
    for (key, value) in sampling.into_iter().flat_map(|d| d.iter()) {
        let key: String = key.extract()?;
        match key.as_str() {
            "temperature" => s.temperature = value.extract()?,
            "top_p" => s.top_p = value.extract()?,
            "top_k" => {
                s.top_k = value
                    .extract::<Option<i64>>()?
                    .map(|k| count("top_k", k))
                    .transpose()?
            }
            // Any integer seeds the stream (a negative one by its two's complement).
            "seed" => s.seed = value.extract::<i64>()? as u64,
            "repetition_penalty" => s.repetition_penalty = value.extract()?,
            "presence_penalty" => s.presence_penalty = value.extract()?,
            "frequency_penalty" => s.frequency_penalty = value.extract()?,
            "logprobs" => {
                s.logprobs = value
                    .extract::<Option<i64>>()?
                    .map(|n| count("logprobs", n))
                    .transpose()?
            }
            "stop_ids" => s.stop_ids = value.extract()?,
            "stop" => {
                generate.stop = match value.extract::<String>() {
                    Ok(one) => vec![one],
                    Err(_) => value.extract()?,
                }
            }
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "unexpected keyword argument '{key}' (the sampling options are temperature, \
                     top_p, top_k, seed, repetition_penalty, presence_penalty, \
                     frequency_penalty, logprobs, stop, stop_ids)"
                )))
            }
        }
    }
    generate.validate().map_err(to_py)?;
    Ok(RunOptions {
        generate,
        method,
        ..Default::default()
    })
}

/// The request of a question (a `str`), or of a conversation: a list of OpenAI-style message
/// dicts (`{"role": ..., "content": str | [parts]}`) where each `{"type": "image"}` part marks the
/// place of the next image, transformers' convention. `image` is one image, a list or tuple of
/// them (a question's go before it, one `<image>` each, in order), or `None` (text only).
fn request(image: &Bound<'_, PyAny>, prompt: &Bound<'_, PyAny>) -> PyResult<Request> {
    let mut images = images_input(image)?;
    if let Ok(q) = prompt.extract::<String>() {
        if images.len() == 1 {
            return Ok(Request::question(images.remove(0), q));
        }
        return Ok(Request::Chat {
            turns: vec![crate::text::Turn::new(
                crate::text::Role::User,
                images.len(),
                q.as_str(),
            )],
            images,
        });
    }
    if !prompt.is_instance_of::<pyo3::types::PyList>() {
        return Err(PyTypeError::new_err(
            "prompt must be a str (a question) or a list of message dicts (a conversation)",
        ));
    }
    let json: String = prompt
        .py()
        .import("json")?
        .call_method1("dumps", (prompt,))
        .map_err(|e| input_error(format!("the messages are not JSON data: {e}")))?
        .extract()?;
    let conv = crate::engine::chat::messages_of(&json)
        .and_then(|m| crate::engine::chat::conversation_with_placeholders(&m))
        .map_err(|e| to_py(e.into()))?;
    Ok(Request::Chat {
        turns: conv.turns,
        images,
    })
}

/// `None` (no image), a list or tuple of images, or one image.
fn images_input(obj: &Bound<'_, PyAny>) -> PyResult<Vec<ImageInput>> {
    if obj.is_none() {
        return Ok(Vec::new());
    }
    if obj.is_instance_of::<pyo3::types::PyList>() || obj.is_instance_of::<pyo3::types::PyTuple>() {
        return obj.try_iter()?.map(|i| image_input(&i?)).collect();
    }
    Ok(vec![image_input(obj)?])
}

/// An image from Python: a path (str or os.PathLike), encoded bytes (PNG/JPEG), a NumPy uint8
/// array of shape (height, width, 3), or a PIL image (any mode; converted to RGB).
fn image_input(obj: &Bound<'_, PyAny>) -> PyResult<ImageInput> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(ImageInput::Bytes(b.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(ImageInput::Bytes(b.to_vec()));
    }
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        return array_image(a);
    }
    // PIL: duck-typed, so Pillow is not a dependency.
    if obj.hasattr("convert")? && obj.hasattr("tobytes")? && obj.hasattr("size")? {
        let rgb = obj.call_method1("convert", ("RGB",))?;
        let (width, height): (usize, usize) = rgb.getattr("size")?.extract()?;
        let bytes = rgb.call_method0("tobytes")?;
        let data = bytes.cast::<PyBytes>()?.as_bytes().to_vec();
        return rgb_image(width, height, data);
    }
    if let Ok(p) = obj.extract::<PathBuf>() {
        return Ok(ImageInput::Path(p));
    }
    Err(PyTypeError::new_err(format!(
        "image must be a path, bytes, a NumPy uint8 array (height, width, 3) or a PIL image, \
         not {}",
        obj.get_type().name()?
    )))
}

fn array_image(a: &Bound<'_, PyUntypedArray>) -> PyResult<ImageInput> {
    let shape = a.shape().to_vec();
    let dtype = a.dtype().str()?.to_string();
    let typed = a.cast::<numpy::PyArray3<u8>>();
    match (typed, shape.as_slice()) {
        (Ok(typed), &[height, width, 3]) => {
            // One copy into the engine's image; a strided view is read element by element.
            let data = match typed.try_readonly() {
                Ok(r) => match r.as_slice() {
                    Ok(s) => s.to_vec(),
                    Err(_) => r.as_array().iter().copied().collect(),
                },
                Err(e) => return Err(input_error(format!("image array: {e}"))),
            };
            rgb_image(width, height, data)
        }
        _ => Err(input_error(format!(
            "an image array must be uint8 RGB of shape (height, width, 3); got dtype {dtype} \
             and shape {shape:?}"
        ))),
    }
}

fn rgb_image(width: usize, height: usize, data: Vec<u8>) -> PyResult<ImageInput> {
    if width == 0 || height == 0 || data.len() != width * height * 3 {
        return Err(input_error(format!(
            "image: {width}x{height} RGB needs {} bytes, got {}",
            width * height * 3,
            data.len()
        )));
    }
    Ok(ImageInput::Decoded(RgbImage {
        width,
        height,
        data,
    }))
}

// ---------------------------------------------------------------------------------------------
// A run on its thread.

enum Msg {
    /// The thread holds the engine.
    Ready,
    Item(Box<crate::Result<Item>>),
}

struct Run {
    /// One message per item wanted; dropping it ends the run.
    pull: Option<SyncSender<()>>,
    items: Mutex<Receiver<Msg>>,
    cancel: CancelToken,
    /// The last item (Done, or an error) has been given out.
    finished: bool,
    shared: Arc<Shared>,
    /// For a stream: the thread recorded in `Shared::stream_owner`, cleared when it ends.
    owner: Option<ThreadId>,
}

impl Run {
    fn spawn(shared: Arc<Shared>, req: Request, opts: RunOptions) -> PyResult<Run> {
        let (pull_tx, pull_rx) = sync_channel::<()>(1);
        let (item_tx, item_rx) = sync_channel::<Msg>(1);
        let cancel = CancelToken::new();
        let (engine, token) = (shared.clone(), cancel.clone());
        let live = Live::new();
        let spawned = std::thread::Builder::new()
            .name("fastrm-run".into())
            .spawn(move || {
                // Counted down however the thread ends, a panic included.
                let _live = live;
                let finished = work(&engine, &req, &opts, &token, pull_rx, item_tx);
                if !finished {
                    ABANDONED_RUNS.fetch_add(1, Ordering::SeqCst);
                }
            });
        if let Err(e) = spawned {
            return Err(PyOSError::new_err(format!(
                "could not start a run thread: {e}"
            )));
        }
        Ok(Run {
            pull: Some(pull_tx),
            items: Mutex::new(item_rx),
            cancel,
            finished: false,
            shared,
            owner: None,
        })
    }

    /// The next message, waiting with the GIL released; a pending signal (Ctrl-C) cancels the
    /// run and raises.
    fn recv(&mut self, py: Python<'_>) -> PyResult<Msg> {
        loop {
            let got = py.detach(|| lock(&self.items).recv_timeout(SIGNAL_POLL));
            match got {
                Ok(msg) => return Ok(msg),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        self.finish();
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return Err(error(
                        "EngineError",
                        "the run's thread ended without a result (a panic in the engine; its \
                         message is on stderr)"
                            .into(),
                    ));
                }
            }
        }
    }

    /// The next item; `None` after the last.
    fn next(&mut self, py: Python<'_>) -> PyResult<Option<Item>> {
        if self.finished {
            return Ok(None);
        }
        let asked = self.pull.as_ref().is_some_and(|p| p.send(()).is_ok());
        if !asked {
            self.finish();
            return Err(error(
                "EngineError",
                "the run's thread ended without a result".into(),
            ));
        }
        let msg = self.recv(py)?;
        // Closed from another thread while this one waited: the run is over, whatever came.
        if self.cancel.is_cancelled() {
            self.finish();
            return Ok(None);
        }
        match msg {
            Msg::Item(item) => match *item {
                Ok(item) => {
                    if matches!(item, Item::Done(_)) {
                        self.finish();
                    }
                    Ok(Some(item))
                }
                Err(e) => {
                    self.finish();
                    Err(to_py(e))
                }
            },
            Msg::Ready => Err(error(
                "EngineError",
                "the run's thread said it was ready twice".into(),
            )),
        }
    }

    /// [`Run::next`] for a stream: the thread advancing it becomes the one a second run would
    /// deadlock (it alone can move the stream on), whichever thread opened it.
    fn advance_from_here(&mut self, py: Python<'_>) -> PyResult<Option<Item>> {
        if !self.finished {
            let me = std::thread::current().id();
            if self.owner != Some(me) {
                let mut owner = lock(&self.shared.stream_owner);
                if *owner == self.owner {
                    *owner = Some(me);
                }
                self.owner = Some(me);
            }
        }
        self.next(py)
    }

    /// Every item up to the last.
    fn drain(&mut self, py: Python<'_>) -> PyResult<Vec<Item>> {
        let mut items = Vec::new();
        while let Some(item) = self.next(py)? {
            items.push(item);
        }
        Ok(items)
    }

    /// Ends the run: its thread stops before its next unit of work and lets the engine go.
    fn finish(&mut self) {
        if !self.finished {
            self.cancel.cancel();
        }
        self.finished = true;
        self.pull = None;
        if let Some(me) = self.owner.take() {
            let mut owner = lock(&self.shared.stream_owner);
            if *owner == Some(me) {
                *owner = None;
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.finish()
    }
}

/// A run's thread: takes the engine, says so, then makes one item per request until the last
/// item or until nobody asks. Returns whether the run reached its last item.
fn work(
    shared: &Shared,
    req: &Request,
    opts: &RunOptions,
    cancel: &CancelToken,
    pull: Receiver<()>,
    items: SyncSender<Msg>,
) -> bool {
    let engine = lock(&shared.engine);
    if items.send(Msg::Ready).is_err() {
        return false;
    }
    let mut stream = engine.stream(req, opts, cancel);
    while pull.recv().is_ok() {
        let Some(item) = stream.next() else {
            return true;
        };
        let last = matches!(item, Err(_) | Ok(Item::Done(_)));
        if items.send(Msg::Item(Box::new(item))).is_err() {
            return false;
        }
        if last {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// What runs give back.

/// Seconds per phase of a run.
#[pyclass(module = "fastrm", frozen, get_all)]
#[derive(Clone)]
struct Timings {
    vision_s: f64,
    prefill_s: f64,
    decode_s: f64,
    /// The maps alone (folds, scores, backwards); 0 without maps.
    maps_s: f64,
}

#[pymethods]
impl Timings {
    fn __repr__(&self) -> String {
        format!(
            "Timings(vision_s={}, prefill_s={}, decode_s={}, maps_s={})",
            self.vision_s, self.prefill_s, self.decode_s, self.maps_s
        )
    }
}

impl Timings {
    fn new(t: &crate::model::llava::Timings, maps_s: f64) -> Self {
        Timings {
            vision_s: t.vision_s,
            prefill_s: t.prefill_s,
            decode_s: t.decode_s,
            maps_s,
        }
    }
}

/// A finished generation.
#[pyclass(module = "fastrm", frozen, get_all)]
struct Generation {
    text: String,
    input_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    /// "eos", "max_new_tokens", "context" or "stop".
    stop_reason: &'static str,
    timings: Timings,
    /// With `logprobs=N`: per token, its log-probability and the N most likely
    /// `(id, token, logprob)`.
    logprobs: Vec<LogprobRow>,
}

/// A token's log-probability and its most likely alternatives `(id, token, logprob)`.
type LogprobRow = (f32, Vec<(u32, String, f32)>);

fn logprob_row(l: &crate::engine::TokenLogprobs) -> LogprobRow {
    let top = l
        .top_logprobs
        .iter()
        .map(|t| (t.id, t.token.clone(), t.logprob))
        .collect();
    (l.logprob, top)
}

#[pymethods]
impl Generation {
    fn __repr__(&self) -> String {
        format!(
            "Generation(text={:?}, generated_ids={:?}, stop_reason={:?})",
            self.text, self.generated_ids, self.stop_reason
        )
    }
}

impl Generation {
    fn new(g: crate::engine::Generation) -> Self {
        Self::with_maps_s(g, 0.0)
    }
    fn with_maps_s(g: crate::engine::Generation, maps_s: f64) -> Self {
        Generation {
            timings: Timings::new(&g.timings, maps_s),
            logprobs: g.logprobs.iter().map(logprob_row).collect(),
            text: g.text,
            input_ids: g.input_ids,
            generated_ids: g.generated_ids,
            stop_reason: g.stop_reason.as_str(),
        }
    }
}

/// One generated token's relevancy map.
#[pyclass(module = "fastrm", frozen, get_all)]
struct TokenMap {
    index: usize,
    id: u32,
    /// The token's own text.
    text: String,
    /// float32 (rows, cols) over the image's patch grid — (images, rows, cols) for a prompt of
    /// several images: the method's raw relevancy. A tiled image's (LLaVA-NeXT) is flat, one
    /// value per image token in the prompt's order.
    map: Py<PyArrayDyn<f32>>,
    /// Each image's map placed on its picture, float32 (rows, cols): a square view's patch grid
    /// as in `map`; a tiled image's grid of kept tiles over the whole picture, the squashed
    /// view's cells spread over it, newline tokens left out.
    placed: Vec<Py<PyArrayDyn<f32>>>,
    /// Normalised entropy of the map, in [0, 1].
    entropy: f32,
}

#[pymethods]
impl TokenMap {
    /// "map": the kind of stream event a map made after generation is.
    #[getter]
    fn kind(&self) -> &'static str {
        "map"
    }
    fn __repr__(&self) -> String {
        format!(
            "TokenMap(index={}, id={}, text={:?}, entropy={})",
            self.index, self.id, self.text, self.entropy
        )
    }
}

impl TokenMap {
    /// The map moves into its array without a copy.
    fn new(py: Python<'_>, m: crate::engine::TokenMap, grid: usize) -> PyResult<Self> {
        // A tiled image's tokens are no square grid: its map stays flat, in the tokens' order.
        let square = m.layouts.iter().all(|l| l.tokens() == grid * grid);
        let placed = m
            .placed()
            .map_err(to_py)?
            .into_iter()
            .map(|((rows, cols), v)| {
                Ok(PyArray1::from_vec(py, v)
                    .reshape(vec![rows, cols])?
                    .unbind())
            })
            .collect::<PyResult<Vec<_>>>()?;
        let shape = match m.images {
            _ if !square => vec![m.map.len()],
            0 | 1 => vec![grid, grid],
            k => vec![k, grid, grid],
        };
        let map = PyArray1::from_vec(py, m.map).reshape(shape)?;
        Ok(TokenMap {
            index: m.index,
            id: m.id,
            text: m.text,
            map: map.unbind(),
            placed,
            entropy: m.entropy,
        })
    }
}

/// The answer's mean map entropy and its verdict.
#[pyclass(module = "fastrm", frozen, get_all)]
struct Confidence {
    mean_entropy: f32,
    /// The head's calibrated threshold; None without one.
    threshold: Option<f32>,
    /// "confident", "uncertain" or "uncalibrated".
    verdict: &'static str,
    /// How many tokens the mean is over (EOS left out).
    tokens: usize,
}

#[pymethods]
impl Confidence {
    fn __repr__(&self) -> String {
        format!(
            "Confidence(mean_entropy={}, threshold={}, verdict={:?})",
            self.mean_entropy,
            self.threshold.map_or("None".into(), |t| t.to_string()),
            self.verdict
        )
    }
}

impl Confidence {
    fn new(c: crate::explain::Confidence) -> Self {
        Confidence {
            mean_entropy: c.mean_entropy,
            threshold: c.threshold,
            verdict: c.verdict(),
            tokens: c.tokens,
        }
    }
}

/// A finished explain run: the answer and one map per generated token.
#[pyclass(module = "fastrm", frozen, get_all)]
struct Explanation {
    text: String,
    input_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    stop_reason: &'static str,
    /// The method's name ("fastrm", "baseline", "baseline-incremental", "gradcam").
    method: &'static str,
    /// The decoder layer, for GradCAM.
    layer: Option<usize>,
    grid: (usize, usize),
    tokens: Vec<Py<TokenMap>>,
    confidence: Py<Confidence>,
    timings: Timings,
    logprobs: Vec<LogprobRow>,
}

#[pymethods]
impl Explanation {
    fn __repr__(&self) -> String {
        format!(
            "Explanation(text={:?}, method={:?}, tokens={})",
            self.text,
            self.method,
            self.tokens.len()
        )
    }
}

impl Explanation {
    fn new(py: Python<'_>, ex: crate::engine::Explained) -> PyResult<Self> {
        let g = Generation::with_maps_s(ex.generation, ex.maps_s);
        let tokens = ex
            .tokens
            .into_iter()
            .map(|m| Py::new(py, TokenMap::new(py, m, ex.grid.1)?))
            .collect::<PyResult<_>>()?;
        Ok(Explanation {
            text: g.text,
            input_ids: g.input_ids,
            generated_ids: g.generated_ids,
            stop_reason: g.stop_reason,
            method: ex.method.name(),
            layer: match ex.method {
                Method::GradCam { layer } => Some(layer),
                _ => None,
            },
            grid: ex.grid,
            tokens,
            confidence: Py::new(py, Confidence::new(ex.confidence))?,
            timings: g.timings,
            logprobs: g.logprobs,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Stream events.

/// The vision tower and projector are done.
#[pyclass(module = "fastrm", frozen)]
struct ImageEncoded;

#[pymethods]
impl ImageEncoded {
    #[getter]
    fn kind(&self) -> &'static str {
        "image_encoded"
    }
    fn __repr__(&self) -> &'static str {
        "ImageEncoded()"
    }
}

/// The prompt has been run through the decoder.
#[pyclass(module = "fastrm", frozen, get_all)]
struct Prefilled {
    prompt_len: usize,
}

#[pymethods]
impl Prefilled {
    #[getter]
    fn kind(&self) -> &'static str {
        "prefilled"
    }
    fn __repr__(&self) -> String {
        format!("Prefilled(prompt_len={})", self.prompt_len)
    }
}

/// One generated token, as soon as it exists.
#[pyclass(module = "fastrm", frozen, get_all)]
struct Token {
    index: usize,
    id: u32,
    /// What this token adds to the answer's text (the deltas joined are the answer).
    text_delta: String,
    /// The token's map for methods that map while generating (fastrm, baseline-incremental);
    /// the others send their maps as TokenMap events after the last token.
    map: Option<Py<TokenMap>>,
    /// With `logprobs=N`: the token's log-probability and the N most likely.
    logprobs: Option<LogprobRow>,
}

#[pymethods]
impl Token {
    #[getter]
    fn kind(&self) -> &'static str {
        "token"
    }
    fn __repr__(&self) -> String {
        format!(
            "Token(index={}, id={}, text_delta={:?}, map={})",
            self.index,
            self.id,
            self.text_delta,
            if self.map.is_some() { "..." } else { "None" }
        )
    }
}

/// The run's end: the whole answer, and its confidence for runs with maps.
#[pyclass(module = "fastrm", frozen, get_all)]
struct Done {
    generation: Py<Generation>,
    confidence: Option<Py<Confidence>>,
}

#[pymethods]
impl Done {
    #[getter]
    fn kind(&self) -> &'static str {
        "done"
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        format!("Done(generation={})", self.generation.borrow(py).__repr__())
    }
}

/// The iterator `Engine.stream` returns.
#[pyclass(module = "fastrm", frozen)]
struct Stream {
    run: Mutex<Run>,
    /// The run's, reachable without its lock.
    cancel: CancelToken,
    grid: usize,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        // The thread advancing the run waits with the GIL released while holding this lock, so
        // another thread must not wait for it with the GIL held: like a generator, a stream
        // already being advanced refuses.
        let item = match self.run.try_lock() {
            Ok(mut run) => run.advance_from_here(py)?,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().advance_from_here(py)?,
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "stream already executing in another thread",
                ))
            }
        };
        item.map(|i| event(py, i, self.grid)).transpose()
    }

    /// Stops the run now; the iterator then yields nothing. A `next` waiting in another thread
    /// raises CancelledError.
    fn close(&self) {
        self.cancel.cancel();
        match self.run.try_lock() {
            Ok(mut run) => run.finish(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().finish(),
            // The thread advancing it sees the cancellation and finishes it.
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close()
    }
}

fn event(py: Python<'_>, item: Item, grid: usize) -> PyResult<Py<PyAny>> {
    Ok(match item {
        Item::ImageEncoded => Py::new(py, ImageEncoded)?.into_any(),
        Item::Prefilled { prompt_len, .. } => Py::new(py, Prefilled { prompt_len })?.into_any(),
        Item::Token(TokenStep {
            index,
            id,
            text_delta,
            map,
            logprobs,
            ..
        }) => {
            let map = map
                .map(|m| Py::new(py, TokenMap::new(py, m, grid)?))
                .transpose()?;
            Py::new(
                py,
                Token {
                    index,
                    id,
                    text_delta,
                    map,
                    logprobs: logprobs.as_ref().map(logprob_row),
                },
            )?
            .into_any()
        }
        Item::Map(m) => Py::new(py, TokenMap::new(py, m, grid)?)?.into_any(),
        Item::Done(s) => {
            let generation = crate::engine::Generation {
                input_ids: s.input_ids,
                generated_ids: s.generated_ids,
                text: s.text,
                stop_reason: s.stop_reason,
                timings: s.timings,
                logprobs: s.logprobs,
                layouts: s.layouts,
                first_step_logits: s.first_step_logits,
            };
            Py::new(
                py,
                Done {
                    generation: Py::new(py, Generation::with_maps_s(generation, s.maps_s))?,
                    confidence: s
                        .confidence
                        .map(|c| Py::new(py, Confidence::new(c)))
                        .transpose()?,
                },
            )?
            .into_any()
        }
    })
}

/// `(live, abandoned)`: run threads alive now, and runs ended before their last item since the
/// module loaded (a dropped stream must stop its work; the tests watch this).
#[pyfunction]
fn _runs() -> (usize, usize) {
    (
        LIVE_RUNS.load(Ordering::SeqCst),
        ABANDONED_RUNS.load(Ordering::SeqCst),
    )
}

/// The bundled demo scene (a yellow star, a white circle, a red cross), as a file path.
#[pyfunction]
fn demo_image() -> PyResult<PathBuf> {
    crate::demo::image_path().map_err(to_py)
}

#[pymodule]
fn _fastrm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Explanation>()?;
    m.add_class::<Generation>()?;
    m.add_class::<TokenMap>()?;
    m.add_class::<Confidence>()?;
    m.add_class::<Timings>()?;
    m.add_class::<Stream>()?;
    m.add_class::<ImageEncoded>()?;
    m.add_class::<Prefilled>()?;
    m.add_class::<Token>()?;
    m.add_class::<Done>()?;
    m.add_function(wrap_pyfunction!(demo_image, m)?)?;
    m.add_function(wrap_pyfunction!(_runs, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
