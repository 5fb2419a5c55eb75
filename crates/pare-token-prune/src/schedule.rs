//! `--prune-tokens LAYER:KEEP[,LAYER:KEEP...]`: after which layers tokens are dropped, and how
//! many of the span each cut keeps (a fraction of the span, or a count).

use crate::error::{Result, TokenPruneError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    Fraction(f64),
    Count(usize),
}

impl Keep {
    /// Span tokens kept out of `n` (at least one).
    pub fn of(&self, n: usize) -> usize {
        match *self {
            Keep::Fraction(f) => ((n as f64 * f).round() as usize).clamp(1, n.max(1)),
            Keep::Count(c) => c.clamp(1, n.max(1)),
        }
    }
}

/// One cut: layers `layer..` run on the kept tokens; layers before it see every token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub layer: usize,
    pub keep: Keep,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PruneSchedule {
    pub stages: Vec<Stage>,
}

impl PruneSchedule {
    /// Parse `2:0.5` or `8:0.5,16:0.5,24:0.5` or `10:276`. A KEEP with a dot is a fraction in
    /// (0, 1]; otherwise a token count ≥ 1. Layers must increase.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut stages = Vec::new();
        for part in spec.split(',').map(str::trim) {
            let (layer, keep) = part.split_once(':').ok_or_else(|| {
                TokenPruneError::config(format!("`prune_tokens`: {part:?} is not LAYER:KEEP (e.g. 2:0.5 or 10:276)"))
            })?;
            let layer: usize = layer
                .trim()
                .parse()
                .map_err(|_| TokenPruneError::config(format!("`prune_tokens`: layer {layer:?} is not a number")))?;
            let keep = keep.trim();
            let keep = if keep.contains('.') {
                let f: f64 = keep
                    .parse()
                    .map_err(|_| TokenPruneError::config(format!("`prune_tokens`: keep {keep:?} is not a number")))?;
                if !(f > 0.0 && f <= 1.0) {
                    return Err(TokenPruneError::config(format!(
                        "`prune_tokens`: a kept fraction must be in (0, 1], got {f}"
                    )));
                }
                Keep::Fraction(f)
            } else {
                let c: usize = keep
                    .parse()
                    .map_err(|_| TokenPruneError::config(format!("`prune_tokens`: keep {keep:?} is not a number")))?;
                if c == 0 {
                    return Err(TokenPruneError::config("`prune_tokens`: keep at least one token"));
                }
                Keep::Count(c)
            };
            if layer == 0 {
                return Err(TokenPruneError::config(
                    "`prune_tokens`: layer 0 has no attention to score with; cut after layer 1 or later",
                ));
            }
            if stages.last().is_some_and(|s: &Stage| s.layer >= layer) {
                return Err(TokenPruneError::config("`prune_tokens`: layers must increase"));
            }
            stages.push(Stage { layer, keep });
        }
        Ok(PruneSchedule { stages })
    }

    /// Check the cuts fit a model of `num_layers` layers.
    pub fn check(&self, num_layers: usize) -> Result<()> {
        if let Some(s) = self.stages.iter().find(|s| s.layer >= num_layers) {
            return Err(TokenPruneError::config(format!(
                "`prune_tokens`: layer {} is beyond the model's {num_layers} layers",
                s.layer
            )));
        }
        Ok(())
    }

    /// Tokens each of `num_layers` layers runs on during a prefill of `total` tokens, `span` of
    /// which the cuts may drop: what the FLOPs count and the KV cache follow.
    pub fn tokens_per_layer(&self, num_layers: usize, total: usize, span: usize) -> Result<Vec<usize>> {
        self.check(num_layers)?;
        let mut tokens = vec![total; num_layers];
        let mut span = span.min(total);
        for stage in &self.stages {
            if span == 0 {
                return Err(TokenPruneError::config(format!(
                    "`prune_tokens`: nothing left to cut at layer {}: the span is empty",
                    stage.layer
                )));
            }
            if let Keep::Count(c) = stage.keep {
                if c > span {
                    return Err(TokenPruneError::config(format!(
                        "`prune_tokens`: layer {} keeps {c} tokens, more than the {span} the span holds there",
                        stage.layer
                    )));
                }
            }
            let kept = stage.keep.of(span);
            let dropped = span - kept;
            tokens.iter_mut().skip(stage.layer).for_each(|t| *t -= dropped);
            span = kept;
        }
        Ok(tokens)
    }

    /// The stage whose cut follows layer `layer` (scores come from the last full layer, `layer`).
    pub fn stage_after(&self, layer: usize) -> Option<&Stage> {
        self.stages.iter().find(|s| s.layer == layer + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fractions_counts_and_several_stages() {
        let s = PruneSchedule::parse("8:0.5, 16:0.5,24:100").unwrap();
        assert_eq!(s.stages.len(), 3);
        assert_eq!(s.stages[2].keep, Keep::Count(100));
        assert_eq!(Keep::Fraction(0.5).of(576), 288);
        assert_eq!(Keep::Count(300).of(200), 200);
        assert!(s.stage_after(7).is_some() && s.stage_after(8).is_none());
        for bad in ["8", "x:0.5", "8:1.5", "8:0", "8:0.5,4:0.5", "0:0.5", "8:abc"] {
            assert!(PruneSchedule::parse(bad).is_err(), "{bad}");
        }
        assert!(PruneSchedule::parse("30:0.5").unwrap().check(30).is_err());
    }

    #[test]
    fn tokens_per_layer_follow_the_cuts() {
        // 120 tokens, a span of 112: half of it after layer 4, then 20 of the rest after 12.
        let s = PruneSchedule::parse("4:0.5,12:20").unwrap();
        let t = s.tokens_per_layer(32, 120, 112).unwrap();
        assert_eq!((t[3], t[4], t[11], t[12], t[31]), (120, 64, 64, 28, 28));
        let p = |spec: &str| PruneSchedule::parse(spec).unwrap();
        assert!(p("10:700").tokens_per_layer(32, 676, 576).is_err(), "keeps more than the span");
        assert!(p("40:0.5").tokens_per_layer(32, 676, 576).is_err(), "beyond the layers");
        assert!(p("2:0.5").tokens_per_layer(32, 50, 0).is_err(), "empty span");
    }
}
