//! Finite-difference helpers shared by the backward-op tests: f64 random inputs, f32 tensors made
//! from them, central-difference gradients, and the comparison both files use.

use fastrm::backend::cpu::CpuTensor;
use fastrm::util::SplitMix64;

pub fn rand(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * rng.uniform_sym() as f64).collect()
}

pub fn t(x: &[f64], rows: usize, cols: usize) -> CpuTensor {
    CpuTensor::new(x.iter().map(|&v| v as f32).collect(), rows, cols).unwrap()
}

/// Gradient of `x ↦ Σ g ⊙ f(x)` by central differences, in f64.
pub fn fd_grad(x: &[f64], g: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-6;
    let loss = |x: &[f64]| f(x).iter().zip(g).map(|(a, b)| a * b).sum::<f64>();
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let lp = loss(&xp);
            xp[i] = x[i] - h;
            let lm = loss(&xp);
            xp[i] = x[i];
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

/// Every element within 2e-4 of the finite differences, relative to their largest magnitude.
pub fn close(what: &str, got: &CpuTensor, want: &[f64]) {
    assert_eq!(got.data.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-9);
    for (i, (&a, &b)) in got.data.iter().zip(want).enumerate() {
        let e = (a as f64 - b).abs() / scale;
        assert!(
            e < 2e-4,
            "{what}[{i}]: backward {a}, finite differences {b} (rel {e:e})"
        );
    }
}
