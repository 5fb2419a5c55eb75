//! pare's FLOPs counts against torch's FlopCounterMode on HF's own forward passes
//! (tests/fixtures/flops/, tools/reference/make_flops_fixtures.py), against the 2·params·tokens
//! rule, and the closed-form estimates on the design documents' example.

use std::path::{Path, PathBuf};

use pare_flops::{analyze, seq_per_layer, Formula, KvPolicy, Scenario, SpanKind, TextShapes, VisionShapes};
use pare_model::ModelConfig;
use pare_token_prune::PruneSchedule;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn flops_fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("flops/flops.json")).unwrap()).unwrap()
}

fn text_run(prompt_len: usize, gen_len: usize) -> Scenario {
    Scenario {
        prompt_len,
        image_tokens: 0,
        gen_len,
        pruned_lengths: None,
        kv: KvPolicy::default(),
        kv_bytes_per_value: 4,
        vision: None,
    }
}

/// `sc` with prompt tokens of `span` cut as `spec` says, in a 32-layer model (as the CLI does it).
fn pruned(sc: Scenario, spec: &str, span: SpanKind) -> Result<Scenario, String> {
    let total = sc.prefill_len();
    let span = span.tokens(total, sc.image_tokens).map_err(|e| e.to_string())?;
    let lengths = PruneSchedule::parse(spec).unwrap().tokens_per_layer(32, total, span).map_err(|e| e.to_string())?;
    Ok(Scenario { pruned_lengths: Some(lengths), ..sc })
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

#[test]
fn unpruned_prefill_and_decode_match_hf_flop_counter_exactly() {
    let data = flops_fixture();
    for model in data["models"].as_array().unwrap() {
        let name = model["name"].as_str().unwrap();
        let cfg = ModelConfig::from_hf_json(&model["config"], name).unwrap();
        let shapes = TextShapes::from_config(&cfg);
        for case in model["cases"].as_array().unwrap() {
            let seq = u(&case["seq"]) as usize;
            // One decode step over a cache of `seq` entries: two generated tokens.
            let a = analyze(&shapes, &text_run(seq, 2)).unwrap();
            assert_eq!(a.prefill.total(), u(&case["prefill_flops"]), "{name} prefill of {seq}");
            // HF's sliding-window cache drops entries outside the window; pare keeps them masked
            // and computes over them, so only shorter caches compare.
            if cfg.sliding_window.is_none_or(|w| seq < w) {
                assert_eq!(a.decode.total(), u(&case["decode_flops"]), "{name} decode step over {seq}");
            }
        }
    }
}

#[test]
fn prefill_agrees_with_two_flops_per_parameter_per_token_plus_attention() {
    // The textbook count: 2·N·s for the weights (N without embeddings; the LM head, tied or not,
    // on the last position only) plus 4·s²·(heads·head_dim) per layer. Norm weights and biases
    // sit in N too, so this agrees to a few percent, not exactly.
    let data = flops_fixture();
    for model in data["models"].as_array().unwrap() {
        let name = model["name"].as_str().unwrap();
        let cfg = ModelConfig::from_hf_json(&model["config"], name).unwrap();
        let shapes = TextShapes::from_config(&cfg);
        let head = (cfg.hidden_size * cfg.vocab_size) as f64;
        let untied_head = if cfg.tie_word_embeddings { 0.0 } else { head };
        let n = u(&model["num_parameters_exclude_embeddings"]) as f64 - untied_head;
        let q_width: f64 = shapes.layers.iter().map(|l| (l.heads * shapes.head_dim) as f64).sum();
        for s in [17.0, 120.0] {
            let independent = 2.0 * n * s + 2.0 * head + 4.0 * s * s * q_width;
            let exact = analyze(&shapes, &text_run(s as usize, 1)).unwrap().prefill.total() as f64;
            let rel = (exact - independent).abs() / exact;
            assert!(
                rel < 0.05,
                "{name} at {s} tokens: exact {exact}, 2·params rule {independent} ({:.2} %)",
                rel * 100.0
            );
        }
    }
}

#[test]
fn llava_vision_projector_and_decoder_match_hf_per_module() {
    let data = flops_fixture();
    let hf = &data["llava"];
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("llava-tiny/model/config.json")).unwrap())
            .unwrap();
    let cfg = ModelConfig::from_hf_json(&config["text_config"], "text_config").unwrap();
    let vision = VisionShapes {
        hidden: 32,
        intermediate: 64,
        layers_run: 2, // layer −2 of 3: HF runs the third layer too, pare does not
        patches: 16,
        channels: 3,
        patch_size: 7,
        projector_in: 32,
        projector_out: 64,
        image_tokens: 16,
    };
    let layers = hf["vision_layer_flops"].as_array().unwrap();
    let want_vision = u(&hf["vision_embeddings_flops"]) + u(&layers[0]) + u(&layers[1]) + u(&hf["projector_flops"]);
    assert_eq!(vision.flops(), want_vision);
    let seq = u(&hf["seq"]) as usize;
    let sc = Scenario { image_tokens: 16, vision: Some(vision), ..text_run(seq - 16, 1) };
    let a = analyze(&TextShapes::from_config(&cfg), &sc).unwrap();
    assert_eq!(a.prefill.total() - a.prefill.vision - a.prefill.lm_head, u(&hf["language_flops"]));
    assert_eq!(a.prefill.lm_head, u(&hf["lm_head_flops"]));
}

fn llava_7b() -> TextShapes {
    // LLaVA-1.5-7B's decoder (Vicuna-7B, Llama-2 shapes), as in seed 000's example.
    let cfg = ModelConfig::from_hf_json(
        &serde_json::json!({"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 4096}),
        "llava-1.5-7b",
    )
    .unwrap();
    TextShapes::from_config(&cfg)
}

fn seed_example() -> Scenario {
    // 100 text + 576 image tokens; after layer 10 keep 276 image tokens: 676 → 376.
    pruned(Scenario { image_tokens: 576, ..text_run(100, 1) }, "10:276", SpanKind::Image).unwrap()
}

#[test]
fn seed_formula_reproduces_seed_000s_calculation() {
    let shapes = llava_7b();
    let sc = seed_example();
    let seq = seq_per_layer(32, &sc).unwrap();
    assert_eq!((seq[9], seq[10], seq[31]), (676, 376, 376));
    let base = seq_per_layer(32, &sc.unpruned()).unwrap();
    let (before, after) =
        (Formula::Attention.prefill(&shapes, &base).unwrap(), Formula::Attention.prefill(&shapes, &seq).unwrap());
    // calculate_flops_reduction() of seed 000, term by term.
    let h = 4096u64;
    assert_eq!(before, 32 * 4 * 676 * 676 * h);
    assert_eq!(after, 10 * 4 * 676 * 676 * h + 22 * 4 * 376 * 376 * h);
    let reduction = 1.0 - after as f64 / before as f64;
    // The seed's own function returns 47.48 %. Its prose says "~38 %", which its formula does
    // not give: 38.2 % is 22/32 × 376/676, the pruned layers' share times the kept length.
    assert!((reduction - 0.4748).abs() < 1e-4, "{reduction}");
    assert!((22.0 / 32.0 * 376.0 / 676.0 - 0.382f64).abs() < 1e-3);
}

#[test]
fn lecture_and_fastv_formulas_count_the_whole_layer() {
    let shapes = llava_7b();
    let sc = seed_example();
    let seq = seq_per_layer(32, &sc).unwrap();
    let base = seq_per_layer(32, &sc.unpruned()).unwrap();
    let h = 4096u64;
    let lecture = |s: u64| 24 * s * h * h + 4 * s * s * h;
    assert_eq!(Formula::Lecture.prefill(&shapes, &base).unwrap(), 32 * lecture(676));
    let fastv = |n: u64| 4 * n * h * h + 2 * n * n * h + 2 * n * h * 11008;
    assert_eq!(Formula::Fastv.prefill(&shapes, &seq).unwrap(), 10 * fastv(676) + 22 * fastv(376));
    // Counting projections and MLPs too, the same cut saves about 31 %, as the exact count does.
    let exact = analyze(&shapes, &sc).unwrap();
    let exact_base = analyze(&shapes, &sc.unpruned()).unwrap();
    let saved = 1.0 - exact.prefill.total() as f64 / exact_base.prefill.total() as f64;
    let saved_fastv = 1.0
        - Formula::Fastv.prefill(&shapes, &seq).unwrap() as f64
            / Formula::Fastv.prefill(&shapes, &base).unwrap() as f64;
    assert!((0.29..0.33).contains(&saved) && (saved - saved_fastv).abs() < 0.01, "exact {saved}, fastv {saved_fastv}");
    assert_eq!(Formula::Exact.prefill(&shapes, &seq), None);
}

#[test]
fn pruned_layers_hold_only_the_kept_tokens_in_the_cache() {
    let shapes = llava_7b();
    let sc = Scenario { gen_len: 11, ..seed_example() };
    let a = analyze(&shapes, &sc).unwrap();
    assert_eq!(a.kv_entries_after_prefill[..10], [676; 10]);
    assert_eq!(a.kv_entries_after_prefill[10..], [376; 22]);
    let per_entry = 2 * 32 * 128 * 4; // K and V, 32 KV heads × 128, f32
    assert_eq!(a.kv_bytes_after_prefill, (per_entry * (10 * 676 + 22 * 376)) as u64);
    assert_eq!(a.kv_bytes_final, (per_entry * (10 * 686 + 22 * 386)) as u64);
    // Decode attention reads the shorter caches: step t attends to entries + t + 1.
    let want: u64 = (0..10u64).map(|t| 4 * 32 * 128 * (10 * (676 + t + 1) + 22 * (376 + t + 1))).sum();
    assert_eq!(a.decode.attention, want);
    assert_eq!(a.decode_steps, 10);
}

#[test]
fn prompt_spans_and_several_stages() {
    // 120 tokens, the last 8 protected: a span of 112; half of it, then 20 of the rest.
    let sc = pruned(text_run(120, 1), "4:0.5,12:20", SpanKind::Prompt { protect_last: 8 }).unwrap();
    let seq = seq_per_layer(32, &sc).unwrap();
    assert_eq!((seq[3], seq[4], seq[11], seq[12]), (120, 64, 64, 28));
    let range = pruned(text_run(120, 1), "2:10", SpanKind::Range { start: 10, end: 50 }).unwrap();
    assert_eq!(seq_per_layer(32, &range).unwrap()[2], 90);
}

#[test]
fn press_budgets_shrink_the_cache_and_decode_attention() {
    let shapes = llava_7b();
    let d = 4 * 32 * 128u64;
    let ratio = Scenario { kv: KvPolicy { ratio: Some(0.5), ..KvPolicy::default() }, ..text_run(101, 5) };
    let a = analyze(&shapes, &ratio).unwrap();
    assert_eq!(a.kv_entries_after_prefill, vec![50; 32]); // int(101 × 0.5), as kvpress rounds
    assert_eq!(a.decode.attention, (0..4u64).map(|t| 32 * d * (50 + t + 1)).sum::<u64>());
    // The prefill itself is untouched by a press.
    assert_eq!(a.prefill, analyze(&shapes, &text_run(101, 5)).unwrap().prefill);
    let streaming = Scenario { kv: KvPolicy { capacity: Some(32), ..KvPolicy::default() }, ..text_run(100, 4) };
    let s = analyze(&shapes, &streaming).unwrap();
    assert_eq!(s.decode.attention, 3 * 32 * d * 33);
    let budget = Scenario { kv: KvPolicy { budget: Some(64), ..KvPolicy::default() }, ..text_run(100, 1) };
    assert_eq!(analyze(&shapes, &budget).unwrap().kv_bytes_after_prefill, (32 * 2 * 32 * 128 * 4 * 64) as u64);
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let shapes = llava_7b();
    let err = |sc: Scenario| analyze(&shapes, &sc).unwrap_err().to_string();
    let image_run = Scenario { image_tokens: 576, ..text_run(100, 1) };
    let keep_too_many = pruned(image_run.clone(), "10:700", SpanKind::Image).unwrap_err();
    assert!(keep_too_many.contains("keeps 700 tokens, more than the 576"), "{keep_too_many}");
    let beyond = pruned(image_run, "40:0.5", SpanKind::Image).unwrap_err();
    assert!(beyond.contains("beyond the model's 32 layers"), "{beyond}");
    let no_image = pruned(text_run(50, 1), "2:0.5", SpanKind::Image).unwrap_err();
    assert!(no_image.contains("no image tokens"), "{no_image}");
    let wrong_layers = err(Scenario { pruned_lengths: Some(vec![100; 31]), ..text_run(100, 1) });
    assert!(wrong_layers.contains("do not fit a model of 32 layers"), "{wrong_layers}");
    assert!(err(text_run(0, 1)).contains("at least one token"));
    let formula = "quadratic".parse::<Formula>().unwrap_err().to_string();
    assert_eq!(formula, "unknown `formula` \"quadratic\" (exact, attention, lecture, fastv)");
    for e in [keep_too_many, beyond, no_image, wrong_layers, formula] {
        assert!(!e.contains('\n'));
    }
}

#[test]
fn shapes_from_loaded_weights_equal_shapes_from_the_config() {
    let dir = fixtures().join("gptneox-tiny/model");
    let dtype = pare_model::WeightDType::Float(candle_core::DType::F32);
    let loaded = pare_model::load(dir.to_str().unwrap(), dtype, &candle_core::Device::Cpu).unwrap();
    let from_weights = TextShapes::from_model(&loaded.model);
    assert!(!from_weights.gated_mlp);
    assert_eq!(from_weights, TextShapes::from_config(loaded.model.config()));
}
