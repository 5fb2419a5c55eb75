//! Random importance: a seeded uniform score per unit (the baseline every method must beat).

use pare_model::rng::SplitMix64;

/// `n` scores for (layer, kind), drawn from a stream fixed by `seed`, the layer and the kind, so
/// adding layers to a range does not reshuffle the others.
pub fn unit_scores(seed: u64, layer: usize, kind_tag: u64, n: usize) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed ^ ((layer as u64) << 32) ^ (kind_tag << 60));
    (0..n).map(|_| rng.next_f64()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeded_and_distinct_per_layer() {
        let a = super::unit_scores(7, 3, 0, 5);
        assert_eq!(a, super::unit_scores(7, 3, 0, 5));
        assert_ne!(a, super::unit_scores(7, 4, 0, 5));
        assert_ne!(a, super::unit_scores(8, 3, 0, 5));
        assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
    }
}
