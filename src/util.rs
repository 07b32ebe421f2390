//! Small pieces every layer uses and none owns: the seeded generator, the content hash, atomic
//! file writes and names for the enums that command lines and request fields spell out. Nothing
//! here imports from the rest of the crate but the error type.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// An enum named by strings on command lines, in request fields and in files.
pub trait Named: Copy + PartialEq + Send + Sync + 'static {
    /// Every value, in the order help texts list them.
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
    /// One line for help texts.
    fn help(self) -> &'static str;
    /// The value called `s`, if any.
    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == s)
    }
}

/// A report or response as JSON text (`pretty`: indented). Through [`serde_json::Value`], which
/// holds every number as an `f64`: an `f32` field is written as the `f64` it converts to exactly
/// (`0.4160856902599334`, not `0.4160857`), the same digits in every document the command line
/// and the server write, and what a JSON reader's doubles hold.
pub fn json_text(value: &impl serde::Serialize, pretty: bool) -> Result<String> {
    let v = serde_json::to_value(value).map_err(|e| Error::input(format!("JSON: {e}")))?;
    let text = if pretty {
        serde_json::to_string_pretty(&v)
    } else {
        serde_json::to_string(&v)
    };
    text.map_err(|e| Error::input(format!("JSON: {e}")))
}

/// Small, fast, seedable generator (SplitMix64); good enough for test data and synthetic weights.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The generator seeded with `seed` after `n` draws: the state advances by a constant per
    /// draw, so any stretch of a stream can be drawn on its own (in parallel).
    pub fn skipped(seed: u64, n: u64) -> Self {
        SplitMix64(seed.wrapping_add(n.wrapping_mul(Self::GAMMA)))
    }
    const GAMMA: u64 = 0x9E3779B97F4A7C15;
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform_sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// FNV-1a, 64 bit, fed in pieces: a cheap content fingerprint (not a security hash).
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The message a caught panic carried (`panic!` with a string or a format), for an error.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// A size in bytes as people write it: a number (`2e9`, `1.5`) with an optional unit — `K`, `M`,
/// `G`, `T` or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), `KB`, `MB`, `GB`, `TB` (powers of
/// 1000), `B` — case-insensitive. Errors name what was wrong.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 4GiB, 512MiB, 2e9)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => {
            return Err(format!(
                "`{text}`: unknown unit `{u}` (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{text}` is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

/// [`parse_bytes`] that also takes `0` (a cache that is off).
pub fn parse_bytes_or_zero(text: &str) -> std::result::Result<u64, String> {
    match text.trim() {
        "0" => Ok(0),
        _ => parse_bytes(text),
    }
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    Fnv1a::default().update(bytes).finish()
}

/// Distinguishes the temporary files of concurrent writes within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `path` so that a reader (or a crash) never sees half of it: the bytes go to a new hidden
/// file in the same folder (`.<name>.<pid>-<n>.tmp`: the same file system, so the rename is
/// atomic), which is synced before it is renamed over the target; the folder is synced after, so
/// the rename itself survives a power loss. Errors name `path`; a failed write removes its
/// temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] with the content streamed by `fill` (large files need not be held in memory).
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::input(format!("{}: does not name a file", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Keep the temporary name short enough for NAME_MAX whatever the target's length.
    let short: String = name.to_string_lossy().chars().take(64).collect();
    let tmp = dir.join(format!(
        ".{short}.{}-{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            let why = format!("cannot create a temporary file in {}: {e}", dir.display());
            Error::io(path, io::Error::new(e.kind(), why))
        })?;
    let written = (|| {
        let mut w = BufWriter::new(&file);
        fill(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // A folder opened read-only can be synced on Unix; elsewhere this is best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_their_units_and_bad_ones_are_named() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512 mib"), Ok(512 << 20));
        assert_eq!(parse_bytes("2e9"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1.5KB"), Ok(1500));
        assert_eq!(parse_bytes("7"), Ok(7));
        assert_eq!(parse_bytes("3G"), Ok(3 << 30));
        assert!(parse_bytes("4 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_bytes("lots").unwrap_err().contains("not a size"));
        assert!(parse_bytes("0").unwrap_err().contains("at least one byte"));
        assert!(parse_bytes("-3MiB").is_err());
    }
}
