//! From a recipe (every random draw of one RULER item) to the item's text, as RULER's
//! `scripts/data/synthetic/*.py` builds it. No randomness here: the recipe holds the draws, so a
//! Python reference can rebuild the same text from the same recipe with RULER's own code.

use serde::{Deserialize, Serialize};

/// RULER's task templates (`scripts/data/synthetic/constants.py`): the question template and the
/// answer prefix, joined as `prepare.py` joins them for the `base` model template.
pub(super) const NIAH_TEMPLATE: &str = "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text? The special magic {type_needle_v} for {query} mentioned in the provided text are";
pub(super) const VT_TEMPLATE: &str = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above. Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ";
pub(super) const CWE_TEMPLATE: &str = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that appear most often in the list are:";
pub(super) const FWE_TEMPLATE: &str = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text? Answer: According to the coded text above, the three most frequently appeared words are:";

/// RULER's needle sentence (`niah.py`).
pub(super) const NEEDLE: &str = "One of the special magic {type_needle_v} for {key} is: {value}.";
/// RULER's noise haystack (`niah.py`, `variable_tracking.py`).
pub(super) const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// Every random draw of one item, by task family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Recipe {
    Niah {
        /// `essay`, `noise` or `needle`.
        haystack: String,
        /// Haystack words (essay) or sentences (noise, needle).
        num_haystack: usize,
        /// `numbers`, `words` or `uuids` (plural, as RULER names them).
        type_needle_v: String,
        /// The needle sentences, in the order they are inserted.
        needles: Vec<String>,
        /// Essay: depths in percent, one per needle (RULER's `random.sample(DEPTHS, n)`).
        depths: Vec<u32>,
        /// Noise / needle: insertion indexes, one per needle (RULER's sample, sorted descending).
        indexes: Vec<usize>,
        /// Needle haystack: its distractor sentences.
        distractors: Vec<String>,
        /// The keys asked for.
        queries: Vec<String>,
        /// One value asked for in all (RULER then words the question in the singular).
        singular: bool,
        /// The values of the asked keys, key by key (RULER's `outputs`).
        answers: Vec<String>,
    },
    Vt {
        /// The in-context example (3-letter names, value 12345, before `randomize_icl`).
        example: VtChain,
        /// `randomize_icl`'s replacements: new names (same order as `example.vars`) and value.
        example_vars: Vec<String>,
        example_value: String,
        main: VtChain,
    },
    Cwe {
        /// Few-shot examples, then the question's list.
        lists: Vec<CweList>,
    },
    Fwe {
        /// RULER's coded vocabulary after its shuffle, `...` first.
        vocab: Vec<String>,
        num_words: usize,
        alpha: f64,
        /// The order of the sampled words: position i holds sampled word `order[i]`.
        order: Vec<usize>,
    },
}

/// One variable chain in a noise haystack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VtChain {
    pub num_noises: usize,
    /// hops + 1 names, the first assigned the value.
    pub vars: Vec<String>,
    pub value: String,
    /// RULER's `sorted(random.sample(range(num_noises), len(chain)))`.
    pub positions: Vec<usize>,
}

/// One numbered word list: `words` (common first) repeated, then put in `order`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CweList {
    pub words: Vec<String>,
    pub num_common: usize,
    pub common_repeats: usize,
    pub uncommon_repeats: usize,
    /// Position i of the list holds repeated word `order[i]`.
    pub order: Vec<usize>,
}

/// RULER's `input` plus the answer prefix (the `base` model template), and the answers.
pub struct Rendered {
    pub text: String,
    pub outputs: Vec<String>,
}

/// Python's `str.format` for the named fields RULER's templates use (none of them escapes braces).
fn format(template: &str, fields: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map(|c| open + c).unwrap_or(rest.len() - 1);
        let name = &rest[open + 1..close];
        match fields.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => out.push_str(v),
            None => out.push_str(&rest[open..=close]),
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// RULER's haystack words: `re.sub(r'\s+', " ", essay).split(" ")`.
pub fn haystack_words(essay: &str) -> Vec<String> {
    let mut normalized = String::with_capacity(essay.len());
    let mut in_space = false;
    for c in essay.chars() {
        if c.is_whitespace() {
            if !in_space {
                normalized.push(' ');
            }
            in_space = true;
        } else {
            normalized.push(c);
            in_space = false;
        }
    }
    normalized.split(' ').map(str::to_string).collect()
}

/// The first `n` haystack words joined, the haystack repeated when it is shorter (RULER's rule).
fn essay_text(words: &[String], n: usize) -> String {
    words.iter().cycle().take(n).map(String::as_str).collect::<Vec<_>>().join(" ")
}

/// Sentences as NLTK's Punkt splits plain text without a trained model: after a token ending in
/// `.`, `?` or `!` (closing quotes and brackets may follow), except after an ellipsis, and not
/// after an initial (`A.`) or a number when the next token says it is no sentence start.
pub fn sentences(text: &str) -> Vec<String> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..tokens.len() {
        let next = tokens.get(i + 1);
        if next.is_none() || ends_sentence(tokens[i], next.copied()) {
            out.push(tokens[start..=i].join(" "));
            start = i + 1;
        }
    }
    out
}

fn ends_sentence(token: &str, next: Option<&str>) -> bool {
    let core =
        token.trim_end_matches(['"', '\'', ')', ']', '}', ';', '*', ':', '@', '(', '{', '[', '\u{2019}', '\u{201d}']);
    if !core.ends_with(['.', '?', '!']) {
        return false;
    }
    if core.ends_with("..") {
        return false;
    }
    let next_first = next.and_then(|n| n.chars().next());
    let initial = {
        let mut c = core.chars();
        matches!((c.next(), c.next(), c.next()), (Some(a), Some('.'), None) if a.is_alphabetic())
    };
    let number = core.trim_end_matches('.').chars().all(|c| c.is_ascii_digit() || c == ',' || c == '.' || c == '-')
        && core.chars().any(|c| c.is_ascii_digit());
    let lower_next = next_first.is_some_and(char::is_lowercase);
    let upper_next = next_first.is_some_and(char::is_uppercase);
    if (initial || number) && lower_next {
        return false;
    }
    !(initial && upper_next)
}

impl Recipe {
    /// The item's full text and answers; `haystack` is RULER's word list (essay haystacks only).
    pub fn render(&self, haystack: &[String]) -> Rendered {
        match self {
            Recipe::Niah {
                haystack: kind,
                num_haystack,
                type_needle_v,
                needles,
                depths,
                indexes,
                distractors,
                queries,
                singular,
                answers,
            } => {
                let context = if kind == "essay" {
                    let sents = sentences(&essay_text(haystack, *num_haystack));
                    let mut cuts: Vec<usize> =
                        depths.iter().map(|&d| (sents.len() as f64 * (d as f64 / 100.0)) as usize).collect();
                    cuts.sort_unstable();
                    let mut bounds = vec![0];
                    bounds.extend(cuts);
                    bounds.push(sents.len());
                    let mut parts = Vec::new();
                    for i in 1..bounds.len() {
                        parts.push(sents[bounds[i - 1]..bounds[i]].join(" "));
                        if let Some(n) = needles.get(i - 1) {
                            parts.push(n.clone());
                        }
                    }
                    parts.join(" ")
                } else {
                    let mut lines: Vec<String> =
                        if kind == "noise" { vec![NOISE.to_string(); *num_haystack] } else { distractors.clone() };
                    for (&index, needle) in indexes.iter().zip(needles) {
                        lines.insert(index, needle.clone());
                    }
                    lines.join("\n")
                };
                let query = match queries.as_slice() {
                    [one] => one.clone(),
                    [head @ .., last] => format!("{}, and {last}", head.join(", ")),
                    [] => String::new(),
                };
                let mut template = NIAH_TEMPLATE.to_string();
                let mut kind_v = type_needle_v.clone();
                if *singular {
                    // RULER's own replacements, in its order, over the whole template.
                    for (from, to) in [("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")] {
                        template = template.replace(from, to);
                    }
                    kind_v.pop();
                }
                let text = format(&template, &[("type_needle_v", &kind_v), ("context", &context), ("query", &query)]);
                Rendered { text, outputs: answers.clone() }
            }
            Recipe::Vt { example, example_vars, example_value, main } => {
                let example_text = format!("{} {}\n", vt_input(example), example.vars.join(" "));
                // randomize_icl: each old name (and the value 12345) replaced throughout.
                let mut randomized = example_text;
                for (old, new) in example.vars.iter().zip(example_vars) {
                    randomized = randomized.replace(old.as_str(), new);
                }
                randomized = randomized.replace(&example.value, example_value);
                Rendered { text: format!("{randomized}\n{}", vt_input(main)), outputs: main.vars.clone() }
            }
            Recipe::Cwe { lists } => {
                let numbered = |words: &[&str]| {
                    words.iter().enumerate().map(|(i, w)| format!("{}. {w}", i + 1)).collect::<Vec<_>>().join(" ")
                };
                let mut parts = Vec::new();
                let (mut last_text, mut last_answer) = (String::new(), Vec::new());
                for (i, list) in lists.iter().enumerate() {
                    let context = numbered(&list.arranged());
                    let text = format(CWE_TEMPLATE, &[("context", &context), ("query", "")]);
                    let common: Vec<&str> = list.words[..list.num_common].iter().map(String::as_str).collect();
                    if i + 1 < lists.len() {
                        parts.push(format!("{text} {}", numbered(&common)));
                    } else {
                        last_text = text;
                        last_answer = common.iter().map(|s| s.to_string()).collect();
                    }
                }
                Rendered { text: format!("{}\n{last_text}", parts.join("\n")), outputs: last_answer }
            }
            Recipe::Fwe { vocab, num_words, alpha, order } => {
                let sampled = fwe_sampled(vocab, *num_words, *alpha);
                let words: Vec<&str> = order.iter().map(|&i| sampled[i]).collect();
                let text = format(FWE_TEMPLATE, &[("context", &words.join(" ")), ("query", "")]);
                Rendered { text, outputs: vocab[1..4].to_vec() }
            }
        }
    }
}

/// The word list before its shuffle: word k of the vocabulary ⌊n·k^−α/ζ(α)⌋ times.
pub(super) fn fwe_sampled(vocab: &[String], num_words: usize, alpha: f64) -> Vec<&str> {
    let z = zeta(alpha);
    let mut out = Vec::new();
    for (k, w) in vocab.iter().enumerate() {
        let count = (num_words as f64 * ((k + 1) as f64).powf(-alpha) / z) as usize;
        out.extend(std::iter::repeat_n(w.as_str(), count));
    }
    out
}

/// Riemann ζ(s) for s > 1 (scipy's `zeta(alpha)` in RULER): the sum to N plus its Euler–Maclaurin tail.
fn zeta(s: f64) -> f64 {
    const N: usize = 1000;
    let head: f64 = (1..N).map(|k| (k as f64).powf(-s)).sum();
    let n = N as f64;
    head + n.powf(1.0 - s) / (s - 1.0) + 0.5 * n.powf(-s) + s * n.powf(-s - 1.0) / 12.0
}

/// One variable-tracking prompt: the chain in the noise haystack, RULER's template filled.
pub(super) fn vt_input(chain: &VtChain) -> String {
    let mut lines = vec![NOISE.to_string(); chain.num_noises];
    let statements = chain_statements(chain);
    for (j, (&p, s)) in chain.positions.iter().zip(&statements).enumerate() {
        lines.insert(p + j, s.clone());
    }
    let context = lines.join("\n").replace(". \n", ".\n");
    let num_v = chain.vars.len().to_string();
    format(VT_TEMPLATE, &[("context", &context), ("query", &chain.value), ("num_v", &num_v)])
}

/// `VAR A = 12345`, then `VAR B = VAR A ` (RULER's trailing space kept).
fn chain_statements(chain: &VtChain) -> Vec<String> {
    let mut out = vec![format!("VAR {} = {}", chain.vars[0], chain.value)];
    for w in chain.vars.windows(2) {
        out.push(format!("VAR {} = VAR {} ", w[1], w[0]));
    }
    out
}

impl CweList {
    /// The repeated words in their shuffled order.
    fn arranged(&self) -> Vec<&str> {
        // Python's `common * r + uncommon * r'`: each list repeated whole, r times.
        let repeated: Vec<&str> = self.words[..self.num_common]
            .iter()
            .map(String::as_str)
            .cycle()
            .take(self.num_common * self.common_repeats)
            .chain(
                self.words[self.num_common..]
                    .iter()
                    .map(String::as_str)
                    .cycle()
                    .take((self.words.len() - self.num_common) * self.uncommon_repeats),
            )
            .collect();
        self.order.iter().map(|&i| repeated[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_format_fills_named_fields() {
        assert_eq!(format("a {x} b {y} {z}", &[("x", "1"), ("y", "{y}")]), "a 1 b {y} {z}");
    }

    #[test]
    fn punkt_like_sentences() {
        let s = sentences("He left. then came. A b. C d. Home... Then. It is 3. Then \"go.\" Next");
        // NLTK 3.10 `PunktSentenceTokenizer().tokenize` on the same text.
        assert_eq!(s, ["He left.", "then came.", "A b. C d. Home... Then.", "It is 3.", "Then \"go.\"", "Next"]);
    }

    #[test]
    fn zeta_of_two_is_pi_squared_over_six() {
        assert!((zeta(2.0) - std::f64::consts::PI.powi(2) / 6.0).abs() < 1e-12);
    }
}
