//! FLOPs and KV-cache memory of pare's runs: exact matmul counts by component from a model's
//! shapes (prefill and decode, with prefill token pruning and KV-cache budgets), the unpruned
//! baseline they save against, and the closed-form estimates of seed 000 (4·s²·h), seed 004's
//! lecture (24·s·h² + 4·s²·h) and FastV (4nd² + 2n²d + 2ndm).

pub mod error;
pub mod flops;
pub mod formulas;
pub mod report;

pub use error::{FlopsError, Result};
pub use flops::{
    analyze, seq_per_layer, Analysis, Components, KvPolicy, LayerShape, Scenario, SpanKind, TextShapes, VisionShapes,
};
pub use formulas::Formula;
pub use report::{FlopsReport, Measured, MeasuredRun, ModelSummary, ScenarioSummary};
