//! Seeded sampling: reproducible, and distributed as the processed scores say (chi-square).

use pare_generate::processors::chain::{ProcessorChain, ProcessorConfig};
use pare_generate::processors::ProcessContext;
use pare_generate::sampling::{sample, softmax};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn processed(cfg: &ProcessorConfig, scores: &[f32]) -> Vec<f32> {
    let mut chain = ProcessorChain::new(cfg, None).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let ids = [1u32, 2, 3];
    let mut out = scores.to_vec();
    chain.process(&mut ProcessContext { input_ids: &ids, prompt_len: 3, rng: &mut rng, candidates: None }, &mut out);
    out
}

/// Pearson's chi-square statistic of observed counts against expected probabilities (p > 0 only).
fn chi_square(counts: &[usize], probs: &[f64], n: usize) -> (f64, usize) {
    let mut stat = 0.0;
    let mut cells = 0;
    for (&c, &p) in counts.iter().zip(probs) {
        if p > 0.0 {
            let e = p * n as f64;
            stat += (c as f64 - e).powi(2) / e;
            cells += 1;
        } else {
            assert_eq!(c, 0, "a token with probability 0 was drawn");
        }
    }
    (stat, cells - 1)
}

#[test]
fn draws_follow_the_processed_distribution() {
    let scores: Vec<f32> = (0..40).map(|i| ((i * 37 % 11) as f32) * 0.4 - (i as f32) * 0.05).collect();
    let cfg = ProcessorConfig {
        do_sample: true,
        temperature: Some(0.7),
        top_k: Some(12),
        top_p: Some(0.9),
        ..ProcessorConfig::default()
    };
    let scores = processed(&cfg, &scores);
    let probs = softmax(&scores);
    let kept = probs.iter().filter(|&&p| p > 0.0).count();
    assert!(kept > 3 && kept <= 12, "top-k/top-p should leave a few tokens, left {kept}");
    let n = 40_000;
    let mut rng = StdRng::seed_from_u64(1234);
    let mut counts = vec![0usize; probs.len()];
    for _ in 0..n {
        counts[sample(&scores, &mut rng) as usize] += 1;
    }
    let (stat, df) = chi_square(&counts, &probs, n);
    // 99.9th percentile of chi-square: df + 3.09·sqrt(2·df) + 2·(3.09²−1)/3 (Wilson–Hilferty, close enough).
    let critical = df as f64 + 3.09 * (2.0 * df as f64).sqrt() + 2.0 * (3.09f64.powi(2) - 1.0) / 3.0;
    assert!(stat < critical, "chi-square {stat:.2} ≥ {critical:.2} with {df} degrees of freedom");
}

#[test]
fn the_sampler_is_not_the_uniform_one() {
    // The same test must reject a sampler that ignores the probabilities.
    let scores = [2.0f32, 1.0, 0.0, -1.0, -3.0];
    let probs = softmax(&scores);
    let n = 10_000;
    let counts = vec![n / 5; 5];
    let (stat, df) = chi_square(&counts, &probs, n);
    let critical = df as f64 + 3.09 * (2.0 * df as f64).sqrt() + 2.0 * (3.09f64.powi(2) - 1.0) / 3.0;
    assert!(stat > critical);
}

#[test]
fn same_seed_same_draws() {
    let scores: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let draws = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..500).map(|_| sample(&scores, &mut rng)).collect::<Vec<_>>()
    };
    assert_eq!(draws(42), draws(42));
    assert_ne!(draws(42), draws(43));
}
