//! Kernels: `kernels/*.cu` → `kernels/ptx/*.ptx`, checked in so a build never needs nvcc.
//!
//! The PTX is checked in and embedded with `include_str!`, so a build never needs nvcc. When the
//! pinned nvcc (13.0, whose PTX ISA 9.0 the GPU hosts' driver 580 accepts) is available — named by
//! `FASTRM_NVCC`, or `nvcc` on PATH — a changed kernel source is recompiled here; any other nvcc is
//! left alone with a warning, because a newer compiler emits PTX the driver rejects. CI regenerates
//! with the pinned compiler and fails on any difference (`tools/ptx.sh --check`).
use std::path::{Path, PathBuf};
use std::process::Command;

const PINNED: &str = "V13.0.88";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=FASTRM_NVCC");
    #[cfg(feature = "sim")]
    build_simulator();
    // Only GPU builds load the PTX; a CPU-only or simulator-only build has no use for nvcc.
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let Some(nvcc) = pinned_nvcc() else { return };
    let dir = Path::new("kernels");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let header = dir.join("common.cuh");
    for e in entries.flatten() {
        let src = e.path();
        if src.extension().and_then(|x| x.to_str()) != Some("cu") {
            continue;
        }
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let out = dir.join("ptx").join(format!("{stem}.ptx"));
        if !stale(&out, &[&src, &header]) {
            continue;
        }
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-arch=sm_80", "-std=c++17", "-o"])
            .arg(&out)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            // A kernel that does not compile must fail the build, not ship stale PTX.
            Ok(s) => panic!("nvcc failed on {} ({s})", src.display()),
            Err(e) => panic!("could not run {}: {e}", nvcc.display()),
        }
    }
}

fn pinned_nvcc() -> Option<PathBuf> {
    let nvcc = std::env::var_os("FASTRM_NVCC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = Command::new(&nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains(PINNED) {
        Some(nvcc)
    } else {
        println!(
            "cargo:warning=ignoring {} (not nvcc {PINNED}); using the checked-in PTX",
            nvcc.display()
        );
        None
    }
}

fn stale(out: &Path, inputs: &[&Path]) -> bool {
    let Ok(t_out) = std::fs::metadata(out).and_then(|m| m.modified()) else {
        return true;
    };
    inputs.iter().any(|p| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .map_or(true, |t| t > t_out)
    })
}

/// The simulated device (`--features sim`): every `kernels/*.cu` compiled as host C++ together with
/// the runtime and the simulator's self-test kernels in `kernels/sim/`, as one translation unit, so
/// the kernels' static registrations are linked whenever the runtime is.
#[cfg(feature = "sim")]
fn build_simulator() {
    // Read when the script runs, not baked in when it is compiled: cargo may reuse one compiled
    // build script for checkouts of the same package in other folders.
    let root = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = root.as_path();
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))
        .expect("kernels/ is readable")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("cu"))
        .collect();
    kernels.sort();
    let mut unit = format!(
        "#include \"{}\"\n",
        root.join("kernels/sim/runtime.cpp").display()
    );
    for k in kernels
        .iter()
        .chain([&root.join("kernels/sim/selftest.cpp")])
    {
        unit.push_str(&format!("#include \"{}\"\n", k.display()));
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = out.join("fastrm_sim.cpp");
    std::fs::write(&src, unit).expect("OUT_DIR is writable");
    cc::Build::new()
        .cpp(true)
        .file(&src)
        .define("FASTRM_SIM", None)
        .flag("-std=c++17")
        .flag("-ffp-contract=off")
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-sign-compare")
        .opt_level(2)
        .compile("fastrm_sim");
}
