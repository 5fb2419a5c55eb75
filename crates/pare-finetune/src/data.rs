//! Training data as token ids with the tokens the loss is taken on.
//!
//! - Plain text (any file that is not `.json`/`.jsonl`): tokenized whole and cut into pieces of
//!   `max_len` tokens, every token a label (language-model recovery, as LLM-Pruner's PPL data).
//! - JSON Lines, one record per line, or a JSON list of records. A record is one of
//!   `{"text"}`, `{"prompt", "response"}` (or `"completion"`), Alpaca's `{"instruction",
//!   "input", "output"}`, chat `{"messages": [{"role", "content"}]}`, ShareGPT's
//!   `{"conversations": [{"from", "value"}]}`, or already tokenized `{"input_ids", "labels"}`
//!   (HF's convention: a label of -100 is not predicted; without `labels` every token is).
//!   Conversations are rendered with the model's chat template; only the assistant's turns are
//!   labels. Records longer than `max_len` are cut.

use std::path::{Path, PathBuf};

use pare_formats::{render_chat, ChatMessage, TokenizerBundle};
use serde_json::Value;

use crate::error::{FinetuneError, Result};

/// One training sequence: `labels[i]` says whether token i is predicted in the loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<bool>,
}

impl Example {
    pub fn label_count(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l).count()
    }
}

/// What a data file gave.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// "text", "jsonl" or "json".
    pub format: &'static str,
    /// Records read (text: pieces cut).
    pub records: usize,
    /// Records cut at `max_len` tokens.
    pub truncated: usize,
    /// Records left without any label token (e.g. the prompt alone filled `max_len`).
    pub skipped: usize,
}

/// Reads `path` into examples of at most `max_len` tokens; `max_records` reads only the first
/// records (or pieces of text).
pub fn load(path: &Path, tok: Option<&TokenizerBundle>, max_len: usize, max_records: Option<usize>) -> Result<Dataset> {
    if max_len < 2 {
        return Err(FinetuneError::input(format!("`max_len` must be at least 2, got {max_len}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| FinetuneError::io(path, e))?;
    let limit = max_records.unwrap_or(usize::MAX);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut data = Dataset { format: "text", ..Dataset::default() };
    let records: Vec<(usize, Value)> = match ext {
        "jsonl" => {
            data.format = "jsonl";
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).take(limit) {
                let value =
                    serde_json::from_str(line).map_err(|e| data_error(path, i + 1, format!("not JSON: {e}")))?;
                out.push((i + 1, value));
            }
            out
        }
        "json" => {
            data.format = "json";
            let value: Value =
                serde_json::from_str(&text).map_err(|e| data_error(path, e.line(), format!("not JSON: {e}")))?;
            let Value::Array(items) = value else {
                return Err(data_error(path, 1, "expected a JSON list of records".into()));
            };
            // A list has no line per record: errors name the record's index, counted from 1.
            items.into_iter().take(limit).enumerate().map(|(i, v)| (i + 1, v)).collect()
        }
        _ => {
            let tok = tok.ok_or_else(|| data_error(path, 1, "plain text needs the model's tokenizer".into()))?;
            let ids = tok.encode(&text, true)?;
            for piece in ids.chunks(max_len).filter(|c| c.len() >= 2).take(limit) {
                data.examples.push(Example { ids: piece.to_vec(), labels: vec![true; piece.len()] });
            }
            data.records = data.examples.len();
            if data.records == 0 {
                return Err(data_error(path, 1, "the text holds fewer than 2 tokens".into()));
            }
            return Ok(data);
        }
    };
    if records.is_empty() {
        return Err(data_error(path, 1, "no records".into()));
    }
    for (line, value) in records {
        let mut example = example(&value, tok).map_err(|message| data_error(path, line, message))?;
        data.records += 1;
        if example.ids.len() > max_len {
            example.ids.truncate(max_len);
            example.labels.truncate(max_len);
            data.truncated += 1;
        }
        if example.label_count() == 0 {
            data.skipped += 1;
            continue;
        }
        data.examples.push(example);
    }
    if data.examples.is_empty() {
        return Err(data_error(
            path,
            1,
            format!("none of its {} records has a response token to train on", data.records),
        ));
    }
    Ok(data)
}

fn data_error(path: &Path, line: usize, message: String) -> FinetuneError {
    FinetuneError::Data { path: PathBuf::from(path), line, message }
}

fn str_field<'a>(record: &'a Value, name: &str) -> std::result::Result<Option<&'a str>, String> {
    match record.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("\"{name}\" must be a string, got {other}")),
    }
}

/// One record → one example.
fn example(record: &Value, tok: Option<&TokenizerBundle>) -> std::result::Result<Example, String> {
    if !record.is_object() {
        return Err("a record must be a JSON object".into());
    }
    if let Some(ids) = record.get("input_ids") {
        return tokenized(ids, record.get("labels"));
    }
    let tok = tok.ok_or("text records need the model's tokenizer (or give \"input_ids\")")?;
    if let Some(text) = str_field(record, "text")? {
        let ids = tok.encode(text, true).map_err(|e| e.to_string())?;
        return Ok(Example { labels: vec![true; ids.len()], ids });
    }
    let messages = if let Some(list) = record.get("messages") {
        messages(list, "role", "content", |r| Some(r.to_string()))?
    } else if let Some(list) = record.get("conversations") {
        messages(list, "from", "value", |r| match r {
            "human" | "user" => Some("user".into()),
            "gpt" | "assistant" | "chatgpt" | "bard" | "bing" => Some("assistant".into()),
            "system" => Some("system".into()),
            _ => None,
        })?
    } else {
        let (prompt, response) = if let Some(instruction) = str_field(record, "instruction")? {
            let input = str_field(record, "input")?.filter(|s| !s.is_empty());
            let prompt = match input {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction.to_string(),
            };
            (prompt, str_field(record, "output")?.ok_or("an Alpaca record needs \"output\"")?.to_string())
        } else {
            let prompt = str_field(record, "prompt")?.ok_or(
                "expected \"text\", \"prompt\" + \"response\", \"instruction\" + \"output\", \"messages\" or \"conversations\"",
            )?;
            let response = str_field(record, "response")?
                .or(str_field(record, "completion")?)
                .ok_or("a prompt record needs \"response\" (or \"completion\")")?;
            (prompt.to_string(), response.to_string())
        };
        if tok.chat_template.is_none() {
            return completion(&prompt, &response, tok);
        }
        vec![ChatMessage::new("user", prompt), ChatMessage::new("assistant", response)]
    };
    chat(&messages, tok)
}

/// `{"input_ids", "labels"}` as HF datasets hold them.
fn tokenized(ids: &Value, labels: Option<&Value>) -> std::result::Result<Example, String> {
    let ints = |v: &Value, name: &str| -> std::result::Result<Vec<i64>, String> {
        v.as_array()
            .ok_or_else(|| format!("\"{name}\" must be a list of integers"))?
            .iter()
            .map(|x| x.as_i64().ok_or_else(|| format!("\"{name}\" must be a list of integers, found {x}")))
            .collect()
    };
    let raw = ints(ids, "input_ids")?;
    let ids: Vec<u32> = raw
        .iter()
        .map(|&i| u32::try_from(i).map_err(|_| format!("\"input_ids\" holds {i}, not a token id")))
        .collect::<std::result::Result<_, _>>()?;
    let labels = match labels.filter(|l| !l.is_null()) {
        None => vec![true; ids.len()],
        Some(l) => {
            let l = ints(l, "labels")?;
            if l.len() != ids.len() {
                return Err(format!("{} labels for {} input_ids", l.len(), ids.len()));
            }
            if let Some(i) = (0..l.len()).find(|&i| l[i] != -100 && l[i] != raw[i]) {
                return Err(format!("labels[{i}] is {}, neither -100 nor input_ids[{i}]", l[i]));
            }
            l.iter().map(|&x| x != -100).collect()
        }
    };
    Ok(Example { ids, labels })
}

fn messages(
    list: &Value,
    role_key: &str,
    content_key: &str,
    role_of: impl Fn(&str) -> Option<String>,
) -> std::result::Result<Vec<ChatMessage>, String> {
    let items = list.as_array().ok_or("the conversation must be a list of turns")?;
    let mut out = Vec::with_capacity(items.len());
    for (i, turn) in items.iter().enumerate() {
        let role = str_field(turn, role_key)?.ok_or_else(|| format!("turn {} has no \"{role_key}\"", i + 1))?;
        let content =
            str_field(turn, content_key)?.ok_or_else(|| format!("turn {} has no \"{content_key}\"", i + 1))?;
        let role = role_of(role).ok_or_else(|| format!("turn {}: unknown speaker \"{role}\"", i + 1))?;
        out.push(ChatMessage::new(role, content));
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant turn".into());
    }
    Ok(out)
}

/// prompt + response without a chat template: the response and an EOS are the labels.
fn completion(prompt: &str, response: &str, tok: &TokenizerBundle) -> std::result::Result<Example, String> {
    let text = format!("{prompt}{response}");
    let (mut ids, offsets) = tok.encode_with_offsets(&text, true).map_err(|e| e.to_string())?;
    let mut labels: Vec<bool> = offsets.iter().map(|&(start, end)| end > start && start >= prompt.len()).collect();
    if let Some(&eos) = tok.eos_token_ids.first() {
        ids.push(eos);
        labels.push(true);
    }
    Ok(Example { ids, labels })
}

/// The conversation through the chat template; the tokens of each assistant turn (what the
/// template writes for it, end-of-turn marker included) are the labels.
fn chat(messages: &[ChatMessage], tok: &TokenizerBundle) -> std::result::Result<Example, String> {
    let template = tok.chat_template.as_deref().ok_or("the model has no chat template to render conversations with")?;
    let render = |upto: usize, generation_prompt: bool| {
        render_chat(template, &messages[..upto], generation_prompt, tok.bos_token.as_deref(), tok.eos_token.as_deref())
            .map_err(|e| e.to_string())
    };
    let full = render(messages.len(), false)?;
    let mut spans = Vec::new();
    for i in (0..messages.len()).filter(|&i| messages[i].role == "assistant") {
        let before = render(i, true)?;
        let through = render(i + 1, false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err("the chat template renders a conversation differently from its beginning, so the \
                        assistant's tokens cannot be located"
                .into());
        }
        spans.push(before.len()..through.len());
    }
    let (ids, offsets) = tok.encode_with_offsets(&full, false).map_err(|e| e.to_string())?;
    let labels = offsets.iter().map(|&(start, end)| end > start && spans.iter().any(|s| s.contains(&start))).collect();
    Ok(Example { ids, labels })
}

/// Splits off `eval` examples (a seeded choice) for the held-out loss; at least one stays for
/// training.
pub fn split(mut examples: Vec<Example>, eval: usize, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    if examples.len() <= eval {
        return Err(FinetuneError::input(format!(
            "{} examples cannot hold out {eval} for evaluation and still train (lower `eval_examples`)",
            examples.len()
        )));
    }
    shuffle(&mut examples, seed);
    let held_out = examples.split_off(examples.len() - eval);
    Ok((examples, held_out))
}

/// Fisher–Yates with pare's fixed generator, so an order never changes with a dependency.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = pare_model::rng::SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}
