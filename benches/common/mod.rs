//! The mid-size setup the CPU benches share: `benches/midsize_config.json` (336 px, 576 patches,
//! hidden 512, 8 layers) with synthetic weights, a prompt shaped like a LLaVA question (BOS, a few
//! template ids, the image, a short question) and deterministic pixels.
#![allow(dead_code)] // each bench uses a different part of the setup

use std::path::{Path, PathBuf};

use fastrm::backend::cpu::{Cpu, CpuWeights};
use fastrm::checkpoint::DType;
use fastrm::config::LlavaConfig;
use fastrm::synth::{write_model, SynthOptions};
use fastrm::Engine;

pub struct Midsize {
    pub path: PathBuf,
    pub cfg: LlavaConfig,
    pub engine: Engine<Cpu>,
    pub ids: Vec<u32>,
    pub pixels: Vec<f32>,
}

pub fn midsize() -> Midsize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/midsize_config.json");
    let cfg = LlavaConfig::from_file(&path).expect("midsize config");
    let engine = Engine::synthetic(Cpu, &cfg, 1).expect("synthetic model");
    with_engine(path, cfg, engine)
}

/// The same shapes stored as bf16 safetensors (written once under `target/`, by
/// `fastrm synth-model`'s writer) and loaded as a user's bf16 checkpoint is: matrices read from
/// the mapped file, f32 arithmetic.
pub fn midsize_bf16() -> Midsize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/midsize_config.json");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-midsize-bf16");
    if !dir.join("model.safetensors").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let json = std::fs::read_to_string(&path).expect("midsize config");
        let opts = SynthOptions {
            dtype: DType::BF16,
            shards: 1,
            seed: 1,
        };
        write_model(&dir, &json, &opts).expect("write the bf16 mid-size model");
    }
    let engine =
        Engine::load(Cpu::with_weights(CpuWeights::Stored), &dir).expect("load the bf16 model");
    let cfg = engine.model().cfg.clone();
    with_engine(dir, cfg, engine)
}

fn with_engine(path: PathBuf, cfg: LlavaConfig, engine: Engine<Cpu>) -> Midsize {
    // The allocator setting the binary makes, so the benches time what it runs.
    fastrm::profile::memory::keep_freed_memory();
    let mut ids: Vec<u32> = vec![cfg.bos_token_id, 3148, 1001, 29901];
    ids.extend(std::iter::repeat_n(
        cfg.image_token_id,
        cfg.vision.num_patches(),
    ));
    ids.extend((0..24).map(|i| 400 + i));
    let s = cfg.vision.image_size;
    let pixels = (0..3 * s * s)
        .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
        .collect();
    Midsize {
        path,
        cfg,
        engine,
        ids,
        pixels,
    }
}
