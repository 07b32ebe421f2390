//! Choosing tokens other than greedily, through the engine: the host's greedy choice (taken when
//! log-probabilities are asked for) equals the device's, log-probabilities are the logits'
//! log-softmax, a seed repeats its answer, stop ids and stop strings end the answer (a stop
//! string across a token boundary, and never shown), bad options are named errors. The sampler's
//! distributions are checked by chi-square tests in `src/model/sampling.rs`.

mod common;

use common::{fixture_dir, fixture_image};
use fastrm::backend::cpu::Cpu;
use fastrm::engine::{Engine, StopReason, Summary, TokenStep};
use fastrm::model::sampling::Sampling;
use fastrm::{CancelToken, Error, GenerateOptions, Item, Method, Request, RunOptions};

fn tiny() -> Engine<Cpu> {
    Engine::load(Cpu, &fixture_dir("tiny")).unwrap()
}

fn req() -> Request {
    Request::question(fixture_image("tiny"), "Tell me a story about it.")
}

fn options(n: usize, sampling: Sampling, stop: &[&str]) -> RunOptions {
    RunOptions {
        generate: GenerateOptions {
            max_new_tokens: n,
            stop_at_eos: false,
            sampling,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn run(e: &Engine<Cpu>, o: &RunOptions) -> (Vec<TokenStep>, Summary) {
    let mut tokens = Vec::new();
    for item in e.stream(&req(), o, &CancelToken::new()) {
        match item.unwrap() {
            Item::Token(t) => tokens.push(t),
            Item::Done(s) => return (tokens, s),
            _ => {}
        }
    }
    panic!("the run ended without Done");
}

fn sampled(temperature: f32, seed: u64) -> Sampling {
    Sampling {
        temperature,
        seed,
        ..Default::default()
    }
}

#[test]
fn greedy_on_the_host_is_the_device_argmax_and_logprobs_are_the_log_softmax() {
    let e = tiny();
    let (_, plain) = run(&e, &options(12, Sampling::default(), &[]));
    let with_logprobs = Sampling {
        logprobs: Some(3),
        ..Default::default()
    };
    let mut o = options(12, with_logprobs, &[]);
    let (tokens, s) = run(&e, &o);
    assert_eq!(s.generated_ids, plain.generated_ids);
    assert_eq!(s.text, plain.text);
    assert!(plain.logprobs.is_empty());
    assert_eq!(s.logprobs.len(), 12);
    // Against the logits that chose each token, kept by the session.
    o.generate.keep_steps = true;
    let g = e.generate(&req(), &o.generate).unwrap();
    assert_eq!(g.generated_ids, s.generated_ids);
    let steps = {
        let (prompt, pixels) = e.resolve(&req()).unwrap();
        let image = e.encode(&pixels).unwrap();
        let mut session = e
            .session(
                prompt,
                &image,
                &o.generate,
                fastrm::model::session::Mode::Plain,
            )
            .unwrap();
        session.run_to_end().unwrap();
        session.finish().step_logits
    };
    assert_eq!(steps.len(), 12);
    for ((t, lp), logits) in tokens.iter().zip(&s.logprobs).zip(&steps) {
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = max
            + logits
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let want = logits[t.id as usize] as f64 - lse;
        assert!(
            (lp.logprob as f64 - want).abs() < 1e-5,
            "{} vs {want}",
            lp.logprob
        );
        assert_eq!(t.logprobs.as_ref(), Some(lp));
        assert_eq!(lp.top_logprobs.len(), 3);
        assert_eq!(lp.top_logprobs[0].id, t.id, "greedy takes the most likely");
        assert!(lp
            .top_logprobs
            .windows(2)
            .all(|w| w[0].logprob >= w[1].logprob));
        assert_eq!(
            (&lp.top_logprobs[0].token, &lp.top_logprobs[0].bytes),
            (&lp.token, &lp.bytes)
        );
        assert_eq!((lp.token.clone(), lp.bytes.clone()), e.token_piece(t.id));
    }
}

#[test]
fn a_seed_repeats_its_answer_and_different_seeds_differ() {
    let e = tiny();
    let answers: Vec<Vec<u32>> = (1..=4)
        .map(|seed| {
            run(&e, &options(10, sampled(1.0, seed), &[]))
                .1
                .generated_ids
        })
        .collect();
    for (seed, a) in (1..=4).zip(&answers) {
        let again = run(&e, &options(10, sampled(1.0, seed), &[]))
            .1
            .generated_ids;
        assert_eq!(&again, a, "seed {seed}");
    }
    let mut distinct = answers.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 3, "4 seeds, {} answers", distinct.len());
    let (_, greedy) = run(&e, &options(10, Sampling::default(), &[]));
    assert!(answers.iter().any(|a| *a != greedy.generated_ids));
}

#[test]
fn a_stop_string_across_a_token_boundary_ends_the_answer_unseen() {
    let e = tiny();
    let (tokens, whole) = run(&e, &options(16, Sampling::default(), &[]));
    // A stop string made of the last character of one token's text and the first of the next
    // one's, where that is its first appearance in the answer.
    let mut at = 0;
    let mut pick = None;
    for w in tokens.windows(2) {
        at += w[0].text_delta.len();
        let (a, b) = (&w[0].text_delta, &w[1].text_delta);
        let (Some(x), Some(y)) = (a.chars().last(), b.chars().next()) else {
            continue;
        };
        let stop = format!("{x}{y}");
        let start = at - x.len_utf8();
        if whole.text.find(&stop) == Some(start) {
            pick = Some((stop, start, w[1].index));
            break;
        }
    }
    let (stop, start, index) = pick.expect("two neighbouring tokens with text");
    let (tokens, s) = run(&e, &options(16, Sampling::default(), &[&stop]));
    assert_eq!(s.stop_reason, StopReason::Stop);
    assert_eq!(s.text, whole.text[..start], "stop {stop:?}");
    assert_eq!(s.generated_ids, whole.generated_ids[..=index]);
    let shown: String = tokens.iter().map(|t| t.text_delta.as_str()).collect();
    assert_eq!(shown, s.text, "the deltas never show the stop string");
    // A stop string that never appears changes nothing.
    let (_, s) = run(&e, &options(16, Sampling::default(), &["\u{1F600}never"]));
    assert_eq!(
        (s.text, s.stop_reason),
        (whole.text, StopReason::MaxNewTokens)
    );
}

#[test]
fn a_stop_id_ends_the_answer_like_eos() {
    let e = tiny();
    let (_, whole) = run(&e, &options(12, Sampling::default(), &[]));
    let id = whole.generated_ids[4];
    let first = whole.generated_ids.iter().position(|&x| x == id).unwrap();
    let stop_at = Sampling {
        stop_ids: vec![id],
        ..Default::default()
    };
    let (_, s) = run(&e, &options(12, stop_at, &[]));
    assert_eq!(s.stop_reason, StopReason::Stop);
    assert_eq!(s.generated_ids, whole.generated_ids[..=first]);
}

#[test]
fn every_sampled_token_gets_the_map_of_the_token_emitted() {
    let mut e = tiny();
    let d = e.config().text.hidden_size;
    e.set_head(&fastrm::explain::fastrm::HeadWeights::random(d, 16, 4))
        .unwrap();
    for method in [Method::FastRm, Method::GradCam { layer: 0 }] {
        let mut o = options(6, sampled(1.5, 9), &[]);
        o.method = Some(method);
        let c = fastrm::engine::collect(e.stream(&req(), &o, &CancelToken::new()), &mut |_| {})
            .unwrap();
        let ids: Vec<u32> = c.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, c.generation.generated_ids, "{method:?}");
    }
}

#[test]
fn bad_options_are_named_before_any_work() {
    let e = tiny();
    let cases: Vec<(RunOptions, &str)> = vec![
        (options(4, sampled(-0.5, 0), &[]), "temperature"),
        (options(4, sampled(f32::NAN, 0), &[]), "temperature"),
        (
            options(
                4,
                Sampling {
                    top_p: 0.0,
                    ..Default::default()
                },
                &[],
            ),
            "top-p",
        ),
        (
            options(
                4,
                Sampling {
                    top_k: Some(0),
                    ..Default::default()
                },
                &[],
            ),
            "top-k",
        ),
        (
            options(
                4,
                Sampling {
                    logprobs: Some(99),
                    ..Default::default()
                },
                &[],
            ),
            "logprobs",
        ),
        (options(4, Sampling::default(), &[""]), "stop string"),
        (
            options(
                4,
                Sampling::default(),
                &["a", "b", "c", "d", "e", "f", "g", "h", "i"],
            ),
            "stop strings",
        ),
    ];
    for (o, needle) in cases {
        let mut it = e.stream(&req(), &o, &CancelToken::new());
        match it.next() {
            Some(Err(Error::Input(msg))) => assert!(msg.contains(needle), "{msg}"),
            other => panic!("{needle}: expected an input error first, got {other:?}"),
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["generate", "--prompt", "Why?", "--temperature", "-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("temperature"), "{err}");
}

/// A stop string inside a byte-fallback run ("\n" is the byte token `<0x0A>`) ends the answer at
/// the token that completes it, not one token later when the run would close.
#[test]
fn a_stop_string_in_a_byte_token_ends_at_that_token() {
    let e = tiny();
    let newline = 13; // `<0x0A>` in the tiny vocabulary
                      // A sampled answer with a newline before its end (the first seed that gives one).
    let (seed, whole) = (0..200)
        .find_map(|seed| {
            let (_, s) = run(&e, &options(16, sampled(1.5, seed), &[]));
            let at = s.generated_ids.iter().position(|&id| id == newline)?;
            (at + 1 < s.generated_ids.len() && s.text.contains('\n')).then_some((seed, s))
        })
        .expect("a seed whose answer has a newline inside");
    let at = whole
        .generated_ids
        .iter()
        .position(|&id| id == newline)
        .unwrap();
    let (tokens, s) = run(&e, &options(16, sampled(1.5, seed), &["\n"]));
    assert_eq!(s.stop_reason, StopReason::Stop);
    assert_eq!(s.generated_ids, whole.generated_ids[..=at], "seed {seed}");
    assert_eq!(s.text, whole.text[..whole.text.find('\n').unwrap()]);
    let shown: String = tokens.iter().map(|t| t.text_delta.as_str()).collect();
    assert_eq!(shown, s.text);
}
