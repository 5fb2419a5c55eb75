//! Which projections get a LoRA adapter, how large and how scaled, and the adapter's values.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use pare_model::diff::{DiffModel, Role};
use pare_model::export::hf_module_name;
use pare_model::rng::SplitMix64;
use pare_model::{Arch, Model};

use crate::error::{FinetuneError, Result};

/// peft's `LoraConfig`, the parts pare trains with.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Projections adapted in every layer, in [`Role::ALL`] order.
    pub targets: Vec<Role>,
    /// Rank-stabilized scaling, alpha / √rank (peft's `use_rslora`), instead of alpha / rank.
    pub rslora: bool,
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f64, dropout: f64, targets: &[Role]) -> Result<Self> {
        if rank == 0 {
            return Err(FinetuneError::input("`lora_r` must be at least 1"));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(FinetuneError::input(format!("`lora_alpha` must be positive, got {alpha}")));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(FinetuneError::input(format!("`lora_dropout` must be in [0, 1), got {dropout}")));
        }
        if targets.is_empty() {
            return Err(FinetuneError::input("no LoRA target module given"));
        }
        let targets = Role::ALL.into_iter().filter(|r| targets.contains(r)).collect();
        Ok(LoraConfig { rank, alpha, dropout, targets, rslora: false })
    }

    /// What the adapter's product is multiplied by before it is added.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Every projection of the architecture that HF keeps as a module of its own: all seven for
    /// the Llama family (LLM-Pruner's post-training default), o/up/down for GPT-NeoX.
    pub fn default_targets(arch: Arch) -> Vec<Role> {
        Role::ALL.into_iter().filter(|&r| hf_module_name(arch, 0, r).is_some()).collect()
    }

    /// Target modules from `q,k,v,o,gate,up,down` (peft's names such as `q_proj` also accepted).
    pub fn parse_targets(list: &str) -> Result<Vec<Role>> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let short = name.strip_suffix("_proj").unwrap_or(name);
            let role = Role::ALL.into_iter().find(|r| r.name() == short).ok_or_else(|| {
                FinetuneError::input(format!("unknown LoRA target \"{name}\" (expected q, k, v, o, gate, up, down)"))
            })?;
            if !out.contains(&role) {
                out.push(role);
            }
        }
        Ok(out)
    }
}

/// Checks that every target is a module of its own in this architecture and in every layer.
pub fn check_targets(model: &Model, targets: &[Role]) -> Result<()> {
    let arch = model.config().arch;
    for &role in targets {
        if hf_module_name(arch, 0, role).is_none() {
            let why = match role {
                Role::Gate => "its MLP has no gate projection",
                _ => "HF fuses q, k and v into one query_key_value module",
            };
            return Err(FinetuneError::input(format!(
                "LoRA target \"{}\": {} has no such module ({why}); available: {}",
                role.name(),
                arch.model_type(),
                LoraConfig::default_targets(arch).iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
            )));
        }
        if let Some(l) = (0..model.num_layers()).find(|&l| model.linear(l, role).is_none()) {
            return Err(FinetuneError::input(format!("LoRA target \"{}\": layer {l} has no such map", role.name())));
        }
    }
    Ok(())
}

/// A LoRA adapter: per (layer, role), A (rank, in) and B (out, rank), on the host.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    pub weights: BTreeMap<(usize, Role), (Tensor, Tensor)>,
}

impl Adapter {
    /// peft's initialisation: A kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in), and B = 0,
    /// so the adapted model starts out equal to the base. Seeded, so a run repeats.
    pub fn init(model: &Model, config: LoraConfig, seed: u64) -> Result<Adapter> {
        check_targets(model, &config.targets)?;
        let mut rng = SplitMix64::new(seed);
        let mut weights = BTreeMap::new();
        for layer in 0..model.num_layers() {
            for &role in &config.targets {
                let linear = model.linear(layer, role).expect("checked above");
                let (out, input) = (linear.out_features(), linear.in_features());
                let bound = 1.0 / (input as f64).sqrt();
                let a: Vec<f32> =
                    (0..config.rank * input).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
                let a = Tensor::from_vec(a, (config.rank, input), &Device::Cpu)?;
                let b = Tensor::zeros((out, config.rank), DType::F32, &Device::Cpu)?;
                weights.insert((layer, role), (a, b));
            }
        }
        Ok(Adapter { config, weights })
    }

    /// Checks every matrix against the model's maps (a pruned model's widths differ per layer).
    pub fn check_fits(&self, model: &Model) -> Result<()> {
        check_targets(model, &self.config.targets)?;
        for (&(layer, role), (a, b)) in &self.weights {
            let linear = model.linear(layer, role).ok_or_else(|| {
                FinetuneError::input(format!("the adapter has layer {layer}, the model {} layers", model.num_layers()))
            })?;
            let (out, input) = (linear.out_features(), linear.in_features());
            if a.dims() != [self.config.rank, input] || b.dims() != [out, self.config.rank] {
                return Err(FinetuneError::input(format!(
                    "the adapter's layer {layer} {} has A {:?} and B {:?}; the model's map is {out}×{input} (was it \
                     trained on another model?)",
                    role.name(),
                    a.dims(),
                    b.dims()
                )));
            }
        }
        Ok(())
    }

    /// Apply the adapter unmerged, for inference (`pare generate --adapter`).
    pub fn attach(&self, model: &mut Model) -> Result<()> {
        self.check_fits(model)?;
        let scale = self.config.scale();
        for (&(layer, role), (a, b)) in &self.weights {
            model.attach_lora(layer, role, a, b, scale)?;
        }
        Ok(())
    }

    /// Train the adapter: its matrices become the differentiable model's variables.
    pub fn attach_to_diff(&self, diff: &mut DiffModel) -> Result<()> {
        let scale = self.config.scale();
        for (&(layer, role), (a, b)) in &self.weights {
            diff.attach_lora(layer, role, a, b, scale)?;
        }
        Ok(())
    }

    /// The adapter's current values in a differentiable model, copied to the host.
    pub fn from_diff(diff: &DiffModel, config: &LoraConfig) -> Result<Adapter> {
        let mut weights = BTreeMap::new();
        for (layer, role, lora) in diff.loras() {
            let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.copy()?) };
            weights.insert((layer, role), (host(lora.a.as_tensor())?, host(lora.b.as_tensor())?));
        }
        Ok(Adapter { config: config.clone(), weights })
    }

    pub fn param_count(&self) -> usize {
        self.weights.values().map(|(a, b)| a.elem_count() + b.elem_count()).sum()
    }
}
