//! The training loop: micro-batches through pare's differentiable forward, gradients accumulated
//! over a batch and normalised by its label count (HF Trainer's loss), clipped, then one AdamW
//! update at the schedule's rate. Checkpoints hold the adapter, the optimizer's moments and the
//! step, so a resumed run continues exactly where the interrupted one was.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use pare_formats::{save_safetensors, SafetensorsStore};
use pare_model::diff::{DiffModel, Probe, Role, Sample};
use pare_model::rng::mix;
use pare_model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::{shuffle, Example};
use crate::error::{FinetuneError, Result};
use crate::lora::Adapter;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use crate::peft;

#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub optim: AdamWConfig,
    pub schedule: Schedule,
    /// Sequences per optimizer update.
    pub batch_size: usize,
    /// Sequences per forward call (memory, not mathematics: the update is the same).
    pub micro_batch: usize,
    /// 0: no clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// The dtype the frozen weights compute in (the adapter's master weights stay f32).
    pub dtype: DType,
}

/// One update's numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Tokens run through the model (padding excluded).
    pub tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

pub struct Trainer<'d> {
    diff: DiffModel,
    /// (layer, role, A, B) in the order of the optimizer's moments.
    vars: Vec<(usize, Role, Var, Var)>,
    opt: AdamW,
    config: TrainConfig,
    adapter_config: crate::LoraConfig,
    train: &'d [Example],
    eval: &'d [Example],
    /// Updates taken.
    pub step: u64,
    pub log: Vec<StepLog>,
    /// The order of the epoch being read, and which epoch it is.
    order: (u64, Vec<usize>),
}

impl<'d> Trainer<'d> {
    pub fn new(
        model: &Model,
        adapter: &Adapter,
        config: TrainConfig,
        train: &'d [Example],
        eval: &'d [Example],
    ) -> Result<Self> {
        if config.batch_size == 0 || config.micro_batch == 0 {
            return Err(FinetuneError::input("`batch_size` and `micro_batch` must be at least 1"));
        }
        if train.is_empty() {
            return Err(FinetuneError::input("no training examples"));
        }
        if let Some(e) = train.iter().chain(eval).find(|e| e.ids.len() > model.config().max_position_embeddings) {
            return Err(FinetuneError::input(format!(
                "an example of {} tokens is longer than the model's {} positions (lower `max_len`)",
                e.ids.len(),
                model.config().max_position_embeddings
            )));
        }
        adapter.check_fits(model)?;
        let mut diff = DiffModel::new(model, config.dtype, |_, _| false)?;
        adapter.attach_to_diff(&mut diff)?;
        let vars: Vec<(usize, Role, Var, Var)> =
            diff.loras().into_iter().map(|(l, r, lora)| (l, r, lora.a.clone(), lora.b.clone())).collect();
        let opt = AdamW::new(&flat(&vars), config.optim)?;
        Ok(Trainer {
            diff,
            vars,
            opt,
            config,
            adapter_config: adapter.config.clone(),
            train,
            eval,
            step: 0,
            log: Vec::new(),
            order: (u64::MAX, Vec::new()),
        })
    }

    /// The examples of update `step`: positions step·B.. of an endless read where every epoch is
    /// a fresh seeded shuffle (so the batch of a step never depends on how the run got there).
    fn batch(&mut self, step: u64) -> Vec<&'d Example> {
        let n = self.train.len() as u64;
        let b = self.config.batch_size as u64;
        (step * b..(step + 1) * b)
            .map(|pos| {
                let epoch = pos / n;
                if self.order.0 != epoch {
                    let mut order: Vec<usize> = (0..self.train.len()).collect();
                    shuffle(&mut order, mix(self.config.seed ^ epoch.wrapping_mul(0x5851_F42D_4C95_7F2D)));
                    self.order = (epoch, order);
                }
                &self.train[self.order.1[(pos % n) as usize]]
            })
            .collect()
    }

    /// One update on the next batch; returns its log entry (also kept in `log`).
    pub fn step(&mut self) -> Result<StepLog> {
        let examples = self.batch(self.step);
        self.step_on(&examples)
    }

    /// One update on these examples.
    pub fn step_on(&mut self, examples: &[&Example]) -> Result<StepLog> {
        let labels: usize = examples.iter().map(|e| e.label_count()).sum();
        if labels == 0 {
            return Err(FinetuneError::input("a batch holds no label tokens"));
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len() * 2];
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for (m, micro) in examples.chunks(self.config.micro_batch).enumerate() {
            self.diff
                .set_lora_dropout(self.adapter_config.dropout, mix(self.config.seed ^ (self.step << 20) ^ m as u64))?;
            let samples: Vec<Sample> = micro.iter().map(|e| Sample { ids: &e.ids, labels: &e.labels }).collect();
            let (sum, _) = self.diff.loss_sum(&samples, &mut Probe::default())?;
            loss_sum += sum.to_scalar::<f64>()?;
            tokens += micro.iter().map(|e| e.ids.len()).sum::<usize>();
            let store = (sum / labels as f64)?.backward()?;
            for (slot, var) in grads.iter_mut().zip(flat(&self.vars)) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        self.diff.set_lora_dropout(0.0, 0)?;
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(flat(&self.vars))
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<std::result::Result<_, _>>()?;
        let grad_norm = clip_grad_norm(&mut grads, self.config.max_grad_norm)?;
        let lr = self.config.schedule.lr(self.step);
        self.opt.update(&flat(&self.vars), &grads, lr)?;
        self.step += 1;
        let entry = StepLog { step: self.step, lr, loss: loss_sum / labels as f64, grad_norm, tokens, eval_loss: None };
        if !entry.loss.is_finite() {
            return Err(FinetuneError::input(format!(
                "the loss became {} at step {} (lower `lr`?)",
                entry.loss, self.step
            )));
        }
        self.log.push(entry.clone());
        Ok(entry)
    }

    /// Mean token cross-entropy over the held-out examples (no dropout); recorded on the last
    /// log entry. None without held-out examples.
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let (mut sum, mut labels) = (0.0, 0);
        for micro in self.eval.chunks(self.config.micro_batch) {
            let samples: Vec<Sample> = micro.iter().map(|e| Sample { ids: &e.ids, labels: &e.labels }).collect();
            let (s, n) = self.diff.loss_sum(&samples, &mut Probe::default())?;
            sum += s.detach().to_scalar::<f64>()?;
            labels += n;
        }
        let loss = sum / labels as f64;
        if let Some(last) = self.log.last_mut() {
            last.eval_loss = Some(loss);
        }
        Ok(Some(loss))
    }

    /// The adapter as trained so far, on the host.
    pub fn adapter(&self) -> Result<Adapter> {
        Adapter::from_diff(&self.diff, &self.adapter_config)
    }

    /// Write a checkpoint into `dir` (created): the adapter in peft's format, the optimizer's
    /// moments, and `trainer_state.json` with the step, the log and what the run trains.
    pub fn save_checkpoint(&self, model: &Model, base_model: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| FinetuneError::io(dir, e))?;
        peft::save(&self.adapter()?, model, base_model, dir)?;
        let mut moments = Vec::new();
        for ((layer, role, _, _), pair) in self.vars.iter().zip(self.opt.moments.chunks(2)) {
            for (matrix, (m, v)) in ["A", "B"].iter().zip(pair) {
                moments.push((format!("{layer}.{}.{matrix}.exp_avg", role.name()), m.to_device(&Device::Cpu)?));
                moments.push((format!("{layer}.{}.{matrix}.exp_avg_sq", role.name()), v.to_device(&Device::Cpu)?));
            }
        }
        save_safetensors(&dir.join(OPTIMIZER_FILE), &moments, None)?;
        let state = json!({
            "step": self.step,
            "model": fingerprint(model),
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "log": self.log,
        });
        let path = dir.join(STATE_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&state).expect("serializable") + "\n")
            .map_err(|e| FinetuneError::io(&path, e))
    }

    /// Continue from a checkpoint written by [`Trainer::save_checkpoint`] for the same model:
    /// the adapter's values, the moments, the step and the log.
    pub fn resume(&mut self, model: &Model, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| FinetuneError::io(&path, e))?;
        let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| FinetuneError::Data {
            path: path.clone(),
            line: e.line(),
            message: e.to_string(),
        })?;
        if state.get("model") != Some(&fingerprint(model)) {
            return Err(FinetuneError::input(format!(
                "`resume`: {} was trained on another model (its architecture or layer shapes differ)",
                dir.display()
            )));
        }
        let adapter = peft::load(dir, model)?;
        if adapter.config.rank != self.adapter_config.rank || adapter.config.targets != self.adapter_config.targets {
            return Err(FinetuneError::input(format!(
                "`resume`: {} has rank {} on {:?}, this run asks for rank {} on {:?}",
                dir.display(),
                adapter.config.rank,
                adapter.config.targets.iter().map(|r| r.name()).collect::<Vec<_>>(),
                self.adapter_config.rank,
                self.adapter_config.targets.iter().map(|r| r.name()).collect::<Vec<_>>()
            )));
        }
        let moments = SafetensorsStore::open_files(&[dir.join(OPTIMIZER_FILE)])?;
        let device = self.diff.device().clone();
        let mut restored = Vec::with_capacity(self.opt.moments.len());
        for (layer, role, a, b) in &self.vars {
            let (src_a, src_b) = &adapter.weights[&(*layer, *role)];
            for (matrix, var, src) in [("A", a, src_a), ("B", b, src_b)] {
                var.set(&src.to_dtype(var.dtype())?.to_device(&device)?)?;
                let load = |kind: &str| -> Result<Tensor> {
                    let name = format!("{layer}.{}.{matrix}.{kind}", role.name());
                    Ok(moments.load(&name, var.dtype(), &device)?)
                };
                restored.push((load("exp_avg")?, load("exp_avg_sq")?));
            }
        }
        self.opt.moments = restored;
        self.step = state.get("step").and_then(serde_json::Value::as_u64).unwrap_or(0);
        self.opt.step = self.step;
        let log = state.get("log").cloned().unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
        self.log = serde_json::from_value(log).map_err(|e| FinetuneError::Data {
            path,
            line: 1,
            message: format!("\"log\": {e}"),
        })?;
        Ok(())
    }
}

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

fn flat(vars: &[(usize, Role, Var, Var)]) -> Vec<&Var> {
    vars.iter().flat_map(|(_, _, a, b)| [a, b]).collect()
}

/// What must match for a checkpoint to continue on a model: architecture, vocabulary and every
/// layer's projection shapes.
fn fingerprint(model: &Model) -> serde_json::Value {
    let layers: Vec<Vec<[usize; 2]>> = (0..model.num_layers())
        .map(|l| {
            Role::ALL
                .iter()
                .filter_map(|&r| model.linear(l, r).map(|lin| [lin.out_features(), lin.in_features()]))
                .collect()
        })
        .collect();
    json!({"arch": model.config().arch.model_type(), "vocab": model.config().vocab_size, "layers": layers})
}
