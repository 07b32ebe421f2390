//! `fastrm profile` on the CPU backend with the bundled model: the table, the JSON and the plots
//! are well formed and hold the invariants that must hold on any machine (never "FastRM is faster
//! than the baseline", which a tiny model on a loaded machine need not show); the memory sampler
//! and the NVML probe; argument errors.

mod common;
use common::{decode_png, file_names};

use std::process::{Command, Output};
use std::time::Duration;

#[cfg(feature = "cuda")]
use fastrm::profile::memory::NvmlProbe;
use fastrm::profile::memory::{self, MemorySource, PhaseMemory, RssProbe, Sampler};
use fastrm::profile::report::method_color;
use fastrm::profile::{parse_methods, parse_tokens, ProfMethod};
use serde_json::Value;

fn fastrm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// `fastrm ARGS` run to success; its standard output as one JSON document.
fn profile_json(args: &[&str]) -> Value {
    let out = fastrm(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(out.stdout.is_empty(), "partial stdout");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    for n in needles {
        assert!(
            stderr.to_lowercase().contains(&n.to_lowercase()),
            "stderr {stderr:?} should mention {n:?}"
        );
    }
}

/// Width, height and colour type of a PNG, decoding every pixel.
const METHODS: [&str; 4] = ["generate", "fastrm", "baseline", "baseline-incremental"];

#[test]
fn bundled_model_table_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("nested/prof");
    let out = fastrm(&[
        "profile",
        "--tokens",
        "4,2",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["format"], "fastrm-profile-2");
    assert_eq!(v["repeat"], 5, "the default repeats each run");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["tokens"], serde_json::json!([2, 4]), "sorted lengths");
    assert_eq!(v["methods"], serde_json::json!(METHODS));
    assert!(v["card"].as_str().unwrap().contains("threads"));
    assert!(v["date_utc"].as_str().unwrap().ends_with('Z'));
    assert!(v["prompt_len"].as_u64().unwrap() > v["patches"].as_u64().unwrap());
    assert!(
        v["head"].as_str().unwrap().contains("random head"),
        "{}",
        v["head"]
    );
    // The file holds the same document, plus the list of files.
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("profile.json")).unwrap())
            .unwrap();
    assert_eq!(file["runs"], v["runs"]);
    assert_eq!(
        file["files"],
        serde_json::json!(["profile.json", "profile.txt", "latency.png", "memory.png"])
    );

    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8, "every method at every length");
    let num = |r: &Value, k: &str| -> f64 {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} is a number in {r}"))
    };
    for n in [2u64, 4] {
        for m in METHODS {
            let r = runs
                .iter()
                .find(|r| r["method"] == m && r["tokens"].as_u64() == Some(n))
                .unwrap_or_else(|| panic!("no run for {m} at {n}"));
            assert!(num(r, "latency_ms") > 0.0, "{r}");
            for k in ["vision_ms", "prefill_ms", "decode_ms", "map_latency_ms"] {
                assert!(num(r, k) >= 0.0, "{k} in {r}");
            }
            let phases = num(r, "vision_ms") + num(r, "prefill_ms") + num(r, "decode_ms");
            assert!(
                phases <= num(r, "latency_ms") * 1.01 + 1.0,
                "phases fit inside the end-to-end time: {r}"
            );
            let peak = num(r, "peak_memory_bytes");
            let start = num(r, "start_memory_bytes");
            assert!(peak > 0.0 && peak >= start, "{r}");
            // Over repetitions: the largest peak, the smallest start, the largest own growth.
            let run = num(r, "run_memory_bytes");
            assert!(run >= 0.0 && run <= peak - start, "{r}");
            assert!(r["memory_samples"].as_u64().unwrap() >= 2, "{r}");
            // Median and spread over the five repetitions, for the latency and the map time.
            for (key, reps) in [
                ("latency_ms", "latency_ms_repeats"),
                ("map_latency_ms", "map_latency_ms_repeats"),
            ] {
                let reps: Vec<f64> = r[reps]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                assert_eq!(reps.len(), 5, "{r}");
                let mut sorted = reps.clone();
                sorted.sort_by(f64::total_cmp);
                let spread = &r[key.replace("_ms", "_spread_ms")];
                assert_eq!(num(r, key), sorted[2], "{key} is the median: {r}");
                assert_eq!(num(spread, "median"), sorted[2], "{r}");
                assert_eq!(num(spread, "min"), sorted[0], "{r}");
                assert_eq!(num(spread, "max"), sorted[4], "{r}");
                assert!(num(spread, "sd") >= 0.0, "{r}");
                assert!(num(spread, "sd") <= sorted[4] - sorted[0] + 1e-9, "{r}");
            }
            // The map time is the engine's timer around the map work: never negative, inside
            // the call, exactly 0 without maps.
            assert!(num(r, "map_latency_ms") <= num(r, "latency_ms"), "{r}");
            if m == "generate" {
                assert_eq!(num(r, "map_memory_bytes"), 0.0);
                assert_eq!(num(r, "map_latency_ms"), 0.0, "{r}");
            } else {
                assert!(num(r, "map_latency_ms") > 0.0, "maps take time: {r}");
            }
            // The CPU keeps no ledger.
            assert!(r["ledger_peak_bytes"].is_null(), "{r}");
            assert_eq!(r["ledger_tag_peak_bytes"], serde_json::json!({}), "{r}");
        }
        // FastRM against both baselines at every length.
        for versus in ["baseline", "baseline-incremental"] {
            let q = v["ratios"]
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["versus"] == versus && q["tokens"].as_u64() == Some(n))
                .unwrap_or_else(|| panic!("no ratio against {versus} at {n}"));
            assert!(num(q, "latency_speedup") > 0.0);
            assert!(num(q, "map_latency_speedup") > 0.0);
            assert!(num(q, "peak_memory_ratio") > 0.0);
            assert!(q["ledger_peak_ratio"].is_null());
            let red = num(q, "peak_memory_reduction_pct");
            assert!((red - (1.0 - num(q, "peak_memory_ratio")) * 100.0).abs() < 1e-9);
        }
    }

    // The table: a header, one row per run, the ratio block.
    let table = std::fs::read_to_string(out_dir.join("profile.txt")).unwrap();
    let header = table
        .lines()
        .position(|l| l.trim_start().starts_with("tokens  method"))
        .expect("run table header");
    let rows: Vec<&str> = table.lines().skip(header + 1).take(8).collect();
    for (row, (n, m)) in rows
        .iter()
        .zip([2, 4].iter().flat_map(|n| METHODS.map(|m| (n, m))))
    {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.len(), 10, "{row}");
        assert_eq!((cols[0], cols[1]), (n.to_string().as_str(), m), "{row}");
        assert!(cols[2..9].iter().all(|c| c.parse::<f64>().is_ok()), "{row}");
        assert_eq!(cols[9], "-", "no ledger on the CPU: {row}");
    }
    assert!(table.contains("random head"), "{table}");
    assert!(table.contains("FastRM vs gradient baselines"), "{table}");
    assert!(table.contains("EOS ignored"), "{table}");

    // The plots: 640x400 RGB, every method's colour present.
    for name in ["latency.png", "memory.png"] {
        let img = decode_png(&out_dir.join(name));
        assert_eq!((img.width, img.height), (640, 400), "{name}");
        let px = img.data;
        for m in METHODS {
            let c = method_color(ProfMethod::parse(m).unwrap());
            let n = px.chunks_exact(3).filter(|p| *p == c).count();
            assert!(n > 30, "{name}: {m}'s colour has {n} pixels");
        }
    }
    // No stray temporary files.
    assert_eq!(
        file_names(&out_dir),
        ["latency.png", "memory.png", "profile.json", "profile.txt"]
    );
}

#[test]
fn synthetic_tiny_prints_the_table() {
    let out = fastrm(&[
        "profile",
        "--model",
        "synthetic:tiny",
        "--methods",
        "fastrm",
        "--tokens",
        "1,2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("model synthetic:tiny"), "{stdout}");
    assert!(stdout.contains("synthetic") && stdout.contains("random head"));
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() == 10 && c[0].parse::<usize>().is_ok()
        })
        .collect();
    // generate is always run (the maps' cost is measured against it).
    assert_eq!(rows.len(), 4, "{stdout}");
    assert!(rows[0].contains("generate") && rows[1].contains("fastrm"));
    assert!(!stdout.contains("FastRM vs"), "no baseline, no ratios");

    // --full-r and --repeat reach the runs and the JSON.
    let v = profile_json(&[
        "profile",
        "--model",
        "synthetic:tiny",
        "--methods",
        "baseline",
        "--full-r",
        "--tokens",
        "1",
        "--repeat",
        "2",
        "--json",
    ]);
    assert_eq!(v["full_r"], true);
    assert_eq!(v["repeat"], 2);
    assert_eq!(v["model"], "synthetic:tiny");
    assert!(v["head"].is_null(), "no fastrm, no head");
    assert_eq!(v["ratios"], serde_json::json!([]));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        let reps = r["latency_ms_repeats"].as_array().unwrap();
        assert_eq!(reps.len(), 2);
        let reps: Vec<f64> = reps.iter().map(|x| x.as_f64().unwrap()).collect();
        // The reported latency is one of the repetitions (the median of two: the larger).
        assert!(reps.contains(&r["latency_ms"].as_f64().unwrap()), "{r}");
    }
}

#[test]
fn argument_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("sub");
    let mut cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--methods", "generate,magic"],
            vec!["unknown method", "magic"],
        ),
        (vec!["--methods", ","], vec!["--methods is empty"]),
        (vec!["--tokens", ""], vec!["--tokens is empty"]),
        (vec!["--tokens", "0,2"], vec!["at least 1"]),
        (vec!["--tokens", "2,x"], vec!["`x`"]),
        (vec!["--out", file.to_str().unwrap()], vec!["output folder"]),
        (
            vec!["--out", under_file.to_str().unwrap()],
            vec!["output folder"],
        ),
        (
            vec!["--model", "synthetic:huge"],
            vec!["synthetic:tiny", "midsize"],
        ),
        (
            vec!["--model", "synthetic:llava-1.5-7b"],
            vec!["too big", "cuda"],
        ),
        (vec!["--model", "synthetic:llava-1.5-13b"], vec!["too big"]),
        (
            vec!["--methods", "generate,fastrm", "--full-r"],
            vec!["--full-r"],
        ),
        (
            vec!["--methods", "baseline", "--head", "x.safetensors"],
            vec!["--head"],
        ),
        (
            vec!["--head", "/no/such/head.safetensors"],
            vec!["no such file"],
        ),
        (vec!["--repeat", "0"], vec!["--repeat"]),
        (vec!["--repeat", "1000000000000"], vec!["--repeat"]),
        (vec!["--tokens", "18446744073709551615"], vec!["--tokens"]),
        (vec!["--model", "/no/such/model"], vec!["/no/such/model"]),
        (vec!["--tokens", "5000"], vec!["context"]),
    ];
    // Without a GPU, --device cuda says what is missing (with one, it would run); a build
    // without the CUDA backend says so.
    #[cfg(feature = "cuda")]
    if fastrm::backend::cuda::unavailable().is_some() {
        cases.push((
            vec!["--device", "cuda:0"],
            vec!["--device cuda", "--device cpu"],
        ));
    }
    #[cfg(not(feature = "cuda"))]
    cases.push((
        vec!["--device", "cuda:1"],
        vec!["rebuild with the `cuda` feature"],
    ));
    cases.push((
        vec![
            "--model",
            "synthetic:tiny",
            "--device",
            "cpu",
            "--dtype",
            "f16",
        ],
        vec!["--dtype"],
    ));
    for (args, needles) in cases {
        let mut all = vec!["profile"];
        all.extend(&args);
        let out = fastrm(&all);
        assert_fails(&out, &needles);
    }
    assert!(!under_file.exists());
    // The device is parsed with the other shared flags, by clap: its usage error (exit 2).
    let out = fastrm(&["profile", "--device", "tpu"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown device \"tpu\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn method_and_length_lists() {
    assert_eq!(
        parse_methods("baseline, fastrm,baseline").unwrap(),
        [
            ProfMethod::Generate,
            ProfMethod::Baseline,
            ProfMethod::FastRm
        ]
    );
    assert_eq!(parse_tokens("100,10, 20,10").unwrap(), [10, 20, 100]);
    assert!(parse_tokens(" , ").is_err());
}

#[test]
fn rss_fallback_reports_positive_memory() {
    assert!(memory::rss_bytes().unwrap() > 0);
    assert!(memory::peak_rss_bytes().unwrap() > 0);
    let s = Sampler::start(|| Ok(Box::new(RssProbe) as _), Duration::from_millis(2)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let samples = s.stop().unwrap();
    assert!(samples.len() >= 2, "{samples:?}");
    assert!(samples.iter().all(|x| x.bytes > 0));
    assert!(samples.windows(2).all(|w| w[0].t_s <= w[1].t_s));

    // A phase that allocates and touches 64 MB sees at least most of it as its own.
    let m = PhaseMemory::begin(MemorySource::ProcessRss, Duration::from_millis(5)).unwrap();
    let v = std::hint::black_box(vec![7u8; 64 << 20]);
    let used = m.end().unwrap();
    drop(v);
    assert!(used.peak_bytes >= used.baseline_bytes);
    assert!(used.samples >= 2);
    if used.exact_peak {
        assert!(used.run_bytes() >= 48 << 20, "{used:?}");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn nvml_absence_is_a_clear_error() {
    match NvmlProbe::open(0) {
        Ok(_) => {
            // A GPU host: the probe must sample too.
            let s = Sampler::start(
                || Ok(Box::new(NvmlProbe::open(0)?) as _),
                Duration::from_millis(5),
            )
            .unwrap();
            assert!(s.stop().unwrap().iter().all(|x| x.bytes > 0));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("NVML"), "{msg}");
            if !std::path::Path::new("/proc/driver/nvidia").exists() {
                assert!(
                    msg.contains("not available") && msg.contains("libnvidia-ml.so.1"),
                    "{msg}"
                );
            }
            // The sampler reports it the same way, without panicking.
            let r = Sampler::start(
                || Ok(Box::new(NvmlProbe::open(0)?) as _),
                Duration::from_millis(5),
            );
            assert!(r.err().unwrap().to_string().contains("NVML"));
            let r = PhaseMemory::begin(MemorySource::Nvml { device: 0 }, Duration::from_millis(5));
            assert!(r.err().unwrap().to_string().contains("NVML"));
        }
    }
}

/// On the simulated device (which keeps the CUDA backend's memory ledger) each run's ledger peaks
/// are its own: the same per method whatever ran before it, and a method that saves nothing for a
/// backward shows nothing saved even after one that did.
#[cfg(feature = "sim")]
#[test]
fn ledger_peaks_do_not_depend_on_method_order() {
    // The smallest model with a tokenizer (two layers, 25 patches): the simulator is slow.
    let (model, image) = (common::fixture_dir("tiny"), common::fixture_image("tiny"));
    let peaks = |methods: &str| -> Vec<(String, Value)> {
        let v = profile_json(&[
            "profile",
            "--device",
            "sim",
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--methods",
            methods,
            "--tokens",
            "2",
            "--repeat",
            "1",
            "--json",
        ]);
        let mut runs: Vec<(String, Value)> = v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r["map_latency_ms"].as_f64().unwrap() >= 0.0, "{r}");
                let peaks = serde_json::json!([r["ledger_peak_bytes"], r["ledger_tag_peak_bytes"]]);
                (r["method"].as_str().unwrap().to_string(), peaks)
            })
            .collect();
        runs.sort_by(|a, b| a.0.cmp(&b.0));
        runs
    };
    let a = peaks("fastrm,baseline");
    let b = peaks("baseline,fastrm");
    assert_eq!(a, b, "per-method ledger peaks depend on the order");
    let get = |m: &str| &a.iter().find(|(n, _)| n == m).unwrap().1;
    let total = |m: &str| get(m)[0].as_u64().expect("a ledger peak on the simulator");
    let saved = |m: &str| get(m)[1]["saved for backward"].as_u64().unwrap();
    assert!(total("baseline") > total("generate"), "{a:?}");
    assert_eq!(saved("generate"), 0, "{a:?}");
    assert_eq!(saved("fastrm"), 0, "{a:?}");
    assert!(saved("baseline") > 0, "{a:?}");
    // Ops' intermediate buffers are charged to a tag of their own.
    let scratch = get("generate")[1]["op scratch"].as_u64().unwrap();
    assert!(scratch > 0, "{a:?}");
}

/// The decode against the memory floor: the bytes a run's decode reads, counted here from the
/// model's shapes (synthetic weights are f32 on the CPU), the measured bandwidth, the floor and
/// its share, the maps' share of a step; and the table that shows them.
#[test]
fn decode_roofline_counts_the_bytes_of_every_step() {
    let v = profile_json(&[
        "profile",
        "--model",
        "synthetic:tiny",
        "--methods",
        "fastrm",
        "--tokens",
        "1,3",
        "--repeat",
        "1",
        "--json",
    ]);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("assets/demo/model/config.json"))
            .unwrap(),
    )
    .unwrap();
    let t = &cfg["text_config"];
    let n = |k: &str| t[k].as_u64().unwrap();
    let (d, layers, inter, vocab) = (
        n("hidden_size"),
        n("num_hidden_layers"),
        n("intermediate_size"),
        n("vocab_size"),
    );
    let head_dim = d / n("num_attention_heads");
    let kv = n("num_key_value_heads") * head_dim;
    // q and o are d × d, k and v d × kv, the MLP three d × inter, two norms; then the final norm.
    let decoder = 4 * (layers * (2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d) + d);
    let r = &v["roofline"];
    assert_eq!(r["decoder_bytes"].as_u64(), Some(decoder), "{r}");
    assert_eq!(r["lm_head_bytes"].as_u64(), Some(4 * vocab * d), "{r}");
    assert_eq!(
        r["kv_position_bytes"].as_u64(),
        Some(4 * layers * 2 * kv),
        "{r}"
    );
    let bw = r["bandwidth_bytes_per_s"]
        .as_f64()
        .expect("the CPU's bandwidth is measured");
    assert!(bw > 0.0, "{r}");
    assert!(r["bandwidth"].as_str().unwrap().contains("read bandwidth"));

    let prompt = v["prompt_len"].as_u64().unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for run in runs {
        let tokens = run["tokens"].as_u64().unwrap();
        let steps = tokens - 1;
        // Every token's lm_head; every later token's decoder pass over prompt + k positions.
        let positions: u64 = (1..=steps).map(|k| prompt + k).sum();
        let bytes = tokens * 4 * vocab * d + steps * decoder + positions * 4 * layers * 2 * kv;
        assert_eq!(run["decode_bytes"].as_u64(), Some(bytes), "{run}");
        let f = |k: &str| run[k].as_f64().unwrap_or_else(|| panic!("{k} in {run}"));
        let floor_ms = bytes as f64 / bw * 1e3 / tokens as f64;
        assert!((f("decode_floor_ms_per_token") - floor_ms).abs() <= 1e-9 * floor_ms);
        let decode_ms = f("decode_ms");
        assert!((f("decode_ms_per_token") - decode_ms / tokens as f64).abs() < 1e-9);
        let share = f("decode_floor_share");
        assert!((share - floor_ms * tokens as f64 / decode_ms).abs() <= 1e-9 * share);
        if run["method"] == "generate" {
            assert!(run["map_share_of_step"].is_null(), "{run}");
        } else {
            let maps = f("map_latency_ms");
            let want = maps / (maps + decode_ms);
            assert!((f("map_share_of_step") - want).abs() < 1e-9, "{run}");
            assert!(want > 0.0 && want < 1.0, "{run}");
        }
    }

    let out = fastrm(&[
        "profile",
        "--model",
        "synthetic:tiny",
        "--methods",
        "fastrm",
        "--tokens",
        "2",
        "--repeat",
        "1",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    let at = table
        .find("Decode against the memory floor")
        .unwrap_or_else(|| panic!("{table}"));
    let rows: Vec<Vec<&str>> = table[at..]
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.len() == 7 && c[0] == "2")
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert_eq!((rows[0][1], rows[0][6]), ("generate", "-"), "{table}");
    assert!(
        rows[1][6].parse::<f64>().is_ok(),
        "fastrm's maps share: {table}"
    );
}
