//! Helpers shared by the integration tests: asset paths, scratch directories, and a small GGUF
//! writer for synthetic (and deliberately broken) files.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

pub fn smollm2_path() -> PathBuf {
    assets().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn qwen2_path() -> PathBuf {
    assets().join("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf")
}

pub fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(test_data(name)).unwrap()).unwrap()
}

/// A fresh, empty directory under the system temp dir, removed when dropped.
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

pub fn scratch_dir(tag: &str) -> Scratch {
    Scratch(tempfile::Builder::new().prefix(&format!("pare-formats-{tag}-")).tempdir().unwrap())
}

/// One metadata value in GGUF's encoding: type id and payload.
#[derive(Clone)]
pub struct Kv {
    pub key: String,
    pub ty: u32,
    pub payload: Vec<u8>,
}

pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

pub fn kv_str(key: &str, value: &str) -> Kv {
    Kv { key: key.into(), ty: 8, payload: gguf_string(value) }
}

pub fn kv_u32(key: &str, value: u32) -> Kv {
    Kv { key: key.into(), ty: 4, payload: value.to_le_bytes().to_vec() }
}

pub fn kv_f32(key: &str, value: f32) -> Kv {
    Kv { key: key.into(), ty: 6, payload: value.to_le_bytes().to_vec() }
}

pub fn kv_bool(key: &str, value: bool) -> Kv {
    Kv { key: key.into(), ty: 7, payload: vec![value as u8] }
}

pub fn kv_str_array(key: &str, values: &[&str]) -> Kv {
    let mut payload = 8u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        payload.extend(gguf_string(v));
    }
    Kv { key: key.into(), ty: 9, payload }
}

pub fn kv_i32_array(key: &str, values: &[i32]) -> Kv {
    let mut payload = 5u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    Kv { key: key.into(), ty: 9, payload }
}

/// One tensor: ggml dims (`ne`, fastest first), type id, data bytes, and an optional forced
/// relative offset (otherwise tensors are packed with alignment padding).
#[derive(Clone)]
pub struct TensorSpec {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    pub offset: Option<u64>,
}

pub fn tensor(name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> TensorSpec {
    TensorSpec { name: name.into(), ne: ne.to_vec(), ty, data, offset: None }
}

/// A GGUF file in memory.
pub struct GgufBuilder {
    pub magic: [u8; 4],
    pub version: u32,
    pub kvs: Vec<Kv>,
    pub tensors: Vec<TensorSpec>,
    pub alignment: u64,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        GgufBuilder { magic: *b"GGUF", version: 3, kvs: Vec::new(), tensors: Vec::new(), alignment: 32 }
    }
}

impl GgufBuilder {
    pub fn kv(mut self, kv: Kv) -> Self {
        self.kvs.push(kv);
        self
    }

    pub fn tensor(mut self, t: TensorSpec) -> Self {
        self.tensors.push(t);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            out.extend(gguf_string(&kv.key));
            out.extend_from_slice(&kv.ty.to_le_bytes());
            out.extend_from_slice(&kv.payload);
        }
        let align = |n: u64| n.div_ceil(self.alignment) * self.alignment;
        let mut next = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            let off = t.offset.unwrap_or(next);
            offsets.push(off);
            next = align(off + t.data.len() as u64);
            out.extend(gguf_string(&t.name));
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        if self.tensors.is_empty() {
            return out;
        }
        let data_start = align(out.len() as u64) as usize;
        out.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            let at = data_start + off as usize;
            if out.len() < at + t.data.len() {
                out.resize(at + t.data.len(), 0);
            }
            out[at..at + t.data.len()].copy_from_slice(&t.data);
        }
        out
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}

/// A little-endian f32 buffer.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A deterministic pseudo-random stream (64-bit LCG), for fuzz-style tests.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// FNV-1a over the little-endian bytes of `ids`, as the fixtures' Python computes it.
pub fn fnv1a64(ids: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}
