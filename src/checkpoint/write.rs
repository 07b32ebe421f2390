//! The one safetensors writer, and the bounded header read that the small files we write (head
//! files, data-set shards) are checked with before anything is mapped.
//!
//! Deterministic: the header is built in a fixed order (no hash maps), so the same tensors and
//! metadata are the same bytes. Streaming: each tensor's bytes are made when its turn comes
//! ([`Data::Made`]), so a file of any size costs one tensor of memory. The header is padded with
//! spaces to 8 bytes so the data starts aligned, as other writers do.

use std::io::{Read, Write};
use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// Where a tensor's little-endian bytes come from.
pub enum Data<'a> {
    Bytes(&'a [u8]),
    /// Made when the tensor is written.
    Made(Box<dyn Fn() -> Vec<u8> + 'a>),
}

/// One tensor of a file.
pub struct Tensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Data<'a>,
}

impl<'a> Tensor<'a> {
    pub fn f32(name: &str, shape: Vec<usize>, values: &'a [f32]) -> Self {
        Tensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: Data::Bytes(bytemuck::cast_slice(values)),
        }
    }

    pub fn i64(name: &str, shape: Vec<usize>, values: &'a [i64]) -> Self {
        Tensor {
            name: name.into(),
            dtype: Dtype::I64,
            shape,
            data: Data::Bytes(bytemuck::cast_slice(values)),
        }
    }

    fn len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The header: `__metadata__` (when any) and each tensor's dtype, shape and byte range, in the
/// order given.
fn header(metadata: &[(&str, String)], tensors: &[Tensor<'_>]) -> Result<Vec<u8>> {
    let mut h = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
            .collect();
        h.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for t in tensors {
        let len = t.len();
        let dtype = serde_json::to_value(t.dtype)
            .map_err(|e| Error::input(format!("tensor `{}`: {e}", t.name)))?;
        h.insert(
            t.name.clone(),
            json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut head = serde_json::to_vec(&Value::Object(h))
        .map_err(|e| Error::input(format!("safetensors header: {e}")))?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    Ok(head)
}

/// Writes a safetensors file into `w`: the header, then each tensor's bytes in the order given.
/// A tensor whose bytes do not match its dtype and shape is an error.
pub fn write(w: &mut dyn Write, metadata: &[(&str, String)], tensors: &[Tensor<'_>]) -> Result<()> {
    let head = header(metadata, tensors)?;
    write_body(w, &head, tensors).map_err(|e| Error::io("<safetensors>", e))
}

/// [`write`] into `path`, atomically (a reader never sees a half-written file) and synced.
pub fn write_file(path: &Path, metadata: &[(&str, String)], tensors: &[Tensor<'_>]) -> Result<()> {
    let head = header(metadata, tensors)?;
    crate::util::write_atomic_with(path, |w| write_body(w, &head, tensors))
}

fn write_body(w: &mut dyn Write, head: &[u8], tensors: &[Tensor<'_>]) -> std::io::Result<()> {
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(head)?;
    for t in tensors {
        let made;
        let bytes = match &t.data {
            Data::Bytes(b) => *b,
            Data::Made(f) => {
                made = f();
                &made
            }
        };
        if bytes.len() != t.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "tensor `{}`: {} bytes for {:?} {:?}, which take {}",
                    t.name,
                    bytes.len(),
                    t.dtype,
                    t.shape,
                    t.len()
                ),
            ));
        }
        w.write_all(bytes)?;
    }
    Ok(())
}

/// A file's header, read and parsed without reading its data: the JSON object and the length of
/// the data section after it. A header longer than `max` bytes, or longer than the file, is refused
/// before it is read, so a corrupt length cannot make us allocate.
pub fn read_header(path: &Path, max: u64) -> Result<(Map<String, Value>, u64)> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "not a valid safetensors file: {len} bytes, too short for the 8-byte header length \
             (truncated?)"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > max || 8 + n > len {
        return Err(bad(format!(
            "not a valid safetensors file: its header claims {n} bytes, but the file is {len} \
             bytes and this kind of file's header may take at most {max} (truncated or corrupt?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: Map<String, Value> = serde_json::from_slice(&header).map_err(|e| {
        bad(format!(
            "not a valid safetensors file: the header is not a JSON object ({e})"
        ))
    })?;
    Ok((header, len - 8 - n))
}

/// The header's `__metadata__` as strings (empty when there is none).
pub fn metadata(path: &Path, header: &Map<String, Value>) -> Result<Map<String, Value>> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let Some(m) = header.get("__metadata__") else {
        return Ok(Map::new());
    };
    let m = m
        .as_object()
        .ok_or_else(|| bad("header `__metadata__` is not an object".into()))?;
    if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
        return Err(bad(format!("header metadata `{k}` is not a string")));
    }
    Ok(m.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tensors_are_the_same_bytes_and_the_safetensors_crate_reads_them() {
        let a = [1.0f32, -2.0, 3.5, 0.25];
        let ids = [7i64, -1];
        let tensors = || {
            vec![
                Tensor::f32("b.weight", vec![2, 2], &a),
                Tensor::i64("a.ids", vec![2], &ids),
                Tensor {
                    name: "c.made".into(),
                    dtype: Dtype::F16,
                    shape: vec![3],
                    data: Data::Made(Box::new(|| {
                        [1.0f32, 2.0, 3.0]
                            .iter()
                            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                            .collect()
                    })),
                },
            ]
        };
        let meta = [("zeta", "1".to_string()), ("alpha", "2".to_string())];
        let (mut x, mut y) = (Vec::new(), Vec::new());
        write(&mut x, &meta, &tensors()).unwrap();
        write(&mut y, &meta, &tensors()).unwrap();
        assert_eq!(x, y);
        let n = u64::from_le_bytes(x[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data starts 8-byte aligned");
        let (_, m) = safetensors::SafeTensors::read_metadata(&x).unwrap();
        let meta = m.metadata().as_ref().unwrap();
        assert_eq!((meta["alpha"].as_str(), meta["zeta"].as_str()), ("2", "1"));
        let st = safetensors::SafeTensors::deserialize(&x).unwrap();
        let b = st.tensor("b.weight").unwrap();
        assert_eq!((b.dtype(), b.shape()), (Dtype::F32, &[2usize, 2][..]));
        assert_eq!(b.data(), bytemuck::cast_slice::<f32, u8>(&a));
        assert_eq!(
            st.tensor("a.ids").unwrap().data(),
            bytemuck::cast_slice::<i64, u8>(&ids)
        );
        let c = st.tensor("c.made").unwrap();
        assert_eq!(
            half::f16::from_le_bytes([c.data()[4], c.data()[5]]).to_f32(),
            3.0
        );
    }

    #[test]
    fn bytes_that_do_not_fit_the_shape_are_refused() {
        let a = [1.0f32; 3];
        let e = write(&mut Vec::new(), &[], &[Tensor::f32("w", vec![2, 2], &a)]).unwrap_err();
        assert!(e.to_string().contains("tensor `w`: 12 bytes"), "{e}");
    }

    #[test]
    fn a_header_longer_than_allowed_or_than_the_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let a = [0.5f32; 4];
        write_file(
            &path,
            &[("k", "v".into())],
            &[Tensor::f32("w", vec![4], &a)],
        )
        .unwrap();
        let (h, data) = read_header(&path, 1 << 20).unwrap();
        assert_eq!(data, 16);
        assert_eq!(metadata(&path, &h).unwrap()["k"], "v");
        let e = read_header(&path, 8).unwrap_err().to_string();
        assert!(e.contains("may take at most 8"), "{e}");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = read_header(&path, u64::MAX).unwrap_err().to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
    }
}
