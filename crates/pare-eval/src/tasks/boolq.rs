//! BoolQ (lm-eval `boolq`, SuperGLUE's validation set): `{passage}\nQuestion: {question}?\nAnswer:`
//! with the choices `no` and `yes`.

use serde_json::Value;

use super::data::{text, Doc};
use super::{Item, TaskError};

pub fn item(doc: &Doc) -> Result<Item, TaskError> {
    let context = format!("{}\nQuestion: {}?\nAnswer:", text(doc, "passage")?, text(doc, "question")?);
    let answer =
        doc.get("answer").and_then(Value::as_bool).ok_or_else(|| TaskError::field(doc, "answer", "a boolean"))?;
    Item::multiple_choice(&context, vec!["no".into(), "yes".into()], usize::from(answer), doc)
}
