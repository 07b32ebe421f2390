//! Per-token relevancy maps over the image patches.
//!
//! [`explain_ids`] runs greedy generation and produces one raw map per generated token with the
//! chosen [`Method`]; [`map_entropy`] is the per-token confidence signal (DESIGN §4).

pub mod baseline;
pub mod fastrm;
pub mod report;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::llama::KvCache;
use crate::model::llava::{Event, GenerateOptions, StopReason, Timings};
use crate::model::Llava;

pub use baseline::{chefer_row, gradcam_row, Incremental, Relevance, RowMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Exact Chefer relevancy per token, by a backward over the whole prefix.
    Baseline { mode: RowMode },
    /// LVLM-Interpret's incremental rows ([`Incremental`]).
    BaselineIncremental,
    /// LLM-layer GradCAM at one decoder layer.
    GradCam { layer: usize },
    /// The learned FastRM head on the last hidden states ([`fastrm`]); needs a head
    /// ([`explain_fastrm`]).
    FastRm,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Baseline { .. } => "baseline",
            Method::BaselineIncremental => "baseline-incremental",
            Method::GradCam { .. } => "gradcam",
            Method::FastRm => "fastrm",
        }
    }
}

/// The default GradCAM layer: the middle of the decoder (`L / 2`), where the paper's comparison
/// takes it — late enough to be about the answer, early enough to still be spatial.
pub fn default_gradcam_layer(n_layers: usize) -> usize {
    n_layers / 2
}

pub struct Explanation {
    pub generated_ids: Vec<u32>,
    pub stop_reason: StopReason,
    /// One raw map per generated token over the image positions, in prompt order.
    pub maps: Vec<Vec<f32>>,
    pub timings: Timings,
    /// Seconds spent on the maps alone (backwards and folds; the saving forward included).
    pub maps_s: f64,
}

/// Entropy of a map normalised to a distribution, divided by `ln(n)` so it lies in [0, 1]:
/// 0 when one patch holds all relevance, 1 when it is spread evenly. An all-zero map carries no
/// preference at all and counts as 1. Negative values are clamped (raw maps are ≥ 0 anyway).
pub fn map_entropy(map: &[f32]) -> f32 {
    if map.len() < 2 {
        return 0.0;
    }
    let total: f64 = map.iter().map(|&x| x.max(0.0) as f64).sum();
    if total <= 0.0 || !total.is_finite() {
        return 1.0;
    }
    let h: f64 = map
        .iter()
        .map(|&x| x.max(0.0) as f64 / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    (h / (map.len() as f64).ln()) as f32
}

/// The answer-level confidence signal of the paper: the mean normalised entropy of the answer's
/// maps, compared with a threshold calibrated on correct and incorrect answers. Low entropy means
/// the model looked somewhere specific.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confidence {
    pub mean_entropy: f32,
    /// From the head's calibration (`fastrm eval`); `None` when there is none.
    pub threshold: Option<f32>,
    /// How many tokens the mean is over (the answer's tokens, EOS left out).
    pub tokens: usize,
}

impl Confidence {
    /// Mean entropy over the tokens whose id is not an end-of-sequence id (all tokens if every one
    /// is).
    pub fn of_answer(entropies: &[f32], ids: &[u32], eos: &[u32], threshold: Option<f32>) -> Self {
        let answer: Vec<f32> = entropies
            .iter()
            .zip(ids)
            .filter(|(_, id)| !eos.contains(id))
            .map(|(&h, _)| h)
            .collect();
        let used = if answer.is_empty() {
            entropies.to_vec()
        } else {
            answer
        };
        let mean_entropy = if used.is_empty() {
            1.0
        } else {
            used.iter().sum::<f32>() / used.len() as f32
        };
        Confidence {
            mean_entropy,
            threshold,
            tokens: used.len(),
        }
    }

    pub fn verdict(&self) -> &'static str {
        match self.threshold {
            None => "uncalibrated",
            Some(t) if self.mean_entropy < t => "confident",
            Some(_) => "uncertain",
        }
    }
}

/// Greedy generation with a relevancy map per generated token.
pub fn explain_ids<B: Backend>(
    b: &B,
    model: &Llava<B>,
    ids: &[u32],
    pixels: &[f32],
    opts: &GenerateOptions,
    method: Method,
    observer: &mut dyn FnMut(Event),
) -> Result<Explanation> {
    if let Method::GradCam { layer } = method {
        let n = model.cfg.text.num_hidden_layers;
        if layer >= n {
            return Err(Error::input(format!(
                "GradCAM layer {layer} does not exist: the decoder has layers 0..{}",
                n - 1
            )));
        }
    }
    let image_pos: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| id == model.cfg.image_token_id)
        .map(|(i, _)| i)
        .collect();
    let pick = |row: &[f32]| -> Vec<f32> { image_pos.iter().map(|&j| row[j]).collect() };
    match method {
        Method::FastRm => Err(Error::input(
            "the FastRM method needs a head: use explain_fastrm",
        )),
        Method::BaselineIncremental => incremental(b, model, ids, pixels, opts, observer, &pick),
        Method::Baseline { .. } | Method::GradCam { .. } => {
            let g = model.generate_ids_observed(b, ids, pixels, opts, observer)?;
            let t0 = std::time::Instant::now();
            let maps =
                teacher_forced_maps(b, model, ids, pixels, &g.generated_ids, method, observer)?;
            Ok(Explanation {
                generated_ids: g.generated_ids,
                stop_reason: g.stop_reason,
                maps,
                timings: g.timings,
                maps_s: t0.elapsed().as_secs_f64(),
            })
        }
    }
}

/// A saving forward from position 0 over the prompt and every generated id but the last (which is
/// explained from the position before it and never fed back).
fn teacher_forced<B: Backend>(
    b: &B,
    model: &Llava<B>,
    ids: &[u32],
    pixels: &[f32],
    generated: &[u32],
) -> Result<(crate::model::llama::Saved<B>, KvCache<B>)> {
    if generated.is_empty() {
        return Err(Error::input("no generated tokens to explain"));
    }
    let n = ids.len();
    let (_, image) = model.encode_image(b, pixels)?;
    let prompt = model.embed_prompt(b, ids, &image)?;
    let fed = &generated[..generated.len() - 1];
    let total = n + fed.len();
    let mut x = b.zeros(total, model.cfg.text.hidden_size)?;
    b.copy_rows_into(&mut x, 0, &prompt)?;
    if !fed.is_empty() {
        b.copy_rows_into(&mut x, n, &b.embedding(&model.llm.embed, fed)?)?;
    }
    let mut cache = KvCache::new(b, &model.cfg.text, total)?;
    let (_, saved) = model.llm.forward_saving(b, x, &mut cache)?;
    Ok((saved, cache))
}

/// Maps of the exact baseline or GradCAM for given generated ids, one per token over the image
/// positions: one saving forward over the prompt and the ids (teacher forced), then one backward
/// per token from its logit.
pub fn teacher_forced_maps<B: Backend>(
    b: &B,
    model: &Llava<B>,
    ids: &[u32],
    pixels: &[f32],
    generated: &[u32],
    method: Method,
    observer: &mut dyn FnMut(Event),
) -> Result<Vec<Vec<f32>>> {
    let (saved, cache) = teacher_forced(b, model, ids, pixels, generated)?;
    let image_pos: Vec<usize> = (0..ids.len())
        .filter(|&i| ids[i] == model.cfg.image_token_id)
        .collect();
    let mut maps = Vec::with_capacity(generated.len());
    for (t, &y) in generated.iter().enumerate() {
        let p = ids.len() - 1 + t;
        let row = match method {
            Method::Baseline { mode } => {
                chefer_row(b, &model.llm, &saved, &cache, p, y, mode, false)?.row
            }
            Method::GradCam { layer } => gradcam_row(b, &model.llm, &saved, &cache, p, y, layer)?,
            Method::BaselineIncremental | Method::FastRm => {
                return Err(Error::input(
                    "the incremental baseline runs during generation, not teacher forced",
                ))
            }
        };
        maps.push(image_pos.iter().map(|&j| row[j]).collect());
        observer(Event::Explained { index: t });
    }
    Ok(maps)
}

/// Greedy generation with FastRM maps: the head folds the image positions' hidden states once
/// after prefill and scores each token's hidden state as it is produced, all on the device.
pub fn explain_fastrm<B: Backend>(
    b: &B,
    model: &Llava<B>,
    head: &fastrm::FastRmHead<B>,
    ids: &[u32],
    pixels: &[f32],
    opts: &GenerateOptions,
    observer: &mut dyn FnMut(Event),
) -> Result<Explanation> {
    let image_pos = (0..ids.len())
        .filter(|&i| ids[i] == model.cfg.image_token_id)
        .collect();
    let mut hook = fastrm::FastRmHook {
        head,
        image_pos,
        folded: None,
        maps: Vec::new(),
        seconds: 0.0,
    };
    let g = model.generate_ids_hooked(b, ids, pixels, opts, observer, &mut hook)?;
    Ok(Explanation {
        generated_ids: g.generated_ids,
        stop_reason: g.stop_reason,
        maps: hook.maps,
        timings: g.timings,
        maps_s: hook.seconds,
    })
}

/// Greedy generation with saving decode steps, each token's row from its own single-row backward.
fn incremental<B: Backend>(
    b: &B,
    model: &Llava<B>,
    ids: &[u32],
    pixels: &[f32],
    opts: &GenerateOptions,
    observer: &mut dyn FnMut(Event),
    pick: &dyn Fn(&[f32]) -> Vec<f32>,
) -> Result<Explanation> {
    model.check_request(ids, opts)?;
    let llm = &model.llm;
    let mut timings = Timings::default();
    let mut maps_s = 0.0;
    let t0 = std::time::Instant::now();
    let (_, image) = model.encode_image(b, pixels)?;
    timings.vision_s = t0.elapsed().as_secs_f64();
    observer(Event::ImageEncoded);

    let t1 = std::time::Instant::now();
    let x = model.embed_prompt(b, ids, &image)?;
    let ctx = model.cfg.text.max_position_embeddings;
    let capacity = (ids.len() + opts.max_new_tokens - 1).min(ctx);
    let mut cache = KvCache::new(b, &model.cfg.text, capacity)?;
    let (h, saved) = llm.forward_saving(b, x, &mut cache)?;
    let last = b.slice_rows(&h, ids.len() - 1, 1)?;
    let mut next = b.argmax_rows(&llm.logits(b, &last)?)?[0];
    timings.prefill_s = t1.elapsed().as_secs_f64();
    observer(Event::Prefilled {
        prompt_len: ids.len(),
    });

    let t2 = std::time::Instant::now();
    let mut generated = vec![next];
    observer(Event::Token { index: 0, id: next });
    let tm = std::time::Instant::now();
    let (mut tracker, row) = Incremental::start(b, llm, &saved, &cache, next, capacity)?;
    drop(saved);
    let mut maps = vec![pick(&row)];
    maps_s += tm.elapsed().as_secs_f64();
    observer(Event::Explained { index: 0 });
    let stop_reason = loop {
        if let Some(r) = model.stop_reason(opts, &generated, cache.len) {
            break r;
        }
        let x = b.embedding(&llm.embed, &[next])?;
        let (h, saved) = llm.forward_saving(b, x, &mut cache)?;
        next = b.argmax_rows(&llm.logits(b, &h)?)?[0];
        generated.push(next);
        observer(Event::Token {
            index: generated.len() - 1,
            id: next,
        });
        let tm = std::time::Instant::now();
        let row = tracker.step(b, llm, &saved, &cache, next)?;
        maps.push(pick(&row));
        maps_s += tm.elapsed().as_secs_f64();
        observer(Event::Explained {
            index: generated.len() - 1,
        });
    };
    timings.decode_s = t2.elapsed().as_secs_f64() - maps_s;
    Ok(Explanation {
        generated_ids: generated,
        stop_reason,
        maps,
        timings,
        maps_s,
    })
}
