//! Per-token relevancy maps over the image patches.
//!
//! A [`Method`] makes one raw map per generated token; its [`Mapper`] does the method's work around
//! a generation [`Session`]. [`map_entropy`] is the per-token confidence signal.

pub mod baseline;
pub mod fastrm;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::session::{Mode, Session};
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

/// A method by name, without its parameters: what command lines, request fields and data-set
/// manifests write (`fastrm`, `baseline`, `baseline-incremental`, `gradcam`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MethodName {
    /// The learned FastRM head: one fused op per token on the decode step (needs a head).
    Fastrm,
    /// Exact Chefer gradient relevancy per token (one backward over the whole prefix each).
    Baseline,
    /// LVLM-Interpret's incremental rows: about two decode steps per later token.
    BaselineIncremental,
    /// LLM-layer GradCAM at one decoder layer (default: the middle one).
    Gradcam,
}

impl crate::util::Named for MethodName {
    const ALL: &'static [Self] = &MethodName::ALL;
    fn name(self) -> &'static str {
        self.as_str()
    }
    fn help(self) -> &'static str {
        match self {
            MethodName::Fastrm => {
                "The learned FastRM head: one fused op per token on the decode step (needs a head)"
            }
            MethodName::Baseline => {
                "Exact Chefer gradient relevancy per token (one backward over the whole prefix each)"
            }
            MethodName::BaselineIncremental => {
                "LVLM-Interpret's incremental rows: about two decode steps per later token"
            }
            MethodName::Gradcam => "LLM-layer GradCAM at one decoder layer (default: the middle one)",
        }
    }
}

impl MethodName {
    pub const ALL: [MethodName; 4] = [
        MethodName::Fastrm,
        MethodName::Baseline,
        MethodName::BaselineIncremental,
        MethodName::Gradcam,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::Fastrm => "fastrm",
            MethodName::Baseline => "baseline",
            MethodName::BaselineIncremental => "baseline-incremental",
            MethodName::Gradcam => "gradcam",
        }
    }

    /// The method with its parameters: `full_r` for the baseline, `layer` for GradCAM (default:
    /// the middle of `n_layers`); either given to another method is an error naming it.
    pub fn method(self, full_r: bool, layer: Option<usize>, n_layers: usize) -> Result<Method> {
        if full_r && self != MethodName::Baseline {
            return Err(Error::input("full R applies to the baseline method only"));
        }
        if layer.is_some() && self != MethodName::Gradcam {
            return Err(Error::input("a layer applies to the gradcam method only"));
        }
        Ok(match self {
            MethodName::Fastrm => Method::FastRm,
            MethodName::Baseline => Method::Baseline {
                mode: if full_r {
                    RowMode::FullR
                } else {
                    RowMode::Streamed
                },
            },
            MethodName::BaselineIncremental => Method::BaselineIncremental,
            MethodName::Gradcam => Method::GradCam {
                layer: layer.unwrap_or_else(|| default_gradcam_layer(n_layers)),
            },
        })
    }
}

impl std::str::FromStr for MethodName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        MethodName::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                Error::input(format!(
                    "unknown method {s:?}: use one of {}",
                    MethodName::ALL.map(|m| m.as_str()).join(", ")
                ))
            })
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl Method {
    pub fn kind(&self) -> MethodName {
        match self {
            Method::Baseline { .. } => MethodName::Baseline,
            Method::BaselineIncremental => MethodName::BaselineIncremental,
            Method::GradCam { .. } => MethodName::Gradcam,
            Method::FastRm => MethodName::Fastrm,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// The default GradCAM layer: the middle of the decoder (`L / 2`), where the paper's comparison
/// takes it — late enough to be about the answer, early enough to still be spatial.
pub fn default_gradcam_layer(n_layers: usize) -> usize {
    n_layers / 2
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

impl serde::Serialize for Confidence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Confidence", 4)?;
        st.serialize_field("mean_entropy", &self.mean_entropy)?;
        st.serialize_field("threshold", &self.threshold)?;
        st.serialize_field("verdict", self.verdict())?;
        st.serialize_field("tokens", &self.tokens)?;
        st.end()
    }
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

/// A method's work around one [`Session`]: which mode the session runs in, what happens after
/// prefill, and each token's map — during generation (FastRM, the incremental baseline) or after
/// it (the exact baseline and GradCAM, whose backwards need every position's activations).
pub enum Mapper<'h, B: Backend> {
    FastRm {
        head: &'h fastrm::FastRmHead<B>,
        folded: Option<fastrm::Folded<B>>,
    },
    Incremental(Option<Incremental>),
    AfterGeneration(Method),
}

impl<'h, B: Backend> Mapper<'h, B> {
    /// The mapper of `method`; FastRM needs `head`. Checks the method against the model.
    pub fn new(
        method: Method,
        head: Option<&'h fastrm::FastRmHead<B>>,
        model: &Llava<B>,
    ) -> Result<Self> {
        Ok(match method {
            Method::FastRm => Mapper::FastRm {
                head: head.ok_or_else(|| {
                    Error::input("no FastRM head loaded: pass --head FILE (head.safetensors)")
                })?,
                folded: None,
            },
            Method::BaselineIncremental => Mapper::Incremental(None),
            Method::GradCam { layer } => {
                let n = model.cfg.text.num_hidden_layers;
                if layer >= n {
                    return Err(Error::input(format!(
                        "GradCAM layer {layer} does not exist: the decoder has layers 0..{}",
                        n - 1
                    )));
                }
                Mapper::AfterGeneration(method)
            }
            Method::Baseline { .. } => Mapper::AfterGeneration(method),
        })
    }

    /// The session mode the method needs.
    pub fn mode(&self) -> Mode {
        match self {
            Mapper::FastRm { .. } => Mode::Plain,
            Mapper::Incremental(_) => Mode::SaveStep,
            Mapper::AfterGeneration(_) => Mode::SaveAll,
        }
    }

    /// Whether maps come after generation rather than with each token.
    pub fn after_generation(&self) -> bool {
        matches!(self, Mapper::AfterGeneration(_))
    }

    /// After prefill: FastRM folds the image positions' keys into its query projection.
    pub fn prefilled(&mut self, s: &Session<'_, B>) -> Result<()> {
        if let Mapper::FastRm { head, folded } = self {
            *folded = Some(head.fold(s.backend(), &s.image_hidden()?)?);
        }
        Ok(())
    }

    /// The map of the token [`Session::step`] just chose, over the image positions, for the
    /// methods that map during generation (`None` for the others).
    pub fn token(&mut self, s: &Session<'_, B>) -> Result<Option<Vec<f32>>> {
        let b = s.backend();
        let Some(&id) = s.generated().last() else {
            return Ok(None);
        };
        let row = match self {
            Mapper::FastRm { head, folded } => {
                let folded = folded.as_ref().ok_or_else(|| {
                    Error::input("FastRM scored a token before the prompt was folded")
                })?;
                return Ok(Some(b.download(&head.scores(b, folded, s.hidden())?)?));
            }
            Mapper::Incremental(tracker) => {
                let llm = &s.model().llm;
                let saved = s.saved().ok_or_else(|| {
                    Error::input("the incremental baseline needs a saving session")
                })?;
                match tracker {
                    None => {
                        let (n, capacity) = (s.prompt().len(), s.cache().capacity);
                        let (t, row) =
                            Incremental::start(b, llm, saved, s.cache(), n, id, capacity)?;
                        *tracker = Some(t);
                        row
                    }
                    Some(t) => t.step(b, llm, saved, s.cache(), id)?,
                }
            }
            Mapper::AfterGeneration(_) => return Ok(None),
        };
        Ok(Some(s.prompt().image_columns(&row)))
    }

    /// After generation: the map of generated token `index` by a backward from its logit over the
    /// session's saved activations (exact baseline, GradCAM).
    pub fn after(&self, s: &Session<'_, B>, index: usize) -> Result<Vec<f32>> {
        let Mapper::AfterGeneration(method) = self else {
            return Err(Error::input("this method maps during generation"));
        };
        gradient_map(s, *method, index)
    }
}

/// The map of generated token `index` of a finished [`Mode::SaveAll`] session by `method`'s
/// backward: the exact baseline or GradCAM.
pub fn gradient_map<B: Backend>(
    s: &Session<'_, B>,
    method: Method,
    index: usize,
) -> Result<Vec<f32>> {
    let (b, llm) = (s.backend(), &s.model().llm);
    let saved = s
        .saved()
        .ok_or_else(|| Error::input("gradient maps need a saving session"))?;
    let y = *s
        .generated()
        .get(index)
        .ok_or_else(|| Error::input(format!("no generated token {index} to explain")))?;
    let p = s.position_of(index);
    let row = match method {
        Method::Baseline { mode } => chefer_row(b, llm, saved, s.cache(), p, y, mode, false)?.row,
        Method::GradCam { layer } => gradcam_row(b, llm, saved, s.cache(), p, y, layer)?,
        Method::BaselineIncremental | Method::FastRm => {
            return Err(Error::input(format!(
                "{} maps are made during generation",
                method.name()
            )))
        }
    };
    Ok(s.prompt().image_columns(&row))
}

/// Maps of every generated token of a finished [`Mode::SaveAll`] session by the incremental
/// baseline: token 0's exact backward over the prompt, then each later token's single-row
/// backward through its own decode step (the same maps a [`Mode::SaveStep`] run makes as it goes).
pub fn incremental_maps<B: Backend>(s: &Session<'_, B>) -> Result<Vec<Vec<f32>>> {
    let (b, llm) = (s.backend(), &s.model().llm);
    let saved = s
        .saved()
        .ok_or_else(|| Error::input("gradient maps need a saving session"))?;
    let mut maps = Vec::new();
    let mut tracker: Option<Incremental> = None;
    for (k, &y) in s.generated().iter().enumerate() {
        let row = match &mut tracker {
            None => {
                let n = s.prompt().len();
                let (t, row) =
                    Incremental::start(b, llm, saved, s.cache(), n, y, s.cache().capacity)?;
                tracker = Some(t);
                row
            }
            Some(t) => t.step(b, llm, saved, s.cache(), y)?,
        };
        debug_assert_eq!(row.len(), s.position_of(k) + 1);
        maps.push(s.prompt().image_columns(&row));
    }
    Ok(maps)
}
