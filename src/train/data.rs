//! The distilled data set written by `fastrm distill`: `manifest.json` plus safetensors shards
//! (`image_hidden` `[S, P, D]`, `token_hidden` `[M, D]`, `maps` `[M, P]`, `token_ids`,
//! `token_sample`, `token_index` `[M]` i64).
//!
//! Shards are memory-mapped. The per-token tensors (hidden states, maps) are small next to the
//! image hidden states and are read into memory; an image's `[P, D]` block is converted from the
//! map only when a batch needs it, so a data set larger than memory still trains.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// One token of the data set.
#[derive(Debug, Clone)]
pub struct Token {
    /// Index into [`Dataset::samples`].
    pub sample: usize,
    /// Row of the shard's `token_hidden` / `maps`.
    pub row: usize,
}

/// One sample (an image with its question): where its image hidden states live.
#[derive(Debug, Clone)]
pub struct SampleRef {
    pub shard: usize,
    /// Index within the shard.
    pub index: usize,
}

struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Byte offset of `image_hidden`'s data within the file.
    image_off: usize,
    token_hidden: Vec<f32>,
    maps: Vec<f32>,
}

pub struct Dataset {
    pub dir: PathBuf,
    pub hidden_size: usize,
    pub n_patches: usize,
    /// The manifest's labelling threshold (fraction of a map's max).
    pub label_threshold: f32,
    pub samples: Vec<SampleRef>,
    /// Tokens, grouped by sample in data-set order.
    pub tokens: Vec<Token>,
    shards: Vec<Shard>,
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

impl Dataset {
    /// Opens and checks a data folder: every shard's tensors must exist with the manifest's shapes.
    pub fn open(dir: &Path) -> Result<Self> {
        let mpath = dir.join("manifest.json");
        let bad = |msg: String| Error::Checkpoint {
            path: mpath.clone(),
            msg,
        };
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "data folder {} does not exist (make one with `fastrm distill`)",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let m: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let uint = |k: &str| -> Result<usize> {
            m.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("`{k}` must be a non-negative integer")))
        };
        let version = uint("version")?;
        if version != 1 {
            return Err(bad(format!(
                "version {version} is not supported (expected 1)"
            )));
        }
        let (dm, p) = (uint("hidden_size")?, uint("n_patches")?);
        if dm == 0 || p == 0 {
            return Err(bad(
                "`hidden_size` and `n_patches` must be at least 1".into()
            ));
        }
        let label_threshold = match m.get("label_threshold") {
            None => 0.3,
            Some(v) => v
                .as_f64()
                .filter(|t| (0.0..=1.0).contains(t))
                .ok_or_else(|| bad("`label_threshold` must be a number in [0, 1]".into()))?
                as f32,
        };
        let shard_list = m
            .get("shards")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("`shards` must be a list".into()))?;
        let mut ds = Dataset {
            dir: dir.to_path_buf(),
            hidden_size: dm,
            n_patches: p,
            label_threshold,
            samples: vec![],
            tokens: vec![],
            shards: vec![],
        };
        for (si, entry) in shard_list.iter().enumerate() {
            let file = entry
                .get("file")
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(format!("shards[{si}].file must be a string")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!(
                    "shards[{si}].file {file:?} must be a plain file name"
                )));
            }
            ds.add_shard(&dir.join(file), si)?;
        }
        if ds.tokens.is_empty() {
            return Err(Error::input(format!(
                "data set {} is empty: no tokens in its shards",
                dir.display()
            )));
        }
        Ok(ds)
    }

    fn add_shard(&mut self, path: &Path, shard_no: usize) -> Result<()> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; a shard changed under a running training is a user error
        // that at worst gives wrong numbers (distill writes shards atomically and never rewrites).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| bad(format!("not a valid safetensors shard: {e}")))?;
        let (dm, p) = (self.hidden_size, self.n_patches);
        let get = |name: &str, dtype: Dtype| -> Result<(Vec<usize>, &[u8])> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("missing tensor `{name}`")))?;
            if t.dtype() != dtype {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {:?}, expected {dtype:?}",
                    t.dtype()
                )));
            }
            Ok((t.shape().to_vec(), t.data()))
        };
        let (ishape, idata) = get("image_hidden", Dtype::F32)?;
        if ishape.len() != 3 || ishape[1] != p || ishape[2] != dm {
            return Err(bad(format!(
                "`image_hidden` has shape {ishape:?}, expected [S, {p}, {dm}]"
            )));
        }
        let s = ishape[0];
        let (tshape, tdata) = get("token_hidden", Dtype::F32)?;
        if tshape.len() != 2 || tshape[1] != dm {
            return Err(bad(format!(
                "`token_hidden` has shape {tshape:?}, expected [M, {dm}]"
            )));
        }
        let mtok = tshape[0];
        let (mshape, mdata) = get("maps", Dtype::F32)?;
        if mshape != [mtok, p] {
            return Err(bad(format!(
                "`maps` has shape {mshape:?}, expected [{mtok}, {p}]"
            )));
        }
        let (sshape, sdata) = get("token_sample", Dtype::I64)?;
        if sshape != [mtok] {
            return Err(bad(format!(
                "`token_sample` has shape {sshape:?}, expected [{mtok}]"
            )));
        }
        let token_sample = i64s(sdata);
        let image_off = idata.as_ptr() as usize - map.as_ptr() as usize;
        let token_hidden = f32s(tdata);
        let maps = f32s(mdata);
        if let Some(i) = maps.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`maps` has a non-finite value at token {}",
                i / p
            )));
        }
        if let Some(i) = token_hidden.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`token_hidden` has a non-finite value at token {}",
                i / dm
            )));
        }
        let base = self.samples.len();
        for index in 0..s {
            self.samples.push(SampleRef {
                shard: shard_no,
                index,
            });
        }
        let mut rows: Vec<(usize, usize)> = Vec::with_capacity(mtok);
        for (row, &ts) in token_sample.iter().enumerate() {
            if ts < 0 || ts as usize >= s {
                return Err(bad(format!(
                    "`token_sample`[{row}] = {ts} is outside the shard's {s} samples"
                )));
            }
            rows.push((ts as usize, row));
        }
        rows.sort();
        self.tokens.extend(rows.into_iter().map(|(ts, row)| Token {
            sample: base + ts,
            row,
        }));
        drop(st);
        self.shards.push(Shard {
            path: path.to_path_buf(),
            map,
            image_off,
            token_hidden,
            maps,
        });
        Ok(())
    }

    fn shard_of(&self, t: &Token) -> &Shard {
        &self.shards[self.samples[t.sample].shard]
    }

    /// A token's hidden state `[D]`.
    pub fn token_hidden(&self, t: &Token) -> &[f32] {
        let d = self.hidden_size;
        &self.shard_of(t).token_hidden[t.row * d..(t.row + 1) * d]
    }

    /// A token's raw baseline map `[P]`.
    pub fn token_map(&self, t: &Token) -> &[f32] {
        let p = self.n_patches;
        &self.shard_of(t).maps[t.row * p..(t.row + 1) * p]
    }

    /// A sample's image hidden states `[P, D]`, row-major.
    pub fn image_hidden(&self, sample: usize) -> Result<Vec<f32>> {
        let s = &self.samples[sample];
        let sh = &self.shards[s.shard];
        let n = self.n_patches * self.hidden_size * 4;
        let start = sh.image_off + s.index * n;
        let v = f32s(&sh.map[start..start + n]);
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::Checkpoint {
                path: sh.path.clone(),
                msg: format!(
                    "`image_hidden` of sample {} has a non-finite value",
                    s.index
                ),
            });
        }
        Ok(v)
    }
}
