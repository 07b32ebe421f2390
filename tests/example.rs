//! The examples `cargo test` builds, run on the bundled demo model: `shared_engine` (three answers
//! streamed from one engine shared by threads, one cancelled request) and `scheduler` (requests
//! decoded together, one cancelled, one joining mid-flight).

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// Runs an example to success; its standard output.
fn run_example(name: &str) -> String {
    let path = example(name);
    assert!(path.is_file(), "{} was not built", path.display());
    let out = Command::new(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn shared_engine_streams_three_answers_and_cancels_one() {
    let stdout = run_example("shared_engine");
    // The demo model's answers (tests/demo_world.rs pins the model against transformers).
    for (i, answer) in [(0, "yellow"), (1, "red"), (2, "white")] {
        let line = format!("[req {i}] done: \"{answer}\"");
        assert!(stdout.contains(&line), "missing {line:?} in\n{stdout}");
    }
    // The client of request 3 left after one token: the run stopped long before its 16.
    let cancelled = stdout
        .lines()
        .find(|l| l.starts_with("[req 3] cancelled after "))
        .unwrap_or_else(|| panic!("request 3 was not cancelled:\n{stdout}"));
    let n: usize = cancelled["[req 3] cancelled after ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(n <= 2, "{cancelled}");
    assert!(!stdout.contains("[req 3] done"), "{stdout}");
}

#[test]
fn scheduler_example_batches_answers_cancels_one_and_frees_every_page() {
    let stdout = run_example("scheduler");
    for (i, answer) in [(0, "yellow"), (1, "red"), (3, "white")] {
        let line = format!("done: \"{answer}\"");
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("[req {i}]")) && l.ends_with(&line)),
            "missing [req {i}] … {line:?} in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("[req 2] cancelled after 2 tokens"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("[req 2] What shape is yellow? done"),
        "{stdout}"
    );
    assert!(stdout.contains("(3 decoded)"), "no batched step:\n{stdout}");
    assert!(stdout.contains("KV pages in use at the end: 0"), "{stdout}");
}
