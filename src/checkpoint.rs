//! Memory-mapped safetensors checkpoints: one file, or shards listed by
//! `model.safetensors.index.json`.
//!
//! Opening a checkpoint validates every file's header (the safetensors crate
//! checks that offsets are in bounds and contiguous) and indexes the tensors
//! by name. Tensor bytes stay in the page cache: a backend either converts
//! them into its own storage or keeps a [`SharedBytes`] handle and computes
//! from them as stored, so a 16 GB checkpoint costs no copy to open.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors};

use crate::error::{Error, Result};

/// Element types a checkpoint may store; math is always done in f32 or bf16.
/// The integer types hold quantized weights (`crate::quant`): int8 values,
/// and pairs of 4-bit values packed into bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    BF16,
    F16,
    I8,
    U8,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::I8 | Dtype::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::BF16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::I8 => "i8",
            Dtype::U8 => "u8",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::BF16 | Dtype::F16)
    }

    /// The safetensors name of the type, for writing checkpoints.
    pub fn safetensors(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::BF16 => StDtype::BF16,
            Dtype::F16 => StDtype::F16,
            Dtype::I8 => StDtype::I8,
            Dtype::U8 => StDtype::U8,
        }
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

pub struct Checkpoint {
    files: Vec<Arc<Storage>>,
    tensors: HashMap<String, Entry>,
    /// Tensors of a dtype the runtime cannot compute with; an error only if
    /// the model asks for one (checkpoints may carry integer buffers).
    unsupported: HashMap<String, StDtype>,
}

/// The bytes behind a checkpoint: a mapped file, or memory (synthetic models).
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(bytes) => bytes,
        }
    }
}

/// A borrowed tensor of a checkpoint, or a run of its rows.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
    storage: &'a Arc<Storage>,
}

/// A tensor's bytes, kept alive (mapped) for as long as the handle lives:
/// what a backend holds to compute from weights as stored.
#[derive(Clone)]
pub struct SharedBytes {
    storage: Arc<Storage>,
    range: Range<usize>,
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.storage[self.range.clone()]
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards named by
    /// `dir/model.safetensors.index.json` when there is no single file.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_paths(&index)?
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors nor model.safetensors.index.json in the model directory",
                ),
            ));
        };
        let mut checkpoint = Checkpoint {
            files: Vec::with_capacity(paths.len()),
            tensors: HashMap::new(),
            unsupported: HashMap::new(),
        };
        for path in &paths {
            checkpoint.add_file(path)?;
        }
        Ok(checkpoint)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on
        // nobody truncating the checkpoint while it is in use.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let invalid = |message: String| Error::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let parsed = SafeTensors::deserialize(&map).map_err(|e| {
            invalid(match e {
                SafeTensorError::MetadataIncompleteBuffer => {
                    "the tensor data does not end at the end of the file: it is truncated or has trailing bytes".into()
                }
                SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge => format!(
                    "the header length points past the end of the file ({} bytes): it is truncated or not a safetensors file",
                    map.len()
                ),
                SafeTensorError::HeaderTooSmall => {
                    format!("the file is {} bytes, too short for a safetensors header", map.len())
                }
                e => e.to_string(),
            })
        })?;
        let file_index = self.files.len();
        for (name, view) in parsed.tensors() {
            let dtype = match view.dtype() {
                StDtype::F32 => Dtype::F32,
                StDtype::BF16 => Dtype::BF16,
                StDtype::F16 => Dtype::F16,
                StDtype::I8 => Dtype::I8,
                StDtype::U8 => Dtype::U8,
                other => {
                    self.unsupported.insert(name, other);
                    continue;
                }
            };
            let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
            let entry = Entry {
                file: file_index,
                dtype,
                shape: view.shape().to_vec(),
                bytes: start..start + view.data().len(),
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(invalid(format!(
                    "tensor {name} appears in more than one shard"
                )));
            }
        }
        self.files.push(Arc::new(Storage::Mapped(map)));
        Ok(())
    }

    /// A checkpoint held in memory: `(name, dtype, shape, little-endian bytes)`.
    pub fn from_tensors(tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> Checkpoint {
        let mut checkpoint = Checkpoint {
            files: Vec::with_capacity(tensors.len()),
            tensors: HashMap::with_capacity(tensors.len()),
            unsupported: HashMap::new(),
        };
        for (name, dtype, shape, bytes) in tensors {
            assert_eq!(
                bytes.len(),
                shape.iter().product::<usize>() * dtype.size(),
                "{name}"
            );
            let entry = Entry {
                file: checkpoint.files.len(),
                dtype,
                shape,
                bytes: 0..bytes.len(),
            };
            checkpoint.files.push(Arc::new(Storage::Owned(bytes)));
            checkpoint.tensors.insert(name, entry);
        }
        checkpoint
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        if let Some(dtype) = self.unsupported.get(name) {
            return Err(Error::Tensor {
                name: name.to_string(),
                message: format!(
                    "has dtype {dtype:?}; only F32, BF16 and F16 are supported (I8 and U8 in quantized checkpoints)"
                ),
            });
        }
        let (name, entry) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| Error::Tensor {
                name: name.to_string(),
                message: "missing from the checkpoint".into(),
            })?;
        let storage = &self.files[entry.file];
        Ok(TensorView {
            name,
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            bytes: &storage[entry.bytes.clone()],
            storage,
        })
    }

    /// The tensor, checked to have exactly `shape`.
    pub fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Result<TensorView<'_>> {
        let view = self.tensor(name)?;
        if view.shape != shape {
            return Err(Error::Tensor {
                name: name.to_string(),
                message: format!("has shape {:?}, expected {:?}", view.shape, shape),
            });
        }
        Ok(view)
    }

    /// The tensor, checked to have exactly `shape` and one of `dtypes`.
    pub fn tensor_typed(
        &self,
        name: &str,
        shape: &[usize],
        dtypes: &[Dtype],
    ) -> Result<TensorView<'_>> {
        let view = self.tensor_shaped(name, shape)?;
        if !dtypes.contains(&view.dtype) {
            let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            return Err(Error::Tensor {
                name: name.to_string(),
                message: format!(
                    "has dtype {}, expected {}",
                    view.dtype.name(),
                    names.join(" or ")
                ),
            });
        }
        Ok(view)
    }

    /// The distinct dtypes stored, for `dllm info`.
    pub fn dtypes(&self) -> Vec<Dtype> {
        let mut seen: Vec<Dtype> = Vec::new();
        for entry in self.tensors.values() {
            if !seen.contains(&entry.dtype) {
                seen.push(entry.dtype);
            }
        }
        seen
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.bytes.len() as u64).sum()
    }
}

impl<'a> TensorView<'a> {
    /// Rows `rows` of a matrix: a fused projection's parts are runs of rows.
    pub fn rows(&self, rows: Range<usize>) -> TensorView<'a> {
        let row_bytes = self.shape[1..].iter().product::<usize>() * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        TensorView {
            name: self.name,
            dtype: self.dtype,
            shape,
            bytes: &self.bytes[rows.start * row_bytes..rows.end * row_bytes],
            storage: self.storage,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A handle on the tensor's bytes that outlives this view.
    pub fn shared(&self) -> SharedBytes {
        let start = self.bytes.as_ptr() as usize - self.storage.as_ptr() as usize;
        SharedBytes {
            storage: Arc::clone(self.storage),
            range: start..start + self.bytes.len(),
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.len()];
        self.write_f32(&mut out);
        out
    }

    /// Converts into `out` (of `self.len()` elements). Byte order is
    /// little-endian per the safetensors format; unaligned data is fine.
    /// Integer tensors convert to their raw values (a quantized matrix is
    /// dequantized by `crate::quant`, which knows its scales).
    pub fn write_f32(&self, out: &mut [f32]) {
        let size = self.dtype.size();
        let chunks = self.bytes.chunks_exact(size);
        match self.dtype {
            Dtype::F32 => out
                .iter_mut()
                .zip(chunks)
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::BF16 => out
                .iter_mut()
                .zip(chunks)
                .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::F16 => out
                .iter_mut()
                .zip(chunks)
                .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::I8 => out
                .iter_mut()
                .zip(self.bytes)
                .for_each(|(o, &b)| *o = b as i8 as f32),
            Dtype::U8 => out
                .iter_mut()
                .zip(self.bytes)
                .for_each(|(o, &b)| *o = b as f32),
        }
    }

    /// The tensor rounded to bf16 (round-to-nearest-even), as a GPU backend stores it.
    pub fn to_bf16(&self) -> Vec<bf16> {
        match self.dtype {
            Dtype::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                .collect(),
            _ => self.to_f32().into_iter().map(bf16::from_f32).collect(),
        }
    }
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Safetensors {
            path: index.to_path_buf(),
            message: "no \"weight_map\" object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Safetensors {
            path: index.to_path_buf(),
            message: format!("weight_map entry for {tensor} is not a file name"),
        })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_tensor(dtype: Dtype, bytes: Vec<u8>) -> Checkpoint {
        let len = bytes.len() / dtype.size();
        Checkpoint::from_tensors(vec![("t".into(), dtype, vec![len], bytes)])
    }

    #[test]
    fn every_stored_dtype_converts_to_f32_and_bf16() {
        let values = [1.5f32, -0.25, 3.0e-3, 1024.0];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        for (dtype, bytes, tolerance) in [
            (Dtype::F32, f32_bytes, 0.0),
            (Dtype::BF16, bf16_bytes, 4e-3),
            (Dtype::F16, f16_bytes, 1e-3),
        ] {
            let checkpoint = one_tensor(dtype, bytes);
            let view = checkpoint.tensor("t").unwrap();
            for (got, want) in view.to_f32().iter().zip(values) {
                assert!(
                    (got - want).abs() <= tolerance * want.abs(),
                    "{dtype:?}: {got} vs {want}"
                );
            }
            let rounded: Vec<bf16> = values.iter().map(|v| bf16::from_f32(*v)).collect();
            if dtype != Dtype::F16 {
                assert_eq!(view.to_bf16(), rounded, "{dtype:?}");
            }
        }
    }

    #[test]
    fn shape_mismatch_and_missing_tensors_name_the_tensor() {
        let checkpoint = one_tensor(Dtype::F32, vec![0; 16]);
        let err = checkpoint
            .tensor_shaped("t", &[2, 2])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tensor t: has shape [4], expected [2, 2]"),
            "{err}"
        );
        let err = checkpoint.tensor("u").err().unwrap().to_string();
        assert!(
            err.contains("tensor u: missing from the checkpoint"),
            "{err}"
        );
    }
}
