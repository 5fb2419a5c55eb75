//! Memory needed, estimated from shapes before anything is allocated, against what the machine
//! has: a request that cannot fit is refused with one message instead of growing until the
//! allocator aborts the process.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// MemAvailable from /proc/meminfo, in bytes (None where there is no such file).
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The product of sizes, or None when it does not fit in 64 bits (it cannot fit in memory then).
pub fn product(sizes: &[usize]) -> Option<u64> {
    sizes.iter().try_fold(1u64, |acc, &s| acc.checked_mul(s as u64))
}

/// Refuse `what` if it needs more than the memory available. `needed` None: the size overflowed.
pub fn ensure_fits(what: &str, needed: Option<u64>) -> Result<()> {
    let available = available_bytes();
    let fits = match (needed, available) {
        (Some(n), Some(a)) => n <= a,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if fits {
        return Ok(());
    }
    let needed = needed.map_or("more than 2^64 bytes".to_string(), |n| format!("{:.1} GiB", n as f64 / GIB));
    let available = available.map_or("less".to_string(), |a| format!("{:.1} GiB", a as f64 / GIB));
    Err(ModelError::OutOfMemory(format!("{what} needs {needed}, {available} available")))
}

impl ModelConfig {
    /// Parameters by the config's shapes (per-layer lists included), None on overflow.
    pub fn parameter_count(&self) -> Option<u64> {
        let (h, hd) = (self.hidden_size as u64, self.head_dim as u64);
        let embed = (self.vocab_size as u64).checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let matrices = if self.gated_mlp() { 3 } else { 2 };
        let layer = |heads: usize, kv: usize, width: usize| -> Option<u64> {
            let attention = (2 * heads as u64).checked_add(2 * kv as u64)?.checked_mul(hd)?.checked_mul(h)?;
            let mlp = (width as u64).checked_mul(h)?.checked_mul(matrices)?;
            attention.checked_add(mlp)?.checked_add(4 * h)
        };
        let layers = match &self.layer_shapes {
            Some(s) => s
                .num_heads
                .iter()
                .zip(&s.num_kv_heads)
                .zip(&s.intermediate_size)
                .try_fold(0u64, |acc, ((&heads, &kv), &width)| acc.checked_add(layer(heads, kv, width)?))?,
            None => {
                layer(self.num_heads, self.num_kv_heads, self.intermediate_size)?.checked_mul(self.num_layers as u64)?
            }
        };
        embed.checked_add(head)?.checked_add(layers)
    }

    /// Bytes of keys and values one token adds to the cache, over all layers.
    pub fn kv_bytes_per_token(&self, bytes_per_value: usize) -> Option<u64> {
        let kv_heads: u64 = match &self.layer_shapes {
            Some(s) => s.num_kv_heads.iter().try_fold(0u64, |acc, &k| acc.checked_add(k as u64))?,
            None => (self.num_kv_heads as u64).checked_mul(self.num_layers as u64)?,
        };
        kv_heads.checked_mul(2 * self.head_dim as u64)?.checked_mul(bytes_per_value as u64)
    }

    /// Memory a run of `sequences` sequences holds at its peak: the KV cache of `tokens` tokens
    /// each, a few f32 rows of logits, and one layer's attention scores over a `prompt`-token
    /// prefill (with a temporary of the same size).
    pub fn run_bytes(&self, bytes_per_value: usize, sequences: usize, prompt: usize, tokens: usize) -> Option<u64> {
        let cache = self.kv_bytes_per_token(bytes_per_value)?.checked_mul(tokens as u64)?;
        let logits = product(&[self.vocab_size, 4, 4])?;
        let scores = product(&[self.num_heads, prompt, prompt, 4, 2])?;
        cache.checked_add(logits)?.checked_add(scores)?.checked_mul(sequences as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_overflow_are_refused() {
        assert_eq!(product(&[1 << 40, 1 << 40]), None);
        let err = ensure_fits("the test", None).unwrap_err().to_string();
        assert!(err.contains("needs more than 2^64 bytes"), "{err}");
        let err = ensure_fits("the test", Some(u64::MAX)).unwrap_err().to_string();
        assert!(err.starts_with("the test needs") && err.contains("available"), "{err}");
        ensure_fits("a byte", Some(1)).unwrap();
    }
}
