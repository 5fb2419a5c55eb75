//! Flags turned into objects once: every command that runs the model goes through here, so the
//! order is the same everywhere — the hook flags are checked before any weight loads, then the
//! model loads (and is split over `--tp` ranks), then the hooks are built for it.

use std::sync::Arc;

use anyhow::Result;
use pare_model::{Hooks, LoadedModel};

use crate::common::{ModelArgs, ParallelArgs};
use crate::press_args::PressArgs;
use crate::token_prune_args::TokenPruneArgs;

/// A loaded model (split as `--tp` asks) and the hooks the flags asked for.
pub struct Session {
    pub loaded: LoadedModel,
    pub hooks: Hooks,
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
        let loaded = parallel.load(model)?;
        let pruner = self.token_prune.build(loaded.model.num_layers(), None)?.map(Arc::from);
        let mut hooks = Hooks::new(self.press, pruner);
        hooks.bind(&loaded)?;
        Ok(Session { loaded, hooks })
    }
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

    /// Whether any hook acts (reports then show what it saved).
    pub fn hooked(&self) -> bool {
        !self.hooks.is_empty()
    }
}
