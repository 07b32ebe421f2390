//! Step 4, the pointing game, for questions with a target mask: per answer token and method,
//! whether the map's maximum lies on the target and the share of its mass there; and the model's
//! accuracy per question type and on multi-object scenes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use super::{bootstrap, metrics, SampleRun};
use crate::backend::Backend;
use crate::distill::Entry;
use crate::error::{Error, Result};
use crate::explain::{incremental_maps, Method, RowMode};
use crate::render::plot::{line_plot, Axis, LinePlot, Series, PALETTE};

/// The pointing game for one method: every answer token's mask mass, and per sample (in the
/// order of [`Pointing::types`]) its hits, mass and token count — the bootstrap's units.
#[derive(Default, Clone)]
pub(super) struct PointSums {
    hits: f64,
    masses: Vec<f64>,
    per_sample: Vec<SampleScore>,
}

#[derive(Default, Clone, Copy)]
struct SampleScore {
    hits: f64,
    mass: f64,
    tokens: f64,
}

pub(super) const POINT_METHODS: [&str; 5] = [
    "fastrm",
    "baseline",
    "baseline-incremental",
    "gradcam",
    "random",
];

/// Step 4, pointing game, for samples whose question has a target mask.
#[derive(Default)]
pub(super) struct Pointing {
    points: HashMap<&'static str, PointSums>,
    /// Each scored sample's question type.
    types: Vec<Option<String>>,
    with_target: usize,
    empty_targets: usize,
}

impl Pointing {
    pub(super) fn add<B: Backend>(
        &mut self,
        w: &mut SampleRun<'_, '_, B>,
        bar: &dyn Fn(&str),
    ) -> Result<()> {
        let Some(mask_rel) = &w.entry.target_mask else {
            return Ok(());
        };
        bar("pointing game");
        let s = w.sample;
        let setup = w.setup;
        let mp = Path::new(mask_rel);
        let mask_path = if mp.is_absolute() {
            mp.to_path_buf()
        } else {
            setup.qdir.join(mp)
        };
        let mask = crate::vision::load_image(&mask_path)
            .map_err(|e| Error::input(format!("sample {}: target mask: {e}", s.record.sample)))?;
        let on = metrics::mask_patches(
            &mask,
            w.image_size,
            setup.engine.preprocess(),
            setup.engine.config().vision.grid(),
        )
        .map_err(|e| {
            Error::input(format!(
                "sample {}: target mask {}: {e}",
                s.record.sample,
                mask_path.display()
            ))
        })?;
        if !on.iter().any(|&x| x) {
            self.empty_targets += 1;
            return Ok(());
        }
        self.with_target += 1;
        let (exact, incr) = if setup.manifest.method == "baseline-incremental" {
            let mode = RowMode::Streamed;
            (w.maps(Method::Baseline { mode })?, s.baseline.clone())
        } else {
            let incr = incremental_maps(&w.reference).map_err(|e| w.ctx(e))?;
            (s.baseline.clone(), incr)
        };
        let uniform = vec![vec![1.0f32; setup.manifest.n_patches]; s.ids.len()];
        let gc = w.gradcam_maps()?;
        let answer_tok = s.answer_tokens(&setup.engine.config().eos_token_ids);
        for (name, maps) in [
            ("fastrm", &s.fastrm),
            ("baseline", &exact),
            ("baseline-incremental", &incr),
            ("gradcam", &gc),
            ("random", &uniform),
        ] {
            let e = self.points.entry(name).or_default();
            let mut one = SampleScore::default();
            for &t in &answer_tok {
                let (hit, mass) = metrics::pointing(&maps[t], &on);
                e.hits += hit;
                e.masses.push(mass);
                one.hits += hit;
                one.mass += mass;
                one.tokens += 1.0;
            }
            e.per_sample.push(one);
        }
        self.types.push(w.entry.qtype.clone());
        Ok(())
    }

    /// Whether any answer token was scored (there is something to plot).
    pub(super) fn has_points(&self) -> bool {
        self.points.values().any(|e| !e.masses.is_empty())
    }

    /// The section; `None` when no question has a target mask.
    pub(super) fn report(&self) -> Option<PointingReport> {
        if self.with_target + self.empty_targets == 0 {
            return None;
        }
        let all = self.scores(|_| true);
        let mut types: Vec<&String> = self.types.iter().flatten().collect();
        types.sort();
        types.dedup();
        let by_type = types
            .into_iter()
            .map(|t| {
                (
                    t.clone(),
                    self.scores(|i| self.types[i].as_ref() == Some(t)),
                )
            })
            .collect();
        Some(PointingReport {
            samples: self.with_target,
            empty_targets: self.empty_targets,
            random: "expected value of a uniformly random map (the target's share of the patches)",
            methods: all,
            by_type,
        })
    }

    /// Every method's score over the samples `keep` picks (by their index among the scored).
    fn scores(&self, keep: impl Fn(usize) -> bool) -> BTreeMap<String, PointingScore> {
        POINT_METHODS
            .iter()
            .map(|&m| {
                let e = self.points.get(m).cloned().unwrap_or_default();
                let units: Vec<SampleScore> = e
                    .per_sample
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| keep(*i))
                    .map(|(_, u)| *u)
                    .collect();
                let hits: Vec<(f64, f64)> = units.iter().map(|u| (u.hits, u.tokens)).collect();
                let mass: Vec<(f64, f64)> = units.iter().map(|u| (u.mass, u.tokens)).collect();
                let (hit, mass) = (bootstrap::ratio(&hits), bootstrap::ratio(&mass));
                let score = PointingScore {
                    hit_rate: hit.map(|e| e.value),
                    hit_rate_ci95: hit.map(|e| e.ci95),
                    mask_mass: mass.map(|e| e.value),
                    mask_mass_ci95: mass.map(|e| e.ci95),
                    samples: units.len(),
                    tokens: units.iter().map(|u| u.tokens as usize).sum(),
                };
                (m.to_string(), score)
            })
            .collect()
    }
}

/// The pointing-game section.
#[derive(Debug, Clone, Serialize)]
pub struct PointingReport {
    /// Samples whose target covers at least one patch.
    pub samples: usize,
    pub empty_targets: usize,
    pub random: &'static str,
    pub methods: BTreeMap<String, PointingScore>,
    /// The same per question type (the data set's `qtype`; samples without one only count above).
    pub by_type: BTreeMap<String, BTreeMap<String, PointingScore>>,
}

/// One method over the answer tokens of the samples with a target; the intervals are 95 %
/// bootstrap intervals over the samples.
#[derive(Debug, Clone, Serialize)]
pub struct PointingScore {
    /// Share of tokens whose map peaks on the target.
    pub hit_rate: Option<f64>,
    pub hit_rate_ci95: Option<[f64; 2]>,
    /// Mean share of the map's mass on the target.
    pub mask_mass: Option<f64>,
    pub mask_mass_ci95: Option<[f64; 2]>,
    pub samples: usize,
    pub tokens: usize,
}

/// Share of answer tokens whose map puts at least x of its mass on the target, per method (the
/// hit rate and mean mass in the legend).
pub(super) fn pointing_plot(pointing: &Pointing) -> Result<crate::vision::RgbImage> {
    let points = &pointing.points;
    let xs: Vec<f64> = (0..=100).map(|i| i as f64 / 100.0).collect();
    let mut plot = LinePlot::new(
        "pointing game: map mass on the target object",
        Axis::linear("share of the map's mass on the target, at least").within(0.0, 1.0),
        Axis::linear("share of answer tokens").within(0.0, 1.0),
    );
    plot.series = POINT_METHODS
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let e = points.get(m).filter(|e| !e.masses.is_empty())?;
            let n = e.masses.len() as f64;
            let mean = e.masses.iter().sum::<f64>() / n;
            Some(Series {
                name: format!("{m} (hit {:.3}, mass {mean:.3})", e.hits / n),
                color: PALETTE[i % PALETTE.len()],
                points: xs
                    .iter()
                    .copied()
                    .zip(metrics::at_least(&e.masses, &xs))
                    .collect(),
                markers: false,
            })
        })
        .collect();
    line_plot(&plot)
}

/// Model accuracy over the samples with ground truth: overall, per question type, on
/// multi-object scenes (`(correct, samples)` each).
#[derive(Default)]
pub(super) struct Accuracy {
    all: (usize, usize),
    by_type: std::collections::BTreeMap<String, (usize, usize)>,
    multi: (usize, usize),
}

impl Accuracy {
    pub(super) fn add(&mut self, entry: &Entry, ok: bool, has_answers: bool) {
        if !has_answers {
            return;
        }
        let bump = |t: &mut (usize, usize)| {
            t.0 += ok as usize;
            t.1 += 1;
        };
        bump(&mut self.all);
        if let Some(t) = &entry.qtype {
            bump(self.by_type.entry(t.clone()).or_default());
        }
        if entry.n_objects.is_some_and(|n| n > 1) {
            bump(&mut self.multi);
        }
    }

    /// Whether any answer could be checked.
    pub(super) fn has_ground_truth(&self) -> bool {
        self.all.1 > 0
    }

    /// The section; `None` when no question has ground truth.
    pub(super) fn report(&self) -> Option<AccuracyReport> {
        let row = |(correct, samples): (usize, usize)| AccuracyRow {
            accuracy: (samples > 0).then(|| correct as f64 / samples as f64),
            correct,
            samples,
        };
        (self.all.1 > 0).then(|| AccuracyReport {
            overall: row(self.all),
            by_type: self
                .by_type
                .iter()
                .map(|(k, &v)| (k.clone(), row(v)))
                .collect(),
            multi_object: row(self.multi),
        })
    }
}

/// The model's accuracy section.
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyReport {
    pub overall: AccuracyRow,
    pub by_type: BTreeMap<String, AccuracyRow>,
    pub multi_object: AccuracyRow,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccuracyRow {
    pub accuracy: Option<f64>,
    pub correct: usize,
    pub samples: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::dataset;

    #[test]
    fn accuracy_section_counts_only_answers_with_ground_truth() {
        let entry = |qtype: &str, n: u64| Entry {
            id: 0,
            image: dataset::ImageRef::Path(String::new()),
            question: String::new(),
            answers: None,
            qtype: Some(qtype.into()),
            n_objects: Some(n),
            target_mask: None,
        };
        let mut a = Accuracy::default();
        assert!(a.report().is_none());
        a.add(&entry("colour", 1), true, true);
        a.add(&entry("colour", 3), false, true);
        a.add(&entry("shape", 2), true, true);
        a.add(&entry("shape", 2), false, false);
        let r = a.report().unwrap();
        assert_eq!(r.overall.samples, 3);
        assert_eq!(r.by_type["colour"].correct, 1);
        assert_eq!(r.multi_object.samples, 2);
    }
}
