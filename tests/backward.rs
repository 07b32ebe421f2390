//! Backward ops against central finite differences of f64 reference forwards. For each op we pick
//! a random upstream gradient `g` and check `∂(Σ g ⊙ f(x))/∂x` from the CPU backward against
//! `(L(x + h·e_i) − L(x − h·e_i)) / 2h` evaluated in f64, on tiny random shapes (all inputs
//! differentiated, every element). The cam outputs are checked against their definition.

use fastrm::backend::cpu::{rope_inv_freq, Cpu};
use fastrm::backend::{AttnShape, Backend, Cam};
use fastrm::util::SplitMix64;

#[path = "common/fd.rs"]
mod fd;
use fd::{close, fd_grad, rand, t};

fn linear_f64(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
        }
    }
    y
}

#[test]
fn linear_bwd_fd() {
    let mut rng = SplitMix64::new(11);
    let (m, k, n) = (3, 5, 4);
    let (x, w, g) = (
        rand(&mut rng, m * k, 1.0),
        rand(&mut rng, n * k, 1.0),
        rand(&mut rng, m * n, 1.0),
    );
    let dx = Cpu.linear_bwd(&t(&g, m, n), &t(&w, n, k)).unwrap();
    close(
        "linear dx",
        &dx,
        &fd_grad(&x, &g, |x| linear_f64(x, &w, m, k, n)),
    );
    let (a, b) = (rand(&mut rng, 6, 1.0), rand(&mut rng, 12, 1.0));
    let ab = Cpu.matmul(&t(&a, 2, 3), &t(&b, 3, 4)).unwrap();
    let want: Vec<f64> = (0..8)
        .map(|i| (0..3).map(|p| a[(i / 4) * 3 + p] * b[p * 4 + i % 4]).sum())
        .collect();
    close("matmul", &ab, &want);
    assert!(Cpu.matmul(&t(&a, 2, 3), &t(&b, 4, 3)).is_err());
}

#[test]
fn rms_norm_bwd_fd() {
    let mut rng = SplitMix64::new(12);
    let (m, n, eps) = (3, 7, 1e-5);
    let (x, w, g) = (
        rand(&mut rng, m * n, 2.0),
        rand(&mut rng, n, 1.0),
        rand(&mut rng, m * n, 1.0),
    );
    let f = |x: &[f64]| {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            let row = &x[r * n..(r + 1) * n];
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / n as f64 + eps).sqrt();
            for j in 0..n {
                y[r * n + j] = row[j] * inv * w[j];
            }
        }
        y
    };
    let dx = Cpu
        .rms_norm_bwd(&t(&x, m, n), &t(&w, 1, n), &t(&g, m, n), eps as f32)
        .unwrap();
    close("rms_norm dx", &dx, &fd_grad(&x, &g, f));
}

#[test]
fn silu_mul_bwd_fd() {
    let mut rng = SplitMix64::new(13);
    let n = 12;
    let (gate, up, g) = (
        rand(&mut rng, n, 4.0),
        rand(&mut rng, n, 2.0),
        rand(&mut rng, n, 1.0),
    );
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let (dg, du) = Cpu
        .silu_mul_bwd(&t(&gate, 3, 4), &t(&up, 3, 4), &t(&g, 3, 4))
        .unwrap();
    close(
        "silu_mul dgate",
        &dg,
        &fd_grad(&gate, &g, |x| {
            x.iter().zip(&up).map(|(a, b)| silu(*a) * b).collect()
        }),
    );
    close(
        "silu_mul dup",
        &du,
        &fd_grad(&up, &g, |x| {
            gate.iter().zip(x).map(|(a, b)| silu(*a) * b).collect()
        }),
    );
}

#[test]
fn rope_bwd_fd() {
    let mut rng = SplitMix64::new(14);
    let (rows, hd, heads, pos0, theta) = (3, 8, 2, 37, 10000.0f32);
    let (x, g) = (
        rand(&mut rng, rows * hd * heads, 1.0),
        rand(&mut rng, rows * hd * heads, 1.0),
    );
    // The forward with the op's own f32 frequencies, so only the rotation is under test.
    let inv = rope_inv_freq(hd, theta);
    let f = |x: &[f64]| {
        let mut y = x.to_vec();
        let w = hd * heads;
        for r in 0..rows {
            for h in 0..heads {
                for i in 0..hd / 2 {
                    let a = (inv[i] * (pos0 + r) as f32) as f64;
                    let (p, q) = (x[r * w + h * hd + i], x[r * w + h * hd + i + hd / 2]);
                    y[r * w + h * hd + i] = p * a.cos() - q * a.sin();
                    y[r * w + h * hd + i + hd / 2] = q * a.cos() + p * a.sin();
                }
            }
        }
        y
    };
    let dx = Cpu
        .rope_bwd(&t(&g, rows, hd * heads), hd, pos0, theta)
        .unwrap();
    close("rope dx", &dx, &fd_grad(&x, &g, f));
}

/// f64 attention returning the output and the probabilities `[h][nq][kv]`.
fn attention_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    nq: usize,
    s: AttnShape,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let (h, hk, d, kv) = (s.n_heads, s.n_kv_heads, s.head_dim, s.kv_len);
    let mut out = vec![0.0; nq * h * d];
    let mut probs = vec![vec![0.0; nq * kv]; h];
    for hi in 0..h {
        let kh = hi / (h / hk);
        for i in 0..nq {
            let vis = s.causal_q_pos0.map_or(kv, |p| p + i + 1);
            let sc: Vec<f64> = (0..vis)
                .map(|j| {
                    (0..d)
                        .map(|t| q[i * h * d + hi * d + t] * k[j * hk * d + kh * d + t])
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            for j in 0..vis {
                probs[hi][i * kv + j] = (sc[j] - mx).exp() / z;
            }
            for tt in 0..d {
                out[i * h * d + hi * d + tt] = (0..vis)
                    .map(|j| probs[hi][i * kv + j] * v[j * hk * d + kh * d + tt])
                    .sum();
            }
        }
    }
    (out, probs)
}

#[test]
fn attention_bwd_fd_and_cams() {
    let mut rng = SplitMix64::new(15);
    for (h, hk, d, nq, kv, p0) in [
        (2, 2, 4, 5, 5, Some(0)),
        (4, 2, 4, 2, 6, Some(4)),
        (2, 1, 4, 3, 3, None),
        // Past the CPU's 64-row blocks: the second key block's sums start at query 34.
        (2, 1, 4, 70, 100, Some(30)),
    ] {
        let s = AttnShape {
            n_heads: h,
            n_kv_heads: hk,
            head_dim: d,
            causal_q_pos0: p0,
            kv_len: kv,
        };
        let q = rand(&mut rng, nq * h * d, 1.5);
        let k = rand(&mut rng, kv * hk * d, 1.5);
        let v = rand(&mut rng, kv * hk * d, 1.0);
        let g = rand(&mut rng, nq * h * d, 1.0);
        let (tq, tk, tv, tg) = (
            t(&q, nq, h * d),
            t(&k, kv, hk * d),
            t(&v, kv, hk * d),
            t(&g, nq, h * d),
        );
        let gr = Cpu
            .attention_bwd(&tq, &tk, &tv, &tg, s, Some(Cam::Chefer))
            .unwrap();
        let what = format!("{s:?}");
        close(
            &format!("dq {what}"),
            &gr.dq,
            &fd_grad(&q, &g, |x| attention_f64(x, &k, &v, nq, s).0),
        );
        close(
            &format!("dk {what}"),
            &gr.dk,
            &fd_grad(&k, &g, |x| attention_f64(&q, x, &v, nq, s).0),
        );
        close(
            &format!("dv {what}"),
            &gr.dv,
            &fd_grad(&v, &g, |x| attention_f64(&q, &k, x, nq, s).0),
        );

        // Cams from their definition: dA[h,i,j] = dO[i,h,:]·V[j,kvh,:].
        let (_, probs) = attention_f64(&q, &k, &v, nq, s);
        let mut chefer = vec![0.0; nq * kv];
        let mut gradcam = vec![0.0; nq * kv];
        for hi in 0..h {
            let kh = hi / (h / hk);
            for i in 0..nq {
                for j in 0..kv {
                    let da: f64 = (0..d)
                        .map(|tt| g[i * h * d + hi * d + tt] * v[j * hk * d + kh * d + tt])
                        .sum();
                    let a = probs[hi][i * kv + j];
                    chefer[i * kv + j] += (da * a).max(0.0) / h as f64;
                    gradcam[i * kv + j] += a * da.max(0.0) / h as f64;
                }
            }
        }
        close(
            &format!("chefer cam {what}"),
            gr.cam.as_ref().unwrap(),
            &chefer,
        );
        let gc = Cpu
            .attention_bwd(&tq, &tk, &tv, &tg, s, Some(Cam::GradCam))
            .unwrap();
        close(
            &format!("gradcam {what}"),
            gc.cam.as_ref().unwrap(),
            &gradcam,
        );
        assert!(Cpu
            .attention_bwd(&tq, &tk, &tv, &tg, s, None)
            .unwrap()
            .cam
            .is_none());
    }
}
