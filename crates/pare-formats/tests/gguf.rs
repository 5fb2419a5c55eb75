//! GGUF parsing: every malformation gives an error naming the file and the problem; valid
//! synthetic and real files parse to the right metadata and tensors.

mod common;

use candle_core::{DType, Device};
use common::*;
use pare_formats::{FormatError, GgmlType, GgufFile, GgufValue};

fn open_err(bytes: Vec<u8>, name: &str) -> String {
    let dir = scratch_dir("gguf-err");
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).expect_err("corrupt file must not open");
    let msg = err.to_string();
    assert!(msg.contains(name), "message must name the file: {msg}");
    assert!(!msg.contains('\n'), "message must be one line: {msg}");
    msg
}

/// A small valid file: a few metadata kinds and an F32 and an F16 tensor.
fn valid() -> GgufBuilder {
    GgufBuilder::default()
        .kv(kv_str("general.architecture", "llama"))
        .kv(kv_u32("llama.block_count", 2))
        .kv(kv_f32("llama.rope.freq_base", 10000.0))
        .kv(kv_bool("tokenizer.ggml.add_bos_token", true))
        .kv(kv_str_array("tokenizer.ggml.tokens", &["a", "b", "c"]))
        .tensor(tensor("w", &[4, 2], 0, f32_bytes(&[0., 1., 2., 3., 4., 5., 6., 7.])))
        .tensor(tensor(
            "h",
            &[3],
            1,
            [1.5f32, -2.0, 0.25].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        ))
}

#[test]
fn missing_file() {
    let path = scratch_dir("missing").join("nope.gguf");
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }));
    assert!(err.to_string().contains("nope.gguf"), "{err}");
}

#[test]
fn empty_file_and_bad_magic() {
    assert!(open_err(Vec::new(), "empty.gguf").contains("bad magic"));
    let mut b = valid();
    b.magic = *b"GGML";
    assert!(open_err(b.bytes(), "magic.gguf").contains("bad magic (not a GGUF file)"));
}

#[test]
fn versions() {
    for (v, expect) in
        [(1, "version 1 is not supported"), (4, "unsupported GGUF version 4"), (0x0300_0000, "big-endian")]
    {
        let mut b = valid();
        b.version = v;
        let msg = open_err(b.bytes(), "version.gguf");
        assert!(msg.contains(expect), "{msg}");
    }
    let mut b = valid();
    b.version = 2;
    let dir = scratch_dir("v2");
    let f = GgufFile::open(&b.write(&dir, "v2.gguf")).unwrap();
    assert_eq!(f.version, 2);
}

#[test]
fn truncated_header() {
    let msg = open_err(b"GGUF\x03\x00\x00\x00\x01\x00".to_vec(), "trunc.gguf");
    assert!(msg.contains("truncated"), "{msg}");
}

/// Every prefix of a valid file is an error (never a panic), and the whole file opens.
#[test]
fn every_truncation_is_an_error() {
    let bytes = valid().bytes();
    let dir = scratch_dir("prefixes");
    let path = dir.join("prefix.gguf");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        assert!(GgufFile::open(&path).is_err(), "prefix of {len} bytes opened");
    }
    std::fs::write(&path, &bytes).unwrap();
    GgufFile::open(&path).unwrap();
}

/// Random byte corruption never panics; whatever opens still only exposes in-file data.
#[test]
fn random_corruption_never_panics() {
    let bytes = valid().bytes();
    let dir = scratch_dir("fuzz");
    let path = dir.join("fuzz.gguf");
    let mut rng = Lcg(7);
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() as usize) % b.len();
            b[i] = rng.next() as u8;
        }
        std::fs::write(&path, &b).unwrap();
        if let Ok(f) = GgufFile::open(&path) {
            for t in &f.tensors {
                assert!(t.offset + t.n_bytes <= b.len() as u64);
                let _ = f.dequantize(&t.name, DType::F32, &Device::Cpu);
            }
        }
    }
}

#[test]
fn huge_string_length() {
    let mut b = valid().bytes();
    // The first key's length field follows magic, version and the two counts.
    b[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let msg = open_err(b, "strlen.gguf");
    assert!(msg.contains("string length") && msg.contains("exceeds"), "{msg}");
}

#[test]
fn huge_counts() {
    let mut b = valid().bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let msg = open_err(b, "kvcount.gguf");
    assert!(msg.contains("metadata key/value count"), "{msg}");

    let mut b = valid().bytes();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let msg = open_err(b, "tcount.gguf");
    assert!(msg.contains("tensor info count"), "{msg}");

    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 50).to_le_bytes());
    let b = GgufBuilder::default().kv(Kv { key: "big".into(), ty: 9, payload: arr }).bytes();
    let msg = open_err(b, "arraycount.gguf");
    assert!(msg.contains("`big`") && msg.contains("array element count"), "{msg}");
}

#[test]
fn bad_metadata_values() {
    let b = GgufBuilder::default().kv(Kv { key: "k".into(), ty: 13, payload: vec![0; 8] }).bytes();
    assert!(open_err(b, "vtype.gguf").contains("unknown type id 13"));

    let b = GgufBuilder::default().kv(Kv { key: "flag".into(), ty: 7, payload: vec![2] }).bytes();
    assert!(open_err(b, "bool.gguf").contains("expected 0 or 1"));

    let b = GgufBuilder::default()
        .kv(Kv {
            key: "s".into(),
            ty: 8,
            payload: {
                let mut p = 2u64.to_le_bytes().to_vec();
                p.extend_from_slice(&[0xff, 0xfe]);
                p
            },
        })
        .bytes();
    assert!(open_err(b, "utf8.gguf").contains("not valid UTF-8"));

    let b = GgufBuilder::default().kv(kv_u32("k", 1)).kv(kv_u32("k", 2)).bytes();
    assert!(open_err(b, "dupkey.gguf").contains("`k` appears twice"));

    // Arrays of arrays of ... beyond the nesting limit.
    let mut payload = Vec::new();
    for _ in 0..20 {
        payload.extend_from_slice(&9u32.to_le_bytes());
        payload.extend_from_slice(&1u64.to_le_bytes());
    }
    payload.extend_from_slice(&4u32.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    let b = GgufBuilder::default().kv(Kv { key: "deep".into(), ty: 9, payload }).bytes();
    assert!(open_err(b, "deep.gguf").contains("nested deeper"));
}

#[test]
fn bad_tensor_infos() {
    let msg = open_err(valid().tensor(tensor("x", &[32], 99, vec![0; 18])).bytes(), "type.gguf");
    assert!(msg.contains("tensor `x` has unknown ggml type 99"), "{msg}");

    let msg = open_err(valid().tensor(tensor("x", &[1, 1, 1, 1, 1], 0, vec![0; 4])).bytes(), "dims.gguf");
    assert!(msg.contains("5 dimensions"), "{msg}");

    let msg = open_err(valid().tensor(tensor("x", &[4, 0], 0, vec![])).bytes(), "zero.gguf");
    assert!(msg.contains("size 0"), "{msg}");

    // Q4_0 rows must hold whole 32-element blocks.
    let msg = open_err(valid().tensor(tensor("q", &[30, 2], 2, vec![0; 36])).bytes(), "block.gguf");
    assert!(msg.contains("not a multiple of the Q4_0 block size 32"), "{msg}");

    let msg = open_err(valid().tensor(tensor("x", &[u64::MAX, 4], 0, vec![])).bytes(), "overflow.gguf");
    assert!(msg.contains("overflows"), "{msg}");

    let b = valid().tensor(tensor("w", &[1], 0, vec![0; 4]));
    assert!(open_err(b.bytes(), "duptensor.gguf").contains("tensor `w` appears twice"));
}

#[test]
fn tensor_data_past_end_of_file() {
    let mut t = tensor("far", &[8], 0, vec![]);
    t.offset = Some(1 << 20);
    let msg = open_err(valid().tensor(t).bytes(), "eof.gguf");
    assert!(msg.contains("tensor `far` data [") && msg.contains("lies past the end of the file (size"), "{msg}");

    // The data of the last tensor cut short.
    let mut bytes = valid().bytes();
    bytes.truncate(bytes.len() - 1);
    let msg = open_err(bytes, "short.gguf");
    assert!(msg.contains("tensor `h` data") && msg.contains("past the end"), "{msg}");
}

#[test]
fn misaligned_and_overlapping_offsets() {
    let mut t = tensor("odd", &[1], 0, vec![0; 4]);
    t.offset = Some(64 + 4);
    assert!(open_err(valid().tensor(t).bytes(), "align.gguf").contains("not a multiple of the alignment 32"));

    let mut t = tensor("overlap", &[8], 0, vec![0; 32]);
    t.offset = Some(0);
    let msg = open_err(valid().tensor(t).bytes(), "overlap.gguf");
    assert!(msg.contains("overlaps"), "{msg}");
}

#[test]
fn general_alignment() {
    let msg = open_err(valid().kv(kv_u32("general.alignment", 3)).bytes(), "galign.gguf");
    assert!(msg.contains("general.alignment"), "{msg}");

    // A small alignment leaves data unaligned for candle's block structs; it must still load.
    let mut b = GgufBuilder { alignment: 1, ..Default::default() }.kv(kv_u32("general.alignment", 1));
    b = b.tensor(tensor("pad", &[1], 24, vec![7]));
    let q: Vec<u8> = [half::f16::from_f32(0.5).to_le_bytes().to_vec(), (0u8..16).collect()].concat();
    b = b.tensor(tensor("q", &[32], 2, q));
    let dir = scratch_dir("align1");
    let f = GgufFile::open(&b.write(&dir, "a1.gguf")).unwrap();
    let t = f.dequantize("q", DType::F32, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(t[1], (1.0 - 8.0) * 0.5);
    assert_eq!(t[17], (0.0 - 8.0) * 0.5);
}

#[test]
fn metadata_accessors() {
    let dir = scratch_dir("meta");
    let f = GgufFile::open(&valid().write(&dir, "meta.gguf")).unwrap();
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(f.get_f64("llama.block_count").unwrap(), 2.0);
    assert!(f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(f.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array).map(|a| a.len()), Some(3));

    let err = f.get_u64("llama.context_length").unwrap_err();
    assert!(matches!(err, FormatError::MissingKey { .. }));
    assert_eq!(err.to_string(), format!("{}: metadata key `llama.context_length` is missing", f.path.display()));
    let err = f.get_str("llama.block_count").unwrap_err();
    assert!(err.to_string().contains("`llama.block_count` is a u32, expected a string"), "{err}");
    assert!(f.get_bool("general.architecture").is_err());

    let err = f.dequantize("nope", DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("no tensor named `nope`"), "{err}");

    // Values convert across integer widths, refusing what does not fit.
    assert_eq!(GgufValue::I32(-1).as_u64(), None);
    assert_eq!(GgufValue::U64(u64::MAX).as_i64(), None);
    assert_eq!(GgufValue::I8(-3).as_i64(), Some(-3));
    assert_eq!(GgufValue::F32(0.5).as_f64(), Some(0.5));
    assert_eq!(GgufValue::Str("x".into()).as_f64(), None);
}

#[test]
fn plain_tensors_are_exact() {
    let dir = scratch_dir("plain");
    let f = GgufFile::open(&valid().write(&dir, "plain.gguf")).unwrap();
    let w = f.tensor_info("w").unwrap();
    assert_eq!(w.shape, vec![2, 4], "ggml ne [4, 2] is row-major [2, 4]");
    assert_eq!((w.ggml_type, w.n_bytes), (GgmlType::F32, 32));
    let t = f.dequantize("w", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 4]);
    assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0., 1., 2., 3.], vec![4., 5., 6., 7.]]);
    let h = f.dequantize("h", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(h.to_vec1::<f32>().unwrap(), vec![1.5, -2.0, 0.25]);
    let h16 = f.dequantize("h", DType::F16, &Device::Cpu).unwrap();
    assert_eq!(h16.dtype(), DType::F16);
    let q = f.qtensor("w", &Device::Cpu).unwrap();
    assert_eq!(q.shape().dims(), &[2, 4]);
}

/// A zero-dimensional tensor is a scalar; candle cannot hold one quantized, and says so on one
/// line even with `RUST_BACKTRACE` set.
#[test]
fn scalar_tensor() {
    let dir = scratch_dir("scalar");
    let f = GgufFile::open(&valid().tensor(tensor("s", &[], 0, f32_bytes(&[2.5]))).write(&dir, "scalar.gguf")).unwrap();
    assert_eq!(f.tensor_info("s").unwrap().shape, Vec::<usize>::new());
    let t = f.dequantize("s", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(t.to_scalar::<f32>().unwrap(), 2.5);
    let msg = f.qtensor("s", &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("scalar.gguf: tensor `s`: ") && !msg.contains('\n'), "{msg}");
}

/// Types ggml defines but candle cannot dequantize open fine and fail by name on use.
#[test]
fn unsupported_ggml_type() {
    // IQ2_XXS (16): 66-byte blocks of 256.
    let b = valid().tensor(tensor("blk.0.attn_q.weight", &[256], 16, vec![0; 66]));
    let dir = scratch_dir("unsupported");
    let f = GgufFile::open(&b.write(&dir, "iq.gguf")).unwrap();
    let info = f.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(info.ggml_type, GgmlType::IQ2Xxs);
    assert_eq!(info.ggml_type.to_string(), "IQ2_XXS");
    for err in [
        f.dequantize("blk.0.attn_q.weight", DType::F32, &Device::Cpu).unwrap_err(),
        f.qtensor("blk.0.attn_q.weight", &Device::Cpu).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(msg.contains("iq.gguf") && msg.contains("blk.0.attn_q.weight"), "{msg}");
        assert!(msg.contains("unsupported ggml type 16 (IQ2_XXS)"), "{msg}");
    }
}

#[test]
fn real_files_parse() {
    let smol = GgufFile::open(&smollm2_path()).unwrap();
    assert_eq!(smol.version, 3);
    assert_eq!(smol.architecture().unwrap(), "llama");
    assert_eq!(smol.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(smol.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(smol.get_f64("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(smol.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(smol.tensors.len(), 272);
    let emb = smol.tensor_info("token_embd.weight").unwrap();
    assert_eq!((emb.shape.clone(), emb.ggml_type), (vec![49152, 576], GgmlType::Q8_0));
    assert_eq!(smol.tensor_info("blk.0.attn_k.weight").unwrap().shape, vec![192, 576]);

    let qwen = GgufFile::open(&qwen2_path()).unwrap();
    assert_eq!(qwen.architecture().unwrap(), "qwen2");
    assert_eq!(qwen.get_u64("qwen2.block_count").unwrap(), 24);
    assert_eq!(qwen.tensors.len(), 291);
    assert_eq!(qwen.tensor_info("blk.0.attn_k.bias").unwrap().shape, vec![128]);
    let down = qwen.tensor_info("blk.0.ffn_down.weight").unwrap();
    assert_eq!((down.shape.clone(), down.ggml_type), (vec![896, 4864], GgmlType::Q6K));
}
