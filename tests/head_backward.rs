//! The FastRM head's parameter-gradient ops against central finite differences of f64 reference
//! forwards (the pattern of tests/backward.rs): a random upstream gradient `g`, the gradient of
//! `Σ g ⊙ f(·)` with respect to every input element, tiny random shapes.

use fastrm::backend::cpu::Cpu;
use fastrm::backend::Backend;
use fastrm::util::SplitMix64;

#[path = "common/fd.rs"]
mod fd;
use fd::{close, fd_grad, rand, t};

fn layer_norm_f64(x: &[f64], w: &[f64], b: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let mean = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
        let r = 1.0 / (var + eps).sqrt();
        for i in 0..cols {
            y.push((row[i] - mean) * r * w[i] + b[i]);
        }
    }
    y
}

#[test]
fn layer_norm_bwd_fd() {
    let mut rng = SplitMix64::new(21);
    let (m, c, eps) = (4, 7, 1e-5);
    let x: Vec<f64> = rand(&mut rng, m * c, 2.0).iter().map(|v| v + 0.5).collect();
    let w: Vec<f64> = rand(&mut rng, c, 0.5).iter().map(|v| v + 1.0).collect();
    let b = rand(&mut rng, c, 0.5);
    let g = rand(&mut rng, m * c, 1.0);
    let (dx, dw, db) = Cpu
        .layer_norm_bwd(&t(&x, m, c), &t(&w, 1, c), &t(&g, m, c), eps as f32)
        .unwrap();
    assert_eq!((dw.rows, dw.cols, db.rows, db.cols), (1, c, 1, c));
    close(
        "layer_norm dx",
        &dx,
        &fd_grad(&x, &g, |x| layer_norm_f64(x, &w, &b, c, eps)),
    );
    close(
        "layer_norm dw",
        &dw,
        &fd_grad(&w, &g, |w| layer_norm_f64(&x, w, &b, c, eps)),
    );
    close(
        "layer_norm db",
        &db,
        &fd_grad(&b, &g, |b| layer_norm_f64(&x, &w, b, c, eps)),
    );
    // Shape errors, not panics.
    assert!(Cpu
        .layer_norm_bwd(&t(&x, m, c), &t(&w, 1, c), &t(&g[..c], 1, c), 1e-5)
        .is_err());
    assert!(Cpu
        .layer_norm_bwd(&t(&x, m, c), &t(&w[..c - 1], 1, c - 1), &t(&g, m, c), 1e-5)
        .is_err());
}

fn linear_f64(x: &[f64], w: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = b[j] + (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum::<f64>();
        }
    }
    y
}

#[test]
fn linear_wgrad_and_bias_grad_fd() {
    let mut rng = SplitMix64::new(22);
    // Large enough for the row-blocked parallel product (m ≥ 64) as well as a small one.
    for &(m, k, n) in &[(3, 5, 4), (70, 6, 3)] {
        let x = rand(&mut rng, m * k, 1.0);
        let w = rand(&mut rng, n * k, 1.0);
        let b = rand(&mut rng, n, 1.0);
        let g = rand(&mut rng, m * n, 1.0);
        let dw = Cpu.linear_wgrad(&t(&g, m, n), &t(&x, m, k)).unwrap();
        assert_eq!((dw.rows, dw.cols), (n, k));
        close(
            "linear dW",
            &dw,
            &fd_grad(&w, &g, |w| linear_f64(&x, w, &b, m, k, n)),
        );
        let db = Cpu.sum_rows(&t(&g, m, n)).unwrap();
        assert_eq!((db.rows, db.cols), (1, n));
        close(
            "linear db",
            &db,
            &fd_grad(&b, &g, |b| linear_f64(&x, &w, b, m, k, n)),
        );
        // The transposed product at larger shapes too (the parallel split of the output rows).
        let big_n = 80;
        let gb = rand(&mut rng, m * big_n, 1.0);
        let dwb = Cpu.linear_wgrad(&t(&gb, m, big_n), &t(&x, m, k)).unwrap();
        for j in 0..big_n {
            for c in 0..k {
                let want: f64 = (0..m).map(|i| gb[i * big_n + j] * x[i * k + c]).sum();
                let got = dwb.data[j * k + c] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "dW[{j},{c}]"
                );
            }
        }
        assert!(Cpu.linear_wgrad(&t(&g, m, n), &t(&x[..k], 1, k)).is_err());
    }
}
