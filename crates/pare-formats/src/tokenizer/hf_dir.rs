//! Reading and writing a tokenizer in a Hugging Face model directory.
//!
//! Loading follows transformers v5's `TokenizersBackend`: `tokenizer.json` is the tokenizer;
//! `tokenizer_config.json` (or `special_tokens_map.json`) names the special tokens, which become
//! added special tokens; an explicit `add_bos_token`/`add_eos_token` replaces the
//! post-processor; `chat_template.jinja` overrides the config's template.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tokenizers::{AddedToken, Tokenizer};

use super::{template_post_processor, TokenizerBundle};
use crate::error::{FormatError, Result};

/// The special tokens transformers names, in its order.
const NAMED_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| FormatError::Json { path: path.to_path_buf(), source })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special token as a config spells it: a string or an `AddedToken` object.
fn added_token(path: &Path, key: &str, value: &Value) -> Result<Option<AddedToken>> {
    let bad = || FormatError::tokenizer(path, format!("`{key}` is {value}, expected a token"));
    Ok(match value {
        Value::Null => None,
        Value::String(s) => Some(AddedToken::from(s.as_str(), true).normalized(false)),
        Value::Object(o) => {
            let content = o.get("content").and_then(Value::as_str).ok_or_else(bad)?;
            let flag = |name: &str, default: bool| o.get(name).and_then(Value::as_bool).unwrap_or(default);
            Some(
                AddedToken::from(content, true)
                    .single_word(flag("single_word", false))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .normalized(flag("normalized", false)),
            )
        }
        _ => return Err(bad()),
    })
}

/// `chat_template` as a config holds it: a string, or a list of named templates of which
/// transformers uses `default`.
fn config_chat_template(path: &Path, value: &Value) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(items) => Ok(items.iter().find_map(|t| {
            (t.get("name")?.as_str()? == "default").then(|| t.get("template")?.as_str().map(str::to_string))?
        })),
        other => Err(FormatError::tokenizer(
            path,
            format!("`chat_template` is {other}, expected a string or a list of named templates"),
        )),
    }
}

/// The ids a `generation_config.json` or `config.json` gives as `eos_token_id`.
fn eos_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_u64().map(|n| n as u32)).collect(),
        _ => Vec::new(),
    }
}

pub(super) fn load(dir: &Path) -> Result<TokenizerBundle> {
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(FormatError::io(
            &tokenizer_path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json in the directory"),
        ));
    }
    let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| FormatError::tokenizer(&tokenizer_path, format!("cannot load: {e}")))?;

    let config_path = dir.join("tokenizer_config.json");
    let config = read_optional_json(&config_path)?.unwrap_or(Value::Null);
    let map_path = dir.join("special_tokens_map.json");
    let special_map = read_optional_json(&map_path)?.unwrap_or(Value::Null);

    // Named special tokens: the config wins over special_tokens_map.json.
    let mut named: Vec<Option<AddedToken>> = Vec::new();
    for key in NAMED_TOKENS {
        let token = match config.get(key) {
            Some(v) => added_token(&config_path, key, v)?,
            None => match special_map.get(key) {
                Some(v) => added_token(&map_path, key, v)?,
                None => None,
            },
        };
        named.push(token);
    }
    let mut to_add: Vec<AddedToken> = named.iter().flatten().cloned().collect();
    for (source, path) in [(&config, &config_path), (&special_map, &map_path)] {
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(Value::Array(items)) = source.get(key) {
                for item in items {
                    to_add.extend(added_token(path, key, item)?);
                }
            }
        }
    }
    tokenizer
        .add_special_tokens(to_add)
        .map_err(|e| FormatError::tokenizer(&config_path, format!("cannot add special tokens: {e}")))?;

    let [bos_token, eos_token, unk_token, pad_token] =
        [0, 1, 2, 3].map(|i| named[i].as_ref().map(|t| t.content.clone()));
    let bos_token_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let eos_token_id = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let pad_token_id = pad_token.as_deref().and_then(|t| tokenizer.token_to_id(t));

    let explicit_bos = config.get("add_bos_token").and_then(Value::as_bool);
    let explicit_eos = config.get("add_eos_token").and_then(Value::as_bool);
    if explicit_bos.is_some() || explicit_eos.is_some() || tokenizer.get_post_processor().is_none() {
        let bos = bos_token.clone().zip(bos_token_id).filter(|_| explicit_bos.unwrap_or(false));
        let eos = eos_token.clone().zip(eos_token_id).filter(|_| explicit_eos.unwrap_or(false));
        let post = template_post_processor(bos, eos).map_err(|e| FormatError::tokenizer(&config_path, e))?;
        tokenizer.with_post_processor(Some(post));
    }
    // What the post-processor adds around an empty text tells the BOS/EOS policy.
    let framing = tokenizer
        .encode_fast("", true)
        .map_err(|e| FormatError::tokenizer(&tokenizer_path, format!("cannot encode: {e}")))?;
    let framing = framing.get_ids();
    let add_bos = bos_token_id.is_some() && framing.first().copied() == bos_token_id;
    let add_eos = eos_token_id.is_some() && framing.last().copied() == eos_token_id && (framing.len() > 1 || !add_bos);

    let jinja_path = dir.join("chat_template.jinja");
    let chat_template = if jinja_path.is_file() {
        Some(fs::read_to_string(&jinja_path).map_err(|e| FormatError::io(&jinja_path, e))?)
    } else {
        match config.get("chat_template") {
            Some(v) => config_chat_template(&config_path, v)?,
            None => None,
        }
    };

    let mut eos_token_ids: Vec<u32> = eos_token_id.into_iter().collect();
    let generation = read_optional_json(&dir.join("generation_config.json"))?;
    for id in eos_ids(generation.as_ref().and_then(|g| g.get("eos_token_id"))) {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }

    Ok(TokenizerBundle {
        tokenizer,
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        bos_token,
        eos_token,
        pad_token,
        unk_token,
        add_bos,
        add_eos,
        chat_template,
    })
}

fn write(path: PathBuf, text: &str) -> Result<()> {
    fs::write(&path, text).map_err(|e| FormatError::io(&path, e))
}

pub(super) fn save(bundle: &TokenizerBundle, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| FormatError::io(dir, e))?;
    let tokenizer_path = dir.join("tokenizer.json");
    let json = bundle
        .tokenizer
        .to_string(false)
        .map_err(|e| FormatError::tokenizer(&tokenizer_path, format!("cannot serialize: {e}")))?;
    write(tokenizer_path, &json)?;

    // `PreTrainedTokenizerFast` is the class name transformers v4 and v5 both load.
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (key, token) in [
        ("bos_token", &bundle.bos_token),
        ("eos_token", &bundle.eos_token),
        ("unk_token", &bundle.unk_token),
        ("pad_token", &bundle.pad_token),
    ] {
        config.insert(key.into(), json!(token));
    }
    config.insert("add_bos_token".into(), json!(bundle.add_bos));
    config.insert("add_eos_token".into(), json!(bundle.add_eos));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(template) = &bundle.chat_template {
        config.insert("chat_template".into(), json!(template));
    }
    let config_path = dir.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&Value::Object(config))
        .map_err(|source| FormatError::Json { path: config_path.clone(), source })?;
    write(config_path, &text)
}
