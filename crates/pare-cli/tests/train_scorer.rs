//! `pare train-scorer` end to end on the tiny GPT-NeoX (2 layers, with a tokenizer): a few steps
//! write the scorer and its loss curve, `--json` reports them, and `pare eval ppl --prune-score
//! learned:FILE` prunes with it; bad inputs fail in one line.

mod common;

use std::path::PathBuf;

use common::{json, one_line_error, pare};
use serde_json::Value;

const TINY: &str = "tests/fixtures/gptneox-tiny/model";
const TEXT: &str = "assets/texts/tiny.utf8";

#[test]
fn train_scorer_writes_the_scorer_and_its_curve_and_eval_uses_it() {
    let dir = scratch("run");
    let out = dir.join("scorer.safetensors");
    let r = json(&[
        "train-scorer",
        "-m",
        TINY,
        "--layer",
        "1",
        "--keep",
        "0.5",
        "--text",
        TEXT,
        "--max-tokens",
        "2000",
        "--seq-len",
        "48",
        "--protect-last",
        "8",
        "--steps",
        "4",
        "--d",
        "16",
        "--layers",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["steps"], 4);
    assert_eq!(r["curve"].as_array().unwrap().len(), 4);
    assert!(r["final_loss"].as_f64().unwrap().is_finite());
    let kept = r["kept_fraction"].as_f64().unwrap();
    assert!(kept > 0.0 && kept < 1.0, "{kept}");
    assert!(out.is_file());
    // Held out: the text's last 8 samples, scored before training and every steps / 5.
    let held = &r["held_out"];
    assert_eq!(held["samples"], 8);
    let steps: Vec<u64> = held["learned"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 4]);
    assert!(held["random"].as_f64().unwrap() >= held["unpruned"].as_f64().unwrap() - 0.5);
    assert_eq!(r["samples"], 2000 / 48 - 8);
    let svg = std::fs::read_to_string(dir.join("scorer.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("tail NLL (mean of 10 steps)"), "{svg}");
    // Loss, its mean and the tail NLL; the kept share; learned, random and unpruned held out.
    assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 7, "{svg}");
    assert_eq!(r["plot"].as_str().unwrap(), dir.join("scorer.svg").to_str().unwrap());

    // The scorer prunes an evaluation: prefills of 40 tokens drop half of their first 32.
    let score = format!("learned:{}", out.display());
    let ppl = |extra: &[&str]| -> Value {
        let mut args = vec![
            "eval",
            "ppl",
            "-m",
            TINY,
            "--text",
            TEXT,
            "--max-tokens",
            "300",
            "--ctx",
            "48",
            "--stride",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&args)
    };
    let pruned = ppl(&["--prune-tokens", "1:0.5", "--protect-last", "8", "--prune-score", &score]);
    let full = ppl(&[]);
    let p = pruned["ppl"].as_f64().unwrap();
    assert!(p.is_finite() && p > 1.0);
    assert_ne!(p, full["ppl"].as_f64().unwrap());
    assert!(pruned["kv_bytes_context"].as_u64().unwrap() < full["kv_bytes_peak"].as_u64().unwrap());

    // Text output and an explicit --plot, as PNG.
    let plot = dir.join("curve.png");
    let text = pare(&[
        "train-scorer",
        "-m",
        TINY,
        "--layer",
        "1",
        "--text",
        TEXT,
        "--max-tokens",
        "500",
        "--seq-len",
        "32",
        "--protect-last",
        "8",
        "--steps",
        "2",
        "--d",
        "8",
        "--layers",
        "1",
        "--mask",
        "gumbel",
        "--out",
        out.to_str().unwrap(),
        // The first run's scorer is there: replacing it must be asked for.
        "--force",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    assert!(String::from_utf8_lossy(&text.stdout).contains("--prune-score learned:"));
    assert!(std::fs::read(&plot).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_train_scorer_and_learned_scorer_inputs_fail_in_one_line() {
    let dir = scratch("bad");
    let out = dir.join("s.safetensors");
    let o = out.to_str().unwrap();
    let base = ["train-scorer", "-m", TINY, "--text", TEXT, "--out", o];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };
    let run =
        |args: Vec<String>, needle: &str| one_line_error(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    run(with(&["--layer", "2"]), "--layer must be between 1 and 1");
    run(with(&["--layer", "0"]), "--layer must be between 1 and 1");
    run(with(&["--layer", "1", "--keep", "1.5"]), "--keep must be in (0, 1)");
    run(with(&["--layer", "1", "--seq-len", "16", "--protect-last", "16"]), "leaves no span");
    run(with(&["--layer", "1", "--mask", "hard"]), "unknown --mask");
    run(with(&["--layer", "1", "--d", "10", "--heads", "4"]), "multiple of --heads");
    run(with(&["--layer", "1", "--seq-len", "4096", "--protect-last", "8"]), "exceeds the model's context");
    run(
        with(&["--layer", "1", "--max-tokens", "40", "--seq-len", "48", "--protect-last", "8"]),
        "fewer than 9 samples of --seq-len 48 (8 held out)",
    );
    one_line_error(
        &["train-scorer", "-m", TINY, "--layer", "1", "--text", "/nonexistent.txt"],
        "cannot read /nonexistent.txt",
    );
    one_line_error(
        &["train-scorer", "-m", "tests/fixtures/prune/llama-gqa-tiny/model", "--layer", "1", "--text", TEXT],
        "tokenizer",
    );

    // A missing scorer file, and a scorer trained on another hidden size.
    let ppl = |score: &str, model: &str| -> Vec<String> {
        [
            "eval",
            "ppl",
            "-m",
            model,
            "--text",
            TEXT,
            "--max-tokens",
            "100",
            "--ctx",
            "48",
            "--stride",
            "8",
            "--prune-tokens",
            "1:0.5",
            "--prune-score",
            score,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    run(ppl("learned:/nonexistent/s.safetensors", TINY), "cannot read learned scorer /nonexistent/s.safetensors");
    json(&[
        "train-scorer",
        "-m",
        TINY,
        "--layer",
        "1",
        "--text",
        TEXT,
        "--max-tokens",
        "500",
        "--seq-len",
        "32",
        "--protect-last",
        "8",
        "--steps",
        "1",
        "--d",
        "8",
        "--layers",
        "1",
        "--out",
        o,
        "--json",
    ]);
    run(ppl(&format!("learned:{o}"), "assets/SmolLM2-135M-Instruct.Q4_1.gguf"), "trained for hidden size 32");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let dir = common::scratch("train-scorer", name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
