//! CPU reference backend: prefill (vision tower + projector + decoder over the whole prompt) and
//! one decode step, on the mid-size config `benches/midsize_config.json` (336 px, 576 patches,
//! hidden 512, 8 layers) with synthetic weights. `tools/make_fixtures.py --bench` times
//! transformers on the same shapes; both numbers go in docs/PERF.md.
//!
//! `cargo bench --bench cpu_step`

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use fastrm::backend::cpu::Cpu;
use fastrm::backend::Backend;
use fastrm::config::LlavaConfig;
use fastrm::model::llama::KvCache;
use fastrm::Engine;

fn bench(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/midsize_config.json");
    let cfg = LlavaConfig::from_file(&path).expect("midsize config");
    let engine = Engine::synthetic(Cpu, &cfg, 1).expect("synthetic model");
    let (b, m) = (&engine.backend, &engine.model);
    // Prompt shaped like a LLaVA question: BOS, a few template ids, the image, a short question.
    let n_img = cfg.vision.num_patches();
    let mut ids: Vec<u32> = vec![cfg.bos_token_id, 3148, 1001, 29901];
    ids.extend(std::iter::repeat_n(cfg.image_token_id, n_img));
    ids.extend((0..24).map(|i| 400 + i));
    let s = cfg.vision.image_size;
    let pixels: Vec<f32> = (0..3 * s * s)
        .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
        .collect();
    eprintln!(
        "{} | prompt {} positions | {}",
        path.display(),
        ids.len(),
        b.name()
    );

    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    g.bench_function("prefill", |bench| {
        bench.iter(|| {
            let (_, img) = m.encode_image(b, &pixels).unwrap();
            let x = m.embed_prompt(b, &ids, &img).unwrap();
            let mut cache = KvCache::new(b, &cfg.text, ids.len() + 1).unwrap();
            let h = m.llm.forward(b, x, &mut cache).unwrap();
            let last = b.slice_rows(&h, ids.len() - 1, 1).unwrap();
            b.argmax_rows(&m.llm.logits(b, &last).unwrap()).unwrap()
        })
    });

    let (_, img) = m.encode_image(b, &pixels).unwrap();
    let x = m.embed_prompt(b, &ids, &img).unwrap();
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
