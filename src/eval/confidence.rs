//! Step 3, entropy confidence: per answer the mean normalised entropy of its FastRM maps; Gaussian
//! KDEs of correct and incorrect answers and the threshold between them.

use serde::Serialize;

use super::metrics::{self, Calibration};
use crate::error::Result;
use crate::render::plot::{line_plot, Axis, LinePlot, Marker, Series, PALETTE};

/// Step 3, entropy confidence: why no threshold could be calibrated, when none could.
pub(super) fn calibration_note(cal: &Calibration, has_ground_truth: bool) -> Option<&'static str> {
    match (cal.correct.is_empty(), cal.incorrect.is_empty()) {
        _ if !has_ground_truth => Some(
            "no question has ground-truth answers: correctness is unknown, no threshold can be \
             calibrated",
        ),
        (_, true) => Some("every answer is correct: no threshold can be calibrated"),
        (true, _) => Some("every answer is wrong: no threshold can be calibrated"),
        _ => None,
    }
}

/// The entropy-confidence section.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    pub bandwidth_rule: &'static str,
    pub correct_means: &'static str,
    pub correct: EntropyGroup,
    pub incorrect: EntropyGroup,
    /// Below it an answer counts as confident; `None` when none could be calibrated (`note`
    /// says why).
    pub threshold: Option<f64>,
    pub note: Option<&'static str>,
    pub below: Below,
    pub above: Above,
    pub written_to_head: bool,
}

/// The answers of one kind (correct or incorrect) and their entropies' KDE.
#[derive(Debug, Clone, Serialize)]
pub struct EntropyGroup {
    pub count: usize,
    pub mean_entropy: Option<f64>,
    pub bandwidth: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Below {
    pub tp: u64,
    pub fp: u64,
    pub tp_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Above {
    #[serde(rename = "fn")]
    pub fn_: u64,
    pub tn: u64,
    pub tn_rate: Option<f64>,
}

impl CalibrationReport {
    pub(super) fn new(cal: &Calibration, note: Option<&'static str>, written: bool) -> Self {
        let group = |xs: &[f64], mean_entropy, bandwidth| EntropyGroup {
            count: xs.len(),
            mean_entropy,
            bandwidth,
        };
        let c = cal.counts;
        let rate = |a: u64, b: u64| cal.threshold.and((b > 0).then(|| a as f64 / b as f64));
        CalibrationReport {
            bandwidth_rule: "scott",
            correct_means:
                "matches a ground-truth answer (questions without `answers` are left out)",
            correct: group(&cal.correct, cal.mean_correct, cal.bandwidth_correct),
            incorrect: group(&cal.incorrect, cal.mean_incorrect, cal.bandwidth_incorrect),
            threshold: cal.threshold,
            note,
            below: Below {
                tp: c.tp,
                fp: c.fp,
                tp_rate: rate(c.tp, c.tp + c.fp),
            },
            above: Above {
                fn_: c.fn_,
                tn: c.tn,
                tn_rate: rate(c.tn, c.tn + c.fn_),
            },
            written_to_head: written,
        }
    }
}

pub(super) fn entropy_plot(cal: &Calibration) -> Result<crate::vision::RgbImage> {
    const N: usize = 400;
    // The x range: the data ± 3 bandwidths, within [0, 1] (entropies are normalised).
    let all = cal.correct.iter().chain(&cal.incorrect);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
        (a.min(x), b.max(x))
    });
    let h = cal.bandwidth_correct.max(cal.bandwidth_incorrect);
    let (lo, hi) = if lo.is_finite() {
        ((lo - 3.0 * h).max(0.0), (hi + 3.0 * h).min(1.0))
    } else {
        (0.0, 1.0)
    };
    let (lo, hi) = if hi - lo < 1e-6 { (0.0, 1.0) } else { (lo, hi) };
    let curve = |xs: &[f64], h: f64| -> Vec<(f64, f64)> {
        (0..=N)
            .map(|i| {
                let x = lo + (hi - lo) * i as f64 / N as f64;
                (x, metrics::kde(xs, h, x))
            })
            .collect()
    };
    let groups = [
        ("correct", &cal.correct, cal.bandwidth_correct, PALETTE[2]),
        (
            "incorrect",
            &cal.incorrect,
            cal.bandwidth_incorrect,
            PALETTE[3],
        ),
    ];
    let series: Vec<Series> = groups
        .into_iter()
        .filter(|(_, xs, _, _)| !xs.is_empty())
        .map(|(name, xs, bw, color)| Series {
            name: format!("{name} ({})", xs.len()),
            color,
            points: curve(xs, bw),
            markers: false,
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1e-9, f64::max);
    let mut plot = LinePlot::new(
        "mean map entropy per answer (Gaussian KDE, Scott)",
        Axis::linear("normalised entropy").within(lo, hi),
        Axis::linear("density").within(0.0, ymax * 1.08),
    );
    plot.series = series;
    plot.markers = cal
        .threshold
        .map(|t| Marker {
            x: t,
            label: format!("threshold {t:.3}"),
            color: [200, 0, 0],
        })
        .into_iter()
        .collect();
    line_plot(&plot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_section_says_why_there_is_no_threshold() {
        let cal = metrics::calibrate(&[0.2, 0.3], &[true, true]);
        assert!(calibration_note(&cal, true)
            .unwrap()
            .contains("every answer is correct"));
        assert!(calibration_note(&cal, false)
            .unwrap()
            .contains("no question"));
        let r = CalibrationReport::new(&cal, calibration_note(&cal, true), false);
        assert_eq!(
            (r.threshold, r.below.tp_rate, r.above.tn_rate),
            (None, None, None)
        );
        let cal = metrics::calibrate(&[0.2, 0.8], &[true, false]);
        assert_eq!(calibration_note(&cal, true), None);
        let r = CalibrationReport::new(&cal, None, false);
        assert_eq!(r.threshold, Some(0.5));
        assert_eq!(
            (r.below.tp, r.below.fp, r.above.fn_, r.above.tn),
            (1, 0, 0, 1)
        );
        assert_eq!((r.below.tp_rate, r.above.tn_rate), (Some(1.0), Some(1.0)));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["above"]["fn"], 0);
    }
}
