//! The token pruner: at each scheduled cut, score the span's tokens on the last full layer's
//! attention (or with a learned scorer over its hidden states) and keep the best; everything
//! outside the span is kept.

use pare_model::cache::{LayerKv, PAD_POSITION};
use pare_model::hooks::{LayerContext, TokenPruner};
use pare_press::compress::LayerInfo;
use pare_press::compress::{observe, RowQueries};
use pare_press::scorer::Scorer;

use crate::error::{Result, TokenPruneError};
use crate::learned::LearnedScorer;
use crate::schedule::PruneSchedule;

/// Which tokens may be dropped, by original position.
#[derive(Debug, Clone, PartialEq)]
pub enum Span {
    /// Given positions per row (a VLM's image tokens).
    Positions(Vec<Vec<i64>>),
    /// The whole prompt except its last `protect_last` tokens.
    Prompt { protect_last: usize },
    /// Positions in [start, end).
    Range(i64, i64),
}

#[derive(Debug)]
pub struct Pruner {
    pub schedule: PruneSchedule,
    pub span: Span,
    pub scorer: TokenScorer,
}

/// How a pruner ranks the span's tokens.
#[derive(Debug)]
pub enum TokenScorer {
    /// A press scorer over the last full layer's attention (or keys).
    Attention(Box<dyn Scorer>),
    /// A trained network over the tokens' hidden states at the cut (`learned:FILE`).
    Learned(Box<LearnedScorer>),
}

impl From<Box<dyn Scorer>> for TokenScorer {
    fn from(s: Box<dyn Scorer>) -> Self {
        TokenScorer::Attention(s)
    }
}

/// The scorers a pruner can use, by CLI name: from the press scorer API (FastV's last-token
/// attention is TOVA's score, mean attention is H2O's), or `learned:FILE.safetensors`, a scorer
/// written by `pare train-scorer`.
pub fn scorer(name: &str, seed: u64) -> Result<TokenScorer> {
    if let Some(path) = name.strip_prefix("learned:") {
        if path.is_empty() {
            return Err(TokenPruneError::config(
                "`prune_score` learned:FILE needs the scorer's file (from `pare train-scorer`)",
            ));
        }
        return Ok(TokenScorer::Learned(Box::new(LearnedScorer::load(path)?)));
    }
    let s: Box<dyn Scorer> = match name {
        "last-attn" => Box::new(pare_press::scorers::Tova),
        "mean-attn" => Box::new(pare_press::scorers::ObservedAttention),
        "knorm" => Box::new(pare_press::scorers::Knorm),
        "random" => Box::new(pare_press::scorers::Random { seed }),
        other => {
            return Err(TokenPruneError::config(format!(
                "unknown `prune_score` {other:?} (last-attn, mean-attn, knorm, random, learned:FILE.safetensors)"
            )))
        }
    };
    Ok(TokenScorer::Attention(s))
}

impl Pruner {
    /// Per row, the kept tokens of this call (indices ascending), for a cut after `ctx.layer`.
    fn choose(&self, ctx: &LayerContext, kv: &LayerKv) -> Result<Option<Vec<Vec<usize>>>> {
        let Some(stage) = self.schedule.stage_after(ctx.layer) else { return Ok(None) };
        let info = LayerInfo::of(ctx);
        let mut kept_rows = Vec::with_capacity(ctx.positions.len());
        for (b, positions) in ctx.positions.iter().enumerate() {
            let real: Vec<usize> = (0..positions.len()).filter(|&i| positions[i] != PAD_POSITION).collect();
            // Under the prompt span, the last `protect_last` real tokens are never dropped.
            let protected_from = match &self.span {
                Span::Prompt { protect_last } => {
                    real.get(real.len().saturating_sub(*protect_last)).copied().unwrap_or(usize::MAX)
                }
                _ => usize::MAX,
            };
            let last = real.last().copied();
            let in_span = |i: usize| -> bool {
                // The last token's logits are the prefill's output: it always stays.
                if Some(i) == last {
                    return false;
                }
                let p = positions[i];
                match &self.span {
                    Span::Positions(rows) => rows.get(b).is_some_and(|r| r.contains(&p)),
                    Span::Prompt { .. } => i < protected_from,
                    Span::Range(start, end) => (*start..*end).contains(&p),
                }
            };
            let span: Vec<usize> = real.iter().copied().filter(|&i| in_span(i)).collect();
            let keep_n = stage.keep.of(span.len());
            let mut kept: Vec<usize> = real.iter().copied().filter(|&i| !in_span(i)).collect();
            if keep_n < span.len() {
                let mut score_of = vec![0f64; positions.len()];
                match &self.scorer {
                    TokenScorer::Attention(scorer) => {
                        let row = RowQueries::from_call(ctx.queries, ctx.positions, b)?;
                        let (obs, slots) = observe(kv, b, &info, &row)?
                            .ok_or_else(|| TokenPruneError::config("token pruning: an empty row"))?;
                        // Averaged over all of the layer's heads (every rank's, on a split model).
                        let per_head = obs.every_head(&scorer.score(&obs)?)?;
                        // Cache slot i holds this call's token i (the cache was empty before the prefill).
                        for (h, scores) in per_head.iter().enumerate() {
                            // Every head holds this call's tokens in the same slots.
                            for (&slot, &s) in slots[h % slots.len()].iter().zip(scores) {
                                score_of[slot] += s as f64 / per_head.len() as f64;
                            }
                        }
                    }
                    TokenScorer::Learned(learned) => {
                        let others: Vec<usize> = real.iter().copied().filter(|&i| !in_span(i)).collect();
                        let logits = learned.scores(&ctx.hidden.get(b)?, &span, &others)?;
                        for (&i, &s) in span.iter().zip(&logits) {
                            score_of[i] = s as f64;
                        }
                    }
                }
                let mut ranked = span.clone();
                ranked.sort_by(|&a, &b| score_of[b].total_cmp(&score_of[a]).then(a.cmp(&b)));
                kept.extend(&ranked[..keep_n]);
            } else {
                kept.extend(&span);
            }
            kept.sort_unstable();
            kept_rows.push(kept);
        }
        Ok(Some(kept_rows))
    }
}

impl TokenPruner for Pruner {
    fn after_attention(&self, ctx: &LayerContext, kv: &LayerKv) -> pare_model::Result<Option<Vec<Vec<usize>>>> {
        Ok(self.choose(ctx, kv)?)
    }
}
