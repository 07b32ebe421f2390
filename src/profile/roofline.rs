//! The decode phase against its memory floor: what a run's decode steps must read (every weight
//! of the decoder and the lm_head each step, and the keys and values of every position each step
//! attends to) over the bandwidth measured on the same machine in the same sitting. A decode step
//! at batch 1 does a few operations per value it reads, so no kernel can beat `bytes / bandwidth`;
//! the share of that floor a run reaches says how much is left to gain, and where.
//!
//! The yardstick is measured, never a data-sheet figure: on the CPU the read bandwidth of every
//! worker thread summing a buffer larger than any cache (a decode step only reads its weights); on
//! a GPU the device-to-device copy bandwidth (reads plus writes), the figure GPU decode kernels
//! are usually held against. The simulated device has none: its times are the host's.

use std::time::Instant;

use rayon::prelude::*;

use crate::backend::Backend;
use crate::engine::Device;
use crate::error::Result;
use crate::model::kv::PAGE;
use crate::model::llama::Llama;

/// Bytes of the CPU probe's buffer: past the last-level cache of current server CPUs.
const HOST_PROBE_BYTES: usize = 512 << 20;
/// Bytes of the device probe's copy.
const DEVICE_PROBE_BYTES: usize = 512 << 20;
/// Passes of either probe; the fastest counts (the others pay for first touches and noise).
const PROBE_PASSES: usize = 5;

/// A model's decode-step bytes and the machine's measured bandwidth.
#[derive(Debug, Clone, PartialEq)]
pub struct Roofline {
    /// Every decoder layer's weights and the final norm, as held: read once per decoder pass.
    pub decoder_bytes: u64,
    /// The lm_head, as held: read once per chosen token.
    pub head_bytes: u64,
    /// Keys and values of one cache position, every layer.
    pub kv_position_bytes: u64,
    /// Measured bytes per second; `None` where nothing meaningful can be measured.
    pub bandwidth: Option<f64>,
    /// How `bandwidth` was measured (or why there is none).
    pub bandwidth_how: String,
    /// The CPU's last-level cache, where known: a step whose bytes fit in it can be served from
    /// the cache and beat the floor (a small model on a server CPU does).
    pub cache_bytes: Option<u64>,
}

impl Roofline {
    /// The model's figures on backend `b` and the bandwidth of `device`, measured now.
    pub fn measure<B: Backend>(
        b: &B,
        llm: &Llama<B>,
        page_bytes: usize,
        device: Device,
    ) -> Result<Self> {
        let bytes = |t: &B::Tensor| b.tensor_bytes(t) as u64;
        let decoder_bytes = llm
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.q,
                    &l.k,
                    &l.v,
                    &l.o,
                    &l.mlp_norm,
                    &l.gate,
                    &l.up,
                    &l.down,
                ]
                .into_iter()
                .map(bytes)
                .sum::<u64>()
            })
            .sum::<u64>()
            + bytes(&llm.norm);
        let (bandwidth, bandwidth_how) = match device {
            Device::Cpu => (
                Some(host_read_bandwidth()),
                format!(
                    "read bandwidth: {} threads summing a {} MiB buffer, fastest of {PROBE_PASSES} passes",
                    rayon::current_num_threads(),
                    HOST_PROBE_BYTES >> 20
                ),
            ),
            Device::Cuda(_) => (
                Some(device_copy_bandwidth(b)?),
                format!(
                    "device-to-device copy bandwidth (reads + writes) of {} MiB, fastest of \
                     {PROBE_PASSES} copies",
                    DEVICE_PROBE_BYTES >> 20
                ),
            ),
            Device::Sim => (
                None,
                "none: the simulated device's times are the host's, not a GPU's".into(),
            ),
        };
        Ok(Roofline {
            decoder_bytes,
            head_bytes: bytes(&llm.lm_head),
            kv_position_bytes: (page_bytes / PAGE) as u64,
            bandwidth,
            bandwidth_how,
            cache_bytes: (device == Device::Cpu).then(last_level_cache).flatten(),
        })
    }

    /// Whether a decode step's weights fit in the last-level cache, so the floor is no bound.
    pub fn fits_in_cache(&self) -> bool {
        self.cache_bytes
            .is_some_and(|c| self.decoder_bytes + self.head_bytes <= c)
    }

    /// Bytes the decode phase of a run reads: `tokens` chosen after a `prompt`-position prompt
    /// take `tokens` lm_head products and `tokens − 1` decoder passes, pass `k` (1-based)
    /// attending over `prompt + k` positions, its own included. The embedding rows and the
    /// activations are left out (kilobytes against gigabytes).
    pub fn decode_bytes(&self, prompt: usize, tokens: usize) -> u64 {
        let Some(steps) = (tokens as u64).checked_sub(1) else {
            return 0;
        };
        let positions = steps * prompt as u64 + steps * (steps + 1) / 2;
        tokens as u64 * self.head_bytes
            + steps * self.decoder_bytes
            + positions * self.kv_position_bytes
    }

    /// Seconds the decode phase of such a run cannot beat at the measured bandwidth.
    pub fn floor_s(&self, prompt: usize, tokens: usize) -> Option<f64> {
        self.bandwidth
            .map(|bw| self.decode_bytes(prompt, tokens) as f64 / bw)
    }
}

/// The largest CPU cache Linux reports for CPU 0 (`/sys/devices/system/cpu/cpu0/cache`).
fn last_level_cache() -> Option<u64> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let size = std::fs::read_to_string(e.ok()?.path().join("size")).ok()?;
        let size = size.trim();
        let (num, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let scale = match unit {
            "K" => 1 << 10,
            "M" => 1 << 20,
            _ => return None,
        };
        Some(num.parse::<u64>().ok()? * scale)
    })
    .max()
}

/// Bytes per second every worker thread together reads from memory (the fastest pass).
pub fn host_read_bandwidth() -> f64 {
    // Non-zero values so every page is really written (and so resident) before timing.
    let buf = vec![1u64; HOST_PROBE_BYTES / 8];
    let mut best = f64::INFINITY;
    for _ in 0..PROBE_PASSES {
        let t = Instant::now();
        // Eight independent sums, so the loop is bound by loads, not by one chain of adds.
        let sum: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0u64; 8];
                for v in c.chunks_exact(8) {
                    for (a, &x) in acc.iter_mut().zip(v) {
                        *a = a.wrapping_add(x);
                    }
                }
                acc.iter().fold(0u64, |a, &x| a.wrapping_add(x))
            })
            .sum();
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    HOST_PROBE_BYTES as f64 / best
}

/// Bytes per second a device-to-device copy moves (reads plus writes; the fastest copy), timed
/// with the backend's own clock.
fn device_copy_bandwidth<B: Backend>(b: &B) -> Result<f64> {
    let cols = DEVICE_PROBE_BYTES / b.storage_bytes();
    let src = b.zeros(1, cols)?;
    let mut dst = b.zeros(1, cols)?;
    b.copy_rows_into(&mut dst, 0, &src)?;
    let mut best = f64::INFINITY;
    for _ in 0..PROBE_PASSES {
        let start = b.mark()?;
        b.copy_rows_into(&mut dst, 0, &src)?;
        let end = b.mark()?;
        best = best.min(start.seconds_to(&end)?);
    }
    Ok(2.0 * DEVICE_PROBE_BYTES as f64 / best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roofline() -> Roofline {
        Roofline {
            decoder_bytes: 1000,
            head_bytes: 100,
            kv_position_bytes: 10,
            bandwidth: Some(1e4),
            bandwidth_how: String::new(),
            cache_bytes: Some(2000),
        }
    }

    /// Counted by hand: 3 tokens after a 5-position prompt are 3 lm_heads, 2 decoder passes over
    /// 6 and 7 positions.
    #[test]
    fn decode_bytes_count_every_step() {
        let r = roofline();
        assert_eq!(r.decode_bytes(5, 3), 3 * 100 + 2 * 1000 + (6 + 7) * 10);
        assert_eq!(r.decode_bytes(5, 1), 100);
        assert_eq!(r.decode_bytes(5, 0), 0);
        assert_eq!(r.floor_s(5, 3), Some(2430.0 / 1e4));
        let none = Roofline {
            bandwidth: None,
            ..roofline()
        };
        assert_eq!(none.floor_s(5, 3), None);
        assert!(r.fits_in_cache());
        let big = Roofline {
            cache_bytes: Some(1099),
            ..roofline()
        };
        assert!(!big.fits_in_cache());
    }
}
