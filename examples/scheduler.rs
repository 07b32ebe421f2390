//! Several requests through one [`fastrm::Scheduler`]: they are decoded together, one token each
//! per batched step, each token with its FastRM map; one request is cancelled midway and its KV
//! pages go back to the pool; a request submitted later joins the running batch.
//!
//! `cargo run --release --example scheduler [DEMO_DIR]` (default: the demo model embedded in the
//! crate, `fastrm::demo::dir()`).

use std::path::PathBuf;

use fastrm::backend::cpu::Cpu;
use fastrm::{Engine, Error, GenerateOptions, ImageInput, Item, Method, Request, RunOptions};

fn main() -> Result<(), Error> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .map_or_else(fastrm::demo::dir, Ok)?;
    let mut engine = Engine::load(Cpu, &dir.join("model"))?;
    engine.load_head(&dir.join("head.safetensors"))?;
    let image = ImageInput::Path(dir.join("image.png"));
    let run = |max_new_tokens: usize, stop_at_eos: bool| RunOptions {
        generate: GenerateOptions {
            max_new_tokens,
            stop_at_eos,
            ..Default::default()
        },
        method: Some(Method::FastRm),
        ..Default::default()
    };

    let mut sched = engine.scheduler();
    let mut runs = Vec::new();
    for q in ["What color is the star?", "What color is the cross?"] {
        runs.push((
            q,
            sched.submit(Request::question(image.clone(), q), run(8, true)),
        ));
    }
    // Runs to its limit unless cancelled.
    let long = "What shape is yellow?";
    let cancelled = sched.submit(Request::question(image.clone(), long), run(32, false));
    runs.push((long, cancelled));

    let mut step = 0;
    let mut tokens = [0usize; 4];
    while !sched.is_idle() {
        let rows = sched.step()?;
        step += 1;
        if step == 3 {
            // Joins the batch between two steps.
            let q = "What color is the circle?";
            runs.push((
                q,
                sched.submit(Request::question(image.clone(), q), run(8, true)),
            ));
        }
        for (i, (q, id)) in runs.iter().enumerate() {
            for ev in sched.events(*id) {
                match ev {
                    Ok(Item::Token(t)) => {
                        tokens[i] += 1;
                        let m = t.map.expect("FastRM maps come with their token");
                        println!(
                            "step {step} ({rows} decoded) [req {i}] token {:?} entropy {:.3}",
                            t.text_delta, m.entropy
                        );
                        if *id == cancelled && tokens[i] == 2 {
                            sched.cancel(*id);
                        }
                    }
                    Ok(Item::Done(s)) => println!("[req {i}] {q} done: {:?}", s.text.trim()),
                    Ok(_) => {}
                    Err(Error::Cancelled) => {
                        println!("[req {i}] cancelled after {} tokens", tokens[i])
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    let (used, _) = engine.kv_usage();
    println!("KV pages in use at the end: {used}");
    Ok(())
}
