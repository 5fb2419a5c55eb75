//! pare's decoder: configuration, weights, layers, the KV cache, and the two-phase forward pass.
//!
//! The forward pass is written out here rather than borrowed, because pare's compression and
//! pruning stages hook into it: attention reads a cache whose entries keep their original
//! positions, and every layer's head counts and MLP width are read from its own weights.

pub mod attention;
pub mod cache;
pub mod config;
pub mod diff;
pub mod error;
pub mod export;
pub mod finite;
pub mod hooks;
pub mod layers;
pub mod loader;
pub mod memory;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod rng;
pub mod rope;
pub mod weights;

pub use cache::{KvCache, KvDtype, PAD_POSITION};
pub use config::{Arch, ModelConfig};
pub use error::{setting_names, spell_settings, ModelError, Result};
pub use hooks::{CachePress, Hooks, LayerContext, Phase, TokenPruner};
pub use loader::{load, LoadedModel};
pub use model::{left_pad, Logits, Model, PrefillInput};
pub use weights::WeightDType;
