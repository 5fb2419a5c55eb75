//! Flags turned into objects once: every command that runs the model goes through here, so the
//! order is the same everywhere — the hook flags are checked before any weight loads, then the
//! model loads, then the hooks are built for it.

use std::sync::Arc;

use anyhow::Result;
use pare_model::{Hooks, LoadedModel};

use crate::common::ModelArgs;
use crate::press_args::PressArgs;
use crate::prune_args::PruneArgs;

/// A loaded model and the hooks the flags asked for.
pub struct Session {
    pub loaded: LoadedModel,
    pub hooks: Hooks,
}

impl Session {
    pub fn open(model: &ModelArgs, press: &PressArgs, prune: &PruneArgs) -> Result<Session> {
        let press = press.build()?;
        prune.check()?;
        let loaded = model.load()?;
        let pruner = prune.build(loaded.model.num_layers(), None)?.map(Arc::from);
        Ok(Session { loaded, hooks: Hooks::new(press, pruner) })
    }

    /// Whether any hook acts (reports then show what it saved).
    pub fn hooked(&self) -> bool {
        !self.hooks.is_empty()
    }
}
