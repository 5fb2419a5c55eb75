//! Logits processors against HF transformers (fixtures from
//! `tools/reference/make_processor_fixtures.py`), plus hand-computed checks of the processors HF
//! does not have (presence/frequency, DRY, XTC, mirostat) and of `ProcessorConfig::validate`.

use std::path::PathBuf;
use std::sync::Arc;

use pare_generate::processors::dry::Dry;
use pare_generate::processors::mirostat_v2::MirostatV2;
use pare_generate::processors::presence_frequency::PresenceFrequencyPenalty;
use pare_generate::processors::temperature::Temperature;
use pare_generate::processors::xtc::Xtc;
use pare_generate::processors::{
    DryConfig, LogitsProcessor, MirostatConfig, ProcessContext, ProcessorChain, ProcessorConfig, XtcConfig,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const TOL: f32 = 1e-5;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/processors/processors.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A float or one of the strings "-inf" / "inf".
fn num(v: &Value) -> f32 {
    match v {
        Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
        Value::String(s) if s == "inf" => f32::INFINITY,
        Value::Number(n) => n.as_f64().unwrap() as f32,
        other => panic!("not a number: {other}"),
    }
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(num).collect()).collect()
}

/// pare's config from a fixture case (logit_bias may hold "-inf", which JSON numbers cannot).
fn config(v: &Value) -> ProcessorConfig {
    let mut v = v.clone();
    let bias = v.as_object_mut().unwrap().remove("logit_bias");
    let mut cfg: ProcessorConfig = serde_json::from_value(v).unwrap();
    if let Some(bias) = bias {
        cfg.logit_bias = bias.as_array().unwrap().iter().map(|e| (e[0].as_u64().unwrap() as u32, num(&e[1]))).collect();
    }
    cfg
}

fn run_row(chain: &mut ProcessorChain, ids: &[u32], prompt_len: usize, scores: &[f32], seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ctx = ProcessContext { input_ids: ids, prompt_len, rng: &mut rng, candidates: None };
    let mut out = scores.to_vec();
    chain.process(&mut ctx, &mut out);
    out
}

#[test]
fn matches_hf_transformers() {
    let fx = fixture();
    let prompt_len = fx["prompt_len"].as_u64().unwrap() as usize;
    let ids: Vec<Vec<u32>> = fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect();
    let scores = rows(&fx["scores"]);
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "fixture has {} cases", cases.len());

    let mut failures = Vec::new();
    let mut compared = 0usize;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = config(&case["config"]);
        let mut chain = ProcessorChain::new(&cfg, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_names: Vec<&str> =
            case["pare_processors"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        if chain.names() != want_names {
            failures.push(format!("{name}: chain {:?}, HF {:?}", chain.names(), want_names));
        }
        let expected = rows(&case["expected"]);
        for (r, (row_ids, row_scores)) in ids.iter().zip(&scores).enumerate() {
            let got = run_row(&mut chain, row_ids, prompt_len, row_scores, 0);
            for (t, (&g, &w)) in got.iter().zip(&expected[r]).enumerate() {
                compared += 1;
                let ok = if w == f32::NEG_INFINITY { g == f32::NEG_INFINITY } else { (g - w).abs() <= TOL };
                if !ok {
                    failures.push(format!("{name} row {r} token {t}: pare {g}, HF {w}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    assert!(compared > 40 * 3 * 64 - 1);
}

fn process(p: &mut dyn LogitsProcessor, ids: &[u32], prompt_len: usize, scores: &mut [f32], rng: &mut StdRng) {
    let mut ctx = ProcessContext { input_ids: ids, prompt_len, rng, candidates: None };
    p.process(&mut ctx, scores);
}

fn softmax(s: &[f32]) -> Vec<f32> {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

fn logs(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "index {i}: got {g}, want {w} (all: {got:?})");
    }
}

#[test]
fn presence_frequency_hand_computed() {
    let mut rng = StdRng::seed_from_u64(0);
    // prompt [1, 1, 4]; generated [2, 3, 2, 2]: counts 2 -> 3, 3 -> 1; the prompt's 1 and 4 do not count.
    let ids = [1, 1, 4, 2, 3, 2, 2];
    let mut scores = vec![1.0, 2.0, 3.0, -1.0, 0.5, 7.0];
    let mut p = PresenceFrequencyPenalty::new(0.5, 0.25);
    process(&mut p, &ids, 3, &mut scores, &mut rng);
    assert_close(&scores, &[1.0, 2.0, 3.0 - 0.25 * 3.0 - 0.5, -1.0 - 0.25 - 0.5, 0.5, 7.0], 1e-6);

    // llama.cpp's test_penalties (repeat 1, frequency 5, presence 5) over [0, 1, 2, 0, 0].
    let mut scores = logs(&[0.2; 5]);
    let mut p = PresenceFrequencyPenalty::new(5.0, 5.0);
    process(&mut p, &[0, 1, 2, 0, 0], 0, &mut scores, &mut rng);
    assert_close(&softmax(&scores), &[0.000000, 0.000023, 0.000023, 0.499977, 0.499977], 1e-5);
}

#[test]
fn dry_penalizes_repeat_extension() {
    let mut rng = StdRng::seed_from_u64(0);
    let (mult, base) = (0.8f32, 1.75f32);
    // "1 2 3 4 5 6 9 1 2 3 4 5": the suffix "1 2 3 4 5" (length 5) occurred before, followed by 6.
    let ids = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3, 4, 5];
    let mut scores = vec![0.0f32; 12];
    let mut dry = Dry::with_token_breakers(mult, base, 2, -1, &[]);
    process(&mut dry, &ids, 0, &mut scores, &mut rng);
    let mut want = vec![0.0f32; 12];
    want[6] = -mult * base.powi(5 - 2);
    assert_close(&scores, &want, 1e-5);

    // The repeat only counts inside penalty_last_n: the last 8 tokens "5 6 9 1 2 3 4 5" hold "5" twice,
    // a repeat of length 1 < allowed_length.
    let mut scores = vec![0.0f32; 12];
    let mut dry = Dry::with_token_breakers(mult, base, 2, 8, &[]);
    process(&mut dry, &ids, 0, &mut scores, &mut rng);
    assert_close(&scores, &[0.0; 12], 0.0);

    // A breaker inside the repeat cuts it: with 3 a breaker, only "4 5" (length 2) counts.
    let mut scores = vec![0.0f32; 12];
    let mut dry = Dry::with_token_breakers(mult, base, 2, -1, &[vec![3]]);
    process(&mut dry, &ids, 0, &mut scores, &mut rng);
    want[6] = -mult * base.powi(0);
    assert_close(&scores, &want, 1e-5);
}

#[test]
fn dry_matches_llama_cpp_tests() {
    // tests/test-sampling.cpp of llama.cpp: (probs, context, expected probs, multiplier, base,
    // allowed_length, penalty_last_n, breakers).
    type Case = (Vec<f32>, Vec<u32>, Vec<f32>, f32, f32, usize, i64, Vec<Vec<u32>>);
    let cases: Vec<Case> = vec![
        (vec![0.25; 4], vec![0, 1], vec![0.25; 4], 1.0, 1.1, 2, 4, vec![]),
        (vec![0.25; 4], vec![0, 1, 2, 0, 1], vec![0.296923, 0.296923, 0.109232, 0.296923], 1.0, 1.1, 2, 5, vec![]),
        (vec![0.2; 5], vec![0, 1, 3, 4, 0, 1], vec![0.2; 5], 1.0, 1.1, 2, 6, vec![vec![3]]),
        (
            vec![0.2; 5],
            vec![0, 1, 2, 0, 1],
            vec![0.241818, 0.241818, 0.032727, 0.241818, 0.241818],
            2.0,
            1.1,
            2,
            5,
            vec![],
        ),
        (vec![0.2; 5], vec![0, 1, 2, 3, 4, 0, 1], vec![0.2; 5], 1.0, 1.1, 4, 7, vec![]),
    ];
    let mut rng = StdRng::seed_from_u64(0);
    for (probs, ctx, want, mult, base, allowed, last_n, breakers) in cases {
        let mut scores = logs(&probs);
        let mut dry = Dry::with_token_breakers(mult, base, allowed, last_n, &breakers);
        process(&mut dry, &ctx, 0, &mut scores, &mut rng);
        assert_close(&softmax(&scores), &want, 1e-5);
    }
}

#[test]
fn dry_string_breakers_from_vocab_texts() {
    let vocab: Vec<String> = ["a", "b", "c", "x", ":", "q\n"].iter().map(|s| s.to_string()).collect();
    let mut rng = StdRng::seed_from_u64(0);
    // "a b c x a b c": the suffix "a b c" repeats, so x would extend it (length 3).
    let ids = [0, 1, 2, 3, 0, 1, 2];
    let default_breakers = DryConfig::default().sequence_breakers;
    let mut scores = vec![0.0f32; 6];
    let mut dry = Dry::new(1.0, 2.0, 2, -1, &default_breakers, &vocab);
    process(&mut dry, &ids, 0, &mut scores, &mut rng);
    assert_close(&scores, &[0.0, 0.0, 0.0, -2.0, 0.0, 0.0], 0.0);
    // ":" and "q\n" contain default breakers.
    assert!(dry.is_single_token_breaker(4) && dry.is_single_token_breaker(5));
    assert!(!dry.is_single_token_breaker(0));

    // "ab" as a breaker: token "a" ends with its prefix "a" and the tail "b" is token 1, so "a b" is
    // a two-token breaker; the newest one starts 2 tokens back, limiting repeats to length 1.
    let mut scores = vec![0.0f32; 6];
    let mut dry = Dry::new(1.0, 2.0, 2, -1, &["ab".to_string()], &vocab);
    process(&mut dry, &ids, 0, &mut scores, &mut rng);
    assert_close(&scores, &[0.0; 6], 0.0);

    // Through the chain: DRY with string breakers needs the vocabulary texts.
    let cfg =
        ProcessorConfig { dry: Some(DryConfig { multiplier: 1.0, ..DryConfig::default() }), ..Default::default() };
    assert!(ProcessorChain::new(&cfg, None).unwrap_err().contains("dry"));
    let mut chain = ProcessorChain::new(&cfg, Some(Arc::new(vocab))).unwrap();
    assert_eq!(chain.names(), ["dry"]);
    let got = run_row(&mut chain, &ids, 0, &[0.0; 6], 0);
    assert_close(&got, &[0.0, 0.0, 0.0, -1.75, 0.0, 0.0], 1e-6); // 1.0 * 1.75^(3 - 2)
}

#[test]
fn xtc_probability_one_keeps_least_likely_above_threshold() {
    // llama.cpp's test_xtc cases (probability 1 instead of 0.99, so that the draw always passes).
    let probs = [0.4f32, 0.3, 0.2, 0.1];
    for (threshold, kept) in
        [(0.09f32, vec![3usize]), (0.19, vec![2, 3]), (0.29, vec![1, 2, 3]), (0.39, vec![0, 1, 2, 3])]
    {
        let mut rng = StdRng::seed_from_u64(7);
        let mut scores = logs(&probs);
        let mut xtc = Xtc::new(1.0, threshold, 1);
        process(&mut xtc, &[], 0, &mut scores, &mut rng);
        for (i, &s) in scores.iter().enumerate() {
            assert_eq!(s == f32::NEG_INFINITY, !kept.contains(&i), "threshold {threshold}: {scores:?}");
        }
    }
    // min_keep: XTC does not act when fewer than min_keep tokens would remain.
    let mut rng = StdRng::seed_from_u64(7);
    let mut scores = logs(&probs);
    let mut xtc = Xtc::new(1.0, 0.09, 2);
    process(&mut xtc, &[], 0, &mut scores, &mut rng);
    assert!(scores.iter().all(|s| s.is_finite()));
}

#[test]
fn xtc_probability_zero_and_seeded_draws() {
    let probs = [0.4f32, 0.3, 0.2, 0.1];
    // p = 0: no-op, and nothing is drawn from the rng.
    let mut rng = StdRng::seed_from_u64(3);
    let mut scores = logs(&probs);
    let mut xtc = Xtc::new(0.0, 0.1, 1);
    process(&mut xtc, &[], 0, &mut scores, &mut rng);
    assert_eq!(scores, logs(&probs));
    assert_eq!(rng.random::<u64>(), StdRng::seed_from_u64(3).random::<u64>());

    // p = 0.5: each step acts exactly when the draw is <= 0.5; seeded, so reproducible.
    let mut rng = StdRng::seed_from_u64(11);
    let mut mirror = StdRng::seed_from_u64(11);
    let mut xtc = Xtc::new(0.5, 0.15, 1);
    let (mut acted, mut skipped) = (0, 0);
    for _ in 0..64 {
        let mut scores = logs(&probs);
        process(&mut xtc, &[], 0, &mut scores, &mut rng);
        let chance: f32 = mirror.random();
        if chance <= 0.5 {
            acted += 1;
            assert_eq!(scores[..2], [f32::NEG_INFINITY; 2]);
            assert!(scores[2].is_finite() && scores[3].is_finite());
        } else {
            skipped += 1;
            assert_eq!(scores, logs(&probs));
        }
    }
    assert!(acted > 10 && skipped > 10, "acted {acted}, skipped {skipped}");

    // Through the chain: after the HF warpers, off at probability 0.
    let xtc_on = XtcConfig { probability: 1.0, ..XtcConfig::default() };
    let cfg = ProcessorConfig { do_sample: true, top_k: Some(3), xtc: Some(xtc_on), ..Default::default() };
    assert_eq!(ProcessorChain::new(&cfg, None).unwrap().names(), ["top_k", "xtc"]);
    let cfg = ProcessorConfig { do_sample: true, xtc: Some(XtcConfig::default()), ..Default::default() };
    assert!(ProcessorChain::new(&cfg, None).unwrap().is_empty());
}

#[test]
fn mirostat_truncates_by_surprise_and_updates_mu() {
    let mut rng = StdRng::seed_from_u64(0);
    // Surprises 1, 2, 3, 4, 4 bits. tau 1.5 -> mu starts at 3: tokens 0..=2 stay.
    let probs = [0.5f32, 0.25, 0.125, 0.0625, 0.0625];
    let mut m = MirostatV2::new(1.5, 0.1);
    assert_eq!(m.mu(), 3.0);
    let mut scores = logs(&probs);
    process(&mut m, &[], 0, &mut scores, &mut rng);
    assert!(scores[..3].iter().all(|s| s.is_finite()));
    assert_eq!(scores[3..], [f32::NEG_INFINITY; 2]);
    // Token 1 in the renormalized distribution: 0.25 / 0.875.
    m.accept(1, &scores);
    let surprise = -(0.25f32 / 0.875).log2();
    let mu = 3.0 - 0.1 * (surprise - 1.5);
    assert!((m.mu() - mu).abs() < 1e-6, "mu {} want {mu}", m.mu());
    // mu ~2.969 < 3: token 2 (surprise 3) goes too.
    let mut scores = logs(&probs);
    process(&mut m, &[], 0, &mut scores, &mut rng);
    assert!(scores[..2].iter().all(|s| s.is_finite()));
    assert_eq!(scores[2..], [f32::NEG_INFINITY; 3]);
    m.accept(0, &scores);
    let mu2 = mu - 0.1 * (-(0.5f32 / 0.75).log2() - 1.5);
    assert!((m.mu() - mu2).abs() < 1e-6);

    // mu below every surprise still keeps the most probable token.
    let mut m = MirostatV2::new(0.1, 0.1);
    let mut scores = logs(&probs);
    process(&mut m, &[], 0, &mut scores, &mut rng);
    assert!(scores[0].is_finite() && scores[1..].iter().all(|&s| s == f32::NEG_INFINITY));

    // Defaults, and the chain: mirostat last, replacing top-k etc.; the chain forwards accept.
    assert_eq!(MirostatConfig::default(), MirostatConfig { tau: 5.0, eta: 0.1 });
    let cfg = ProcessorConfig {
        do_sample: true,
        temperature: Some(0.8),
        top_k: Some(40),
        top_p: Some(0.9),
        repetition_penalty: Some(1.1),
        mirostat: Some(MirostatConfig { tau: 1.5, eta: 0.1 }),
        ..Default::default()
    };
    let mut chain = ProcessorChain::new(&cfg, None).unwrap();
    assert_eq!(chain.names(), ["repetition_penalty", "temperature", "mirostat_v2"]);
    let scores = run_row(&mut chain, &[], 0, &logs(&probs), 0);
    chain.accept(0, &scores);
}

#[test]
fn temperature_zero_is_greedy() {
    let mut rng = StdRng::seed_from_u64(0);
    let mut scores = vec![1.0, 3.0, -2.0, 3.0, f32::NEG_INFINITY];
    let mut t = Temperature::new(0.0);
    process(&mut t, &[], 0, &mut scores, &mut rng);
    let inf = f32::NEG_INFINITY;
    assert_eq!(scores, [inf, 3.0, inf, inf, inf]);
}

#[test]
fn chain_order() {
    let cfg = ProcessorConfig {
        repetition_penalty: Some(1.2),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(0.0),
        no_repeat_ngram_size: Some(3),
        bad_words_ids: vec![vec![5]],
        logit_bias: vec![(1, 2.0)],
        suppress_tokens: vec![9],
        min_new_tokens: Some(2),
        eos_token_ids: vec![0],
        do_sample: true,
        temperature: Some(0.7),
        top_k: Some(10),
        top_p: Some(0.9),
        min_p: Some(0.05),
        typical_p: Some(0.9),
        epsilon_cutoff: Some(0.001),
        eta_cutoff: Some(0.001),
        min_tokens_to_keep: 2,
        mirostat: None,
        dry: Some(DryConfig { multiplier: 0.8, sequence_breakers: vec![], ..DryConfig::default() }),
        xtc: Some(XtcConfig { probability: 0.5, ..XtcConfig::default() }),
    };
    let chain = ProcessorChain::new(&cfg, None).unwrap();
    assert_eq!(
        chain.names(),
        [
            "logit_bias",
            "repetition_penalty",
            "presence_frequency",
            "dry",
            "no_repeat_ngram",
            "bad_words",
            "min_new_tokens",
            "suppress_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "typical_p",
            "epsilon_cutoff",
            "eta_cutoff",
            "xtc",
        ]
    );
    // Greedy: the warpers (temperature onwards) are left out.
    let chain = ProcessorChain::new(&ProcessorConfig { do_sample: false, ..cfg.clone() }, None).unwrap();
    assert_eq!(chain.names().last(), Some(&"suppress_tokens"));
    // Neutral values are off.
    let neutral = ProcessorConfig {
        repetition_penalty: Some(1.0),
        presence_penalty: Some(0.0),
        no_repeat_ngram_size: Some(0),
        min_new_tokens: Some(0),
        do_sample: true,
        temperature: Some(1.0),
        top_k: Some(0),
        top_p: Some(1.0),
        min_p: Some(0.0),
        typical_p: Some(1.0),
        epsilon_cutoff: Some(0.0),
        eta_cutoff: Some(0.0),
        dry: Some(DryConfig::default()),
        xtc: Some(XtcConfig::default()),
        ..Default::default()
    };
    assert!(ProcessorChain::new(&neutral, None).unwrap().is_empty());
    // Serde: every field optional, defaults as documented.
    let cfg: ProcessorConfig = serde_json::from_str(
        r#"{"do_sample": true, "top_p": 0.9, "dry": {"multiplier": 0.8}, "logit_bias": [[3, -1.5]]}"#,
    )
    .unwrap();
    assert_eq!(cfg.logit_bias, [(3, -1.5)]);
    assert_eq!(cfg.dry.as_ref().unwrap().base, 1.75);
    assert_eq!(cfg.dry.as_ref().unwrap().allowed_length, 2);
    assert_eq!(cfg.dry.as_ref().unwrap().penalty_last_n, -1);
    assert_eq!(cfg.dry.as_ref().unwrap().sequence_breakers, ["\n", ":", "\"", "*"]);
}

#[test]
fn validate_rejects_each_bad_value() {
    let base = ProcessorConfig::default();
    assert!(base.validate().is_ok());
    let bad: Vec<(&str, ProcessorConfig)> = vec![
        ("repetition_penalty", ProcessorConfig { repetition_penalty: Some(0.0), ..base.clone() }),
        ("repetition_penalty", ProcessorConfig { repetition_penalty: Some(-1.0), ..base.clone() }),
        ("repetition_penalty", ProcessorConfig { repetition_penalty: Some(f32::NAN), ..base.clone() }),
        ("presence_penalty", ProcessorConfig { presence_penalty: Some(2.5), ..base.clone() }),
        ("frequency_penalty", ProcessorConfig { frequency_penalty: Some(-3.0), ..base.clone() }),
        ("bad_words_ids[1]", ProcessorConfig { bad_words_ids: vec![vec![1], vec![]], ..base.clone() }),
        ("logit_bias", ProcessorConfig { logit_bias: vec![(1, f32::NAN)], ..base.clone() }),
        ("logit_bias", ProcessorConfig { logit_bias: vec![(1, f32::INFINITY)], ..base.clone() }),
        ("temperature", ProcessorConfig { temperature: Some(-0.1), ..base.clone() }),
        ("temperature", ProcessorConfig { temperature: Some(f32::INFINITY), ..base.clone() }),
        ("top_p", ProcessorConfig { top_p: Some(0.0), ..base.clone() }),
        ("top_p", ProcessorConfig { top_p: Some(1.5), ..base.clone() }),
        ("min_p", ProcessorConfig { min_p: Some(-0.1), ..base.clone() }),
        ("min_p", ProcessorConfig { min_p: Some(1.1), ..base.clone() }),
        ("typical_p", ProcessorConfig { typical_p: Some(0.0), ..base.clone() }),
        ("typical_p", ProcessorConfig { typical_p: Some(1.2), ..base.clone() }),
        ("epsilon_cutoff", ProcessorConfig { epsilon_cutoff: Some(1.0), ..base.clone() }),
        ("epsilon_cutoff", ProcessorConfig { epsilon_cutoff: Some(-0.5), ..base.clone() }),
        ("eta_cutoff", ProcessorConfig { eta_cutoff: Some(1.0), ..base.clone() }),
        ("eta_cutoff", ProcessorConfig { eta_cutoff: Some(-0.5), ..base.clone() }),
        ("min_tokens_to_keep", ProcessorConfig { min_tokens_to_keep: 0, ..base.clone() }),
        ("mirostat.tau", ProcessorConfig { mirostat: Some(MirostatConfig { tau: 0.0, eta: 0.1 }), ..base.clone() }),
        ("mirostat.eta", ProcessorConfig { mirostat: Some(MirostatConfig { tau: 5.0, eta: -0.1 }), ..base.clone() }),
        (
            "dry.multiplier",
            ProcessorConfig { dry: Some(DryConfig { multiplier: -1.0, ..DryConfig::default() }), ..base.clone() },
        ),
        ("dry.base", ProcessorConfig { dry: Some(DryConfig { base: 0.9, ..DryConfig::default() }), ..base.clone() }),
        (
            "dry.penalty_last_n",
            ProcessorConfig { dry: Some(DryConfig { penalty_last_n: -2, ..DryConfig::default() }), ..base.clone() },
        ),
        (
            "dry.sequence_breakers[1]",
            ProcessorConfig {
                dry: Some(DryConfig { sequence_breakers: vec!["\n".into(), "".into()], ..DryConfig::default() }),
                ..base.clone()
            },
        ),
        (
            "xtc.probability",
            ProcessorConfig { xtc: Some(XtcConfig { probability: 1.5, ..XtcConfig::default() }), ..base.clone() },
        ),
        (
            "xtc.threshold",
            ProcessorConfig { xtc: Some(XtcConfig { threshold: -0.1, ..XtcConfig::default() }), ..base.clone() },
        ),
    ];
    for (field, cfg) in &bad {
        let err = cfg.validate().expect_err(field);
        assert!(err.starts_with(field), "{field}: {err}");
        assert!(!err.contains(';'), "{field}: one message expected, got {err}");
        assert_eq!(ProcessorChain::new(cfg, None).err().as_deref(), Some(err.as_str()));
    }
    // Several bad values: one message each.
    let cfg = ProcessorConfig { top_p: Some(2.0), min_p: Some(2.0), temperature: Some(-1.0), ..base.clone() };
    assert_eq!(cfg.validate().unwrap_err().split("; ").count(), 3);
    // Edge values that are fine.
    let ok = ProcessorConfig {
        temperature: Some(0.0),
        top_p: Some(1.0),
        min_p: Some(0.0),
        typical_p: Some(1.0),
        epsilon_cutoff: Some(0.0),
        presence_penalty: Some(-2.0),
        logit_bias: vec![(0, f32::NEG_INFINITY)],
        xtc: Some(XtcConfig { threshold: 0.9, ..XtcConfig::default() }),
        ..base.clone()
    };
    assert!(ok.validate().is_ok());
    // Vocabulary bounds are a separate check.
    let cfg = ProcessorConfig { suppress_tokens: vec![3, 70], bad_words_ids: vec![vec![1, 64]], ..base };
    let err = cfg.validate_vocab(64).unwrap_err();
    assert!(err.contains("suppress_tokens token 70") && err.contains("bad_words_ids token 64"), "{err}");
}
