//! `fastrm gpu-check` (hidden; the device check's first step): opens the CUDA backend, runs one
//! real GEMM checked against the CPU, and reports which driver, cuBLAS and NVML files the process
//! actually mapped, the driver version and the device's name. Any failure is an error, so a
//! machine whose GPU cannot be used fails the check instead of skipping what follows.

use serde_json::{json, Value};

use super::{Cuda, Elem};
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::util::SplitMix64;

/// The libraries whose mapped files are reported (matched against the file's name).
const LIBRARIES: [&str; 3] = ["libcuda.so", "libcublas", "libnvidia-ml"];

/// Checks `b` and returns the report (also the error's text when the GEMM is wrong).
pub fn check<T: Elem>(b: &Cuda<T>) -> Result<Value> {
    // Shapes that go through cuBLAS's general path (not a vector product), small enough to
    // compute on the CPU at once.
    let (m, k, n) = (64, 320, 96);
    let mut rng = SplitMix64::new(7);
    let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.uniform_sym()).collect() };
    let (x, w) = (b.upload(&rand(m * k), m, k)?, b.upload(&rand(n * k), n, k)?);
    let y = b.download(&b.linear(&x, &w, None)?)?;
    // The CPU product of the values the device holds (rounded to its storage type).
    let (xh, wh) = (b.download(&x)?, b.download(&w)?);
    let want =
        Cpu.download(&Cpu.linear(&Cpu.upload(&xh, m, k)?, &Cpu.upload(&wh, n, k)?, None)?)?;
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = y
        .iter()
        .zip(&want)
        .fold(0f32, |a, (g, w)| a.max((g - w).abs()))
        / scale.max(f32::MIN_POSITIVE);
    // f16 output rounding (2^-11) plus f32 accumulation order, with room to spare.
    let tol = 1e-2f64;
    let err = f64::from(err);
    let ok = err.is_finite() && err <= tol;
    // NVML stays loaded (`_nvml`) until the maps are read: dropping it unloads the library.
    let (driver, nvml_name, _nvml) = nvml_facts();
    let report = json!({
        "device_name": b.device_name(),
        "nvml_device_name": nvml_name.as_ref().map_or(Value::Null, |n| json!(n)),
        "driver_version": driver.as_ref().map_or(Value::Null, |d| json!(d)),
        "nvml_error": nvml_name.as_ref().err().or(driver.as_ref().err()).map(|e| e.to_string()),
        "dtype": T::NAME,
        "gemm": {"m": m, "k": k, "n": n, "max_rel_err": err, "tolerance": tol, "ok": ok},
        "libraries": mapped_libraries(),
    });
    if !ok {
        return Err(Error::Backend(format!(
            "gpu-check: the device GEMM differs from the CPU's (max relative error {err:.2e} > \
             {tol:.0e}): {report}"
        )));
    }
    Ok(report)
}

/// The driver version and device 0's name from NVML, and NVML itself (which maps
/// `libnvidia-ml` while it lives).
#[cfg(feature = "cuda")]
fn nvml_facts() -> (Result<String>, Result<String>, Option<nvml_wrapper::Nvml>) {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let e = format!("NVML failed to initialise: {e}");
            return (Err(Error::Backend(e.clone())), Err(Error::Backend(e)), None);
        }
    };
    let nvml_err = |e: nvml_wrapper::error::NvmlError| Error::Backend(format!("NVML: {e}"));
    let driver = nvml.sys_driver_version().map_err(nvml_err);
    let name = nvml
        .device_by_index(0)
        .and_then(|d| d.name())
        .map_err(nvml_err);
    (driver, name, Some(nvml))
}

#[cfg(not(feature = "cuda"))]
fn nvml_facts() -> (Result<String>, Result<String>, Option<()>) {
    let e = || Err(Error::input(crate::backend::NO_CUDA));
    (e(), e(), None)
}

/// `{library: [paths]}`: every file of [`LIBRARIES`] mapped into this process, from
/// `/proc/self/maps` (what the dynamic loader actually chose, not what a search path suggests).
fn mapped_libraries() -> Value {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut out = serde_json::Map::new();
    for lib in LIBRARIES {
        let mut paths: Vec<&str> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| {
                p.rsplit('/')
                    .next()
                    .is_some_and(|file| file.starts_with(lib))
            })
            .collect();
        paths.sort_unstable();
        paths.dedup();
        out.insert(lib.trim_end_matches(".so").into(), json!(paths));
    }
    Value::Object(out)
}
