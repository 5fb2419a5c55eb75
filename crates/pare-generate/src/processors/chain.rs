//! [`ProcessorConfig`] (every logits-processing option, validated) and [`ProcessorChain`] (the
//! processors it turns on, in order).
//!
//! Order — HF transformers' `GenerationMixin._get_logits_processor` for the HF processors, pare's
//! additions slotted in where they belong. Steps 1–8 always run (greedy, sampling and beam search
//! alike); steps 9–17 are warpers and run only when `do_sample` is true (as HF):
//!
//! 1. `logit_bias` — HF `SequenceBiasLogitsProcessor` (`sequence_bias`), single-token biases.
//! 2. `repetition_penalty` — HF `RepetitionPenaltyLogitsProcessor`, unless the penalty is 1.
//! 3. `presence_frequency` — OpenAI/vLLM presence & frequency penalties (not in HF), unless both 0.
//! 4. `dry` — llama.cpp's DRY (not in HF), unless its multiplier or `penalty_last_n` is 0.
//! 5. `no_repeat_ngram` — HF `NoRepeatNGramLogitsProcessor`, unless the size is 0.
//! 6. `bad_words` — HF `NoBadWordsLogitsProcessor`.
//! 7. `min_new_tokens` — HF `MinNewTokensLengthLogitsProcessor`, when there is an EOS id.
//! 8. `suppress_tokens` — HF `SuppressTokensLogitsProcessor`.
//! 9. `temperature` — HF `TemperatureLogitsWarper`, unless 1 (0 = greedy, see `temperature.rs`).
//! 10. `top_k` — HF `TopKLogitsWarper`, unless 0.
//! 11. `top_p` — HF `TopPLogitsWarper`, unless 1.
//! 12. `min_p` — HF `MinPLogitsWarper`, unless 0.
//! 13. `typical_p` — HF `TypicalLogitsWarper`, unless 1.
//! 14. `epsilon_cutoff` — HF `EpsilonLogitsWarper`, unless 0.
//! 15. `eta_cutoff` — HF `EtaLogitsWarper`, unless 0.
//! 16. `xtc` — llama.cpp's XTC (not in HF), after HF's warpers, unless its probability is 0.
//! 17. `mirostat_v2` — llama.cpp's Mirostat 2.0 (not in HF), last. Mirostat REPLACES the truncation
//!     samplers, as in llama.cpp's common sampler (temperature then mirostat): when it is set,
//!     steps 10–16 are left out even if configured; steps 1–9 still run.
//!
//! HF defaults that this config does not impose: HF's `generate()` fills unset values from
//! `GenerationConfig._get_default_generation_params()`, so it samples with `top_k = 50`; here an
//! unset `top_k` means no top-k (callers that want HF's defaults fill them in). HF's
//! `min_tokens_to_keep` is 1, or `#eos + 1` for beam search with sampling; `min_tokens_to_keep` here
//! is passed to every warper that has one (top_k, top_p, min_p, typical_p, epsilon, eta).
//! Options of a step that is off are still validated.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::bad_words::BadWords;
use super::dry::Dry;
use super::epsilon_cutoff::EpsilonCutoff;
use super::eta_cutoff::EtaCutoff;
use super::logit_bias::SequenceBias;
use super::min_new_tokens::MinNewTokens;
use super::min_p::MinP;
use super::mirostat_v2::MirostatV2;
use super::no_repeat_ngram::NoRepeatNGram;
use super::presence_frequency::PresenceFrequencyPenalty;
use super::repetition_penalty::RepetitionPenalty;
use super::suppress_tokens::SuppressTokens;
use super::temperature::Temperature;
use super::top_k::TopK;
use super::top_p::TopP;
use super::typical_p::TypicalP;
use super::xtc::Xtc;
use super::{LogitsProcessor, ProcessContext};

pub use super::dry::DryConfig;
pub use super::mirostat_v2::MirostatConfig;
pub use super::xtc::XtcConfig;

/// Every logits-processing option. `None` / empty / the neutral value means off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessorConfig {
    /// HF rule over prompt + generated tokens; > 0, 1 = off.
    pub repetition_penalty: Option<f32>,
    /// OpenAI rule over generated tokens; in [-2, 2], 0 = off.
    pub presence_penalty: Option<f32>,
    /// OpenAI rule over generated tokens; in [-2, 2], 0 = off.
    pub frequency_penalty: Option<f32>,
    /// 0 = off.
    pub no_repeat_ngram_size: Option<usize>,
    /// Banned sequences; each non-empty.
    pub bad_words_ids: Vec<Vec<u32>>,
    /// `(token, bias)` added to the token's logit; a bias may be `-inf` (ban), never NaN or `+inf`.
    pub logit_bias: Vec<(u32, f32)>,
    pub suppress_tokens: Vec<u32>,
    /// EOS is banned until this many tokens are generated; 0 = off.
    pub min_new_tokens: Option<usize>,
    /// Used by `min_new_tokens` and `bad_words` (which never bans a lone EOS).
    pub eos_token_ids: Vec<u32>,
    /// Whether the warpers (temperature and everything after it) run.
    pub do_sample: bool,
    /// >= 0; 1 = off; 0 = greedy (llama.cpp's rule; HF raises).
    pub temperature: Option<f32>,
    /// 0 = off (unsigned: HF's "negative" cannot be expressed).
    pub top_k: Option<usize>,
    /// In (0, 1]; 1 = off.
    pub top_p: Option<f32>,
    /// In [0, 1]; 0 = off.
    pub min_p: Option<f32>,
    /// In (0, 1]; 1 = off.
    pub typical_p: Option<f32>,
    /// In [0, 1); 0 = off.
    pub epsilon_cutoff: Option<f32>,
    /// In [0, 1); 0 = off.
    pub eta_cutoff: Option<f32>,
    /// >= 1; default 1 (HF's default; HF uses `#eos + 1` for beam search with sampling).
    pub min_tokens_to_keep: usize,
    pub mirostat: Option<MirostatConfig>,
    pub dry: Option<DryConfig>,
    pub xtc: Option<XtcConfig>,
}

impl Default for ProcessorConfig {
    /// Everything off; `min_tokens_to_keep` 1.
    fn default() -> Self {
        Self {
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            no_repeat_ngram_size: None,
            bad_words_ids: Vec::new(),
            logit_bias: Vec::new(),
            suppress_tokens: Vec::new(),
            min_new_tokens: None,
            eos_token_ids: Vec::new(),
            do_sample: false,
            temperature: None,
            top_k: None,
            top_p: None,
            min_p: None,
            typical_p: None,
            epsilon_cutoff: None,
            eta_cutoff: None,
            min_tokens_to_keep: 1,
            mirostat: None,
            dry: None,
            xtc: None,
        }
    }
}

fn check(errors: &mut Vec<String>, ok: bool, msg: impl FnOnce() -> String) {
    if !ok {
        errors.push(msg());
    }
}

impl ProcessorConfig {
    /// Every bad value, one message each (joined by "; "). Warper options are checked even when
    /// `do_sample` is false.
    pub fn validate(&self) -> Result<(), String> {
        let mut e = Vec::new();
        if let Some(v) = self.repetition_penalty {
            check(&mut e, v.is_finite() && v > 0.0, || {
                format!("repetition_penalty must be a finite number > 0 (1 = off), got {v}")
            });
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if let Some(v) = v {
                check(&mut e, (-2.0..=2.0).contains(&v), || format!("{name} must be in [-2, 2] (0 = off), got {v}"));
            }
        }
        for (i, seq) in self.bad_words_ids.iter().enumerate() {
            check(&mut e, !seq.is_empty(), || format!("bad_words_ids[{i}] is an empty sequence"));
        }
        for &(t, b) in &self.logit_bias {
            check(&mut e, !b.is_nan() && b != f32::INFINITY, || {
                format!("logit_bias for token {t} must be a number or -inf, got {b}")
            });
        }
        if let Some(v) = self.temperature {
            check(&mut e, v.is_finite() && v >= 0.0, || {
                format!("temperature must be a finite number >= 0 (0 = greedy, 1 = off), got {v}")
            });
        }
        if let Some(v) = self.top_p {
            check(&mut e, v > 0.0 && v <= 1.0, || format!("top_p must be in (0, 1] (1 = off), got {v}"));
        }
        if let Some(v) = self.min_p {
            check(&mut e, (0.0..=1.0).contains(&v), || format!("min_p must be in [0, 1] (0 = off), got {v}"));
        }
        if let Some(v) = self.typical_p {
            check(&mut e, v > 0.0 && v <= 1.0, || format!("typical_p must be in (0, 1] (1 = off), got {v}"));
        }
        if let Some(v) = self.epsilon_cutoff {
            check(&mut e, (0.0..1.0).contains(&v), || format!("epsilon_cutoff must be in [0, 1) (0 = off), got {v}"));
        }
        if let Some(v) = self.eta_cutoff {
            check(&mut e, (0.0..1.0).contains(&v), || format!("eta_cutoff must be in [0, 1) (0 = off), got {v}"));
        }
        let keep = self.min_tokens_to_keep;
        check(&mut e, keep >= 1, || format!("min_tokens_to_keep must be >= 1, got {keep}"));
        if let Some(m) = &self.mirostat {
            check(&mut e, m.tau.is_finite() && m.tau > 0.0, || {
                format!("mirostat.tau must be a finite number > 0, got {}", m.tau)
            });
            check(&mut e, m.eta.is_finite() && m.eta >= 0.0, || {
                format!("mirostat.eta must be a finite number >= 0, got {}", m.eta)
            });
        }
        if let Some(d) = &self.dry {
            check(&mut e, d.multiplier.is_finite() && d.multiplier >= 0.0, || {
                format!("dry.multiplier must be a finite number >= 0 (0 = off), got {}", d.multiplier)
            });
            check(&mut e, d.base.is_finite() && d.base >= 1.0, || {
                format!("dry.base must be a finite number >= 1, got {}", d.base)
            });
            check(&mut e, d.penalty_last_n >= -1, || {
                format!("dry.penalty_last_n must be >= -1 (-1 = whole context, 0 = off), got {}", d.penalty_last_n)
            });
            for (i, b) in d.sequence_breakers.iter().enumerate() {
                check(&mut e, !b.is_empty(), || format!("dry.sequence_breakers[{i}] is empty"));
            }
        }
        if let Some(x) = &self.xtc {
            check(&mut e, (0.0..=1.0).contains(&x.probability), || {
                format!("xtc.probability must be in [0, 1] (0 = off), got {}", x.probability)
            });
            check(&mut e, (0.0..=1.0).contains(&x.threshold), || {
                format!("xtc.threshold must be in [0, 1], got {}", x.threshold)
            });
        }
        if e.is_empty() {
            Ok(())
        } else {
            Err(e.join("; "))
        }
    }

    /// Token ids that must be inside a vocabulary of `vocab_size` (bad words, logit bias, suppressed
    /// and EOS tokens). The processors themselves ignore ids outside the scores row; HF raises.
    pub fn validate_vocab(&self, vocab_size: usize) -> Result<(), String> {
        let mut e = Vec::new();
        let mut out = |what: &str, t: u32| {
            if t as usize >= vocab_size {
                e.push(format!("{what} token {t} is outside the vocabulary (size {vocab_size})"));
            }
        };
        self.bad_words_ids.iter().flatten().for_each(|&t| out("bad_words_ids", t));
        self.logit_bias.iter().for_each(|&(t, _)| out("logit_bias", t));
        self.suppress_tokens.iter().for_each(|&t| out("suppress_tokens", t));
        self.eos_token_ids.iter().for_each(|&t| out("eos_token_ids", t));
        if e.is_empty() {
            Ok(())
        } else {
            Err(e.join("; "))
        }
    }
}

/// The processors a [`ProcessorConfig`] turns on, in the order of this module's doc.
pub struct ProcessorChain {
    processors: Vec<Box<dyn LogitsProcessor>>,
}

impl std::fmt::Debug for ProcessorChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ProcessorChain").field(&self.names()).finish()
    }
}

impl ProcessorChain {
    /// Validates `cfg` and builds the chain. `vocab_texts` (each token's decoded text, by id) is
    /// needed only for DRY's string sequence breakers.
    pub fn new(cfg: &ProcessorConfig, vocab_texts: Option<Arc<Vec<String>>>) -> Result<Self, String> {
        cfg.validate()?;
        let mut p: Vec<Box<dyn LogitsProcessor>> = Vec::new();
        if !cfg.logit_bias.is_empty() {
            p.push(Box::new(SequenceBias::logit_bias(&cfg.logit_bias)));
        }
        if let Some(v) = cfg.repetition_penalty.filter(|&v| v != 1.0) {
            p.push(Box::new(RepetitionPenalty::new(v)));
        }
        let presence = cfg.presence_penalty.unwrap_or(0.0);
        let frequency = cfg.frequency_penalty.unwrap_or(0.0);
        if presence != 0.0 || frequency != 0.0 {
            p.push(Box::new(PresenceFrequencyPenalty::new(presence, frequency)));
        }
        if let Some(d) = cfg.dry.as_ref().filter(|d| d.multiplier != 0.0 && d.penalty_last_n != 0) {
            let dry = if d.sequence_breakers.is_empty() {
                Dry::with_token_breakers(d.multiplier, d.base, d.allowed_length, d.penalty_last_n, &[])
            } else {
                let texts = vocab_texts.as_ref().ok_or_else(|| {
                    "dry needs the vocabulary's token texts to find its sequence breakers".to_string()
                })?;
                Dry::new(d.multiplier, d.base, d.allowed_length, d.penalty_last_n, &d.sequence_breakers, texts)
            };
            p.push(Box::new(dry));
        }
        if let Some(n) = cfg.no_repeat_ngram_size.filter(|&n| n > 0) {
            p.push(Box::new(NoRepeatNGram::new(n)));
        }
        let bad_words = cfg.bad_words_ids.iter().any(|seq| !(seq.len() == 1 && cfg.eos_token_ids.contains(&seq[0])));
        if bad_words {
            p.push(Box::new(BadWords::new(&cfg.bad_words_ids, &cfg.eos_token_ids)));
        }
        if let Some(n) = cfg.min_new_tokens.filter(|&n| n > 0) {
            if !cfg.eos_token_ids.is_empty() {
                p.push(Box::new(MinNewTokens::new(n, cfg.eos_token_ids.clone())));
            }
        }
        if !cfg.suppress_tokens.is_empty() {
            p.push(Box::new(SuppressTokens::new(cfg.suppress_tokens.clone())));
        }
        if cfg.do_sample {
            let keep = cfg.min_tokens_to_keep;
            if let Some(t) = cfg.temperature.filter(|&t| t != 1.0) {
                p.push(Box::new(Temperature::new(t)));
            }
            if cfg.mirostat.is_none() {
                if let Some(k) = cfg.top_k.filter(|&k| k > 0) {
                    p.push(Box::new(TopK::new(k, keep)));
                }
                if let Some(v) = cfg.top_p.filter(|&v| v < 1.0) {
                    p.push(Box::new(TopP::new(v, keep)));
                }
                if let Some(v) = cfg.min_p.filter(|&v| v > 0.0) {
                    p.push(Box::new(MinP::new(v, keep)));
                }
                if let Some(v) = cfg.typical_p.filter(|&v| v < 1.0) {
                    p.push(Box::new(TypicalP::new(v, keep)));
                }
                if let Some(v) = cfg.epsilon_cutoff.filter(|&v| v > 0.0) {
                    p.push(Box::new(EpsilonCutoff::new(v, keep)));
                }
                if let Some(v) = cfg.eta_cutoff.filter(|&v| v > 0.0) {
                    p.push(Box::new(EtaCutoff::new(v, keep)));
                }
                if let Some(x) = cfg.xtc.filter(|x| x.probability > 0.0) {
                    p.push(Box::new(Xtc::new(x.probability, x.threshold, x.min_keep)));
                }
            }
            if let Some(m) = cfg.mirostat {
                p.push(Box::new(MirostatV2::new(m.tau, m.eta)));
            }
        }
        Ok(Self { processors: p })
    }

    /// Run every processor on one row, in order.
    pub fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        for p in &mut self.processors {
            p.process(ctx, scores);
        }
    }

    /// Tell every processor which token was chosen from the processed `scores`.
    pub fn accept(&mut self, token: u32, scores: &[f32]) {
        for p in &mut self.processors {
            p.accept(token, scores);
        }
    }

    /// The processors' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.processors.iter().map(|p| p.name()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.processors.is_empty()
    }
}
