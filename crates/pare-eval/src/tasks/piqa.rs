//! PIQA (lm-eval `piqa`, validation set): `Question: {goal}\nAnswer:` with the two solutions.

use super::data::{index, text, Doc};
use super::{Item, TaskError};

pub fn item(doc: &Doc) -> Result<Item, TaskError> {
    let context = format!("Question: {}\nAnswer:", text(doc, "goal")?);
    let choices = vec![text(doc, "sol1")?.to_string(), text(doc, "sol2")?.to_string()];
    Item::multiple_choice(&context, choices, index(doc, "label")?, doc)
}
