//! Half-precision weights held as stored are the mapped file's pages, not copies: loading a
//! mid-size f16 checkpoint grows the process's anonymous memory (`RssAnon`, which file pages never
//! count in) by about its f32 vectors and the tokenizer, not by its matrices; the f32 path, which
//! copies, grows it by twice the file. Alone in its test binary so no other test's allocations
//! move the numbers.

mod common;

use fastrm::backend::cpu::{Cpu, CpuWeights};
use fastrm::checkpoint::{Checkpoint, DType};
use fastrm::Engine;

/// `RssAnon` of this process in bytes.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon in /proc/self/status");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
#[cfg(target_os = "linux")]
fn stored_half_weights_are_not_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mid");
    // Written by another process, so none of its buffers linger in this one's heap.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["synth-model", "--config"])
        .arg(common::repo_root().join("benches/midsize_config.json"))
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // What must be copied: the vectors (norms, biases; one row each), in f32.
    let ck = Checkpoint::open(&dir).unwrap();
    let census = ck.census();
    let vectors: u64 = census
        .iter()
        .filter(|t| t.rows == 1)
        .map(|t| 4 * t.cols as u64)
        .sum();
    let matrices: u64 = census
        .iter()
        .filter(|t| t.rows > 1)
        .map(|t| {
            assert_eq!(t.dtype, DType::F16);
            2 * (t.rows * t.cols) as u64
        })
        .sum();
    drop(ck);
    assert!(matrices > 100 << 20, "a checkpoint big enough to tell");

    // The tokenizer (a 32000-token vocabulary), the tensor index and the allocator's slack.
    const MARGIN: u64 = 24 << 20;
    let before = rss_anon();
    let engine = Engine::load(Cpu::with_weights(CpuWeights::Stored), &dir).unwrap();
    let grown = rss_anon().saturating_sub(before);
    assert!(
        grown <= vectors + MARGIN,
        "held as stored, loading grew RssAnon by {} MB: more than the {} MB of f32 vectors + {} MB",
        grown >> 20,
        vectors >> 20,
        MARGIN >> 20
    );
    drop(engine);

    // The oracle can fail: f32 copies are anonymous memory, twice the matrices' file bytes.
    let before = rss_anon();
    let engine = Engine::load(Cpu, &dir).unwrap();
    let grown = rss_anon().saturating_sub(before);
    assert!(
        grown >= 2 * matrices * 9 / 10,
        "f32 copies grew RssAnon by only {} MB for {} MB of f16 matrices",
        grown >> 20,
        matrices >> 20
    );
    drop(engine);
}
