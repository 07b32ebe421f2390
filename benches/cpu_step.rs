//! CPU reference backend: prefill (vision tower + projector + decoder over the whole prompt) and
//! one decode step, on the mid-size config `benches/midsize_config.json` (336 px, 576 patches,
//! hidden 512, 8 layers) with synthetic weights: group `cpu` in f32, group `cpu_bf16` with the
//! same shapes stored as bf16 and read from the mapped file. `tools/make_fixtures.py --bench`
//! times transformers on the same shapes in f32 and bf16; `tools/cpu-vs-torch.sh` prints both.
//!
//! Group `cpu_batch`: one batched decode step (decoder and lm_head) of B = 1, 2, 4, 8, 16
//! sequences, each at its own position in the paged cache; throughput in tokens (rows) per second;
//! and the B = 8 step's parts: one layer's paged attention, the MLP's gate and up, the lm_head,
//! the eight rows' FastRM maps.
//!
//! Group `cpu_prefix`: a follow-up turn's time to first token, cold and with the prefix cache.
//! Group `cpu_batch_7b` (with `FASTRM_BENCH_7B=DIR`): the batched decode step at 7B shapes.
//!
//! `cargo bench --bench cpu_step`

use criterion::Throughput;
use criterion::{criterion_group, criterion_main, Criterion};
use fastrm::backend::{AttnShape, Backend, PagedRow};
use fastrm::explain::fastrm::{FastRmHead, HeadWeights};
use fastrm::model::kv::PAGE;

mod common;

/// One batched decode step (decoder, lm_head, argmax) of `seqs`, each at its last position:
/// rewound every call, so every call times the same step.
fn decode_step<B: Backend>(
    b: &B,
    m: &fastrm::model::Llava<B>,
    seqs: &mut [fastrm::model::kv::SeqKv<'_, B>],
) -> Vec<u32> {
    let mut batch: Vec<_> = seqs.iter_mut().collect();
    for s in batch.iter_mut() {
        s.len = s.capacity - 1;
    }
    let x = b.embedding(&m.llm.embed, &vec![42; batch.len()]).unwrap();
    let h = m.llm.decode(b, x, &mut batch).unwrap();
    b.argmax_rows(&m.llm.logits(b, &h).unwrap()).unwrap()
}

fn bench(c: &mut Criterion) {
    steps(c, "cpu", common::midsize());
    steps(c, "cpu_bf16", common::midsize_bf16());
    batched(c, common::midsize());
    follow_up(c, common::midsize());
    batched_7b(c);
}

/// Group `cpu_batch_7b` (only with `FASTRM_BENCH_7B=DIR`, a `synth-model --like llava-1.5-7b`
/// folder, f16, weights memory-mapped as stored): one batched decode step of B = 1, 4, 8
/// sequences at 600 positions each. The step's cost does not depend on what the cache holds, so
/// the sequences are admitted at that length without a prefill (eight 7B prefills would take
/// longer than the measurement).
fn batched_7b(c: &mut Criterion) {
    use fastrm::backend::cpu::{Cpu, CpuWeights};
    let Some(dir) = std::env::var_os("FASTRM_BENCH_7B") else {
        eprintln!("cpu_batch_7b: skipped (set FASTRM_BENCH_7B to a 7B synth-model folder)");
        return;
    };
    let engine = fastrm::Engine::load(Cpu::with_weights(CpuWeights::Stored), dir.as_ref())
        .expect("the 7B folder loads");
    let (b, m) = (engine.backend(), engine.model());
    let positions = 600;
    let mut seqs: Vec<_> = (0..8)
        .map(|_| m.kv.admit(b, positions).expect("KV pages for 8 sequences"))
        .collect();
    let mut g = c.benchmark_group("cpu_batch_7b");
    g.sample_size(10);
    for rows in [1usize, 4, 8] {
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_function(format!("decode_step_b{rows}"), |bench| {
            bench.iter(|| decode_step(b, m, &mut seqs[..rows]))
        });
    }
    g.finish();
}

/// Group `cpu_prefix`: a conversation's second turn (the first turn's prompt, a 40-token answer,
/// a 20-token question), time to its first token: a cold prefill of the whole conversation
/// against a prefill that reads the first turn's pages from the prefix cache. The image's
/// features are at hand in both (the image cache's job); the cache is refilled with the first
/// turn before every timed run.
fn follow_up(c: &mut Criterion, setup: common::Midsize) {
    use fastrm::model::session::{Mode, Prefill, Session};
    use fastrm::GenerateOptions;
    use std::sync::Arc;
    let common::Midsize {
        engine,
        ids,
        pixels,
        ..
    } = setup;
    let (b, m) = (engine.backend(), engine.model());
    let (_, img) = m.encode_image(b, &pixels).unwrap();
    let img = Arc::new(img);
    let mut turn1 = ids.clone();
    turn1.extend((0..40).map(|i| 1000 + i));
    let mut turn2 = turn1.clone();
    turn2.extend((0..20).map(|i| 2000 + i));
    let opts = GenerateOptions {
        max_new_tokens: 1,
        ..Default::default()
    };
    let first_token = |s: &mut Session<'_, _>| s.step().unwrap().unwrap();
    let mut g = c.benchmark_group("cpu_prefix");
    g.sample_size(10);
    g.bench_function(format!("cold_turn2_{}_positions", turn2.len()), |bench| {
        bench.iter(|| {
            let prompt = m.prompt(turn2.clone()).unwrap();
            let mut s = Session::prefill(b, m, prompt, &img, &opts, Mode::Plain).unwrap();
            first_token(&mut s)
        })
    });
    let cached_turn1 = || {
        m.kv.set_prefix_cache(0);
        m.kv.set_prefix_cache(1 << 20);
        let p = m.prompt(turn1.clone()).unwrap();
        drop(Session::prefill_cached(b, m, p, std::slice::from_ref(&img), &opts).unwrap());
    };
    cached_turn1();
    let s = Session::prefill_cached(
        b,
        m,
        m.prompt(turn2.clone()).unwrap(),
        std::slice::from_ref(&img),
        &opts,
    )
    .unwrap();
    let computed = turn2.len() - s.cached_len();
    drop(s);
    g.bench_function(format!("cached_turn2_{computed}_computed"), |bench| {
        bench.iter_batched(
            cached_turn1,
            |()| {
                let prompt = m.prompt(turn2.clone()).unwrap();
                let mut s =
                    Session::prefill_cached(b, m, prompt, std::slice::from_ref(&img), &opts)
                        .unwrap();
                first_token(&mut s)
            },
            criterion::BatchSize::PerIteration,
        )
    });
    m.kv.set_prefix_cache(0);
    // The first turn's prompt prefilled whole and in chunks (what `serve --prefill-chunk` spreads
    // over steps): the chunks' own cost.
    for chunk in [turn1.len(), 256, 128, 64] {
        g.bench_function(
            format!("prefill_{}_in_chunks_of_{chunk}", turn1.len()),
            |bench| {
                bench.iter(|| {
                    let prompt = m.prompt(turn1.clone()).unwrap();
                    let mut p =
                        Prefill::begin(b, m, prompt, &[&img], None, &opts, Mode::Plain).unwrap();
                    while p.remaining() > 0 {
                        p.advance(chunk).unwrap();
                    }
                    first_token(&mut p.finish().unwrap())
                })
            },
        );
    }
    g.finish();
}

/// Aggregate decode throughput: B sequences prefilled once (prompts of different lengths), then
/// the step at each one's next position, rewound every iteration.
fn batched(c: &mut Criterion, setup: common::Midsize) {
    let common::Midsize {
        engine,
        ids,
        pixels,
        ..
    } = setup;
    let (b, m) = (engine.backend(), engine.model());
    let (_, img) = m.encode_image(b, &pixels).unwrap();
    let mut seqs = Vec::new();
    for i in 0..16 {
        // Prompts of different lengths: the text after the image cut short by i tokens.
        let n = ids.len() - i;
        let prompt = m.prompt(ids[..n].to_vec()).unwrap();
        let x = m.embed_prompt(b, &prompt, &[&img]).unwrap();
        let mut kv = m.kv.admit(b, n + 1).unwrap();
        m.llm.forward(b, x, &mut kv).unwrap();
        seqs.push(kv);
    }
    let mut g = c.benchmark_group("cpu_batch");
    g.sample_size(10);
    for rows in [1usize, 2, 4, 8, 16] {
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_function(format!("decode_step_b{rows}"), |bench| {
            bench.iter(|| decode_step(b, m, &mut seqs[..rows]))
        });
    }
    // The parts of the B = 8 step: the decode attention of one layer over the rows' pages, and
    // the MLP's gate and up products over 8 rows.
    let rows: Vec<_> = seqs.iter().take(8).collect();
    let paged: Vec<PagedRow<'_>> = rows
        .iter()
        .map(|s| PagedRow {
            pages: s.pages(),
            len: s.capacity,
        })
        .collect();
    let t = &m.cfg.text;
    let shape = AttnShape {
        n_heads: t.num_attention_heads,
        n_kv_heads: t.num_key_value_heads,
        head_dim: t.head_dim,
        causal_q_pos0: None,
        kv_len: 0,
    };
    let q = b
        .upload(&vec![0.01; 8 * t.hidden_size], 8, t.hidden_size)
        .unwrap();
    g.throughput(Throughput::Elements(8));
    m.kv.with_layers(|k, v| {
        g.bench_function("paged_attention_layer_b8", |bench| {
            bench.iter(|| {
                b.paged_attention(&q, &k[0], &v[0], &paged, PAGE, shape)
                    .unwrap()
            })
        });
    });
    let l = &m.llm.layers[0];
    g.bench_function("gate_up_b8", |bench| {
        bench.iter(|| b.linear_group(&q, &[&l.gate, &l.up]).unwrap())
    });
    g.bench_function("lm_head_b8", |bench| {
        bench.iter(|| b.linear(&q, &m.llm.lm_head, None).unwrap())
    });
    // The FastRM maps of a B = 8 step: one fused product per row against that row's folded
    // image keys (576 patches each).
    let d = t.hidden_size;
    let head = FastRmHead::new(b, &HeadWeights::random(d, 64, 1), d).unwrap();
    let patches = m.cfg.vision.num_patches();
    let folds: Vec<_> = (0..8)
        .map(|i| {
            let img = b.uniform(patches, d, i, 0.0, 1.0).unwrap();
            head.fold(b, &img).unwrap()
        })
        .collect();
    let hs: Vec<_> = (0..8).map(|i| b.slice_rows(&q, i, 1).unwrap()).collect();
    g.bench_function("fastrm_maps_b8", |bench| {
        bench.iter(|| {
            folds
                .iter()
                .zip(&hs)
                .map(|(f, h)| head.scores(b, f, h).unwrap())
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn steps(c: &mut Criterion, group: &str, setup: common::Midsize) {
    let common::Midsize {
        path,
        cfg: _,
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
            let x = m.embed_prompt(b, &prompt, &[&img]).unwrap();
            let mut cache = m.kv.admit(b, ids.len() + 1).unwrap();
            let h = m.llm.forward(b, x, &mut cache).unwrap();
            let last = b.slice_rows(&h, ids.len() - 1, 1).unwrap();
            b.argmax_rows(&m.llm.logits(b, &last).unwrap()).unwrap()
        })
    });

    let (_, img) = m.encode_image(b, &pixels).unwrap();
    let x = m.embed_prompt(b, &prompt, &[&img]).unwrap();
    let mut cache = m.kv.admit(b, ids.len() + 1).unwrap();
    m.llm.forward(b, x, &mut cache).unwrap();
    let n = ids.len();
    g.bench_function("decode_step", |bench| {
        bench.iter(|| {
            // Each iteration is the step at position n: rewind and overwrite that cache row. The
            // decode path generation runs (the batched step with one row), not a one-row prefill.
            cache.len = n;
            let x = b.embedding(&m.llm.embed, &[42]).unwrap();
            let h = m.llm.decode(b, x, &mut [&mut cache]).unwrap();
            b.argmax_rows(&m.llm.logits(b, &h).unwrap()).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
