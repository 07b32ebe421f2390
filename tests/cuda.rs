//! The CUDA backend against the CPU reference: every op on fresh random inputs with
//! poisoned outputs, at small shapes and at LLaVA-7B's; then end to end on the fixtures.
//!
//! Without a GPU (CI, most dev machines) each GPU test prints why it is skipped and returns; the
//! tests that need no GPU — the embedded PTX, the error a missing GPU gives — always run. With
//! `FASTRM_REQUIRE_GPU=1` (the device check) a GPU test that cannot reach a GPU panics instead.
//!
//! Inputs go to the GPU first and come back rounded to the storage type, and the CPU op runs on
//! those rounded values, so the tolerances below measure the kernel (its f32 arithmetic and the
//! rounding of its output), not the rounding of the inputs.
//!
//! A build without both the `cuda` and `sim` features has no CUDA backend: nothing here is built.

#![cfg(any(feature = "cuda", feature = "sim"))]

mod common;

use std::io::Write;

use common::{assert_close, fixture_dir, fixture_image, pearson, Expected};
use fastrm::backend::cpu::Cpu;
use fastrm::backend::cuda::{self, Cuda, Elem};
use fastrm::backend::{AttnShape, Backend, Cam, KvStore, PagedRow};
use fastrm::engine::{ImageInput, Method, Request};
use fastrm::explain::fastrm::HeadWeights;
use fastrm::explain::RowMode;
use fastrm::util::SplitMix64;
use fastrm::{Engine, GenerateOptions};
use half::{bf16, f16};

/// Prints straight to the process's stderr (not the test harness's capture), so a skip shows
/// in every `cargo test` log.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The GPU when this machine has one; otherwise, in a `--features sim` build, the simulated
/// device (the backend's own launchers and the kernels' sources, run on the host); otherwise a
/// printed skip. Every allocation is poisoned.
fn gpu<T: Elem>(test: &str) -> Option<Cuda<T>> {
    let why = cuda::unavailable();
    // On the device machine a missing GPU or cuBLAS must fail the run, not pass it as skips.
    if let (Some(why), Ok("1")) = (&why, std::env::var("FASTRM_REQUIRE_GPU").as_deref()) {
        panic!("FASTRM_REQUIRE_GPU=1 but the GPU cannot be used: {why}");
    }
    let Some(why) = why else {
        return Some(
            Cuda::<T>::new(0)
                .unwrap_or_else(|e| panic!("a GPU is visible but the backend failed: {e}"))
                .poisoned(),
        );
    };
    #[cfg(feature = "sim")]
    {
        let _ = writeln!(
            std::io::stderr(),
            "SIMULATED {test}: {why}; running on the host simulator"
        );
        Some(Cuda::<T>::simulated().poisoned())
    }
    #[cfg(not(feature = "sim"))]
    {
        skip(
            test,
            &format!("{why} (build with --features sim to run it on the simulator)"),
        );
        None
    }
}

/// Output tolerance (max |Δ| / max |want|) for each storage type: f32 leaves only summation
/// order; f16 and bf16 round every output once (2^-11, 2^-8) plus what their inputs carried.
fn tol<T: Elem>() -> f32 {
    match T::NAME {
        "f32" => 2e-5,
        "f16" => 4e-3,
        _ => 3e-2,
    }
}

fn rand(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * rng.uniform_sym()).collect()
}

/// The same values on both backends: uploaded to the GPU, then what the GPU holds (rounded to
/// `T`) uploaded to the CPU.
struct Pair<T: Elem> {
    g: fastrm::backend::cuda::CudaTensor<T>,
    c: fastrm::backend::cpu::CpuTensor,
}

fn pair<T: Elem>(g: &Cuda<T>, data: &[f32], rows: usize, cols: usize) -> Pair<T> {
    let gt = g.upload(data, rows, cols).unwrap();
    let back = g.download(&gt).unwrap();
    Pair {
        c: Cpu.upload(&back, rows, cols).unwrap(),
        g: gt,
    }
}

fn check<T: Elem>(
    what: &str,
    g: &Cuda<T>,
    got: &fastrm::backend::cuda::CudaTensor<T>,
    want: &fastrm::backend::cpu::CpuTensor,
) {
    assert_eq!(g.dims(got), Cpu.dims(want), "{what}: shape");
    let got = g.download(got).unwrap();
    let want = Cpu.download(want).unwrap();
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output (an element never written?)"
    );
    assert_close(&format!("{what} [{}]", T::NAME), &got, &want, tol::<T>());
}

fn ops<T: Elem>(test: &str) {
    let Some(g) = gpu::<T>(test) else { return };
    let mut rng = SplitMix64::new(0xC0DA ^ T::NAME.len() as u64);
    let r = &mut rng;
    // LLaVA-7B's shapes on a GPU; on the simulator (one CPU core per launch), shapes that still
    // span several blocks, splits and warps but finish in seconds.
    let gpu_size = !g.is_simulated();
    let pick = |real: usize, sim: usize| if gpu_size { real } else { sim };

    // Products: small odd shapes and LLaVA-7B's decode and prefill shapes.
    // Up to four rows take the decode GEMV kernel (16-byte loads where every row is a multiple
    // of 16 bytes, as 264 and 72 columns are in each storage type; element loads at 17 and 300
    // columns in f16), more take cuBLAS; each product runs both ways.
    let products = if gpu_size {
        [
            (3, 17, 5),
            (1, 4096, 11008),
            (1, 11008, 4096),
            (4, 72, 9),
            (616, 4096, 4096),
        ]
    } else {
        [
            (3, 17, 5),
            (1, 300, 700),
            (1, 264, 70),
            (4, 72, 9),
            (37, 130, 260),
        ]
    };
    for &(m, k, n) in &products {
        let x = pair(&g, &rand(r, m * k, 1.0), m, k);
        let w = pair(&g, &rand(r, n * k, 0.05), n, k);
        let b = pair(&g, &rand(r, n, 1.0), 1, n);
        for gemv in [true, false] {
            g.set_gemv(gemv);
            let path = if gemv { "gemv" } else { "cuBLAS" };
            check(
                &format!("linear {m}x{k}x{n} ({path})"),
                &g,
                &g.linear(&x.g, &w.g, Some(&b.g)).unwrap(),
                &Cpu.linear(&x.c, &w.c, Some(&b.c)).unwrap(),
            );
            check(
                &format!("linear {m}x{k}x{n} without bias ({path})"),
                &g,
                &g.linear(&x.g, &w.g, None).unwrap(),
                &Cpu.linear(&x.c, &w.c, None).unwrap(),
            );
        }
        g.set_gemv(true);
        // The same x by two and three weights of different heights: one grouped launch (≤ 4
        // rows, fused) or separate linears, each against the CPU's separate products.
        let ws: Vec<Pair<T>> = [n, n + 3, 2 * n + 1]
            .iter()
            .map(|&rows| pair(&g, &rand(r, rows * k, 0.05), rows, k))
            .collect();
        for count in [2, 3] {
            for fuse in [true, false] {
                g.set_fuse(fuse);
                let gw: Vec<_> = ws[..count].iter().map(|w| &w.g).collect();
                let got = g.linear_group(&x.g, &gw).unwrap();
                assert_eq!(got.len(), count);
                for (i, (y, w)) in got.iter().zip(&ws).enumerate() {
                    check(
                        &format!("linear_group {m}x{k} weight {i} of {count} (fuse {fuse})"),
                        &g,
                        y,
                        &Cpu.linear(&x.c, &w.c, None).unwrap(),
                    );
                }
            }
        }
        g.set_fuse(true);
        let narrow = pair(&g, &rand(r, n * (k + 1), 0.05), n, k + 1);
        let err = g.linear_group(&x.g, &[&ws[0].g, &narrow.g]);
        assert!(
            err.as_ref()
                .is_err_and(|e| e.to_string().contains("linear")),
            "a weight of another width is a shape error"
        );
        let dy = pair(&g, &rand(r, m * n, 1.0), m, n);
        check(
            &format!("linear_bwd {m}x{k}x{n}"),
            &g,
            &g.linear_bwd(&dy.g, &w.g).unwrap(),
            &Cpu.linear_bwd(&dy.c, &w.c).unwrap(),
        );
        check(
            &format!("linear_wgrad {m}x{k}x{n}"),
            &g,
            &g.linear_wgrad(&dy.g, &x.g).unwrap(),
            &Cpu.linear_wgrad(&dy.c, &x.c).unwrap(),
        );
        let bm = pair(&g, &rand(r, k * n, 0.05), k, n);
        check(
            &format!("matmul {m}x{k}x{n}"),
            &g,
            &g.matmul(&x.g, &bm.g).unwrap(),
            &Cpu.matmul(&x.c, &bm.c).unwrap(),
        );
    }

    for &(rows, cols) in &[(5, 33), (1, 4096), (pick(616, 40), pick(4096, 1000))] {
        let x = pair(&g, &rand(r, rows * cols, 2.0), rows, cols);
        let y = pair(&g, &rand(r, rows * cols, 2.0), rows, cols);
        let row = pair(&g, &rand(r, cols, 1.0), 1, cols);
        let w = pair(
            &g,
            &(0..cols)
                .map(|_| 1.0 + 0.2 * r.uniform_sym())
                .collect::<Vec<_>>(),
            1,
            cols,
        );
        let s = format!("{rows}x{cols}");
        check(
            &format!("add {s}"),
            &g,
            &g.add(&x.g, &y.g).unwrap(),
            &Cpu.add(&x.c, &y.c).unwrap(),
        );
        check(
            &format!("add row {s}"),
            &g,
            &g.add(&x.g, &row.g).unwrap(),
            &Cpu.add(&x.c, &row.c).unwrap(),
        );
        check(
            &format!("rms_norm {s}"),
            &g,
            &g.rms_norm(&x.g, &w.g, 1e-5).unwrap(),
            &Cpu.rms_norm(&x.c, &w.c, 1e-5).unwrap(),
        );
        let (g_sum, g_norm) = g.add_rms_norm(&x.g, &y.g, &w.g, 1e-5).unwrap();
        let (c_sum, c_norm) = Cpu.add_rms_norm(&x.c, &y.c, &w.c, 1e-5).unwrap();
        check(&format!("add_rms_norm sum {s}"), &g, &g_sum, &c_sum);
        check(&format!("add_rms_norm norm {s}"), &g, &g_norm, &c_norm);
        check(
            &format!("layer_norm {s}"),
            &g,
            &g.layer_norm(&x.g, &w.g, &row.g, 1e-5).unwrap(),
            &Cpu.layer_norm(&x.c, &w.c, &row.c, 1e-5).unwrap(),
        );
        check(
            &format!("gelu {s}"),
            &g,
            &g.gelu(&x.g).unwrap(),
            &Cpu.gelu(&x.c).unwrap(),
        );
        check(
            &format!("quick_gelu {s}"),
            &g,
            &g.quick_gelu(&x.g).unwrap(),
            &Cpu.quick_gelu(&x.c).unwrap(),
        );
        check(
            &format!("silu_mul {s}"),
            &g,
            &g.silu_mul(&x.g, &y.g).unwrap(),
            &Cpu.silu_mul(&x.c, &y.c).unwrap(),
        );
        check(
            &format!("sum_rows {s}"),
            &g,
            &g.sum_rows(&x.g).unwrap(),
            &Cpu.sum_rows(&x.c).unwrap(),
        );
        let dy = pair(&g, &rand(r, rows * cols, 1.0), rows, cols);
        check(
            &format!("rms_norm_bwd {s}"),
            &g,
            &g.rms_norm_bwd(&x.g, &w.g, &dy.g, 1e-5).unwrap(),
            &Cpu.rms_norm_bwd(&x.c, &w.c, &dy.c, 1e-5).unwrap(),
        );
        let (gd, gu) = g.silu_mul_bwd(&x.g, &y.g, &dy.g).unwrap();
        let (cd, cu) = Cpu.silu_mul_bwd(&x.c, &y.c, &dy.c).unwrap();
        check(&format!("silu_mul_bwd dgate {s}"), &g, &gd, &cd);
        check(&format!("silu_mul_bwd dup {s}"), &g, &gu, &cu);
        let (gx, gw, gb) = g.layer_norm_bwd(&x.g, &w.g, &dy.g, 1e-5).unwrap();
        let (cx, cw, cb) = Cpu.layer_norm_bwd(&x.c, &w.c, &dy.c, 1e-5).unwrap();
        check(&format!("layer_norm_bwd dx {s}"), &g, &gx, &cx);
        check(&format!("layer_norm_bwd dw {s}"), &g, &gw, &cw);
        check(&format!("layer_norm_bwd db {s}"), &g, &gb, &cb);
    }

    // RoPE far into the sequence, where the angle's rounding matters most.
    for &(rows, heads, hd, pos0) in &[
        (3, 2, 8, 0),
        (pick(616, 40), pick(32, 4), 128, 0),
        (1, 32, 128, 3000),
    ] {
        let x = pair(&g, &rand(r, rows * heads * hd, 1.0), rows, heads * hd);
        let s = format!("{rows}x{heads}x{hd}@{pos0}");
        check(
            &format!("rope {s}"),
            &g,
            &g.rope(&x.g, hd, pos0, 10000.0).unwrap(),
            &Cpu.rope(&x.c, hd, pos0, 10000.0).unwrap(),
        );
        // Queries and keys in one launch (keys with half the heads, as grouped queries have).
        let kh = heads.div_ceil(2);
        let k = pair(&g, &rand(r, rows * kh * hd, 1.0), rows, kh * hd);
        let positions: Vec<u32> = (pos0 as u32..(pos0 + rows) as u32).collect();
        let (gq, gk) = g.rope_qk(&x.g, &k.g, hd, &positions, 10000.0).unwrap();
        check(
            &format!("rope_qk q {s}"),
            &g,
            &gq,
            &Cpu.rope(&x.c, hd, pos0, 10000.0).unwrap(),
        );
        check(
            &format!("rope_qk k {s}"),
            &g,
            &gk,
            &Cpu.rope(&k.c, hd, pos0, 10000.0).unwrap(),
        );
        check(
            &format!("rope_bwd {s}"),
            &g,
            &g.rope_bwd(&x.g, hd, pos0, 10000.0).unwrap(),
            &Cpu.rope_bwd(&x.c, hd, pos0, 10000.0).unwrap(),
        );
    }

    // Attention: both kernels paths (≤ 8 queries: flash-decoding; more: cuBLAS + softmax),
    // causal and not, grouped queries, and LLaVA-7B's prefill and decode.
    // (n_q, kv_rows, heads, kv_heads, head_dim, causal q_pos0)
    type Case = (usize, usize, usize, usize, usize, Option<usize>);
    let cases: &[Case] = &[
        // (n_q, kv_rows, heads, kv_heads, head_dim, causal q_pos0)
        (5, 5, 4, 2, 16, Some(0)),
        (1, 300, 4, 2, 16, Some(299)),
        // Rows of 12 values are not whole 16-byte packs in any storage type: element loads.
        (2, 300, 4, 2, 12, Some(298)),
        (3, 301, 8, 8, 64, Some(298)),
        (
            pick(577, 50),
            pick(577, 50),
            pick(16, 4),
            pick(16, 4),
            64,
            None,
        ),
        (
            pick(616, 40),
            pick(616, 40),
            pick(32, 4),
            pick(32, 2),
            128,
            Some(0),
        ),
        (1, 700, pick(32, 4), pick(32, 4), 128, Some(615)),
    ];
    for &(nq, kvr, h, hk, d, causal) in cases {
        let kv_len = causal.map_or(kvr, |p| p + nq).min(kvr);
        let q = pair(&g, &rand(r, nq * h * d, 1.0), nq, h * d);
        let k = pair(&g, &rand(r, kvr * hk * d, 1.0), kvr, hk * d);
        let v = pair(&g, &rand(r, kvr * hk * d, 1.0), kvr, hk * d);
        let shape = AttnShape {
            n_heads: h,
            n_kv_heads: hk,
            head_dim: d,
            causal_q_pos0: causal,
            kv_len,
        };
        check(
            &format!("attention q{nq} kv{kv_len} h{h}/{hk} d{d} {causal:?}"),
            &g,
            &g.attention(&q.g, &k.g, &v.g, shape).unwrap(),
            &Cpu.attention(&q.c, &k.c, &v.c, shape).unwrap(),
        );
        // The backward with both cams (the baseline's and GradCAM's), on the same inputs.
        let dout = pair(&g, &rand(r, nq * h * d, 1.0), nq, h * d);
        for cam in [Cam::Chefer, Cam::GradCam] {
            let gg = g
                .attention_bwd(&q.g, &k.g, &v.g, &dout.g, shape, Some(cam))
                .unwrap();
            let cg = Cpu
                .attention_bwd(&q.c, &k.c, &v.c, &dout.c, shape, Some(cam))
                .unwrap();
            let s = format!("attention_bwd q{nq} kv{kv_len} h{h}/{hk} d{d} {causal:?} {cam:?}");
            check(&format!("{s} dq"), &g, &gg.dq, &cg.dq);
            check(&format!("{s} dk"), &g, &gg.dk, &cg.dk);
            check(&format!("{s} dv"), &g, &gg.dv, &cg.dv);
            check(
                &format!("{s} cam"),
                &g,
                gg.cam.as_ref().unwrap(),
                cg.cam.as_ref().unwrap(),
            );
        }
        // Hidden keys (fastrm eval's perturbation): about a third of them, on both paths.
        let keep: Vec<bool> = (0..kvr).map(|_| !r.next_u64().is_multiple_of(3)).collect();
        check(
            &format!("attention_masked q{nq} kv{kv_len} h{h}/{hk} d{d} {causal:?}"),
            &g,
            &g.attention_masked(&q.g, &k.g, &v.g, shape, &keep).unwrap(),
            &Cpu.attention_masked(&q.c, &k.c, &v.c, shape, &keep)
                .unwrap(),
        );
    }

    // A batched decode step's RoPE: every row at its own position.
    {
        let (rows, heads, hd) = (5, 4, 16);
        let positions = [7u32, 0, 300, 3000, 8];
        let q = pair(&g, &rand(r, rows * heads * hd, 1.0), rows, heads * hd);
        let k = pair(&g, &rand(r, rows * 2 * hd, 1.0), rows, 2 * hd);
        let (gq, gk) = g.rope_qk(&q.g, &k.g, hd, &positions, 10000.0).unwrap();
        let (cq, ck) = Cpu.rope_qk(&q.c, &k.c, hd, &positions, 10000.0).unwrap();
        check("rope_qk at row positions q", &g, &gq, &cq);
        check("rope_qk at row positions k", &g, &gk, &ck);
        // The same rotation with the keys and values written into pool rows (a decode step's
        // cache writes): one fused launch, and the op-by-op path, against the CPU; every pool
        // row the slots do not name keeps its value.
        let v = pair(&g, &rand(r, rows * 2 * hd, 1.0), rows, 2 * hd);
        let slots = [40u32, 3, 17, 0, 63];
        for fused in [true, false] {
            g.set_fuse(fused);
            let kp = pair(&g, &rand(r, 64 * 2 * hd, 1.0), 64, 2 * hd);
            let vp = pair(&g, &rand(r, 64 * 2 * hd, 1.0), 64, 2 * hd);
            let (mut kg, mut kc, mut vg, mut vc) = (kp.g, kp.c, vp.g, vp.c);
            fn store<B: Backend>(
                b: &B,
                [q, k, v]: [&B::Tensor; 3],
                (keys, values): (&mut B::Tensor, &mut B::Tensor),
                (head_dim, positions): (usize, &[u32]),
                slots: &[u32],
            ) -> B::Tensor {
                let dst = KvStore {
                    keys,
                    values,
                    slots,
                };
                b.rope_qk_store(q, k, v, head_dim, positions, 1e4, dst)
                    .unwrap()
            }
            let before = g.launch_count();
            let at = (hd, &positions[..]);
            let gq = store(&g, [&q.g, &k.g, &v.g], (&mut kg, &mut vg), at, &slots);
            assert_eq!(g.launch_count() - before, if fused { 1 } else { 3 });
            let cq = store(&Cpu, [&q.c, &k.c, &v.c], (&mut kc, &mut vc), at, &slots);
            let s = format!("rope_qk_store (fused {fused})");
            check(&format!("{s} q"), &g, &gq, &cq);
            check(&format!("{s} key pool"), &g, &kg, &kc);
            check(&format!("{s} value pool"), &g, &vg, &vc);
        }
        g.set_fuse(true);
    }

    // Keys and values into their pages, and the paged decode attention over them: rows of
    // different lengths (one page and a bit, many pages, a single key), pages out of order,
    // grouped queries, and head sizes on both load paths (16-byte packs, and elements).
    for &(h, hk, d) in &[(4, 2, 16), (4, 2, 12), (pick(32, 4), pick(32, 4), 128)] {
        let page = 16;
        let pool_rows = 40 * page;
        let (kw, qw) = (hk * d, h * d);
        let kp = pair(&g, &rand(r, pool_rows * kw, 1.0), pool_rows, kw);
        let vp = pair(&g, &rand(r, pool_rows * kw, 1.0), pool_rows, kw);
        let (mut kg, mut kc, mut vg, mut vc) = (kp.g, kp.c, vp.g, vp.c);
        let tables: [Vec<u32>; 4] = [
            vec![3, 9],
            (10..30).rev().collect(),
            vec![0],
            vec![31, 2, 35],
        ];
        let lens = [17usize, 300, 1, 40];
        // This step's rows: each sequence's last key and value, scattered into its page.
        let slots: Vec<u32> = tables
            .iter()
            .zip(lens)
            .map(|(t, n)| t[(n - 1) / page] * page as u32 + ((n - 1) % page) as u32)
            .collect();
        let nk = pair(&g, &rand(r, 4 * kw, 1.0), 4, kw);
        let nv = pair(&g, &rand(r, 4 * kw, 1.0), 4, kw);
        g.scatter_rows(&mut kg, &slots, &nk.g).unwrap();
        Cpu.scatter_rows(&mut kc, &slots, &nk.c).unwrap();
        g.scatter_rows(&mut vg, &slots, &nv.g).unwrap();
        Cpu.scatter_rows(&mut vc, &slots, &nv.c).unwrap();
        check(&format!("scatter_rows d{d}"), &g, &kg, &kc);
        let rows: Vec<PagedRow<'_>> = tables
            .iter()
            .zip(lens)
            .map(|(t, len)| PagedRow { pages: t, len })
            .collect();
        let q = pair(&g, &rand(r, 4 * qw, 1.0), 4, qw);
        let shape = AttnShape {
            n_heads: h,
            n_kv_heads: hk,
            head_dim: d,
            causal_q_pos0: None,
            kv_len: 0,
        };
        let got = g
            .paged_attention(&q.g, &kg, &vg, &rows, page, shape)
            .unwrap();
        check(
            &format!("paged_attention h{h}/{hk} d{d}"),
            &g,
            &got,
            &Cpu.paged_attention(&q.c, &kc, &vc, &rows, page, shape)
                .unwrap(),
        );
        // A row alone gives the numbers it gives in the batch, bit for bit.
        let all = g.download(&got).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let qi = g.slice_rows(&q.g, i, 1).unwrap();
            let alone = g
                .paged_attention(&qi, &kg, &vg, &[*row], page, shape)
                .unwrap();
            assert_eq!(
                g.download(&alone).unwrap(),
                all[i * qw..(i + 1) * qw],
                "paged_attention row {i} alone differs from its batch"
            );
        }
    }

    // The fused FastRM step at LLaVA-7B's sizes, and a small odd one.
    for &(m, dm, p) in &[(2, 40, 9), (1, 4096, 576)] {
        let x = pair(&g, &rand(r, m * dm, 3.0), m, dm);
        let lw = pair(
            &g,
            &(0..dm)
                .map(|_| 1.0 + 0.2 * r.uniform_sym())
                .collect::<Vec<_>>(),
            1,
            dm,
        );
        let lb = pair(&g, &rand(r, dm, 0.2), 1, dm);
        let folded = pair(&g, &rand(r, p * dm, 0.05), p, dm);
        let c = pair(&g, &rand(r, p, 1.0), 1, p);
        check(
            &format!("fastrm_scores {m}x{dm}x{p}"),
            &g,
            &g.fastrm_scores(&x.g, &lw.g, &lb.g, 1e-5, &folded.g, &c.g, 0.125)
                .unwrap(),
            &Cpu.fastrm_scores(&x.c, &lw.c, &lb.c, 1e-5, &folded.c, &c.c, 0.125)
                .unwrap(),
        );
    }

    // Gathers and copies are exact.
    let table = pair(&g, &rand(r, 50 * 24, 1.0), 50, 24);
    let ids = [3u32, 0, 49, 3, 17];
    assert_eq!(
        g.download(&g.embedding(&table.g, &ids).unwrap()).unwrap(),
        Cpu.download(&Cpu.embedding(&table.c, &ids).unwrap())
            .unwrap(),
        "embedding"
    );
    assert!(
        g.embedding(&table.g, &[50]).is_err(),
        "embedding: id past the vocabulary"
    );
    let sl = g.slice_rows(&table.g, 7, 5).unwrap();
    assert_eq!(
        g.download(&sl).unwrap(),
        Cpu.download(&Cpu.slice_rows(&table.c, 7, 5).unwrap())
            .unwrap(),
        "slice_rows"
    );
    let mut dst = g.zeros(20, 24).unwrap();
    let mut cdst = Cpu.zeros(20, 24).unwrap();
    g.copy_rows_into(&mut dst, 11, &sl).unwrap();
    Cpu.copy_rows_into(&mut cdst, 11, &Cpu.slice_rows(&table.c, 7, 5).unwrap())
        .unwrap();
    assert_eq!(
        g.download(&dst).unwrap(),
        Cpu.download(&cdst).unwrap(),
        "copy_rows_into"
    );
    assert!(
        g.copy_rows_into(&mut dst, 16, &sl).is_err(),
        "copy_rows_into past the end"
    );

    // argmax: ties go to the first maximum, as torch.argmax, within a block's stretch of the row
    // (row 0), across stretches (row 2: 2000 and 31000 lie in different splits), at the row's
    // end (row 1); NaN never wins (row 3 has one before its maximum, row 4 is all NaN: index 0).
    let v = 32064;
    let mut a = rand(r, 5 * v, 1.0);
    a[5] = 9.0;
    a[900] = 9.0;
    a[v + v - 1] = 5.0;
    a[2 * v + 2000] = 7.0;
    a[2 * v + 31000] = 7.0;
    a[3 * v + 10] = f32::NAN;
    a[3 * v + 20000] = 8.0;
    a[4 * v..5 * v].fill(f32::NAN);
    let at = pair(&g, &a, 5, v);
    assert_eq!(
        g.argmax_rows(&at.g).unwrap(),
        Cpu.argmax_rows(&at.c).unwrap(),
        "argmax_rows"
    );
    assert_eq!(
        g.argmax_rows(&at.g).unwrap(),
        [5, v as u32 - 1, 2000, 20000, 0],
        "argmax_rows ties and NaN"
    );
    // Rows narrower than one split, and one wider than 256 full splits (the split widens).
    for cols in [1usize, 300, 1025, 300_001] {
        let mut a = rand(r, 2 * cols, 1.0);
        a[cols - 1] = 3.0;
        a[cols] = 3.0;
        let at = pair(&g, &a, 2, cols);
        let want = Cpu.argmax_rows(&at.c).unwrap();
        assert_eq!(want, [cols as u32 - 1, 0]);
        assert_eq!(
            g.argmax_rows(&at.g).unwrap(),
            want,
            "argmax_rows over {cols}"
        );
    }

    // Synthetic weights: the same generator on both sides.
    let gu = g
        .download(&g.uniform(7, 129, 42, 1.0, 0.1).unwrap())
        .unwrap();
    let cu = Cpu
        .download(&Cpu.uniform(7, 129, 42, 1.0, 0.1).unwrap())
        .unwrap();
    let want: Vec<f32> = cu.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    assert_eq!(gu, want, "uniform");

    // Shape errors are errors, not faults.
    assert!(g.linear(&table.g, &table.g, None).is_ok());
    assert!(g.matmul(&table.g, &table.g).is_err());
    assert!(g.add(&table.g, &sl).is_err());
}

#[test]
fn ops_f32() {
    ops::<f32>("ops_f32");
}

#[test]
fn ops_f16() {
    ops::<f16>("ops_f16");
}

#[test]
fn ops_bf16() {
    ops::<bf16>("ops_bf16");
}

/// Teacher-forced logits and hidden states of the `tiny` fixture on the GPU against the CPU,
/// and the greedy ids against the oracle.
fn end_to_end<T: Elem>(test: &str, tol: f32) {
    let Some(g) = gpu::<T>(test) else { return };
    let exp = Expected::load("tiny");
    let dir = fixture_dir("tiny");
    let gpu_engine = Engine::load(g, &dir).unwrap();
    let cpu_engine = Engine::load(Cpu, &dir).unwrap();
    let ids = exp.ids("input_ids");
    let want_gen = exp.ids("generated_ids");
    let (_, px) = exp.f32("pixel_values");
    let mut full = ids.clone();
    full.extend_from_slice(&want_gen[..want_gen.len() - 1]);
    let gb = gpu_engine.backend();
    let gh = gpu_engine.model().forward_full(gb, &full, px).unwrap();
    let ch = cpu_engine.model().forward_full(&Cpu, &full, px).unwrap();
    assert_close(
        &format!("{test} hidden"),
        &gb.download(&gh).unwrap(),
        &Cpu.download(&ch).unwrap(),
        tol,
    );
    let gl = gpu_engine.model().llm.logits(gb, &gh).unwrap();
    let cl = cpu_engine.model().llm.logits(&Cpu, &ch).unwrap();
    assert_close(
        &format!("{test} logits"),
        &gb.download(&gl).unwrap(),
        &Cpu.download(&cl).unwrap(),
        tol,
    );
    if T::NAME == "f32" {
        let question = &exp.meta["question"];
        let opts = GenerateOptions {
            max_new_tokens: want_gen.len(),
            ..Default::default()
        };
        let out = gpu_engine
            .generate(
                &Request::question(fixture_image("tiny"), question.as_str()),
                &opts,
            )
            .unwrap();
        assert_eq!(
            out.generated_ids, want_gen,
            "{test}: greedy ids against the oracle"
        );
    }
}

/// LLaVA-NeXT on the device: two pictures of different sizes tiled, packed (the newline rows
/// gathered in) and answered as transformers does (the `next` fixture).
#[test]
fn next_end_to_end_f32() {
    let test = "next_end_to_end_f32";
    let Some(g) = gpu::<f32>(test) else { return };
    let exp = Expected::load("next");
    let dir = fixture_dir("next");
    let engine = Engine::load(g, &dir).unwrap();
    let b = engine.backend();
    let images = ["panorama.png", "tall.png"].map(|f| ImageInput::Path(dir.join(f)));
    let req = Request::Chat {
        turns: vec![fastrm::text::Turn::new(
            fastrm::text::Role::User,
            2,
            exp.meta["question"].as_str(),
        )],
        images: images.to_vec(),
    };
    let (prompt, pixels) = engine.resolve(&req).unwrap();
    assert_eq!(prompt.ids(), exp.ids("two_sizes.input_ids"));
    let feats = engine
        .model()
        .encode_images(b, &pixels, prompt.layouts())
        .unwrap();
    let got: Vec<f32> = feats.iter().flat_map(|f| b.download(f).unwrap()).collect();
    let (_, want) = exp.f32("two_sizes.image_features");
    assert_close(&format!("{test} image features"), &got, want, 1e-4);
    let gen = exp.ids("two_sizes.generated_ids");
    let opts = GenerateOptions {
        max_new_tokens: gen.len(),
        stop_at_eos: false,
        ..Default::default()
    };
    let out = engine.generate(&req, &opts).unwrap();
    assert_eq!(
        out.generated_ids, gen,
        "{test}: greedy ids against the oracle"
    );
}

#[test]
fn end_to_end_f32() {
    end_to_end::<f32>("end_to_end_f32", 1e-4);
}

#[test]
fn end_to_end_f16() {
    end_to_end::<f16>("end_to_end_f16", 3e-2);
}

#[test]
fn end_to_end_bf16() {
    end_to_end::<bf16>("end_to_end_bf16", 1e-1);
}

/// FastRM maps from the fused kernel on the GPU against the CPU head, token by token, on the
/// same forced answer (Pearson ≥ 0.999).
fn fastrm_maps<T: Elem>(test: &str) {
    let Some(g) = gpu::<T>(test) else { return };
    let exp = Expected::load("tiny");
    let dir = fixture_dir("tiny");
    let mut gpu_engine = Engine::load(g, &dir).unwrap();
    let mut cpu_engine = Engine::load(Cpu, &dir).unwrap();
    let d = cpu_engine.config().text.hidden_size;
    let head = HeadWeights::random(d, d, 3);
    gpu_engine.set_head(&head).unwrap();
    cpu_engine.set_head(&head).unwrap();
    let image = fixture_image("tiny");
    let question = exp.meta["question"].clone();
    let req = Request::question(image, question);
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop_at_eos: false,
        ..Default::default()
    };
    let ge = gpu_engine
        .explain(&req, &opts, Method::FastRm, &mut |_| {})
        .unwrap();
    let ce = cpu_engine
        .explain(&req, &opts, Method::FastRm, &mut |_| {})
        .unwrap();
    assert_eq!(ge.tokens.len(), ce.tokens.len());
    for (gt, ct) in ge.tokens.iter().zip(&ce.tokens) {
        if gt.id != ct.id {
            // f16 can flip a near-tie in the tiny random model's logits; maps after a different
            // token are not comparable.
            break;
        }
        let p = pearson(&gt.map, &ct.map);
        assert!(
            p >= 0.999,
            "{test}: token {} map Pearson {p:.5} < 0.999",
            gt.index
        );
    }
}

#[test]
fn fastrm_maps_f32() {
    fastrm_maps::<f32>("fastrm_maps_f32");
}

#[test]
fn fastrm_maps_f16() {
    fastrm_maps::<f16>("fastrm_maps_f16");
}

/// Share of the top 10% patches of `want` that are also in the top 10% of `got`.
fn top10_overlap(got: &[f32], want: &[f32]) -> f64 {
    let k = (want.len() / 10).max(1);
    let top = |m: &[f32]| {
        let mut idx: Vec<usize> = (0..m.len()).collect();
        idx.sort_by(|&a, &b| m[b].total_cmp(&m[a]));
        idx.truncate(k);
        idx
    };
    let (a, b) = (top(got), top(want));
    b.iter().filter(|i| a.contains(i)).count() as f64 / k as f64
}

/// The baseline's maps (exact, incremental, GradCAM) from the GPU backward against the CPU's on
/// the `tiny` fixture (Pearson ≥ 0.99, top-10% overlap ≥ 0.9).
fn baseline_maps<T: Elem>(test: &str) {
    let Some(g) = gpu::<T>(test) else { return };
    let exp = Expected::load("tiny");
    let dir = fixture_dir("tiny");
    let gpu_engine = Engine::load(g, &dir).unwrap();
    let cpu_engine = Engine::load(Cpu, &dir).unwrap();
    let image = fixture_image("tiny");
    let question = exp.meta["question"].clone();
    let req = Request::question(image, question);
    let opts = GenerateOptions {
        max_new_tokens: 5,
        stop_at_eos: false,
        ..Default::default()
    };
    let methods = [
        Method::Baseline {
            mode: RowMode::Streamed,
        },
        Method::Baseline {
            mode: RowMode::FullR,
        },
        Method::BaselineIncremental,
        Method::GradCam { layer: 1 },
    ];
    for method in methods {
        let ge = gpu_engine
            .explain(&req, &opts, method, &mut |_| {})
            .unwrap();
        let ce = cpu_engine
            .explain(&req, &opts, method, &mut |_| {})
            .unwrap();
        for (gt, ct) in ge.tokens.iter().zip(&ce.tokens) {
            if gt.id != ct.id {
                break; // a flipped near-tie: later maps explain different tokens
            }
            let p = pearson(&gt.map, &ct.map);
            let o = top10_overlap(&gt.map, &ct.map);
            assert!(
                p >= 0.99 && o >= 0.9,
                "{test} {method:?} token {}: Pearson {p:.4}, top-10% overlap {o:.2}",
                gt.index
            );
        }
    }
}

#[test]
fn baseline_maps_f32() {
    baseline_maps::<f32>("baseline_maps_f32");
}

#[test]
fn baseline_maps_f16() {
    baseline_maps::<f16>("baseline_maps_f16");
}

/// Synthetic 7B weights are made on the device, and a short id-level generation runs. The
/// simulator, whose memory is the host's, makes the demo model's shapes instead.
#[test]
fn synthetic_7b_generates() {
    let Some(g) = gpu::<f16>("synthetic_7b_generates") else {
        return;
    };
    let cfg = if g.is_simulated() {
        let text =
            std::fs::read_to_string(common::repo_root().join("assets/demo/model/config.json"))
                .unwrap();
        fastrm::config::LlavaConfig::from_json_str(&text).unwrap()
    } else {
        fastrm::config::LlavaConfig::named("llava-1.5-7b").unwrap()
    };
    let engine = Engine::synthetic(g, &cfg, 0).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 3,
        stop_at_eos: false,
        ..Default::default()
    };
    let out = engine
        .generate(
            &Request::Ids {
                n_text: 40,
                seed: 0,
            },
            &opts,
        )
        .unwrap();
    assert_eq!(out.generated_ids.len(), 3);
    assert_eq!(out.input_ids.len(), 1 + cfg.vision.num_patches() + 40);
}

/// A decode step queues the same launches at every position (nothing in it grows with the
/// sequence; the split-K attention grows its grid, not its launch count), the fused launches save
/// six per layer, and a decode linear is one launch on the GEMV path where cuBLAS plus the bias
/// add would be two. What a CUDA graph of the step would hold: the same kernels and GEMMs in the
/// same order with the same shapes at every position, except the decode attention's grid, which
/// gains a split when the keys pass a 128-key chunk (the prompt is sized so the fused steps
/// cross one).
#[test]
fn decode_launches_do_not_grow() {
    let Some(g) = gpu::<f32>("decode_launches_do_not_grow") else {
        return;
    };
    let text =
        std::fs::read_to_string(common::repo_root().join("assets/demo/model/config.json")).unwrap();
    let cfg = fastrm::config::LlavaConfig::from_json_str(&text).unwrap();
    let engine = Engine::synthetic(g, &cfg, 0).unwrap();
    let b = engine.backend();
    let (prompt, pixels) = engine
        // 1 + 64 image + 60 text = 125 positions: the fused steps see 128 and then 129+ keys.
        .resolve(&Request::Ids {
            n_text: 60,
            seed: 1,
        })
        .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop_at_eos: false,
        ..Default::default()
    };
    let (_, image) = engine.model().encode_image(b, &pixels).unwrap();
    let mut s = fastrm::model::session::Session::prefill(
        b,
        engine.model(),
        prompt,
        &image,
        &opts,
        fastrm::model::session::Mode::Plain,
    )
    .unwrap();
    // Steps 1 and 2 one launch per op, the rest fused.
    let (mut per_step, mut logs, mut uploads) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        b.set_fuse(per_step.len() > 2);
        let before = b.launch_count();
        let uploads_before = b.upload_count();
        b.record_launches(true);
        let more = s.step().unwrap().is_some();
        let log = b.record_launches(false);
        if !more {
            break;
        }
        uploads.push(b.upload_count() - uploads_before);
        per_step.push(b.launch_count() - before);
        assert_eq!(log.len() as u64, per_step[per_step.len() - 1]);
        logs.push(log);
    }
    assert_eq!(per_step.len(), 6);
    let layers = cfg.text.num_hidden_layers as u64;
    // Fused: each layer's two residual adds ride on the norms after them, q, k, v are one launch
    // (3 -> 1) and so are gate and up (2 -> 1), and the keys and values go into the cache from
    // the RoPE launch (3 -> 1). (q and k always rotate in one launch.)
    assert_eq!(
        per_step[1] - per_step[3],
        7 * layers,
        "launches per step one per op vs fused: {per_step:?}"
    );
    assert_eq!(per_step[1], per_step[2], "{per_step:?}");
    // Step 0 only projects the prefill's last hidden state; steps 1.. are full decoder steps.
    let steps = &per_step[3..];
    assert!(
        steps.iter().all(|&n| n == steps[0]),
        "launches per decode step vary with position: {per_step:?}"
    );
    assert!(
        steps[0] >= 7 * layers,
        "a decode step of {layers} layers queued only {} launches",
        steps[0]
    );
    // A step's index arrays (ids, positions, cache slots, page tables, lengths) go to the device
    // once a step, whatever the number of layers (one upload per layer and array before).
    assert!(
        uploads[1..].iter().all(|&n| (1..=5).contains(&n)),
        "index uploads per decode step of {layers} layers: {uploads:?}"
    );
    let mut grid_changes = 0;
    for pair in logs[3..].windows(2) {
        let ops = |l: &[cuda::Launch]| l.iter().map(|x| x.op).collect::<Vec<_>>();
        assert_eq!(
            ops(&pair[0]),
            ops(&pair[1]),
            "decode steps queue different kernels"
        );
        for (a, z) in pair[0].iter().zip(&pair[1]) {
            if a != z {
                assert_eq!(
                    a.op, "attn_decode_fwd",
                    "{a:?} became {z:?} one position later"
                );
                grid_changes += 1;
            }
        }
    }
    assert_eq!(
        grid_changes, layers,
        "the decode attention's grid should gain a split once per layer across 128 keys"
    );

    let x = b.upload(&vec![0.5; 64], 1, 64).unwrap();
    let w = b.upload(&vec![0.25; 64 * 32], 32, 64).unwrap();
    let bias = b.upload(&[1.0; 32], 1, 32).unwrap();
    let count = |gemv: bool| {
        b.set_gemv(gemv);
        let before = b.launch_count();
        b.linear(&x, &w, Some(&bias)).unwrap();
        b.launch_count() - before
    };
    assert_eq!((count(true), count(false)), (1, 2));
}

// ---- The command line on the simulated device: rehearsals of what tools/device-check.sh runs.

#[cfg(feature = "sim")]
fn fastrm_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(args)
        .output()
        .unwrap()
}

/// `explain --device sim` (the CUDA backend's whole path from the command line: backend choice,
/// prefill, the fused head per token, the JSON) gives the CPU's answer and maps on the demo model.
#[cfg(feature = "sim")]
#[test]
fn cli_explain_on_the_simulator_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let mut maps = Vec::new();
    for device in ["sim", "cpu"] {
        let out = dir.path().join(device);
        common::cli_ok(&fastrm_cli(&[
            "explain",
            "--device",
            device,
            "--prompt",
            "What color is the star?",
            "--out",
            out.to_str().unwrap(),
        ]));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("explain.json")).unwrap()).unwrap();
        let want = if device == "sim" {
            "cuda:f16 (simulated"
        } else {
            "cpu"
        };
        assert!(
            json["device"].as_str().unwrap().starts_with(want),
            "{}",
            json["device"]
        );
        maps.push(json);
    }
    assert_eq!(maps[0]["generated_ids"], maps[1]["generated_ids"]);
    let (sim, cpu) = (common::maps_of(&maps[0]), common::maps_of(&maps[1]));
    assert!(!sim.is_empty());
    for (i, (s, c)) in sim.iter().zip(&cpu).enumerate() {
        // f16 storage on the simulator, f32 on the CPU.
        let p = pearson(s, c);
        assert!(p >= 0.999, "token {i}: Pearson {p:.5}");
    }
}

/// LLaVA-sized models are refused on the simulator up front, not run for hours.
#[cfg(feature = "sim")]
#[test]
fn cli_refuses_llava_sizes_on_the_simulator() {
    common::cli_fails(
        &fastrm_cli(&[
            "generate",
            "--device",
            "sim",
            "--model",
            "synthetic:llava-1.5-7b",
            "--prompt",
            "-",
        ]),
        &["simulated device", "--device cuda"],
    );
}

/// `profile --device sim` runs the profile's device branch (device-event clock, f16 engine,
/// synthetic model) and writes a well-formed report.
#[cfg(feature = "sim")]
#[test]
fn cli_profile_on_the_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("prof");
    common::cli_ok(&fastrm_cli(&[
        "profile",
        "--device",
        "sim",
        "--model",
        "synthetic:tiny",
        "--tokens",
        "2",
        "--methods",
        "generate,fastrm,baseline-incremental",
        "--out",
        out.to_str().unwrap(),
    ]));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("profile.json")).unwrap()).unwrap();
    assert_eq!(json["device"], "sim");
    assert_eq!(json["timer"], "CUDA events");
    assert!(json["backend"].as_str().unwrap().starts_with("cuda:f16"));
    // The weights held in f16: the lm_head's bytes are two per value. The simulator's times are
    // the host's, so no bandwidth and no floor.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("assets/demo/model/config.json"))
            .unwrap(),
    )
    .unwrap();
    let t = &cfg["text_config"];
    let head = 2 * t["vocab_size"].as_u64().unwrap() * t["hidden_size"].as_u64().unwrap();
    let r = &json["roofline"];
    assert_eq!(r["lm_head_bytes"].as_u64(), Some(head), "{r}");
    assert!(r["bandwidth_bytes_per_s"].is_null(), "{r}");
    let first = &json["runs"][0];
    assert!(first["decode_floor_share"].is_null(), "{first}");
    assert!(
        first["decode_bytes"].as_u64().unwrap() >= 2 * head,
        "{first}"
    );
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for r in runs {
        assert!(r["latency_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_memory_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    for f in ["profile.txt", "latency.png", "memory.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

// ---- No GPU needed.

/// The driver on the GPU hosts (580) accepts PTX ISA ≤ 9.0; every embedded module must say so
/// and target sm_80.
#[test]
fn embedded_ptx_fits_the_hosts_driver() {
    assert!(!cuda::PTX.is_empty());
    for (name, ptx) in cuda::PTX {
        let version = ptx
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))
            .unwrap_or_else(|| panic!("{name}.ptx has no .version"));
        assert_eq!(version.trim(), "9.0", "{name}.ptx PTX ISA");
        assert!(
            ptx.lines().any(|l| l.trim() == ".target sm_80"),
            "{name}.ptx target"
        );
        for dtype in ["f32", "f16", "bf16"] {
            assert!(
                ptx.contains(&format!("_{dtype}(")),
                "{name}.ptx lacks {dtype} kernels"
            );
        }
    }
}

/// Without a GPU, asking for one is an error that says what is missing — never a panic.
#[test]
fn no_gpu_is_a_clear_error() {
    let Some(why) = cuda::unavailable() else {
        skip("no_gpu_is_a_clear_error", "this machine has a GPU");
        return;
    };
    let e = Cuda::<f16>::new(0).err().expect("no GPU: an error");
    assert!(e.to_string().contains(&why), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["generate", "--device", "cuda", "--prompt", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "cuda") {
        assert!(
            err.contains("--device cuda") && err.contains("--device cpu"),
            "{err}"
        );
    } else {
        assert!(err.contains("rebuild with the `cuda` feature"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn masked_run<B: Backend>(
    e: &Engine<B>,
    prompt: &fastrm::model::session::Prompt,
    pixels: &[f32],
    opts: &GenerateOptions,
    keep: &[bool],
) -> fastrm::model::llava::IdGeneration {
    use fastrm::model::session::{Mode, Session};
    let (b, m) = (e.backend(), e.model());
    let (_, f) = m.encode_image(b, pixels).unwrap();
    let mode = Mode::Masked(keep.to_vec());
    let mut s = Session::prefill(b, m, prompt.clone(), &f, opts, mode).unwrap();
    s.run_to_end().unwrap();
    s.finish()
}

/// Eval's perturbation runs (image patches hidden from attention through a masked session) on
/// the device against the CPU: at f32 storage the same answers and each step's logits within 1e-4.
#[test]
fn masked_sessions_f32() {
    let test = "masked_sessions_f32";
    let Some(g) = gpu::<f32>(test) else { return };
    let dir = fixture_dir("tiny");
    let gpu_engine = Engine::load(g, &dir).unwrap();
    let cpu_engine = Engine::load(Cpu, &dir).unwrap();
    let req = Request::question(fixture_image("tiny"), "What is it?");
    let (prompt, pixels) = cpu_engine.resolve(&req).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 4,
        stop_at_eos: false,
        keep_steps: true,
        ..Default::default()
    };
    // Every other image patch hidden, then all of them.
    let img = prompt.image_positions().to_vec();
    let masks = [
        img.iter().step_by(2).copied().collect::<Vec<_>>(),
        img.clone(),
    ];
    for hidden in masks {
        let mut keep = vec![true; prompt.len()];
        hidden.iter().for_each(|&j| keep[j] = false);
        let gg = masked_run(&gpu_engine, &prompt, &pixels, &opts, &keep);
        let cg = masked_run(&cpu_engine, &prompt, &pixels, &opts, &keep);
        assert_eq!(
            gg.generated_ids,
            cg.generated_ids,
            "{test}: {} hidden",
            hidden.len()
        );
        for (k, (a, b)) in gg.step_logits.iter().zip(&cg.step_logits).enumerate() {
            assert_close(&format!("{test} step {k} logits"), a, b, 1e-4);
        }
    }
}

/// A device that runs out of memory mid-run fails as a full GPU does: the simulator's pool is
/// given room for the model but not for the run, and generation stops with
/// `Error::OutOfMemory` naming GPU memory (the error `CUDA_ERROR_OUT_OF_MEMORY` maps to).
#[cfg(feature = "sim")]
#[test]
fn device_out_of_memory_is_a_named_error() {
    let dir = fixture_dir("tiny");
    let exp = Expected::load("tiny");
    let request = Request::question(fixture_image("tiny"), exp.meta["question"].as_str());
    let opts = GenerateOptions {
        max_new_tokens: 4,
        ..Default::default()
    };
    // What loading and a whole run take, measured on an unbounded pool (both deterministic).
    let engine = Engine::load(Cuda::<f32>::simulated(), &dir).unwrap();
    let (_, loaded) = engine.backend().simulated_memory().unwrap();
    engine.generate(&request, &opts).unwrap();
    let (_, run) = engine.backend().simulated_memory().unwrap();
    assert!(run > loaded, "a run allocates beyond the weights");
    drop(engine);

    let budget = loaded + (run - loaded) / 2;
    let engine = Engine::load(Cuda::<f32>::simulated_with_memory(budget), &dir)
        .expect("the model alone fits the budget");
    match engine.generate(&request, &opts) {
        Err(fastrm::Error::OutOfMemory(msg)) => {
            assert!(msg.contains("GPU memory"), "{msg}")
        }
        Err(e) => panic!("expected OutOfMemory, got {e}"),
        Ok(_) => panic!("a run needing {run} bytes succeeded within {budget}"),
    }
    // What failed was freed: the pool holds what it held after loading.
    let (now, _) = engine.backend().simulated_memory().unwrap();
    assert!(now <= budget);

    // The command line: one `error:` line and a failing exit; a malformed budget is named.
    let cli = |memory: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fastrm"))
            .args(["generate", "--device", "sim", "--prompt", "What is it?"])
            .env("FASTRM_SIM_DEVICE_MEMORY", memory)
            .output()
            .unwrap()
    };
    common::cli_fails(&cli("100000"), &["out of memory", "GPU memory"]);
    common::cli_fails(&cli("lots"), &["FASTRM_SIM_DEVICE_MEMORY", "bytes"]);
}

/// The device run executes this binary prebuilt, from a copy of the tree in another folder:
/// `FASTRM_ROOT` must decide where the fixtures are, and every fixture the GPU tests read must be
/// there (`tools/stage-device.sh` runs this test from a copy before any device time is spent).
#[test]
fn the_fixtures_are_found_under_fastrm_root() {
    let root = common::repo_root();
    if let Some(r) = std::env::var_os("FASTRM_ROOT") {
        assert_eq!(
            root,
            std::path::PathBuf::from(r),
            "FASTRM_ROOT is not the root used"
        );
    }
    let tiny = fixture_dir("tiny");
    for f in ["config.json", "tokenizer.json", "expected.safetensors"] {
        let p = tiny.join(f);
        assert!(
            p.is_file(),
            "{} is missing (FASTRM_ROOT unset or wrong?)",
            p.display()
        );
    }
    assert!(fixture_image("tiny").is_file());
    Expected::load("tiny");
}
