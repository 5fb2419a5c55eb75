//! Choosing the next token from processed scores: argmax, or a seeded multinomial draw.

use rand::rngs::StdRng;
use rand::Rng;

/// The index of the largest score (the first on ties, as torch.argmax).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in scores.iter().enumerate() {
        if v > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// softmax(scores) in f64; `-inf` scores get probability 0.
pub fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = scores.iter().map(|&s| ((s as f64) - max).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    probs
}

/// log_softmax(scores)[token] in f64.
pub fn logprob(scores: &[f32], token: u32) -> f64 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = scores.iter().map(|&s| ((s as f64) - max).exp()).sum::<f64>().ln() + max;
    scores[token as usize] as f64 - lse
}

/// Draw one token from softmax(scores) by inverse CDF over a uniform in [0, 1).
pub fn sample(scores: &[f32], rng: &mut StdRng) -> u32 {
    let probs = softmax(scores);
    let u: f64 = rng.random();
    let mut acc = 0.0;
    let mut last_possible = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p;
            last_possible = i;
            if u < acc {
                return i as u32;
            }
        }
    }
    // Rounding left u ≥ the total: the last token with non-zero probability.
    last_possible as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn sampling_never_picks_removed_tokens_and_is_reproducible() {
        let scores = [0.5, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200).map(|_| sample(&scores, &mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert!(a.iter().all(|&t| t == 0 || t == 2));
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
    }

    #[test]
    fn logprob_matches_softmax() {
        let s = [0.1, -2.0, 3.0];
        let p = softmax(&s);
        for t in 0..3 {
            assert!((logprob(&s, t).exp() - p[t as usize]).abs() < 1e-12);
        }
    }
}
