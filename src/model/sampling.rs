//! Choosing each next token from its logits: greedy (the default: the device's argmax, the same
//! bits as always), or drawn with temperature, top-k, top-p and repetition/presence/frequency
//! penalties from the request's own seeded stream; with log-probabilities on request.
//!
//! A sampler belongs to one sequence and draws exactly one number per sampled token, so the same
//! seed makes the same choices whatever else the engine runs.

use std::collections::HashMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::util::SplitMix64;

/// How a request chooses its tokens. The default is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0: greedy. Otherwise the logits are divided by it before the softmax.
    pub temperature: f32,
    /// Nucleus sampling: only the most likely tokens whose probabilities add up to `top_p` (after
    /// the temperature) stay candidates. 1: all.
    pub top_p: f32,
    /// Only the `top_k` most likely tokens stay candidates. `None`: all.
    pub top_k: Option<usize>,
    /// Tokens already in the answer get their logit divided by it (when positive) or multiplied
    /// by it (when negative), as transformers' `repetition_penalty`. 1: off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already in the answer (OpenAI's). 0: off.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it is already in the answer. 0: off.
    pub frequency_penalty: f32,
    /// The request's random stream.
    pub seed: u64,
    /// Report per token the log-probability of the chosen token and of this many most likely
    /// ones (at most [`Sampling::MAX_LOGPROBS`]); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Ids that end the answer as an end-of-sequence id does (and, like it, are part of it).
    pub stop_ids: Vec<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logprobs: None,
            stop_ids: Vec::new(),
        }
    }
}

impl Sampling {
    /// The most `logprobs` alternatives a token reports (OpenAI's limit).
    pub const MAX_LOGPROBS: usize = 20;
    /// The most stop ids a request may give.
    pub const MAX_STOP_IDS: usize = 64;

    /// Errors name the option as the CLI spells it.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(Error::input(format!(
                "temperature must be a finite number ≥ 0 (0: greedy), not {t}"
            )));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::input(format!("top-p must be in (0, 1], not {p}")));
        }
        if self.top_k == Some(0) {
            return Err(Error::input("top-k must be at least 1"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(Error::input(format!(
                "repetition-penalty must be a finite number > 0 (1: off), not {r}"
            )));
        }
        for (name, v) in [
            ("presence-penalty", self.presence_penalty),
            ("frequency-penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || v.abs() > 2.0 {
                return Err(Error::input(format!(
                    "{name} must be between -2 and 2, not {v}"
                )));
            }
        }
        if self.logprobs.is_some_and(|n| n > Self::MAX_LOGPROBS) {
            return Err(Error::input(format!(
                "logprobs must be at most {}",
                Self::MAX_LOGPROBS
            )));
        }
        if self.stop_ids.len() > Self::MAX_STOP_IDS {
            return Err(Error::input(format!(
                "at most {} stop ids",
                Self::MAX_STOP_IDS
            )));
        }
        Ok(())
    }

    /// Greedy with no penalty and no log-probabilities: the device's argmax decides, and the
    /// logits never leave it.
    pub fn on_device(&self) -> bool {
        self.temperature == 0.0 && self.penalties_off() && self.logprobs.is_none()
    }

    fn penalties_off(&self) -> bool {
        self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
    }
}

/// A chosen token and, on request, its log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    pub id: u32,
    /// `log p(id)` under the model's own distribution (the raw logits' softmax: before the
    /// temperature, the penalties and the truncation), with [`Sampling::logprobs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f32>,
    /// The most likely tokens and their log-probabilities, most likely first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<(u32, f32)>,
}

/// One sequence's choices.
pub struct Sampler {
    opts: Sampling,
    rng: SplitMix64,
    /// How often each id is already in the answer (for the penalties).
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(opts: &Sampling) -> Self {
        Sampler {
            opts: opts.clone(),
            rng: SplitMix64::new(opts.seed),
            counts: HashMap::new(),
        }
    }

    pub fn options(&self) -> &Sampling {
        &self.opts
    }

    /// Records a token chosen elsewhere (the device's argmax) for the penalties.
    pub fn note(&mut self, id: u32) {
        *self.counts.entry(id).or_default() += 1;
    }

    /// Chooses from a row of logits.
    pub fn choose(&mut self, logits: &[f32]) -> Choice {
        let mut z: Vec<f32> = logits.to_vec();
        self.penalise(&mut z);
        let id = if self.opts.temperature == 0.0 {
            argmax(&z)
        } else {
            self.draw(&z)
        };
        let (logprob, top_logprobs) = match self.opts.logprobs {
            Some(n) => {
                let lp = log_softmax(logits);
                (Some(lp[id as usize] as f32), top_n(&lp, n))
            }
            None => (None, Vec::new()),
        };
        self.note(id);
        Choice {
            id,
            logprob,
            top_logprobs,
        }
    }

    fn penalise(&self, z: &mut [f32]) {
        let o = &self.opts;
        for (&id, &count) in &self.counts {
            let Some(v) = z.get_mut(id as usize) else {
                continue;
            };
            if o.repetition_penalty != 1.0 {
                *v = if *v > 0.0 {
                    *v / o.repetition_penalty
                } else {
                    *v * o.repetition_penalty
                };
            }
            *v -= o.presence_penalty + o.frequency_penalty * count as f32;
        }
    }

    /// One draw from the tempered, truncated distribution.
    fn draw(&mut self, z: &[f32]) -> u32 {
        let o = &self.opts;
        // Candidates, most likely first (ties: the lower id first, as the argmax).
        let mut order: Vec<u32> = (0..z.len() as u32)
            .filter(|&i| !z[i as usize].is_nan())
            .collect();
        let by_logit = |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b));
        if let Some(k) = o.top_k.filter(|&k| k < order.len()) {
            order.select_nth_unstable_by(k, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let Some(&first) = order.first() else {
            return argmax(z);
        };
        let t = o.temperature as f64;
        let top = z[first as usize] as f64;
        // An infinite logit (a tiny repetition penalty can make one) is certain: the first of
        // them; all -inf leaves nothing to weigh either.
        if !top.is_finite() {
            return first;
        }
        let mut p: Vec<f64> = order
            .iter()
            .map(|&i| ((z[i as usize] as f64 - top) / t).exp())
            .collect();
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= total);
        if o.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= o.top_p as f64
                })
                .map_or(p.len(), |i| i + 1);
            p.truncate(keep);
        }
        let total: f64 = p.iter().sum();
        let u = self.uniform() * total;
        let mut acc = 0.0;
        for (i, &x) in p.iter().enumerate() {
            acc += x;
            if u < acc {
                return order[i];
            }
        }
        order[p.len() - 1]
    }

    /// Uniform in [0, 1), 53 bits.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The first maximum; NaN never wins (the backends' `argmax_rows` rule).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(row)` in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .filter(|v| !v.is_nan())
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .filter(|x| !x.is_nan())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// The `n` largest, largest first (ties: lower id first).
fn top_n(lp: &[f64], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..lp.len() as u32)
        .filter(|&i| !lp[i as usize].is_nan())
        .collect();
    let by = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n, by);
        idx.truncate(n);
    }
    idx.sort_unstable_by(by);
    idx.into_iter()
        .map(|i| (i, lp[i as usize] as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32) -> Sampling {
        Sampling {
            temperature,
            ..Default::default()
        }
    }

    /// Pearson's chi-square statistic of `counts` against the probabilities `p`.
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    fn counts(opts: &Sampling, logits: &[f32], draws: usize) -> Vec<u64> {
        let mut c = vec![0u64; logits.len()];
        let mut s = Sampler::new(opts);
        for _ in 0..draws {
            // The penalties are off: counts do not change the distribution between draws.
            c[s.choose(logits).id as usize] += 1;
        }
        c
    }

    fn softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    const LOGITS: [f32; 5] = [2.0, 1.0, 0.5, 0.0, -1.0];
    /// The chi-square critical value at p = 0.001 for 1 … 4 degrees of freedom.
    const CRITICAL: [f64; 4] = [10.83, 13.82, 16.27, 18.47];

    #[test]
    fn temperature_samples_the_tempered_softmax() {
        for t in [0.5f32, 1.0, 2.0] {
            let p = softmax(&LOGITS.map(|z| z as f64 / t as f64));
            let c = counts(&sampling(t), &LOGITS, 40_000);
            let x2 = chi_square(&c, &p);
            assert!(
                x2 < CRITICAL[3],
                "T = {t}: chi-square {x2:.1}, counts {c:?}, p {p:?}"
            );
        }
        // The test can fail: a sampler that ignored the temperature would be far off at T = 2.
        let flat = softmax(&LOGITS.map(|z| z as f64));
        let c = counts(&sampling(2.0), &LOGITS, 40_000);
        assert!(chi_square(&c, &flat) > 100.0);
    }

    #[test]
    fn top_k_and_top_p_sample_the_truncated_distribution() {
        // top_k = 3: the three largest, renormalised.
        let opts = Sampling {
            temperature: 1.0,
            top_k: Some(3),
            ..Default::default()
        };
        let c = counts(&opts, &LOGITS, 40_000);
        assert_eq!(&c[3..], &[0, 0]);
        let p = softmax(&[2.0, 1.0, 0.5]);
        let x2 = chi_square(&c[..3], &p);
        assert!(x2 < CRITICAL[1], "top-k: chi-square {x2:.1}, counts {c:?}");
        // top_p = 0.8 over softmax(LOGITS) = [.55, .20, .12, .07, .03]: the first three reach it.
        let full = softmax(&LOGITS.map(|z| z as f64));
        let opts = Sampling {
            temperature: 1.0,
            top_p: 0.8,
            ..Default::default()
        };
        let c = counts(&opts, &LOGITS, 40_000);
        assert_eq!(&c[3..], &[0, 0], "{full:?}");
        let kept: f64 = full[..3].iter().sum();
        let p: Vec<f64> = full[..3].iter().map(|x| x / kept).collect();
        let x2 = chi_square(&c[..3], &p);
        assert!(x2 < CRITICAL[1], "top-p: chi-square {x2:.1}, counts {c:?}");
    }

    #[test]
    fn greedy_is_the_argmax_and_a_seed_repeats_its_draws() {
        let mut g = Sampler::new(&sampling(0.0));
        assert_eq!(g.choose(&[0.0, 3.0, 3.0, f32::NAN]).id, 1);
        let draws = |seed| {
            let mut s = Sampler::new(&Sampling {
                seed,
                ..sampling(1.0)
            });
            (0..64).map(|_| s.choose(&LOGITS).id).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn infinite_logits_do_not_break_the_draw() {
        let mut s = Sampler::new(&sampling(1.0));
        assert_eq!(s.choose(&[0.0, f32::INFINITY, 1.0]).id, 1);
        assert_eq!(s.choose(&[f32::NEG_INFINITY; 3]).id, 0);
        // A tiny repetition penalty turns a repeated positive logit into +inf: it is chosen.
        let mut s = Sampler::new(&Sampling {
            repetition_penalty: 1e-39,
            ..sampling(1.0)
        });
        s.note(2);
        assert_eq!(s.choose(&[5.0, 4.0, 1.0]).id, 2);
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [1.0f32, 0.9, -0.5];
        let mut s = Sampler::new(&Sampling {
            presence_penalty: 0.5,
            ..sampling(0.0)
        });
        assert_eq!(s.choose(&logits).id, 0);
        assert_eq!(s.choose(&logits).id, 1, "0 is penalised once: 0.5 < 0.9");
        let mut s = Sampler::new(&Sampling {
            repetition_penalty: 2.0,
            ..sampling(0.0)
        });
        s.note(0);
        s.note(2);
        let mut z = logits.to_vec();
        s.penalise(&mut z);
        assert_eq!(z, vec![0.5, 0.9, -1.0]);
        let mut s = Sampler::new(&Sampling {
            frequency_penalty: 0.25,
            ..sampling(0.0)
        });
        s.note(1);
        s.note(1);
        let mut z = logits.to_vec();
        s.penalise(&mut z);
        assert!((z[1] - 0.4).abs() < 1e-6, "{}", z[1]);
    }

    #[test]
    fn logprobs_are_the_raw_distributions() {
        let mut s = Sampler::new(&Sampling {
            logprobs: Some(2),
            ..sampling(0.0)
        });
        let c = s.choose(&LOGITS);
        let lp = softmax(&LOGITS.map(|z| z as f64))
            .iter()
            .map(|p| p.ln() as f32)
            .collect::<Vec<_>>();
        assert_eq!(c.id, 0);
        assert!((c.logprob.unwrap() - lp[0]).abs() < 1e-6);
        assert_eq!(c.top_logprobs.len(), 2);
        assert_eq!((c.top_logprobs[0].0, c.top_logprobs[1].0), (0, 1));
        assert!((c.top_logprobs[1].1 - lp[1]).abs() < 1e-6);
    }

    #[test]
    fn bad_options_are_named() {
        let with = |set: fn(&mut Sampling)| {
            let mut s = Sampling::default();
            set(&mut s);
            s
        };
        for (opts, needle) in [
            (sampling(-1.0), "temperature"),
            (sampling(f32::NAN), "temperature"),
            (with(|s| s.top_p = 0.0), "top-p"),
            (with(|s| s.top_p = 1.5), "top-p"),
            (with(|s| s.top_k = Some(0)), "top-k"),
            (with(|s| s.repetition_penalty = 0.0), "repetition-penalty"),
            (with(|s| s.presence_penalty = 3.0), "presence-penalty"),
            (
                with(|s| s.frequency_penalty = f32::INFINITY),
                "frequency-penalty",
            ),
            (with(|s| s.logprobs = Some(21)), "logprobs"),
        ] {
            let e = opts.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert!(Sampling::default().validate().is_ok());
        assert!(Sampling::default().on_device());
    }
}
