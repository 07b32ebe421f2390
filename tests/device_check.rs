//! `tools/device-check.sh`, the run for the lent GPU machine, in its dry run: stub commands and a
//! fake library tree instead of a GPU, limits scaled down. What the device tool hands back (at
//! most 8 files, at most two folders down) and the time budget are checked here, where a mistake
//! costs nothing, rather than on the device, where a run is a quarter of the budget.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Limits are multiplied by this in the tests (a 70 s step gets 2.1 s; none gets under 1 s).
const SCALE: f64 = 0.03;

struct Run {
    out: Output,
    dir: tempfile::TempDir,
    wall: Duration,
}

impl Run {
    fn results(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.path().join("results.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
    fn steps(&self) -> Vec<(String, String)> {
        self.results()["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let f = |k: &str| s[k].as_str().unwrap().to_string();
                (f("name"), f("status"))
            })
            .collect()
    }
    fn log(&self, name: &str) -> String {
        let tar = Command::new("tar")
            .arg("-xzOf")
            .arg(self.dir.path().join("logs.tar.gz"))
            .arg(format!("logs/{name}.log"))
            .output()
            .unwrap();
        assert!(tar.status.success(), "no logs/{name}.log in the archive");
        String::from_utf8_lossy(&tar.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
}

fn device_check(args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let out = Command::new("bash")
        .arg(common::repo_root().join("tools/device-check.sh"))
        .arg("--dry-run")
        .args(args)
        .env("OUT", dir.path())
        .env("DEVICE_CHECK_TIME_SCALE", SCALE.to_string())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        out,
        dir,
        wall: t0.elapsed(),
    }
}

/// Every plain file under `dir`, with its depth in folders below `dir`.
fn files(dir: &Path, depth: usize, acc: &mut Vec<(PathBuf, usize)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, depth + 1, acc);
        } else {
            acc.push((p, depth));
        }
    }
}

/// The whole run with a step that hangs: it is cut at its (scaled) limit, the run goes on and
/// ends within the budget, and what comes back fits the device tool's limits.
#[test]
fn a_hanging_step_is_cut_and_the_run_finishes_within_budget() {
    let r = device_check(
        &["--reference", "--with-7b"],
        &[("DEVICE_CHECK_STUB_HANG", "bench")],
    );
    assert_eq!(
        r.out.status.code(),
        Some(1),
        "a timed-out step fails the run"
    );
    let mut got = Vec::new();
    files(r.dir.path(), 0, &mut got);
    assert!(got.len() <= 8, "{got:?}");
    assert!(got.iter().all(|(_, d)| *d <= 2), "{got:?}");
    let names: Vec<_> = got
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    for want in ["summary.txt", "results.json", "logs.tar.gz"] {
        assert!(names.contains(&want.to_string()), "{names:?}");
    }
    let v = r.results();
    assert_eq!(v["verdict"], "FAIL");
    let steps = r.steps();
    let order: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        order,
        [
            "preflight",
            "bench",
            "profile",
            "tests",
            "reference",
            "write-7b"
        ]
    );
    for (name, status) in &steps {
        if name == "bench" {
            assert!(status.starts_with("timed out"), "{status}");
        } else {
            assert_eq!(status, "pass", "{name}");
        }
    }
    // The budget: every step's limit plus its kill grace, scaled (the real one is ≤ 6 minutes
    // without the 7B writer); the run may add only the script's own bookkeeping.
    let limits: f64 = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["effective_limit_s"].as_f64().unwrap())
        .sum();
    assert!(
        r.wall.as_secs_f64() < limits + 20.0,
        "{:?} for limits of {limits} s",
        r.wall
    );
    let default_budget: f64 = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] != "write-7b")
        .map(|s| s["limit_s"].as_f64().unwrap() + 3.0)
        .sum();
    assert!(default_budget <= 360.0, "{default_budget}");
    // The library path reaches our binaries (the pre-flight saw the fake cuBLAS) and not the
    // Python steps.
    let lib = &v["preflight"]["libraries"]["libcublas"][0];
    assert!(lib.as_str().unwrap().contains("fakelib"), "{v}");
    let reference = r.log("reference");
    assert!(!reference.contains("fakelib"), "{reference}");
    assert!(r.log("tests").contains("test result: ok"));
    assert_eq!(v["write_7b"]["load_seconds"], 1.25);
    // The summary puts the numbers before the step table.
    let summary = std::fs::read_to_string(r.dir.path().join("summary.txt")).unwrap();
    assert!(summary.starts_with("device check: FAIL"), "{summary}");
    let (bench, table) = (
        summary.find("RESULT decode_ms").unwrap_or(usize::MAX),
        summary.find("---- steps").unwrap(),
    );
    assert_eq!(
        bench,
        usize::MAX,
        "the hung bench printed nothing: {summary}"
    );
    assert!(summary.find("---- profile").unwrap() < table, "{summary}");
    // The memory claim both ways, from the stubs' allocated peaks (FastRM 14.6 GB, our baseline
    // 16.4 GB, PyTorch's 26.0 GB: 1 - 14.6/16.4 and 1 - 14.6/26.0), and NVML's (15 and 20 GB).
    let head = summary.lines().find(|l| l.contains("allocated:")).unwrap();
    assert!(
        head.contains("our baseline 16.40 GB (fastrm 11.0% less)"),
        "{head}"
    );
    assert!(
        head.contains("PyTorch baseline 26.00 GB (fastrm 43.8% less)"),
        "{head}"
    );
    let nvml = summary.lines().find(|l| l.contains("NVML:")).unwrap();
    assert!(
        nvml.contains("our baseline 20.00 GB (fastrm 25.0% less)"),
        "{nvml}"
    );
    assert!(summary.find(head).unwrap() < table, "{summary}");
}

/// A failing pre-flight fails the run at once: nothing else runs, and the results say so.
#[test]
fn a_failing_preflight_stops_the_run() {
    let r = device_check(&[], &[("DEVICE_CHECK_STUB_FAIL", "preflight")]);
    assert_eq!(r.out.status.code(), Some(1), "{}", r.stderr());
    let steps = r.steps();
    assert_eq!(steps[0], ("preflight".into(), "fail".into()));
    assert_eq!(steps.len(), 4, "{steps:?}");
    for (name, status) in &steps[1..] {
        assert!(
            status.starts_with("not run (pre-flight failed"),
            "{name}: {status}"
        );
    }
    assert!(r.log("preflight").contains("told to fail"));
}

/// `--only` runs the named steps, in the run's order, and nothing else; a bad name is an error.
#[test]
fn only_runs_the_named_steps() {
    let r = device_check(&["--only", "tests,preflight"], &[]);
    assert!(r.out.status.success(), "{}", r.stderr());
    let steps = r.steps();
    assert_eq!(
        steps,
        [
            ("preflight".to_string(), "pass".to_string()),
            ("tests".to_string(), "pass".to_string())
        ]
    );
    let r = device_check(&["--only", "bench,nosuch"], &[]);
    assert_eq!(r.out.status.code(), Some(2));
    assert!(r.stderr().contains("no step 'nosuch'"), "{}", r.stderr());
    let r = device_check(&["--limit", "profile=abc"], &[]);
    assert_eq!(r.out.status.code(), Some(2));
    assert!(r.stderr().contains("STEP=SECONDS"), "{}", r.stderr());
}

/// The pre-flight command itself, on the simulated device: one real GEMM against the CPU.
#[cfg(feature = "sim")]
#[test]
fn gpu_check_runs_a_gemm_on_the_simulator() {
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["gpu-check", "--sim"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gemm"]["ok"], true, "{v}");
    assert!(v["gemm"]["max_rel_err"].as_f64().unwrap() < 1e-2, "{v}");
    for lib in ["libcuda", "libcublas", "libnvidia-ml"] {
        assert!(v["libraries"][lib].is_array(), "{v}");
    }
}

/// The real run refuses a stage that is incomplete (naming each missing file) or built from other
/// sources than the tree it runs in (an edit after staging), before it spends device time.
#[test]
fn an_incomplete_or_stale_stage_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    std::fs::create_dir_all(root.join("tools")).unwrap();
    std::fs::copy(
        common::repo_root().join("tools/device-check.sh"),
        root.join("tools/device-check.sh"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(root.join("Cargo.toml"), "[package]\n").unwrap();
    std::fs::write(root.join("src/lib.rs"), "// one\n").unwrap();
    let run = |args: &[&str]| {
        let list = root.join("stage/device/SOURCE_FILES");
        let stdin = match std::fs::File::open(&list) {
            Ok(f) => std::process::Stdio::from(f),
            Err(_) => std::process::Stdio::null(),
        };
        Command::new("bash")
            .arg(root.join("tools/device-check.sh"))
            .args(args)
            .current_dir(root)
            .env("OUT", root.join("out"))
            .stdin(stdin)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lacks fastrm cuda-tests cuda-bench COMMIT SOURCE_FILES SOURCE_HASH"),
        "{err}"
    );
    // A complete stage of these very sources, then an edit.
    let stage = root.join("stage/device");
    std::fs::create_dir_all(&stage).unwrap();
    for f in ["fastrm", "cuda-tests", "cuda-bench"] {
        std::fs::write(stage.join(f), "#!/bin/sh\nexit 0\n").unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(stage.join(f))
            .status()
            .unwrap();
    }
    std::fs::write(stage.join("COMMIT"), "abc123\n").unwrap();
    std::fs::write(stage.join("SOURCE_FILES"), "src/lib.rs\0Cargo.toml\0").unwrap();
    let hash = run(&["--source-hash"]);
    assert!(hash.status.success());
    let hash = String::from_utf8(hash.stdout).unwrap();
    assert_eq!(hash.trim().len(), 64, "{hash}");
    std::fs::write(stage.join("SOURCE_HASH"), &hash).unwrap();
    assert_eq!(run(&["--source-hash"]).stdout, hash.as_bytes(), "stable");
    let stale = || {
        let out = run(&[]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("built from other sources (abc123"), "{err}");
    };
    std::fs::write(root.join("src/lib.rs"), "// two\n").unwrap();
    stale();
    // A listed file that is gone is a different tree too.
    std::fs::write(root.join("src/lib.rs"), "// one\n").unwrap();
    assert_eq!(run(&["--source-hash"]).stdout, hash.as_bytes());
    std::fs::remove_file(root.join("Cargo.toml")).unwrap();
    stale();
}
