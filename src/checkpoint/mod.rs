//! Checkpoint loading: safetensors over memmap2, single file or sharded with
//! `model.safetensors.index.json`, hub (transformers-4.x) and transformers-5 tensor names.
//!
//! Every shard's header is validated by the `safetensors` crate when it is opened (offsets inside the
//! file, sizes consistent with shapes and dtypes), so a truncated or corrupt file fails at open with
//! the shard's name, long before any weight is read. Tensors are looked up by their hub name; the
//! transformers-5 spelling is tried when the hub name is absent.

pub mod head;
pub mod write;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A borrowed tensor straight out of the mapped file.
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    /// The name under which the tensor was found in the file.
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    /// The mapped file `bytes` lie in, for a backend that keeps the tensor where it is instead of
    /// copying it (the CPU backend's half-precision weights); `None` for bytes held elsewhere.
    pub mapping: Option<&'a Arc<Mmap>>,
}

impl TensorRef<'_> {
    /// Converts to f32 (little-endian storage, any alignment).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

/// A tensor's stored dtype and the `[rows, cols]` it is loaded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredTensor {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

struct Entry {
    shard: usize,
    dtype: Result<DType, Dtype>,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
}

pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index.is_file() {
            read_index(&index)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder"),
            });
        };
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in files {
            ck.add_shard(path)?;
        }
        Ok(ck)
    }

    fn add_shard(&mut self, path: PathBuf) -> Result<()> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.clone(),
            msg,
        };
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 8 {
            return Err(bad(format!(
                "file is {len} bytes; a safetensors file needs at least an 8-byte header length (truncated?)"
            )));
        }
        // SAFETY: the mapping is read-only and lives as long as `self`; a checkpoint file being
        // rewritten underneath a running engine is outside what we can defend against (as with any
        // mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let shard = self.shards.len();
        let base = mmap.as_ptr() as usize;
        {
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                bad(format!(
                    "invalid safetensors file (truncated or corrupt?): {e}"
                ))
            })?;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let dtype = match view.dtype() {
                    Dtype::F32 => Ok(DType::F32),
                    Dtype::F16 => Ok(DType::F16),
                    Dtype::BF16 => Ok(DType::BF16),
                    other => Err(other),
                };
                let entry = Entry {
                    shard,
                    dtype,
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                };
                if self.tensors.insert(name.clone(), entry).is_some() {
                    return Err(bad(format!(
                        "tensor `{name}` appears in more than one shard"
                    )));
                }
            }
        }
        self.shards.push(Shard {
            path,
            mmap: Arc::new(mmap),
        });
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Total number of values over every tensor (what loading at f32 multiplies by 4).
    pub fn total_elements(&self) -> usize {
        self.tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Every tensor as stored (unsupported dtypes left out: loading refuses them anyway), for
    /// [`crate::backend::Backend::check_weight_memory`].
    pub fn census(&self) -> Vec<StoredTensor> {
        self.tensors
            .values()
            .filter_map(|e| {
                let dtype = e.dtype.ok()?;
                let values = e.shape.iter().product::<usize>();
                // Loaded as `[rows, cols]`: a vector is one row, anything else its first axis.
                let rows = if e.shape.len() >= 2 { e.shape[0] } else { 1 };
                Some(StoredTensor {
                    dtype,
                    rows,
                    cols: values.checked_div(rows).unwrap_or(0),
                })
            })
            .collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The name a hub-named tensor has in this checkpoint, if any.
    fn resolve(&self, hub_name: &str) -> Option<&str> {
        alternative_names(hub_name).into_iter().find_map(|n| {
            self.tensors
                .get_key_value(n.as_str())
                .map(|(k, _)| k.as_str())
        })
    }

    /// Looks a tensor up by its hub name and checks its shape.
    pub fn get(&self, hub_name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let Some(name) = self.resolve(hub_name) else {
            let tried = alternative_names(hub_name).join("`, `");
            return Err(Error::Checkpoint {
                path: self.dir.clone(),
                msg: format!("missing tensor `{hub_name}` (looked for `{tried}`)"),
            });
        };
        let e = &self.tensors[name];
        let shard = &self.shards[e.shard];
        let dtype = e.dtype.map_err(|d| Error::Tensor {
            name: name.to_string(),
            msg: format!(
                "dtype {d:?} in {} is not supported (expected F32, F16 or BF16)",
                shard.path.display()
            ),
        })?;
        if e.shape != shape {
            return Err(Error::Tensor {
                name: name.to_string(),
                msg: format!(
                    "shape {:?} in {} does not match the config, which implies {:?}",
                    e.shape,
                    shard.path.display(),
                    shape
                ),
            });
        }
        Ok(TensorRef {
            name,
            dtype,
            shape: &e.shape,
            bytes: &shard.mmap[e.start..e.end],
            mapping: Some(&shard.mmap),
        })
    }

    /// Convenience: look up, check the shape and convert to f32.
    pub fn f32(&self, hub_name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.get(hub_name, shape)?.to_f32())
    }
}

/// Hub name first, then the transformers-5 spellings of the same tensor.
fn alternative_names(hub: &str) -> Vec<String> {
    let mut v = vec![hub.to_string()];
    if let Some(rest) = hub.strip_prefix("language_model.model.") {
        v.push(format!("model.language_model.{rest}"));
    } else if let Some(rest) = hub.strip_prefix("language_model.lm_head.") {
        v.push(format!("lm_head.{rest}"));
    } else if let Some(rest) = hub.strip_prefix("multi_modal_projector.") {
        v.push(format!("model.multi_modal_projector.{rest}"));
    } else if hub == "image_newline" {
        v.push("model.image_newline".into());
    } else if let Some(rest) = hub.strip_prefix("vision_tower.vision_model.") {
        v.push(format!("model.vision_tower.vision_model.{rest}"));
        v.push(format!("model.vision_tower.{rest}"));
    }
    v
}

/// The distinct shard file names of an index, in first-seen order. Shard names must be plain file
/// names inside the checkpoint folder.
fn read_index(path: &Path) -> Result<Vec<String>> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[`{tensor}`] is not a file name")))?;
        if f.is_empty() || f.contains('/') || f.contains('\\') || f == ".." {
            return Err(bad(format!(
                "weight_map[`{tensor}`] = {f:?} is not a plain file name"
            )));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    if files.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(files)
}
