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
    expect(&["eval", "ppl", "--text", text, "--ctx", "64", "--stride", "32", "--llama-cpp"], "--stride");
    expect(&["eval", "ppl", "--text", text, "--ctx", "2", "--llama-cpp"], "at least 4");
    expect(
        &["eval", "ppl", "--text", text, "--max-tokens", "100", "--ctx", "128", "--llama-cpp"],
        "fewer than one chunk",
    );
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
fn bad_serve_limits() {
    expect(&["serve", "--max-batched-tokens", "0"], "--max-batched-tokens");
    expect(&["serve", "--timeout", "0"], "--timeout");
    // The server listens (and logs that) before the model loads; a split that cannot be made
    // ends it with one error line.
    let out = Command::new(env!("CARGO_BIN_EXE_pare")).args(["serve", "--port", "0", "--tp", "2"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.trim_end().lines().last().is_some_and(|l| l.starts_with(
            "error: cannot load the model: --tp 2 does not divide layer 0's 9 query heads and 3 KV heads"
        )),
        "{stderr}"
    );
}

#[test]
fn bad_decoding_parameters() {
    let base = ["generate", "--prompt", "x"];
    let cases: &[(&[&str], &str)] = &[
        (&["--temperature", "-1"], "--temperature"),
        (&["--do-sample", "--top-p", "0"], "--top-p"),
        (&["--do-sample", "--top-p", "1.5"], "--top-p"),
        (&["--do-sample", "--top-k", "-2"], "--top-k"),
        (&["--do-sample", "--min-p", "1.5"], "--min-p"),
        (&["--num-beams", "0"], "--num-beams"),
        (&["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences"),
        (&["--repetition-penalty", "0"], "--repetition-penalty"),
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
    check(&["--press", "knorm", "--ratio", "0.5", "--lag-size", "64"], "--lag-size does not apply");
    check(&["--press", "lagkv", "--ratio", "0.5", "--lag-size", "1"], "at least 2");
    check(&["--press", "critical+knorm", "--ratio", "0.5", "--first-stage-ratio", "2"], "must be in [0, 1], got 2");
    check(&["--press", "critical", "--ratio", "0.5"], "critical wraps a scorer");
    check(&["--press", "adakv+chunkkv+knorm", "--ratio", "0.5"], "adakv and chunkkv cannot be combined");
    check(&["--ratio", "0.5"], "--ratio needs --press");
    check(&["--tp", "2"], "--tp 2 does not divide layer 0's 9 query heads and 3 KV heads");
    check(&["--tp", "0"], "--tp");
    check(&["--press", "knorm"], "needs --ratio");
    check(&["--press", "adakv", "--ratio", "0.5"], "adakv wraps a scorer");
    check(&["--press", "knorm+snapkv", "--ratio", "0.5"], "not a wrapper");
    check(&["--press", "decoding+knorm"], "decoding needs --budget");
    check(&["--press", "block+keydiff", "--ratio", "0.5", "--block-size", "0"], "--block-size must be at least 1");
    check(&["--press", "block+snapkv", "--ratio", "0.5"], "block wraps a scorer that reads only keys and values");
    check(&["--press", "knorm", "--ratio", "0.5", "--block-size", "64"], "--block-size does not apply");
    check(&["--press", "think", "--key-channel-ratio", "1.5"], "--key-channel-ratio must be in [0, 1), got 1.5");
    check(&["--press", "think+snapkv", "--ratio", "0.5"], "think needs --key-channel-ratio");
    check(
        &["--press", "think", "--key-channel-ratio", "0.5", "--ratio", "0.5"],
        "--ratio does not apply to think alone",
    );
    check(&["--press", "snapkv+think", "--ratio", "0.5"], "think must come first");
    check(&["--press", "adakv+finch", "--ratio", "0.5"], "finch chooses its kept entries itself");
    check(&["--press", "finch", "--ratio", "0.5", "--window", "0"], "--window and --chunk-length must be at least 1");
    check(&["--press", "finch", "--ratio", "0.5", "--chunk-length", "64"], "--chunk-length must exceed --window");
    check(&["--press", "knorm", "--ratio", "0.5", "--key-channel-ratio", "0.5"], "--key-channel-ratio does not apply");
    check(&["--press", "kvzip", "--ratio", "0.5", "--chunk-size", "0"], "--chunk-size must be at least 1");
    check(&["--press", "adakv+kvzip", "--ratio", "0.5"], "kvzip chooses its entries itself");
    check(&["--press", "knorm", "--ratio", "0.5", "--layerwise"], "--layerwise does not apply");
    check(&["--press", "snapkv", "--ratio", "0.5", "--kvzip-plus", "true"], "--kvzip-plus does not apply");
    check(&["--press", "kvzip"], "needs --ratio");
    let compactor = |extra: &[&str], needle: &str| {
        check(&[&["--press", "compactor", "--ratio", "0.5"], extra].concat(), needle);
    };
    let at_least_1 = "compactor: --chunk-size and --sketch-dimension must be at least 1";
    compactor(&["--sketch-dimension", "0"], at_least_1);
    compactor(&["--chunk-size", "0"], at_least_1);
    compactor(&["--blending", "1.5"], "--blending must be in [0, 1], got 1.5");
    compactor(&["--blending", "-0.1"], "--blending must be in [0, 1], got -0.1");
    check(&["--press", "decoding+compactor", "--budget", "64"], "compactor scores a prompt at prefill only");
    check(&["--press", "block+compactor", "--ratio", "0.5"], "block wraps a scorer that reads only keys and values");
    check(&["--press", "knorm", "--ratio", "0.5", "--sketch-dimension", "8"], "--sketch-dimension does not apply");
    check(&["--press", "snapkv", "--ratio", "0.5", "--sinks-end", "2"], "--sinks-end does not apply");
    // DuoAttention's head pattern: SmolLM2 has 30 layers × 3 KV heads.
    let pattern = |name: &str, text: &str| -> String {
        let path = scratch(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let row = "[0.1, 0.2, 0.3]";
    let good = pattern(
        "duo-good.json",
        &format!(r#"{{"sink_size": 4, "recent_size": 8, "scores": [{}]}}"#, vec![row; 30].join(", ")),
    );
    let small =
        pattern("duo-small.json", &format!(r#"{{"sink_size": 4, "recent_size": 8, "scores": [{row}, {row}]}}"#));
    let ragged = pattern("duo-ragged.json", r#"{"sink_size": 4, "recent_size": 8, "scores": [[0.1, 0.2], [0.3]]}"#);
    let broken = pattern("duo-broken.json", r#"{"sink_size": 4, "scores": []}"#);
    check(&["--press", "duo-attention", "--duo-pattern", &good], "duo-attention needs --head-ratio");
    check(&["--press", "duo-attention", "--head-ratio", "0.5"], "duo-attention needs --duo-pattern");
    check(
        &["--press", "duo-attention", "--head-ratio", "1.5", "--duo-pattern", &good],
        "--head-ratio must be in [0, 1], got 1.5",
    );
    check(
        &["--press", "duo-attention", "--head-ratio", "0.5", "--duo-pattern", "/nonexistent.json"],
        "cannot read --duo-pattern",
    );
    check(&["--press", "duo-attention", "--head-ratio", "0.5", "--duo-pattern", &broken], "is not a head pattern");
    check(
        &["--press", "duo-attention", "--head-ratio", "0.5", "--duo-pattern", &ragged],
        "the same number of head scores",
    );
    check(
        &["--press", "duo-attention", "--head-ratio", "0.5", "--duo-pattern", &small],
        "2 layers × 3 KV heads, the model 30 × 3",
    );
    check(
        &["--press", "duo-attention", "--ratio", "0.5", "--head-ratio", "0.5", "--duo-pattern", &good],
        "--ratio does not apply to duo-attention",
    );
    check(&["--press", "adakv+duo-attention", "--ratio", "0.5"], "duo-attention chooses its kept entries itself");
    check(&["--press", "knorm", "--ratio", "0.5", "--head-ratio", "0.5"], "--head-ratio does not apply");
    let out = scratch("duo-out.json");
    let out = out.to_str().unwrap();
    expect(&["duo-pattern", "--out", out, "--samples", "0"], "--samples and --sample-tokens must be at least 1");
    expect(&["duo-pattern", "--out", out, "--text", "/nonexistent.txt"], "cannot read --text /nonexistent.txt");
    let readme = repo().join("README.md");
    expect(
        &["duo-pattern", "--out", out, "--text", readme.to_str().unwrap(), "--sample-tokens", "10000000"],
        "fewer than one sample",
    );
    let readme = repo().join("README.md");
    let readme = readme.to_str().unwrap();
    expect(&["eval", "ppl", "--text", readme, "--press", "tova", "--ratio", "2"], "--ratio must be in [0, 1)");
    expect(&["eval", "needle", "--depths", "150"], "percentages in [0, 100]");
    expect(&["eval", "tasks", "--tasks", "hellaswagg"], "unknown task \"hellaswagg\" (pare knows boolq");
    expect(&["eval", "tasks", "--tasks", "piqa", "--num-fewshot", "5"], "only mmlu takes");
    expect(&["eval", "tasks", "--limit", "0"], "--limit must be at least 1");
    expect(&["eval", "tasks", "--batch", "0"], "--batch must be at least 1");
    expect(&["eval", "tasks", "--data", "/nonexistent"], "/nonexistent: no evaluation sets there");
    expect(
        &["eval", "compare", "--text", "README.md", "--ctx", "64", "--continuation", "64"],
        "--continuation must be between",
    );
}

// ---- issue 14: one test per class of failure found by the hostile-input matrix ----

fn pare_out(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pare")).args(args).current_dir(repo()).output().expect("run pare")
}

/// A copy of a fixture model directory under a fresh scratch name.
fn copy_fixture(fixture: &str, name: &str) -> PathBuf {
    let src = repo().join("tests/fixtures").join(fixture).join("model");
    let dst = scratch(name);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

/// Overwrite every value of one tensor of a safetensors checkpoint directory with NaN.
fn poison_tensor(dir: &Path, tensor: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let Some(info) = header.get(tensor) else { continue };
        let nan: &[u8] = match info["dtype"].as_str().unwrap() {
            "F32" => &[0x00, 0x00, 0xc0, 0x7f],
            "F16" => &[0x00, 0x7e],
            "BF16" => &[0xc0, 0x7f],
            other => panic!("dtype {other}"),
        };
        let (a, b) =
            (info["data_offsets"][0].as_u64().unwrap() as usize, info["data_offsets"][1].as_u64().unwrap() as usize);
        for chunk in bytes[8 + n + a..8 + n + b].chunks_mut(nan.len()) {
            chunk.copy_from_slice(nan);
        }
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    panic!("no tensor {tensor} in {}", dir.display());
}

#[test]
fn class1_documented_values_and_closed_pipes_do_not_panic() {
    let out = pare_out(&["generate", "--prompt", "Hello", "--max-new-tokens", "2", "--logit-bias", "5=-inf"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A reader that goes away before pare writes: pare ends quietly (SIGPIPE or 0), no panic.
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pare"))
        .args(["inspect", "--model", "tests/fixtures/llama-tiny/model"])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() || out.status.signal() == Some(13), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn class2_invalid_numbers_are_refused_by_the_flag_or_file_that_holds_them() {
    let base = ["generate", "--prompt", "x", "--max-new-tokens", "2"];
    let cases: &[(&[&str], &str)] = &[
        (&["--temperature", "nan"], "--temperature must be a finite number"),
        (&["--temperature", "1e39"], "--temperature must be a finite number"),
        (&["--do-sample", "--top-p", "nan"], "--top-p must be in (0, 1]"),
        (&["--min-p", "nan"], "--min-p"),
        (&["--repetition-penalty", "inf"], "--repetition-penalty"),
        (&["--max-time", "nan"], "--max-time"),
        (&["--length-penalty", "inf"], "--length-penalty"),
        (&["--mirostat-tau", "nan"], "--mirostat-tau"),
        (&["--logit-bias", "5=nan"], "--logit-bias"),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        expect(&args, needle);
    }
    let file = scratch("inf-temperature.json");
    std::fs::write(&file, r#"{"temperature": 1e39}"#).unwrap();
    let file_arg = file.to_str().unwrap();
    let args: Vec<&str> = base.iter().copied().chain(["--config", file_arg]).collect();
    let err = fails(&args);
    assert!(err.contains("inf-temperature.json") && err.contains("temperature"), "{err}");

    let dir = copy_fixture("gptneox-tiny", "negative-rope-theta");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("\"rope_theta\": 10000", "\"rope_theta\": -1")).unwrap();
    expect(&["inspect", "--model", dir.to_str().unwrap()], "rope_theta must be a finite number > 0");

    let dir = copy_fixture("gptneox-tiny", "nan-weights");
    poison_tensor(&dir, "gpt_neox.layers.0.mlp.dense_4h_to_h.weight");
    expect(
        &["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-new-tokens", "2"],
        "first appear in the output of layer 0",
    );
}

#[test]
fn class3_sizes_from_user_input_cannot_overflow() {
    expect(&["generate", "--prompt", "x", "--max-new-tokens", "18446744073709551615"], "exceeds the model's context");
    expect(
        &["eval", "needle", "--ctx", "18446744073709551610", "--depths", "50"],
        "--ctx 18446744073709551610 exceeds",
    );
    expect(&["flops", "--prompt-len", "4294967296", "--gen-len", "1"], "overflow");
}

#[test]
fn class4_memory_is_estimated_before_allocating() {
    // 2^40 layers with a per-layer list: refused at the list's length, before any allocation.
    let dir = copy_fixture("gptneox-tiny", "huge-layers");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = (1u64 << 40).into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    expect(&["inspect", "--model", dir.to_str().unwrap()], "needs");
    cfg["intermediate_size_per_layer"] = serde_json::json!([64, 64]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    expect(&["inspect", "--model", dir.to_str().unwrap()], "2 entries for 1099511627776 layers");

    let scorer = scratch("huge-scorer.safetensors");
    let header = r#"{"__metadata__":{"pare.kind":"token-scorer","hidden_size":"576","d":"64","layers":"1000000000000","heads":"2","ffn":"128"}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    std::fs::write(&scorer, bytes).unwrap();
    let score_arg = format!("learned:{}", scorer.display());
    expect(&["generate", "--prompt", "x", "--prune-tokens", "3:0.5", "--prune-score", &score_arg], "more weights");

    let needs = "available";
    expect(&["bench", "--batch", "1000000", "--prompt-len", "8", "--gen-len", "2"], needs);
    expect(&["generate", "--prompt", "Hello", "--num-beams", "10000000", "--max-new-tokens", "2"], needs);
    expect(
        &["init-random", "--like", "llama3-8b", "--layers", "100000", "--out", scratch("no-init").to_str().unwrap()],
        needs,
    );
    assert!(!scratch("no-init").exists());
    let text = repo().join("assets/texts/tiny.utf8");
    expect(
        &[
            "train-scorer",
            "--layer",
            "2",
            "--text",
            text.to_str().unwrap(),
            "--d",
            "1000000000",
            "--out",
            scratch("no-scorer.safetensors").to_str().unwrap(),
        ],
        needs,
    );
    let prompts = scratch("many-prompts.txt");
    std::fs::write(&prompts, "a long enough prompt line\n".repeat(200_000)).unwrap();
    expect(&["generate", "--prompts-file", prompts.to_str().unwrap(), "--max-new-tokens", "64"], needs);
}

#[test]
fn class5_a_chat_template_that_never_ends_is_an_error() {
    let dir = copy_fixture("gptneox-tiny", "endless-template");
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
    )
    .unwrap();
    expect(
        &["generate", "--model", dir.to_str().unwrap(), "--chat", "--prompt", "hi", "--max-new-tokens", "1"],
        "did not finish",
    );
}

#[test]
fn class6_outputs_never_replace_inputs_or_existing_files() {
    let model = copy_fixture("llama-tiny", "prune-source");
    let m = model.to_str().unwrap();
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    for force in [false, true] {
        let mut args = vec!["prune", "-m", m, "--importance", "l1", "--out", m];
        if force {
            args.push("--force");
        }
        expect(&args, "would overwrite the input");
    }
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), before);

    let existing = scratch("existing-out");
    std::fs::create_dir_all(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), "mine").unwrap();
    expect(&["convert", "-m", "smollm2-135m", "--out", existing.to_str().unwrap()], "pass --force to replace it");
    assert_eq!(std::fs::read_to_string(existing.join("keep.txt")).unwrap(), "mine");

    let text = scratch("compare-text.txt");
    std::fs::write(&text, "some text ".repeat(100)).unwrap();
    let t = text.to_str().unwrap();
    // Named as a plot, or the name's extension is the error.
    let svg_text = scratch("compare-text.svg");
    std::fs::write(&svg_text, "some text ".repeat(100)).unwrap();
    let s = svg_text.to_str().unwrap();
    expect(&["eval", "compare", "--text", s, "--plot", s, "--force"], "would overwrite the input");
    assert!(std::fs::read_to_string(&svg_text).unwrap().starts_with("some text"));
    expect(&["train-scorer", "--layer", "2", "--text", t, "--out", t, "--force"], "would overwrite the input");
    let weights = repo().join("tests/fixtures/gptneox-tiny/model/model-00001-of-00002.safetensors");
    let w = weights.to_str().unwrap();
    let gm = repo().join("tests/fixtures/gptneox-tiny/model");
    expect(
        &["train-scorer", "-m", gm.to_str().unwrap(), "--layer", "1", "--text", t, "--out", w, "--force"],
        "would overwrite the input",
    );
    assert!(std::fs::read_to_string(&text).unwrap().starts_with("some text"));
}

#[test]
fn class7_a_failed_command_leaves_no_output() {
    let out_dir = scratch("mistral-gguf-out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let mistral = repo().join("tests/fixtures/mistral-tiny/model");
    expect(
        &["prune", "-m", mistral.to_str().unwrap(), "--importance", "l1", "--gguf", "--out", out_dir.to_str().unwrap()],
        "sliding-window",
    );
    assert!(!out_dir.exists());

    let scorer = scratch("half-scorer.safetensors");
    let text = repo().join("assets/texts/tiny.utf8");
    let gm = repo().join("tests/fixtures/gptneox-tiny/model");
    let args = [
        "train-scorer",
        "-m",
        gm.to_str().unwrap(),
        "--layer",
        "1",
        "--text",
        text.to_str().unwrap(),
        "--out",
        scorer.to_str().unwrap(),
        "--plot",
        "/proc/pare-cannot-write-here/curve.svg",
    ];
    expect(&args, "--plot");
    assert!(!scorer.exists());
    let parent = scorer.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".half-scorer.safetensors.pare-tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn class8_flags_override_the_config_file() {
    let file = scratch("ten-tokens.json");
    std::fs::write(&file, r#"{"max_new_tokens": 10}"#).unwrap();
    let out = pare_out(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "2",
        "--config",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = json.pointer("/sequences/0/tokens").and_then(|t| t.as_array()).map(Vec::len);
    assert_eq!(tokens, Some(2), "{json}");
}

#[test]
fn class9_messages_name_what_the_user_gave_on_one_line() {
    expect(&["generate", "--prompt", "x", "--max-new-tokens", "-1"], "invalid value '-1' for '--max-new-tokens");
    expect(&["generate"], "--prompt");
    expect(&["prune", "--importance", "magic"], "--importance");
    // An I/O error inside a library error used to print its cause twice.
    let dir = scratch("config-is-a-dir");
    std::fs::create_dir_all(dir.join("config.json")).unwrap();
    let err = fails(&["inspect", "--model", dir.to_str().unwrap()]);
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");
    expect(&["eval", "compare", "--text", "README.md", "--needle-ctx", "0"], "--needle-ctx lengths must be positive");
    expect(&["eval", "compare", "--text", "README.md", "--ruler-ctx", "0"], "--ruler-ctx lengths must be positive");
    expect(&["eval", "compare", "--text", "README.md", "--ruler-samples", "0"], "--ruler-samples must be at least 1");
    expect(&["eval", "compare", "--text", "README.md", "--ruler-batch", "0"], "--ruler-batch must be at least 1");
    expect(&["eval", "ruler", "--batch", "0"], "--batch must be at least 1");
    expect(&["eval", "compare", "--text", "README.md", "--ruler-tasks", "nope"], "unknown RULER task \"nope\"");
    let wiki = repo().join("assets/texts/wiki.utf8");
    let wiki = wiki.to_str().unwrap();
    expect(&["eval", "compare", "--text", wiki, "--ruler-ctx", "1000000"], "--ruler-ctx 1000000 exceeds");
    // A plot is SVG or PNG by its name, refused before the model loads.
    let bad_plot = "--plot plot.jpg: not a plot format (the name must end in .svg or .png)";
    expect(&["eval", "compare", "--text", wiki, "--plot", "plot.jpg"], bad_plot);
    expect(&["eval", "ruler", "--plot", "plot.jpg"], bad_plot);
    expect(&["train-scorer", "--layer", "2", "--text", wiki, "--plot", "plot.jpg"], bad_plot);
    assert!(!Path::new("plot.jpg").exists());
    let err = fails(&["eval", "ppl", "--text", "README.md", "--ctx", "0"]);
    assert!(err.contains("--ctx") && !err.contains("--stride"), "{err}");
    let (a, b) = (scratch("loop-a"), scratch("loop-b"));
    let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let err = fails(&["inspect", "--model", a.to_str().unwrap()]);
    assert!(!err.contains("not found") && err.contains("symbolic links"), "{err}");
}
