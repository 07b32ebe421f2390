//! The LLaVA-1.5 program, written once against [`crate::backend::Backend`].
//!
//! Weights come from a [`WeightSource`]: a checkpoint on disk, or seeded random values of the same
//! shapes (`synthetic`, for benches and for tests that only need realistic shapes). Both go through
//! the same loading code, so the shape checks are the same.

pub mod clip;
pub mod kv;
pub mod llama;
pub mod llama_backward;
pub mod llava;
pub mod prefix;
pub mod sampling;
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
/// [`crate::util::SplitMix64`] seeded with `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub seed: u64,
    pub center: f32,
    pub spread: f32,
}

impl Synthetic {
    pub fn draw(&self, hub_name: &str, shape: &[usize]) -> Draw {
        let seed = self.seed ^ crate::util::fnv1a64(hub_name.as_bytes());
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
