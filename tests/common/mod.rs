//! Shared helpers for the integration tests: fixture paths, the oracle's recorded tensors, and
//! tolerance checks that report where and by how much a comparison failed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// The repository root: where the tests were built, or `FASTRM_ROOT` for prebuilt test binaries
/// run from a copy of the tree elsewhere (the GPU host, `tools/device-check.sh`).
pub fn repo_root() -> PathBuf {
    std::env::var_os("FASTRM_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// Which image file a fixture uses (PNG for `tiny`, JPEG for `clip336`).
pub fn fixture_image(name: &str) -> PathBuf {
    let dir = fixture_dir(name);
    ["image.png", "image.jpg"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no image.png/jpg in {}", dir.display()))
}

/// Tensors the Python oracle recorded (`expected.safetensors`), converted to f32 / i64.
pub struct Expected {
    pub f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub i64s: HashMap<String, Vec<i64>>,
    pub meta: HashMap<String, String>,
}

impl Expected {
    pub fn load(name: &str) -> Self {
        let path = fixture_dir(name).join("expected.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = md.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut f32s = HashMap::new();
        let mut i64s = HashMap::new();
        for (name, v) in st.tensors() {
            let d = v.data();
            match v.dtype() {
                Dtype::F32 => {
                    let x = d
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    f32s.insert(name, (v.shape().to_vec(), x));
                }
                Dtype::I64 => {
                    let x = d
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    i64s.insert(name, x);
                }
                other => panic!("unexpected dtype {other:?} for {name}"),
            }
        }
        Expected { f32s, i64s, meta }
    }

    pub fn f32(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.f32s
            .get(name)
            .unwrap_or_else(|| panic!("expected.safetensors has no `{name}`"))
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.i64s
            .get(name)
            .unwrap_or_else(|| panic!("expected.safetensors has no `{name}`"))
            .iter()
            .map(|&x| x as u32)
            .collect()
    }
}

/// Max |a-b| / (max|b| over the whole tensor): a relative error that does not blow up on values
/// near zero, which tiny random models produce plenty of.
pub fn rel_err(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / scale;
        // NaN counts as the worst error, not as no error.
        if e.is_nan() || e > worst.0 {
            worst = (if e.is_nan() { f32::INFINITY } else { e }, i);
        }
    }
    worst
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let (e, i) = rel_err(got, want);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.0e} at index {i} (got {}, want {})",
        got[i],
        want[i]
    );
    eprintln!("{what}: max relative error {e:.2e}");
}

/// One tensor of a safetensors file, owned, for tests that build or corrupt checkpoints.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn read_safetensors(path: &Path) -> Vec<RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| RawTensor {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// A copy of a fixture's model folder in a fresh temporary directory, for tests that damage it.
pub fn copy_model(fixture: &str, sub: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture_dir(fixture).join(sub);
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if !e.file_type().unwrap().is_file() {
            continue;
        }
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

/// A CLI run that succeeded: its stdout.
pub fn cli_ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A CLI run that failed with one `error:` line mentioning every needle.
pub fn cli_fails(o: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    let line = err.trim();
    assert!(line.starts_with("error:"), "{err}");
    assert_eq!(line.lines().count(), 1, "one-line error expected: {err}");
    for n in needles {
        assert!(line.contains(n), "{n:?} not in {line:?}");
    }
}

/// An 8-bit RGB PNG as written by the engine (its colour type and depth asserted).
pub fn decode_png(path: &Path) -> fastrm::vision::RgbImage {
    let file = std::io::BufReader::new(
        std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    );
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    fastrm::vision::RgbImage::new(info.width as usize, info.height as usize, buf).unwrap()
}

/// The names in a folder, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every token's map from an `explain.json`, in token order.
pub fn maps_of(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["map"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Pearson correlation of two equally long vectors (1 when both are constant and equal).
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (ma, mb) = (mean(a), mean(b));
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 && sbb == 0.0 {
        return if a == b { 1.0 } else { 0.0 };
    }
    sab / (saa * sbb).sqrt()
}

/// `fastrm serve` on an ephemeral port (one CPU thread, `extra` flags), and the address it
/// announced on its first line of output.
pub fn spawn_server(extra: &[&str]) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["serve", "--port", "0", "-t", "1"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fastrm serve starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

/// Options for exactly `n` tokens whatever they are (EOS does not stop the run), the way the
/// oracles generate; `keep_steps` keeps each step's logits.
pub fn forced(n: usize, keep_steps: bool) -> fastrm::GenerateOptions {
    fastrm::GenerateOptions {
        max_new_tokens: n,
        stop_at_eos: false,
        keep_steps,
        ..Default::default()
    }
}

/// The array `v[key]` of a JSON document as ids.
pub fn json_ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is an array"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The array `v[key]` of a JSON document as floats.
pub fn json_f32s(v: &serde_json::Value, key: &str) -> Vec<f32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is an array"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}
