//! The distill data set on disk, read and written here only (`distill`, `merge`, `train` and
//! `eval` all go through these types):
//!
//! - `manifest.json` ([`Manifest`]): what made the set (model, method, suffix, input file and its
//!   fingerprint, …) and the completed shards in order.
//! - `shard-NNNNN.safetensors` ([`Shard`] in memory, [`ShardFile`] read back): `image_hidden`
//!   `[S, P, D]` f32, `token_hidden` `[M, D]` f32, `maps` `[M, P]` f32, `token_ids`,
//!   `token_sample` (sample index within the shard), `token_index` (position in its answer)
//!   `[M]` i64, and the per-sample records ([`SampleRecord`]) as JSON under the header metadata key
//!   `samples`.
//!
//! Both are written atomically (shards by [`crate::checkpoint::write`], deterministically). Reading checks a shard whole — tensor names,
//! dtypes and shapes, the manifest's geometry and entry, finite values, and every record against
//! its token rows — so a reader can index without further checks, and errors name the file.
//!
//! A shard file is memory-mapped: the per-token tensors are small next to the image hidden states
//! and are read into memory, while an image's `[P, D]` block is converted only when asked for, so
//! a data set larger than memory still trains.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::ShardSpec;
use crate::checkpoint::write::{self, Tensor};
use crate::error::{Error, Result};
use crate::util::write_atomic;

pub const MANIFEST_FORMAT: &str = "fastrm-distill";
pub const MANIFEST_VERSION: u32 = 1;
pub const SHARD_FORMAT: &str = "fastrm-distill-shard-1";
pub(super) const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputInfo {
    /// The questions file (canonical path).
    pub path: String,
    /// `vqa` or `jsonl`.
    pub format: String,
    /// FNV-1a 64 of its bytes, hex.
    pub fingerprint: String,
    /// Questions in the file.
    pub entries: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    /// Index of its first sample in the input's order.
    pub first_sample: usize,
    pub samples: usize,
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The model folder (canonical path).
    pub model: String,
    /// Names, lengths and modification times of its weight files: a model retrained in place is another
    /// model ("" in manifests written before this field existed, which therefore never resume).
    #[serde(default)]
    pub model_weights: String,
    pub method: String,
    /// Appended to every question ("" with `--no-suffix`).
    pub suffix: String,
    pub max_new_tokens: usize,
    pub stop_at_eos: bool,
    pub hidden_size: usize,
    pub n_patches: usize,
    pub grid: [usize; 2],
    pub label_threshold: f32,
    pub input: InputInfo,
    /// The images folder (canonical path).
    pub images: String,
    pub shard_size: usize,
    /// `--shard I/N` of a shard folder; absent for a whole (or merged) set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardSpec>,
    /// Completed shards, in sample order.
    pub shards: Vec<ShardInfo>,
    pub samples: usize,
    pub tokens: usize,
}

impl Manifest {
    /// Reads and checks `DIR/manifest.json`; errors name the folder or the file.
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "data folder {} does not exist (make one with `fastrm distill`)",
                dir.display()
            )));
        }
        let path = dir.join(MANIFEST);
        let bad = |msg: String| Error::input(format!("{}: {msg}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            bad(if e.is_data() {
                format!("not a distill manifest: {e}")
            } else {
                format!("not valid JSON: {e}")
            })
        })?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "manifest format {} v{} is not {MANIFEST_FORMAT} v{MANIFEST_VERSION}",
                m.format, m.version
            )));
        }
        if m.hidden_size == 0 || m.n_patches == 0 {
            return Err(bad(
                "`hidden_size` and `n_patches` must be at least 1".into()
            ));
        }
        if !(0.0..=1.0).contains(&m.label_threshold) {
            return Err(bad("`label_threshold` must be a number in [0, 1]".into()));
        }
        for (i, s) in m.shards.iter().enumerate() {
            // The name is joined to the folder: it must not lead out of it.
            if s.file.contains('/') || s.file.contains('\\') || s.file == ".." {
                return Err(bad(format!(
                    "shards[{i}].file {:?} must be a plain file name",
                    s.file
                )));
            }
        }
        Ok(m)
    }

    /// Writes `DIR/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::input(format!("manifest: {e}")))?;
        write_atomic(&dir.join(MANIFEST), text.as_bytes())
    }

    /// Sets the sample and token totals from the shard list.
    pub fn count(&mut self) {
        self.samples = self.shards.iter().map(|s| s.samples).sum();
        self.tokens = self.shards.iter().map(|s| s.tokens).sum();
    }

    /// Opens its shard `info` (an entry of [`Manifest::shards`]) in `dir`, checked against the
    /// manifest's geometry and the entry.
    pub fn open_shard(&self, dir: &Path, info: &ShardInfo) -> Result<ShardFile> {
        let path = dir.join(&info.file);
        let bad = |msg: String| Error::input(format!("{}: {msg}", path.display()));
        let sh = ShardFile::open(&path)?;
        let (p, d) = (self.n_patches, self.hidden_size);
        if (sh.n_patches, sh.hidden_size) != (p, d) {
            return Err(bad(format!(
                "`image_hidden` has shape [{}, {}, {}], expected [S, {p}, {d}] as the manifest says",
                sh.samples.len(),
                sh.n_patches,
                sh.hidden_size
            )));
        }
        if (sh.first_sample, sh.samples.len(), sh.n_tokens())
            != (info.first_sample, info.samples, info.tokens)
        {
            return Err(bad(format!(
                "holds samples from {} ({} samples, {} tokens), but its manifest entry says from \
                 {} ({} samples, {} tokens); rerun its distill to repair the folder",
                sh.first_sample,
                sh.samples.len(),
                sh.n_tokens(),
                info.first_sample,
                info.samples,
                info.tokens
            )));
        }
        Ok(sh)
    }
}

/// One sample's record in a shard's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// Index in the input's order.
    pub sample: usize,
    /// `question_id` (VQA) or line number (JSONL).
    pub question_id: u64,
    /// The question as in the input (without the suffix).
    pub question: String,
    pub image: String,
    /// The greedy answer, decoded without special tokens.
    pub answer: String,
    pub answers: Option<Vec<String>>,
    pub generated_ids: Vec<u32>,
    pub stop_reason: String,
    /// The JSONL line's `type`, `n_objects` and `target_mask` (as written), when it has them.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_objects: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mask: Option<String>,
}

/// A whole shard in memory: built sample by sample by `distill` and `merge`, or read back with
/// [`Shard::read`].
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub first_sample: usize,
    pub n_patches: usize,
    pub hidden_size: usize,
    pub samples: Vec<SampleRecord>,
    /// `[S·P·D]`
    pub image_hidden: Vec<f32>,
    /// `[M·D]`
    pub token_hidden: Vec<f32>,
    /// `[M·P]`
    pub maps: Vec<f32>,
    pub token_ids: Vec<i64>,
    pub token_sample: Vec<i64>,
    pub token_index: Vec<i64>,
}

pub fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.safetensors")
}

impl Shard {
    pub fn new(first_sample: usize, n_patches: usize, hidden_size: usize) -> Self {
        Shard {
            first_sample,
            n_patches,
            hidden_size,
            samples: Vec::new(),
            image_hidden: Vec::new(),
            token_hidden: Vec::new(),
            maps: Vec::new(),
            token_ids: Vec::new(),
            token_sample: Vec::new(),
            token_index: Vec::new(),
        }
    }

    pub fn n_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Appends a sample: its record, image hidden states `[P·D]` and per token (id, hidden `[D]`,
    /// map `[P]`).
    pub fn push(
        &mut self,
        record: SampleRecord,
        image_hidden: &[f32],
        tokens: &[(u32, Vec<f32>, Vec<f32>)],
    ) {
        let s = self.samples.len() as i64;
        self.image_hidden.extend_from_slice(image_hidden);
        for (k, (id, hidden, map)) in tokens.iter().enumerate() {
            self.token_hidden.extend_from_slice(hidden);
            self.maps.extend_from_slice(map);
            self.token_ids.push(*id as i64);
            self.token_sample.push(s);
            self.token_index.push(k as i64);
        }
        self.samples.push(record);
    }

    /// Writes the shard file atomically; the same shard is the same bytes.
    pub fn write(&self, path: &Path) -> Result<()> {
        let (s, m, p, d) = (
            self.samples.len(),
            self.n_tokens(),
            self.n_patches,
            self.hidden_size,
        );
        let tensors = [
            Tensor::f32("image_hidden", vec![s, p, d], &self.image_hidden),
            Tensor::f32("token_hidden", vec![m, d], &self.token_hidden),
            Tensor::f32("maps", vec![m, p], &self.maps),
            Tensor::i64("token_ids", vec![m], &self.token_ids),
            Tensor::i64("token_sample", vec![m], &self.token_sample),
            Tensor::i64("token_index", vec![m], &self.token_index),
        ];
        let samples = serde_json::to_string(&self.samples)
            .map_err(|e| Error::input(format!("shard records: {e}")))?;
        let meta = [
            ("format", SHARD_FORMAT.to_string()),
            ("first_sample", self.first_sample.to_string()),
            ("n_samples", s.to_string()),
            ("n_tokens", m.to_string()),
            ("samples", samples),
        ];
        write::write_file(path, &meta, &tensors)
    }

    /// Reads and checks a shard file completely.
    pub fn read(path: &Path) -> Result<Self> {
        ShardFile::open(path)?.into_shard()
    }
}

/// A shard file opened and checked whole. The records and per-token tensors are in memory; the
/// image hidden states stay in the mapped file until [`ShardFile::image_hidden`] asks for one
/// sample's.
pub struct ShardFile {
    pub path: PathBuf,
    pub first_sample: usize,
    pub n_patches: usize,
    pub hidden_size: usize,
    pub samples: Vec<SampleRecord>,
    /// `[M·D]`
    pub token_hidden: Vec<f32>,
    /// `[M·P]`
    pub maps: Vec<f32>,
    pub token_ids: Vec<i64>,
    pub token_sample: Vec<i64>,
    pub token_index: Vec<i64>,
    /// Per sample, its token rows in answer order.
    rows: Vec<Vec<usize>>,
    map: memmap2::Mmap,
    /// Byte offset of `image_hidden`'s data within the file.
    image_off: usize,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

impl ShardFile {
    /// Opens and checks a shard file on its own (against its manifest: [`Manifest::open_shard`]).
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::input(format!("{}: {msg}", path.display()));
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; a shard changed under a running reader is a user error
        // that at worst gives wrong numbers (distill writes shards atomically and never rewrites).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let invalid =
            |e: safetensors::SafeTensorError| bad(format!("not a valid safetensors shard: {e}"));
        let (_, md) = SafeTensors::read_metadata(&map).map_err(invalid)?;
        let (first_sample, samples) =
            shard_meta(&md.metadata().clone().unwrap_or_default()).map_err(bad)?;
        let st = SafeTensors::deserialize(&map).map_err(invalid)?;
        let get = |name: &str, dt: Dtype| -> Result<(Vec<usize>, &[u8])> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("missing tensor `{name}`")))?;
            if t.dtype() != dt {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {:?}, expected {dt:?}",
                    t.dtype()
                )));
            }
            Ok((t.shape().to_vec(), t.data()))
        };
        let (ish, idata) = get("image_hidden", Dtype::F32)?;
        let (tsh, tdata) = get("token_hidden", Dtype::F32)?;
        let (msh, mdata) = get("maps", Dtype::F32)?;
        if ish.len() != 3 || tsh.len() != 2 || msh.len() != 2 {
            return Err(bad(format!(
                "tensor ranks are not [S, P, D], [M, D], [M, P]: `image_hidden` {ish:?}, \
                 `token_hidden` {tsh:?}, `maps` {msh:?}"
            )));
        }
        let (s, p, d, m) = (ish[0], ish[1], ish[2], tsh[0]);
        if s != samples.len() || tsh[1] != d || msh != [m, p] {
            return Err(bad(format!(
                "tensor shapes disagree: `image_hidden` {ish:?}, `token_hidden` {tsh:?}, `maps` \
                 {msh:?}, {} records",
                samples.len()
            )));
        }
        let ids = |name: &str| -> Result<Vec<i64>> {
            let (shape, data) = get(name, Dtype::I64)?;
            if shape != [m] {
                return Err(bad(format!("`{name}` has shape {shape:?}, expected [{m}]")));
            }
            Ok(i64s(data))
        };
        let (token_ids, token_sample, token_index) =
            (ids("token_ids")?, ids("token_sample")?, ids("token_index")?);
        let (token_hidden, maps) = (f32s(tdata), f32s(mdata));
        if let Some(i) = maps.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`maps` has a non-finite value at token {}",
                i / p
            )));
        }
        if let Some(i) = token_hidden.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`token_hidden` has a non-finite value at token {}",
                i / d
            )));
        }
        let image_off = idata.as_ptr() as usize - map.as_ptr() as usize;
        drop(st);
        let mut shard = ShardFile {
            path: path.to_path_buf(),
            first_sample,
            n_patches: p,
            hidden_size: d,
            samples,
            token_hidden,
            maps,
            token_ids,
            token_sample,
            token_index,
            rows: Vec::new(),
            map,
            image_off,
        };
        shard.rows = shard.group_rows().map_err(bad)?;
        Ok(shard)
    }

    /// The token rows of each sample, checked against the records: every row belongs to one of
    /// the shard's samples, and a sample's rows, in file order, are positions 0, 1, … of the
    /// answer its record holds.
    fn group_rows(&self) -> std::result::Result<Vec<Vec<usize>>, String> {
        let mut rows = vec![Vec::new(); self.samples.len()];
        for (r, &s) in self.token_sample.iter().enumerate() {
            if s < 0 || s as usize >= rows.len() {
                return Err(format!(
                    "`token_sample`[{r}] = {s} is outside the shard's {} samples",
                    rows.len()
                ));
            }
            rows[s as usize].push(r);
        }
        for (si, (record, rows)) in self.samples.iter().zip(&rows).enumerate() {
            let sample = format!("sample {} (record {si} of the shard)", record.sample);
            let index: Vec<i64> = rows.iter().map(|&r| self.token_index[r]).collect();
            if index.iter().zip(0..).any(|(&k, want)| k != want) {
                return Err(format!(
                    "{sample}: `token_index` of its rows is {index:?}, not 0, 1, …"
                ));
            }
            let ids: Vec<i64> = rows.iter().map(|&r| self.token_ids[r]).collect();
            if !ids
                .iter()
                .copied()
                .eq(record.generated_ids.iter().map(|&i| i as i64))
            {
                return Err(format!(
                    "{sample}: the token rows give the answer {ids:?} but the record says {:?}: \
                     the shard is inconsistent",
                    record.generated_ids
                ));
            }
        }
        Ok(rows)
    }

    pub fn n_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Sample `si`'s token rows, in answer order.
    pub fn rows(&self, si: usize) -> &[usize] {
        &self.rows[si]
    }

    /// Row `r`'s hidden state `[D]`.
    pub fn token_hidden(&self, r: usize) -> &[f32] {
        let d = self.hidden_size;
        &self.token_hidden[r * d..(r + 1) * d]
    }

    /// Row `r`'s raw baseline map `[P]`.
    pub fn token_map(&self, r: usize) -> &[f32] {
        let p = self.n_patches;
        &self.maps[r * p..(r + 1) * p]
    }

    /// Sample `si`'s image hidden states `[P·D]`, row-major, read from the mapped file.
    pub fn image_hidden(&self, si: usize) -> Result<Vec<f32>> {
        let n = self.n_patches * self.hidden_size * 4;
        let start = self.image_off + si * n;
        let v = f32s(&self.map[start..start + n]);
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::input(format!(
                "{}: `image_hidden` of sample {} (record {si} of the shard) has a non-finite value",
                self.path.display(),
                self.samples[si].sample
            )));
        }
        Ok(v)
    }

    /// Sample `si` as `distill` made it: its record, image hidden states and per token (id,
    /// hidden, map), as [`Shard::push`] takes them.
    pub fn sample(&self, si: usize) -> Result<super::Distilled> {
        Ok(super::Distilled {
            record: self.samples[si].clone(),
            image_hidden: self.image_hidden(si)?,
            tokens: self.rows[si]
                .iter()
                .map(|&r| {
                    (
                        self.token_ids[r] as u32,
                        self.token_hidden(r).to_vec(),
                        self.token_map(r).to_vec(),
                    )
                })
                .collect(),
        })
    }

    /// The whole shard in memory.
    pub fn into_shard(self) -> Result<Shard> {
        let mut image_hidden =
            Vec::with_capacity(self.samples.len() * self.n_patches * self.hidden_size);
        for si in 0..self.samples.len() {
            image_hidden.extend(self.image_hidden(si)?);
        }
        Ok(Shard {
            first_sample: self.first_sample,
            n_patches: self.n_patches,
            hidden_size: self.hidden_size,
            samples: self.samples,
            image_hidden,
            token_hidden: self.token_hidden,
            maps: self.maps,
            token_ids: self.token_ids,
            token_sample: self.token_sample,
            token_index: self.token_index,
        })
    }
}

/// One token of a [`TokenSet`].
#[derive(Debug, Clone)]
pub struct Token {
    /// Index into [`TokenSet::samples`].
    pub sample: usize,
    /// Row of its shard's `token_hidden` / `maps`.
    pub row: usize,
}

/// One sample (an image with its question) of a [`TokenSet`]: where its image hidden states live.
#[derive(Debug, Clone)]
pub struct SampleRef {
    pub shard: usize,
    /// Index within the shard.
    pub index: usize,
}

/// A whole data set opened for training: every shard checked against the manifest and mapped,
/// the tokens listed by sample in data-set order.
pub struct TokenSet {
    pub dir: PathBuf,
    pub hidden_size: usize,
    pub n_patches: usize,
    /// The manifest's labelling threshold (fraction of a map's max).
    pub label_threshold: f32,
    pub samples: Vec<SampleRef>,
    /// Tokens, grouped by sample in data-set order.
    pub tokens: Vec<Token>,
    shards: Vec<ShardFile>,
}

impl TokenSet {
    /// Opens and checks a data folder; a set without tokens is refused.
    pub fn open(dir: &Path) -> Result<Self> {
        let m = Manifest::read(dir)?;
        let mut set = TokenSet {
            dir: dir.to_path_buf(),
            hidden_size: m.hidden_size,
            n_patches: m.n_patches,
            label_threshold: m.label_threshold,
            samples: Vec::new(),
            tokens: Vec::new(),
            shards: Vec::new(),
        };
        for info in &m.shards {
            let sh = m.open_shard(dir, info)?;
            let shard = set.shards.len();
            for index in 0..sh.samples.len() {
                let sample = set.samples.len();
                set.samples.push(SampleRef { shard, index });
                let rows = sh.rows(index).iter();
                set.tokens.extend(rows.map(|&row| Token { sample, row }));
            }
            set.shards.push(sh);
        }
        if set.tokens.is_empty() {
            return Err(Error::input(format!(
                "data set {} is empty: no tokens in its shards",
                dir.display()
            )));
        }
        Ok(set)
    }

    fn shard_of(&self, t: &Token) -> &ShardFile {
        &self.shards[self.samples[t.sample].shard]
    }

    /// A token's hidden state `[D]`.
    pub fn token_hidden(&self, t: &Token) -> &[f32] {
        self.shard_of(t).token_hidden(t.row)
    }

    /// A token's raw baseline map `[P]`.
    pub fn token_map(&self, t: &Token) -> &[f32] {
        self.shard_of(t).token_map(t.row)
    }

    /// A sample's image hidden states `[P, D]`, row-major.
    pub fn image_hidden(&self, sample: usize) -> Result<Vec<f32>> {
        let s = &self.samples[sample];
        self.shards[s.shard].image_hidden(s.index)
    }
}

fn shard_meta(
    meta: &HashMap<String, String>,
) -> std::result::Result<(usize, Vec<SampleRecord>), String> {
    if meta.get("format").map(String::as_str) != Some(SHARD_FORMAT) {
        return Err(format!("not a {SHARD_FORMAT} file"));
    }
    let first = meta
        .get("first_sample")
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or("metadata `first_sample` missing or not an integer")?;
    let samples: Vec<SampleRecord> =
        serde_json::from_str(meta.get("samples").ok_or("metadata `samples` missing")?)
            .map_err(|e| format!("metadata `samples`: {e}"))?;
    Ok((first, samples))
}

/// The header of a shard only (first sample, records, token count), without reading the tensors.
pub(super) fn read_shard_header(
    path: &Path,
) -> std::result::Result<(usize, Vec<SampleRecord>, usize), String> {
    let (header, data_len) = write::read_header(path, 1 << 30).map_err(|e| e.to_string())?;
    let meta: HashMap<String, String> =
        serde_json::from_value(header.get("__metadata__").cloned().unwrap_or_default())
            .map_err(|e| e.to_string())?;
    let (first, samples) = shard_meta(&meta)?;
    let tokens = header
        .get("token_ids")
        .and_then(|t| t.get("shape"))
        .and_then(|s| s.get(0))
        .and_then(|x| x.as_u64())
        .ok_or("no token_ids tensor")? as usize;
    // The file must be complete: its data is exactly up to the last tensor's end.
    let end = header
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if data_len != end {
        return Err(format!(
            "truncated ({data_len} bytes of data, expected {end})"
        ));
    }
    Ok((first, samples, tokens))
}

/// Is `name` one of the files `distill` writes into its folder (shards, the manifest, or their
/// temporary files)?
pub(super) fn is_shard_name(name: &str) -> bool {
    name.len() == "shard-00000.safetensors".len()
        && name.starts_with("shard-")
        && name.ends_with(".safetensors")
        && name[6..11].bytes().all(|b| b.is_ascii_digit())
}

pub(super) fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name.contains(".tmp-")
        && (name.starts_with(".shard-") || name.starts_with(".manifest.json"))
}
