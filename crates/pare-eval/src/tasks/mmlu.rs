//! MMLU (lm-eval `mmlu`): the 57 subjects' test sets, each prompt
//! `{question}\nA. …\nB. …\nC. …\nD. …\nAnswer:` after the subject's description, with the
//! letters as choices. Few-shot examples are the first `k` of the subject's dev set
//! (lm-eval's `first_n` sampler), each followed by its answer letter and a blank line.

use std::path::Path;

use super::data::{index, read_arrow, text, texts, Doc};
use super::{Item, TaskError};

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// The subjects present under `root` (`…/mmlu_no_train`), in name order.
pub fn subjects(root: &Path) -> Result<Vec<String>, TaskError> {
    let read_err = |e: std::io::Error| TaskError::Data { path: root.display().to_string(), message: e.to_string() };
    let mut subjects: Vec<String> = std::fs::read_dir(root)
        .map_err(read_err)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("test").is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    subjects.sort();
    if subjects.is_empty() {
        return Err(TaskError::Data { path: root.display().to_string(), message: "no MMLU subjects".into() });
    }
    Ok(subjects)
}

/// The items of one subject, the first `limit` of its test set, with `shots` dev examples.
pub fn items(root: &Path, subject: &str, shots: usize, limit: Option<usize>) -> Result<Vec<Item>, TaskError> {
    let split = |name: &str| read_arrow(&root.join(subject).join(name).join("data-00000-of-00001.arrow"));
    let dev = if shots > 0 { split("dev")? } else { Vec::new() };
    if dev.len() < shots {
        return Err(TaskError::Data {
            path: root.join(subject).join("dev").display().to_string(),
            message: format!("{} dev examples, {shots} shots asked", dev.len()),
        });
    }
    let mut prefix =
        format!("The following are multiple choice questions (with answers) about {}.\n\n", subject.replace('_', " "));
    for doc in &dev[..shots] {
        prefix += &format!("{} {}\n\n", prompt(doc)?, LETTERS[answer(doc)?]);
    }
    let test = split("test")?;
    let take = limit.unwrap_or(test.len()).min(test.len());
    test[..take]
        .iter()
        .map(|doc| {
            let mut item = Item::multiple_choice(
                &format!("{prefix}{}", prompt(doc)?),
                LETTERS.iter().map(|l| l.to_string()).collect(),
                answer(doc)?,
                doc,
            )?;
            item.group = Some(subject.to_string());
            Ok(item)
        })
        .collect()
}

fn prompt(doc: &Doc) -> Result<String, TaskError> {
    let choices = texts(doc, "choices")?;
    if choices.len() != 4 {
        return Err(TaskError::field(doc, "choices", "four choices"));
    }
    let mut prompt = text(doc, "question")?.trim().to_string();
    for (letter, choice) in LETTERS.iter().zip(&choices) {
        prompt += &format!("\n{letter}. {choice}");
    }
    Ok(prompt + "\nAnswer:")
}

fn answer(doc: &Doc) -> Result<usize, TaskError> {
    let answer = index(doc, "answer")?;
    if answer >= LETTERS.len() {
        return Err(TaskError::field(doc, "answer", "0 to 3"));
    }
    Ok(answer)
}
