//! fastrm: LLaVA-1.5 inference with per-token visual relevancy maps.
//!
//! The model is written once against the op set in [`backend`]; the CPU backend (f32) is the
//! reference every other backend is tested against.
//!
//! [`Engine`] opens a model on a backend ([`AnyEngine`] picks one at run time) and runs requests
//! through one generation session ([`model::session`]): [`Engine::stream`] yields each token with
//! its text and, for FastRM, its relevancy map as soon as it exists; [`Engine::generate`] and
//! [`Engine::explain`] collect a whole run. `examples/shared_engine.rs` shows a server's use.
//!
//! Features: without any (`default-features = false`) this is the engine, the model, the backends,
//! the relevancy methods and the jobs (`distill`, `train`, `eval`, `profile`), with neither clap,
//! axum nor tokio among the dependencies. `cuda` adds the GPU backend, `serve` the HTTP server
//! (the `serve` module, axum on tokio), `cli` the `fastrm` command (the `cli` module, clap); the
//! defaults are all three. `python` is the Python package's native module (PyO3), which maturin
//! builds from `pyproject.toml`.
//!
//! ```
//! use fastrm::{AnyEngine, CancelToken, Device, ImageInput, Item, Method, Request, RunOptions};
//!
//! # fn main() -> fastrm::Result<()> {
//! let mut engine = AnyEngine::load(Device::Cpu, None, &fastrm::demo::model_dir()?)?;
//! engine.load_head(&fastrm::demo::head_path()?)?;
//! let upload = std::fs::read(fastrm::demo::image_path()?).unwrap();
//! let req = Request::question(ImageInput::Bytes(upload), "What color is the star?");
//! let opts = RunOptions { method: Some(Method::FastRm), ..Default::default() };
//! let cancel = CancelToken::new(); // a clone's cancel() stops the run between two steps
//! let mut answer = String::new();
//! for item in engine.stream(&req, &opts, &cancel) {
//!     match item? {
//!         Item::Token(t) => {
//!             answer.push_str(&t.text_delta);
//!             assert_eq!(t.map.unwrap().map.len(), 64); // the demo model's 8x8 grid
//!         }
//!         Item::Done(s) => assert_eq!(s.text, answer),
//!         _ => {}
//!     }
//! }
//! assert_eq!(answer.trim(), "yellow");
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod demo;
pub mod distill;
pub mod engine;
pub mod error;
pub mod eval;
pub mod explain;
pub mod model;
pub mod profile;
#[cfg(feature = "python")]
mod python;
pub mod render;
#[cfg(feature = "serve")]
pub mod serve;
pub mod status;
pub mod synth;
pub mod text;
pub mod train;
pub mod util;
pub mod vision;

pub use engine::{
    AnyEngine, CancelToken, Device, Dtype, ImageInput, Item, Method, Request, RunOptions,
    Scheduler, SeqId, TokenStep,
};
pub use engine::{Engine, GenerateOptions, Generation};
pub use error::{Error, Result};
