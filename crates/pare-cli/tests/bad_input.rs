//! Bad input never panics: each case ends with one line on stderr naming the problem and exit ≠ 0.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pare-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Run pare and return its stderr, asserting a clean one-line failure.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pare")).args(args).output().expect("run pare");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "pare {args:?} succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "pare {args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "pare {args:?}: expected one error line, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "pare {args:?}: {stderr}");
    stderr
}

fn expect(args: &[&str], needle: &str) {
    let err = fails(args);
    assert!(err.to_lowercase().contains(&needle.to_lowercase()), "pare {args:?}: {err:?} should mention {needle:?}");
}

/// A minimal GGUF v3 file: metadata strings/u32s and tensors (name, dims, ggml type, data bytes).
fn write_gguf(path: &Path, meta: &[(&str, MetaValue)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    let mut b: Vec<u8> = Vec::new();
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        match v {
            MetaValue::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            MetaValue::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            MetaValue::Str(s) => {
                b.extend(8u32.to_le_bytes());
                put_str(&mut b, s);
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        put_str(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend(data);
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}

enum MetaValue {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

fn llama_meta(arch: &'static str) -> Vec<(&'static str, MetaValue)> {
    let k = |s: &'static str| s;
    vec![
        (k("general.architecture"), MetaValue::Str(arch)),
        (k("llama.embedding_length"), MetaValue::U32(8)),
        (k("llama.block_count"), MetaValue::U32(1)),
        (k("llama.feed_forward_length"), MetaValue::U32(16)),
        (k("llama.attention.head_count"), MetaValue::U32(2)),
        (k("llama.context_length"), MetaValue::U32(64)),
        (k("llama.attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5)),
    ]
}

const GEN: &[&str] = &["generate", "--prompt", "hi", "--max-new-tokens", "2", "--model"];

fn gen_with(model: &Path) -> Vec<String> {
    GEN.iter().map(|s| s.to_string()).chain([model.display().to_string()]).collect()
}

fn run_gen(model: &Path, needle: &str) {
    let args = gen_with(model);
    expect(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
}

#[test]
fn missing_model_file() {
    run_gen(Path::new("/nonexistent/model.gguf"), "not found");
}

#[test]
fn gguf_with_bad_magic() {
    let p = scratch("bad-magic.gguf");
    std::fs::write(&p, b"GGML\x03\x00\x00\x00 not a gguf file at all").unwrap();
    run_gen(&p, "magic");
}

#[test]
fn truncated_gguf_header() {
    let real = std::fs::read(repo().join("assets/SmolLM2-135M-Instruct.Q4_1.gguf")).expect("make assets first");
    let p = scratch("truncated-header.gguf");
    std::fs::write(&p, &real[..4096]).unwrap();
    run_gen(&p, "truncated-header.gguf");
}

#[test]
fn gguf_with_tensor_data_past_the_end() {
    let real = std::fs::read(repo().join("assets/SmolLM2-135M-Instruct.Q4_1.gguf")).expect("make assets first");
    let p = scratch("truncated-data.gguf");
    std::fs::write(&p, &real[..real.len() / 2]).unwrap();
    run_gen(&p, "past the end");
}

#[test]
fn gguf_with_huge_string_length() {
    let p = scratch("huge-string.gguf");
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes()); // key length
    std::fs::write(&p, b).unwrap();
    run_gen(&p, "huge-string.gguf");
}

#[test]
fn gguf_with_unknown_architecture() {
    let p = scratch("mamba.gguf");
    write_gguf(&p, &llama_meta("mamba"), &[]);
    run_gen(&p, "mamba");
}

#[test]
fn gguf_with_unsupported_ggml_type() {
    let p = scratch("iq-type.gguf");
    // type 16 is IQ2_XXS; give it plausible bytes so only the type is wrong.
    write_gguf(&p, &llama_meta("llama"), &[("token_embd.weight", vec![256, 4], 16, vec![0u8; 66 * 4])]);
    fails(&gen_with(&p).iter().map(String::as_str).collect::<Vec<_>>());
}

fn copy_tiny_llama(name: &str) -> PathBuf {
    let src = repo().join("tests/fixtures/llama-tiny/model");
    let dst = scratch(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

fn inspect(model: &Path, needle: &str) {
    expect(&["inspect", "--model", model.to_str().unwrap()], needle);
}

#[test]
fn truncated_safetensors() {
    let dir = copy_tiny_llama("st-truncated");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    inspect(&dir, "model.safetensors");
}

#[test]
fn safetensors_with_bad_header() {
    let dir = copy_tiny_llama("st-bad-header");
    let f = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    inspect(&dir, "model.safetensors");
}

#[test]
fn safetensors_shape_byte_count_mismatch() {
    let dir = copy_tiny_llama("st-shape");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Claim a larger first dimension for the embedding while keeping the byte range.
    let patched = header.replacen("[256,64]", "[257,64]", 1);
    assert_ne!(patched, header, "fixture header layout changed");
    let mut out = Vec::new();
    out.extend((patched.len() as u64).to_le_bytes());
    out.extend(patched.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(&f, out).unwrap();
    inspect(&dir, "model.safetensors");
}

#[test]
fn config_with_unknown_architecture() {
    let dir = copy_tiny_llama("unknown-arch");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("\"llama\"", "\"rwkv\"")).unwrap();
    inspect(&dir, "rwkv");
}

#[test]
fn prompt_longer_than_the_context() {
    let model = repo().join("tests/fixtures/gptneox-tiny/model");
    let long = "word ".repeat(3000);
    expect(&["score", "--model", model.to_str().unwrap(), "--prompt", &long], "context");
}

#[test]
fn ppl_rejects_zero_ctx_and_stride_beyond_ctx() {
    let text = repo().join("assets/texts/tiny.utf8");
    let text = text.to_str().unwrap();
    expect(&["eval", "ppl", "--text", text, "--ctx", "0", "--stride", "1"], "--ctx");
    expect(&["eval", "ppl", "--text", text, "--ctx", "64", "--stride", "65"], "--stride");
}

#[test]
fn ppl_rejects_empty_and_non_utf8_text() {
    let empty = scratch("empty.txt");
    std::fs::write(&empty, "").unwrap();
    expect(&["eval", "ppl", "--text", empty.to_str().unwrap()], "empty");
    let binary = scratch("binary.txt");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80, 0xc3]).unwrap();
    expect(&["eval", "ppl", "--text", binary.to_str().unwrap()], "UTF-8");
    expect(&["eval", "ppl", "--text", "/nonexistent.txt"], "nonexistent");
}

#[test]
fn bad_dtype_and_device() {
    expect(&["score", "--prompt", "hi", "--dtype", "f8"], "--dtype");
    expect(&["score", "--prompt", "hi", "--device", "tpu"], "--device");
    expect(&["score", "--prompt", "hi", "--threads", "0"], "--threads");
}

#[test]
fn bad_decoding_parameters() {
    let base = ["generate", "--prompt", "x"];
    let cases: &[(&[&str], &str)] = &[
        (&["--temperature", "-1"], "temperature"),
        (&["--do-sample", "--top-p", "0"], "top_p"),
        (&["--do-sample", "--top-p", "1.5"], "top_p"),
        (&["--do-sample", "--top-k", "-2"], "top_k"),
        (&["--do-sample", "--min-p", "1.5"], "min_p"),
        (&["--num-beams", "0"], "num_beams"),
        (&["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences"),
        (&["--repetition-penalty", "0"], "repetition_penalty"),
        (&["--stop-token", "<|no such token|>"], "stop-token"),
        (&["--early-stopping", "sometimes"], "early-stopping"),
        (&["--logit-bias", "5"], "logit-bias"),
        (&["--logit-bias", "999999=1"], "vocabulary"),
        (&["--config", "/nonexistent.json"], "nonexistent"),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        expect(&args, needle);
    }
}

#[test]
fn bad_press_settings_are_one_line_errors() {
    let gen = |extra: &[&str]| -> Vec<String> {
        ["generate", "--prompt", "Hello", "--max-new-tokens", "2"].iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let check = |extra: &[&str], needle: &str| {
        let args = gen(extra);
        expect(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    };
    check(&["--press", "knorm", "--ratio", "1.0"], "--ratio must be in [0, 1)");
    check(&["--press", "knorm", "--ratio", "-0.2"], "--ratio must be in [0, 1)");
    check(&["--press", "streaming", "--sinks", "8", "--capacity", "4"], "must be at least --sinks");
    check(&["--press", "knorm", "--budget", "0"], "--budget must be at least 1");
    check(&["--press", "squeeze", "--ratio", "0.5"], "unknown press");
    check(&["--press", "knorm", "--ratio", "0.5", "--window", "32"], "--window does not apply");
    check(&["--press", "snapkv", "--ratio", "0.5", "--chunk-length", "8"], "--chunk-length does not apply");
    check(&["--ratio", "0.5"], "--ratio needs --press");
    check(&["--press", "knorm"], "needs --ratio");
    check(&["--press", "adakv", "--ratio", "0.5"], "adakv wraps a scorer");
    check(&["--press", "knorm+snapkv", "--ratio", "0.5"], "not a wrapper");
    check(&["--press", "decoding+knorm"], "decoding needs --budget");
    expect(&["eval", "ppl", "--text", "README.md", "--press", "tova", "--ratio", "2"], "--ratio must be in [0, 1)");
    expect(&["eval", "needle", "--depths", "150"], "percentages in [0, 100]");
    expect(
        &["eval", "compare", "--text", "README.md", "--ctx", "64", "--continuation", "64"],
        "--continuation must be between",
    );
}
