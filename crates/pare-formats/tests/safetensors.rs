//! safetensors checkpoints: round trips, sharded directories, and every malformation reported
//! with the file's name.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use pare_formats::{save_safetensors, FormatError, SafetensorsStore};

fn sample() -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let w = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap();
    vec![
        ("model.layers.0.weight".to_string(), w.clone()),
        ("model.norm.weight".to_string(), Tensor::new(&[1.5f32, -2.25], &dev).unwrap().to_dtype(DType::F16).unwrap()),
        ("lm_head.weight".to_string(), w.to_dtype(DType::BF16).unwrap().t().unwrap()),
        ("ids".to_string(), Tensor::new(&[7i64, -1, 3], &dev).unwrap()),
    ]
}

/// A safetensors file from a raw header and data section.
fn raw_file(dir: &Path, name: &str, header: &str, data: &[u8]) -> std::path::PathBuf {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open_err(path: &Path) -> String {
    let err = SafetensorsStore::open_files(&[path.to_path_buf()]).unwrap_err();
    let msg = err.to_string();
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(name), "message must name the file: {msg}");
    msg
}

#[test]
fn save_then_load_round_trip() {
    let dir = scratch_dir("st-roundtrip");
    let tensors = sample();
    save_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
    let store = SafetensorsStore::open_dir(&dir).unwrap();
    assert_eq!(store.names(), vec!["ids", "lm_head.weight", "model.layers.0.weight", "model.norm.weight"]);
    assert!(store.contains("ids") && !store.contains("nope"));
    assert_eq!(store.shape("lm_head.weight").unwrap(), vec![4, 3]);
    for (name, t) in &tensors {
        let back = store.load(name, t.dtype(), &Device::Cpu).unwrap();
        assert_eq!(back.dims(), t.dims());
        let diff = back.to_dtype(DType::F64).unwrap().sub(&t.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(diff.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0, "{name}");
    }
    let as_f32 = store.load("model.norm.weight", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(as_f32.to_vec1::<f32>().unwrap(), vec![1.5, -2.25]);
    let lm = store.load("lm_head.weight", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(lm.to_vec2::<f32>().unwrap()[1], vec![1.0, 5.0, 9.0]);

    // The default metadata is what transformers expects.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");

    let custom = HashMap::from([("format".to_string(), "pt".to_string()), ("source".to_string(), "pare".to_string())]);
    save_safetensors(&dir.join("meta.safetensors"), &tensors[..1], Some(custom)).unwrap();

    let err = store.load("nope", DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, FormatError::TensorNotFound { .. }), "{err}");
    assert!(err.to_string().contains("no tensor named `nope`"));

    let err =
        save_safetensors(&dir.join("dup.safetensors"), &[tensors[0].clone(), tensors[0].clone()], None).unwrap_err();
    assert!(err.to_string().contains("given twice"), "{err}");
}

#[test]
fn sharded_directory() {
    let dir = scratch_dir("st-shards");
    let tensors = sample();
    save_safetensors(&dir.join("model-00001-of-00002.safetensors"), &tensors[..2], None).unwrap();
    save_safetensors(&dir.join("model-00002-of-00002.safetensors"), &tensors[2..], None).unwrap();
    let mut map = serde_json::Map::new();
    for (i, (name, _)) in tensors.iter().enumerate() {
        let shard = if i < 2 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        map.insert(name.clone(), shard.into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let store = SafetensorsStore::open_dir(&dir).unwrap();
    assert_eq!(store.names().len(), 4);
    assert_eq!(store.load("ids", DType::I64, &Device::Cpu).unwrap().to_vec1::<i64>().unwrap(), vec![7, -1, 3]);

    // A weight_map naming a shard that is not there.
    let mut broken = index.clone();
    broken["weight_map"]["ids"] = "model-00003-of-00002.safetensors".into();
    std::fs::write(dir.join("model.safetensors.index.json"), broken.to_string()).unwrap();
    let msg = SafetensorsStore::open_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("model.safetensors.index.json") && msg.contains("model-00003-of-00002.safetensors"), "{msg}");

    // A weight_map putting a tensor in the wrong shard.
    let mut wrong = index.clone();
    wrong["weight_map"]["ids"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(dir.join("model.safetensors.index.json"), wrong.to_string()).unwrap();
    let msg = SafetensorsStore::open_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("`ids`") && msg.contains("does not hold it"), "{msg}");

    std::fs::write(dir.join("model.safetensors.index.json"), "{\"weight_map\": 3}").unwrap();
    let msg = SafetensorsStore::open_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("no `weight_map` object"), "{msg}");
    std::fs::write(dir.join("model.safetensors.index.json"), "{").unwrap();
    let msg = SafetensorsStore::open_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");

    // The same tensor in two files.
    let paths = [dir.join("model-00001-of-00002.safetensors"), dir.join("model-00001-of-00002.safetensors")];
    let msg = SafetensorsStore::open_files(&paths).unwrap_err().to_string();
    assert!(msg.contains("is also in"), "{msg}");
}

#[test]
fn missing_files() {
    let dir = scratch_dir("st-missing");
    let msg = SafetensorsStore::open_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("neither model.safetensors nor model.safetensors.index.json"), "{msg}");
    let err = SafetensorsStore::open_files(&[dir.join("absent.safetensors")]).unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }) && err.to_string().contains("absent.safetensors"));
}

#[test]
fn malformed_files() {
    let dir = scratch_dir("st-bad");
    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

    std::fs::write(dir.join("empty.safetensors"), b"").unwrap();
    assert!(open_err(&dir.join("empty.safetensors")).contains("header too small"));

    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(dir.join("hugeheader.safetensors"), huge).unwrap();
    assert!(open_err(&dir.join("hugeheader.safetensors")).contains("header too large"));

    let mut long = 1000u64.to_le_bytes().to_vec();
    long.extend_from_slice(b"{}");
    std::fs::write(dir.join("longheader.safetensors"), long).unwrap();
    assert!(open_err(&dir.join("longheader.safetensors")).contains("invalid header length"));

    let p = raw_file(&dir, "json.safetensors", "{\"a\": [", &[]);
    assert!(open_err(&p).contains("invalid JSON in header"));

    let p = raw_file(&dir, "shape.safetensors", r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]);
    assert!(open_err(&p).contains("invalid shape, data type, or offset"));

    let p = raw_file(&dir, "past.safetensors", ok, &[0; 4]);
    assert!(open_err(&p).contains("incomplete metadata"));

    let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let p = raw_file(&dir, "overlap.safetensors", overlap, &[0; 12]);
    assert!(open_err(&p).contains("invalid offset for tensor"));

    let p = raw_file(&dir, "good.safetensors", ok, &f32_bytes(&[1.0, 2.0]));
    let store = SafetensorsStore::open_files(&[p]).unwrap();
    assert_eq!(store.load("a", DType::F32, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);

    // A dtype candle has no tensor type for is reported by tensor name on load.
    let p = raw_file(&dir, "c64.safetensors", r#"{"z":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#, &[0; 8]);
    let store = SafetensorsStore::open_files(&[p]).unwrap();
    let msg = store.load("z", DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("c64.safetensors") && msg.contains("`z`") && msg.contains("C64"), "{msg}");
}
