//! The CPU backend's ops against naive f64 formulas on fresh random inputs. These are the
//! definitions every other backend is compared with, so they get checked independently of the
//! oracle fixtures, including the cases the fixtures do not reach (grouped-query attention with a
//! causal offset, long RoPE positions, ties in argmax, shape errors).

use fastrm::backend::cpu::{Cpu, CpuTensor};
use fastrm::backend::{AttnShape, Backend};
use fastrm::util::SplitMix64;

fn rand(rng: &mut SplitMix64, rows: usize, cols: usize, scale: f32) -> CpuTensor {
    CpuTensor::new(
        (0..rows * cols)
            .map(|_| scale * rng.uniform_sym())
            .collect(),
        rows,
        cols,
    )
    .unwrap()
}

fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs() / (1.0 + w.abs());
        assert!(e <= tol, "{what}: index {i}: got {g}, want {w} (err {e:e})");
    }
}

#[test]
fn linear_matches_naive() {
    let mut rng = SplitMix64::new(1);
    // The last two split the output columns across threads (the second into a ragged last block).
    for &(m, k, n) in &[
        (1, 7, 5),
        (13, 64, 33),
        (70, 129, 65),
        (64, 33, 129),
        (150, 70, 300),
    ] {
        let x = rand(&mut rng, m, k, 1.0);
        let w = rand(&mut rng, n, k, 1.0);
        let b = rand(&mut rng, 1, n, 1.0);
        let y = Cpu.linear(&x, &w, Some(&b)).unwrap();
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = b.data[j] as f64
                    + (0..k)
                        .map(|t| x.data[i * k + t] as f64 * w.data[j * k + t] as f64)
                        .sum::<f64>();
            }
        }
        close("linear", &y.data, &want, 1e-5);
    }
    // A plain product too (a linear's input gradient), tall and wide enough to split by columns.
    let (a, b) = (rand(&mut rng, 100, 50, 1.0), rand(&mut rng, 50, 200, 1.0));
    let ab = Cpu.matmul(&a, &b).unwrap();
    let mut want = vec![0.0f64; 100 * 200];
    for i in 0..100 {
        for j in 0..200 {
            want[i * 200 + j] = (0..50)
                .map(|t| a.data[i * 50 + t] as f64 * b.data[t * 200 + j] as f64)
                .sum::<f64>();
        }
    }
    close("matmul", &ab.data, &want, 1e-5);
    let x = rand(&mut rng, 2, 3, 1.0);
    assert!(Cpu.linear(&x, &rand(&mut rng, 4, 5, 1.0), None).is_err());
}

#[test]
fn norms_match_naive() {
    let mut rng = SplitMix64::new(2);
    let x = rand(&mut rng, 5, 48, 3.0);
    let w = rand(&mut rng, 1, 48, 1.0);
    let b = rand(&mut rng, 1, 48, 1.0);
    let rms = Cpu.rms_norm(&x, &w, 1e-5).unwrap();
    let ln = Cpu.layer_norm(&x, &w, &b, 1e-5).unwrap();
    let (mut want_rms, mut want_ln) = (vec![], vec![]);
    for r in 0..5 {
        let row: Vec<f64> = x.row(r).iter().map(|&v| v as f64).collect();
        let ms = row.iter().map(|v| v * v).sum::<f64>() / 48.0;
        let mean = row.iter().sum::<f64>() / 48.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 48.0;
        for (j, &v) in row.iter().enumerate() {
            want_rms.push(v / (ms + 1e-5).sqrt() * w.data[j] as f64);
            want_ln.push((v - mean) / (var + 1e-5).sqrt() * w.data[j] as f64 + b.data[j] as f64);
        }
    }
    close("rms_norm", &rms.data, &want_rms, 1e-5);
    close("layer_norm", &ln.data, &want_ln, 1e-5);
}

#[test]
fn activations_match_formulas() {
    let mut rng = SplitMix64::new(3);
    let x = rand(&mut rng, 3, 40, 6.0);
    let u = rand(&mut rng, 3, 40, 2.0);
    let xs: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    // erf-GELU checked against a value table point too: gelu(1) = 0.8413447460685429.
    let g1 = Cpu.gelu(&CpuTensor::new(vec![1.0], 1, 1).unwrap()).unwrap();
    assert!((g1.data[0] as f64 - 0.8413447460685429).abs() < 1e-7);
    let gelu = Cpu.gelu(&x).unwrap();
    let want: Vec<f64> = xs
        .iter()
        .map(|&v| v * 0.5 * (1.0 + libm::erf(v / 2f64.sqrt())))
        .collect();
    close("gelu", &gelu.data, &want, 1e-6);
    let qg = Cpu.quick_gelu(&x).unwrap();
    let want: Vec<f64> = xs.iter().map(|&v| v * sig(1.702 * v)).collect();
    close("quick_gelu", &qg.data, &want, 1e-6);
    let sm = Cpu.silu_mul(&x, &u).unwrap();
    let want: Vec<f64> = xs
        .iter()
        .zip(&u.data)
        .map(|(&v, &w)| v * sig(v) * w as f64)
        .collect();
    close("silu_mul", &sm.data, &want, 1e-6);
}

#[test]
fn rope_rotates_split_halves_at_absolute_positions() {
    let mut rng = SplitMix64::new(4);
    let (hd, heads, n, pos0) = (16, 3, 4, 573);
    let x = rand(&mut rng, n, heads * hd, 1.0);
    // Angles are tabulated once per head size and base: another head size and a short range first,
    // so the call under test finds a table it has to replace and grow.
    Cpu.rope(&rand(&mut rng, 2, 8, 1.0), 8, 0, 500.0).unwrap();
    let y = Cpu.rope(&x, hd, pos0, 10000.0).unwrap();
    let mut want = vec![0.0f64; n * heads * hd];
    for r in 0..n {
        for h in 0..heads {
            for i in 0..hd / 2 {
                let f = 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64);
                let a = (pos0 + r) as f64 * f;
                let base = r * heads * hd + h * hd;
                let (p, q) = (x.data[base + i] as f64, x.data[base + i + hd / 2] as f64);
                want[base + i] = p * a.cos() - q * a.sin();
                want[base + i + hd / 2] = q * a.cos() + p * a.sin();
            }
        }
    }
    // f32 angles at position ~576 carry ~3e-5 rad of rounding, as in transformers.
    close("rope", &y.data, &want, 2e-4);
    assert!(Cpu.rope(&x, 5, 0, 1e4).is_err());
}

/// Naive attention: q [nq, H·d], k/v [kv, Hk·d], causal with query i at absolute pos0 + i.
fn naive_attention(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, s: AttnShape) -> Vec<f64> {
    let (h, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
    let mut out = vec![0.0f64; q.rows * h * d];
    for i in 0..q.rows {
        for hi in 0..h {
            let kh = hi / (h / hk);
            let visible = s.causal_q_pos0.map_or(s.kv_len, |p| p + i + 1);
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    (0..d)
                        .map(|t| {
                            q.data[i * h * d + hi * d + t] as f64
                                * k.data[j * hk * d + kh * d + t] as f64
                        })
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for t in 0..d {
                out[i * h * d + hi * d + t] = (0..visible)
                    .map(|j| e[j] / z * v.data[j * hk * d + kh * d + t] as f64)
                    .sum::<f64>();
            }
        }
    }
    out
}

#[test]
fn attention_full_causal_offset_and_gqa() {
    let mut rng = SplitMix64::new(5);
    let cases = [
        // (heads, kv heads, head dim, queries, kv rows in the cache, kv_len, causal pos0)
        (4, 4, 8, 9, 9, 9, None),
        (4, 4, 8, 9, 9, 9, Some(0)),
        (8, 2, 16, 3, 40, 20, Some(17)), // GQA, a decode-like tail inside a larger cache
        (2, 1, 8, 1, 12, 12, Some(11)),
        (2, 1, 8, 150, 160, 150, Some(0)), // several causal query blocks
        (2, 2, 8, 70, 100, 100, Some(30)), // blocks with a cache offset
    ];
    for (h, hk, d, nq, rows, kv_len, p0) in cases {
        let q = rand(&mut rng, nq, h * d, 2.0);
        let k = rand(&mut rng, rows, hk * d, 2.0);
        let v = rand(&mut rng, rows, hk * d, 1.0);
        let s = AttnShape {
            n_heads: h,
            n_kv_heads: hk,
            head_dim: d,
            causal_q_pos0: p0,
            kv_len,
        };
        let got = Cpu.attention(&q, &k, &v, s).unwrap();
        close(
            &format!("attention {s:?}"),
            &got.data,
            &naive_attention(&q, &k, &v, s),
            1e-5,
        );
    }
    // Queries past the filled cache are a shape error, not garbage.
    let q = rand(&mut rng, 2, 8, 1.0);
    let k = rand(&mut rng, 4, 8, 1.0);
    let s = AttnShape {
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 8,
        causal_q_pos0: Some(3),
        kv_len: 4,
    };
    assert!(Cpu.attention(&q, &k, &k, s).is_err());
}

#[test]
fn gather_slice_copy_argmax() {
    let mut rng = SplitMix64::new(6);
    let table = rand(&mut rng, 10, 4, 1.0);
    let e = Cpu.embedding(&table, &[3, 0, 9]).unwrap();
    assert_eq!(e.row(0), table.row(3));
    assert_eq!(e.row(2), table.row(9));
    assert!(Cpu.embedding(&table, &[10]).is_err());
    let s = Cpu.slice_rows(&table, 2, 3).unwrap();
    assert_eq!(s.row(0), table.row(2));
    assert!(Cpu.slice_rows(&table, 8, 3).is_err());
    let mut dst = Cpu.zeros(6, 4).unwrap();
    Cpu.copy_rows_into(&mut dst, 4, &s.clone()).unwrap_err();
    Cpu.copy_rows_into(&mut dst, 3, &s).unwrap();
    assert_eq!(dst.row(3), table.row(2));
    assert_eq!(dst.row(2), &[0.0; 4]);
    let t = CpuTensor::new(vec![1.0, 5.0, 5.0, -1.0, f32::NAN, 2.0, 0.5, 2.0], 2, 4).unwrap();
    assert_eq!(Cpu.argmax_rows(&t).unwrap(), vec![1, 1]);
}
