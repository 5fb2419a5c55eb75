//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`.
//!
//! Every file is memory-mapped and its header validated when the store is opened (by the
//! `safetensors` crate: header length, JSON, contiguous non-overlapping offsets, byte counts that
//! match shape × dtype, data that ends exactly at the end of the file), so `load` only slices
//! bytes already known to be right.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorInfo};
use safetensors::{SafeTensors, View};

use crate::error::{FormatError, Result};

/// The weights of a checkpoint, by tensor name.
pub struct SafetensorsStore {
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section: 8 + header length.
    data_start: usize,
}

struct Entry {
    shard: usize,
    info: TensorInfo,
}

impl std::fmt::Debug for SafetensorsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsStore")
            .field("shards", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

impl SafetensorsStore {
    /// Opens the checkpoint in `dir`: the shards named by `model.safetensors.index.json` if it
    /// exists, else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            return Self::open_index(&index_path);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(FormatError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} is in this directory"),
            ),
        ))
    }

    fn open_index(index_path: &Path) -> Result<Self> {
        let text = fs::read_to_string(index_path).map_err(|e| FormatError::io(index_path, e))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| FormatError::Json { path: index_path.to_path_buf(), source })?;
        let weight_map = index
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| FormatError::corrupt(index_path, "no `weight_map` object"))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut wanted: Vec<(&str, &str)> = Vec::with_capacity(weight_map.len());
        for (name, file) in weight_map {
            let file = file
                .as_str()
                .ok_or_else(|| FormatError::corrupt(index_path, format!("weight_map[`{name}`] is not a file name")))?;
            wanted.push((name, file));
        }
        let files: BTreeSet<&str> = wanted.iter().map(|&(_, f)| f).collect();
        let mut paths = Vec::with_capacity(files.len());
        for file in files {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(FormatError::corrupt(
                    index_path,
                    format!("weight_map names shard `{file}`, which does not exist ({})", path.display()),
                ));
            }
            paths.push(path);
        }
        let store = Self::open_files(&paths)?;
        for (name, file) in wanted {
            let found = store.tensors.get(name).map(|e| &store.shards[e.shard].path);
            if found != Some(&dir.join(file)) {
                return Err(FormatError::corrupt(
                    index_path,
                    format!("weight_map puts tensor `{name}` in `{file}`, which does not hold it"),
                ));
            }
        }
        Ok(store)
    }

    /// Opens these safetensors files as one checkpoint; a tensor name may appear only once.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
            // SAFETY: read-only map of a checkpoint nobody writes while it is open; see
            // `GgufFile::open`.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|source| FormatError::Safetensors { path: path.clone(), source })?;
            for (name, info) in metadata.tensors() {
                if let Some(previous) = tensors.get(&name).map(|e: &Entry| e.shard) {
                    return Err(FormatError::corrupt(
                        path,
                        format!("tensor `{name}` is also in {}", paths[previous].display()),
                    ));
                }
                tensors.insert(name, Entry { shard: index, info: info.clone() });
            }
            shards.push(Shard { path: path.clone(), mmap, data_start: 8 + header_len });
        }
        Ok(SafetensorsStore { shards, tensors })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| FormatError::TensorNotFound {
            path: self.shards.first().map(|s| s.path.clone()).unwrap_or_default(),
            name: name.to_string(),
        })
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.info.shape.clone())
    }

    /// The tensor converted to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entry(name)?;
        let shard = &self.shards[entry.shard];
        let (start, end) = entry.info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let context = || format!("{}: tensor `{name}`", shard.path.display());
        let stored = candle_dtype(entry.info.dtype).ok_or_else(|| FormatError::UnsupportedTensorType {
            path: shard.path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", entry.info.dtype),
        })?;
        Tensor::from_raw_buffer(bytes, stored, &entry.info.shape, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| FormatError::candle(context(), e))
    }
}

/// The candle dtype with the same bytes as a safetensors dtype.
fn candle_dtype(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I16 => DType::I16,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

fn safetensors_dtype(dtype: DType) -> Option<StDtype> {
    Some(match dtype {
        DType::U8 => StDtype::U8,
        DType::U32 => StDtype::U32,
        DType::I16 => StDtype::I16,
        DType::I32 => StDtype::I32,
        DType::I64 => StDtype::I64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        _ => return None,
    })
}

/// A tensor's bytes, fetched to the host before writing so that failures are errors here
/// rather than panics inside the serializer.
struct HostTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Little-endian bytes of a host tensor's elements.
fn host_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
    fn le<T, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    Ok(match flat.dtype() {
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => le(flat.to_vec1::<u32>()?, u32::to_le_bytes),
        DType::I16 => le(flat.to_vec1::<i16>()?, i16::to_le_bytes),
        DType::I32 => le(flat.to_vec1::<i32>()?, i32::to_le_bytes),
        DType::I64 => le(flat.to_vec1::<i64>()?, i64::to_le_bytes),
        DType::BF16 => le(flat.to_vec1::<half::bf16>()?, |x| x.to_bits().to_le_bytes()),
        DType::F16 => le(flat.to_vec1::<half::f16>()?, |x| x.to_bits().to_le_bytes()),
        DType::F32 => le(flat.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::F64 => le(flat.to_vec1::<f64>()?, f64::to_le_bytes),
        other => candle_core::bail!("cannot write dtype {other:?} to safetensors"),
    })
}

/// Writes `tensors` as a safetensors file that transformers loads; `metadata` defaults to
/// `{"format": "pt"}`, which transformers expects.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut host = Vec::with_capacity(tensors.len());
    let mut seen = std::collections::HashSet::new();
    for (name, tensor) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(FormatError::corrupt(path, format!("tensor `{name}` given twice")));
        }
        let dtype = safetensors_dtype(tensor.dtype()).ok_or_else(|| FormatError::UnsupportedTensorType {
            path: path.to_path_buf(),
            name: name.clone(),
            dtype: format!("{:?}", tensor.dtype()),
        })?;
        let bytes =
            host_bytes(tensor).map_err(|e| FormatError::candle(format!("{}: tensor `{name}`", path.display()), e))?;
        host.push((name.as_str(), HostTensor { dtype, shape: tensor.dims().to_vec(), bytes }));
    }
    let metadata = metadata.unwrap_or_else(|| HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(host.iter().map(|(n, t)| (*n, t)), Some(metadata), path)
        .map_err(|source| FormatError::Safetensors { path: path.to_path_buf(), source })
}
