//! Bootstrap confidence intervals, so an eval's figures come with how far they could move on
//! another draw of the same kind of questions: the questions are resampled with replacement (a
//! question, not a token or a patch, is the independent unit: an answer's tokens share one image
//! and one target), the statistic recomputed on each resample, and the 2.5th and 97.5th
//! percentiles reported (the percentile interval). Seeded, so a report is reproducible.

use serde::Serialize;

use crate::util::SplitMix64;

/// Resamples per interval: enough that the interval's ends move by well under 0.01 between
/// seeds for a few hundred questions.
pub const RESAMPLES: usize = 1000;
/// The resamples' seed (any fixed value: the report must not change from run to run).
pub const SEED: u64 = 0x5EED_B007;

/// A statistic with its 95 % percentile interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    /// `[2.5th, 97.5th]` percentiles of the statistic over the resamples.
    pub ci95: [f64; 2],
}

/// `stat` over all `n` units, and its interval over [`RESAMPLES`] resamples of them; `stat` gets
/// the units' indices (with repeats). `None` for no units.
pub fn estimate(
    n: usize,
    stat: impl Fn(&mut dyn Iterator<Item = usize>) -> f64,
) -> Option<Estimate> {
    if n == 0 {
        return None;
    }
    let value = stat(&mut (0..n));
    let mut rng = SplitMix64::new(SEED ^ n as u64);
    let mut draws: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let picks: Vec<usize> = (0..n)
                .map(|_| (rng.next_u64() % n as u64) as usize)
                .collect();
            stat(&mut picks.into_iter())
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((q * RESAMPLES as f64) as usize).min(RESAMPLES - 1)];
    Some(Estimate {
        value,
        ci95: [at(0.025), at(0.975)],
    })
}

/// A ratio of sums over units, `Σ num / Σ den` (a hit rate over tokens, questions weighted by
/// their tokens), with its interval; `None` without units or with nothing in the denominator.
pub fn ratio(units: &[(f64, f64)]) -> Option<Estimate> {
    if units.iter().map(|u| u.1).sum::<f64>() <= 0.0 {
        return None;
    }
    estimate(units.len(), |idx| {
        let (num, den) = idx.fold((0.0, 0.0), |(a, b), i| (a + units[i].0, b + units[i].1));
        if den > 0.0 {
            num / den
        } else {
            0.0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_units_have_no_spread() {
        let e = ratio(&[(1.0, 2.0); 50]).unwrap();
        assert_eq!(e.value, 0.5);
        assert_eq!(e.ci95, [0.5, 0.5]);
        assert!(ratio(&[]).is_none());
        assert!(ratio(&[(0.0, 0.0)]).is_none());
    }

    /// 400 fair coins: the interval is the normal approximation's, ±1.96·√(p(1−p)/n) ≈ ±0.049
    /// around the observed share, within the bootstrap's own sampling error.
    #[test]
    fn coin_interval_matches_the_normal_approximation() {
        let mut rng = SplitMix64::new(7);
        let units: Vec<(f64, f64)> = (0..400)
            .map(|_| ((rng.next_u64() & 1) as f64, 1.0))
            .collect();
        let e = ratio(&units).unwrap();
        let p = e.value;
        let half = 1.96 * (p * (1.0 - p) / 400.0).sqrt();
        assert!((e.ci95[0] - (p - half)).abs() < 0.012, "{e:?} vs ±{half}");
        assert!((e.ci95[1] - (p + half)).abs() < 0.012, "{e:?} vs ±{half}");
        assert!(e.ci95[0] <= p && p <= e.ci95[1]);
        // Seeded: the same units give the same interval.
        assert_eq!(ratio(&units), Some(e));
    }
}
