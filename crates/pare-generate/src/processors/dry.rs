//! DRY, "Don't Repeat Yourself" (p-e-w, text-generation-webui #5677), with llama.cpp's semantics
//! (`llama_sampler_dry_apply` / `llama_sampler_init_dry` in `src/llama-sampling.cpp`, ported there
//! from koboldcpp). Defaults as llama.cpp: multiplier 0 (off), base 1.75, allowed_length 2,
//! penalty_last_n -1, sequence breakers `["\n", ":", "\"", "*"]`.
//!
//! Context: the last `penalty_last_n` tokens of `input_ids` (prompt included, as llama.cpp's server
//! feeds the prompt to the sampler); `-1` = the whole context, `0` = disabled. With `N` tokens in
//! that window, nothing happens when `N <= allowed_length`.
//!
//! Rule: (1) Sequence breakers cut the context: scanning back from the newest token, the first
//! token that starts a breaker sequence (fully present in the context) limits the repeat length to
//! the number of tokens after that breaker; if that limit is below `allowed_length`, nothing
//! happens. (2) For every earlier position, the length of the longest suffix of the context that also
//! ends there (capped by the limit) is computed (Z-algorithm over the reversed context). (3) For each
//! such match of length `len >= allowed_length`, the token that followed it would extend the repeat;
//! each token keeps its largest `len`. (4) Each such token — unless it is itself a single-token
//! breaker — gets `score -= multiplier * base^(len - allowed_length)` (the exponent clamped to
//! `88.7228391 / ln(base)` so the power stays finite).
//!
//! Breakers are strings; as llama.cpp, [`Dry::new`] turns them into token sequences from the
//! vocabulary's decoded token texts (byte matching): every token whose text CONTAINS a breaker is a
//! single-token breaker; a token whose text ENDS with a proper prefix of a breaker starts a
//! multi-token breaker whose tail is the rest of the breaker, tokenized (at most 20 tokens; breakers
//! are cut to 40 bytes). llama.cpp tokenizes that tail with the model's tokenizer; pare only has the
//! token texts and tokenizes it greedily (longest vocabulary text first), which can differ for
//! multi-character breakers split across tokens. Single-character breakers (the defaults) are exact.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{LogitsProcessor, ProcessContext};

/// llama.cpp's defaults.
pub const DEFAULT_BASE: f32 = 1.75;
pub const DEFAULT_ALLOWED_LENGTH: usize = 2;
pub const DEFAULT_PENALTY_LAST_N: i64 = -1;
pub fn default_sequence_breakers() -> Vec<String> {
    ["\n", ":", "\"", "*"].iter().map(|s| s.to_string()).collect()
}

/// DRY settings (llama.cpp's defaults: `multiplier` 0 is off; 0.8 is the usual "on" value).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DryConfig {
    /// >= 0; 0 = off.
    pub multiplier: f32,
    /// >= 1. Default 1.75.
    pub base: f32,
    /// Repeats up to this length are free. Default 2.
    pub allowed_length: usize,
    /// How many of the last tokens are scanned: -1 = whole context, 0 = off. Default -1.
    pub penalty_last_n: i64,
    /// Strings that end a repeat; default `["\n", ":", "\"", "*"]`. Each non-empty.
    pub sequence_breakers: Vec<String>,
}

impl Default for DryConfig {
    fn default() -> Self {
        Self {
            multiplier: 0.0,
            base: DEFAULT_BASE,
            allowed_length: DEFAULT_ALLOWED_LENGTH,
            penalty_last_n: DEFAULT_PENALTY_LAST_N,
            sequence_breakers: default_sequence_breakers(),
        }
    }
}

const MAX_CHAR_LEN: usize = 40;
const MAX_SEQ_LEN: usize = 20;
const FLOAT_MAX_LOG: f32 = 88.722_84;

pub struct Dry {
    multiplier: f32,
    base: f32,
    allowed_length: usize,
    penalty_last_n: i64,
    /// head token -> tails (the rest of each breaker sequence; empty for a single-token breaker).
    breakers: HashMap<u32, Vec<Vec<u32>>>,
    repeat_count: Vec<usize>,
    max_token_repeat: HashMap<u32, usize>,
}

impl Dry {
    /// Breakers given as strings, matched against the decoded text of every token (`vocab_texts[id]`).
    pub fn new(
        multiplier: f32,
        base: f32,
        allowed_length: usize,
        penalty_last_n: i64,
        sequence_breakers: &[String],
        vocab_texts: &[String],
    ) -> Self {
        let mut breakers: HashMap<u32, Vec<Vec<u32>>> = HashMap::new();
        if !sequence_breakers.is_empty() {
            let mut tokenizer = None;
            for b in sequence_breakers {
                if b.is_empty() {
                    continue;
                }
                let b = truncate_bytes(b, MAX_CHAR_LEN);
                overlapping_token_sequences(vocab_texts, b.as_bytes(), &mut tokenizer, &mut breakers);
            }
        }
        Self::from_parts(multiplier, base, allowed_length, penalty_last_n, breakers)
    }

    /// Breakers given directly as token sequences (llama.cpp's `llama_sampler_init_dry_testing`).
    pub fn with_token_breakers(
        multiplier: f32,
        base: f32,
        allowed_length: usize,
        penalty_last_n: i64,
        sequence_breakers: &[Vec<u32>],
    ) -> Self {
        let mut breakers: HashMap<u32, Vec<Vec<u32>>> = HashMap::new();
        for b in sequence_breakers {
            if let Some((&head, tail)) = b.split_first() {
                breakers.entry(head).or_default().push(tail.to_vec());
            }
        }
        Self::from_parts(multiplier, base, allowed_length, penalty_last_n, breakers)
    }

    fn from_parts(
        multiplier: f32,
        base: f32,
        allowed_length: usize,
        penalty_last_n: i64,
        breakers: HashMap<u32, Vec<Vec<u32>>>,
    ) -> Self {
        Self {
            multiplier,
            base,
            allowed_length,
            penalty_last_n,
            breakers,
            repeat_count: Vec::new(),
            max_token_repeat: HashMap::new(),
        }
    }

    /// Whether the token is the head of a breaker sequence with an empty tail (a whole breaker).
    pub fn is_single_token_breaker(&self, token: u32) -> bool {
        self.breakers.get(&token).is_some_and(|tails| tails.iter().any(Vec::is_empty))
    }

    fn enabled(&self) -> bool {
        self.multiplier != 0.0 && self.base >= 1.0 && self.penalty_last_n != 0
    }
}

impl LogitsProcessor for Dry {
    fn name(&self) -> &'static str {
        "dry"
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        if !self.enabled() {
            return;
        }
        let ids = ctx.input_ids;
        let len = ids.len();
        let last_n = if self.penalty_last_n < 0 { len } else { (self.penalty_last_n as usize).min(len) };
        if last_n <= self.allowed_length {
            return;
        }
        // rat(i): the i-th token from the end (0 = newest).
        let rat = |i: usize| ids[len - 1 - i];

        // Step 1: the newest breaker limits how far back a repeat may reach.
        let mut rep_limit = last_n;
        for i in 0..last_n {
            let Some(tails) = self.breakers.get(&rat(i)) else { continue };
            let mut longest: Option<usize> = None;
            for tail in tails {
                let seq_len = tail.len();
                if longest.is_some_and(|l| seq_len <= l) || seq_len > i {
                    continue;
                }
                if (0..seq_len).all(|o| tail[o] == rat(i - o - 1)) {
                    longest = Some(seq_len);
                }
            }
            if let Some(l) = longest {
                rep_limit = i - l;
                break;
            }
        }
        if rep_limit < self.allowed_length {
            return;
        }

        // Step 2: Z-algorithm over the reversed window.
        self.repeat_count.clear();
        self.repeat_count.resize(last_n, 0);
        let last = last_n - 1;
        let (mut rt, mut lt) = (0usize, 0usize);
        for k in 1..last_n {
            if k > rt {
                let mut n = 0;
                while n + k < last_n && rat(n) == rat(n + k) {
                    n += 1;
                }
                self.repeat_count[last - k] = n.min(rep_limit);
                if n > 0 {
                    lt = k;
                    rt = k + n - 1;
                }
            } else {
                let p = k - lt;
                let right_part_len = rt - k + 1;
                if self.repeat_count[last - p] < right_part_len {
                    self.repeat_count[last - k] = self.repeat_count[last - p].min(rep_limit);
                } else {
                    let mut i = rt + 1;
                    while i < last_n && rat(i) == rat(i - k) {
                        i += 1;
                    }
                    self.repeat_count[last - k] = (i - k).min(rep_limit);
                    lt = k;
                    rt = i - 1;
                }
            }
        }

        // Step 3: the longest repeat each next token would extend.
        self.max_token_repeat.clear();
        for i in 0..last_n - 1 {
            let repeat_len = self.repeat_count[i];
            if repeat_len >= self.allowed_length {
                let token = rat(last_n - 2 - i);
                let e = self.max_token_repeat.entry(token).or_insert(repeat_len);
                if *e < repeat_len {
                    *e = repeat_len;
                }
            }
        }

        // Step 4: penalties.
        let max_exponent = if self.base > 1.000_001 { (FLOAT_MAX_LOG / self.base.ln()) as usize } else { 0 };
        for (&token, &repeat_len) in &self.max_token_repeat {
            let Some(s) = scores.get_mut(token as usize) else { continue };
            if self.breakers.get(&token).is_some_and(|tails| tails.iter().any(Vec::is_empty)) {
                continue;
            }
            let mut exp = repeat_len - self.allowed_length;
            if max_exponent > 0 && exp > max_exponent {
                exp = max_exponent;
            }
            *s -= self.multiplier * self.base.powi(exp as i32);
        }
    }
}

/// Cut a string to at most `max` bytes, at a char boundary.
fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// llama.cpp's `get_overlapping_token_sequences`, over decoded token texts.
fn overlapping_token_sequences(
    vocab_texts: &[String],
    breaker: &[u8],
    tokenizer: &mut Option<GreedyTokenizer>,
    out: &mut HashMap<u32, Vec<Vec<u32>>>,
) {
    for (id, word) in vocab_texts.iter().enumerate() {
        let id = id as u32;
        let word = word.as_bytes();
        if contains(word, breaker) {
            out.entry(id).or_default().push(Vec::new());
            continue;
        }
        // A proper prefix of the breaker that ends the word.
        for pos in 0..word.len() {
            if word[pos] != breaker[0] {
                continue;
            }
            let mut i = 1;
            let mut matched = true;
            while i < breaker.len() && pos + i < word.len() {
                if word[pos + i] != breaker[i] {
                    matched = false;
                    break;
                }
                i += 1;
            }
            if !matched {
                continue;
            }
            let tokenizer = tokenizer.get_or_insert_with(|| GreedyTokenizer::new(vocab_texts));
            let Some(mut tail) = tokenizer.tokenize(&breaker[i..]) else { continue };
            tail.truncate(MAX_SEQ_LEN);
            let tails = out.entry(id).or_default();
            if !tails.contains(&tail) {
                tails.push(tail);
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Longest-match tokenization over the vocabulary texts (the lowest id wins among equal texts).
struct GreedyTokenizer {
    by_text: HashMap<Vec<u8>, u32>,
    max_len: usize,
}

impl GreedyTokenizer {
    fn new(vocab_texts: &[String]) -> Self {
        let mut by_text = HashMap::new();
        let mut max_len = 0;
        for (id, t) in vocab_texts.iter().enumerate() {
            if t.is_empty() {
                continue;
            }
            by_text.entry(t.as_bytes().to_vec()).or_insert(id as u32);
            max_len = max_len.max(t.len());
        }
        Self { by_text, max_len }
    }

    /// `None` when some part of `text` matches no vocabulary text.
    fn tokenize(&self, text: &[u8]) -> Option<Vec<u32>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let longest = (1..=self.max_len.min(text.len() - pos))
                .rev()
                .find_map(|l| self.by_text.get(&text[pos..pos + l]).map(|&id| (id, l)))?;
            out.push(longest.0);
            pos += longest.1;
        }
        Some(out)
    }
}
