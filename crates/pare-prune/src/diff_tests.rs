//! The differentiable forward (pare-model's `diff`) on the tiny models pruning is tested on.

mod tests {
    use candle_core::{DType, Device, Tensor};
    use pare_model::diff::{DiffModel, Probe};

    use crate::groups::Role;
    use crate::testing::tiny_model;

    #[test]
    fn logits_match_the_engine() {
        let model = tiny_model(&Device::Cpu, 2, 8, 2, 1);
        let ids: Vec<u32> = (0..23).map(|i| (i * 37 % 200) as u32 + 3).collect();
        let engine = pare_test_support::logits_all(&model, &ids).unwrap();
        let diff = DiffModel::new(&model, DType::F32, |_, _| false).unwrap();
        let ours = diff.forward(&ids, &mut Probe::default()).unwrap();
        let delta = pare_test_support::max_abs_diff(&engine, &ours);
        assert!(delta < 1e-4, "max |Δlogit| = {delta}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        // f64 so that central differences are accurate to ~1e-9.
        let model = tiny_model(&Device::Cpu, 2, 8, 2, 3);
        let ids: Vec<u32> = (0..12).map(|i| (i * 53 % 250) as u32 + 1).collect();
        let diff = DiffModel::new(&model, DType::F64, |l, _| l == 1 || l == 0).unwrap();
        let loss = diff.loss(&ids, &mut Probe::default()).unwrap();
        let grads = loss.backward().unwrap();
        let eps = 1e-5;
        let mut checked = 0;
        for (l, role, var) in diff.vars() {
            let g = grads.get(var.as_tensor()).expect("gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let w0 = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            // A few elements per tensor, spread over it.
            for &i in &[0, w0.len() / 3, w0.len() / 2 + 1, w0.len() - 1] {
                let at = |delta: f64| -> f64 {
                    let mut w = w0.clone();
                    w[i] += delta;
                    var.set(&Tensor::from_vec(w, var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                    diff.loss(&ids, &mut Probe::default()).unwrap().to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(w0.clone(), var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                let tol = 1e-9 + 1e-7 * fd.abs().max(g[i].abs());
                assert!(
                    (fd - g[i]).abs() < tol,
                    "layer {l} {role:?}[{i}]: autograd {} vs finite difference {fd}",
                    g[i]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * 7 * 4);
    }

    #[test]
    fn forward_from_a_layer_continues_the_full_forward() {
        let model = tiny_model(&Device::Cpu, 3, 4, 2, 7);
        let diff = DiffModel::new(&model, DType::F32, |_, _| false).unwrap();
        let ids: Vec<u32> = (0..10).map(|i| (i * 29 % 240) as u32 + 2).collect();
        let full = diff.forward(&ids, &mut Probe::default()).unwrap();
        let hidden = diff.hidden_until(&ids, 2).unwrap();
        assert_eq!(hidden.len(), 3);
        let zero = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
        let tail = diff.forward_from(2, &hidden[2], &zero, 4).unwrap();
        let delta = pare_test_support::max_abs_diff(&full.narrow(0, 4, 6).unwrap(), &tail);
        assert!(delta < 1e-5, "{delta}");
        // A bias on a key changes later rows only.
        let mut bias = vec![0f32; 10];
        bias[5] = -30.0;
        let biased = diff.forward_from(2, &hidden[2], &Tensor::new(bias, &Device::Cpu).unwrap(), 0).unwrap();
        let rows = |t: &Tensor, a: usize, n: usize| t.narrow(0, a, n).unwrap();
        let same = pare_test_support::max_abs_diff(&rows(&full, 0, 5), &rows(&biased, 0, 5));
        let moved = pare_test_support::max_abs_diff(&rows(&full, 6, 4), &rows(&biased, 6, 4));
        assert!(same < 1e-5 && moved > 1e-3, "{same} {moved}");
        assert!(diff.forward_from(2, &hidden[2], &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(), 0).is_err());
    }

    #[test]
    fn probe_records_hidden_states_and_input_norms() {
        let model = tiny_model(&Device::Cpu, 3, 4, 2, 5);
        let diff = DiffModel::new(&model, DType::F32, |_, _| false).unwrap();
        let mut probe = Probe { record_hidden: true, record_inputs: true, ..Probe::default() };
        diff.forward(&[5, 6, 7, 8], &mut probe).unwrap();
        assert_eq!(probe.hidden.len(), 4);
        assert_eq!(probe.input_tokens, 4);
        assert_eq!(probe.input_sq_sums.len(), 3 * 4);
        let q_in = &probe.input_sq_sums[&(0, Role::Q)];
        assert_eq!(q_in.dims(), &[model.config().hidden_size]);
        let down_in = &probe.input_sq_sums[&(2, Role::Down)];
        assert_eq!(down_in.dims(), &[model.blocks()[2].mlp.width()]);
    }
}
