//! Tokenizers built from the real GGUFs against transformers 5.23's
//! `AutoTokenizer.from_pretrained(assets, gguf_file=...)`: the expected ids, decodings and
//! whole-text digests in `tests/data` were produced by it.

mod common;

use std::path::Path;

use common::*;
use pare_formats::{FormatError, GgufFile, GgufValue, TokenizerBundle};

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

/// The `tokenizer.*` keys of a GGUF, in file order.
fn tokenizer_keys(f: &GgufFile) -> Vec<(String, GgufValue)> {
    f.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Rebuilt from the tokenizer pare reads out of them, the keys llama.cpp's converter wrote into
/// the shipped GGUFs come out the same: vocabulary, token types, merges, special ids and the
/// pre-tokenizer its hash picks (`smollm`, `qwen2`).
#[test]
fn gguf_metadata_reproduces_the_converters_keys() {
    for path in [smollm2_path(), qwen2_path()] {
        let f = GgufFile::open(&path).unwrap();
        let theirs = tokenizer_keys(&f);
        let n_vocab = f.get_array("tokenizer.ggml.tokens").unwrap().len();
        let ours = bundle(&path).gguf_metadata(n_vocab).unwrap();
        let name = path.display();
        for (key, value) in &ours {
            // The GGUFs were converted before llama.cpp wrote add_eos_token; absent means false.
            let want = theirs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            let want = want.or((key == "tokenizer.ggml.add_eos_token").then_some(GgufValue::Bool(false)));
            let (Some(a), Some(b)) = (value.as_array(), want.as_ref().and_then(GgufValue::as_array)) else {
                assert_eq!(Some(value), want.as_ref(), "{name}: {key}");
                continue;
            };
            // Qwen2's embedding rows past its vocabulary are `[PAD…]` tokens the converter marks
            // unused; read back from the GGUF they are ordinary pieces of the vocabulary.
            let unused_as_normal = |v: &GgufValue| match v {
                GgufValue::I32(5) if key == "tokenizer.ggml.token_type" => GgufValue::I32(1),
                v => v.clone(),
            };
            let differ: Vec<_> =
                a.iter().zip(b).enumerate().filter(|(_, (x, y))| **x != unused_as_normal(y)).take(5).collect();
            assert!(a.len() == b.len() && differ.is_empty(), "{name}: {key}: {} vs {}: {differ:?}", a.len(), b.len());
        }
        // add_space_prefix was the older converter's; today's does not write it for BPE vocabularies.
        let missing: Vec<_> = theirs
            .iter()
            .filter(|(k, _)| k != "tokenizer.ggml.add_space_prefix" && !ours.iter().any(|(o, _)| o == k))
            .map(|(k, _)| k)
            .collect();
        assert!(missing.is_empty(), "{name}: not written: {missing:?}");
    }
}

/// GPT-NeoX-20B's tokenizer from an HF directory: llama.cpp's `olmo` preset, the embedding's
/// padding rows as unused `[PAD…]` tokens, and a GGUF with these keys tokenizes as the directory.
/// (Not where runs of spaces meet GPT-NeoX's added whitespace tokens: pare reads a GGUF as
/// transformers' GGUF loader does, which drops user-defined tokens spelled with plain spaces.)
#[test]
fn gguf_metadata_from_an_hf_tokenizer_reads_back_alike() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gptneox-tiny/model");
    let hf = TokenizerBundle::from_hf_dir(&dir).unwrap();
    let keys = hf.gguf_metadata(50304).unwrap();
    let get = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(get("tokenizer.ggml.pre"), GgufValue::Str("olmo".into()));
    let tokens = get("tokenizer.ggml.tokens");
    let tokens = tokens.as_array().unwrap();
    assert_eq!((tokens.len(), tokens[50303].as_str()), (50304, Some("[PAD50303]")));
    let types = get("tokenizer.ggml.token_type");
    let types = types.as_array().unwrap();
    // <|endoftext|> is control, ordinary pieces normal, padding rows unused.
    assert_eq!((types[0].as_i64(), types[300].as_i64(), types[50300].as_i64()), (Some(3), Some(1), Some(5)));

    let scratch = scratch_dir("neox-keys");
    let path = scratch.join("t.gguf");
    pare_formats::write_gguf(&path, &keys, &[]).unwrap();
    let back = bundle(&path);
    let text = std::fs::read_to_string(assets().join("texts/wiki.utf8")).unwrap();
    let text: String = text.chars().take(20_000).collect();
    for t in [text.as_str(), "one space,\ttabs\n\n and <|endoftext|> inside", "I've 12345 ümlauts"] {
        assert_eq!(back.encode(t, true).unwrap(), hf.encode(t, true).unwrap(), "{t:?}");
    }
    assert_eq!((back.bos_token_id, back.pad_token_id, back.add_bos), (hf.bos_token_id, hf.pad_token_id, hf.add_bos));
}

#[test]
fn gguf_metadata_refuses_what_llama_cpp_would_not_take() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gptneox-tiny/model");
    let mut hf = TokenizerBundle::from_hf_dir(&dir).unwrap();
    let err = hf.gguf_metadata(100).unwrap_err().to_string();
    assert!(err.contains("`vocab_size` 100") && !err.contains('\n'), "{err}");
    // Another split gives other ids on the check text: a pre-tokenizer the converter does not know.
    hf.tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
    let err = hf.gguf_metadata(50304).unwrap_err().to_string();
    assert!(err.contains("does not recognise") && err.contains("chkhsh") && !err.contains('\n'), "{err}");
}
