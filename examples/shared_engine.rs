//! A server author's starting point: one engine shared by four request threads, each streaming
//! its tokens with their FastRM maps over a channel as they are generated; one client hangs up
//! midway and its run is cancelled; the image arrives as bytes, as from an upload.
//!
//! `cargo run --release --example shared_engine [DEMO_DIR]` (default: the demo model embedded in
//! the crate, `fastrm::demo::dir()`: `model/`, `head.safetensors`, `image.png`).

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use fastrm::backend::cpu::Cpu;
use fastrm::{
    CancelToken, Engine, Error, GenerateOptions, ImageInput, Item, Method, Request, RunOptions,
};

/// What a request thread sends its client.
enum Msg {
    Token {
        text: String,
        entropy: f32,
        peak: usize,
    },
    Done {
        answer: String,
        verdict: &'static str,
    },
    Failed(Error),
}

fn main() -> Result<(), Error> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .map_or_else(fastrm::demo::dir, Ok)?;
    let mut engine = Engine::load(Cpu, &dir.join("model"))?;
    engine.load_head(&dir.join("head.safetensors"))?;
    // `Engine<Cpu>` is `Sync`: one copy of the weights serves every thread.
    let engine = Arc::new(engine);
    let upload =
        std::fs::read(dir.join("image.png")).map_err(|e| Error::io(dir.join("image.png"), e))?;

    let questions = [
        "What color is the star?",
        "What color is the cross?",
        "What color is the circle?",
        // This client leaves after its first token; the run must not go on without it.
        "What shape is yellow?",
    ];
    let mut clients: Vec<(usize, Receiver<Msg>)> = Vec::new();
    let mut workers = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        // A rendezvous channel: the engine works one token ahead of its client at most.
        let (tx, rx) = sync_channel::<Msg>(0);
        clients.push((i, rx));
        let engine = Arc::clone(&engine);
        let req = Request::question(ImageInput::Bytes(upload.clone()), *q);
        workers.push(std::thread::spawn(move || {
            let opts = RunOptions {
                generate: GenerateOptions {
                    max_new_tokens: 16,
                    // Request 3 runs to its limit unless cancelled, so a cancel has work to stop.
                    stop_at_eos: i != 3,
                    keep_steps: false,
                    ..Default::default()
                },
                method: Some(Method::FastRm),
                ..Default::default()
            };
            let cancel = CancelToken::new();
            let mut generated = 0;
            for item in engine.stream(&req, &opts, &cancel) {
                let msg = match item {
                    Ok(Item::Token(t)) => {
                        generated += 1;
                        let m = t.map.expect("FastRM maps come with their token");
                        let peak = (0..m.map.len())
                            .max_by(|&a, &b| m.map[a].total_cmp(&m.map[b]))
                            .unwrap_or(0);
                        Msg::Token {
                            text: t.text_delta,
                            entropy: m.entropy,
                            peak,
                        }
                    }
                    Ok(Item::Done(s)) => Msg::Done {
                        answer: s.text,
                        verdict: s.confidence.map_or("n/a", |c| c.verdict()),
                    },
                    Ok(_) => continue,
                    // The client is gone: nothing more is computed for it.
                    Err(Error::Cancelled) => return (i, generated, true),
                    Err(e) => Msg::Failed(e),
                };
                if tx.send(msg).is_err() {
                    cancel.cancel();
                }
            }
            (i, generated, false)
        }));
    }

    for (i, rx) in clients {
        for msg in rx.iter() {
            match msg {
                Msg::Token {
                    text,
                    entropy,
                    peak,
                } => {
                    println!("[req {i}] token {text:?} entropy {entropy:.3} peak patch {peak}");
                    if i == 3 {
                        break; // hang up
                    }
                }
                Msg::Done { answer, verdict } => {
                    println!("[req {i}] done: {:?} ({verdict})", answer.trim())
                }
                Msg::Failed(e) => println!("[req {i}] error: {e}"),
            }
        }
    }
    let mut cancelled = 0;
    for w in workers {
        let (i, generated, was_cancelled) = w.join().expect("a request thread panicked");
        if was_cancelled {
            cancelled += 1;
            println!("[req {i}] cancelled after {generated} of 16 tokens");
        }
    }
    if cancelled != 1 {
        return Err(Error::input(format!(
            "expected one cancelled request, saw {cancelled}"
        )));
    }
    Ok(())
}
