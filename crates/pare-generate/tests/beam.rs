//! Beam search against HF transformers: tests/fixtures/beam/smollm2.json, written by
//! tools/reference/make_beam_fixtures.py (generate(num_beams=…, do_sample=False)).
//!
//! Every case must give the same hypotheses in the same order, token for token, with per-token
//! log-probs within 1e-3 and `sequences_scores` within the same 1e-3 per token carried through
//! the normalization: 1e-3 · len^(1 - length_penalty), which is 1e-3 for length_penalty = 1 (the
//! scores of length_penalty 0 and -1 are raw and len-multiplied sums, whose error grows with len).
//!
//! The cases with `repetition_penalty` or `no_repeat_ngram_size` run those processors as written
//! here (HF's definitions, on the log-softmaxed scores), so that this test does not depend on the
//! processor chain's constructor.

use pare_generate::beam::{beam_search, BeamConfig, BeamHypothesis, EarlyStopping};
use pare_test_support::{fixture, smollm2};
use serde_json::Value;

const TOL: f32 = 1e-3;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("float list").iter().map(|x| x.as_f64().expect("float") as f32).collect()
}

/// HF RepetitionPenaltyLogitsProcessor: every token of the sequence (prompt included) gets
/// score · penalty where negative, score / penalty otherwise.
fn repetition_penalty(penalty: f32, input_ids: &[u32], scores: &mut [f32]) {
    let mut seen = vec![false; scores.len()];
    for &t in input_ids {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// HF NoRepeatNGramLogitsProcessor: ban every token that would complete an n-gram already in the
/// sequence (prompt included).
fn no_repeat_ngram(n: usize, input_ids: &[u32], scores: &mut [f32]) {
    let len = input_ids.len();
    if n == 0 || len + 1 < n {
        return;
    }
    let prefix = &input_ids[len + 1 - n..];
    for w in input_ids.windows(n) {
        if &w[..n - 1] == prefix {
            let t = w[n - 1] as usize;
            if t < scores.len() {
                scores[t] = f32::NEG_INFINITY;
            }
        }
    }
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    row.iter().map(|&x| x - max - log_sum).collect()
}

fn config(c: &Value) -> BeamConfig {
    BeamConfig {
        num_beams: c["num_beams"].as_u64().unwrap() as usize,
        length_penalty: c["length_penalty"].as_f64().unwrap() as f32,
        early_stopping: serde_json::from_value::<EarlyStopping>(c["early_stopping"].clone()).unwrap(),
        num_return_sequences: c["num_return_sequences"].as_u64().unwrap() as usize,
        max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
        eos_token_ids: ids(&c["eos_token_ids"]),
    }
}

fn run_case(case: &Value) -> (BeamConfig, Vec<u32>, Vec<BeamHypothesis>) {
    let c = &case["config"];
    let cfg = config(c);
    let prompt = ids(&case["ids"]);
    let rep = c["repetition_penalty"].as_f64().map(|p| p as f32);
    let ngram = c["no_repeat_ngram_size"].as_u64().map(|n| n as usize);
    let mut process = |_beam: usize, input_ids: &[u32], _prompt_len: usize, scores: &mut [f32]| {
        // HF's order: repetition penalty before no-repeat-ngram.
        if let Some(p) = rep {
            repetition_penalty(p, input_ids, scores);
        }
        if let Some(n) = ngram {
            no_repeat_ngram(n, input_ids, scores);
        }
    };
    let hyps = beam_search(&smollm2().model, &prompt, &cfg, &mut process).unwrap();
    (cfg, prompt, hyps)
}

fn describe(case: &Value) -> String {
    let prompt = case["prompt"].as_str().unwrap_or("");
    let tail: String = prompt.chars().rev().take(32).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{tail:?} {}", case["config"])
}

#[test]
fn beam_search_matches_hf() {
    let fx = fixture("beam/smollm2.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    let mut eos_endings = 0;
    for case in cases {
        let (_, _, hyps) = run_case(case);
        let expected = case["hypotheses"].as_array().unwrap();
        let name = describe(case);
        if hyps.len() != expected.len() {
            failures.push(format!("{name}: {} hypotheses, hf {}", hyps.len(), expected.len()));
            continue;
        }
        for (rank, (h, e)) in hyps.iter().zip(expected).enumerate() {
            let tokens = ids(&e["tokens"]);
            if h.tokens != tokens {
                failures.push(format!("{name} #{rank}: tokens\n  pare {:?}\n  hf   {:?}", h.tokens, tokens));
                continue;
            }
            // sequences_scores = sum of the token log-probs / len ** length_penalty: the per-token
            // tolerance, summed and normalized. That is TOL itself for length_penalty = 1.
            let score = e["score"].as_f64().unwrap() as f32;
            let score_tol = TOL * (tokens.len() as f32).powf(1.0 - config(&case["config"]).length_penalty);
            if (h.score - score).abs() > score_tol {
                failures.push(format!("{name} #{rank}: score pare {} hf {score}", h.score));
            }
            let lps = floats(&e["token_logprobs"]);
            if let Some((i, (a, b))) =
                h.token_logprobs.iter().zip(&lps).enumerate().find(|(_, (a, b))| (**a - **b).abs() > TOL)
            {
                failures.push(format!("{name} #{rank}: logprob of token {i}: pare {a} hf {b}"));
            }
            let eos = e["finished_by_eos"].as_bool().unwrap();
            if h.finished_by_eos != eos {
                failures.push(format!("{name} #{rank}: finished_by_eos pare {} hf {eos}", h.finished_by_eos));
            }
            eos_endings += usize::from(eos);
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(eos_endings > 0, "the fixture has no hypothesis that ended with EOS");
}

/// The beams' own log-probs, recomputed without a cache from the full sequence, must be the ones
/// beam search recorded: this fails if the cache rows are not reordered with their beams.
#[test]
fn cache_follows_beams() {
    let fx = fixture("beam/smollm2.json");
    let model = &smollm2().model;
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let c = &case["config"];
        if !(c["repetition_penalty"].is_null() && c["no_repeat_ngram_size"].is_null())
            || c["num_beams"].as_u64() != Some(4)
        {
            continue;
        }
        let (cfg, prompt, hyps) = run_case(case);
        for h in &hyps {
            let seq: Vec<u32> = prompt.iter().chain(&h.tokens).copied().collect();
            let all = pare_test_support::logits_all(model, &seq).unwrap();
            let lp: Vec<Vec<f32>> = all.to_vec2::<f32>().unwrap().iter().map(|r| log_softmax(r)).collect();
            for (i, (&tok, &got)) in h.tokens.iter().zip(&h.token_logprobs).enumerate() {
                let want = lp[prompt.len() - 1 + i][tok as usize];
                assert!(
                    (got - want).abs() < 1e-3,
                    "{}: token {i}: beam logprob {got}, recomputed {want}",
                    describe(case)
                );
            }
            let sum: f32 = h.token_logprobs.iter().sum();
            let norm = (h.tokens.len() as f64).powf(cfg.length_penalty as f64) as f32;
            assert!(
                (sum / norm - h.score).abs() < 1e-3,
                "{}: score {} vs sum/len^lp {}",
                describe(case),
                h.score,
                sum / norm
            );
        }
        checked += 1;
        if checked == 3 {
            break;
        }
    }
    assert!(checked > 0);
}

/// num_beams = 1 without EOS is greedy decoding: the same tokens as the greedy loop and HF's greedy fixture.
#[test]
fn one_beam_is_greedy() {
    let fx = fixture("smollm2/greedy.json");
    let max_new = fx["max_new_tokens"].as_u64().unwrap() as usize;
    let model = &smollm2().model;
    for case in fx["cases"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        let mut cfg = BeamConfig::new(1, max_new, vec![]);
        cfg.early_stopping = EarlyStopping::False;
        let hyps = beam_search(model, &prompt, &cfg, &mut |_, _, _, _| {}).unwrap();
        assert_eq!(hyps.len(), 1);
        assert_eq!(hyps[0].tokens, ids(&case["new_ids"]), "{}", case["prompt"]);
        let config = pare_generate::GenerationConfig { max_new_tokens: Some(max_new), ..Default::default() };
        let greedy = pare_generate::Generator::new(config, None)
            .unwrap()
            .generate(model, pare_generate::Prompts::Tokens(std::slice::from_ref(&prompt)), |_, _, _| {})
            .unwrap();
        assert_eq!(hyps[0].tokens, greedy.sequences[0].tokens);
        assert!(!hyps[0].finished_by_eos);
    }
}

#[test]
fn rejects_bad_configs() {
    let model = &smollm2().model;
    let mut cfg = BeamConfig::new(2, 4, vec![2]);
    cfg.num_return_sequences = 3;
    assert!(beam_search(model, &[1, 2, 3], &cfg, &mut |_, _, _, _| {}).is_err());
    assert!(beam_search(model, &[1, 2, 3], &BeamConfig::new(0, 4, vec![2]), &mut |_, _, _, _| {}).is_err());
    assert!(beam_search(model, &[1, 2, 3], &BeamConfig::new(2, 0, vec![2]), &mut |_, _, _, _| {}).is_err());
    assert!(beam_search(model, &[], &BeamConfig::new(2, 4, vec![2]), &mut |_, _, _, _| {}).is_err());
}
