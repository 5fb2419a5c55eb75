//! How text is split before byte-level BPE, per GGUF `tokenizer.ggml.pre` preset.
//!
//! The table is transformers' (`integrations/gguf/gguf_tokenizer_mapping.py`,
//! `GGUF_PRE_TOKENIZER_SPLITS`, v5.23), because pare's ids must equal what
//! `AutoTokenizer.from_pretrained(dir, gguf_file=...)` produces. The regexes are the same as
//! llama.cpp's `llama-vocab.cpp` for these presets. Presets transformers does not list fall back
//! to GPT-2's own byte-level split there; we accept that fallback only for the few presets named
//! below, and reject the rest rather than silently tokenize a model its own way.

/// Llama 3's split: case-insensitive contractions, digits in groups of up to three.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split: like Llama 3's but every digit alone.
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3.5's split: Qwen2's with combining marks kept inside words.
const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken split.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's split (also Llama 4's).
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenization a preset calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// Split with this regex (isolating matches), then map bytes without a further regex.
    Regex(&'static str),
    /// GPT-2's built-in byte-level split.
    Gpt2,
}

/// The split for `tokenizer.ggml.pre`, or `None` for a preset pare does not know.
///
/// A file without the key (written before llama.cpp had presets) gets GPT-2's split, as in
/// transformers.
pub(crate) fn split_for(pre: Option<&str>) -> Option<Split> {
    let Some(pre) = pre else {
        return Some(Split::Gpt2);
    };
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => Split::Regex(LLAMA3),
        "tekken" => Split::Regex(TEKKEN),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Split::Regex(QWEN2),
        "qwen35" => Split::Regex(QWEN35),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => Split::Regex(GPT4O),
        // GPT-2's regex is "gpt-2"'s own. llama.cpp's "smollm" additionally isolates each digit
        // first, which changes no id: SmolLM vocabularies were trained with digits isolated, so
        // no merge joins a digit to anything. "default" is what llama.cpp's converter writes for
        // a tokenizer it does not recognise; transformers splits it as GPT-2.
        // llama.cpp's "olmo" (GPT-NeoX-20B's tokenizer) uses GPT-2's regex.
        "gpt-2" | "default" | "smollm" | "olmo" => Split::Gpt2,
        _ => return None,
    })
}

/// The presets [`split_for`] accepts, for error messages.
pub(crate) const KNOWN_PRESETS: &str = "gpt-2, default, smollm, olmo, llama-bpe, llama3, llama-v3, \
    falcon3, falcon-h1, pixtral, midm-2.0, lfm2, jina-v5-nano, dbrx, smaug-bpe, tekken, qwen2, \
    deepseek-r1-qwen, kormo, f2llmv2, megrez, qwen35, gpt-4o, llama4, kanana2, talkie, minimax-m2";
