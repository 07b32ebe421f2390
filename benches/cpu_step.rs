//! CPU reference backend: prefill (vision tower + projector + decoder over the whole prompt) and
//! one decode step, on the mid-size config `benches/midsize_config.json` (336 px, 576 patches,
//! hidden 512, 8 layers) with synthetic weights: group `cpu` in f32, group `cpu_bf16` with the
//! same shapes stored as bf16 and read from the mapped file. `tools/make_fixtures.py --bench`
//! times transformers on the same shapes in f32 and bf16; `tools/cpu-vs-torch.sh` prints both.
//!
//! `cargo bench --bench cpu_step`

use criterion::{criterion_group, criterion_main, Criterion};
use fastrm::backend::Backend;
use fastrm::model::llama::KvCache;

mod common;

fn bench(c: &mut Criterion) {
    steps(c, "cpu", common::midsize());
    steps(c, "cpu_bf16", common::midsize_bf16());
}

fn steps(c: &mut Criterion, group: &str, setup: common::Midsize) {
    let common::Midsize {
        path,
        cfg,
        engine,
        ids,
        pixels,
    } = setup;
    let prompt = engine.model().prompt(ids.clone()).unwrap();
    let (b, m) = (engine.backend(), engine.model());
    eprintln!(
        "{} | prompt {} positions | {}",
        path.display(),
        ids.len(),
        b.name()
    );

    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.bench_function("prefill", |bench| {
        bench.iter(|| {
            let (_, img) = m.encode_image(b, &pixels).unwrap();
            let x = m.embed_prompt(b, &prompt, &img).unwrap();
            let mut cache = KvCache::new(b, &cfg.text, ids.len() + 1).unwrap();
            let h = m.llm.forward(b, x, &mut cache).unwrap();
            let last = b.slice_rows(&h, ids.len() - 1, 1).unwrap();
            b.argmax_rows(&m.llm.logits(b, &last).unwrap()).unwrap()
        })
    });

    let (_, img) = m.encode_image(b, &pixels).unwrap();
    let x = m.embed_prompt(b, &prompt, &img).unwrap();
    let mut cache = KvCache::new(b, &cfg.text, ids.len() + 1).unwrap();
    m.llm.forward(b, x, &mut cache).unwrap();
    let n = ids.len();
    g.bench_function("decode_step", |bench| {
        bench.iter(|| {
            // Each iteration is the step at position n: rewind and overwrite that cache row.
            cache.len = n;
            let x = b.embedding(&m.llm.embed, &[42]).unwrap();
            let h = m.llm.forward(b, x, &mut cache).unwrap();
            b.argmax_rows(&m.llm.logits(b, &h).unwrap()).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
