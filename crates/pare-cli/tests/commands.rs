//! Each command end to end through the binary, with its --json output checked.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pare_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pare")).args(args).arg("--json").output().expect("run pare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pare {args:?} failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    assert_eq!(stdout.trim().lines().count(), 1, "--json prints one object: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn generate_names_paris() {
    let v = pare_json(&[
        "generate",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
    ]);
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 8);
    assert_eq!(v["prompt_tokens"], 5);
    assert_eq!(v["finish_reason"], "length");
    assert!(v["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_streams_the_same_text_it_reports() {
    let args = ["generate", "--model", "smollm2-135m", "--prompt", "Rust is a", "--max-new-tokens", "12"];
    let json = pare_json(&args);
    let out = Command::new(env!("CARGO_BIN_EXE_pare")).args(args).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end_matches('\n'), json["text"].as_str().unwrap());
}

#[test]
fn chat_generation_stops_at_end_of_turn() {
    let v = pare_json(&["generate", "--chat", "--prompt", "Say hello.", "--max-new-tokens", "60"]);
    assert_eq!(v["finish_reason"], "eos", "{v}");
    assert_eq!(*v["tokens"].as_array().unwrap().last().unwrap(), 2, "SmolLM2's <|im_end|> is id 2");
}

#[test]
fn score_reports_sorted_logprobs() {
    let v = pare_json(&["score", "--prompt", "The capital of France is", "--top-k", "5"]);
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    assert_eq!(top[0]["token"], " Paris");
    let lps: Vec<f64> = top.iter().map(|e| e["logprob"].as_f64().unwrap()).collect();
    assert!(lps.windows(2).all(|w| w[0] >= w[1]));
    assert!(lps[0] < 0.0);
}

#[test]
fn eval_ppl_on_the_tiny_gpt_neox() {
    let model = repo().join("tests/fixtures/gptneox-tiny/model");
    let text = repo().join("assets/texts/wiki.utf8");
    let v = pare_json(&[
        "eval",
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--stride",
        "64",
        "--max-tokens",
        "1024",
    ]);
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/gptneox-tiny/ppl.json")).unwrap())
            .unwrap();
    let case = fixture["cases"].as_array().unwrap().iter().find(|c| c["stride"] == 64).expect("stride 64 case");
    assert_eq!(v["tokens"], 1024);
    assert_eq!(v["scored_tokens"], case["scored_tokens"]);
    let (pare, hf) = (v["ppl"].as_f64().unwrap(), case["ppl"].as_f64().unwrap());
    assert!((pare / hf - 1.0).abs() < 1e-3, "pare {pare} vs hf {hf}");
}

/// `--llama-cpp` gives llama-perplexity's number on the same GGUF, text and context
/// (tests/fixtures/llama-cpp-ppl/smollm2-q4_1.json).
#[test]
fn eval_ppl_by_llama_cpps_protocol() {
    let fixture = pare_test_support::fixture("llama-cpp-ppl/smollm2-q4_1.json");
    let lines = pare_test_support::llama_cpp_fixture_text(&fixture);
    let path = std::env::temp_dir().join(format!("pare-llama-cpp-ppl-{}.txt", std::process::id()));
    std::fs::write(&path, lines).unwrap();
    let ctx = fixture["n_ctx"].as_u64().unwrap();
    let v = pare_json(&[
        "eval",
        "ppl",
        "--model",
        repo().join(fixture["model"].as_str().unwrap()).to_str().unwrap(),
        "--text",
        path.to_str().unwrap(),
        "--ctx",
        &ctx.to_string(),
        "--llama-cpp",
        "--kv-dtype",
        "f16",
    ]);
    std::fs::remove_file(&path).unwrap();
    // The second half of each chunk is scored, from ctx/2 tokens of context on.
    let chunks = fixture["chunks"].as_u64().unwrap();
    assert_eq!(v["scored_tokens"].as_u64().unwrap(), chunks * (ctx - 1 - ctx / 2));
    let (pare, theirs) = (v["ppl"].as_f64().unwrap(), fixture["ppl"].as_f64().unwrap());
    assert!((pare / theirs - 1.0).abs() < 0.005, "pare {pare} vs llama-perplexity {theirs}");
}

#[test]
fn inspect_counts_parameters() {
    let v = pare_json(&["inspect", "--model", "smollm2-135m"]);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["config"]["num_layers"], 30);
    assert_eq!(v["config"]["hidden_size"], 576);
    assert_eq!(v["layers"].as_array().unwrap().len(), 30);
    assert_eq!(v["layers"][0]["heads"], 9);
    assert_eq!(v["layers"][0]["kv_heads"], 3);
    // SmolLM2-135M: 134,515,008 parameters (tied embeddings), as HF's num_parameters() reports.
    assert_eq!(v["parameters"]["total"], 134_515_008);
}

#[test]
fn bench_reports_speed_and_cache_bytes() {
    let v = pare_json(&["bench", "--prompt-len", "16", "--gen-len", "4", "--batch", "2"]);
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    // The Q4_1 GGUF runs quantized, its cache in f16 (the default there, as llama.cpp's):
    // 30 layers × (K and V) × 3 kv heads × 64 dims × 2 bytes × (16 + 4 tokens) × 2 rows
    assert_eq!(v["kv_dtype"], "f16");
    assert_eq!(v["kv_cache_bytes"], 30 * 2 * 3 * 64 * 2 * 20 * 2);
    // A cache per row (the server's step): the same rows, the same bytes, the same tokens.
    let per_row = pare_json(&["bench", "--prompt-len", "16", "--gen-len", "4", "--batch", "2", "--caches", "per-row"]);
    assert_eq!(per_row["caches"], "per-row");
    assert_eq!(per_row["kv_cache_bytes"], v["kv_cache_bytes"]);
    assert!(per_row["decode_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn convert_writes_an_hf_directory_pare_loads_identically() {
    let out = std::env::temp_dir().join(format!("pare-convert-{}", std::process::id()));
    let v = pare_json(&["convert", "--model", "smollm2-135m", "--out", out.to_str().unwrap()]);
    assert_eq!(v["parameters"], 134_515_008);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let from_gguf = pare_json(&["score", "--prompt", "The capital of France is", "--top-k", "10", "--dtype", "f32"]);
    let from_dir = pare_json(&[
        "score",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--top-k",
        "10",
    ]);
    for (a, b) in from_gguf["top"].as_array().unwrap().iter().zip(from_dir["top"].as_array().unwrap()) {
        assert_eq!(a["id"], b["id"]);
        assert!((a["logprob"].as_f64().unwrap() - b["logprob"].as_f64().unwrap()).abs() < 1e-5);
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn seeded_sampling_is_reproducible() {
    let run = |seed: &str| {
        pare_json(&[
            "generate",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--do-sample",
            "--temperature",
            "0.9",
            "--seed",
            seed,
        ])
    };
    let (a, b, c) = (run("7"), run("7"), run("8"));
    assert_eq!(a["tokens"], b["tokens"]);
    assert_ne!(a["tokens"], c["tokens"]);
}

#[test]
fn prompts_file_runs_as_one_batch_with_each_row_as_alone() {
    let file = std::env::temp_dir().join(format!("pare-prompts-{}.txt", std::process::id()));
    std::fs::write(&file, "The capital of France is\n{\"prompt\": \"def fibonacci(n):\"}\nHi\n").unwrap();
    let batch = pare_json(&["generate", "--prompts-file", file.to_str().unwrap(), "--max-new-tokens", "10"]);
    let seqs = batch["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 3);
    for (i, prompt) in ["The capital of France is", "def fibonacci(n):", "Hi"].iter().enumerate() {
        let alone = pare_json(&["generate", "--prompt", prompt, "--max-new-tokens", "10"]);
        assert_eq!(seqs[i]["prompt_index"], i);
        assert_eq!(seqs[i]["tokens"], alone["tokens"], "row {i} ({prompt})");
    }
}

#[test]
fn beam_search_returns_scored_sequences() {
    let v = pare_json(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
    ]);
    let seqs = v["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 2);
    assert!(seqs[0]["score"].as_f64().unwrap() >= seqs[1]["score"].as_f64().unwrap());
    assert_ne!(seqs[0]["tokens"], seqs[1]["tokens"]);
}

#[test]
fn score_reports_the_processed_distribution() {
    let v = pare_json(&[
        "score",
        "--prompt",
        "The capital of France is",
        "--do-sample",
        "--top-k",
        "4",
        "--temperature",
        "0.5",
    ]);
    let processed = v["processed"].as_array().unwrap();
    assert_eq!(processed.len(), 4, "top-k 4 leaves 4 tokens");
    let total: f64 = processed.iter().map(|e| e["prob"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9);
    assert_eq!(processed[0]["id"], v["top"][0]["id"]);
    // Temperature 0.5 sharpens: the best token gains mass over its raw probability.
    assert!(processed[0]["prob"].as_f64().unwrap() > v["top"][0]["logprob"].as_f64().unwrap().exp());
}

#[test]
fn config_file_sets_the_same_names_as_flags() {
    let file = std::env::temp_dir().join(format!("pare-gen-config-{}.json", std::process::id()));
    std::fs::write(&file, r#"{"do_sample": true, "temperature": 0.9, "seed": 7}"#).unwrap();
    let from_file = pare_json(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--config",
        file.to_str().unwrap(),
    ]);
    let from_flags = pare_json(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--do-sample",
        "--temperature",
        "0.9",
        "--seed",
        "7",
    ]);
    assert_eq!(from_file["tokens"], from_flags["tokens"]);
}

#[test]
fn stop_strings_end_generation_and_are_cut() {
    let v =
        pare_json(&["generate", "--chat", "--prompt", "List three colors.", "--max-new-tokens", "40", "--stop", "2."]);
    assert_eq!(v["finish_reason"], "stop");
    assert!(!v["text"].as_str().unwrap().contains("2."));
}

#[test]
fn quantized_weights_stay_close_to_exact_f32() {
    let prompt = "The capital of France is";
    let exact = pare_json(&["score", "--prompt", prompt, "--top-k", "5", "--dtype", "f32"]);
    let quant = pare_json(&["score", "--prompt", prompt, "--top-k", "5", "--dtype", "q"]);
    // A quantized GGUF on the CPU runs quantized unless told otherwise.
    assert_eq!(pare_json(&["score", "--prompt", prompt, "--top-k", "5"]), quant);
    assert_eq!(exact["top"][0]["id"], quant["top"][0]["id"]);
    for (e, q) in exact["top"].as_array().unwrap().iter().zip(quant["top"].as_array().unwrap()) {
        // 8-bit activations in the dot products cost a little precision.
        let (e, q) = (e["logprob"].as_f64().unwrap(), q["logprob"].as_f64().unwrap());
        assert!((e - q).abs() < 0.3, "logprob {e} vs {q}");
    }
    // Prefill of many rows runs the kernels several activation rows at a time, and decoding reads
    // q, k, v stacked: greedy tokens of a long prompt match f32's.
    let long = "The capital of France is Paris. ".repeat(8);
    let gen = |dtype| pare_json(&["generate", "--prompt", &long, "--max-new-tokens", "4", "--dtype", dtype]);
    assert_eq!(gen("q")["tokens"], gen("f32")["tokens"]);
}

fn wiki() -> String {
    repo().join("assets/texts/wiki.utf8").to_str().unwrap().to_string()
}

#[test]
fn presses_shrink_the_cache_in_generate_and_score() {
    let plain =
        pare_json(&["score", "--prompt", &"The capital of France is Paris. ".repeat(6), "--then", " The capital"]);
    let pressed = pare_json(&[
        "score",
        "--prompt",
        &"The capital of France is Paris. ".repeat(6),
        "--then",
        " The capital",
        "--press",
        "snapkv",
        "--ratio",
        "0.5",
        "--window",
        "8",
    ]);
    let (full, half) = (plain["kv_bytes_prefill"].as_u64().unwrap(), pressed["kv_bytes_prefill"].as_u64().unwrap());
    // Half the entries, rounded down: 30 layers × 3 KV heads × 64 dims × K and V × 4 bytes each.
    let entry = 30 * 3 * 64 * 2 * 4;
    assert_eq!(half / entry, full / entry / 2, "bytes {half} vs {full}");
    assert_eq!(pressed["kv_bytes_uncompressed"], plain["kv_bytes"]);
    let v = pare_json(&[
        "generate",
        "--prompt",
        &"Paris is in France. ".repeat(8),
        "--max-new-tokens",
        "4",
        "--press",
        "adakv+expected-attention",
        "--ratio",
        "0.75",
    ]);
    let cache = &v["cache"];
    assert!(cache["kv_bytes_final"].as_u64().unwrap() * 2 < cache["kv_bytes_uncompressed"].as_u64().unwrap());
}

#[test]
fn eval_ppl_streams_token_by_token_and_reports_peak_cache() {
    let full = pare_json(&["eval", "ppl", "--text", &wiki(), "--max-tokens", "80", "--stream"]);
    let capped = pare_json(&[
        "eval",
        "ppl",
        "--text",
        &wiki(),
        "--max-tokens",
        "80",
        "--stream",
        "--press",
        "streaming",
        "--sinks",
        "4",
        "--capacity",
        "32",
    ]);
    assert_eq!(full["scored_tokens"], 79);
    let (a, b) = (full["kv_bytes_peak"].as_u64().unwrap(), capped["kv_bytes_peak"].as_u64().unwrap());
    // 79 entries at most uncompressed; 33 (capacity plus the token being processed) with the press.
    assert_eq!(a / 79, b / 33);
    assert!(capped["ppl"].as_f64().unwrap() > full["ppl"].as_f64().unwrap() * 0.9);
    // Sliding-window PPL with a press: the continuation after a compressed context.
    let w = pare_json(&[
        "eval",
        "ppl",
        "--text",
        &wiki(),
        "--max-tokens",
        "200",
        "--ctx",
        "100",
        "--stride",
        "50",
        "--press",
        "knorm",
        "--ratio",
        "0.5",
    ]);
    assert_eq!(w["scored_tokens"], 199);
    assert!(w["kv_bytes_context"].as_u64().unwrap() < w["kv_bytes_peak"].as_u64().unwrap());
}

#[test]
fn eval_compare_writes_a_table_and_a_plot() {
    let plot = std::env::temp_dir().join(format!("pare-compare-{}.svg", std::process::id()));
    let v = pare_json(&[
        "eval",
        "compare",
        "--text",
        &wiki(),
        "--max-tokens",
        "260",
        "--ctx",
        "128",
        "--continuation",
        "64",
        "--presses",
        "knorm,streaming",
        "--ratios",
        "0.5",
        "--needle-ctx",
        "200",
        "--needle-depths",
        "50",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "baseline plus one row per press and ratio");
    assert_eq!(rows[0]["press"], "none");
    // KV bytes of a window's context (128 − 64 tokens, f16), uncompressed or pressed.
    assert_eq!(rows[0]["kv_bytes"], 30 * 2 * 3 * 64 * 2 * 64);
    assert!(rows[1]["kv_bytes"].as_u64().unwrap() * 2 <= rows[0]["kv_bytes"].as_u64().unwrap() + 46080);
    // Perplexity and needle panels, one line per press in each (series are the 2-pixel lines).
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 4, "{svg}");
    assert!(svg.contains("streaming") && svg.contains("Needle-in-a-haystack accuracy"));
    std::fs::remove_file(&plot).unwrap();

    // `--needle-ctx` without a value: perplexity only; a .png --plot is a PNG.
    let png = plot.with_extension("png");
    let args = ["eval", "compare", "--text", &wiki(), "--max-tokens", "260", "--ctx", "128", "--continuation", "64"];
    let more = ["--presses", "knorm", "--ratios", "0.5", "--needle-ctx", "--plot", png.to_str().unwrap()];
    let v = pare_json(&[&args[..], &more[..]].concat());
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["needle_accuracy"].is_null() && r["ppl"].as_f64().unwrap() > 1.0));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    std::fs::remove_file(&png).unwrap();
}

#[test]
fn eval_compare_scores_ruler_beside_perplexity() {
    let plot = std::env::temp_dir().join(format!("pare-compare-ruler-{}.svg", std::process::id()));
    let args = ["eval", "compare", "--text", &wiki(), "--max-tokens", "260", "--ctx", "128", "--continuation", "64"];
    let more = [
        "--presses",
        "knorm",
        "--ratios",
        "0.5",
        "--needle-ctx",
        "--ruler-ctx",
        "1024",
        "--ruler-samples",
        "1",
        "--ruler-tasks",
        "niah_single_1,niah_single_2",
        "--plot",
        plot.to_str().unwrap(),
    ];
    let v = pare_json(&[&args[..], &more[..]].concat());
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let score = r["ruler"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&score), "{r}");
    }
    // Perplexity and RULER panels, one line each for knorm.
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 2, "{svg}");
    assert!(svg.contains("RULER average at 1024 tokens"));
    std::fs::remove_file(&plot).unwrap();
}

#[test]
fn eval_ruler_prints_scores_and_plots_them_by_length() {
    let plot = std::env::temp_dir().join(format!("pare-ruler-{}.svg", std::process::id()));
    let v = pare_json(&[
        "eval",
        "ruler",
        "--model",
        "smollm2-135m",
        "--tasks",
        "niah_single_1",
        "--ctx",
        "512,768",
        "--samples",
        "1",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let tasks = v["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "one task at two lengths");
    let averages = v["averages"].as_array().unwrap();
    assert_eq!(averages.len(), 2);
    for (t, a) in tasks.iter().zip(averages) {
        assert_eq!(t["ctx"], a["ctx"]);
        assert_eq!(t["score"], a["average"], "one task: its score is the average");
    }
    // The task and the average, each a line over the two lengths.
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 2, "{svg}");
    assert!(svg.contains("RULER, no compression"));
    std::fs::remove_file(&plot).unwrap();
}

#[test]
fn eval_ruler_answers_alike_alone_and_batched() {
    // Items of different tasks and lengths, each under its own press, decoding together.
    let run = |batch: &str| {
        pare_json(&[
            "eval",
            "ruler",
            "--model",
            "smollm2-135m",
            "--tasks",
            "niah_single_1,niah_single_2",
            "--ctx",
            "1024",
            "--samples",
            "2",
            "--press",
            "snapkv",
            "--ratio",
            "0.5",
            "--batch",
            batch,
        ])
    };
    let (alone, batched) = (run("1"), run("3"));
    assert_eq!(alone["tasks"], batched["tasks"]);
    assert_eq!(alone["tasks"].as_array().unwrap().len(), 2);
}

#[test]
fn eval_needle_reports_accuracy_per_cell() {
    let v = pare_json(&[
        "eval",
        "needle",
        "--model",
        "smollm2-135m",
        "--ctx",
        "300",
        "--depths",
        "0,100",
        "--press",
        "knorm",
        "--ratio",
        "0.25",
    ]);
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for c in cells {
        let trial = &c["trials"][0];
        assert!(trial["prompt_tokens"].as_u64().unwrap() <= 300);
        assert!(trial["needle"].as_str().unwrap().starts_with("The special magic number is"));
    }
}

#[test]
fn eval_tasks_scores_each_task_with_and_without_a_press() {
    // f32: quantized weights take another product path for a batch's many rows.
    let args = ["eval", "tasks", "--tasks", "arc_easy,winogrande,lambada_openai", "--limit", "2", "--dtype", "f32"];
    let press = ["--press", "knorm", "--ratio", "0.5"];
    let plain = pare_json(&[&args[..], &["--batch", "2"]].concat());
    let pressed = pare_json(&[&args[..], &press, &["--batch", "2"]].concat());
    for v in [&plain, &pressed] {
        let tasks = v["tasks"].as_array().unwrap();
        let names: Vec<&str> = tasks.iter().map(|t| t["task"].as_str().unwrap()).collect();
        assert_eq!(names, ["arc_easy", "winogrande", "lambada_openai"]);
        assert_eq!(tasks[0]["items"], 2);
        assert!((0.0..=1.0).contains(&tasks[0]["acc_norm"]["value"].as_f64().unwrap()));
        assert!(tasks[1].get("acc_norm").is_none(), "lm-eval reports no acc_norm for winogrande");
        assert!(tasks[2]["perplexity"].as_f64().unwrap() > 1.0);
    }
    let ppl = |v: &Value| v["tasks"][2]["perplexity"].as_f64().unwrap();
    assert_ne!(ppl(&plain), ppl(&pressed), "the press changes what the last word is scored against");
    // Items one by one score what the batch of both scores (a padded cache without hooks, a
    // cache per item under a press).
    for (batched, extra) in [(&plain, &[][..]), (&pressed, &press[..])] {
        let alone = pare_json(&[&args[..], extra, &["--batch", "1"]].concat());
        assert!((ppl(&alone) / ppl(batched) - 1.0).abs() < 1e-4, "{} vs {}", ppl(&alone), ppl(batched));
        for task in 0..2 {
            assert_eq!(alone["tasks"][task]["acc"], batched["tasks"][task]["acc"]);
        }
    }
}

#[test]
fn tp_splits_the_model_and_reports_what_the_whole_model_does() {
    // SmolLM2's 3 KV heads over 3 ranks, in f32 (the ranks hold dense weights), with a press
    // whose per-head budgets span the ranks.
    let args = |tp: &str| -> Vec<String> {
        ["--prompt", "The capital of France is", "--dtype", "f32", "--press", "adakv+snapkv", "--ratio", "0.5"]
            .iter()
            .chain(&["--tp", tp])
            .map(|s| s.to_string())
            .collect()
    };
    let run = |command: &str, tp: &str| {
        let mut a = vec![command.to_string()];
        a.extend(args(tp));
        pare_json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (whole, split) = (run("generate", "1"), run("generate", "3"));
    assert_eq!(whole["tokens"], split["tokens"]);
    assert_eq!(whole["cache"], split["cache"], "the ranks' caches add up to the whole model's");
    let (whole, split) = (run("score", "1"), run("score", "3"));
    for key in ["kv_bytes", "kv_bytes_prefill", "kv_bytes_uncompressed", "compression_ratio"] {
        assert_eq!(whole[key], split[key], "{key}");
    }
    for (a, b) in whole["top"].as_array().unwrap().iter().zip(split["top"].as_array().unwrap()) {
        assert_eq!(a["id"], b["id"]);
        assert!((a["logprob"].as_f64().unwrap() - b["logprob"].as_f64().unwrap()).abs() < 1e-4);
    }
    let bench = |tp: &str| {
        let a =
            ["bench", "--prompt-len", "24", "--gen-len", "4", "--dtype", "f32", "--press", "knorm", "--ratio", "0.5"];
        pare_json(&[&a[..], &["--tp", tp]].concat())
    };
    let (whole, split) = (bench("1"), bench("3"));
    for key in ["kv_cache_bytes", "kv_cache_bytes_prefill", "kv_cache_uncompressed_bytes", "decode_weight_bytes"] {
        assert_eq!(whole[key], split[key], "bench {key}");
    }
    let text = repo().join("assets/texts/wiki.utf8");
    let ppl = |tp: &str| {
        let a = ["eval", "ppl", "--text", text.to_str().unwrap(), "--max-tokens", "200", "--ctx", "64"];
        pare_json(&[&a[..], &["--dtype", "f32", "--press", "snapkv", "--ratio", "0.5", "--tp", tp]].concat())
    };
    let (whole, split) = (ppl("1"), ppl("3"));
    assert!((whole["ppl"].as_f64().unwrap() - split["ppl"].as_f64().unwrap()).abs() < 1e-4, "{whole} {split}");
    assert_eq!(whole["kv_bytes_peak"], split["kv_bytes_peak"]);
    let tasks =
        |tp: &str| pare_json(&["eval", "tasks", "--tasks", "piqa", "--limit", "4", "--dtype", "f32", "--tp", tp]);
    assert_eq!(tasks("1")["tasks"], tasks("3")["tasks"]);
}
