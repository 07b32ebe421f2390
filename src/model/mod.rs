//! The LLaVA-1.5 program, written once against [`crate::backend::Backend`].
//!
//! Weights come from a [`WeightSource`]: a checkpoint on disk, or seeded random values of the same
//! shapes (`synthetic`, for benches and for tests that only need realistic shapes). Both go through
//! the same loading code, so the shape checks are the same.

pub mod clip;
pub mod llama;
pub mod llama_backward;
pub mod llava;
pub mod session;

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::error::Result;

pub use llava::Llava;

/// Where weights come from. `shape` is the checkpoint shape implied by the config (checked);
/// the tensor is delivered as the 2-D `[rows, cols]` view the op set uses.
pub trait WeightSource<B: Backend> {
    fn get(
        &self,
        b: &B,
        hub_name: &str,
        shape: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<B::Tensor>;
}

impl<B: Backend> WeightSource<B> for Checkpoint {
    fn get(
        &self,
        b: &B,
        hub_name: &str,
        shape: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<B::Tensor> {
        let t = Checkpoint::get(self, hub_name, shape)?;
        b.load_weight(&t, rows, cols)
    }
}

/// Seeded random weights with the shapes the config implies. Values are drawn per tensor from a
/// generator seeded by the tensor name, so the same name always gets the same values whatever the
/// load order. Norm weights (names ending in `layernorm.weight`, `layer_norm*.weight`,
/// `norm.weight`) are drawn around 1, everything else around 0 with a fan-in scaled spread so
/// activations stay in a sane range through many layers.
pub struct Synthetic {
    pub seed: u64,
}

impl<B: Backend> WeightSource<B> for Synthetic {
    fn get(
        &self,
        b: &B,
        hub_name: &str,
        shape: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<B::Tensor> {
        let d = self.draw(hub_name, shape);
        b.uniform(rows, cols, d.seed, d.center, d.spread)
    }
}

/// How [`Synthetic`] draws one tensor: value `i` is `center + spread · u_i`, `u_i` the i-th draw of
/// [`SplitMix64`] seeded with `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub seed: u64,
    pub center: f32,
    pub spread: f32,
}

impl Synthetic {
    pub fn draw(&self, hub_name: &str, shape: &[usize]) -> Draw {
        let seed = self.seed ^ fnv1a(hub_name.as_bytes());
        let is_norm = hub_name.ends_with("norm.weight")
            || hub_name.contains("layer_norm")
            || hub_name.contains("layrnorm.weight");
        let fan_in = if shape.len() >= 2 {
            shape[1..].iter().product::<usize>()
        } else {
            shape.first().copied().unwrap_or(1)
        };
        if is_norm && hub_name.ends_with("weight") {
            Draw {
                seed,
                center: 1.0,
                spread: 0.1,
            }
        } else {
            Draw {
                seed,
                center: 0.0,
                spread: (3.0 / fan_in as f32).sqrt(),
            }
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &c in bytes {
        h ^= c as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Small, fast, seedable generator (SplitMix64); good enough for test data and synthetic weights.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The generator seeded with `seed` after `n` draws: the state advances by a constant per
    /// draw, so any stretch of a stream can be drawn on its own (in parallel).
    pub fn skipped(seed: u64, n: u64) -> Self {
        SplitMix64(seed.wrapping_add(n.wrapping_mul(Self::GAMMA)))
    }
    const GAMMA: u64 = 0x9E3779B97F4A7C15;
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform_sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
