//! `--prune-tokens` and its options: prefill token pruning, shared by generate, score, eval, bench.

use anyhow::{bail, Result};
use clap::Args;
use pare_model::TokenPruner;
use pare_token_prune::{PruneSchedule, Pruner, Span, TokenScorer};

/// `--prune-span`: a closed set plus a position range, parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PruneSpan {
    #[default]
    Prompt,
    Image,
    /// Positions START..END (end exclusive), START < END.
    Range {
        start: usize,
        end: usize,
    },
}

fn parse_prune_span(s: &str) -> std::result::Result<PruneSpan, String> {
    match s {
        "prompt" => Ok(PruneSpan::Prompt),
        "image" => Ok(PruneSpan::Image),
        range => {
            let parsed = range
                .split_once("..")
                .and_then(|(a, b)| Some((a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?)));
            match parsed {
                Some((start, end)) if start < end && i64::try_from(end).is_ok() => Ok(PruneSpan::Range { start, end }),
                _ => Err("expected prompt, image or START..END with START < END".into()),
            }
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct TokenPruneArgs {
    /// Drop prompt tokens inside the prefill: LAYER:KEEP[,LAYER:KEEP...] — layers from LAYER on
    /// run on the kept tokens; KEEP is a fraction (0.5) or a count (276) of the span.
    #[arg(long, help_heading = "Token pruning")]
    pub prune_tokens: Option<String>,
    /// Which tokens may go: `prompt` (all but the last --protect-last), `image` (a VLM's image
    /// tokens), or a position range START..END.
    #[arg(long, default_value = "prompt", value_parser = parse_prune_span, help_heading = "Token pruning")]
    pub prune_span: PruneSpan,
    /// With --prune-span prompt: the last N prompt tokens are never dropped.
    #[arg(long, default_value_t = 8, help_heading = "Token pruning")]
    pub protect_last: usize,
    /// Token scores: last-attn (FastV), mean-attn, knorm, random, or learned:FILE.safetensors
    /// (a scorer written by `pare train-scorer`, reading the tokens' hidden states at the cut).
    #[arg(long, default_value = "last-attn", help_heading = "Token pruning")]
    pub prune_score: String,
}

impl TokenPruneArgs {
    /// The pruner the flags describe for a model of `num_layers` layers; None without --prune-tokens.
    /// `image` holds a VLM prompt's image-token positions (what `--prune-span image` names).
    pub fn build(&self, num_layers: usize, image: Option<Vec<i64>>) -> Result<Option<Box<dyn TokenPruner>>> {
        let Some(spec) = &self.prune_tokens else { return Ok(None) };
        let schedule = PruneSchedule::parse(spec)?;
        schedule.check(num_layers)?;
        let span = match self.prune_span {
            PruneSpan::Prompt => Span::Prompt { protect_last: self.protect_last },
            PruneSpan::Image => match image {
                Some(positions) => Span::Positions(vec![positions]),
                None => {
                    bail!("--prune-span image needs a vision-language model (LLaVA); this model has no image tokens")
                }
            },
            // Both fit i64: the parser checked the end.
            PruneSpan::Range { start, end } => Span::Range(start as i64, end as i64),
        };
        let scorer = pare_token_prune::scorer(&self.prune_score, 0)?;
        if let TokenScorer::Learned(learned) = &scorer {
            let trained = learned.info.cut_layer;
            if trained > 0 && !schedule.stages.iter().any(|s| s.layer == trained) {
                eprintln!(
                    "note: {} was trained for a cut at layer {trained} (--prune-tokens {trained}:KEEP); it scores other cuts too, untested",
                    learned.path
                );
            }
        }
        Ok(Some(Box::new(Pruner { schedule, span, scorer })))
    }

    /// Checks that need no model (run before loading one).
    pub fn check(&self) -> Result<()> {
        if let Some(spec) = &self.prune_tokens {
            PruneSchedule::parse(spec)?;
            pare_token_prune::scorer(&self.prune_score, 0)?;
        }
        Ok(())
    }
}
