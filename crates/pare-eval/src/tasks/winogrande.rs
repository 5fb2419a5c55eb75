//! WinoGrande (lm-eval `winogrande`, winogrande_xl validation set), scored by partial evaluation:
//! each option fills the blank to make a context, and both contexts score the same
//! continuation, the sentence after the blank.

use super::data::{text, Doc};
use super::{Item, Request, TaskError};

pub fn item(doc: &Doc) -> Result<Item, TaskError> {
    let sentence = text(doc, "sentence")?;
    let blank = sentence.find('_').ok_or_else(|| TaskError::field(doc, "sentence", "a sentence with a `_` blank"))?;
    let continuation = format!(" {}", sentence[blank + 1..].trim());
    let options = [text(doc, "option1")?, text(doc, "option2")?];
    let requests = options
        .iter()
        .map(|option| Request {
            context: format!("{}{option}", &sentence[..blank]),
            continuation: continuation.clone(),
        })
        .collect();
    let gold = match text(doc, "answer")? {
        "1" => 0,
        "2" => 1,
        _ => return Err(TaskError::field(doc, "answer", "\"1\" or \"2\"")),
    };
    Ok(Item { requests, gold, choices: options.iter().map(|o| o.to_string()).collect(), group: None })
}
