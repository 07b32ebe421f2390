//! Step 2, perturbation: the image patches removed in relevance order, hidden from attention,
//! and whether the answer survives, per method, direction and step.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{metrics, SampleRun, RANDOM_SEEDS};
use crate::backend::Backend;
use crate::error::Result;
use crate::render::plot::{line_plot, Axis, LinePlot, Series, PALETTE};

pub(super) const PERTURB_METHODS: [&str; 4] = ["fastrm", "baseline", "gradcam", "random"];

/// Step 2, perturbation: per method, direction and step, the sum over samples of whether the answer
/// survived (random orders: summed over seeds too).
pub(super) struct Perturbation {
    curves: HashMap<&'static str, [Vec<f64>; 2]>,
}

impl Perturbation {
    pub(super) fn new(schedule: &[(f64, usize)]) -> Self {
        let n = schedule.len();
        Perturbation {
            curves: PERTURB_METHODS
                .iter()
                .map(|&m| (m, [vec![0.0; n], vec![0.0; n]]))
                .collect(),
        }
    }

    pub(super) fn add<B: Backend>(
        &mut self,
        w: &mut SampleRun<'_, '_, B>,
        p: usize,
        bar: &dyn Fn(&str),
    ) -> Result<()> {
        let s = w.sample;
        let answer_tok = s.answer_tokens(&w.setup.engine.config().eos_token_ids);
        let sel = |maps: &[Vec<f32>]| -> Vec<f64> {
            let picked: Vec<&[f32]> = answer_tok.iter().map(|&i| maps[i].as_slice()).collect();
            metrics::combine_maps(&picked)
        };
        bar("gradcam maps");
        let gc = w.gradcam_maps()?;
        let mut orders: Vec<(&'static str, Vec<usize>, Vec<usize>)> = vec![];
        for (name, rel) in [
            ("fastrm", sel(&s.fastrm)),
            ("baseline", sel(&s.baseline)),
            ("gradcam", sel(&gc)),
        ] {
            orders.push((
                name,
                metrics::removal_order(&rel, true),
                metrics::removal_order(&rel, false),
            ));
        }
        for seed in 0..RANDOM_SEEDS {
            // Negative removal with a random order is the reversed positive order: random either
            // way, and a different draw than the positive one.
            let o = metrics::random_order(p, seed.wrapping_mul(0x9E37) ^ s.record.sample as u64);
            let rev: Vec<usize> = o.iter().rev().copied().collect();
            orders.push(("random", o, rev));
        }
        // Results by removed set: 0% and 100% are shared by every order, and orders agree on many
        // prefixes.
        let mut cache: HashMap<Vec<usize>, bool> = HashMap::new();
        let n_orders = orders.len();
        let schedule = w.setup.schedule.clone();
        for (oi, (name, pos, neg)) in orders.iter().enumerate() {
            bar(&format!("perturbation {}/{n_orders} ({name})", oi + 1));
            for (dir, order) in [pos, neg].into_iter().enumerate() {
                for (si, &(_, n_removed)) in schedule.iter().enumerate() {
                    let mut removed: Vec<usize> = order[..n_removed].to_vec();
                    removed.sort_unstable();
                    let ok = match cache.get(&removed) {
                        Some(&ok) => ok,
                        None => {
                            let ok = w.correct_without(&removed)?;
                            cache.insert(removed, ok);
                            ok
                        }
                    };
                    self.curves.get_mut(name).expect("a known method")[dir][si] +=
                        if ok { 1.0 } else { 0.0 };
                }
            }
        }
        Ok(())
    }

    /// The section: accuracy per step and its AUC, per method and direction.
    pub(super) fn report(
        &self,
        n_samples: usize,
        schedule: &[(f64, usize)],
        gradcam_layer: usize,
    ) -> PerturbationReport {
        let fractions: Vec<f64> = schedule.iter().map(|&(f, _)| f).collect();
        let n = n_samples as f64;
        let methods = PERTURB_METHODS
            .iter()
            .map(|&m| {
                let div = if m == "random" {
                    n * RANDOM_SEEDS as f64
                } else {
                    n
                };
                let curve = |sums: &[f64]| {
                    let accuracy: Vec<f64> = sums.iter().map(|v| v / div).collect();
                    Curve {
                        auc: metrics::trapezoid_auc(&fractions, &accuracy),
                        accuracy,
                    }
                };
                let [pos, neg] = &self.curves[m];
                let curves = PerturbationCurves {
                    positive: curve(pos),
                    negative: curve(neg),
                };
                (m.to_string(), curves)
            })
            .collect();
        PerturbationReport {
            removed_patches: schedule.iter().map(|&(_, k)| k).collect(),
            fractions,
            random_seeds: RANDOM_SEEDS,
            gradcam_layer,
            correct_means: "matches a ground-truth answer, or equals the unperturbed answer where \
                            the question has none",
            methods,
        }
    }
}

/// The perturbation section.
#[derive(Debug, Clone, Serialize)]
pub struct PerturbationReport {
    /// The share of the image's patches removed at each step.
    pub fractions: Vec<f64>,
    pub removed_patches: Vec<usize>,
    pub random_seeds: u64,
    pub gradcam_layer: usize,
    pub correct_means: &'static str,
    /// Per method: fastrm, baseline, gradcam, random.
    pub methods: BTreeMap<String, PerturbationCurves>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PerturbationCurves {
    /// Most relevant patches removed first (lower is better).
    pub positive: Curve,
    /// Least relevant first (higher is better).
    pub negative: Curve,
}

/// Accuracy at each step and the trapezoid area under it.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub accuracy: Vec<f64>,
    pub auc: f64,
}

/// One direction's curves (0: positive, 1: negative), a series per method in
/// [`PERTURB_METHODS`]' order.
pub(super) fn perturbation_plot(
    report: &PerturbationReport,
    dir: usize,
) -> Result<crate::vision::RgbImage> {
    let mut plot = LinePlot::new(
        if dir == 0 {
            "positive perturbation (most relevant removed first)"
        } else {
            "negative perturbation (least relevant removed first)"
        },
        Axis::linear("fraction of image patches removed").within(0.0, 1.0),
        Axis::linear("accuracy").within(0.0, 1.0),
    );
    plot.series = PERTURB_METHODS
        .iter()
        .enumerate()
        .filter_map(|(i, &name)| {
            let c = report.methods.get(name)?;
            let curve = if dir == 0 { &c.positive } else { &c.negative };
            Some(Series {
                name: format!("{name} (AUC {:.3})", curve.auc),
                color: PALETTE[i % PALETTE.len()],
                points: report
                    .fractions
                    .iter()
                    .copied()
                    .zip(curve.accuracy.iter().copied())
                    .collect(),
                markers: false,
            })
        })
        .collect();
    line_plot(&plot)
}
