//! How many units each layer loses: local (one ratio everywhere, the seed's uniform pruning),
//! global (one ranking across layers), per-layer ratios from a JSON file, or non-uniform ratios
//! derived from block influence for the same total; then `--round-to`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{PruneError, Result};
use crate::groups::Kind;

#[derive(Debug, Clone, PartialEq)]
pub enum RatioMode {
    Local,
    Global,
    PerLayer(PerLayerRatios),
    /// Layers that change the residual stream less (lower block influence) lose more; `strength`
    /// scales how far ratios move from the uniform one.
    BlockInfluence {
        strength: f64,
    },
}

impl RatioMode {
    pub fn name(&self) -> &'static str {
        match self {
            RatioMode::Local => "local",
            RatioMode::Global => "global",
            RatioMode::PerLayer(_) => "per-layer",
            RatioMode::BlockInfluence { .. } => "block-influence",
        }
    }
}

/// `{"attn": {"3": 0.25, ...}, "mlp": {"3": 0.3, ...}}`: a ratio per layer; layers not named
/// are not pruned.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerLayerRatios {
    #[serde(default)]
    pub attn: BTreeMap<usize, f64>,
    #[serde(default)]
    pub mlp: BTreeMap<usize, f64>,
}

impl PerLayerRatios {
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let r: PerLayerRatios = serde_json::from_str(text).map_err(|e| {
            PruneError::input(format!(
                "{source}: {e} (expected {{\"attn\": {{\"3\": 0.25}}, \"mlp\": {{\"3\": 0.25}}}})"
            ))
        })?;
        for (kind, map) in [("attn", &r.attn), ("mlp", &r.mlp)] {
            if let Some((l, v)) = map.iter().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
                return Err(PruneError::input(format!("{source}: {kind} ratio {v} of layer {l} is not in [0, 1]")));
            }
        }
        Ok(r)
    }

    pub fn get(&self, kind: Kind) -> &BTreeMap<usize, f64> {
        match kind {
            Kind::Attn => &self.attn,
            Kind::Mlp => &self.mlp,
        }
    }
}

/// One layer's prunable units of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerUnits {
    pub layer: usize,
    /// Units: KV heads, query-head slots per KV group, or MLP channels.
    pub units: usize,
    /// Root channels per unit (head_dim for attention, 1 for the MLP): LLM-Pruner counts
    /// pruned channels in the root module, then whole units.
    pub root_width: usize,
    /// Channels of the pruned width per unit (q_proj rows for attention, MLP channels), for `--round-to`.
    pub channel_width: usize,
    /// What a unit is, for messages.
    pub unit_name: &'static str,
}

/// LLM-Pruner's count (MetaPruner.prune_local): of C = units × root_width root channels,
/// C − ⌊C·(1 − ratio)⌋ are pruned, in whole units.
pub fn local_count(units: usize, root_width: usize, ratio: f64) -> usize {
    let channels = units * root_width;
    let kept = (channels as f64 * (1.0 - ratio)).floor().max(0.0) as usize;
    (channels - kept.min(channels)) / root_width
}

/// Pruned units per layer for one kind. `scores` are the unit scores (global mode ranks them;
/// within a layer they must be in the order the plan removes them: any order, lowest first);
/// `influence` is the block influence of every layer (block-influence mode).
pub fn counts(
    kind: Kind,
    layers: &[LayerUnits],
    scores: &BTreeMap<usize, Vec<f64>>,
    mode: &RatioMode,
    ratio: f64,
    influence: Option<&[f64]>,
    round_to: Option<usize>,
) -> Result<BTreeMap<usize, usize>> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(PruneError::input(format!("`ratio` must be in [0, 1], got {ratio}")));
    }
    let mut pruned: BTreeMap<usize, usize> = match mode {
        RatioMode::Local => layers.iter().map(|u| (u.layer, local_count(u.units, u.root_width, ratio))).collect(),
        RatioMode::PerLayer(r) => layers
            .iter()
            .map(|u| (u.layer, local_count(u.units, u.root_width, r.get(kind).get(&u.layer).copied().unwrap_or(0.0))))
            .collect(),
        RatioMode::Global => global(layers, scores, ratio)?,
        RatioMode::BlockInfluence { strength } => {
            let bi = influence.ok_or_else(|| PruneError::input("block-influence mode needs calibration text"))?;
            block_influence(layers, bi, ratio, *strength)?
        }
    };
    for u in layers {
        let p = pruned.get_mut(&u.layer).expect("every layer counted");
        if let Some(n) = round_to {
            *p = round_kept(u, *p, n, kind)?;
        }
        if *p >= u.units && u.units > 0 {
            return Err(PruneError::input(format!(
                "this ratio would remove every {} of layer {} ({} of {}); lower `ratio`",
                u.unit_name, u.layer, u.units, u.units
            )));
        }
    }
    Ok(pruned)
}

/// One ranking of all units of the range; the lowest C − ⌊C·(1 − ratio)⌋ go, C the unit count.
fn global(layers: &[LayerUnits], scores: &BTreeMap<usize, Vec<f64>>, ratio: f64) -> Result<BTreeMap<usize, usize>> {
    let mut all: Vec<(f64, usize, usize)> = Vec::new();
    for u in layers {
        let s = scores.get(&u.layer).ok_or_else(|| PruneError::input(format!("no scores for layer {}", u.layer)))?;
        all.extend(s.iter().enumerate().map(|(i, &v)| (v, u.layer, i)));
    }
    let total = all.len();
    let n = local_count(total, 1, ratio);
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut pruned: BTreeMap<usize, usize> = layers.iter().map(|u| (u.layer, 0)).collect();
    for &(_, l, _) in &all[..n] {
        *pruned.get_mut(&l).expect("layer present") += 1;
    }
    Ok(pruned)
}

/// Block influence of each layer (1 − mean cos(input, output) of the residual stream, ShortGPT's
/// BI) sets its ratio: r_l = ratio · (1 + strength · (mean z − z_l)), z the influence scaled to
/// [0, 1] over the range; counts are then scaled to the local mode's total and rounded by
/// largest remainder, no layer losing every unit.
fn block_influence(layers: &[LayerUnits], bi: &[f64], ratio: f64, strength: f64) -> Result<BTreeMap<usize, usize>> {
    if layers.is_empty() {
        return Ok(BTreeMap::new());
    }
    let target: usize = layers.iter().map(|u| local_count(u.units, u.root_width, ratio)).sum();
    let z_raw: Vec<f64> = layers.iter().map(|u| bi.get(u.layer).copied().unwrap_or(0.0)).collect();
    let (lo, hi) = z_raw.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let z: Vec<f64> = z_raw.iter().map(|&v| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 }).collect();
    let mean_z = z.iter().sum::<f64>() / z.len() as f64;
    let desired: Vec<f64> = layers
        .iter()
        .zip(&z)
        .map(|(u, &zl)| u.units as f64 * (ratio * (1.0 + strength * (mean_z - zl))).clamp(0.0, 1.0))
        .collect();
    let sum: f64 = desired.iter().sum();
    let scale = if sum > 0.0 { target as f64 / sum } else { 0.0 };
    let cap: Vec<usize> = layers.iter().map(|u| u.units.saturating_sub(1)).collect();
    if target > cap.iter().sum::<usize>() {
        return Err(PruneError::input("this ratio would remove every unit of some layer; lower `ratio`"));
    }
    let want: Vec<f64> = desired.iter().map(|d| d * scale).collect();
    let mut got: Vec<usize> = want.iter().zip(&cap).map(|(&w, &c)| (w.floor() as usize).min(c)).collect();
    let mut left = target - got.iter().sum::<usize>();
    // Largest remainders first; layers at their cap are skipped, and the loop repeats until the
    // total is met (capped layers push their share onto the others).
    while left > 0 {
        let mut order: Vec<usize> = (0..layers.len()).filter(|&i| got[i] < cap[i]).collect();
        order.sort_by(|&a, &b| (want[b] - got[b] as f64).total_cmp(&(want[a] - got[a] as f64)).then(a.cmp(&b)));
        for i in order {
            if left == 0 {
                break;
            }
            got[i] += 1;
            left -= 1;
        }
    }
    Ok(layers.iter().zip(got).map(|(u, g)| (u.layer, g)).collect())
}

/// Keep a width that is a multiple of `n` channels: keep more units (prune fewer) until it is,
/// or the whole layer.
fn round_kept(u: &LayerUnits, pruned: usize, n: usize, kind: Kind) -> Result<usize> {
    let full = u.units * u.channel_width;
    if n == 0 {
        return Err(PruneError::input("`round_to` must be at least 1"));
    }
    if n > full {
        return Err(PruneError::input(format!(
            "`round_to` {n} is larger than layer {}'s {} width of {full}",
            u.layer,
            match kind {
                Kind::Attn => "attention",
                Kind::Mlp => "MLP",
            }
        )));
    }
    let mut kept = u.units - pruned.min(u.units);
    while kept < u.units && !(kept * u.channel_width).is_multiple_of(n) {
        kept += 1;
    }
    Ok(u.units - kept)
}

/// Block influence per layer from the residual stream entering each layer (`hidden[l]`) and
/// leaving it (`hidden[l + 1]`), each (tokens, hidden), summed over samples.
pub fn block_influence_of(hidden_per_sample: &[Vec<candle_core::Tensor>]) -> Result<Vec<f64>> {
    let layers = hidden_per_sample.first().map_or(0, |h| h.len().saturating_sub(1));
    let mut sum = vec![0.0; layers];
    let mut tokens = 0usize;
    for hidden in hidden_per_sample {
        for (l, s) in sum.iter_mut().enumerate() {
            let (a, b) =
                (hidden[l].to_dtype(candle_core::DType::F64)?, hidden[l + 1].to_dtype(candle_core::DType::F64)?);
            let dot = (&a * &b)?.sum(1)?;
            let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
            let cos = (dot / norms.clamp(1e-12, f64::INFINITY)?)?;
            *s += cos.to_vec1::<f64>()?.iter().map(|c| 1.0 - c).sum::<f64>();
        }
        tokens += hidden.first().map_or(0, |h| h.dim(0).unwrap_or(0));
    }
    Ok(sum.into_iter().map(|s| s / tokens.max(1) as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lu(layer: usize, units: usize, root_width: usize, channel_width: usize) -> LayerUnits {
        LayerUnits { layer, units, root_width, channel_width, unit_name: "unit" }
    }

    #[test]
    fn local_count_follows_llm_pruner() {
        // Llama-3-8B k_proj: 8 KV heads of 128 at 0.25 → 2 heads; MLP 14336 → 3584 channels.
        assert_eq!(local_count(8, 128, 0.25), 2);
        assert_eq!(local_count(14336, 1, 0.25), 3584);
        // SmolLM2's 3 KV heads of 64 at 0.25: 48 channels, not one whole head.
        assert_eq!(local_count(3, 64, 0.25), 0);
        assert_eq!(local_count(3, 64, 0.34), 1);
        // Python's int(1536 * 0.7) = 1075.
        assert_eq!(local_count(1536, 1, 0.3), 1536 - 1075);
        assert_eq!(local_count(5, 1, 1.0), 5);
    }

    #[test]
    fn local_and_per_layer_counts() {
        let layers = [lu(0, 10, 1, 1), lu(1, 20, 1, 1)];
        let none = BTreeMap::new();
        let c = counts(Kind::Mlp, &layers, &none, &RatioMode::Local, 0.5, None, None).unwrap();
        assert_eq!(c, BTreeMap::from([(0, 5), (1, 10)]));
        let per = PerLayerRatios::from_json(r#"{"mlp": {"1": 0.25}}"#, "r.json").unwrap();
        let c = counts(Kind::Mlp, &layers, &none, &RatioMode::PerLayer(per), 0.0, None, None).unwrap();
        assert_eq!(c, BTreeMap::from([(0, 0), (1, 5)]));
        assert!(PerLayerRatios::from_json(r#"{"mlp": {"1": 1.5}}"#, "r.json").is_err());
        assert!(PerLayerRatios::from_json(r#"{"ffn": {}}"#, "r.json").is_err());
    }

    #[test]
    fn removing_everything_is_refused() {
        let layers = [lu(4, 3, 64, 192)];
        let e =
            counts(Kind::Attn, &layers, &BTreeMap::new(), &RatioMode::Local, 1.0, None, None).unwrap_err().to_string();
        assert!(e.contains("every unit of layer 4"), "{e}");
    }

    #[test]
    fn global_ranks_across_layers() {
        let layers = [lu(0, 3, 1, 1), lu(1, 3, 1, 1)];
        let scores = BTreeMap::from([(0, vec![0.1, 0.2, 0.9]), (1, vec![0.8, 0.05, 0.7])]);
        let c = counts(Kind::Mlp, &layers, &scores, &RatioMode::Global, 0.5, None, None).unwrap();
        assert_eq!(c, BTreeMap::from([(0, 2), (1, 1)]));
    }

    #[test]
    fn block_influence_keeps_the_total_and_prunes_quiet_layers_more() {
        let layers = [lu(0, 100, 1, 1), lu(1, 100, 1, 1), lu(2, 100, 1, 1)];
        let bi = [0.5, 0.1, 0.3];
        let c = counts(
            Kind::Mlp,
            &layers,
            &BTreeMap::new(),
            &RatioMode::BlockInfluence { strength: 1.0 },
            0.3,
            Some(&bi),
            None,
        )
        .unwrap();
        assert_eq!(c.values().sum::<usize>(), 90);
        assert!(c[&1] > c[&2] && c[&2] > c[&0], "{c:?}");
        // Equal influence: the local counts.
        let c = counts(
            Kind::Mlp,
            &layers,
            &BTreeMap::new(),
            &RatioMode::BlockInfluence { strength: 1.0 },
            0.3,
            Some(&[0.2; 3]),
            None,
        )
        .unwrap();
        assert_eq!(c, BTreeMap::from([(0, 30), (1, 30), (2, 30)]));
    }

    #[test]
    fn round_to_keeps_multiples() {
        let layers = [lu(0, 1536, 1, 1)];
        let c = counts(Kind::Mlp, &layers, &BTreeMap::new(), &RatioMode::Local, 0.3, None, Some(64)).unwrap();
        assert_eq!((1536 - c[&0]) % 64, 0);
        assert_eq!(1536 - c[&0], 1088); // 1075 kept, rounded up to 17 × 64
        let e = counts(Kind::Mlp, &layers, &BTreeMap::new(), &RatioMode::Local, 0.3, None, Some(2048))
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than layer 0's MLP width of 1536"), "{e}");
        // Attention: 3 KV groups of 192 q rows; multiples of 128 need an even count.
        let attn = [lu(2, 3, 64, 192)];
        let c = counts(Kind::Attn, &attn, &BTreeMap::new(), &RatioMode::Local, 0.34, None, Some(128)).unwrap();
        assert_eq!(c[&2], 1);
        let c = counts(Kind::Attn, &attn, &BTreeMap::new(), &RatioMode::Local, 0.67, None, Some(128)).unwrap();
        assert_eq!(c[&2], 1, "2 pruned leaves 192 rows; keep 2 groups = 384 rows");
    }
}
