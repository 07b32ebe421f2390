//! The Python package (`pyproject.toml`, `src/python/`): built from this checkout with maturin
//! into a virtual environment and tested with pytest (`tests/python/`) against this build's
//! `fastrm` command: same ids, same maps bit for bit, the stream stopping when it is dropped, bad
//! input raising.
//!
//! Ignored by a plain `cargo test` (its reason says what it needs): `.ci/run` installs maturin,
//! pytest, NumPy and Pillow into `target/pyenv` and runs it with `--ignored`, where anything
//! missing is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The virtual environment to install into: `FASTRM_PYENV`, else the one `.ci/run` makes.
fn pyenv() -> PathBuf {
    std::env::var_os("FASTRM_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/pyenv"))
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
    assert!(status.success(), "{what} failed ({status}): {cmd:?}");
}

#[test]
#[ignore = "needs a virtual environment with maturin, pytest, numpy and pillow (.ci/run makes target/pyenv; or set FASTRM_PYENV): cargo test --test python -- --ignored"]
fn the_python_package_matches_the_command_line() {
    let env = pyenv();
    let python = env.join("bin/python");
    let maturin = env.join("bin/maturin");
    for tool in [&python, &maturin] {
        assert!(
            tool.is_file(),
            "{} is missing: make the environment with `python3 -m venv {}` and install maturin, \
             pytest, numpy and pillow into it",
            tool.display(),
            env.display()
        );
    }
    // A target folder of its own: the cargo running this test holds the lock on `target/`. A
    // wheel, not `maturin develop`, which would put the native module into the source tree.
    // Release: the dev profile's debug info for every dependency made the build two minutes
    // longer on CI's two cores (285 s against about 150 s).
    let target = repo_root().join("target/python");
    let wheels = target.join("wheels");
    let _ = std::fs::remove_dir_all(&wheels);
    run(
        Command::new(&maturin)
            .args(["build", "--release", "--quiet", "--interpreter"])
            .arg(&python)
            .arg("--out")
            .arg(&wheels)
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(repo_root()),
        "maturin build",
    );
    let wheel = std::fs::read_dir(&wheels)
        .expect("maturin's wheel folder")
        .map(|e| e.expect("a wheel folder entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("maturin built no wheel");
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--force-reinstall",
                "--no-deps",
            ])
            .arg(&wheel),
        "pip install",
    );
    run(
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(Path::new("tests/python"))
            .env("FASTRM_BIN", env!("CARGO_BIN_EXE_fastrm"))
            .current_dir(repo_root()),
        "pytest tests/python",
    );
}
