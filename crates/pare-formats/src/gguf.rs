//! GGUF files: metadata, tensor layout, and tensor data as candle tensors.
//!
//! [`GgufFile::open`] maps the file and validates the whole header up front (magic, version,
//! every count and length against the file size, tensor dims, types, alignment and extents), so
//! that every later access is to bytes known to lie inside the file. Dequantization itself is
//! candle's, so dense weights and candle's `QMatMul` see the same values.

mod ggml_type;
mod parse;
mod write;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

pub use ggml_type::GgmlType;
pub use write::{write_gguf, GgufTensorData};

use crate::error::{FormatError, Result};

/// A metadata value, with GGUF's own type tags.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer that is non-negative, whatever its stored width: writers disagree on
    /// whether e.g. `context_length` is u32 or u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float, or an integer read as a float (some writers store e.g. `rope.freq_base` as an
    /// integer).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// A short description of the value's type for error messages, e.g. `an array of 3 values`.
    pub fn describe(&self) -> String {
        match self {
            GgufValue::U8(_) => "a u8".into(),
            GgufValue::I8(_) => "an i8".into(),
            GgufValue::U16(_) => "a u16".into(),
            GgufValue::I16(_) => "an i16".into(),
            GgufValue::U32(_) => "a u32".into(),
            GgufValue::I32(_) => "an i32".into(),
            GgufValue::F32(_) => "an f32".into(),
            GgufValue::Bool(_) => "a bool".into(),
            GgufValue::Str(_) => "a string".into(),
            GgufValue::Array(items) => format!("an array of {} values", items.len()),
            GgufValue::U64(_) => "a u64".into(),
            GgufValue::I64(_) => "an i64".into(),
            GgufValue::F64(_) => "an f64".into(),
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Row-major (PyTorch) order: ggml's `ne` reversed, so the last dimension is the
    /// contiguous one that quantization blocks run along.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute offset of the first data byte in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened, validated, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    /// In file order.
    pub tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    mmap: Mmap,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens a GGUF v2 or v3 file and checks its header, metadata and every tensor's extent.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: the map is read-only; pare never writes to checkpoints while they are open,
        // and a file truncated underneath the map by another process is outside what any
        // memory-mapped reader (llama.cpp, candle) defends against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let header = parse::parse(path, &mmap)?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| FormatError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &GgufValue) -> FormatError {
        FormatError::WrongType { path: self.path.clone(), key: key.to_string(), expected, found: found.describe() }
    }

    /// A non-negative integer of any stored width.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A float (or an integer, read as a float).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| self.wrong_type(key, "an array", v))
    }

    /// `general.architecture`, e.g. `llama` or `qwen2`; the prefix of the model's own keys.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| FormatError::TensorNotFound { path: self.path.clone(), name: name.to_string() })
    }

    /// The tensor's raw bytes, exactly as stored (blocks for quantized types).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.require_tensor(name)?;
        Ok(self.bytes_of(info))
    }

    fn bytes_of(&self, info: &GgufTensorInfo) -> &[u8] {
        // In range: `parse` checked offset + n_bytes <= file length, both fit in usize since
        // the file is mapped.
        &self.mmap[info.offset as usize..(info.offset + info.n_bytes) as usize]
    }

    fn context(&self, name: &str) -> String {
        format!("{}: tensor `{name}`", self.path.display())
    }

    /// The tensor as a dense candle tensor of `dtype` on `device`, with shape `info.shape`.
    pub fn dequantize(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.require_tensor(name)?;
        let ctx = || self.context(name);
        let dense = if let Some(plain) = info.ggml_type.plain_dtype() {
            Tensor::from_raw_buffer(self.bytes_of(info), plain, &info.shape, device)
                .map_err(|e| FormatError::candle(ctx(), e))?
        } else {
            self.qtensor(name, device)?.dequantize(device).map_err(|e| FormatError::candle(ctx(), e))?
        };
        dense.to_dtype(dtype).map_err(|e| FormatError::candle(ctx(), e))
    }

    /// The tensor still quantized, for candle's `QMatMul`; its shape is `info.shape`.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let info = self.require_tensor(name)?;
        let ggml_dtype = info.ggml_type.candle_dtype().ok_or_else(|| FormatError::UnsupportedGgmlType {
            path: self.path.clone(),
            name: name.to_string(),
            ggml_type: info.ggml_type,
        })?;
        let bytes = self.bytes_of(info);
        // candle reinterprets the bytes as block structs, which needs their alignment; the
        // mapped data is aligned unless the file chose a `general.alignment` below 8.
        let mut aligned: Vec<u64> = Vec::new();
        let bytes: &[u8] = if (bytes.as_ptr() as usize).is_multiple_of(8) {
            bytes
        } else {
            aligned.resize(bytes.len().div_ceil(8), 0);
            let dst = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..bytes.len()];
            dst.copy_from_slice(bytes);
            dst
        };
        let storage = QStorage::from_data(Cow::Borrowed(bytes), device, ggml_dtype)
            .map_err(|e| FormatError::candle(self.context(name), e))?;
        QTensor::new(storage, info.shape.as_slice()).map_err(|e| FormatError::candle(self.context(name), e))
    }
}
