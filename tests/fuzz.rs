//! A seeded mutation fuzzer, on stable Rust, for the parsers that take untrusted bytes: PNG and
//! JPEG decoding, checkpoints (a single safetensors file, and `model.safetensors.index.json` over
//! real shards), the head file, `config.json`, `preprocessor_config.json`, the distill question
//! file (VQA JSON and JSONL), the distill manifest and distill shards.
//!
//! Each target mutates the seeds of its checked-in corpus (`tests/fuzz/corpus/<target>/`, made by
//! `cargo test --features sim --test fuzz write_corpus -- --ignored`) with bit flips, byte sets,
//! interesting integers, truncation, chunk duplication and splicing, and (for JSON) replaced
//! numbers, then calls the real entry point. A panic, an allocation above [`CAP`] or one input
//! taking over [`SLOW`] fails the run, naming the target, the seed and the iteration; the input is
//! written to `target/fuzz-failures/`. Every input follows from (seed, target, iteration) alone,
//! so a failure is reproduced by `FASTRM_FUZZ_SEED=S FASTRM_FUZZ_ITERS=I+1`.
//!
//! In CI each target runs for `FASTRM_FUZZ_SECS` seconds (default 4); long runs:
//! `FASTRM_FUZZ_SECS=120 cargo test --release --features sim --test fuzz -- --nocapture`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fastrm::checkpoint::Checkpoint;
use fastrm::config::LlavaConfig;
use fastrm::distill::dataset::Dataset;
use fastrm::distill::format::{InputInfo, Manifest, SampleRecord, Shard, ShardFile, ShardInfo};
use fastrm::explain::fastrm::HeadWeights;
use fastrm::vision::{load_image_bytes, PreprocessConfig, MAX_DECODE_BYTES};

/// Most live heap one input may take: what an image may need to decode, and some room.
const CAP: usize = MAX_DECODE_BYTES + (256 << 20);
/// Longest one input may take.
const SLOW: Duration = Duration::from_secs(10);

struct Capped;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !charge(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !charge(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
}

/// Charges `bytes`; above the cap, says which input did it (the allocation then fails and the
/// process aborts, so this line is the report).
fn charge(bytes: usize) -> bool {
    let now = LIVE.fetch_add(bytes, Relaxed) + bytes;
    if now > CAP {
        LIVE.fetch_sub(bytes, Relaxed);
        eprintln!(
            "FUZZ FAILURE: allocation of {bytes} bytes would take the heap to {now}, over {CAP}; input: {}",
            CURRENT.lock().map(|c| c.clone()).unwrap_or_default()
        );
        return false;
    }
    true
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// What runs now, for the allocation-cap report.
static CURRENT: Mutex<String> = Mutex::new(String::new());

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x8000_0000,
    0xffff_ffff,
    0x4000,
    0x1_0000_0000,
    u64::MAX,
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>], json: bool) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(if json { 8 } else { 7 }) {
            0 if len > 0 => input[rng.below(len)] ^= 1 << rng.below(8),
            1 if len > 0 => input[rng.below(len)] = rng.next() as u8,
            2 if len > 0 => {
                // An interesting integer at a random offset, 1/2/4/8 bytes, either endianness.
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let w = 1 << rng.below(4);
                let at = rng.below(len);
                let bytes = if rng.below(2) == 0 {
                    v.to_be_bytes()[8 - w..].to_vec()
                } else {
                    v.to_le_bytes()[..w].to_vec()
                };
                for (i, b) in bytes.into_iter().enumerate() {
                    if at + i < len {
                        input[at + i] = b;
                    }
                }
            }
            3 => input.truncate(rng.below(len + 1)),
            4 if len > 0 => {
                // Duplicate a chunk in place.
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = input[a..b].to_vec();
                let at = rng.below(len);
                input.splice(at..at, chunk);
            }
            5 if len > 0 => {
                // Splice: the tail of another seed.
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(len);
                let from = rng.below(other.len());
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(64)).min(len);
                input.drain(a..b);
            }
            7 => {
                // JSON: a number replaced by an extreme one.
                let text = String::from_utf8_lossy(input).into_owned();
                let digits: Vec<usize> = text
                    .char_indices()
                    .filter(|(_, c)| c.is_ascii_digit())
                    .map(|(i, _)| i)
                    .collect();
                if let Some(&at) = digits.get(rng.below(digits.len())) {
                    let end = text[at..]
                        .find(|c: char| !c.is_ascii_digit())
                        .map_or(text.len(), |e| at + e);
                    let with = [
                        "0",
                        "-1",
                        "1e308",
                        "18446744073709551615",
                        "4294967296",
                        "NaN",
                    ][rng.below(6)];
                    *input = format!("{}{with}{}", &text[..at], &text[end..]).into_bytes();
                }
            }
            _ => {}
        }
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a number"))
    })
}

/// Runs `call` on the corpus of `target`, then on mutations of it, for the configured time or
/// iterations. `call` returns whatever it returns; only panics, the cap and time fail.
fn fuzz(target: &str, json: bool, call: &dyn Fn(&[u8])) {
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("corpus of {target}: {e}"))
        .map(|e| e.unwrap().path())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "empty corpus for {target}");
    let seed = env_num("FASTRM_FUZZ_SEED").unwrap_or(1);
    let secs = env_num("FASTRM_FUZZ_SECS").unwrap_or(4);
    let iters = env_num("FASTRM_FUZZ_ITERS");
    let bytes: Vec<Vec<u8>> = seeds.iter().map(|(_, b)| b.clone()).collect();
    let run = |what: String, input: &[u8]| {
        *CURRENT.lock().unwrap() = what.clone();
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| call(input)));
        let took = t.elapsed();
        if r.is_err() || took > SLOW {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(what.replace(['/', ' '], "_"));
            std::fs::write(&file, input).unwrap();
            panic!(
                "FUZZ FAILURE {what}: {} (input saved to {})",
                if r.is_err() {
                    "panicked".to_string()
                } else {
                    format!("took {took:?}")
                },
                file.display()
            );
        }
    };
    for (name, b) in &seeds {
        run(format!("{target} corpus {name}"), b);
    }
    let start = Instant::now();
    let mut i = 0u64;
    while iters.map_or(start.elapsed() < Duration::from_secs(secs), |n| i < n) {
        let mut rng = Rng(seed ^ (i.wrapping_mul(0x2545_F491_4F6C_DD1D)) ^ hash(target));
        let mut input = bytes[rng.below(bytes.len())].clone();
        mutate(&mut rng, &mut input, &bytes, json);
        run(format!("{target} seed {seed} iteration {i}"), &input);
        i += 1;
    }
    println!(
        "fuzz {target}: {i} mutated inputs in {:?}, seed {seed}",
        start.elapsed()
    );
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// An image decode; the decoders' panics are caught and reported as "crashed" errors by
/// `load_image_bytes`, which count as failures here.
fn image(b: &[u8], name: &str) {
    if let Err(e) = load_image_bytes(b, Path::new(name)) {
        let msg = e.to_string();
        assert!(!msg.contains("decoder crashed"), "{msg}");
    }
}

#[test]
fn fuzz_png() {
    fuzz("png", false, &|b| {
        image(b, "fuzz.png");
    });
}

#[test]
fn fuzz_jpeg() {
    fuzz("jpeg", false, &|b| {
        image(b, "fuzz.jpg");
    });
}

#[test]
fn fuzz_head() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    fuzz("head", false, &|b| {
        let path = dir
            .path()
            .join(format!("{}.safetensors", n.fetch_add(1, Relaxed)));
        std::fs::write(&path, b).unwrap();
        let _ = HeadWeights::load(&path);
        let _ = std::fs::remove_file(&path);
    });
}

#[test]
fn fuzz_config() {
    fuzz("config", true, &|b| {
        let _ = LlavaConfig::from_json_str(&String::from_utf8_lossy(b));
    });
}

#[test]
fn fuzz_preprocessor_config() {
    fuzz("preprocessor_config", true, &|b| {
        let _ =
            PreprocessConfig::from_json_str(&String::from_utf8_lossy(b), Path::new("fuzz.json"));
    });
}

/// Runs `f` on the bytes written to a fresh file in `dir` (the entry points take paths).
fn via_file(dir: &Path, n: &AtomicUsize, ext: &str, b: &[u8], f: impl FnOnce(&Path)) {
    let path = dir.join(format!("{}.{ext}", n.fetch_add(1, Relaxed)));
    std::fs::write(&path, b).unwrap();
    f(&path);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn fuzz_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    fuzz("checkpoint", false, &|b| {
        std::fs::write(dir.path().join("model.safetensors"), b).unwrap();
        let _ = Checkpoint::open(dir.path());
    });
}

/// The index over the tiny model's two real shards.
#[test]
fn fuzz_checkpoint_index() {
    let dir = tempfile::tempdir().unwrap();
    let sharded =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/model-t5-sharded-f16");
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        std::fs::copy(sharded.join(f), dir.path().join(f)).unwrap();
    }
    fuzz("checkpoint_index", true, &|b| {
        std::fs::write(dir.path().join("model.safetensors.index.json"), b).unwrap();
        let _ = Checkpoint::open(dir.path());
    });
}

#[test]
fn fuzz_questions() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    fuzz("questions", true, &|b| {
        via_file(dir.path(), &n, "json", b, |p| {
            let _ = Dataset::load(p);
        })
    });
}

#[test]
fn fuzz_shard() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    fuzz("shard", false, &|b| {
        via_file(dir.path(), &n, "safetensors", b, |p| {
            if let Ok(f) = ShardFile::open(p) {
                let _ = f.into_shard();
            }
        })
    });
}

/// `manifest.json` in a folder holding the shard it lists (the shard corpus's seed).
#[test]
fn fuzz_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        corpus_dir("shard").join("two_samples.safetensors"),
        dir.path().join("shard-00000.safetensors"),
    )
    .unwrap();
    fuzz("manifest", true, &|b| {
        std::fs::write(dir.path().join("manifest.json"), b).unwrap();
        if let Ok(m) = Manifest::read(dir.path()) {
            for info in &m.shards {
                let _ = m.open_shard(dir.path(), info);
            }
        }
    });
}

/// Writes the corpus: small fixtures of every flavour the decoders handle, the tiny model's
/// configs, and a small head.
#[test]
#[ignore]
fn write_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let inputs = root.join("tests/fixtures/vision/inputs");
    for target in [
        "png",
        "jpeg",
        "head",
        "config",
        "preprocessor_config",
        "questions",
        "shard",
        "checkpoint",
        "checkpoint_index",
        "manifest",
    ] {
        std::fs::create_dir_all(corpus_dir(target)).unwrap();
    }
    for e in std::fs::read_dir(&inputs).unwrap() {
        let p = e.unwrap().path();
        let len = std::fs::metadata(&p).unwrap().len();
        let ext = p.extension().unwrap().to_str().unwrap();
        let target = if ext == "png" { "png" } else { "jpeg" };
        if len <= 10_000 {
            std::fs::copy(&p, corpus_dir(target).join(p.file_name().unwrap())).unwrap();
        }
    }
    let tiny = root.join("tests/fixtures/tiny");
    std::fs::copy(
        tiny.join("config.json"),
        corpus_dir("config").join("tiny.json"),
    )
    .unwrap();
    std::fs::copy(
        tiny.join("preprocessor_config.json"),
        corpus_dir("preprocessor_config").join("tiny.json"),
    )
    .unwrap();
    let distill = root.join("tests/fixtures/distill");
    for f in ["questions.jsonl", "vqa_questions.json"] {
        std::fs::copy(distill.join(f), corpus_dir("questions").join(f)).unwrap();
    }
    // A shard of two samples, 4 patches, hidden size 3, with 2 and 1 tokens.
    let mut shard = Shard::new(0, 4, 3);
    for s in 0..2usize {
        let record = SampleRecord {
            sample: s,
            question_id: s as u64,
            question: "What is it?".into(),
            image: "a.png".into(),
            answer: "A star".into(),
            answers: Some(vec!["star".into()]),
            generated_ids: (0..2 - s as u32).map(|k| 319 + k).collect(),
            stop_reason: "eos".into(),
            qtype: None,
            n_objects: None,
            target_mask: None,
        };
        let tokens: Vec<(u32, Vec<f32>, Vec<f32>)> = (0..2 - s)
            .map(|k| {
                (
                    319 + k as u32,
                    vec![0.5, -1.0, 2.0],
                    vec![0.1, 0.2, 0.3, 0.4],
                )
            })
            .collect();
        shard.push(record, &[0.25; 12], &tokens);
    }
    shard
        .write(&corpus_dir("shard").join("two_samples.safetensors"))
        .unwrap();
    Shard::read(&corpus_dir("shard").join("two_samples.safetensors")).unwrap();
    std::fs::copy(
        tiny.join("model-t5-sharded-f16/model.safetensors.index.json"),
        corpus_dir("checkpoint_index").join("tiny_t5_f16.json"),
    )
    .unwrap();
    // Every dtype a checkpoint may hold, in one small file.
    let f32s: Vec<u8> = [1.0f32, -2.0, 0.5, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let halves: Vec<u8> = vec![0x00, 0x3c, 0x00, 0xc0, 0x00, 0x38, 0x00, 0x42];
    let views = [
        ("a.weight", safetensors::Dtype::F32, vec![2, 2], &f32s[..]),
        ("b.weight", safetensors::Dtype::F16, vec![4], &halves[..]),
        ("c.bias", safetensors::Dtype::BF16, vec![1, 4], &halves[..]),
    ];
    let views: Vec<(&str, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(n, d, s, b)| {
            (
                *n,
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        corpus_dir("checkpoint").join("three_dtypes.safetensors"),
        safetensors::tensor::serialize(views, None).unwrap(),
    )
    .unwrap();
    // The manifest of that shard, written to a scratch folder by the real writer.
    let scratch = tempfile::tempdir().unwrap();
    let manifest = Manifest {
        format: "fastrm-distill".into(),
        version: 1,
        model: "/models/tiny".into(),
        model_weights: "model.safetensors:746224:0".into(),
        method: "fastrm".into(),
        suffix: " Answer briefly.".into(),
        max_new_tokens: 8,
        stop_at_eos: true,
        hidden_size: 3,
        n_patches: 4,
        grid: [2, 2],
        label_threshold: 0.5,
        input: InputInfo {
            path: "/data/questions.jsonl".into(),
            format: "jsonl".into(),
            fingerprint: "0123456789abcdef".into(),
            entries: 2,
        },
        images: "/data/images".into(),
        shard_size: 64,
        shard: None,
        shards: vec![ShardInfo {
            file: "shard-00000.safetensors".into(),
            first_sample: 0,
            samples: 2,
            tokens: 3,
        }],
        samples: 2,
        tokens: 3,
    };
    manifest.write(scratch.path()).unwrap();
    // A seed the reader accepts whole, so mutations start from the deep end.
    std::fs::copy(
        corpus_dir("shard").join("two_samples.safetensors"),
        scratch.path().join("shard-00000.safetensors"),
    )
    .unwrap();
    let back = Manifest::read(scratch.path()).unwrap();
    back.open_shard(scratch.path(), &back.shards[0]).unwrap();
    std::fs::copy(
        scratch.path().join("manifest.json"),
        corpus_dir("manifest").join("two_samples.json"),
    )
    .unwrap();
    HeadWeights::random(16, 8, 1)
        .save(&corpus_dir("head").join("random_16x8.safetensors"))
        .unwrap();
}
