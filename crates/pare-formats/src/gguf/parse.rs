//! The GGUF header parser: magic, version, metadata key/values and tensor infos.
//!
//! It reads from the memory-mapped file through [`Cursor`], which checks every read and every
//! declared count against the bytes that remain *before* allocating, so a corrupt length or
//! count becomes an error naming the offset, not an out-of-memory abort or a panic.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::{GgmlType, GgufTensorInfo, GgufValue};
use crate::error::{FormatError, Result};

/// "GGUF" as the little-endian u32 every GGUF file starts with.
const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// ggml's `GGML_MAX_DIMS`: no tensor may have more dimensions.
const MAX_DIMS: u32 = 4;
/// llama.cpp's default when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays of arrays are legal GGUF but never needed deeper than this; the limit keeps a crafted
/// file from exhausting the stack through recursion.
const MAX_ARRAY_NESTING: usize = 8;

/// What the header says, with tensor offsets already made absolute and checked.
pub(super) struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

/// A bounds-checked little-endian reader over the whole file.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, needed: u64, what: &str) -> FormatError {
        FormatError::corrupt(
            self.path,
            format!(
                "truncated: {what} needs {needed} bytes at offset {} but the file has {} bytes",
                self.pos,
                self.buf.len()
            ),
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated(n as u64, what));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can still fit in the file,
    /// and returns the count as a usize that is safe to pre-allocate for.
    fn count(&self, count: u64, min_size: usize, what: &str) -> Result<usize> {
        let fits = count.checked_mul(min_size as u64).is_some_and(|need| need <= self.remaining() as u64);
        if !fits {
            return Err(FormatError::corrupt(
                self.path,
                format!(
                    "{what} count {count} at offset {} cannot fit in the {} bytes left in the file",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        Ok(count as usize)
    }

    /// A GGUF string: u64 byte length, then UTF-8 bytes.
    fn string(&mut self, what: &str) -> Result<String> {
        let start = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(FormatError::corrupt(
                self.path,
                format!(
                    "{what}: string length {len} at offset {start} exceeds the {} bytes left in the file",
                    self.remaining()
                ),
            ));
        }
        let bytes = self.take(len as usize, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => {
                Err(FormatError::corrupt(self.path, format!("{what}: string at offset {start} is not valid UTF-8")))
            }
        }
    }

    /// One metadata value of type id `ty`; `key` names it in errors, `what` describes it
    /// (built once by the caller, as arrays hold hundreds of thousands of values).
    fn value(&mut self, ty: u32, key: &str, what: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => {
                        return Err(FormatError::corrupt(
                            self.path,
                            format!("{what}: bool at offset {at} has byte {b}, expected 0 or 1"),
                        ))
                    }
                }
            }
            8 => GgufValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(FormatError::corrupt(
                        self.path,
                        format!("{what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels"),
                    ));
                }
                let elem_ty = self.u32(what)?;
                let min = min_value_size(elem_ty).ok_or_else(|| self.bad_value_type(elem_ty, key))?;
                let raw_count = self.u64(what)?;
                let n = self.count(raw_count, min, &format!("{what}: array element"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.bad_value_type(other, key)),
        })
    }

    fn bad_value_type(&self, ty: u32, key: &str) -> FormatError {
        FormatError::corrupt(self.path, format!("metadata value `{key}` has unknown type id {ty}"))
    }
}

/// The fewest bytes a value of type id `ty` can occupy, or `None` for an unknown type.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,     // u64 length, possibly empty
        9 => 4 + 8, // element type and count, possibly empty
        10..=12 => 8,
        _ => return None,
    })
}

/// Parses and validates the header of the GGUF file whose bytes are `buf`.
pub(super) fn parse(path: &Path, buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { path, buf, pos: 0 };
    if buf.len() < 4 || buf[..4] != GGUF_MAGIC {
        return Err(FormatError::corrupt(path, "bad magic (not a GGUF file)"));
    }
    c.pos = 4;
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err(FormatError::corrupt(path, "GGUF version 1 is not supported (only versions 2 and 3)")),
        v if v.swap_bytes() <= 3 => return Err(FormatError::corrupt(path, "big-endian GGUF files are not supported")),
        v => return Err(FormatError::corrupt(path, format!("unsupported GGUF version {v} (only versions 2 and 3)"))),
    }

    let raw_tensors = c.u64("tensor count")?;
    let raw_kv = c.u64("metadata count")?;
    // Smallest key/value: empty key (8) + type (4) + one byte; smallest tensor info: empty name
    // (8) + n_dims (4) + type (4) + offset (8).
    let n_kv = c.count(raw_kv, 8 + 4 + 1, "metadata key/value")?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("type of metadata key `{key}`"))?;
        let value = c.value(ty, &key, &format!("metadata value `{key}`"), 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(FormatError::corrupt(path, format!("metadata key `{key}` appears twice")));
        }
    }

    let alignment = alignment(path, &metadata)?;
    let n_tensors = c.count(raw_tensors, 8 + 4 + 4 + 8, "tensor info")?;
    let mut raw = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor #{i}"))?;
        let info = tensor_info(&mut c, name)?;
        if !names.insert(info.0.name.clone()) {
            return Err(FormatError::corrupt(path, format!("tensor `{}` appears twice", info.0.name)));
        }
        raw.push(info);
    }

    // Tensor data starts at the next multiple of the alignment after the infos.
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for (mut info, rel_offset) in raw {
        if rel_offset % alignment != 0 {
            return Err(FormatError::corrupt(
                path,
                format!(
                    "tensor `{}` has data offset {rel_offset}, not a multiple of the alignment {alignment}",
                    info.name
                ),
            ));
        }
        let start = data_start.checked_add(rel_offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => info.offset = start,
            _ => {
                return Err(FormatError::corrupt(
                    path,
                    format!(
                        "tensor `{}` data [{}..{}] lies past the end of the file (size {file_len})",
                        info.name,
                        data_start as u128 + rel_offset as u128,
                        data_start as u128 + rel_offset as u128 + info.n_bytes as u128,
                    ),
                ))
            }
        }
        tensors.push(info);
    }
    check_overlaps(path, &tensors)?;

    Ok(Header { version, metadata, tensors })
}

/// `general.alignment`, which must be a power of two when present.
fn alignment(path: &Path, metadata: &BTreeMap<String, GgufValue>) -> Result<u64> {
    let Some(value) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u64() {
        Some(a) if a.is_power_of_two() && a <= u32::MAX as u64 => Ok(a),
        _ => Err(FormatError::corrupt(path, format!("general.alignment is {value:?}, expected a power of two"))),
    }
}

/// Reads one tensor info after its name: dims, type and relative offset. The returned info's
/// `offset` is still zero; the relative offset comes beside it.
fn tensor_info(c: &mut Cursor<'_>, name: String) -> Result<(GgufTensorInfo, u64)> {
    let path = c.path;
    let n_dims = c.u32(&format!("dimension count of tensor `{name}`"))?;
    if n_dims > MAX_DIMS {
        return Err(FormatError::corrupt(
            path,
            format!("tensor `{name}` has {n_dims} dimensions, at most {MAX_DIMS} are allowed"),
        ));
    }
    let mut ne = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        ne.push(c.u64(&format!("dimensions of tensor `{name}`"))?);
    }
    let type_id = c.u32(&format!("type of tensor `{name}`"))?;
    let rel_offset = c.u64(&format!("data offset of tensor `{name}`"))?;
    let ggml_type = GgmlType::from_id(type_id)
        .ok_or_else(|| FormatError::corrupt(path, format!("tensor `{name}` has unknown ggml type {type_id}")))?;

    if let Some(d) = ne.iter().position(|&d| d == 0) {
        return Err(FormatError::corrupt(path, format!("tensor `{name}` has size 0 in dimension {d} (ne {ne:?})")));
    }
    let elements =
        ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= i64::MAX as u64).ok_or_else(|| {
            FormatError::corrupt(path, format!("tensor `{name}` element count overflows (ne {ne:?})"))
        })?;
    let block = ggml_type.block_size() as u64;
    let row = ne.first().copied().unwrap_or(1);
    if row % block != 0 {
        return Err(FormatError::corrupt(
            path,
            format!("tensor `{name}` has rows of {row} elements, not a multiple of the {ggml_type} block size {block}"),
        ));
    }
    let n_bytes = (elements / block)
        .checked_mul(ggml_type.type_size() as u64)
        .ok_or_else(|| FormatError::corrupt(path, format!("tensor `{name}` byte size overflows (ne {ne:?})")))?;
    let shape = ne
        .iter()
        .rev()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| FormatError::corrupt(path, format!("tensor `{name}` is too large for this platform")))?;
    Ok((GgufTensorInfo { name, shape, ggml_type, offset: 0, n_bytes }, rel_offset))
}

/// Rejects tensors whose data ranges overlap: each tensor must own its bytes.
fn check_overlaps(path: &Path, tensors: &[GgufTensorInfo]) -> Result<()> {
    let mut by_offset: Vec<&GgufTensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.offset + a.n_bytes > b.offset {
            return Err(FormatError::corrupt(
                path,
                format!(
                    "tensor `{}` data [{}..{}] overlaps tensor `{}` starting at {}",
                    a.name,
                    a.offset,
                    a.offset + a.n_bytes,
                    b.name,
                    b.offset
                ),
            ));
        }
    }
    Ok(())
}
