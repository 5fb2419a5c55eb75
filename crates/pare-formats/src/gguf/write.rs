//! Writing GGUF v3 files: metadata key/values and plain (F32 / F16) tensors.
//!
//! The layout is the one [`super::GgufFile::open`] validates and llama.cpp reads: header, the
//! key/values, the tensor infos, padding to the alignment, then each tensor's bytes at an
//! aligned offset. Only unquantized types are written: pare exports pruned models, which have
//! just been computed in float.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::{GgmlType, GgufValue};
use crate::error::{FormatError, Result};

/// llama.cpp's default alignment; we write it explicitly too.
const ALIGNMENT: usize = 32;

/// One tensor to write: its name, row-major shape (PyTorch order) and element type.
pub struct GgufTensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub data: Vec<u8>,
}

impl GgufTensorData {
    /// A candle tensor stored as `ggml_type` (F32 or F16; anything else is refused).
    pub fn from_tensor(name: impl Into<String>, tensor: &Tensor, ggml_type: GgmlType) -> Result<Self> {
        let name = name.into();
        let ctx = |e: candle_core::Error| FormatError::candle(format!("GGUF tensor `{name}`"), e);
        let dtype = match ggml_type {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            other => {
                return Err(FormatError::UnsupportedTensorType {
                    path: "(GGUF writer)".into(),
                    name,
                    dtype: format!("{other} (the writer stores F32 or F16)"),
                })
            }
        };
        let flat = tensor.to_dtype(dtype).and_then(|t| t.flatten_all()).map_err(ctx)?;
        let data = match dtype {
            DType::F32 => flat.to_vec1::<f32>().map_err(ctx)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => flat.to_vec1::<half::f16>().map_err(ctx)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        Ok(GgufTensorData { shape: tensor.dims().to_vec(), name, ggml_type, data })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's type id of a value.
fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::Str(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &GgufValue) -> std::result::Result<(), String> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::Str(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Array(items) => {
            // GGUF arrays are homogeneous: one element type for all.
            let elem = items.first().map_or(4, type_id);
            if items.iter().any(|i| type_id(i) != elem) {
                return Err(format!("metadata array `{key}` mixes element types"));
            }
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item)?;
            }
        }
    }
    Ok(())
}

/// Write a GGUF v3 file with `metadata` (in order) and `tensors` (in order).
pub fn write_gguf(path: &Path, metadata: &[(String, GgufValue)], tensors: &[GgufTensorData]) -> Result<()> {
    let bad = |reason: String| FormatError::Corrupt { path: path.to_path_buf(), reason };
    let mut keys = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    let mut head: Vec<u8> = Vec::new();
    head.extend(b"GGUF");
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    let has_alignment = metadata.iter().any(|(k, _)| k == "general.alignment");
    head.extend(((metadata.len() + usize::from(!has_alignment)) as u64).to_le_bytes());
    let alignment_kv = ("general.alignment".to_string(), GgufValue::U32(ALIGNMENT as u32));
    for (key, value) in metadata.iter().chain((!has_alignment).then_some(&alignment_kv)) {
        if !keys.insert(key.as_str()) {
            return Err(bad(format!("metadata key `{key}` given twice")));
        }
        if key == "general.alignment" && value.as_u64() != Some(ALIGNMENT as u64) {
            return Err(bad(format!("general.alignment must be {ALIGNMENT}")));
        }
        put_str(&mut head, key);
        head.extend(type_id(value).to_le_bytes());
        put_value(&mut head, key, value).map_err(bad)?;
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(bad(format!("tensor `{}` given twice", t.name)));
        }
        let elements: usize = t.shape.iter().product();
        if t.shape.is_empty()
            || t.shape.len() > 4
            || elements == 0
            || elements * t.ggml_type.type_size() / t.ggml_type.block_size() != t.data.len()
        {
            return Err(bad(format!(
                "tensor `{}`: shape {:?} does not match its {} data bytes",
                t.name,
                t.shape,
                t.data.len()
            )));
        }
        put_str(&mut head, &t.name);
        head.extend((t.shape.len() as u32).to_le_bytes());
        // ggml's ne order: the contiguous dimension first.
        for &d in t.shape.iter().rev() {
            head.extend((d as u64).to_le_bytes());
        }
        head.extend(t.ggml_type.id().to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    head.resize(head.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);

    let io = |e: std::io::Error| FormatError::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&head).map_err(io)?;
    let mut written = 0usize;
    for (t, &at) in tensors.iter().zip(&offsets) {
        w.write_all(&vec![0u8; at - written]).map_err(io)?;
        w.write_all(&t.data).map_err(io)?;
        written = at + t.data.len();
    }
    w.write_all(&vec![0u8; offset - written]).map_err(io)?;
    w.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;
    use candle_core::Device;

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let b = Tensor::new(&[1.5f32, -2.25, 3.0], &Device::Cpu).unwrap();
        let meta = vec![
            ("general.architecture".to_string(), GgufValue::Str("llama".into())),
            ("llama.block_count".to_string(), GgufValue::U32(2)),
            ("llama.attention.head_count".to_string(), GgufValue::Array(vec![GgufValue::I32(4), GgufValue::I32(2)])),
            ("llama.rope.freq_base".to_string(), GgufValue::F32(10000.0)),
            ("flag".to_string(), GgufValue::Bool(true)),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(vec![GgufValue::Str("a".into()), GgufValue::Str("bc".into())]),
            ),
        ];
        let tensors = vec![
            GgufTensorData::from_tensor("a", &a, GgmlType::F16).unwrap(),
            GgufTensorData::from_tensor("b", &b, GgmlType::F32).unwrap(),
        ];
        write_gguf(&path, &meta, &tensors).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        for (k, v) in &meta {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        assert_eq!(f.get_u64("general.alignment").unwrap(), 32);
        assert_eq!(f.tensor_info("a").unwrap().shape, vec![3, 4]);
        assert_eq!(f.tensor_info("a").unwrap().ggml_type, GgmlType::F16);
        let a2 = f.dequantize("a", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            a2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let b2 = f.dequantize("b", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(b2.to_vec1::<f32>().unwrap(), vec![1.5, -2.25, 3.0]);
        assert_eq!(f.tensors[1].offset % 32, 0);
    }

    #[test]
    fn refuses_inconsistent_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let bad = GgufTensorData { name: "x".into(), shape: vec![2, 2], ggml_type: GgmlType::F32, data: vec![0; 12] };
        assert!(write_gguf(&path, &[], &[bad]).is_err());
        let mixed = vec![("m".to_string(), GgufValue::Array(vec![GgufValue::I32(1), GgufValue::Str("x".into())]))];
        assert!(write_gguf(&path, &mixed, &[]).is_err());
        let dup = vec![("k".to_string(), GgufValue::U32(1)), ("k".to_string(), GgufValue::U32(2))];
        assert!(write_gguf(&path, &dup, &[]).is_err());
    }
}
