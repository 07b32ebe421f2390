//! Baseline relevancy on the CPU reference backend, per generated token, on the mid-size config
//! (`benches/midsize_config.json`: 336 px, 576 patches, hidden 512, 8 layers), synthetic weights:
//! - `exact_token`: one exact Chefer backward from the last prompt position (streamed row);
//! - `exact_token_full_r`: the same with every cam kept and R materialised (the paper's baseline);
//! - `incremental_token`: one later token of the LVLM-Interpret variant (a saving decode step plus
//!   its single-row backward and fold) beside `decode_step`, a plain decode step at the same position.
//!
//! It also prints the bytes of saved activations the backward holds. `tools/make_fixtures.py
//! --bench` times PyTorch autograd on the same shapes; both go in docs/PERF.md.
//!
//! `cargo bench --bench baseline`

use criterion::{criterion_group, criterion_main, Criterion};
use fastrm::backend::Backend;
use fastrm::explain::{chefer_row, Incremental, RowMode};

mod common;

fn bench(c: &mut Criterion) {
    let common::Midsize {
        cfg,
        engine,
        ids,
        pixels,
        ..
    } = common::midsize();
    let (b, m) = (engine.backend(), engine.model());
    let n = ids.len();
    let (_, img) = m.encode_image(b, &pixels).unwrap();
    let x = m
        .embed_prompt(b, &m.prompt(ids.clone()).unwrap(), &[&img])
        .unwrap();

    let mut cache = m.kv.admit(b, n + 1).unwrap();
    let (h, saved) = m.llm.forward_saving(b, x, &mut cache).unwrap();
    let last = b.slice_rows(&h, n - 1, 1).unwrap();
    let y = b.argmax_rows(&m.llm.logits(b, &last).unwrap()).unwrap()[0];
    let kv_bytes =
        2 * cfg.text.num_hidden_layers * n * cfg.text.num_key_value_heads * cfg.text.head_dim * 4;
    eprintln!(
        "prompt {n} positions | saved activations {:.1} MB (f32) | KV cache {:.1} MB",
        saved.f32_bytes(b) as f64 / 1e6,
        kv_bytes as f64 / 1e6
    );

    let mut g = c.benchmark_group("baseline");
    g.sample_size(10);
    g.bench_function("exact_token", |bench| {
        bench.iter(|| {
            chefer_row(
                b,
                &m.llm,
                &saved,
                &cache,
                n - 1,
                y,
                RowMode::Streamed,
                false,
            )
            .unwrap()
        })
    });
    g.bench_function("exact_token_full_r", |bench| {
        bench.iter(|| {
            chefer_row(b, &m.llm, &saved, &cache, n - 1, y, RowMode::FullR, false).unwrap()
        })
    });

    let (mut tracker, _) = Incremental::start(b, &m.llm, &saved, &cache, n, y, n + 1).unwrap();
    drop(saved);
    g.bench_function("incremental_token", |bench| {
        bench.iter(|| {
            // The step at position n each time: rewind the cache and the tracker's rows.
            cache.len = n;
            tracker.truncate(n);
            let x = b.embedding(&m.llm.embed, &[y]).unwrap();
            let (h, saved) = m.llm.forward_saving(b, x, &mut cache).unwrap();
            let next = b.argmax_rows(&m.llm.logits(b, &h).unwrap()).unwrap()[0];
            tracker.step(b, &m.llm, &saved, &cache, next).unwrap()
        })
    });
    g.bench_function("decode_step", |bench| {
        bench.iter(|| {
            cache.len = n;
            let x = b.embedding(&m.llm.embed, &[y]).unwrap();
            let h = m.llm.forward(b, x, &mut cache).unwrap();
            b.argmax_rows(&m.llm.logits(b, &h).unwrap()).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
