//! `pare generate --image` on the tiny LLaVA against HF's `generate` (tests/fixtures/llava-tiny/,
//! tools/reference/make_llava_fixtures.py): the whole path from PNG and prompt text to tokens.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const MODEL: &str = "tests/fixtures/llava-tiny/model";

fn pare(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pare")).args(args).current_dir(repo()).output().expect("run pare")
}

fn generate(image: &str, prompt: &str, extra: &[&str]) -> Value {
    let image = format!("tests/fixtures/llava-tiny/images/{image}");
    let mut args =
        vec!["generate", "-m", MODEL, "--image", &image, "--prompt", prompt, "--max-new-tokens", "8", "--json"];
    args.extend(extra);
    let out = pare(&args);
    assert!(out.status.success(), "pare {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn greedy_tokens_match_hf_generate() {
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/llava-tiny/logits.json")).unwrap())
            .unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let r = generate(case["image"].as_str().unwrap(), case["prompt"].as_str().unwrap(), &[]);
        assert_eq!(r["tokens"], case["greedy"], "{}", case["prompt"]);
        assert_eq!(r["prompt_tokens"].as_u64(), Some(case["input_ids"].as_array().unwrap().len() as u64));
        assert_eq!(r["image_tokens"], 16);
    }
}

#[test]
fn pruning_image_tokens_shrinks_the_cache() {
    let prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:";
    let full = generate("rgb_45x31.png", prompt, &[]);
    let pruned = generate("rgb_45x31.png", prompt, &["--prune-tokens", "1:4", "--prune-span", "image"]);
    // 58 prompt tokens; layer 1 keeps 4 of the 16 image tokens: 46. K and V, 2 heads × 16, f32.
    let per_entry = 2 * 2 * 16 * 4;
    assert_eq!(full["cache"]["kv_bytes_prefill"], per_entry * (58 + 58));
    assert_eq!(pruned["cache"]["kv_bytes_prefill"], per_entry * (58 + 46));
    assert_eq!(pruned["tokens"].as_array().unwrap().len(), 8);
}

#[test]
fn bad_input_is_one_line() {
    let cases: [(&[&str], &str); 6] = [
        (&["generate", "-m", MODEL, "--image", "nope.png", "-p", "hi"], "no such file"),
        (
            &[
                "generate",
                "-m",
                "tests/fixtures/llama-tiny/model",
                "--image",
                "tests/fixtures/llava-tiny/images/rgb_45x31.png",
                "-p",
                "hi",
            ],
            "LLaVA checkpoint",
        ),
        (
            &["generate", "-m", MODEL, "--image", "tests/fixtures/llava-tiny/model/config.json", "-p", "hi"],
            "cannot read the image",
        ),
        (
            &[
                "generate",
                "-m",
                MODEL,
                "--image",
                "tests/fixtures/llava-tiny/images/rgb_45x31.png",
                "-p",
                "<image> <image>",
            ],
            "one image per prompt",
        ),
        (
            &[
                "generate",
                "-m",
                MODEL,
                "--image",
                "tests/fixtures/llava-tiny/images/rgb_45x31.png",
                "-p",
                "hi",
                "--num-beams",
                "2",
            ],
            "no --num-beams",
        ),
        (
            &[
                "generate",
                "-m",
                MODEL,
                "--image",
                "tests/fixtures/llava-tiny/images/rgb_45x31.png",
                "-p",
                "hi",
                "--tp",
                "2",
            ],
            "a LLaVA model runs whole",
        ),
    ];
    for (args, needle) in cases {
        let out = pare(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && !stderr.contains("panicked"), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: {stderr:?} should mention {needle:?}"
        );
    }
}
