//! Step 1, classification: the head's per-patch probabilities against the binarised baseline
//! maps, micro-averaged over every token and patch of the set, at each threshold.

use serde::Serialize;

use super::metrics::{self, Counts};
use super::Sample;
use crate::error::Result;
use crate::render::plot::{line_plot, Axis, LinePlot, Series, PALETTE};

/// Step 1, classification: confusion counts of the head's probabilities against the binarised
/// baseline maps (labels at `tau`·max), at every threshold of [`metrics::THRESHOLDS`].
pub(super) fn classify(samples: &[Sample], tau: f32) -> [Counts; metrics::THRESHOLDS.len()] {
    let mut counts = [Counts::default(); metrics::THRESHOLDS.len()];
    for s in samples {
        for (probs, map) in s.fastrm.iter().zip(&s.baseline) {
            let labels = crate::train::labels(map, tau);
            for (c, &t) in counts.iter_mut().zip(&metrics::THRESHOLDS) {
                metrics::classify_into(c, probs, &labels, t);
            }
        }
    }
    counts
}

/// The classification section at one threshold of [`metrics::THRESHOLDS`].
#[derive(Debug, Clone, Serialize)]
pub struct ClassificationRow {
    pub threshold: f32,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub tp: u64,
    pub fp: u64,
    pub tn: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
}

pub(super) fn rows(counts: &[Counts]) -> Vec<ClassificationRow> {
    counts
        .iter()
        .zip(&metrics::THRESHOLDS)
        .map(|(c, &threshold)| ClassificationRow {
            threshold,
            accuracy: c.accuracy(),
            precision: c.precision(),
            recall: c.recall(),
            f1: c.f1(),
            tp: c.tp,
            fp: c.fp,
            tn: c.tn,
            fn_: c.fn_,
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
        let c = counts[at_half];
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (1, 1, 1, 1));
        let rows = rows(&counts);
        assert_eq!(rows.len(), metrics::THRESHOLDS.len());
        assert_eq!(rows[at_half].f1, 0.5);
        let json = serde_json::to_value(&rows[at_half]).unwrap();
        assert_eq!(json["fn"], 1);
    }
}
