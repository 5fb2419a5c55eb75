//! Building a `tokenizers::Tokenizer` from a GGUF file's `tokenizer.*` metadata.
//!
//! A GGUF carries no `tokenizer.json`, only llama.cpp's description of the vocabulary. We build
//! the tokenizer transformers v5 builds from the same keys (`get_gguf_tokenizer` and
//! `convert_gguf_tokenizer` in `integrations/gguf/gguf_tokenizer_mapping.py`), piece by piece,
//! so that `encode` gives the ids `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives and
//! `save_hf` writes a `tokenizer.json` equal to the one transformers would save.

use std::collections::HashSet;
use std::path::Path;

use ahash::AHashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::pretokenize::{self, KNOWN_PRESETS};
use super::{template_post_processor, TokenizerBundle};
use crate::error::{FormatError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`: special tokens such as `<|im_start|>`.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's `LLAMA_TOKEN_TYPE_USER_DEFINED`: added but not special, such as `<think>`.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The `tokenizer.ggml.*` keys, read and checked.
struct GgufVocab<'a> {
    path: &'a Path,
    tokens: Vec<&'a str>,
    token_types: Option<Vec<i64>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

impl<'a> GgufVocab<'a> {
    fn read(gguf: &'a GgufFile) -> Result<Self> {
        let path = gguf.path.as_path();
        let tokens = gguf
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    FormatError::tokenizer(
                        path,
                        format!("tokenizer.ggml.tokens[{i}] is {}, expected a string", v.describe()),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_types = match gguf.get("tokenizer.ggml.token_type") {
            None => None,
            Some(v) => Some(int_array(path, "tokenizer.ggml.token_type", v, tokens.len())?),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            let Some(v) = gguf.get(key) else {
                return Ok(None);
            };
            match v.as_u64() {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                _ => Err(FormatError::tokenizer(
                    path,
                    format!("{key} is {v:?}, not the id of one of the {} tokens", tokens.len()),
                )),
            }
        };
        Ok(GgufVocab {
            path,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            tokens,
            token_types,
        })
    }

    fn token(&self, id: Option<u32>) -> Option<String> {
        id.map(|id| self.tokens[id as usize].to_string())
    }

    /// Tokens of one llama.cpp type, with their ids, in id order.
    fn of_type(&self, ty: i64) -> impl Iterator<Item = &'a str> + '_ {
        let types = self.token_types.as_deref().unwrap_or(&[]);
        self.tokens.iter().zip(types).filter(move |(_, &t)| t == ty).map(|(&tok, _)| tok)
    }
}

/// An array metadata value of exactly `len` integers.
fn int_array(path: &Path, key: &str, value: &GgufValue, len: usize) -> Result<Vec<i64>> {
    let items = value
        .as_array()
        .ok_or_else(|| FormatError::tokenizer(path, format!("{key} is {}, expected an array", value.describe())))?;
    if items.len() != len {
        return Err(FormatError::tokenizer(
            path,
            format!("{key} has {} entries but there are {len} tokens", items.len()),
        ));
    }
    items
        .iter()
        .map(|v| {
            v.as_i64()
                .ok_or_else(|| FormatError::tokenizer(path, format!("{key} holds {}, expected integers", v.describe())))
        })
        .collect()
}

/// GPT-2's reversible byte-to-character table (`bytes_to_unicode`): printable bytes stand for
/// themselves, the rest are moved to U+0100 and up.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(255 + next).expect("U+0100..U+0143 are valid chars")
        };
    }
    table
}

pub(super) fn build(gguf: &GgufFile) -> Result<TokenizerBundle> {
    let path = gguf.path.as_path();
    let model = gguf.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(FormatError::tokenizer(
            path,
            format!(
                "unsupported tokenizer.ggml.model `{model}`: pare builds byte-level BPE vocabularies \
                 (`gpt2`) only, not SentencePiece (`llama`) or others"
            ),
        ));
    }
    let pre = match gguf.get("tokenizer.ggml.pre") {
        None => None,
        Some(_) => Some(gguf.get_str("tokenizer.ggml.pre")?),
    };
    let split = pretokenize::split_for(pre).ok_or_else(|| {
        FormatError::tokenizer(
            path,
            format!("unsupported tokenizer.ggml.pre `{}` (supported: {KNOWN_PRESETS})", pre.unwrap_or_default()),
        )
    })?;

    let vocab = GgufVocab::read(gguf)?;
    let mut tokenizer = byte_level_bpe(gguf, &vocab)?;
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(path, split)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let alphabet: HashSet<char> = bytes_to_unicode().into_iter().collect();
    // Control tokens become special; one spelled outside the byte alphabet is a llama.cpp
    // mislabel that transformers skips, and so do we.
    let control: Vec<AddedToken> = vocab
        .of_type(TOKEN_TYPE_CONTROL)
        .filter(|t| t.chars().all(|c| alphabet.contains(&c)))
        .map(|t| AddedToken::from(t, true).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(control)
        .map_err(|e| FormatError::tokenizer(path, format!("cannot add tokens: {e}")))?;
    // User-defined tokens are matched whole in text too, but are not special.
    let user: Vec<AddedToken> = vocab
        .of_type(TOKEN_TYPE_USER_DEFINED)
        .filter(|t| tokenizer.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t, false).normalized(false))
        .collect();
    tokenizer.add_tokens(user).map_err(|e| FormatError::tokenizer(path, format!("cannot add tokens: {e}")))?;

    let bos_token = vocab.token(vocab.bos);
    let eos_token = vocab.token(vocab.eos);
    let unk_token = vocab.token(vocab.unk);
    let pad_token = vocab.token(vocab.pad);
    // transformers makes every named special token an added special token.
    let named: Vec<AddedToken> = [&bos_token, &eos_token, &unk_token, &pad_token]
        .into_iter()
        .flatten()
        .map(|t| AddedToken::from(t.as_str(), true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(named).map_err(|e| FormatError::tokenizer(path, format!("cannot add tokens: {e}")))?;

    let bos_token_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let eos_token_id = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    // BOS/EOS are added only when asked for and named, as in `update_post_processor`.
    let add_bos = optional_bool(gguf, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = optional_bool(gguf, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = bos_token.clone().zip(bos_token_id).filter(|_| add_bos);
    let eos = eos_token.clone().zip(eos_token_id).filter(|_| add_eos);
    let (add_bos, add_eos) = (bos.is_some(), eos.is_some());
    let post = template_post_processor(bos, eos).map_err(|e| FormatError::tokenizer(path, e))?;
    tokenizer.with_post_processor(Some(post));

    // Generation stops at end of turn as well as end of text where the file names both.
    let mut eos_token_ids: Vec<u32> = eos_token_id.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = gguf.get(key).and_then(GgufValue::as_u64) {
            if (id as usize) < vocab.tokens.len() && !eos_token_ids.contains(&(id as u32)) {
                eos_token_ids.push(id as u32);
            }
        }
    }

    let pad_token_id = pad_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let chat_template = match gguf.get("tokenizer.chat_template") {
        None => None,
        Some(_) => Some(gguf.get_str("tokenizer.chat_template")?.to_string()),
    };
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

fn optional_bool(gguf: &GgufFile, key: &str) -> Result<Option<bool>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(_) => gguf.get_bool(key).map(Some),
    }
}

/// The BPE model over the file's vocabulary and merges, as transformers'
/// `byte_level_tokenizer` makes it: a token spelled with characters outside the byte alphabet
/// (e.g. containing a plain space) is respelled as the byte-level form of its UTF-8.
fn byte_level_bpe(gguf: &GgufFile, vocab: &GgufVocab<'_>) -> Result<Tokenizer> {
    let path = vocab.path;
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let mut ids: AHashMap<String, u32> = AHashMap::with_capacity(vocab.tokens.len());
    for (id, &token) in vocab.tokens.iter().enumerate() {
        let spelled = if token.chars().all(|c| alphabet.contains(&c)) {
            token.to_string()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        };
        // A repeated token keeps its last id, as in the Python dict transformers builds.
        ids.insert(spelled, id as u32);
    }
    let merges = gguf
        .get_array("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let pair = v.as_str().and_then(|m| m.split_once(' '));
            match pair {
                Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
                _ => Err(FormatError::tokenizer(
                    path,
                    format!("tokenizer.ggml.merges[{i}] is {v:?}, expected two tokens separated by one space"),
                )),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(ids, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .build()
        .map_err(|e| FormatError::tokenizer(path, format!("cannot build BPE: {e}")))?;
    Ok(Tokenizer::new(bpe))
}

fn pre_tokenizer(path: &Path, split: pretokenize::Split) -> Result<PreTokenizerWrapper> {
    Ok(match split {
        pretokenize::Split::Gpt2 => ByteLevel::new(false, true, true).into(),
        pretokenize::Split::Regex(regex) => {
            let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| FormatError::tokenizer(path, format!("bad split regex: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    })
}
