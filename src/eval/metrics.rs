//! The numbers `fastrm eval` reports, as plain functions on host data (no model, no backend), so
//! each can be checked against a hand computation (tests/eval.rs).

use crate::error::{Error, Result};
use crate::vision::{self, PreprocessConfig, RgbImage};

/// The classification thresholds of the head-vs-baseline table: 0.1, 0.2, … 0.9.
pub const THRESHOLDS: [f32; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// Removal steps of the perturbation curves: 0, 5, 10 … 100% of the patches.
pub const PERTURBATION_STEPS: usize = 20;

/// Counts of a binary decision against binary truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub tp: u64,
    pub fp: u64,
    pub tn: u64,
    pub fn_: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl Counts {
    pub fn add(&mut self, predicted: bool, truth: bool) {
        match (predicted, truth) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, false) => self.tn += 1,
            (false, true) => self.fn_ += 1,
        }
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Counts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.tn += other.tn;
        self.fn_ += other.fn_;
    }

    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.tn + self.fn_
    }

    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.total())
    }

    /// `tp / (tp + fp)`; 0 when nothing is predicted positive (scikit-learn's `zero_division=0`).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// `tp / (tp + fn)`; 0 when nothing is truly positive.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Harmonic mean of precision and recall, `2tp / (2tp + fp + fn)`; 0 when both are 0.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
}

/// Adds one map's patches to `counts`: predicted `p_j ≥ threshold`, truth `label_j ≥ 0.5`.
pub fn classify_into(counts: &mut Counts, probs: &[f32], labels: &[f32], threshold: f32) {
    for (&p, &y) in probs.iter().zip(labels) {
        counts.add(p >= threshold, y >= 0.5);
    }
}

/// Area under a curve by the trapezoid rule over `xs` (ascending).
pub fn trapezoid_auc(xs: &[f64], ys: &[f64]) -> f64 {
    xs.windows(2)
        .zip(ys.windows(2))
        .map(|(x, y)| (x[1] - x[0]) * (y[0] + y[1]) / 2.0)
        .sum()
}

/// The removal fractions `k / steps` and how many of `n_patches` each removes (rounded half up).
pub fn removal_schedule(n_patches: usize, steps: usize) -> Vec<(f64, usize)> {
    (0..=steps)
        .map(|k| {
            let f = k as f64 / steps as f64;
            (f, ((f * n_patches as f64) + 0.5).floor() as usize)
        })
        .collect()
}

/// A map clamped at 0 and divided by its sum; an all-zero (or non-finite) map becomes uniform.
pub fn normalise(map: &[f32]) -> Vec<f64> {
    let total: f64 = map.iter().map(|&v| v.max(0.0) as f64).sum();
    if total <= 0.0 || !total.is_finite() {
        return vec![1.0 / map.len().max(1) as f64; map.len()];
    }
    map.iter().map(|&v| v.max(0.0) as f64 / total).collect()
}

/// One patch ordering for a multi-token answer: the mean of the answer tokens' normalised maps
/// ([`normalise`]), so every token weighs the same whatever its map's scale.
pub fn combine_maps(maps: &[&[f32]]) -> Vec<f64> {
    let p = maps.first().map_or(0, |m| m.len());
    let mut out = vec![0.0; p];
    for m in maps {
        for (o, v) in out.iter_mut().zip(normalise(m)) {
            *o += v;
        }
    }
    let n = maps.len().max(1) as f64;
    out.iter_mut().for_each(|o| *o /= n);
    out
}

/// Patch indices in removal order: most relevant first (`positive`) or least relevant first;
/// ties keep index order in both directions.
pub fn removal_order(relevance: &[f64], positive: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..relevance.len()).collect();
    idx.sort_by(|&a, &b| {
        let o = relevance[a]
            .partial_cmp(&relevance[b])
            .unwrap_or(std::cmp::Ordering::Equal);
        let o = if positive { o.reverse() } else { o };
        o.then(a.cmp(&b))
    });
    idx
}

/// A random removal order (Fisher–Yates on SplitMix64).
pub fn random_order(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = crate::util::SplitMix64::new(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// VQA-style answer normalisation for comparisons: lower case, surrounding whitespace and trailing
/// `.`/`,`/`!`/`?` dropped, inner whitespace collapsed.
pub fn normalise_answer(s: &str) -> String {
    let s = s.trim().to_lowercase();
    let s = s.trim_end_matches(['.', ',', '!', '?']);
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `answer` counts as correct: it matches one of the ground-truth `answers` when there are
/// any, otherwise the `reference` (the unperturbed answer), after [`normalise_answer`].
pub fn answer_correct(answer: &str, answers: Option<&[String]>, reference: &str) -> bool {
    let a = normalise_answer(answer);
    match answers {
        Some(gt) if !gt.is_empty() => gt.iter().any(|g| normalise_answer(g) == a),
        _ => a == normalise_answer(reference),
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Scott's rule bandwidth for a 1-D Gaussian KDE, `σ · n^(−1/5)` with the sample standard
/// deviation (ddof 1) — scipy's `gaussian_kde` default. Degenerate samples (one value, or all
/// equal) get 0.01, a small width on the [0, 1] entropy scale, so the density stays drawable.
pub fn scott_bandwidth(xs: &[f64]) -> f64 {
    let n = xs.len();
    if n < 2 {
        return 0.01;
    }
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
    let h = var.sqrt() * (n as f64).powf(-0.2);
    if h > 0.0 && h.is_finite() {
        h
    } else {
        0.01
    }
}

/// Gaussian KDE of `xs` with bandwidth `h`, evaluated at `x`.
pub fn kde(xs: &[f64], h: f64, x: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let norm = 1.0 / ((2.0 * std::f64::consts::PI).sqrt() * h * xs.len() as f64);
    xs.iter()
        .map(|&xi| (-0.5 * ((x - xi) / h).powi(2)).exp())
        .sum::<f64>()
        * norm
}

/// The paper's entropy confidence calibration on answers' mean map entropies.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub correct: Vec<f64>,
    pub incorrect: Vec<f64>,
    pub mean_correct: Option<f64>,
    pub mean_incorrect: Option<f64>,
    pub bandwidth_correct: f64,
    pub bandwidth_incorrect: f64,
    /// Mean of the two distributions' means (each KDE's mean is its sample mean: the Gaussian
    /// kernel is symmetric); `None` when one side is empty.
    pub threshold: Option<f64>,
    /// Below the threshold the answer is predicted correct: TP (it is), FP (it is not); at or
    /// above, predicted incorrect: FN (it was correct), TN (it was not).
    pub counts: Counts,
}

pub fn calibrate(entropies: &[f64], correct: &[bool]) -> Calibration {
    let pick = |want: bool| -> Vec<f64> {
        entropies
            .iter()
            .zip(correct)
            .filter(|(_, &c)| c == want)
            .map(|(&h, _)| h)
            .collect()
    };
    let (c, i) = (pick(true), pick(false));
    let mc = (!c.is_empty()).then(|| mean(&c));
    let mi = (!i.is_empty()).then(|| mean(&i));
    let threshold = match (mc, mi) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        _ => None,
    };
    let counts = threshold.map_or_else(Counts::default, |t| {
        confidence_counts(entropies, correct, t)
    });
    Calibration {
        bandwidth_correct: scott_bandwidth(&c),
        bandwidth_incorrect: scott_bandwidth(&i),
        correct: c,
        incorrect: i,
        mean_correct: mc,
        mean_incorrect: mi,
        threshold,
        counts,
    }
}

/// TP/FP/TN/FN of "entropy below `threshold` ⇒ correct" (see [`Calibration::counts`]).
pub fn confidence_counts(entropies: &[f64], correct: &[bool], threshold: f64) -> Counts {
    let mut c = Counts::default();
    for (&h, &ok) in entropies.iter().zip(correct) {
        c.add(h < threshold, ok);
    }
    c
}

/// The pointing game on one map: `(hit, mass)`. `hit` is 1 when the map's maximum patch lies on
/// the target, 0 when not; when several patches share the maximum it is the fraction of them on
/// the target (the expected hit of a random tie-break), so a map with no preference at all (all
/// equal, or nothing positive) scores the target's share of the patches. `mass` is the fraction of
/// the map's mass (clamped ≥ 0) on target patches, the target's share for an all-zero map.
pub fn pointing(map: &[f32], on: &[bool]) -> (f64, f64) {
    let p = normalise(map);
    let max = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let tied: Vec<usize> = (0..p.len()).filter(|&j| p[j] == max).collect();
    let hit = tied.iter().filter(|&&j| on[j]).count() as f64 / tied.len().max(1) as f64;
    let mass = p.iter().zip(on).filter(|(_, &o)| o).map(|(v, _)| v).sum();
    (hit, mass)
}

/// For each `x`, the fraction of `masses` that are at least `x` (1 for every `x` ≤ the smallest; 0
/// where there are no masses): how often a method puts at least that share of its map on the target.
pub fn at_least(masses: &[f64], xs: &[f64]) -> Vec<f64> {
    let n = masses.len().max(1) as f64;
    xs.iter()
        .map(|&x| masses.iter().filter(|&&m| m >= x).count() as f64 / n)
        .collect()
}

/// A target mask (8-bit greyscale PNG, or any image: a pixel is on when any channel is nonzero) as
/// on/off patches of a `grid × grid` patch grid: the binarised mask goes through the image's own
/// resize and centre crop ([`vision::resize_and_crop`]); a resized pixel is on at ≥ 128, and a
/// patch is on when at least half of its pixels are. `image_size` is the original image's
/// `(width, height)`, which the mask must match.
pub fn mask_patches(
    mask: &RgbImage,
    image_size: (usize, usize),
    cfg: &PreprocessConfig,
    grid: usize,
) -> Result<Vec<bool>> {
    if (mask.width, mask.height) != image_size {
        return Err(Error::input(format!(
            "the target mask is {}x{} but its image is {}x{}",
            mask.width, mask.height, image_size.0, image_size.1
        )));
    }
    let bin: Vec<u8> = mask
        .data
        .chunks_exact(3)
        .flat_map(|px| {
            let v = if px.iter().any(|&c| c != 0) { 255 } else { 0 };
            [v, v, v]
        })
        .collect();
    let bin = RgbImage::new(mask.width, mask.height, bin)?;
    let view = vision::resize_and_crop(&bin, cfg)?;
    if grid == 0 || view.width < grid || view.height < grid {
        return Err(Error::input(format!(
            "a {}x{} model view cannot hold a {grid}x{grid} patch grid",
            view.width, view.height
        )));
    }
    let (pw, ph) = (view.width / grid, view.height / grid);
    let mut out = Vec::with_capacity(grid * grid);
    for gy in 0..grid {
        for gx in 0..grid {
            let mut n_on = 0;
            for y in gy * ph..(gy + 1) * ph {
                for x in gx * pw..(gx + 1) * pw {
                    if view.data[(y * view.width + x) * 3] >= 128 {
                        n_on += 1;
                    }
                }
            }
            out.push(2 * n_on >= pw * ph);
        }
    }
    Ok(out)
}
