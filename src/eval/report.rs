//! Step 5, the report: what `eval` returns (each section a type; `Serialize` gives eval.json and
//! `--json`), and its files in `--out`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::classification::{self, ClassificationRow, TypeClassification};
use super::confidence::{self, CalibrationReport};
use super::metrics::{Calibration, Counts};
use super::perturbation::{self, PerturbationReport};
use super::pointing::{self, AccuracyReport, Pointing, PointingReport};
use crate::engine::report::Staging;
use crate::error::{Error, Result};
use crate::render::write_png;

pub const JSON_FILE: &str = "eval.json";
pub const CLASSIFICATION_PNG: &str = "classification.png";
pub const POSITIVE_PNG: &str = "perturbation_positive.png";
pub const NEGATIVE_PNG: &str = "perturbation_negative.png";
pub const ENTROPY_PNG: &str = "entropy_kde.png";
pub const POINTING_PNG: &str = "pointing.png";

/// What `eval` found.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub data: String,
    pub model: String,
    pub head: String,
    /// The gradient method that labelled the data set's maps.
    pub baseline_method: String,
    pub samples: usize,
    pub tokens: usize,
    pub n_patches: usize,
    pub grid: [usize; 2],
    pub label_threshold: f32,
    /// One row per threshold of [`super::metrics::THRESHOLDS`].
    pub classification: Vec<ClassificationRow>,
    /// F1 per question type (the data set's `qtype`), with intervals.
    pub classification_by_type: BTreeMap<String, TypeClassification>,
    /// `None` with `no_perturbation`.
    pub perturbation: Option<PerturbationReport>,
    pub confidence: CalibrationReport,
    /// `None` when no question has a target mask.
    pub pointing: Option<PointingReport>,
    /// `None` when no question has ground-truth answers.
    pub accuracy: Option<AccuracyReport>,
    pub per_sample: Vec<SampleReport>,
    /// Generations run (the perturbation's masked ones included).
    pub generations: usize,
    pub seconds: f64,
}

/// One sample's answer.
#[derive(Debug, Clone, Serialize)]
pub struct SampleReport {
    pub sample: usize,
    pub question_id: u64,
    pub answer: String,
    /// `None` without ground truth.
    pub correct: Option<bool>,
    pub mean_entropy: f32,
    pub tokens: usize,
}

/// eval.json and the plots, moved into `--out` together.
pub(super) fn write_files(
    st: Staging,
    report: &EvalReport,
    counts: &[Counts],
    cal: &Calibration,
    pointing: &Pointing,
) -> Result<()> {
    let mut names = vec![CLASSIFICATION_PNG, ENTROPY_PNG];
    let plot = |name: &str, img: Result<crate::vision::RgbImage>| write_png(&st.path(name), &img?);
    plot(
        CLASSIFICATION_PNG,
        classification::classification_plot(counts),
    )?;
    plot(ENTROPY_PNG, confidence::entropy_plot(cal))?;
    if let Some(pert) = &report.perturbation {
        for (dir, name) in [(0, POSITIVE_PNG), (1, NEGATIVE_PNG)] {
            plot(name, perturbation::perturbation_plot(pert, dir))?;
            names.push(name);
        }
    }
    if pointing.has_points() {
        plot(POINTING_PNG, pointing::pointing_plot(pointing))?;
        names.push(POINTING_PNG);
    }
    let text = crate::util::json_text(report, true)?;
    std::fs::write(st.path(JSON_FILE), text).map_err(|e| Error::io(st.path(JSON_FILE), e))?;
    names.push(JSON_FILE);
    st.commit(&names).map(|_| ())
}
