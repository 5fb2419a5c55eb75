//! Beam search, token-identical to HF transformers' `generate(num_beams=…, do_sample=False)`
//! (transformers 5.x `_beam_search`).
//!
//! One prompt at a time: its `num_beams` beams are the batch rows of one KV cache. The prompt is
//! prefilled once (batch 1); after every step the cache rows are reordered (and at the first step
//! duplicated) with [`KvCache::select_rows`](pare_model::KvCache::select_rows), never re-prefilled.
//!
//! What HF does, step by step, and this module repeats (all scores f32, as HF's):
//!
//! 1. Each beam's logits → `log_softmax` → the logits processors (here the `process` closure) →
//!    plus the beam's running score (the f32 sum of its processed log-probs). The running scores
//!    start at 0 for beam 0 and -1e9 for the others, so the first step draws from beam 0 only.
//! 2. The top `K = max(2, 1 + #eos) · num_beams` of the `num_beams · vocab` candidates.
//! 3. A candidate "hits a stopping criterion" when its token is an EOS id or the sequence reaches
//!    `max_new_tokens`. The next running beams are the top `num_beams` candidates after adding
//!    -1e9 to those that hit one.
//! 4. Finished hypotheses: only candidates among the first `num_beams` of the K that hit a
//!    criterion may enter. Their score is `sum_logprobs / generated_len ** length_penalty`, where
//!    `generated_len` counts the generated tokens *including* the new one (EOS counted; the prompt
//!    not). They merge with the `num_beams` finished slots kept so far (initially empty, at -1e9),
//!    keeping the best `num_beams`. Nothing enters (score -1e9) once every slot is finished with
//!    `early_stopping = true`, or once the early-stop heuristic said no improvement is possible.
//! 5. The heuristic (sticky): improvement is still possible while the best running score divided
//!    by `L ** length_penalty` beats the worst finished score (or some slot is still empty), with
//!    `L = max_new_tokens` for `early_stopping = "never"` and a positive length penalty, and the
//!    current generated length otherwise.
//! 6. Stop when no improvement is possible, or when every slot is finished and `early_stopping =
//!    true`, or when every candidate hit a criterion (`max_new_tokens` reached).
//!
//! The result is the best `num_return_sequences` finished slots; their scores are HF's
//! `sequences_scores`. `torch.topk` promises no order for equal values; here the lower index (flat
//! `beam · vocab + token`, or candidate order) goes first. Exact ties of real scores are rare; the
//! -1e9-penalized entries that do tie never reach the returned hypotheses.
//!
//! Log-softmax sums `exp` in f64: a sequential f32 sum over a 49k vocabulary is biased by ~1e-4
//! per token against torch's vectorized one, which adds up in the unnormalized scores.

use candle_core::DType;
use pare_model::{Hooks, Model, ModelError, PrefillInput, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// HF's `early_stopping`: `true`, `false` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// Stop as soon as `num_beams` hypotheses are finished.
    True,
    /// Stop when the heuristic says the best running beam (at its current length) cannot beat the
    /// worst finished hypothesis (HF's default).
    #[default]
    False,
    /// Like `False`, but with a positive length penalty the best running beam is judged at
    /// `max_new_tokens` (canonical beam search with `length_penalty = 0`).
    Never,
}

impl Serialize for EarlyStopping {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            EarlyStopping::True => s.serialize_bool(true),
            EarlyStopping::False => s.serialize_bool(false),
            EarlyStopping::Never => s.serialize_str("never"),
        }
    }
}

impl<'de> Deserialize<'de> for EarlyStopping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(EarlyStopping::True),
            Raw::Bool(false) => Ok(EarlyStopping::False),
            Raw::Str(s) if s == "never" => Ok(EarlyStopping::Never),
            Raw::Str(s) => {
                Err(serde::de::Error::custom(format!("early_stopping must be true, false or \"never\", not {s:?}")))
            }
        }
    }
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;

    /// The flag form: `true`, `false` or `never`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "true" | "True" => Ok(EarlyStopping::True),
            "false" | "False" => Ok(EarlyStopping::False),
            "never" => Ok(EarlyStopping::Never),
            _ => Err("expected true, false or never".into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeamConfig {
    pub num_beams: usize,
    /// Finished scores are divided by `generated_len ** length_penalty` (> 0 favours longer).
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// How many hypotheses to return, best first (at most `num_beams`).
    pub num_return_sequences: usize,
    pub max_new_tokens: usize,
    /// A beam finishes when it produces one of these. Empty: beams only end at `max_new_tokens`.
    pub eos_token_ids: Vec<u32>,
}

impl BeamConfig {
    /// HF's defaults for everything but the beam count: length_penalty 1, early_stopping false,
    /// one returned sequence.
    pub fn new(num_beams: usize, max_new_tokens: usize, eos_token_ids: Vec<u32>) -> Self {
        BeamConfig {
            num_beams,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            max_new_tokens,
            eos_token_ids,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BeamHypothesis {
    /// The generated tokens only; the EOS is included when the hypothesis ended with it.
    pub tokens: Vec<u32>,
    /// HF's `sequences_scores`: the sum of `token_logprobs` / `tokens.len() ** length_penalty`.
    pub score: f32,
    /// The processed log-probability of each chosen token at its step (HF's
    /// `compute_transition_scores(..., normalize_logits=False)`).
    pub token_logprobs: Vec<f32>,
    pub finished_by_eos: bool,
}

/// Processing of one beam's scores: `(beam, input_ids = prompt + generated, prompt_len, scores)`,
/// where `scores` are the log-softmaxed logits over the vocabulary, rewritten in place.
pub type BeamProcess<'a> = dyn FnMut(usize, &[u32], usize, &mut [f32]) + 'a;

/// HF's "minus infinity" for scores that must not be chosen.
const NEG: f32 = -1.0e9;

#[derive(Debug, Clone)]
struct Beam {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// Running: the f32 sum of `logprobs` (-1e9 for the initial copies). Finished: the normalized
    /// score with HF's -1e9 penalties.
    score: f32,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// The beam (cache row) it extends.
    beam: usize,
    token: u32,
    logprob: f32,
    /// Running score of the beam + logprob.
    score: f32,
}

/// Beam search for one prompt; returns `cfg.num_return_sequences` hypotheses, best first.
///
/// `process` is called once per beam and step with the beam's whole sequence (see
/// [`BeamProcess`]); pass `&mut |_, _, _, _| {}` for plain beam search.
pub fn beam_search(
    model: &Model,
    prompt: &[u32],
    cfg: &BeamConfig,
    process: &mut BeamProcess,
) -> Result<Vec<BeamHypothesis>> {
    beam_search_with(model, prompt, cfg, Hooks::default(), process)
}

/// [`beam_search`] with hooks: a cache compressed by the press (every beam row carries its own
/// budget, and reordering beams reorders the press's per-row state with the cache), after a
/// prefill whose prompt tokens the pruner may prune.
pub fn beam_search_with(
    model: &Model,
    prompt: &[u32],
    cfg: &BeamConfig,
    mut hooks: Hooks,
    process: &mut BeamProcess,
) -> Result<Vec<BeamHypothesis>> {
    let nb = cfg.num_beams;
    if nb == 0 {
        return Err(ModelError::input("beam search needs num_beams >= 1"));
    }
    if cfg.num_return_sequences == 0 || cfg.num_return_sequences > nb {
        return Err(ModelError::input(format!(
            "num_return_sequences must be between 1 and num_beams ({nb}), not {}",
            cfg.num_return_sequences
        )));
    }
    if cfg.max_new_tokens == 0 {
        return Err(ModelError::input("beam search needs max_new_tokens >= 1"));
    }
    if prompt.is_empty() {
        return Err(ModelError::input("beam search needs a prompt of at least one token"));
    }
    let lp = cfg.length_penalty as f64;
    let keep = 2.max(1 + cfg.eos_token_ids.len()) * nb;

    let (mut logits, mut cache) = model.prefill(PrefillInput::Tokens(&[prompt.to_vec()]), &mut hooks)?;
    let mut running: Vec<Beam> = (0..nb)
        .map(|i| Beam { tokens: Vec::new(), logprobs: Vec::new(), score: if i == 0 { 0.0 } else { NEG } })
        .collect();
    let mut finished: Vec<(Beam, bool)> =
        (0..nb).map(|_| (Beam { tokens: Vec::new(), logprobs: Vec::new(), score: NEG }, false)).collect();
    let mut improvement_possible = true;
    let mut input_ids = Vec::with_capacity(prompt.len() + cfg.max_new_tokens);
    let mut gen_len = 0usize;

    loop {
        // a. Log-probs of every beam, processed.
        pare_model::finite::check_logits(model, &logits, prompt)?;
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut scores: Vec<Vec<f32>> = Vec::with_capacity(nb);
        for (b, beam) in running.iter().enumerate() {
            // Right after the prefill the cache has one row, which every beam shares.
            let row = if rows.len() == 1 { &rows[0] } else { &rows[b] };
            let mut s = log_softmax(row);
            input_ids.clear();
            input_ids.extend_from_slice(prompt);
            input_ids.extend_from_slice(&beam.tokens);
            process(b, &input_ids, prompt.len(), &mut s);
            scores.push(s);
        }

        // b. The top `keep` continuations over all beams.
        let candidates = top_candidates(&scores, &running, keep);
        let hits: Vec<bool> = candidates
            .iter()
            .map(|c| cfg.eos_token_ids.contains(&c.token) || gen_len + 1 >= cfg.max_new_tokens)
            .collect();

        // c. The next running beams: the best candidates that hit no stopping criterion.
        let running_scores: Vec<f32> =
            candidates.iter().zip(&hits).map(|(c, &h)| c.score + if h { NEG } else { 0.0 }).collect();
        let next_running: Vec<usize> = top_indices(&running_scores, nb);

        // d. Finished hypotheses: the top `nb` candidates that hit a criterion may enter.
        let denom = ((gen_len + 1) as f64).powf(lp) as f32;
        let full = cfg.early_stopping == EarlyStopping::True && finished.iter().all(|f| f.1);
        // The kept slots first, then the candidates, as HF concatenates them.
        let mut merged_scores: Vec<f32> = finished.iter().map(|f| f.0.score).collect();
        let mut new_finished = Vec::with_capacity(candidates.len());
        for (i, (c, &hit)) in candidates.iter().zip(&hits).enumerate() {
            let entered = hit && i < nb;
            let mut s = c.score / denom;
            s += if full { NEG } else { 0.0 };
            s += if improvement_possible { 0.0 } else { NEG };
            s += if entered { 0.0 } else { NEG };
            new_finished.push(entered);
            merged_scores.push(s);
        }
        let chosen = top_indices(&merged_scores, nb);
        finished = chosen
            .iter()
            .map(|&m| {
                if m < nb {
                    finished[m].clone()
                } else {
                    let i = m - nb;
                    let mut b = extend(&running[candidates[i].beam], &candidates[i]);
                    b.score = merged_scores[m];
                    (b, new_finished[i])
                }
            })
            .collect();

        // e. Reorder the cache rows to the new running beams (duplicating the prefill row at first).
        let rows_for_cache: Vec<usize> =
            next_running.iter().map(|&i| if cache.batch() == 1 { 0 } else { candidates[i].beam }).collect();
        let new_running: Vec<Beam> = next_running
            .iter()
            .map(|&i| {
                let mut b = extend(&running[candidates[i].beam], &candidates[i]);
                b.score = running_scores[i];
                b
            })
            .collect();
        running = new_running;
        gen_len += 1;

        // f. Stop?
        if improvement_possible {
            let hyp_len =
                if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 { cfg.max_new_tokens } else { gen_len };
            let best_possible = running[0].score / (hyp_len as f64).powf(lp) as f32;
            let min_finished = finished.iter().map(|f| f.0.score).fold(f32::INFINITY, f32::min);
            improvement_possible = finished.iter().any(|f| best_possible > if f.1 { min_finished } else { NEG });
        }
        let all_full = cfg.early_stopping == EarlyStopping::True && finished.iter().all(|f| f.1);
        let any_continuation = !hits.iter().all(|&h| h);
        if !(improvement_possible && !all_full && any_continuation) {
            break;
        }
        cache.select_rows(&rows_for_cache)?;
        hooks.select_rows(&rows_for_cache)?;
        let next: Vec<u32> = running.iter().map(|b| *b.tokens.last().expect("a running beam has a token")).collect();
        logits = model.decode(&mut [(&mut cache, &mut hooks)], &next)?;
    }

    Ok(finished
        .into_iter()
        .take(cfg.num_return_sequences)
        .map(|(b, _)| BeamHypothesis {
            finished_by_eos: b.tokens.last().is_some_and(|t| cfg.eos_token_ids.contains(t)),
            tokens: b.tokens,
            score: b.score,
            token_logprobs: b.logprobs,
        })
        .collect())
}

fn extend(beam: &Beam, c: &Candidate) -> Beam {
    let mut tokens = Vec::with_capacity(beam.tokens.len() + 1);
    tokens.extend_from_slice(&beam.tokens);
    tokens.push(c.token);
    let mut logprobs = Vec::with_capacity(beam.logprobs.len() + 1);
    logprobs.extend_from_slice(&beam.logprobs);
    logprobs.push(c.logprob);
    Beam { tokens, logprobs, score: c.score }
}

/// log_softmax as torch computes it on CPU: x - max - log(sum(exp(x - max))).
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return row.to_vec();
    }
    let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
    let log_sum = sum.ln() as f32;
    row.iter().map(|&x| x - max - log_sum).collect()
}

/// Does `a` rank before `b` in a descending top-k: larger first, NaN largest (as torch.topk),
/// the lower index first on equal values.
fn before(a: (f32, usize), b: (f32, usize)) -> bool {
    match (a.0.is_nan(), b.0.is_nan()) {
        (true, false) => true,
        (false, true) => false,
        (true, true) => a.1 < b.1,
        _ => a.0 > b.0 || (a.0 == b.0 && a.1 < b.1),
    }
}

/// Indices of the `k` largest values, best first.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| {
        if before((values[a], a), (values[b], b)) {
            std::cmp::Ordering::Less
        } else if a == b {
            std::cmp::Ordering::Equal
        } else {
            std::cmp::Ordering::Greater
        }
    });
    idx.truncate(k);
    idx
}

/// The `k` best (beam, token) continuations over all beams by running score + logprob, best
/// first; on equal scores the lower flat index `beam · vocab + token` first.
fn top_candidates(scores: &[Vec<f32>], running: &[Beam], k: usize) -> Vec<Candidate> {
    let vocab = scores.first().map_or(0, Vec::len);
    // A small sorted buffer: k is 2–3 × num_beams, the input num_beams × vocab.
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (b, row) in scores.iter().enumerate() {
        let base = running[b].score;
        for (t, &lp) in row.iter().enumerate() {
            let item = (lp + base, b * vocab + t);
            if best.len() == k && !before(item, best[k - 1]) {
                continue;
            }
            let pos = best.partition_point(|&e| before(e, item));
            best.insert(pos, item);
            best.truncate(k);
        }
    }
    best.into_iter()
        .map(|(score, flat)| {
            let (beam, token) = (flat / vocab, flat % vocab);
            Candidate { beam, token: token as u32, logprob: scores[beam][token], score }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_serde() {
        for (v, json) in
            [(EarlyStopping::True, "true"), (EarlyStopping::False, "false"), (EarlyStopping::Never, "\"never\"")]
        {
            assert_eq!(serde_json::to_string(&v).unwrap(), json);
            assert_eq!(serde_json::from_str::<EarlyStopping>(json).unwrap(), v);
        }
        assert!(serde_json::from_str::<EarlyStopping>("\"always\"").is_err());
    }

    #[test]
    fn topk_order() {
        assert_eq!(top_indices(&[1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0], 4), vec![1, 2, 4, 0]);
        let running = vec![
            Beam { tokens: vec![], logprobs: vec![], score: 0.0 },
            Beam { tokens: vec![], logprobs: vec![], score: NEG },
        ];
        let c = top_candidates(&[vec![-1.0, -0.5, -2.0], vec![-0.1, -0.2, -0.3]], &running, 4);
        let got: Vec<(usize, u32)> = c.iter().map(|c| (c.beam, c.token)).collect();
        assert_eq!(got, vec![(0, 1), (0, 0), (0, 2), (1, 0)]);
    }
}
