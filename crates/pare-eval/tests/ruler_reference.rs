//! pare's RULER items against RULER's own code: tests/fixtures/ruler_items.json holds items whose
//! draws pare made and whose text tools/reference/ruler_reference.py rebuilt with RULER's
//! generators and split as kvpress's RULER dataset is; the scores are RULER's metrics.

use pare_eval::needle::load_haystack;
use pare_eval::ruler::{
    haystack_words, postprocess, split, string_match_all, string_match_part, task_score, Recipe, Task,
};
use pare_test_support::{asset, fixture};

#[test]
fn items_render_as_rulers_code_builds_them() {
    let fx = fixture("ruler_items.json");
    let haystack = haystack_words(&load_haystack(&asset("PaulGrahamEssays")).unwrap());
    let items = fx["items"].as_array().unwrap();
    let mut tasks = std::collections::BTreeSet::new();
    for item in items {
        let task = Task::from_name(item["task"].as_str().unwrap()).unwrap();
        tasks.insert(task.name());
        let recipe: Recipe = serde_json::from_value(item["recipe"].clone()).unwrap();
        let rendered = recipe.render(&haystack);
        let (context, question, answer_prefix) = split(task, &rendered.text).unwrap();
        assert_eq!(context, item["context"].as_str().unwrap(), "{}: context", task.name());
        assert_eq!(question, item["question"].as_str().unwrap(), "{}: question", task.name());
        assert_eq!(answer_prefix, item["answer_prefix"].as_str().unwrap(), "{}: answer prefix", task.name());
        let outputs: Vec<String> = serde_json::from_value(item["outputs"].clone()).unwrap();
        assert_eq!(rendered.outputs, outputs, "{}: outputs", task.name());
    }
    assert_eq!(tasks.len(), Task::ALL.len(), "the fixture covers every task");
}

#[test]
fn scores_match_rulers_metrics() {
    let fx = fixture("ruler_items.json");
    for s in fx["scores"].as_array().unwrap() {
        let refs: Vec<String> = serde_json::from_value(s["refs"].clone()).unwrap();
        let pred = postprocess(s["pred"].as_str().unwrap());
        assert_eq!(pred, s["postprocessed"].as_str().unwrap());
        assert_eq!(task_score(&[string_match_all(&pred, &refs)]), s["string_match_all"].as_f64().unwrap(), "{pred}");
        assert_eq!(task_score(&[string_match_part(&pred, &refs)]), s["string_match_part"].as_f64().unwrap(), "{pred}");
    }
}
