//! Tokenizers built from the real GGUFs against transformers 5.23's
//! `AutoTokenizer.from_pretrained(assets, gguf_file=...)`: the expected ids, decodings and
//! whole-text digests in `tests/data` were produced by it.

mod common;

use std::path::Path;

use common::*;
use pare_formats::{FormatError, GgufFile, TokenizerBundle};

fn bundle(path: &Path) -> TokenizerBundle {
    TokenizerBundle::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
}

/// Checks every case of `hf_ids_<tag>.json` against `tok`.
fn check_cases(tok: &TokenizerBundle, tag: &str) {
    let cases = read_json(&format!("hf_ids_{tag}.json"));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = |key: &str| -> Vec<u32> {
            case[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
        };
        assert_eq!(tok.encode(text, true).unwrap(), ids("ids"), "{tag}: {text:?}");
        assert_eq!(tok.encode(text, false).unwrap(), ids("ids_no_special"), "{tag}: {text:?}");
        let hf_ids = ids("ids");
        assert_eq!(tok.decode(&hf_ids, false).unwrap(), case["decoded"].as_str().unwrap(), "{tag}: {text:?}");
        assert_eq!(tok.decode(&hf_ids, true).unwrap(), case["decoded_skip"].as_str().unwrap(), "{tag}: {text:?}");
    }
}

/// Whole texts from `assets/texts`, compared through the length and FNV-1a digest of the ids.
fn check_texts(tok: &TokenizerBundle, tag: &str) {
    let digests = read_json("hf_text_digests.json");
    let digests = digests[tag].as_object().unwrap();
    assert_eq!(digests.len(), 6);
    for (file, want) in digests {
        let text = std::fs::read_to_string(assets().join("texts").join(file)).unwrap();
        let ids = tok.encode(&text, true).unwrap();
        let first: Vec<u32> = want["first"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(&ids[..first.len()], first.as_slice(), "{tag} {file}");
        assert_eq!(ids.len() as u64, want["n_ids"].as_u64().unwrap(), "{tag} {file}");
        assert_eq!(format!("{:016x}", fnv1a64(&ids)), want["fnv1a64"].as_str().unwrap(), "{tag} {file}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{tag} {file} round trip");
    }
}

#[test]
fn smollm2_matches_transformers() {
    let tok = bundle(&smollm2_path());
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_token_id, tok.pad_token_id), (Some(1), Some(2)));
    assert_eq!(tok.eos_token_ids, vec![2]);
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.unk_token.as_deref(), Some("<|endoftext|>"));
    assert!(!tok.add_bos && !tok.add_eos);
    assert!(tok.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    assert_eq!(tok.token_str(19556).as_deref(), Some("Hello"));
    assert_eq!(tok.token_str(905).as_deref(), Some("Ġworld"));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    check_cases(&tok, "smollm2");
}

#[test]
fn qwen2_matches_transformers() {
    let tok = bundle(&qwen2_path());
    assert_eq!(tok.vocab_size(), 151936);
    assert_eq!(tok.bos_token_id, Some(151643));
    assert_eq!(tok.eos_token_ids, vec![151645]);
    assert_eq!(tok.pad_token_id, Some(151643));
    assert!(!tok.add_bos && !tok.add_eos);
    assert!(tok.chat_template.as_deref().unwrap().contains("tools"));
    check_cases(&tok, "qwen2");
}

#[test]
fn whole_texts_match_transformers() {
    check_texts(&bundle(&smollm2_path()), "smollm2");
    check_texts(&bundle(&qwen2_path()), "qwen2");
}

/// `save_hf` then `from_hf_dir` gives back the same tokenizer (transformers loading the saved
/// directory was checked by hand to give the same ids too).
#[test]
fn save_hf_round_trip() {
    for (path, tag) in [(smollm2_path(), "smollm2"), (qwen2_path(), "qwen2")] {
        let tok = bundle(&path);
        let dir = scratch_dir(&format!("save-{tag}"));
        tok.save_hf(&dir).unwrap();
        let back = TokenizerBundle::from_hf_dir(&dir).unwrap();
        assert_eq!(back.bos_token_id, tok.bos_token_id);
        assert_eq!(back.eos_token_ids, tok.eos_token_ids);
        assert_eq!(back.pad_token_id, tok.pad_token_id);
        assert_eq!((back.add_bos, back.add_eos), (tok.add_bos, tok.add_eos));
        assert_eq!(back.chat_template, tok.chat_template);
        assert_eq!(back.unk_token, tok.unk_token);
        check_cases(&back, tag);
    }
}

/// A minimal byte-level GGUF vocabulary: the 256 byte symbols, one merge, one control token.
fn tiny_vocab(pre: Option<&str>, model: &str) -> GgufBuilder {
    let symbols: Vec<String> = (0u8..=255).map(|b| byte_symbol(b).to_string()).collect();
    let mut tokens: Vec<&str> = symbols.iter().map(String::as_str).collect();
    tokens.extend(["ab", "<|end|>", "<|user|>"]);
    let mut types = vec![1; tokens.len()];
    types[257] = 3;
    types[258] = 4;
    let mut b = GgufBuilder::default()
        .kv(kv_str("general.architecture", "llama"))
        .kv(kv_str("tokenizer.ggml.model", model))
        .kv(kv_str_array("tokenizer.ggml.tokens", &tokens))
        .kv(kv_i32_array("tokenizer.ggml.token_type", &types))
        .kv(kv_str_array("tokenizer.ggml.merges", &["a b"]))
        .kv(kv_u32("tokenizer.ggml.eos_token_id", 257))
        .kv(kv_u32("tokenizer.ggml.bos_token_id", 257))
        .kv(kv_bool("tokenizer.ggml.add_bos_token", true));
    if let Some(pre) = pre {
        b = b.kv(kv_str("tokenizer.ggml.pre", pre));
    }
    b
}

/// GPT-2's printable stand-in for a byte.
fn byte_symbol(b: u8) -> char {
    if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

fn tiny(builder: GgufBuilder, name: &str) -> Result<TokenizerBundle, FormatError> {
    let dir = scratch_dir("tiny-tok");
    let f = GgufFile::open(&builder.write(&dir, name)).unwrap();
    TokenizerBundle::from_gguf(&f)
}

#[test]
fn synthetic_vocab_specials_and_bos() {
    for pre in [None, Some("gpt-2"), Some("llama-bpe"), Some("qwen2")] {
        let tok = tiny(tiny_vocab(pre, "gpt2"), "ok.gguf").unwrap();
        assert!(tok.add_bos);
        // BOS first; "ab" merged; control and user-defined tokens kept whole.
        let ids = tok.encode("ab<|end|>a<|user|>", true).unwrap();
        assert_eq!(ids, vec![257, 256, 257, b'a' as u32, 258], "pre {pre:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), "aba<|user|>");
        assert_eq!(tok.encode("ab", false).unwrap(), vec![256]);
    }
}

#[test]
fn tokenizer_metadata_errors() {
    let err = tiny(tiny_vocab(Some("mystery"), "gpt2"), "pre.gguf").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("pre.gguf") && msg.contains("unsupported tokenizer.ggml.pre `mystery`"), "{msg}");

    let err = tiny(tiny_vocab(None, "bert"), "model.gguf").unwrap_err().to_string();
    assert!(err.contains("model.gguf") && err.contains("unsupported tokenizer.ggml.model `bert`"), "{err}");

    let err = tiny(GgufBuilder::default().kv(kv_str("tokenizer.ggml.model", "gpt2")), "notokens.gguf").unwrap_err();
    assert!(matches!(err, FormatError::MissingKey { ref key, .. } if key == "tokenizer.ggml.tokens"), "{err}");

    let err =
        tiny(tiny_vocab(None, "gpt2").kv(kv_u32("tokenizer.ggml.padding_token_id", 5000)), "range.gguf").unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.padding_token_id"), "{err}");

    let mut b = tiny_vocab(None, "gpt2");
    b.kvs.retain(|kv| kv.key != "tokenizer.ggml.merges");
    let err = tiny(b.kv(kv_str_array("tokenizer.ggml.merges", &["abc"])), "merge.gguf").unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges[0]"), "{err}");

    let mut b = tiny_vocab(None, "gpt2");
    b.kvs.retain(|kv| kv.key != "tokenizer.ggml.token_type");
    let err = tiny(b.kv(kv_i32_array("tokenizer.ggml.token_type", &[1, 1])), "types.gguf").unwrap_err();
    assert!(err.to_string().contains("has 2 entries but there are 259 tokens"), "{err}");
}

/// An HF directory's config decides the special tokens, BOS policy and template.
#[test]
fn hf_dir_config_variants() {
    let tok = bundle(&smollm2_path());
    let dir = scratch_dir("hfdir");
    tok.save_hf(&dir).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        "eos_token": "<|im_end|>",
        "add_bos_token": true,
        "chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}, {"name": "tool_use", "template": "x"}],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
    let t = TokenizerBundle::from_hf_dir(&dir).unwrap();
    assert!(t.add_bos && !t.add_eos);
    assert_eq!(t.encode("Hello", true).unwrap(), vec![1, 19556]);
    assert_eq!(t.eos_token_ids, vec![2, 0]);
    assert_eq!(t.chat_template.as_deref(), Some("{{ messages[0].content }}"));
    assert_eq!(t.pad_token, None);

    std::fs::write(dir.join("chat_template.jinja"), "from file").unwrap();
    assert_eq!(TokenizerBundle::from_hf_dir(&dir).unwrap().chat_template.as_deref(), Some("from file"));

    std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
    let err = TokenizerBundle::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");

    let err = TokenizerBundle::from_hf_dir(&scratch_dir("empty")).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
