//! Many sequences at once: the paged KV cache and the batched decode step. A run in a batch — of
//! any size, joined mid-flight, beside cancelled runs, sampled with a seed — gives exactly what it
//! gives alone (ids, text and maps); pages never leak; a full cache is a typed error.

mod common;

use common::fixture_dir;
use fastrm::backend::cpu::Cpu;
use fastrm::backend::Backend;
use fastrm::engine::{Engine, Scheduler, SeqId};
use fastrm::explain::fastrm::HeadWeights;
use fastrm::model::sampling::Sampling;
use fastrm::util::SplitMix64;
use fastrm::vision::RgbImage;
use fastrm::{CancelToken, Error, GenerateOptions, Item, Method, Request, RunOptions};

fn tiny<B: Backend>(b: B) -> Engine<B> {
    let mut e = Engine::load(b, &fixture_dir("tiny")).unwrap();
    let d = e.config().text.hidden_size;
    e.set_head(&HeadWeights::random(d, 16, 4)).unwrap();
    e
}

/// A seeded picture, so every run sees its own image.
fn image(seed: u64) -> RgbImage {
    let mut r = SplitMix64::new(seed);
    let (w, h) = (24 + (seed as usize % 3) * 8, 30);
    let data = (0..w * h * 3).map(|_| (r.next_u64() % 256) as u8).collect();
    RgbImage::new(w, h, data).unwrap()
}

const QUESTIONS: [&str; 4] = [
    "What is it?",
    "What colour is the object on the left of the picture?",
    "Describe the image.",
    "Is there a red square anywhere in this picture, and where?",
];

/// Run `i` of a mixed set: its own image and question, 2 to 9 tokens, FastRM maps or none,
/// every fourth sampled with its own seed.
fn case(i: usize) -> (Request, RunOptions) {
    let req = Request::question(image(i as u64), QUESTIONS[i % 4]);
    let mut sampling = Sampling::default();
    if i % 4 == 3 {
        sampling.temperature = 0.9;
        sampling.top_p = 0.95;
        sampling.seed = 100 + i as u64;
    }
    let opts = RunOptions {
        generate: GenerateOptions {
            max_new_tokens: 2 + i % 8,
            stop_at_eos: false,
            sampling,
            ..Default::default()
        },
        method: (i % 3 != 2).then_some(Method::FastRm),
        ..Default::default()
    };
    (req, opts)
}

/// What a run gave: per token `(id, text delta, map)`, then the final text.
type Trace = (Vec<(u32, String, Option<Vec<f32>>)>, String);

fn trace(items: &[Item]) -> Trace {
    let mut tokens = Vec::new();
    let mut text = None;
    for it in items {
        match it {
            Item::Token(t) => {
                tokens.push((t.id, t.text_delta.clone(), t.map.clone().map(|m| m.map)))
            }
            Item::Done(s) => text = Some(s.text.clone()),
            _ => {}
        }
    }
    (tokens, text.expect("the run ended without Done"))
}

fn alone<B: Backend>(e: &Engine<B>, i: usize) -> Trace {
    let (req, opts) = case(i);
    let items: Vec<Item> = e
        .stream(&req, &opts, &CancelToken::new())
        .collect::<Result<_, _>>()
        .unwrap();
    trace(&items)
}

/// Steps until every run has ended, gathering each run's events.
fn drain<B: Backend>(
    s: &mut Scheduler<'_, B>,
    ids: &[SeqId],
    got: &mut [Vec<fastrm::Result<Item>>],
) {
    for (k, &id) in ids.iter().enumerate() {
        got[k].extend(s.events(id));
    }
}

fn batched_equals_alone<B: Backend>(e: &Engine<B>, n: usize, cancel: &[usize]) {
    let want: Vec<Trace> = (0..n).map(|i| alone(e, i)).collect();
    let mut s = e.scheduler();
    let mut ids = Vec::new();
    let mut got: Vec<Vec<fastrm::Result<Item>>> = (0..n).map(|_| Vec::new()).collect();
    // A third join at once, the rest one per step: sequences join mid-flight.
    for i in 0..n {
        let (req, opts) = case(i);
        ids.push(s.submit(req, opts));
        if i >= n / 3 {
            s.step().unwrap();
            drain(&mut s, &ids, &mut got);
        }
        if cancel.contains(&i) {
            // Cancelled after a step or two: its pages are free for the rest.
            s.step().unwrap();
            s.cancel(ids[i]);
        }
    }
    while !s.is_idle() {
        s.step().unwrap();
        drain(&mut s, &ids, &mut got);
    }
    drain(&mut s, &ids, &mut got);
    for i in 0..n {
        if cancel.contains(&i) {
            assert!(
                matches!(got[i].last(), Some(Err(Error::Cancelled))),
                "run {i}: cancelled, but its last event is {:?}",
                got[i].last()
            );
            continue;
        }
        let items: Vec<Item> = got[i].drain(..).map(|r| r.unwrap()).collect();
        let (tokens, text) = trace(&items);
        let (want_tokens, want_text) = &want[i];
        assert_eq!(text, *want_text, "run {i}: text");
        assert_eq!(tokens.len(), want_tokens.len(), "run {i}: tokens");
        for (t, (a, w)) in tokens.iter().zip(want_tokens).enumerate() {
            assert_eq!((a.0, &a.1), (w.0, &w.1), "run {i} token {t}");
            assert_eq!(a.2, w.2, "run {i} token {t}: map");
        }
    }
    assert_eq!(e.kv_usage().0, 0, "pages still held after every run ended");
}

#[test]
fn every_run_in_a_batch_gives_what_it_gives_alone() {
    let e = tiny(Cpu);
    for n in [1, 2, 5, 16] {
        batched_equals_alone(&e, n, &[]);
    }
    batched_equals_alone(&e, 12, &[1, 6]);
}

/// The batched step's rows against the same sequences stepped one by one, at the decoder level:
/// hidden states bit for bit.
#[test]
fn a_batched_decoder_step_is_each_row_alone() {
    let e = tiny(Cpu);
    let (b, m) = (e.backend(), e.model());
    let d = m.cfg.text.hidden_size;
    let mut r = SplitMix64::new(3);
    let mut seqs = Vec::new();
    for n in [3usize, 17, 40, 1, 33] {
        let x: Vec<f32> = (0..n * d).map(|_| r.uniform_sym()).collect();
        let mut kv = m.kv.admit(b, n + 1).unwrap();
        m.llm
            .forward(b, b.upload(&x, n, d).unwrap(), &mut kv)
            .unwrap();
        seqs.push(kv);
    }
    let ids = [5u32, 9, 200, 7, 11];
    let x = b.embedding(&m.llm.embed, &ids).unwrap();
    let mut all: Vec<_> = seqs.iter_mut().collect();
    let batch = b.download(&m.llm.decode(b, x, &mut all).unwrap()).unwrap();
    for (i, s) in seqs.iter_mut().enumerate() {
        s.len -= 1;
        let x = b.embedding(&m.llm.embed, &ids[i..i + 1]).unwrap();
        let one = b.download(&m.llm.decode(b, x, &mut [s]).unwrap()).unwrap();
        assert_eq!(one, batch[i * d..(i + 1) * d], "row {i}");
    }
}

#[test]
fn pages_never_leak_under_random_submit_step_cancel() {
    let e = tiny(Cpu);
    // Room for a few runs only, so some wait for pages.
    let page = fastrm::model::kv::PAGE;
    let per_page = e.config().text.num_hidden_layers
        * 2
        * e.config().text.num_key_value_heads
        * e.config().text.head_dim
        * page
        * 4;
    e.set_kv_memory(Some((per_page * 12) as u64)).unwrap();
    // With the prefix cache taking part: repeated cases read their pages from it, and its pages
    // give way to runs that need room.
    e.set_image_cache(24);
    e.set_prefix_cache(Some((per_page * 6) as u64));
    let mut s = e.scheduler();
    // Prompts in chunks: runs are cancelled mid-prefill too.
    s.set_prefill_chunk(Some(11)).unwrap();
    let mut r = SplitMix64::new(9);
    let mut ids = Vec::new();
    let (mut done, mut cancelled, mut hits) = (0, 0, 0);
    for op in 0..1000 {
        match r.next_u64() % 10 {
            0..=2 => ids.push(s.submit(case(op % 24).0, case(op % 24).1)),
            3 if !ids.is_empty() => {
                let id = ids[(r.next_u64() % ids.len() as u64) as usize];
                s.cancel(id);
            }
            _ => {
                s.step().unwrap();
            }
        }
        let (used, limit) = e.kv_usage();
        assert!(used <= limit, "op {op}: {used} pages in use of {limit}");
        ids.retain(|&id| {
            let ev = s.events(id);
            for x in &ev {
                match x {
                    Ok(Item::Done(d)) => {
                        done += 1;
                        hits += (d.cached_tokens > 0) as usize;
                    }
                    Err(Error::Cancelled) => cancelled += 1,
                    Err(e) => panic!("op {op}: a run failed: {e}"),
                    _ => {}
                }
            }
            !ev.iter().any(|x| matches!(x, Ok(Item::Done(_)) | Err(_)))
        });
    }
    while !s.is_idle() {
        s.step().unwrap();
    }
    assert!(
        done > 20 && cancelled > 10 && hits > 0,
        "{done} done ({hits} from cached prefixes), {cancelled} cancelled"
    );
    assert!(e.prefix_pages() > 0 && e.prefix_pages() <= 6);
    assert_eq!(e.kv_usage().0, e.prefix_pages(), "pages leaked");
    e.set_prefix_cache(None);
    assert_eq!(e.kv_usage().0, 0, "pages leaked");
}

#[test]
fn a_full_kv_cache_is_a_typed_error() {
    let e = tiny(Cpu);
    let page_bytes = e.config().text.num_hidden_layers
        * 2
        * e.config().text.num_key_value_heads
        * e.config().text.head_dim
        * fastrm::model::kv::PAGE
        * 4;
    let err = e.set_kv_memory(Some(page_bytes as u64 - 1)).unwrap_err();
    assert!(err.to_string().contains("holds no page"), "{err}");
    // One page: no prompt of the tiny model fits.
    e.set_kv_memory(Some(page_bytes as u64)).unwrap();
    let (req, opts) = case(0);
    let err = e.generate(&req, &opts.generate).unwrap_err();
    assert!(matches!(err, Error::KvFull(_)), "{err}");
    assert!(err.to_string().contains("pages of 16"), "{err}");
    // Through a scheduler with nothing else holding pages: refused, not left waiting.
    let mut s = e.scheduler();
    let id = s.submit(req.clone(), opts.clone());
    for _ in 0..5 {
        s.step().unwrap();
    }
    assert!(s.is_idle());
    assert!(matches!(s.events(id).last(), Some(Err(Error::KvFull(_)))));
    // Growing with demand again: the same request runs.
    e.set_kv_memory(None).unwrap();
    e.generate(&req, &opts.generate).unwrap();
    assert_eq!(e.kv_usage().0, 0);
}

/// The same on the simulated CUDA device (its kernels' sources on the host): batch of four, ids,
/// text and maps equal to the runs alone on that device.
#[cfg(feature = "sim")]
#[test]
fn every_run_in_a_batch_gives_what_it_gives_alone_on_the_simulated_device() {
    let e = tiny(fastrm::backend::cuda::Cuda::<f32>::simulated());
    batched_equals_alone(&e, 6, &[]);
    // In half-precision storage too: invariance is about the order of the sums, not their type.
    let e = tiny(fastrm::backend::cuda::Cuda::<half::f16>::simulated());
    batched_equals_alone(&e, 6, &[2]);
}

/// `n` continuations of one prompt: one prefill, the prompt's full pages held once by all of
/// them, and continuation `i` exactly the run of seed + i alone (ids, text, maps). A failed or
/// cancelled first run ends the continuations not yet forked with its error; once forked, they
/// are runs of their own.
#[test]
fn n_continuations_share_the_prompt_and_each_is_its_seed_alone() {
    let e = tiny(Cpu);
    let (req, mut opts) = case(3);
    opts.generate.max_new_tokens = 6;
    let seed = opts.generate.sampling.seed;
    let alone: Vec<Trace> = (0..4u64)
        .map(|i| {
            let mut o = opts.clone();
            o.generate.sampling.seed = seed + i;
            let items: Vec<Item> = e
                .stream(&req, &o, &CancelToken::new())
                .collect::<Result<_, _>>()
                .unwrap();
            trace(&items)
        })
        .collect();
    assert!(
        alone.iter().any(|t| t.0 != alone[0].0),
        "four seeds gave one answer: the test would not see a mix-up"
    );
    let mut s = e.scheduler();
    let ids = s.submit_n(req.clone(), opts.clone(), 4).unwrap();
    let mut got: Vec<Vec<fastrm::Result<Item>>> = (0..4).map(|_| Vec::new()).collect();
    let mut shared_usage = None;
    while !s.is_idle() {
        s.step().unwrap();
        if shared_usage.is_none() && s.active() == 4 {
            shared_usage = Some(e.kv_usage().0);
        }
        drain(&mut s, &ids, &mut got);
    }
    for (i, g) in got.into_iter().enumerate() {
        let items: Vec<Item> = g.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(trace(&items), alone[i], "continuation {i}");
    }
    // Pages: the first run's all, and each other one's own beyond the prompt's full pages.
    let (prompt, _) = e.resolve(&req).unwrap();
    let page = fastrm::model::kv::PAGE;
    let cap = prompt.len() + opts.generate.max_new_tokens - 1;
    let (all, full) = (cap.div_ceil(page), prompt.len() / page);
    assert!(full > 0, "the prompt fills no page: nothing to share");
    assert_eq!(
        shared_usage,
        Some(all + 3 * (all - full)),
        "pages held by four continuations"
    );
    assert_eq!(e.kv_usage().0, 0, "pages leaked");

    // A bad request: every continuation gets its error.
    let bad = Request::question(image(1), "");
    let ids = s.submit_n(bad, opts.clone(), 3).unwrap();
    s.step().unwrap();
    for id in ids {
        let ev = s.events(id);
        assert!(
            matches!(ev.last(), Some(Err(Error::Input(m))) if m.contains("empty")),
            "{ev:?}"
        );
    }
    // One continuation cancelled before the fork; the first run cancelled after it (decoding,
    // three units of work in: resolve, encode, prefill): the third runs on as if alone.
    let ids = s.submit_n(req.clone(), opts.clone(), 3).unwrap();
    s.cancel(ids[1]);
    for _ in 0..3 {
        s.step().unwrap();
    }
    s.cancel(ids[0]);
    while !s.is_idle() {
        s.step().unwrap();
    }
    assert!(matches!(
        s.events(ids[0]).last(),
        Some(Err(Error::Cancelled))
    ));
    assert!(matches!(
        s.events(ids[1]).last(),
        Some(Err(Error::Cancelled))
    ));
    let third: Vec<Item> = s.events(ids[2]).into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(trace(&third), alone[2]);
    assert!(s.submit_n(req, opts, 17).is_err());
    assert_eq!(e.kv_usage().0, 0, "pages leaked");
}

/// A run's ids and every map it gave (in its tokens or after them), in order.
fn ids_and_maps(items: &[Item]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut ids = Vec::new();
    let mut maps = Vec::new();
    for it in items {
        match it {
            Item::Token(t) => {
                ids.push(t.id);
                maps.extend(t.map.as_ref().map(|m| m.map.clone()));
            }
            Item::Map(m) => maps.push(m.map.clone()),
            _ => {}
        }
    }
    (ids, maps)
}

/// The items of `req` run alone through a scheduler whose prefill runs `chunk` prompt rows at a
/// time.
fn chunked<B: Backend>(e: &Engine<B>, req: &Request, opts: &RunOptions, chunk: usize) -> Vec<Item> {
    let mut s = e.scheduler();
    s.set_prefill_chunk(Some(chunk)).unwrap();
    let id = s.submit(req.clone(), opts.clone());
    let mut items = Vec::new();
    while !s.is_idle() {
        s.step().unwrap();
        items.extend(s.events(id).into_iter().map(|r| r.unwrap()));
    }
    items.extend(s.events(id).into_iter().map(|r| r.unwrap()));
    items
}

/// A prompt run through the decoder in chunks answers as the whole prefill does, under every
/// method (the exact and incremental baselines read the chunks' saved activations; FastRM the
/// image rows gathered across chunks): ids exact, maps to rounding — a chunk is another row count
/// for the same products. Chunk sizes cross pages and the image's span.
fn chunked_equals_whole<B: Backend>(e: &Engine<B>, chunks: &[usize]) {
    let req = Request::question(image(7), QUESTIONS[3]);
    for method in [
        None,
        Some(Method::FastRm),
        Some(Method::Baseline {
            mode: fastrm::explain::baseline::RowMode::Streamed,
        }),
        Some(Method::BaselineIncremental),
        Some(Method::GradCam { layer: 1 }),
    ] {
        let opts = RunOptions {
            generate: GenerateOptions {
                max_new_tokens: 4,
                stop_at_eos: false,
                ..Default::default()
            },
            method,
            ..Default::default()
        };
        let items: Vec<Item> = e
            .stream(&req, &opts, &CancelToken::new())
            .collect::<Result<_, _>>()
            .unwrap();
        let (want_ids, want_maps) = ids_and_maps(&items);
        assert_eq!(want_maps.len(), if method.is_some() { 4 } else { 0 });
        for &chunk in chunks {
            let (ids, maps) = ids_and_maps(&chunked(e, &req, &opts, chunk));
            let what = format!("{method:?}, chunks of {chunk}");
            assert_eq!(ids, want_ids, "{what}");
            assert_eq!(maps.len(), want_maps.len(), "{what}");
            for (t, (a, w)) in maps.iter().zip(&want_maps).enumerate() {
                let peak = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(w).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-4 * peak + 1e-6,
                    "{what}: map {t} off by {diff} (peak {peak})"
                );
            }
        }
    }
}

#[test]
fn a_prefill_in_chunks_answers_as_a_whole_one() {
    chunked_equals_whole(&tiny(Cpu), &[1, 7, 16, 33]);
}

#[cfg(feature = "sim")]
#[test]
fn a_prefill_in_chunks_answers_as_a_whole_one_on_the_simulated_device() {
    chunked_equals_whole(
        &tiny(fastrm::backend::cuda::Cuda::<f32>::simulated()),
        &[13],
    );
}

/// The prompt length of a run, from its events so far (0 before its prefill ends).
fn prefilled_len(events: Vec<fastrm::Result<Item>>) -> usize {
    events
        .into_iter()
        .find_map(|it| match it {
            Ok(Item::Prefilled { prompt_len, .. }) => Some(prompt_len),
            _ => None,
        })
        .unwrap_or(0)
}

/// With a chunk size, a long prompt joins without stalling the runs already decoding: each step
/// runs one chunk's worth of prompt rows beside a token for every decoding run, so the newcomer
/// takes a step per chunk to start and the others never miss a step; newcomers arriving together
/// share that budget (one whole prompt per step when the chunk is a prompt long).
#[test]
fn decoding_runs_keep_stepping_while_a_prompt_is_prefilled_in_chunks() {
    let e = tiny(Cpu);
    let chunk = 8;
    let mut s = e.scheduler();
    assert!(s.set_prefill_chunk(Some(0)).is_err());
    s.set_prefill_chunk(Some(chunk)).unwrap();
    let (req, mut opts) = case(0);
    opts.generate.max_new_tokens = 200;
    let first = s.submit(req.clone(), opts.clone());
    let mut prompt_len = 0;
    while prompt_len == 0 {
        s.step().unwrap();
        prompt_len = prefilled_len(s.events(first));
    }
    assert!(prompt_len > 3 * chunk, "a prompt of {prompt_len} rows");
    let second = s.submit(req.clone(), opts.clone());
    let mut steps = 0;
    loop {
        s.step().unwrap();
        steps += 1;
        let tokens = s
            .events(first)
            .into_iter()
            .filter(|it| matches!(it, Ok(Item::Token(_))))
            .count();
        assert_eq!(
            tokens, 1,
            "step {steps}: the decoding run made {tokens} tokens"
        );
        if prefilled_len(s.events(second)) > 0 {
            break;
        }
        assert!(steps < 1000);
    }
    // Decoding the image and the vision tower take a step each, then a step per chunk.
    assert_eq!(
        steps,
        2 + prompt_len.div_ceil(chunk),
        "steps until the second run started"
    );

    // The first two runs' pages go back (the pool holds four contexts by default).
    drop(s);
    let mut s = e.scheduler();
    s.set_prefill_chunk(Some(prompt_len)).unwrap();
    let ids: Vec<SeqId> = (0..3)
        .map(|_| s.submit(req.clone(), opts.clone()))
        .collect();
    let mut started_at = Vec::new();
    for step in 1..=10 {
        s.step().unwrap();
        for &id in &ids {
            if prefilled_len(s.events(id)) > 0 {
                started_at.push(step);
            }
        }
    }
    // All three decode their image and run the tower together, then one prompt a step.
    assert_eq!(started_at, [3, 4, 5]);
}
