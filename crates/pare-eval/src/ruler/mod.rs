//! RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER `scripts/data/synthetic/`), generated
//! by pare and scored as RULER's `scripts/eval/synthetic/constants.py` scores them.
//!
//! An item is drawn as a [`Recipe`] (the random choices), rendered to RULER's text
//! ([`Recipe::render`]), fitted to a context length in the model's own tokens the way RULER
//! fits it (a binary search over the haystack size, then smaller while a draw does not fit), and
//! split as kvpress's RULER dataset splits it: the context before the question is prefilled (and
//! compressed by a press, which never sees the question), then the question and the answer
//! prefix run over that cache and the answer is generated greedily.

mod generate;
mod render;

use candle_core::{DType, D};
use pare_formats::{ChatMessage, TokenizerBundle};
use pare_model::{Hooks, KvCache, Logits, Model, ModelError, Phase, PrefillInput, Result};
use serde::{Deserialize, Serialize};

pub use generate::generate;
pub use render::{haystack_words, sentences, CweList, Recipe, Rendered, VtChain};

/// RULER's synthetic tasks (`scripts/synthetic.yaml`), less the two QA tasks (they need SQuAD
/// and HotpotQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    NiahSingle1,
    NiahSingle2,
    NiahSingle3,
    NiahMultikey1,
    NiahMultikey2,
    NiahMultikey3,
    NiahMultivalue,
    NiahMultiquery,
    Vt,
    Cwe,
    Fwe,
}

/// What kind of text hides the needles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Haystack {
    Essay,
    Noise,
    Needle,
}

/// What a needle's key or value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NeedleKind {
    Numbers,
    Words,
    Uuids,
}

/// One `niah` configuration of `synthetic.yaml`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NiahConfig {
    pub haystack: Haystack,
    pub key: NeedleKind,
    pub value: NeedleKind,
    pub num_k: usize,
    pub num_v: usize,
    pub num_q: usize,
}

impl Task {
    pub const ALL: [Task; 11] = [
        Task::NiahSingle1,
        Task::NiahSingle2,
        Task::NiahSingle3,
        Task::NiahMultikey1,
        Task::NiahMultikey2,
        Task::NiahMultikey3,
        Task::NiahMultivalue,
        Task::NiahMultiquery,
        Task::Vt,
        Task::Cwe,
        Task::Fwe,
    ];

    /// RULER's task name.
    pub fn name(self) -> &'static str {
        match self {
            Task::NiahSingle1 => "niah_single_1",
            Task::NiahSingle2 => "niah_single_2",
            Task::NiahSingle3 => "niah_single_3",
            Task::NiahMultikey1 => "niah_multikey_1",
            Task::NiahMultikey2 => "niah_multikey_2",
            Task::NiahMultikey3 => "niah_multikey_3",
            Task::NiahMultivalue => "niah_multivalue",
            Task::NiahMultiquery => "niah_multiquery",
            Task::Vt => "vt",
            Task::Cwe => "cwe",
            Task::Fwe => "fwe",
        }
    }

    /// Tasks by name; every task when `names` is empty.
    pub fn parse_list(names: &[String]) -> Result<Vec<Task>> {
        if names.is_empty() {
            return Ok(Task::ALL.to_vec());
        }
        names.iter().map(|name| Task::from_name(name)).collect()
    }

    pub fn from_name(name: &str) -> Result<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            let names: Vec<_> = Task::ALL.iter().map(|t| t.name()).collect();
            ModelError::input(format!("unknown RULER task \"{name}\" (known: {})", names.join(", ")))
        })
    }

    /// `tokens_to_generate` of RULER's constants (kvpress's `max_new_tokens`).
    pub fn max_new_tokens(self) -> usize {
        match self {
            Task::Vt => 30,
            Task::Cwe => 120,
            Task::Fwe => 50,
            _ => 128,
        }
    }

    pub(crate) fn niah(self) -> Option<NiahConfig> {
        use Haystack::*;
        use NeedleKind::*;
        let c = |haystack, key, value, num_k, num_v, num_q| NiahConfig { haystack, key, value, num_k, num_v, num_q };
        Some(match self {
            Task::NiahSingle1 => c(Noise, Words, Numbers, 1, 1, 1),
            Task::NiahSingle2 => c(Essay, Words, Numbers, 1, 1, 1),
            Task::NiahSingle3 => c(Essay, Words, Uuids, 1, 1, 1),
            Task::NiahMultikey1 => c(Essay, Words, Numbers, 4, 1, 1),
            Task::NiahMultikey2 => c(Needle, Words, Numbers, 1, 1, 1),
            Task::NiahMultikey3 => c(Needle, Uuids, Uuids, 1, 1, 1),
            Task::NiahMultivalue => c(Essay, Words, Numbers, 1, 4, 1),
            Task::NiahMultiquery => c(Essay, Words, Numbers, 1, 1, 4),
            _ => return None,
        })
    }

    /// kvpress's split of RULER's text: the question starts at the last match of this…
    fn question_markers(self) -> &'static [&'static str] {
        match self {
            Task::Vt => &["Question: Find all variables that are assigned the value"],
            Task::Cwe => &["Question: What are the 10 most common words in the above list?"],
            Task::Fwe => &["Question: Do not provide any explanation."],
            _ => &["What is the special magic", "What are all the special magic"],
        }
    }

    /// …and the answer prefix at the first match of this after it.
    fn answer_marker(self) -> &'static str {
        if self.niah().is_some() {
            "The special magic"
        } else {
            "Answer:"
        }
    }
}

/// One generated item, split as kvpress's RULER dataset is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub task: String,
    pub index: usize,
    /// The text before the question (compressed by a press).
    pub context: String,
    /// From the question up to the answer prefix.
    pub question: String,
    pub answer_prefix: String,
    /// RULER's `outputs`: every one must appear in the answer.
    pub outputs: Vec<String>,
    pub max_new_tokens: usize,
    /// Context plus question tokens in the model's chat template.
    pub prompt_tokens: usize,
    pub recipe: Recipe,
}

/// Split RULER's text into (context, question, answer prefix) as kvpress does.
pub fn split(task: Task, text: &str) -> Result<(String, String, String)> {
    let q = task
        .question_markers()
        .iter()
        .filter_map(|m| text.rfind(m))
        .max()
        .ok_or_else(|| ModelError::input(format!("{}: the text has no question", task.name())))?;
    let (context, qa) = text.split_at(q);
    let a = qa
        .find(task.answer_marker())
        .ok_or_else(|| ModelError::input(format!("{}: the text has no answer prefix", task.name())))?;
    let (question, prefix) = qa.split_at(a);
    Ok((context.to_string(), question.to_string(), prefix.to_string()))
}

/// The token ids pare feeds: the context in the user turn of the chat template, then the
/// question, the rest of the template and the answer prefix (kvpress's `preprocess`).
pub struct Prompt {
    pub context: Vec<u32>,
    pub question: Vec<u32>,
}

impl Prompt {
    pub fn new(tokenizer: &TokenizerBundle, context: &str, question: &str, answer_prefix: &str) -> Result<Prompt> {
        let (context_text, suffix) = match &tokenizer.chat_template {
            Some(template) => {
                // kvpress's trick: render the turn with a separator where the question goes.
                let separator = "#".repeat(context.len() + 10);
                let rendered = pare_formats::render_chat(
                    template,
                    &[ChatMessage { role: "user".into(), content: format!("{context}{separator}") }],
                    true,
                    tokenizer.bos_token.as_deref(),
                    tokenizer.eos_token.as_deref(),
                )?;
                let at = rendered
                    .find(&separator)
                    .ok_or_else(|| ModelError::input("the chat template dropped the user's message"))?;
                (rendered[..at].to_string(), rendered[at + separator.len()..].to_string())
            }
            None => (format!("{}{context}", tokenizer.bos_token.clone().unwrap_or_default()), "\n".to_string()),
        };
        Ok(Prompt {
            context: tokenizer.encode(&context_text, false)?,
            question: tokenizer.encode(&format!("{question}{suffix}{answer_prefix}"), false)?,
        })
    }

    pub fn len(&self) -> usize {
        self.context.len() + self.question.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// RULER's `postprocess_pred`: control characters become newlines, then strip.
pub fn postprocess(pred: &str) -> String {
    pred.trim().chars().map(|c| if (c as u32) < 0x20 { '\n' } else { c }).collect::<String>().trim().to_string()
}

/// RULER's `string_match_all` for one item: the fraction of references found (case-insensitive).
pub fn string_match_all(pred: &str, refs: &[String]) -> f64 {
    let pred = pred.to_lowercase();
    refs.iter().filter(|r| pred.contains(&r.to_lowercase())).count() as f64 / refs.len().max(1) as f64
}

/// RULER's `string_match_part` for one item: 1 if any reference is found.
pub fn string_match_part(pred: &str, refs: &[String]) -> f64 {
    let pred = pred.to_lowercase();
    if refs.iter().any(|r| pred.contains(&r.to_lowercase())) {
        1.0
    } else {
        0.0
    }
}

/// A task's score as RULER reports it: the mean item score × 100, rounded to 2 decimals.
pub fn task_score(item_scores: &[f64]) -> f64 {
    if item_scores.is_empty() {
        return 0.0;
    }
    (item_scores.iter().sum::<f64>() / item_scores.len() as f64 * 100.0 * 100.0).round() / 100.0
}

/// One item's run.
#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    pub task: String,
    pub index: usize,
    pub prompt_tokens: usize,
    pub context_tokens: usize,
    pub pred: String,
    pub outputs: Vec<String>,
    /// `string_match_all` (every synthetic task's metric in RULER).
    pub score: f64,
    /// KV-cache bytes after the context's prefill (compressed if a press is set).
    pub kv_bytes: usize,
}

/// Every item answered, `batch` items at a time: each item's context is prefilled alone with
/// `hooks` (its press compresses it without seeing the question), the question runs over that
/// cache, and the answers of the batch are decoded greedily together,
/// one step for all of them. `Model::step` keeps each cache's rows on the path they would take
/// alone, so an answer does not depend on its neighbours; what batching changes is the cost: the
/// weights are read once per step instead of once per item. A token pruner needs a cache of its
/// own, so its items decode one at a time. `on_item` runs as each item finishes.
pub fn run_items(
    model: &Model,
    tokenizer: &TokenizerBundle,
    items: &[&Item],
    hooks: &Hooks,
    batch: usize,
    mut on_item: impl FnMut(),
) -> Result<Vec<ItemResult>> {
    if batch == 0 {
        return Err(ModelError::input("a RULER batch needs at least one item"));
    }
    let batch = if hooks.pruner.is_some() { 1 } else { batch };
    let mut results = Vec::with_capacity(items.len());
    for group in items.chunks(batch) {
        let mut answers: Vec<Answer> =
            group.iter().map(|item| Answer::start(model, tokenizer, item, hooks)).collect::<Result<_>>()?;
        let mut next: Vec<u32> = answers.iter().filter(|a| a.state.is_some()).map(|a| a.first).collect();
        answers.iter().filter(|a| a.state.is_none()).for_each(|_| on_item());
        loop {
            // Each unfinished answer takes its next token or ends, in order.
            let mut tokens = Vec::new();
            let mut next_tokens = next.iter();
            for answer in answers.iter_mut().filter(|a| a.state.is_some()) {
                let token = *next_tokens.next().expect("one token per unfinished answer");
                if !answer.take(token, &tokenizer.eos_token_ids) {
                    on_item();
                    continue;
                }
                tokens.push(token);
            }
            if tokens.is_empty() {
                break;
            }
            let mut seqs: Vec<(&mut KvCache, &mut Hooks)> =
                answers.iter_mut().filter_map(|a| a.state.as_mut()).map(|(c, h)| (c, h)).collect();
            let logits = model.decode(&mut seqs, &tokens)?;
            next = logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        }
        for (answer, item) in answers.into_iter().zip(group) {
            let pred = postprocess(&tokenizer.decode(&answer.tokens, true)?);
            results.push(ItemResult {
                task: item.task.clone(),
                index: item.index,
                prompt_tokens: answer.prompt_tokens,
                context_tokens: answer.context_tokens,
                score: string_match_all(&pred, &item.outputs),
                pred,
                outputs: item.outputs.clone(),
                kv_bytes: answer.kv_bytes,
            });
        }
    }
    Ok(results)
}

/// One item's answer in progress: its cache and hooks while it still generates.
struct Answer {
    state: Option<(KvCache, Hooks)>,
    tokens: Vec<u32>,
    max_new_tokens: usize,
    /// The greedy token after the question.
    first: u32,
    prompt_tokens: usize,
    context_tokens: usize,
    kv_bytes: usize,
}

impl Answer {
    /// Prefill the context (compressed by the press), then run the question over that cache.
    fn start(model: &Model, tokenizer: &TokenizerBundle, item: &Item, hooks: &Hooks) -> Result<Answer> {
        let prompt = Prompt::new(tokenizer, &item.context, &item.question, &item.answer_prefix)?;
        if prompt.context.is_empty() || prompt.question.is_empty() {
            return Err(ModelError::input(format!("{} item {}: empty context or question", item.task, item.index)));
        }
        let limit = model.config().max_position_embeddings;
        if prompt.len() + item.max_new_tokens > limit {
            return Err(ModelError::input(format!(
                "{} item {}: {} prompt tokens + {} to generate exceed the model's context of {limit}",
                item.task,
                item.index,
                prompt.len(),
                item.max_new_tokens
            )));
        }
        let mut hooks = hooks.clone();
        let (_, mut cache) = model.prefill(PrefillInput::Tokens(std::slice::from_ref(&prompt.context)), &mut hooks)?;
        let kv_bytes = cache.bytes();
        let start = cache.next_positions()[0];
        let positions = vec![(start..start + prompt.question.len() as i64).collect::<Vec<_>>()];
        let x = model.embed(std::slice::from_ref(&prompt.question))?;
        let logits = model.forward(x, &positions, &mut cache, &mut hooks, Phase::Extend, Logits::Last)?;
        let first = logits.squeeze(0)?.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        let state = (item.max_new_tokens > 0).then_some((cache, hooks));
        Ok(Answer {
            state,
            tokens: Vec::new(),
            max_new_tokens: item.max_new_tokens,
            first,
            prompt_tokens: prompt.len(),
            context_tokens: prompt.context.len(),
            kv_bytes,
        })
    }

    /// Takes the greedy `token`; false (and the cache freed) once the answer is complete.
    fn take(&mut self, token: u32, eos: &[u32]) -> bool {
        if !eos.contains(&token) {
            self.tokens.push(token);
        }
        let more = !eos.contains(&token) && self.tokens.len() < self.max_new_tokens;
        if !more {
            self.state = None;
        }
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_follow_ruler() {
        let refs = vec!["1234567".to_string(), "ABC".to_string()];
        assert_eq!(string_match_all("the answer is 1234567 and abc", &refs), 1.0);
        assert_eq!(string_match_all("1234567", &refs), 0.5);
        assert_eq!(string_match_part("1234567", &refs), 1.0);
        assert_eq!(string_match_part("none", &refs), 0.0);
        assert_eq!(task_score(&[1.0, 0.5, 0.0]), 50.0);
        assert_eq!(task_score(&[1.0, 1.0, 0.0]), 66.67);
        assert_eq!(postprocess(" a\tb\u{1}c \n"), "a\nb\nc");
    }

    #[test]
    fn split_takes_the_last_question() {
        let text = "ex. Question: Do not provide any explanation. x Answer: a\nctx\nQuestion: Do not provide any explanation. y Answer: z";
        let (c, q, a) = split(Task::Fwe, text).unwrap();
        assert_eq!(c, "ex. Question: Do not provide any explanation. x Answer: a\nctx\n");
        assert_eq!(q, "Question: Do not provide any explanation. y ");
        assert_eq!(a, "Answer: z");
        assert!(split(Task::Vt, text).is_err());
        assert!(Task::from_name("qa_1").is_err());
    }
}
