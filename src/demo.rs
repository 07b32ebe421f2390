//! The bundled demo model, its FastRM head and its scene, embedded in the binary so that a
//! command left without `--model` works wherever the binary runs (after `cargo install`, from any
//! working directory), not only next to the source tree.
//!
//! The engine reads model folders from disk (the weights are memory-mapped), so the embedded files
//! are written once into a cache folder named after their content hash and loaded from there:
//! `$XDG_CACHE_HOME/fastrm/demo-<hash>/`, else `~/.cache/fastrm/demo-<hash>/`, else the OS temp
//! folder. The folder is filled under a temporary name and renamed into place, so a reader never
//! sees it half written and concurrent first runs do not clash.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// `(path inside the demo folder, contents)`.
const FILES: &[(&str, &[u8])] = &[
    (
        "model/config.json",
        include_bytes!("../assets/demo/model/config.json"),
    ),
    (
        "model/tokenizer.json",
        include_bytes!("../assets/demo/model/tokenizer.json"),
    ),
    (
        "model/preprocessor_config.json",
        include_bytes!("../assets/demo/model/preprocessor_config.json"),
    ),
    (
        "model/model.safetensors",
        include_bytes!("../assets/demo/model/model.safetensors"),
    ),
    (
        "head.safetensors",
        include_bytes!("../assets/demo/head.safetensors"),
    ),
    ("image.png", include_bytes!("../assets/demo/image.png")),
];

/// The demo model's `tokenizer.json`, as embedded.
pub fn tokenizer_json() -> &'static [u8] {
    FILES
        .iter()
        .find(|(p, _)| *p == "model/tokenizer.json")
        .map_or(&[], |(_, b)| b)
}

/// The demo model folder (HF llava-hf layout).
pub fn model_dir() -> Result<PathBuf> {
    Ok(dir()?.join("model"))
}

/// The demo model's trained FastRM head.
pub fn head_path() -> Result<PathBuf> {
    Ok(dir()?.join("head.safetensors"))
}

/// The demo scene (a yellow star, a white circle, a red cross).
pub fn image_path() -> Result<PathBuf> {
    Ok(dir()?.join("image.png"))
}

/// The cache folder holding the demo files, written on first use (once per process at most).
pub fn dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let name = format!("demo-{:016x}", content_hash());
        let mut tried = Vec::new();
        for root in cache_roots() {
            match materialise(&root, &name) {
                Ok(dir) => return Ok(dir),
                Err(e) => {
                    tracing::debug!(root = %root.display(), error = %e, "demo cache unusable");
                    tried.push(format!("{}: {e}", root.display()));
                }
            }
        }
        Err(format!(
            "could not write the bundled demo model to a cache folder ({}); pass --model",
            tried.join("; ")
        ))
    })
    .clone()
    .map_err(Error::Input)
}

/// FNV-1a over every file's name and bytes: a new build with changed demo files gets a new folder
/// instead of reading stale ones.
fn content_hash() -> u64 {
    let mut h = crate::util::Fnv1a::default();
    for (name, bytes) in FILES {
        h.update(name.as_bytes()).update(&[0]).update(bytes);
    }
    h.finish()
}

/// Where the cache may live, best first.
fn cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        roots.push(PathBuf::from(x).join("fastrm"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        roots.push(PathBuf::from(home).join(".cache").join("fastrm"));
    }
    roots.push(std::env::temp_dir().join("fastrm"));
    roots
}

/// Whether `dir` holds every demo file at its full size (a file truncated or removed by hand
/// makes the folder be written again).
fn complete(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
    })
}

/// `root/name`, written if it is missing or incomplete.
fn materialise(root: &Path, name: &str) -> std::io::Result<PathBuf> {
    let dir = root.join(name);
    if complete(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(root)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = root.join(format!(".{name}.{}.{nanos}", std::process::id()));
    let written = write_all(&tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        // Incomplete: moved aside first, because a rename does not replace a non-empty folder.
        let stale = root.join(format!(".{name}.stale.{}.{nanos}", std::process::id()));
        if std::fs::rename(&dir, &stale).is_ok() {
            let _ = std::fs::remove_dir_all(&stale);
        }
    }
    let renamed = std::fs::rename(&tmp, &dir);
    if renamed.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    // Another process may have put a complete folder in place first: that one serves as well.
    if complete(&dir) {
        tracing::info!(dir = %dir.display(), "bundled demo model ready");
        Ok(dir)
    } else {
        renamed?;
        Err(std::io::Error::other(
            "the folder is incomplete after writing",
        ))
    }
}

fn write_all(tmp: &Path) -> std::io::Result<()> {
    for (name, bytes) in FILES {
        let path = tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialises_once_and_repairs_a_truncated_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = materialise(root.path(), "demo-test").unwrap();
        assert!(complete(&dir));
        std::fs::write(dir.join("model/config.json"), b"{").unwrap();
        assert!(!complete(&dir));
        let again = materialise(root.path(), "demo-test").unwrap();
        assert_eq!(again, dir);
        assert!(complete(&dir));
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["demo-test"], "no temporary folders left behind");
    }

    #[test]
    fn an_unwritable_root_is_an_error_not_a_panic() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(materialise(&file, "demo-test").is_err());
    }
}
