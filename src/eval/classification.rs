//! Step 1, classification: the head's per-patch probabilities against the binarised baseline
//! maps, micro-averaged over every token and patch of the set, at each threshold; F1 with its
//! bootstrap interval over the questions, for the whole set and per question type.

use std::collections::BTreeMap;

use serde::Serialize;

use super::bootstrap;
use super::metrics::{self, Counts};
use super::Sample;
use crate::error::Result;
use crate::render::plot::{line_plot, Axis, LinePlot, Series, PALETTE};

/// Confusion counts at every threshold of [`metrics::THRESHOLDS`].
pub(super) type ThresholdCounts = [Counts; metrics::THRESHOLDS.len()];

/// Step 1, classification: per sample, confusion counts of the head's probabilities against the
/// binarised baseline maps (labels at `tau`·max), at every threshold.
pub(super) fn classify(samples: &[Sample], tau: f32) -> Vec<ThresholdCounts> {
    samples
        .iter()
        .map(|s| {
            let mut counts = [Counts::default(); metrics::THRESHOLDS.len()];
            for (probs, map) in s.fastrm.iter().zip(&s.baseline) {
                let labels = crate::train::labels(map, tau);
                for (c, &t) in counts.iter_mut().zip(&metrics::THRESHOLDS) {
                    metrics::classify_into(c, probs, &labels, t);
                }
            }
            counts
        })
        .collect()
}

/// The counts of several samples together.
pub(super) fn total(per_sample: &[ThresholdCounts]) -> ThresholdCounts {
    let mut all = [Counts::default(); metrics::THRESHOLDS.len()];
    for s in per_sample {
        for (a, c) in all.iter_mut().zip(s) {
            a.merge(c);
        }
    }
    all
}

/// The classification section at one threshold of [`metrics::THRESHOLDS`].
#[derive(Debug, Clone, Serialize)]
pub struct ClassificationRow {
    pub threshold: f32,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// F1's 95 % bootstrap interval over the questions.
    pub f1_ci95: [f64; 2],
    pub tp: u64,
    pub fp: u64,
    pub tn: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
}

/// F1 at one threshold, with its interval.
#[derive(Debug, Clone, Serialize)]
pub struct F1Row {
    pub threshold: f32,
    pub f1: f64,
    pub f1_ci95: [f64; 2],
}

/// One question type's F1 at every threshold, and its best.
#[derive(Debug, Clone, Serialize)]
pub struct TypeClassification {
    pub samples: usize,
    pub rows: Vec<F1Row>,
    pub best: F1Row,
}

/// F1 of the samples `idx` together at threshold `t` (an index into the thresholds).
fn f1_of(per_sample: &[ThresholdCounts], t: usize, idx: &mut dyn Iterator<Item = usize>) -> f64 {
    let mut c = Counts::default();
    idx.for_each(|i| c.merge(&per_sample[i][t]));
    c.f1()
}

fn f1_rows(per_sample: &[ThresholdCounts]) -> Vec<F1Row> {
    metrics::THRESHOLDS
        .iter()
        .enumerate()
        .map(|(t, &threshold)| {
            let e = bootstrap::estimate(per_sample.len(), |idx| f1_of(per_sample, t, idx));
            F1Row {
                threshold,
                f1: e.map_or(0.0, |e| e.value),
                f1_ci95: e.map_or([0.0, 0.0], |e| e.ci95),
            }
        })
        .collect()
}

pub(super) fn rows(per_sample: &[ThresholdCounts]) -> Vec<ClassificationRow> {
    total(per_sample)
        .iter()
        .zip(f1_rows(per_sample))
        .map(|(c, f)| ClassificationRow {
            threshold: f.threshold,
            accuracy: c.accuracy(),
            precision: c.precision(),
            recall: c.recall(),
            f1: c.f1(),
            f1_ci95: f.f1_ci95,
            tp: c.tp,
            fp: c.fp,
            tn: c.tn,
            fn_: c.fn_,
        })
        .collect()
}

/// F1 per question type (samples without a type are left out).
pub(super) fn by_type(
    samples: &[Sample],
    per_sample: &[ThresholdCounts],
) -> BTreeMap<String, TypeClassification> {
    let mut groups: BTreeMap<String, Vec<ThresholdCounts>> = BTreeMap::new();
    for (s, c) in samples.iter().zip(per_sample) {
        if let Some(t) = &s.record.qtype {
            groups.entry(t.clone()).or_default().push(*c);
        }
    }
    groups
        .into_iter()
        .map(|(t, counts)| {
            let rows = f1_rows(&counts);
            let best = rows
                .iter()
                .max_by(|a, b| a.f1.total_cmp(&b.f1))
                .cloned()
                .expect("one row per threshold");
            let samples = counts.len();
            (
                t,
                TypeClassification {
                    samples,
                    rows,
                    best,
                },
            )
        })
        .collect()
}

pub(super) fn classification_plot(counts: &[Counts]) -> Result<crate::vision::RgbImage> {
    let ts = metrics::THRESHOLDS;
    let series = |i: usize, name: &str, f: &dyn Fn(&Counts) -> f64| Series {
        name: name.into(),
        color: PALETTE[i],
        points: ts
            .iter()
            .zip(counts)
            .map(|(&t, c)| (t as f64, f(c)))
            .collect(),
        markers: true,
    };
    let mut plot = LinePlot::new(
        "FastRM vs binarised baseline",
        Axis::linear("classification threshold").within(0.1, 0.9),
        Axis::linear("score").within(0.0, 1.0),
    );
    plot.series = vec![
        series(0, "accuracy", &|c| c.accuracy()),
        series(1, "precision", &|c| c.precision()),
        series(2, "recall", &|c| c.recall()),
        series(3, "F1", &|c| c.f1()),
    ];
    line_plot(&plot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::SampleRecord;

    fn sample(baseline: Vec<Vec<f32>>, fastrm: Vec<Vec<f32>>) -> Sample {
        let ids = vec![5; baseline.len()];
        Sample {
            record: SampleRecord {
                sample: 0,
                question_id: 0,
                question: String::new(),
                image: String::new(),
                answer: String::new(),
                answers: None,
                generated_ids: ids.clone(),
                stop_reason: "eos".into(),
                qtype: None,
                n_objects: None,
                target_mask: None,
            },
            ids,
            baseline,
            fastrm,
        }
    }

    #[test]
    fn classification_section_counts_every_token_and_patch() {
        // Labels at 0.3·max: [1, 0, 1, 0]; probabilities at threshold 0.5 → [1, 1, 0, 0].
        let s = sample(
            vec![vec![1.0, 0.1, 0.5, 0.0]],
            vec![vec![0.9, 0.6, 0.2, 0.1]],
        );
        let counts = classify(&[s], 0.3);
        let at_half = metrics::THRESHOLDS.iter().position(|&t| t == 0.5).unwrap();
        let c = total(&counts)[at_half];
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (1, 1, 1, 1));
        let rows = rows(&counts);
        assert_eq!(rows.len(), metrics::THRESHOLDS.len());
        assert_eq!(rows[at_half].f1, 0.5);
        assert_eq!(rows[at_half].f1_ci95, [0.5, 0.5], "one question: no spread");
        let json = serde_json::to_value(&rows[at_half]).unwrap();
        assert_eq!(json["fn"], 1);
    }

    /// F1 per type pools only that type's questions; untyped questions count in the whole only.
    #[test]
    fn f1_per_question_type() {
        let typed = |t: Option<&str>, base: Vec<f32>, head: Vec<f32>| {
            let mut s = sample(vec![base], vec![head]);
            s.record.qtype = t.map(String::from);
            s
        };
        let samples = vec![
            // Perfect at 0.5: labels [1, 0], probabilities [0.9, 0.1].
            typed(Some("shape"), vec![1.0, 0.0], vec![0.9, 0.1]),
            // Wrong at 0.5: labels [1, 0], probabilities [0.1, 0.9].
            typed(Some("colour"), vec![1.0, 0.0], vec![0.1, 0.9]),
            typed(None, vec![1.0, 0.0], vec![0.9, 0.1]),
        ];
        let counts = classify(&samples, 0.3);
        let types = by_type(&samples, &counts);
        assert_eq!(types.keys().collect::<Vec<_>>(), ["colour", "shape"]);
        let at_half = metrics::THRESHOLDS.iter().position(|&t| t == 0.5).unwrap();
        assert_eq!(types["shape"].rows[at_half].f1, 1.0);
        assert_eq!(types["colour"].rows[at_half].f1, 0.0);
        assert_eq!(types["shape"].best.f1, 1.0);
        // The whole set: tp 2, fp 1, fn 1 at 0.5, and an interval around it from the three.
        let all = &rows(&counts)[at_half];
        assert!((all.f1 - 4.0 / 6.0).abs() < 1e-12);
        assert!(
            all.f1_ci95[0] < all.f1 && all.f1 < all.f1_ci95[1],
            "{all:?}"
        );
    }
}
