//! Flags turned into objects once: every command that runs the model goes through here, so the
//! order is the same everywhere — the hook flags are checked before any weight loads, then the
//! model loads (and is split over `--tp` ranks), then the hooks are built for it.

use std::sync::Arc;

use anyhow::Result;
use candle_core::Device;
use pare_model::parallel::on_every_rank;
use pare_model::{Hooks, LoadedModel, Model};

use crate::common::{ModelArgs, ParallelArgs};
use crate::press_args::PressArgs;
use crate::token_prune_args::TokenPruneArgs;

/// A loaded model and the hooks the flags asked for.
pub struct Session {
    pub loaded: LoadedModel,
    pub hooks: Hooks,
    /// The model's ranks under `--tp` (none when it runs whole); `loaded` then holds the whole
    /// model (in host memory when the ranks are GPUs).
    pub ranks: Vec<Model>,
}

/// The hook flags, checked: what is left once the model is known.
pub struct HookPlan<'a> {
    press: Option<Box<dyn pare_model::CachePress>>,
    token_prune: &'a TokenPruneArgs,
}

impl<'a> HookPlan<'a> {
    /// Check the press and pruning flags (nothing loads).
    pub fn check(press: &PressArgs, token_prune: &'a TokenPruneArgs) -> Result<Self> {
        let press = press.build()?;
        token_prune.check()?;
        Ok(HookPlan { press, token_prune })
    }

    /// Load the model, split it as `--tp` asks, and build the hooks for it.
    pub fn open(self, model: &ModelArgs, parallel: &ParallelArgs) -> Result<Session> {
        let loaded = if parallel.over_gpus(model) { model.load_on(&Device::Cpu)? } else { model.load()? };
        let ranks = parallel.split(&loaded, model)?;
        let pruner = self.token_prune.build(loaded.model.num_layers(), None)?.map(Arc::from);
        let mut hooks = Hooks::new(self.press, pruner);
        hooks.bind(&loaded)?;
        Ok(Session { loaded, hooks, ranks })
    }
}

/// Whether `model` speaks for the run: the whole model, or rank 0 of a `--tp` split (every rank
/// computes the same results; one shows progress and streams).
pub fn reports(model: &Model) -> bool {
    model.shard().is_none_or(|s| s.rank() == 0)
}

impl Session {
    /// Check the hook flags, then load (and split) the model and build its hooks.
    pub fn open(
        model: &ModelArgs,
        parallel: &ParallelArgs,
        press: &PressArgs,
        token_prune: &TokenPruneArgs,
    ) -> Result<Session> {
        HookPlan::check(press, token_prune)?.open(model, parallel)
    }

    /// The device the model runs on: rank 0's under `--tp`.
    pub fn device(&self) -> &Device {
        self.ranks.first().map_or(self.loaded.model.device(), Model::device)
    }

    /// Run `work` on the model: once on the whole model, or on every rank of a `--tp` split at
    /// once, each rank running the same work (the collectives inside the forward keep them in
    /// step and give every rank the same logits). Results in rank order; the first is what a
    /// command reports, summing what each rank holds (cache bytes) where it matters.
    pub fn on_model<T: Send>(&self, work: impl Fn(&Model) -> Result<T> + Sync) -> Result<Vec<T>> {
        if self.ranks.is_empty() {
            return Ok(vec![work(&self.loaded.model)?]);
        }
        on_every_rank(&self.ranks, |m| &m.shard().expect("a rank of a split model").comm, work)
    }

    /// Whether any hook acts (reports then show what it saved).
    pub fn hooked(&self) -> bool {
        !self.hooks.is_empty()
    }
}
