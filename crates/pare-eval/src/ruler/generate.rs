//! The random draws of RULER's generators (`niah.py`, `variable_tracking.py`,
//! `common_words_extraction.py`, `freq_words_extraction.py`) and their fitting to a context
//! length. pare's RNG is not Python's, so the draws differ from RULER's for a given seed; their
//! distributions and everything built from them are RULER's.

use pare_formats::TokenizerBundle;
use pare_model::{ModelError, Result};
use rand::rngs::StdRng;
use rand::seq::{index, IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use super::render::{vt_input, CweList, Recipe, VtChain, NEEDLE};
use super::{split, Haystack, Item, NeedleKind, NiahConfig, Prompt, Task};

const NOUNS: &str = include_str!("../../data/wonderwords/nounlist.txt");
const ADJECTIVES: &str = include_str!("../../data/wonderwords/adjectivelist.txt");
const VERBS: &str = include_str!("../../data/wonderwords/verblist.txt");

fn word_list(text: &'static str) -> impl Iterator<Item = &'static str> {
    text.lines().map(str::trim_end).filter(|w| !w.is_empty())
}

/// What the fitting measures: the prompt's tokens in the model's chat template plus the tokens
/// to generate (RULER's `len(text_to_tokens(input)) + tokens_to_generate`).
struct Fitter<'a> {
    task: Task,
    tokenizer: &'a TokenizerBundle,
    haystack: &'a [String],
}

impl Fitter<'_> {
    fn item(&self, recipe: Recipe, index: usize) -> Result<Item> {
        let rendered = recipe.render(self.haystack);
        let (context, question, answer_prefix) = split(self.task, &rendered.text)?;
        let prompt = Prompt::new(self.tokenizer, &context, &question, &answer_prefix)?;
        Ok(Item {
            task: self.task.name().to_string(),
            index,
            context,
            question,
            answer_prefix,
            outputs: rendered.outputs,
            max_new_tokens: self.task.max_new_tokens(),
            prompt_tokens: prompt.len(),
            recipe,
        })
    }

    fn length(&self, item: &Item) -> usize {
        item.prompt_tokens + item.max_new_tokens
    }

    /// RULER's search: the largest size in [incremental, upper] whose draw fits, `upper` three
    /// (or, for cwe, two) times the estimate from a draw of `probe` units.
    fn search(
        &self,
        draw: &mut dyn FnMut(usize) -> Recipe,
        max_len: usize,
        incremental: usize,
        probe: usize,
        slack: usize,
    ) -> Result<usize> {
        let probe_tokens = self.item(draw(probe), 0)?.prompt_tokens.max(1);
        let per_unit = probe_tokens as f64 / probe as f64;
        let estimate = (max_len as f64 / per_unit) as usize * slack;
        let (mut lower, mut upper) = (incremental, estimate.max(incremental * 2));
        let mut best = None;
        while lower <= upper {
            let mid = (lower + upper) / 2;
            if self.length(&self.item(draw(mid), 0)?) <= max_len {
                best = Some(mid);
                lower = mid + 1;
            } else {
                upper = mid - 1;
            }
        }
        Ok(best.unwrap_or(incremental))
    }

    /// RULER's per-sample loop: draw at `size`, smaller by `incremental` while it does not fit.
    fn fit_sample(
        &self,
        draw: &mut dyn FnMut(usize) -> Recipe,
        mut size: usize,
        incremental: usize,
        max_len: usize,
        index: usize,
    ) -> Result<Item> {
        loop {
            let item = self.item(draw(size), index)?;
            if self.length(&item) <= max_len {
                return Ok(item);
            }
            if size <= incremental {
                return Err(ModelError::input(format!(
                    "{}: even the smallest haystack takes {} tokens, more than the context length of {max_len}",
                    self.task.name(),
                    self.length(&item)
                )));
            }
            size -= incremental;
        }
    }
}

/// `samples` items of `task` fitted to `max_seq_length` tokens (prompt plus answer).
pub fn generate(
    task: Task,
    tokenizer: &TokenizerBundle,
    haystack: &[String],
    max_seq_length: usize,
    samples: usize,
    seed: u64,
) -> Result<Vec<Item>> {
    let fitter = Fitter { task, tokenizer, haystack };
    // One stream per task, as RULER runs one process per task with `random.seed(seed)`.
    let mut rng = StdRng::seed_from_u64(seed ^ (task as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    match task {
        Task::Vt => vt(&fitter, &mut rng, max_seq_length, samples),
        Task::Cwe => cwe(&fitter, &mut rng, max_seq_length, samples, seed),
        Task::Fwe => fwe(&fitter, &mut rng, max_seq_length, samples, seed),
        _ => {
            let config = task.niah().expect("every other task is a niah task");
            if config.haystack == Haystack::Essay && haystack.iter().all(|w| w.is_empty()) {
                return Err(ModelError::input("the essay haystack is empty"));
            }
            let incremental = match config.haystack {
                Haystack::Essay => 500,
                _ if max_seq_length < 4096 => 5,
                _ => 25,
            };
            let mut draw = |n: usize| niah(&config, n, &mut rng, seed);
            let size = fitter.search(&mut draw, max_seq_length, incremental, incremental, 3)?;
            (0..samples).map(|i| fitter.fit_sample(&mut draw, size, incremental, max_seq_length, i)).collect()
        }
    }
}

fn random_value(kind: NeedleKind, rng: &mut StdRng) -> String {
    match kind {
        NeedleKind::Numbers => rng.random_range(1_000_000..=9_999_999u32).to_string(),
        NeedleKind::Words => {
            // RULER: a random entry of the sorted adjective-noun pairs.
            let adjs: Vec<&str> = word_list(ADJECTIVES).collect();
            let nouns: Vec<&str> = word_list(NOUNS).collect();
            format!("{}-{}", adjs.choose(rng).expect("words"), nouns.choose(rng).expect("words"))
        }
        NeedleKind::Uuids => {
            // uuid.UUID(int=getrandbits(128), version=4): version 4, RFC 4122 variant.
            let mut bits: u128 = rng.random();
            bits &= !(0xF000u128 << 64);
            bits |= 0x4000u128 << 64;
            bits &= !(0xC000u128 << 48);
            bits |= 0x8000u128 << 48;
            let h = format!("{bits:032x}");
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        }
    }
}

fn kind_name(kind: NeedleKind) -> &'static str {
    match kind {
        NeedleKind::Numbers => "numbers",
        NeedleKind::Words => "words",
        NeedleKind::Uuids => "uuids",
    }
}

/// RULER's DEPTHS: `np.round(np.linspace(0, 100, num=40))`.
fn depths() -> Vec<u32> {
    (0..40).map(|i| (100.0 * i as f64 / 39.0).round() as u32).collect()
}

fn niah(config: &NiahConfig, n: usize, rng: &mut StdRng, seed: u64) -> Recipe {
    let num_k = config.num_k.max(config.num_q);
    let type_v = kind_name(config.value);
    let needle = |key: &str, value: &str| {
        NEEDLE.replace("{type_needle_v}", type_v).replace("{key}", key).replace("{value}", value)
    };
    let (mut keys, mut values, mut needles) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..num_k {
        let key = random_value(config.key, rng);
        let mut vs = Vec::new();
        for _ in 0..config.num_v {
            let v = random_value(config.value, rng);
            needles.push(needle(&key, &v));
            vs.push(v);
        }
        keys.push(key);
        values.push(vs);
    }
    // RULER shuffles with `random.Random(seed)`: the same permutation for every item.
    needles.shuffle(&mut StdRng::seed_from_u64(seed));
    let (mut depths_drawn, mut indexes, mut distractors) = (Vec::new(), Vec::new(), Vec::new());
    match config.haystack {
        Haystack::Essay => {
            let all = depths();
            depths_drawn = index::sample(rng, all.len(), needles.len()).into_iter().map(|i| all[i]).collect();
        }
        Haystack::Noise | Haystack::Needle => {
            if config.haystack == Haystack::Needle {
                distractors = (0..n)
                    .map(|_| {
                        let k = random_value(config.key, rng);
                        needle(&k, &random_value(config.value, rng))
                    })
                    .collect();
            }
            indexes = index::sample(rng, n, needles.len().min(n)).into_vec();
            indexes.sort_unstable_by(|a, b| b.cmp(a));
        }
    }
    let asked = index::sample(rng, num_k, config.num_q).into_vec();
    Recipe::Niah {
        haystack: match config.haystack {
            Haystack::Essay => "essay",
            Haystack::Noise => "noise",
            Haystack::Needle => "needle",
        }
        .into(),
        num_haystack: n,
        type_needle_v: type_v.into(),
        needles,
        depths: depths_drawn,
        indexes,
        distractors,
        queries: asked.iter().map(|&i| keys[i].clone()).collect(),
        singular: config.num_q * config.num_v == 1,
        answers: asked.iter().flat_map(|&i| values[i].clone()).collect(),
    }
}

fn upper_name(rng: &mut StdRng, len: usize) -> String {
    (0..len).map(|_| rng.random_range(b'A'..=b'Z') as char).collect()
}

/// RULER's `generate_chains` for one chain of `hops` hops, then its positions in the noise.
fn vt_chain(rng: &mut StdRng, num_noises: usize, name_len: usize, hops: usize, value: String) -> VtChain {
    let mut vars: Vec<String> = (0..hops + 1).map(|_| upper_name(rng, name_len)).collect();
    while vars.iter().collect::<std::collections::HashSet<_>>().len() < hops + 1 {
        vars.push(upper_name(rng, name_len));
    }
    vars.truncate(hops + 1);
    let mut positions = index::sample(rng, num_noises, (hops + 1).min(num_noises)).into_vec();
    positions.sort_unstable();
    VtChain { num_noises, vars, value, positions }
}

const VT_HOPS: usize = 4;

fn vt(fitter: &Fitter, rng: &mut StdRng, max_len: usize, samples: usize) -> Result<Vec<Item>> {
    // The in-context example: RULER fits its own text (with the answer prefix, without the
    // answer) to 500 tokens.
    let example_tokens = |c: &VtChain| -> Result<usize> { Ok(fitter.tokenizer.encode(&vt_input(c), false)?.len()) };
    let probe = example_tokens(&vt_chain(rng, 5, 3, VT_HOPS, "12345".into()))?.max(1) as f64 / 5.0;
    let (mut lower, mut upper) = (5usize, ((500.0 / probe) as usize * 3).max(10));
    let mut example_size = 5;
    while lower <= upper {
        let mid = (lower + upper) / 2;
        if example_tokens(&vt_chain(rng, mid, 3, VT_HOPS, "12345".into()))? <= 500 {
            example_size = mid;
            lower = mid + 1;
        } else {
            upper = mid - 1;
        }
    }
    let example = vt_chain(rng, example_size, 3, VT_HOPS, "12345".into());
    let incremental = if max_len < 4096 { 5 } else { 10 };
    let mut draw = |n: usize| {
        let value = rng.random_range(10000..99999u32).to_string();
        let main = vt_chain(rng, n, 5, VT_HOPS, value);
        Recipe::Vt {
            example: example.clone(),
            example_vars: example.vars.iter().map(|v| upper_name(rng, v.len())).collect(),
            example_value: rng.random_range(10000..99999u32).to_string(),
            main,
        }
    };
    let size = fitter.search(&mut draw, max_len, incremental, incremental, 3)?;
    (0..samples).map(|i| fitter.fit_sample(&mut draw, size, incremental, max_len, i)).collect()
}

const CWE_COMMON: usize = 10;

fn cwe(fitter: &Fitter, rng: &mut StdRng, max_len: usize, samples: usize, seed: u64) -> Result<Vec<Item>> {
    let mut words: Vec<&str> = word_list(NOUNS).chain(word_list(ADJECTIVES)).chain(word_list(VERBS)).collect();
    words.sort_unstable();
    words.dedup();
    // RULER's shapes: (words, common repeats, uncommon repeats) of the example and the question.
    let (example_shape, main_repeats) = if max_len < 4096 { ((20, 3, 1), (6, 1)) } else { ((40, 10, 3), (30, 3)) };
    let list = |rng: &mut StdRng, n: usize, common_repeats: usize, uncommon_repeats: usize| -> CweList {
        let picked: Vec<String> =
            index::sample(rng, words.len(), n).into_iter().map(|i| words[i].to_string()).collect();
        let total = CWE_COMMON.min(n) * common_repeats + n.saturating_sub(CWE_COMMON) * uncommon_repeats;
        let mut order: Vec<usize> = (0..total).collect();
        // RULER shuffles with `random.Random(seed)`: the same permutation for a given length.
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        CweList { words: picked, num_common: CWE_COMMON.min(n), common_repeats, uncommon_repeats, order }
    };
    let largest = words.len();
    let mut draw = |n: usize| {
        let (en, ec, eu) = example_shape;
        let example = list(rng, en, ec, eu);
        Recipe::Cwe { lists: vec![example, list(rng, n.min(largest), main_repeats.0, main_repeats.1)] }
    };
    let size = fitter.search(&mut draw, max_len, 10, 4096.min(largest), 2)?;
    if size >= largest {
        return Err(ModelError::input(format!(
            "cwe at {max_len} tokens needs more than the {largest} words of the word lists"
        )));
    }
    (0..samples).map(|i| fitter.fit_sample(&mut draw, size, 10, max_len, i)).collect()
}

const FWE_ALPHA: f64 = 2.0;
const FWE_WORD_LEN: usize = 6;

fn fwe(fitter: &Fitter, rng: &mut StdRng, max_seq_length: usize, samples: usize, seed: u64) -> Result<Vec<Item>> {
    let answer = Task::Fwe.max_new_tokens();
    let max_len = max_seq_length.saturating_sub(answer);
    let vocab_size = max_len / 50;
    if vocab_size < 4 {
        return Err(ModelError::input(format!("fwe needs a context length of at least {} tokens", 4 * 50 + answer)));
    }
    let incremental = (max_len / 32).max(1);
    let mut draw = |num_words: usize| {
        let mut vocab: Vec<String> = (0..vocab_size)
            .map(|_| (0..FWE_WORD_LEN).map(|_| rng.random_range(b'a'..=b'z') as char).collect())
            .collect();
        vocab.sort_unstable();
        vocab.dedup();
        while vocab.len() < vocab_size {
            vocab.push((0..FWE_WORD_LEN).map(|_| rng.random_range(b'a'..=b'z') as char).collect());
            vocab.sort_unstable();
            vocab.dedup();
        }
        vocab.shuffle(&mut StdRng::seed_from_u64(seed));
        vocab[0] = "...".into();
        let total = super::render::fwe_sampled(&vocab, num_words, FWE_ALPHA).len();
        let mut order: Vec<usize> = (0..total).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        Recipe::Fwe { vocab, num_words, alpha: FWE_ALPHA, order }
    };
    // RULER counts the text alone against max_len here (the answer budget is already off it).
    let tokens = |fitter: &Fitter, r: Recipe| -> Result<usize> { Ok(fitter.item(r, 0)?.prompt_tokens) };
    let mut num_words = max_len / FWE_WORD_LEN;
    while tokens(fitter, draw(num_words))? < max_len {
        num_words += incremental;
    }
    num_words -= incremental;
    let mut items = Vec::with_capacity(samples);
    for i in 0..samples {
        let mut n = num_words;
        let item = loop {
            let item = fitter.item(draw(n), i)?;
            if item.prompt_tokens <= max_len || n <= incremental {
                break item;
            }
            n -= incremental;
        };
        items.push(item);
    }
    Ok(items)
}
