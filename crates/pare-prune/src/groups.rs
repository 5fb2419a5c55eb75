//! Coupled groups, written out per architecture instead of traced: which rows and columns of
//! which tensors go together when one head or one channel is removed.
//!
//! Every group is scored in a "root" channel space, as LLM-Pruner scores the channels of its root
//! module (k_proj for attention, gate_proj for the MLP): each coupled tensor contributes a
//! per-channel local importance along the axis it is cut on, mapped onto the root channels;
//! the contributions are reduced (sum, mean or max) per root channel, and a unit (one head, one
//! MLP channel) sums its consecutive root channels.

use serde::{Deserialize, Serialize};

use crate::error::{PruneError, Result};

/// How attention is cut under grouped-query attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GqaMode {
    /// A unit is one KV head with all the query heads that read it: k/v rows, q rows, o columns.
    KvGroups,
    /// A unit is one query head (q rows, o columns); KV heads stay, and every KV group loses the
    /// same number of query heads.
    QueryHeads,
}

impl GqaMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "kv-groups" => Ok(GqaMode::KvGroups),
            "query-heads" => Ok(GqaMode::QueryHeads),
            other => Err(PruneError::input(format!("unknown `gqa` {other:?} (expected kv-groups or query-heads)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GqaMode::KvGroups => "kv-groups",
            GqaMode::QueryHeads => "query-heads",
        }
    }
}

/// A prunable tensor of a decoder layer, by its HF role.
pub use pare_model::diff::Role;

/// Which side of an (out, in) weight a group cuts: output rows (and bias) or input columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    Rows,
    Cols,
}

/// The two kinds of groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Attn,
    Mlp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Attn => "attention",
            Kind::Mlp => "mlp",
        }
    }
}

/// One layer's attention geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// A coupled member: a tensor and the axis its channels are cut on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub role: Role,
    pub axis: Axis,
}

const fn m(role: Role, axis: Axis) -> Member {
    Member { role, axis }
}

/// The coupled members of an attention unit. The root (k for KV groups, q for query heads) is first.
pub fn attn_members(mode: GqaMode) -> &'static [Member] {
    const KV: [Member; 4] =
        [m(Role::K, Axis::Rows), m(Role::Q, Axis::Rows), m(Role::V, Axis::Rows), m(Role::O, Axis::Cols)];
    const QH: [Member; 2] = [m(Role::Q, Axis::Rows), m(Role::O, Axis::Cols)];
    match mode {
        GqaMode::KvGroups => &KV,
        GqaMode::QueryHeads => &QH,
    }
}

/// The coupled members of an MLP channel: gate and up rows, down column (no gate in GPT-NeoX).
pub fn mlp_members(gated: bool) -> &'static [Member] {
    const GATED: [Member; 3] = [m(Role::Gate, Axis::Rows), m(Role::Up, Axis::Rows), m(Role::Down, Axis::Cols)];
    const PLAIN: [Member; 2] = [m(Role::Up, Axis::Rows), m(Role::Down, Axis::Cols)];
    if gated {
        &GATED
    } else {
        &PLAIN
    }
}

/// Root channels of an attention layer: KV channels (kv_heads × head_dim) or query channels.
pub fn attn_root_channels(mode: GqaMode, s: AttnShape) -> usize {
    match mode {
        GqaMode::KvGroups => s.num_kv_heads * s.head_dim,
        GqaMode::QueryHeads => s.num_heads * s.head_dim,
    }
}

/// The root channel that channel `c` of `member` maps to. Query channel `h·d + i` belongs to KV
/// head `h / group` (HF's `repeat_kv` order), so under KV groups it maps to `(h / group)·d + i`;
/// the contributions of a group's query heads add up there.
pub fn attn_root_of(mode: GqaMode, s: AttnShape, member: Member, c: usize) -> usize {
    match (mode, member.role) {
        (GqaMode::KvGroups, Role::Q | Role::O) => {
            let (h, i) = (c / s.head_dim, c % s.head_dim);
            (h / s.group()) * s.head_dim + i
        }
        _ => c,
    }
}

/// Check a (kept query heads, kept KV heads) pair: ascending, in range, each kept query head's
/// KV head kept, and every kept KV head keeping the same positive number of query heads (the
/// engine's GQA needs equal groups).
pub fn check_attn_keep(s: AttnShape, kept_heads: &[usize], kept_kv_heads: &[usize]) -> std::result::Result<(), String> {
    let ascending = |v: &[usize], n: usize| v.windows(2).all(|w| w[0] < w[1]) && v.iter().all(|&x| x < n);
    if !ascending(kept_heads, s.num_heads) || !ascending(kept_kv_heads, s.num_kv_heads) {
        return Err(format!(
            "kept heads must be ascending and below {} (KV heads below {})",
            s.num_heads, s.num_kv_heads
        ));
    }
    if kept_kv_heads.is_empty() {
        return Err("keeps no head".into());
    }
    let group = s.group();
    let mut per_kv = vec![0usize; s.num_kv_heads];
    for &h in kept_heads {
        per_kv[h / group] += 1;
    }
    for (kv, &n) in per_kv.iter().enumerate() {
        let kept = kept_kv_heads.contains(&kv);
        if kept != (n > 0) {
            return Err(format!(
                "KV head {kv} is {} but {n} of its query heads are kept",
                if kept { "kept" } else { "removed" }
            ));
        }
    }
    let first = per_kv[kept_kv_heads[0]];
    if kept_kv_heads.iter().any(|&kv| per_kv[kv] != first) {
        return Err("every kept KV head must keep the same number of query heads".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: AttnShape = AttnShape { num_heads: 8, num_kv_heads: 2, head_dim: 4 };

    #[test]
    fn query_channels_map_to_their_kv_head() {
        let q = m(Role::Q, Axis::Rows);
        // Heads 0..4 read KV head 0, heads 4..8 read KV head 1 (repeat_kv).
        assert_eq!(attn_root_of(GqaMode::KvGroups, S, q, 0), 0);
        assert_eq!(attn_root_of(GqaMode::KvGroups, S, q, 3 * 4 + 2), 2);
        assert_eq!(attn_root_of(GqaMode::KvGroups, S, q, 4 * 4 + 1), 4 + 1);
        assert_eq!(attn_root_of(GqaMode::KvGroups, S, q, 7 * 4 + 3), 4 + 3);
        assert_eq!(attn_root_of(GqaMode::QueryHeads, S, q, 29), 29);
        let k = m(Role::K, Axis::Rows);
        assert_eq!(attn_root_of(GqaMode::KvGroups, S, k, 6), 6);
        assert_eq!(attn_root_channels(GqaMode::KvGroups, S), 8);
        assert_eq!(attn_root_channels(GqaMode::QueryHeads, S), 32);
    }

    #[test]
    fn keep_sets_are_checked() {
        assert!(check_attn_keep(S, &[4, 5, 6, 7], &[1]).is_ok());
        assert!(check_attn_keep(S, &[0, 2, 5, 7], &[0, 1]).is_ok());
        assert!(check_attn_keep(S, &[0, 2, 5], &[0, 1]).is_err(), "unequal groups");
        assert!(check_attn_keep(S, &[0, 1], &[0, 1]).is_err(), "KV head 1 kept without query heads");
        assert!(check_attn_keep(S, &[], &[]).is_err(), "empty");
        assert!(check_attn_keep(S, &[1, 0], &[0]).is_err(), "not ascending");
        assert!(check_attn_keep(S, &[8], &[1]).is_err(), "out of range");
    }
}
