//! The profile's results: per-run records, FastRM-vs-baseline ratios, and their three forms — a
//! text table, a JSON document (`fastrm-profile-2`) and two PNG plots (latency and peak memory
//! against output length, one line per method: the paper's figure 14).
//!
//! Definitions (also written into the JSON):
//! - `latency`: end-to-end time of one call — vision tower, prefill, every decode step and every
//!   map — from the phase clock; the median over the repetitions, with min, max and standard
//!   deviation.
//! - `map latency`: the engine's own timer around the map work of the call (synchronised with the
//!   device at both ends), so 0 for `generate` and never negative; the median over repetitions.
//! - `peak memory`: the most memory in use during the call (process RSS on the CPU — weights
//!   included —, device memory on a GPU); `run memory`: peak minus the amount in use at the call's
//!   start; `map memory`: a method's run memory minus plain generation's at the same length.
//! - `ledger peak`: on a backend that keeps a memory ledger, the most bytes of live tensors and
//!   op scratch at once during the call (weights included), and per tag.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::memory::{MemorySource, MemoryUse};
use super::roofline::Roofline;
use super::ProfMethod;
use crate::backend::MemTag;
use crate::error::{Error, Result};
use crate::render::plot::{line_plot, Axis, LinePlot, Series, PALETTE};
use crate::render::write_png;
use crate::vision::RgbImage;

pub const FORMAT: &str = "fastrm-profile-2";
pub const JSON_FILE: &str = "profile.json";
pub const TABLE_FILE: &str = "profile.txt";
pub const LATENCY_PLOT: &str = "latency.png";
pub const MEMORY_PLOT: &str = "memory.png";

/// Describes the run as a whole.
#[derive(Debug, Clone)]
pub struct Meta {
    pub model: String,
    pub device: String,
    pub backend: String,
    pub card: String,
    pub date_utc: String,
    pub timer: String,
    /// Filled by [`Report::new`] from the memory source and what the runs achieved.
    pub memory: String,
    pub hidden_size: usize,
    pub layers: usize,
    pub patches: usize,
    pub prompt_len: usize,
    pub prompt: String,
    pub tokens: Vec<usize>,
    pub methods: Vec<ProfMethod>,
    pub full_r: bool,
    pub repeat: usize,
    /// FastRM's head and the note on its cost (absent when fastrm is not profiled).
    pub head: Option<String>,
    pub warmup: String,
    /// The decode step's bytes and the measured bandwidth they are held against.
    pub roofline: Roofline,
}

/// A run's decode phase against the memory floor (see [`Roofline`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floor {
    /// Decode time per generated token (the median repetition's).
    pub ms_per_token: f64,
    /// Bytes the decode phase reads, all tokens.
    pub bytes: u64,
    /// The least time those bytes take at the measured bandwidth, per token.
    pub floor_ms_per_token: Option<f64>,
    /// Floor time over decode time: 1 would be a decode at the memory's speed.
    pub share: Option<f64>,
    /// The maps' time over decode plus maps (relevancy methods): the map's share of a step.
    pub map_share: Option<f64>,
}

impl Meta {
    /// Run `r`'s decode against the roofline.
    pub fn floor(&self, r: &RunRecord) -> Floor {
        let (decode_s, maps_s) = (r.median.decode_s, r.median.maps_s);
        let per_token = |s: f64| s * 1e3 / r.tokens.max(1) as f64;
        let floor_s = self.roofline.floor_s(self.prompt_len, r.tokens);
        Floor {
            ms_per_token: per_token(decode_s),
            bytes: self.roofline.decode_bytes(self.prompt_len, r.tokens),
            floor_ms_per_token: floor_s.map(per_token),
            share: floor_s.filter(|_| decode_s > 0.0).map(|f| f / decode_s),
            map_share: (r.method != ProfMethod::Generate && decode_s + maps_s > 0.0)
                .then(|| maps_s / (decode_s + maps_s)),
        }
    }
}

/// What a backend's memory ledger saw during one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LedgerUse {
    /// Most bytes live at once, all tags together; `None` without a ledger (the CPU).
    pub peak_bytes: Option<u64>,
    /// Each tag's own peak.
    pub tag_peaks: Vec<(MemTag, u64)>,
}

/// One repetition of one call.
#[derive(Debug, Clone)]
pub struct Rep {
    pub latency_s: f64,
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// The engine's own synchronised timer around the map work (0 for generate).
    pub maps_s: f64,
    pub memory: MemoryUse,
    pub ledger: LedgerUse,
}

/// Median (the upper one of an even count: always one of the values), min, max and sample
/// standard deviation of some repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub sd: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        assert!(!values.is_empty(), "at least one value");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = if v.len() > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Spread {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            sd: var.sqrt(),
        }
    }

    fn json_ms(&self) -> Value {
        json!({
            "median": self.median * 1e3,
            "min": self.min * 1e3,
            "max": self.max * 1e3,
            "sd": self.sd * 1e3,
        })
    }
}

/// One method at one output length, over its repetitions.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub method: ProfMethod,
    pub tokens: usize,
    /// The median repetition's phases (by latency).
    pub median: Rep,
    pub latencies_s: Vec<f64>,
    pub latency: Spread,
    /// Each repetition's map time and their spread; `map.median` is the map latency.
    pub maps_s: Vec<f64>,
    pub map: Spread,
    /// Largest peak and largest run memory over the repetitions, smallest start.
    pub peak_bytes: u64,
    pub start_bytes: u64,
    pub run_bytes: u64,
    pub samples: usize,
    pub exact_peak: bool,
    /// Largest ledger peak over the repetitions (all tags, then per tag).
    pub ledger: LedgerUse,
    /// Filled by [`Report::new`]: run memory minus generate's at this length.
    pub map_bytes: i64,
}

impl RunRecord {
    pub fn from_repeats(method: ProfMethod, tokens: usize, mut reps: Vec<Rep>) -> Self {
        assert!(!reps.is_empty(), "at least one repetition");
        let latencies_s: Vec<f64> = reps.iter().map(|r| r.latency_s).collect();
        let maps_s: Vec<f64> = reps.iter().map(|r| r.maps_s).collect();
        let ledger = LedgerUse {
            peak_bytes: reps.iter().filter_map(|r| r.ledger.peak_bytes).max(),
            tag_peaks: MemTag::ALL
                .iter()
                .filter_map(|&t| {
                    reps.iter()
                        .flat_map(|r| &r.ledger.tag_peaks)
                        .filter(|(tag, _)| *tag == t)
                        .map(|&(_, b)| b)
                        .max()
                        .map(|b| (t, b))
                })
                .collect(),
        };
        let peak_bytes = reps.iter().map(|r| r.memory.peak_bytes).max().unwrap_or(0);
        let start_bytes = reps
            .iter()
            .map(|r| r.memory.baseline_bytes)
            .min()
            .unwrap_or(0);
        let run_bytes = reps.iter().map(|r| r.memory.run_bytes()).max().unwrap_or(0);
        let samples = reps.iter().map(|r| r.memory.samples).sum();
        let exact_peak = reps.iter().all(|r| r.memory.exact_peak);
        reps.sort_by(|a, b| a.latency_s.total_cmp(&b.latency_s));
        let median = reps.swap_remove(reps.len() / 2);
        RunRecord {
            method,
            tokens,
            median,
            latency: Spread::of(&latencies_s),
            latencies_s,
            map: Spread::of(&maps_s),
            maps_s,
            peak_bytes,
            start_bytes,
            run_bytes,
            samples,
            exact_peak,
            ledger,
            map_bytes: 0,
        }
    }

    pub fn latency_s(&self) -> f64 {
        self.median.latency_s
    }

    /// The map latency: the median of the direct map timers.
    pub fn map_latency_s(&self) -> f64 {
        self.map.median
    }
}

/// FastRM against one gradient baseline at one output length.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    pub tokens: usize,
    /// `baseline` or `baseline-incremental`.
    pub versus: ProfMethod,
    /// Baseline latency / FastRM latency (end to end).
    pub latency_speedup: f64,
    /// Baseline map latency / FastRM map latency (both direct timers); `None` when FastRM's
    /// is 0 (below the clock's resolution).
    pub map_latency_speedup: Option<f64>,
    /// FastRM peak / baseline peak.
    pub peak_memory_ratio: f64,
    /// FastRM ledger peak / baseline ledger peak, where the backend keeps a ledger.
    pub ledger_peak_ratio: Option<f64>,
    /// FastRM map memory (0 when measured ≤ 0: below the resolution of process memory) /
    /// baseline map memory; `None` when the baseline's is not positive.
    pub map_memory_ratio: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub meta: Meta,
    pub runs: Vec<RunRecord>,
    pub ratios: Vec<Ratio>,
}

impl Report {
    pub fn new(
        mut meta: Meta,
        source: MemorySource,
        interval: Duration,
        mut runs: Vec<RunRecord>,
    ) -> Self {
        let ms = interval.as_secs_f64() * 1e3;
        let exact = runs.iter().all(|r| r.exact_peak);
        meta.memory = match source {
            MemorySource::ProcessRss if exact => format!(
                "process peak RSS: VmHWM reset at each run's start (/proc/self/clear_refs), \
                 freed heap trimmed first; VmRSS also sampled every {ms} ms"
            ),
            MemorySource::ProcessRss => format!(
                "process RSS sampled every {ms} ms (the kernel refused the VmHWM reset: peaks \
                 shorter than the interval can be missed)"
            ),
            MemorySource::Nvml { device } => {
                format!("GPU {device} used memory from NVML, sampled every {ms} ms")
            }
        };
        let generate: Vec<(usize, u64)> = runs
            .iter()
            .filter(|r| r.method == ProfMethod::Generate)
            .map(|r| (r.tokens, r.run_bytes))
            .collect();
        for r in &mut runs {
            if r.method == ProfMethod::Generate {
                continue;
            }
            if let Some(&(_, bytes)) = generate.iter().find(|g| g.0 == r.tokens) {
                r.map_bytes = r.run_bytes as i64 - bytes as i64;
            }
        }
        let find = |m: ProfMethod, n: usize| runs.iter().find(|r| r.method == m && r.tokens == n);
        let mut ratios = Vec::new();
        for &n in &meta.tokens {
            let Some(f) = find(ProfMethod::FastRm, n) else {
                continue;
            };
            for versus in [ProfMethod::Baseline, ProfMethod::BaselineIncremental] {
                let Some(b) = find(versus, n) else { continue };
                ratios.push(Ratio {
                    tokens: n,
                    versus,
                    latency_speedup: b.latency_s() / f.latency_s(),
                    map_latency_speedup: (f.map_latency_s() > 0.0)
                        .then(|| b.map_latency_s() / f.map_latency_s()),
                    peak_memory_ratio: f.peak_bytes as f64 / b.peak_bytes as f64,
                    ledger_peak_ratio: match (f.ledger.peak_bytes, b.ledger.peak_bytes) {
                        (Some(f), Some(b)) if b > 0 => Some(f as f64 / b as f64),
                        _ => None,
                    },
                    map_memory_ratio: (b.map_bytes > 0)
                        .then(|| f.map_bytes.max(0) as f64 / b.map_bytes as f64),
                });
            }
        }
        Report { meta, runs, ratios }
    }

    pub fn to_json(&self) -> Value {
        let m = &self.meta;
        json!({
            "format": FORMAT,
            "model": m.model,
            "device": m.device,
            "backend": m.backend,
            "card": m.card,
            "date_utc": m.date_utc,
            "timer": m.timer,
            "memory": m.memory,
            "hidden_size": m.hidden_size,
            "layers": m.layers,
            "patches": m.patches,
            "prompt_len": m.prompt_len,
            "prompt": m.prompt,
            "tokens": m.tokens,
            "methods": m.methods.iter().map(|x| x.name()).collect::<Vec<_>>(),
            "full_r": m.full_r,
            "repeat": m.repeat,
            "head": m.head,
            "warmup": m.warmup,
            "eos": "ignored: every run generates exactly `tokens` tokens",
            "roofline": {
                "decoder_bytes": m.roofline.decoder_bytes,
                "lm_head_bytes": m.roofline.head_bytes,
                "kv_position_bytes": m.roofline.kv_position_bytes,
                "bandwidth_bytes_per_s": m.roofline.bandwidth,
                "bandwidth": m.roofline.bandwidth_how,
                "last_level_cache_bytes": m.roofline.cache_bytes,
                "weights_fit_in_cache": m.roofline.fits_in_cache(),
            },
            "definitions": {
                "latency_ms": "end-to-end time of one call (vision, prefill, decode, maps): the median over the repetitions",
                "latency_spread_ms": "median, min, max and sample standard deviation of latency_ms_repeats",
                "map_latency_ms": "the engine's own timer around the map work, synchronised with the device at both ends: the median of map_latency_ms_repeats (0 for generate)",
                "peak_memory_bytes": "most memory in use during the call (weights included); the pool is trimmed before each call",
                "run_memory_bytes": "peak_memory_bytes minus the memory in use at the call's start",
                "map_memory_bytes": "run_memory_bytes minus generate's at the same length",
                "ledger_peak_bytes": "most bytes of live tensors and op scratch at once during the call, weights included (null without a ledger: the CPU)",
                "ledger_tag_peak_bytes": "each memory tag's own peak during the call",
                "latency_speedup": "versus latency_ms / fastrm latency_ms",
                "map_latency_speedup": "versus map_latency_ms / fastrm map_latency_ms (null when fastrm's is 0)",
                "peak_memory_ratio": "fastrm peak_memory_bytes / versus peak_memory_bytes",
                "ledger_peak_ratio": "fastrm ledger_peak_bytes / versus ledger_peak_bytes",
                "map_memory_ratio": "max(0, fastrm map_memory_bytes) / versus map_memory_bytes (null when versus's is not positive)",
                "decode_ms_per_token": "decode_ms / tokens (every token's lm_head, every later token's decoder pass and its choice)",
                "decode_bytes": "bytes the decode phase reads: tokens x lm_head + (tokens - 1) x the decoder's weights + the keys and values of every position each pass attends to",
                "decode_floor_ms_per_token": "decode_bytes / the measured bandwidth (roofline.bandwidth), per token: no decode can be faster (null without a measured bandwidth)",
                "decode_floor_share": "decode floor / decode time: the share of the memory's speed the decode reaches",
                "map_share_of_step": "map_latency / (decode + map latency) of the median repetition: the maps' share of the per-token work (null for generate)",
            },
            "runs": self.runs.iter().map(|r| run_json(r, &m.floor(r))).collect::<Vec<_>>(),
            "ratios": self.ratios.iter().map(|q| json!({
                "tokens": q.tokens,
                "versus": q.versus.name(),
                "latency_speedup": q.latency_speedup,
                "map_latency_speedup": q.map_latency_speedup,
                "peak_memory_ratio": q.peak_memory_ratio,
                "peak_memory_reduction_pct": (1.0 - q.peak_memory_ratio) * 100.0,
                "ledger_peak_ratio": q.ledger_peak_ratio,
                "map_memory_ratio": q.map_memory_ratio,
            })).collect::<Vec<_>>(),
        })
    }

    /// The human-readable table (also written as `profile.txt`).
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let m = &self.meta;
        let mb = |b: f64| b / 1e6;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model {} (hidden {}, {} layers, {} patches), prompt {} positions",
            m.model, m.hidden_size, m.layers, m.patches, m.prompt_len
        );
        let _ = writeln!(
            s,
            "device {} — {}; {}, {}",
            m.device, m.card, m.date_utc, m.timer
        );
        let _ = writeln!(s, "memory: {}", m.memory);
        if let Some(h) = &m.head {
            let _ = writeln!(s, "fastrm: {h}");
        }
        let _ = writeln!(
            s,
            "EOS ignored (every run makes exactly N tokens); {} run(s) each: median ± sample \
             standard deviation{}",
            m.repeat,
            if m.full_r {
                "; baseline with --full-r"
            } else {
                ""
            }
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:>6}  {:<20} {:>11} {:>8} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "tokens",
            "method",
            "latency ms",
            "± ms",
            "maps ms",
            "± ms",
            "peak MB",
            "run MB",
            "maps MB",
            "ledger MB"
        );
        for r in &self.runs {
            let ledger = r
                .ledger
                .peak_bytes
                .map_or("-".to_string(), |b| format!("{:.1}", mb(b as f64)));
            let _ = writeln!(
                s,
                "{:>6}  {:<20} {:>11.1} {:>8.1} {:>10.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>9}",
                r.tokens,
                r.method.name(),
                r.latency_s() * 1e3,
                r.latency.sd * 1e3,
                r.map_latency_s() * 1e3,
                r.map.sd * 1e3,
                mb(r.peak_bytes as f64),
                mb(r.run_bytes as f64),
                mb(r.map_bytes as f64),
                ledger,
            );
        }
        let _ = writeln!(
            s,
            "maps ms: the engine's own timer around the map work (not a difference of runs); \
             run MB: peak minus the memory in use at the run's start; maps MB: run MB minus \
             generate's; ledger MB: peak of live tensors and scratch, weights included, where the \
             backend keeps a ledger (MB = 10^6 bytes)"
        );
        self.floor_table(&mut s);
        if !self.ratios.is_empty() {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "FastRM vs gradient baselines (speedup = baseline / fastrm; memory ratio = fastrm / baseline)"
            );
            let _ = writeln!(
                s,
                "{:>6}  {:<20} {:>9} {:>13} {:>11} {:>13} {:>11}",
                "tokens",
                "versus",
                "speedup",
                "maps speedup",
                "peak ratio",
                "ledger ratio",
                "maps ratio"
            );
            let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
            for q in &self.ratios {
                let _ = writeln!(
                    s,
                    "{:>6}  {:<20} {:>9.2} {:>13} {:>11.3} {:>13} {:>11}",
                    q.tokens,
                    q.versus.name(),
                    q.latency_speedup,
                    opt(q.map_latency_speedup, 2),
                    q.peak_memory_ratio,
                    opt(q.ledger_peak_ratio, 3),
                    opt(q.map_memory_ratio, 2),
                );
            }
        }
        s
    }

    /// The decode phase of every run against the memory floor.
    fn floor_table(&self, s: &mut String) {
        use std::fmt::Write;
        let r = &self.meta.roofline;
        let _ = writeln!(s);
        let _ = match r.bandwidth {
            Some(bw) => writeln!(
                s,
                "Decode against the memory floor: {:.1} GB/s measured ({}); per step the decoder \
                 reads {:.1} MB of weights, the lm_head {:.1} MB, each cached position {:.1} kB",
                bw / 1e9,
                r.bandwidth_how,
                r.decoder_bytes as f64 / 1e6,
                r.head_bytes as f64 / 1e6,
                r.kv_position_bytes as f64 / 1e3
            ),
            None => writeln!(s, "Decode against the memory floor: {}", r.bandwidth_how),
        };
        if r.fits_in_cache() {
            let _ = writeln!(
                s,
                "(a step's weights fit in the CPU's {:.0} MB last-level cache: steps can read them \
                 from the cache, faster than the floor)",
                r.cache_bytes.unwrap_or(0) as f64 / 1e6
            );
        }
        let _ = writeln!(
            s,
            "{:>6}  {:<20} {:>12} {:>10} {:>12} {:>9} {:>9}",
            "tokens", "method", "ms/token", "MB/token", "floor ms", "% floor", "maps %"
        );
        let opt = |v: Option<f64>, scale: f64, p: usize| {
            v.map_or("-".to_string(), |v| format!("{:.p$}", v * scale))
        };
        for run in &self.runs {
            let f = self.meta.floor(run);
            let _ = writeln!(
                s,
                "{:>6}  {:<20} {:>12.2} {:>10.1} {:>12} {:>9} {:>9}",
                run.tokens,
                run.method.name(),
                f.ms_per_token,
                f.bytes as f64 / 1e6 / run.tokens.max(1) as f64,
                opt(f.floor_ms_per_token, 1.0, 2),
                opt(f.share, 100.0, 1),
                opt(f.map_share, 100.0, 1),
            );
        }
        let _ = writeln!(
            s,
            "ms/token: decode time per token; floor ms: the bytes read per token at the measured \
             bandwidth; % floor: floor / decode (100 = the memory's speed); maps %: the maps' \
             share of decode + maps"
        );
    }

    fn series(&self, value: impl Fn(&RunRecord) -> f64) -> Vec<Series> {
        self.meta
            .methods
            .iter()
            .map(|&method| Series {
                name: method.name().into(),
                color: method_color(method),
                points: self
                    .runs
                    .iter()
                    .filter(|r| r.method == method)
                    .map(|r| (r.tokens as f64, value(r)))
                    .collect(),
                markers: true,
            })
            .collect()
    }

    fn x_axis(&self) -> Axis {
        let mut x = Axis::linear("output tokens (forced)");
        x.ticks = Some(self.meta.tokens.iter().map(|&n| n as f64).collect());
        x
    }

    fn short_model(&self) -> String {
        let m = &self.meta.model;
        if m.starts_with("synthetic:") {
            return m.clone();
        }
        // The last two path components: `demo/model` says more than `model`.
        let parts: Vec<String> = Path::new(m)
            .components()
            .rev()
            .take(2)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        parts.into_iter().rev().collect::<Vec<_>>().join("/")
    }

    /// End-to-end latency (seconds) against output length, one line per method; log y when the
    /// values span more than a factor of 10.
    pub fn latency_plot(&self) -> Result<RgbImage> {
        let series = self.series(|r| r.latency_s());
        let vals: Vec<f64> = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| *v > 0.0)
            .collect();
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(0.0, f64::max);
        let y = if lo.is_finite() && hi / lo > 10.0 {
            Axis::log("end-to-end latency (s, log scale)")
        } else {
            Axis::linear("end-to-end latency (s)")
        };
        let title = format!(
            "Latency vs output length - {}, {}",
            self.short_model(),
            self.meta.device
        );
        let mut p = LinePlot::new(&title, self.x_axis(), y);
        p.series = series;
        line_plot(&p)
    }

    /// Peak memory (MB) against output length, one line per method.
    pub fn memory_plot(&self) -> Result<RgbImage> {
        let what = if self.meta.device == "cpu" {
            "peak process memory (MB, RSS)"
        } else {
            "peak device memory (MB)"
        };
        let title = format!(
            "Peak memory vs output length - {}, {}",
            self.short_model(),
            self.meta.device
        );
        let series = self.series(|r| r.peak_bytes as f64 / 1e6);
        let top = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        // From zero: the footprint's proportions, as the paper's figure shows them.
        let mut y = Axis::linear(what);
        y.range = Some((0.0, (top * 1.08).max(1e-3)));
        let mut p = LinePlot::new(&title, self.x_axis(), y);
        p.series = series;
        line_plot(&p)
    }

    /// Writes the files into `out` (already proven writable by [`prepare_out`]) and returns their
    /// paths.
    pub fn write(&self, out: &Path) -> Result<Vec<PathBuf>> {
        let files: Vec<PathBuf> = FILES.iter().map(|f| out.join(f)).collect();
        write_png(&files[2], &self.latency_plot()?)?;
        write_png(&files[3], &self.memory_plot()?)?;
        crate::util::write_atomic(&files[1], self.table().as_bytes())?;
        let doc = self.to_json_listing(&FILES);
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| Error::input(format!("profile JSON: {e}")))?;
        crate::util::write_atomic(&files[0], text.as_bytes())?;
        Ok(files)
    }

    /// [`Report::to_json`] with the names of the files written beside it, if any.
    fn to_json_listing(&self, files: &[&str]) -> Value {
        let mut doc = self.to_json();
        if !files.is_empty() {
            doc["files"] = json!(files);
        }
        doc
    }
}

/// The files `--out` receives, in the order [`Report::write`] returns them.
const FILES: [&str; 4] = [JSON_FILE, TABLE_FILE, LATENCY_PLOT, MEMORY_PLOT];

/// What `fastrm profile` returns: the report and the files written from it (none without `out`).
pub struct Profiled {
    pub report: Report,
    pub files: Vec<PathBuf>,
}

/// The JSON document profile.json holds (`files` listed when there are any).
impl serde::Serialize for Profiled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let files = if self.files.is_empty() {
            &[][..]
        } else {
            &FILES[..]
        };
        self.report.to_json_listing(files).serialize(s)
    }
}

/// One run in the JSON document.
fn run_json(r: &RunRecord, floor: &Floor) -> Value {
    let ms = |s: f64| s * 1e3;
    json!({
            "decode_ms_per_token": floor.ms_per_token,
            "decode_bytes": floor.bytes,
            "decode_floor_ms_per_token": floor.floor_ms_per_token,
            "decode_floor_share": floor.share,
            "map_share_of_step": floor.map_share,
            "method": r.method.name(),
            "tokens": r.tokens,
            "latency_ms": ms(r.latency_s()),
            "latency_spread_ms": r.latency.json_ms(),
            "map_latency_ms": ms(r.map_latency_s()),
            "map_latency_spread_ms": r.map.json_ms(),
            "vision_ms": ms(r.median.vision_s),
            "prefill_ms": ms(r.median.prefill_s),
            "decode_ms": ms(r.median.decode_s),
            "latency_ms_repeats": r.latencies_s.iter().map(|&s| ms(s)).collect::<Vec<_>>(),
            "map_latency_ms_repeats": r.maps_s.iter().map(|&s| ms(s)).collect::<Vec<_>>(),
            "peak_memory_bytes": r.peak_bytes,
            "start_memory_bytes": r.start_bytes,
            "run_memory_bytes": r.run_bytes,
            "map_memory_bytes": r.map_bytes,
            "ledger_peak_bytes": r.ledger.peak_bytes,
            "ledger_tag_peak_bytes": r.ledger.tag_peaks.iter()
                .map(|(t, b)| (t.name().to_string(), json!(b)))
                .collect::<serde_json::Map<String, Value>>(),
            "memory_samples": r.samples,
            "exact_peak": r.exact_peak,
    })
}

/// One colour per method, the same in every plot.
pub fn method_color(m: ProfMethod) -> [u8; 3] {
    match m {
        ProfMethod::Generate => [110, 110, 110],
        ProfMethod::FastRm => PALETTE[2],
        ProfMethod::Baseline => PALETTE[3],
        ProfMethod::BaselineIncremental => PALETTE[1],
    }
}

/// Creates `out` (and parents) and proves it writable, before any model loads.
pub fn prepare_out(out: &Path) -> Result<()> {
    let err = |e: std::io::Error, what: &str| Error::Io {
        path: out.to_path_buf(),
        source: std::io::Error::new(e.kind(), format!("{what}: {e}")),
    };
    std::fs::create_dir_all(out).map_err(|e| err(e, "cannot create the output folder"))?;
    let probe = out.join(format!(".fastrm-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| err(e, "output folder is not writable"))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Now, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_string(secs)
}

/// Seconds since the Unix epoch as an ISO-8601 UTC time (proleptic Gregorian calendar).
pub fn utc_string(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from a day count (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_string(1_795_743_000), "2026-11-27T01:30:00Z");
    }
}
