//! The FastRM head per generated token on the CPU backend at LLaVA-1.5-7B sizes (hidden 4096,
//! head dim 4096, 576 patches): the folded decode form (one fused op over `P = K·W_q`) against the
//! unfolded one (query projection, then scores against the keys), plus the once-per-prefill fold.
//!
//! `cargo bench --bench fastrm_head`

use criterion::{criterion_group, criterion_main, Criterion};
use fastrm::backend::cpu::{Cpu, CpuTensor};
use fastrm::explain::fastrm::{FastRmHead, HeadWeights};
use fastrm::util::SplitMix64;

fn bench(c: &mut Criterion) {
    let (dm, d, p) = (4096, 4096, 576);
    let w = HeadWeights::random(dm, d, 1);
    let head = FastRmHead::new(&Cpu, &w, dm).unwrap();
    let mut rng = SplitMix64::new(2);
    let image = CpuTensor::new((0..p * dm).map(|_| rng.uniform_sym()).collect(), p, dm).unwrap();
    let h = CpuTensor::new((0..dm).map(|_| rng.uniform_sym()).collect(), 1, dm).unwrap();
    let folded = head.fold(&Cpu, &image).unwrap();
    let keys = head.keys(&Cpu, &image).unwrap();

    let mut g = c.benchmark_group("fastrm_head_7b");
    g.sample_size(20);
    g.bench_function("token_folded", |b| {
        b.iter(|| head.scores(&Cpu, &folded, &h).unwrap())
    });
    g.bench_function("token_unfolded", |b| {
        b.iter(|| head.scores_unfolded(&Cpu, &keys, &h).unwrap())
    });
    g.sample_size(10);
    g.bench_function("fold_once_per_prefill", |b| {
        b.iter(|| head.fold(&Cpu, &image).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
