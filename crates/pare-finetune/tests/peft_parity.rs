//! LoRA training against HF peft + torch AdamW (tools/reference/make_lora_fixtures.py): the same
//! starting adapter and batches on the tiny random Llama, in f64, give the same losses, gradient
//! norms, learning rates and updated adapter (within 1e-5: HF's RMSNorm computes in f32 even in
//! an f64 model); the adapter's logits match peft's unmerged and merged models.

use candle_core::{DType, Device, Tensor};
use pare_finetune::data::Example;
use pare_finetune::optim::{AdamWConfig, Decay, Schedule};
use pare_finetune::train::{TrainConfig, Trainer};
use pare_finetune::{peft, Adapter};
use pare_model::diff::{DiffModel, Probe, Sample};
use pare_model::{Model, WeightDType};
use pare_test_support::{fixture, fixture_path, logits_all, max_abs_diff};
use serde_json::Value;

fn tiny(dtype: DType) -> Model {
    let path = fixture_path("llama-tiny/model");
    pare_model::load(path.to_str().unwrap(), WeightDType::Float(dtype), &Device::Cpu).unwrap().model
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap()
}

fn config(train: &Value, micro_batch: usize) -> TrainConfig {
    let betas = train["betas"].as_array().unwrap();
    TrainConfig {
        optim: AdamWConfig {
            lr: f(train, "lr"),
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: f(train, "eps"),
            weight_decay: f(train, "weight_decay"),
        },
        schedule: Schedule {
            peak: f(train, "lr"),
            warmup_steps: train["warmup_steps"].as_u64().unwrap(),
            total_steps: train["total_steps"].as_u64().unwrap(),
            decay: Decay::Linear,
        },
        batch_size: 2,
        micro_batch,
        max_grad_norm: f(train, "max_grad_norm"),
        seed: 0,
        dtype: DType::F64,
    }
}

fn batches(train: &Value) -> Vec<Vec<Example>> {
    train["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b.as_array()
                .unwrap()
                .iter()
                .map(|s| Example {
                    ids: s["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect(),
                    labels: s["labels"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect(),
                })
                .collect()
        })
        .collect()
}

fn logits_of(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let n = rows.len();
    Tensor::from_vec(rows.concat(), (n, 256), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

/// pare's engine (f32) with `adapter` attached: logits of the probe sequence.
fn adapted_logits(adapter: &Adapter, ids: &[u32], merge: bool) -> Tensor {
    let mut model = tiny(DType::F32);
    adapter.attach(&mut model).unwrap();
    if merge {
        model.merge_lora().unwrap();
    }
    logits_all(&model, ids).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn training_steps_match_peft_and_torch_adamw() {
    let train = fixture("lora/train.json");
    let logits = fixture("lora/logits.json");
    let probe: Vec<u32> = logits["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let model = tiny(DType::F64);
    let init = peft::load(&fixture_path("lora/init"), &model).unwrap();
    assert_eq!(init.config.rank, 4);
    assert_eq!(init.config.scale(), 2.0);
    assert!(max_abs_diff(&adapted_logits(&init, &probe, false), &logits_of(&logits["before"])) < 1e-4);

    let batches = batches(&train);
    let expected = train["steps"].as_array().unwrap();
    for micro_batch in [1, 2] {
        assert!(Trainer::new(&model, &init, config(&train, micro_batch), &[], &[]).is_err());
        let all: Vec<Example> = batches.concat();
        let mut trainer = Trainer::new(&model, &init, config(&train, micro_batch), &all, &[]).unwrap();
        for (batch, want) in batches.iter().zip(expected) {
            let log = trainer.step_on(&batch.iter().collect::<Vec<_>>()).unwrap();
            assert!((log.loss - f(want, "loss")).abs() < 1e-5, "loss {} vs {}", log.loss, want["loss"]);
            assert!((log.grad_norm - f(want, "grad_norm")).abs() < 1e-5, "{} vs {}", log.grad_norm, want["grad_norm"]);
            assert!((log.lr - f(want, "lr")).abs() < 1e-15, "lr {} vs {}", log.lr, want["lr"]);
        }
        let trained = trainer.adapter().unwrap();
        let after = pare_formats::SafetensorsStore::open_files(&[fixture_path("lora/after.safetensors")]).unwrap();
        let mut compared = 0;
        for name in after.names() {
            let (layer, role, matrix) = parse_name(&name);
            let (a, b) = &trained.weights[&(layer, role)];
            let ours = if matrix == "A" { a } else { b };
            let theirs = after.load(&name, DType::F64, &Device::Cpu).unwrap();
            let diff = (ours.to_dtype(DType::F64).unwrap() - theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f64>().unwrap() < 1e-5, "{name}: {diff}");
            compared += 1;
        }
        assert_eq!(compared, 2 * 7 * 2);
        let adapted = adapted_logits(&trained, &probe, false);
        assert!(max_abs_diff(&adapted, &logits_of(&logits["after"])) < 1e-4);
        let merged = adapted_logits(&trained, &probe, true);
        assert!(max_abs_diff(&merged, &logits_of(&logits["merged"])) < 1e-4);
        assert!(max_abs_diff(&merged, &adapted) < 1e-4);
    }
}

/// `base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight` → (1, Q, "A").
fn parse_name(name: &str) -> (usize, pare_model::diff::Role, &str) {
    let parts: Vec<&str> = name.split('.').collect();
    let layer = parts[4].parse().unwrap();
    let module = parts[6].strip_suffix("_proj").unwrap();
    let role = pare_model::diff::Role::ALL.into_iter().find(|r| r.name() == module).unwrap();
    (layer, role, parts[7].strip_prefix("lora_").unwrap())
}

#[test]
fn schedules_match_transformers() {
    let sched = fixture("lora/schedule.json");
    for (name, decay) in [("linear", Decay::Linear), ("cosine", Decay::Cosine)] {
        let s = &sched[name];
        let schedule = Schedule {
            peak: 1.0,
            warmup_steps: s["warmup_steps"].as_u64().unwrap(),
            total_steps: s["total_steps"].as_u64().unwrap(),
            decay,
        };
        for (step, want) in s["lr"].as_array().unwrap().iter().enumerate() {
            let got = schedule.lr(step as u64);
            assert!((got - want.as_f64().unwrap()).abs() < 1e-12, "{name} step {step}: {got} vs {want}");
        }
    }
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let model = tiny(DType::F64);
    let adapter = peft::load(&fixture_path("lora/init"), &model).unwrap();
    let mut diff = DiffModel::new(&model, DType::F64, |_, _| false).unwrap();
    adapter.attach_to_diff(&mut diff).unwrap();
    let ids: Vec<u32> = vec![9, 200, 31, 77, 4, 150, 66, 12];
    let labels: Vec<bool> = (0..ids.len()).map(|i| i >= 3).collect();
    let loss = |diff: &DiffModel| -> f64 {
        let (sum, n) = diff.loss_sum(&[Sample { ids: &ids, labels: &labels }], &mut Probe::default()).unwrap();
        sum.to_scalar::<f64>().unwrap() / n as f64
    };
    let (sum, n) = diff.loss_sum(&[Sample { ids: &ids, labels: &labels }], &mut Probe::default()).unwrap();
    let grads = (sum / n as f64).unwrap().backward().unwrap();
    let h = 1e-6;
    let loras = diff.loras();
    for (layer, role, lora) in loras.iter().step_by(3) {
        for var in [&lora.a, &lora.b] {
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in [0, values.len() / 2, values.len() - 1] {
                let nudged = |delta: f64| {
                    let mut v = values.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    let l = loss(&diff);
                    var.set(&Tensor::from_vec(values.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                    l
                };
                let numeric = (nudged(h) - nudged(-h)) / (2.0 * h);
                assert!(
                    (numeric - g[i]).abs() < 1e-6 * (1.0 + g[i].abs()),
                    "layer {layer} {role:?}[{i}]: {numeric} vs {}",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn a_new_adapter_leaves_the_model_unchanged_and_round_trips_through_peft_files() {
    let model = tiny(DType::F32);
    let config =
        pare_finetune::LoraConfig::new(8, 16.0, 0.05, &pare_finetune::LoraConfig::default_targets(model.config().arch))
            .unwrap();
    let adapter = Adapter::init(&model, config, 3).unwrap();
    let ids = [5u32, 6, 7, 8, 9];
    let base = logits_all(&model, &ids).unwrap();
    let mut adapted = model.clone();
    adapter.attach(&mut adapted).unwrap();
    assert_eq!(max_abs_diff(&base, &logits_all(&adapted, &ids).unwrap()), 0.0);
    let dir = tempfile::tempdir().unwrap();
    peft::save(&adapter, &model, "llama-tiny", dir.path()).unwrap();
    let back = peft::load(dir.path(), &model).unwrap();
    assert_eq!(back.config, adapter.config);
    for (key, (a, b)) in &adapter.weights {
        let (a2, b2) = &back.weights[key];
        assert_eq!(max_abs_diff(a, a2), 0.0);
        assert_eq!(max_abs_diff(b, b2), 0.0);
    }
}
