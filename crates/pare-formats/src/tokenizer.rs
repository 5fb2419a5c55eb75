//! A tokenizer with the facts generation needs around it: special ids, BOS/EOS policy, chat
//! template.
//!
//! Both constructors aim at one contract: `encode(text, true)` returns exactly the
//! `input_ids` of transformers' `tokenizer(text)` for the same checkpoint, whether that is a GGUF
//! file ([`TokenizerBundle::from_gguf`]) or an HF directory ([`TokenizerBundle::from_hf_dir`]).

mod from_gguf;
mod hf_dir;
mod pretokenize;
mod to_gguf;

use std::path::Path;

use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

use crate::error::{FormatError, Result};
use crate::gguf::GgufFile;

/// A token's start and end byte in the encoded text.
pub type ByteSpan = (usize, usize);

/// A tokenizer and its special-token facts.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation; the EOS token's own id first.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Whether `encode(_, true)` starts with BOS / ends with EOS.
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("pad_token", &self.pad_token)
            .field("unk_token", &self.unk_token)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl TokenizerBundle {
    /// The tokenizer a GGUF file describes in its `tokenizer.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        from_gguf::build(gguf)
    }

    /// The tokenizer of a Hugging Face model directory: `tokenizer.json`, with
    /// `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja` and
    /// `generation_config.json` where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        hf_dir::load(dir)
    }

    /// Token ids of `text`; with `add_special_tokens`, BOS/EOS are added as the checkpoint
    /// says. Special tokens written in the text (e.g. `<|im_start|>`) are always one id.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| FormatError::Tokenize(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte range in `text` (special tokens the
    /// tokenizer adds get an empty range at 0).
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| FormatError::Tokenize(format!("encoding failed: {e}")))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`; byte-level pieces that do not form whole UTF-8 characters are
    /// replaced by U+FFFD, as transformers does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| FormatError::Tokenize(format!("decoding failed: {e}")))
    }

    /// The raw vocabulary piece of `id` (byte-level spelling, e.g. `Ġthe`).
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The id of a raw vocabulary piece or added token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The BOS id `encode(_, true)` starts with, if it adds one.
    pub fn added_bos(&self) -> Option<u32> {
        self.bos_token_id.filter(|_| self.add_bos)
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The GGUF `tokenizer.*` keys llama.cpp's `convert_hf_to_gguf.py` writes for this
    /// (byte-level BPE) tokenizer, its token list padded to the model's `n_vocab` embedding rows.
    /// A pre-tokenizer the converter does not recognise is refused, as the converter refuses it.
    pub fn gguf_metadata(&self, n_vocab: usize) -> Result<Vec<(String, crate::gguf::GgufValue)>> {
        to_gguf::metadata(self, n_vocab)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` so that
    /// `AutoTokenizer.from_pretrained(dir)` encodes exactly as this bundle does.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        hf_dir::save(self, dir)
    }
}

/// The post-processor transformers' `update_post_processor` installs: BOS before and EOS after
/// each sequence, as requested, given as `(token, id)`.
fn template_post_processor(
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> std::result::Result<TemplateProcessing, String> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special = Vec::new();
    if let Some((token, id)) = &bos {
        single.push(format!("{token}:0"));
        special.push((token.clone(), *id));
    }
    single.push("$A:0".to_string());
    if let Some((token, id)) = &eos {
        single.push(format!("{token}:0"));
        special.push((token.clone(), *id));
    }
    pair.extend(single.iter().cloned());
    if let Some((token, _)) = &bos {
        pair.push(format!("{token}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some((token, _)) = &eos {
        pair.push(format!("{token}:1"));
    }
    TemplateProcessing::builder()
        .try_single(single)?
        .try_pair(pair)?
        .special_tokens(special)
        .build()
        .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))
}
