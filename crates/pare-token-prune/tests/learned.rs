//! The learned token scorer on a tiny random Llama: file round trip, the hard top-KEEP choice
//! inside the engine's pruned prefill, gradients against finite differences, training that beats
//! random selection, and one-line errors.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pare_model::{Hooks, Model, PrefillInput};
use pare_test_support as ts;
use pare_test_support::TinyLlama;
use pare_token_prune::learned::top_keep;
use pare_token_prune::train::{hard_nll, initial_net, sample_loss, samples, train, Frozen, MaskKind, TrainSettings};
use pare_token_prune::{LearnedScorer, PruneSchedule, Pruner, ScorerInfo, ScorerNet, ScorerShape, Span, TokenScorer};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A random Llama: `layers` layers, 4 query heads of dim 8 over 2 KV heads (hidden 32), MLP
/// width 48, vocabulary 256, written as an HF directory and loaded by pare's loader.
fn tiny_model(layers: usize, seed: u64, dtype: DType) -> Model {
    tiny_model_with(layers, seed, dtype, |_| {})
}

/// Tokens 128.. are "markers": in layers 2.. every query attends almost only to them (a flag
/// channel in their embeddings meets a constant channel every token carries, on the rotary pair
/// RoPE barely turns). What the tail predicts then hangs on the span's markers alone: a scorer
/// that keeps them keeps the prediction, and they are identifiable from the hidden states.
fn marker_model(seed: u64) -> Model {
    tiny_model_with(4, seed, DType::F32, |tensors| {
        for (name, t) in tensors.iter_mut().filter(|(_, t)| t.rank() == 2) {
            let mut v: Vec<Vec<f32>> = t.to_vec2().unwrap();
            if name == "model.embed_tokens.weight" {
                for (id, row) in v.iter_mut().enumerate() {
                    row[1] = 3.0;
                    row[0] = if id >= 128 { 3.0 } else { 0.0 };
                }
            }
            let layer: Option<usize> =
                name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok());
            if layer.is_some_and(|l| l >= 2) && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) {
                // Dim 3 of every head: the pair (3, 7) has RoPE's lowest frequency.
                let source = if name.ends_with("q_proj.weight") { 1 } else { 0 };
                for head in 0..v.len() / 8 {
                    let row = &mut v[head * 8 + 3];
                    row.iter_mut().for_each(|w| *w = 0.0);
                    row[source] = 3.0;
                    v[head * 8 + 7].iter_mut().for_each(|w| *w = 0.0);
                }
            }
            *t = Tensor::new(v, &Device::Cpu).unwrap();
        }
    })
}

/// `rows` samples of `span` tokens (a quarter of them markers, at random places) followed by
/// `tail` tokens the marker model samples after them (temperature 1), concatenated.
fn marker_samples(model: &Model, rows: usize, span: usize, tail: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let spans: Vec<Vec<u32>> = (0..rows)
        .map(|_| {
            let mut row: Vec<u32> = (0..span)
                .map(|i| if i < span / 4 { rng.random_range(128..256) } else { rng.random_range(3..128) })
                .collect();
            row.shuffle(&mut rng);
            row
        })
        .collect();
    let mut seqs = spans.clone();
    let (mut logits, mut cache) = ts::prefill(model, &spans).unwrap();
    for step in 0..tail {
        let next = sample(&logits, &mut rng);
        for (s, &t) in seqs.iter_mut().zip(&next) {
            s.push(t);
        }
        if step + 1 < tail {
            logits = ts::decode(model, &mut cache, &next).unwrap();
        }
    }
    seqs.concat()
}

fn sample(logits: &Tensor, rng: &mut rand::rngs::StdRng) -> Vec<u32> {
    let probs = candle_nn::ops::softmax_last_dim(logits).unwrap().to_vec2::<f32>().unwrap();
    probs
        .iter()
        .map(|p| {
            let mut u = rng.random::<f32>();
            p.iter()
                .position(|&q| {
                    u -= q;
                    u <= 0.0
                })
                .unwrap_or(p.len() - 1) as u32
        })
        .collect()
}

fn tiny_model_with(layers: usize, seed: u64, dtype: DType, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let draw = |shape: &[usize], base: f32, scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| base + scale * rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let spec = TinyLlama { layers, heads: 4, kv_heads: 2, width: 48, lm_head_scale: 1.0, dtype };
    spec.build(&Device::Cpu, draw, edit)
}

fn random_tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(3..256u32)).collect()
}

fn random_hidden(seq: usize, hidden: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..seq * hidden).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(v, (seq, hidden), &Device::Cpu).unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("pare-learned-{name}-{}.safetensors", std::process::id()))
}

#[test]
fn a_saved_scorer_loads_back_with_identical_scores_and_its_metadata() {
    let net = ScorerNet::new(ScorerShape::new(32, 16, 2, 2).unwrap(), 3, DType::F32, &Device::Cpu).unwrap();
    let hidden = random_hidden(20, 32, 1);
    let span: Vec<usize> = (0..14).collect();
    let others: Vec<usize> = (14..20).collect();
    let before = net.row_logits(&hidden, &span, &others).unwrap().to_vec1::<f32>().unwrap();
    let path = scratch("roundtrip");
    let mut info = ScorerInfo {
        model: "tiny".into(),
        cut_layer: 2,
        keep: 0.5,
        text: "random".into(),
        steps: 7,
        ..Default::default()
    };
    info.extra.insert("seq_len".into(), "40".into());
    net.save(&path, &info).unwrap();
    let loaded = LearnedScorer::load(path.to_str().unwrap()).unwrap();
    assert_eq!(loaded.net.shape, net.shape);
    assert_eq!(loaded.info, info);
    assert_eq!(loaded.scores(&hidden, &span, &others).unwrap(), before);
    // No other tokens: the span pools itself.
    assert_eq!(loaded.scores(&hidden, &span, &[]).unwrap().len(), 14);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn the_pruned_prefill_keeps_exactly_the_top_logits() {
    let model = tiny_model(4, 11, DType::F32);
    let net = ScorerNet::new(ScorerShape::new(32, 16, 1, 2).unwrap(), 5, DType::F32, &Device::Cpu).unwrap();
    let path = scratch("topk");
    net.save(&path, &ScorerInfo::default()).unwrap();
    let scorer = pare_token_prune::scorer(&format!("learned:{}", path.display()), 0).unwrap();
    assert!(matches!(scorer, TokenScorer::Learned(_)));
    let pruner =
        Pruner { schedule: PruneSchedule::parse("2:0.5").unwrap(), span: Span::Prompt { protect_last: 6 }, scorer };
    let ids = random_tokens(46, 9);
    let (engine_logits, cache) = model
        .prefill(PrefillInput::Tokens(std::slice::from_ref(&ids)), &mut Hooks::new(None, Some(Arc::new(pruner))))
        .unwrap();
    // Span = the first 40 tokens; 20 kept after layer 1, plus the protected 6.
    assert_eq!(cache.layers()[1].entries(0, 0), 46);
    assert_eq!(cache.layers()[2].entries(0, 0), 20 + 6);
    let kept: Vec<i64> = cache.layers()[2].positions(0, 0).to_vec();

    // The same choice from the differentiable forward's layer-1 attention input.
    let frozen = Frozen::new(&model, DType::F32).unwrap();
    let (x, entering) = frozen.prefix(&ids, 2).unwrap();
    let span: Vec<usize> = (0..40).collect();
    let logits = net.row_logits(&x, &span, &(40..46).collect::<Vec<_>>()).unwrap().to_vec1::<f32>().unwrap();
    let top = top_keep(&logits, 20);
    assert_eq!(top.len(), 20);
    let mut argsort: Vec<usize> = (0..40).collect();
    argsort.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
    let mut expected: Vec<usize> = argsort[..20].to_vec();
    expected.sort_unstable();
    assert_eq!(top, expected);
    let expected_positions: Vec<i64> = top.iter().map(|&i| i as i64).chain(40..46).collect();
    assert_eq!(kept, expected_positions);
    // The training's hard key bias (log 1e-6 on dropped keys in layers 2..) gives the pruned
    // prefill's own output: the soft objective's m = 0 is the drop.
    let bias = frozen.hard_bias(46, 40, &top).unwrap();
    let ours = frozen.diff.forward_from(2, &entering, &bias, 45).unwrap().squeeze(0).unwrap();
    let delta = pare_test_support::max_abs_diff(&ours, &engine_logits.squeeze(0).unwrap());
    assert!(delta < 1e-3, "max |Δlogit| = {delta}");
    // Ties go to earlier tokens.
    assert_eq!(top_keep(&[1.0, 2.0, 2.0, 2.0, 0.0], 2), vec![1, 2]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn gradients_of_the_training_loss_match_finite_differences() {
    let model = tiny_model(3, 21, DType::F32);
    let frozen = Frozen::new(&model, DType::F64).unwrap();
    let mut s = TrainSettings::new(1, 0.5);
    (s.seq_len, s.protect_last, s.d, s.layers, s.heads) = (20, 6, 8, 1, 2);
    let net = ScorerNet::new(ScorerShape::new(32, 8, 1, 2).unwrap(), 2, DType::F64, &Device::Cpu).unwrap();
    let ids = random_tokens(20, 4);
    let noise =
        Tensor::from_vec((0..14).map(|i| (i as f64 * 0.37).sin()).collect::<Vec<_>>(), 14, &Device::Cpu).unwrap();
    let mut checked = 0;
    for (mask, noise) in [(MaskKind::Sigmoid, None), (MaskKind::Gumbel, Some(&noise))] {
        s.mask = mask;
        let (loss, _, _) = sample_loss(&frozen, &net, &ids, &s, noise).unwrap();
        let grads = loss.backward().unwrap();
        for name in [
            "head.weight",
            "head.bias",
            "in.token.weight",
            "in.pool.weight",
            "in.pos.weight",
            "layers.0.attn.qkv.weight",
            "layers.0.mlp.up.weight",
        ] {
            let t = net.tensor(name).unwrap().clone();
            let g = grads.get(&t).expect("gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let w0 = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for &i in &[0, w0.len() / 2, w0.len() - 1] {
                let at = |delta: f64| -> f64 {
                    let mut w = w0.clone();
                    w[i] += delta;
                    net.set(name, &Tensor::from_vec(w, t.dims(), &Device::Cpu).unwrap()).unwrap();
                    sample_loss(&frozen, &net, &ids, &s, noise).unwrap().0.to_scalar::<f64>().unwrap()
                };
                let eps = 1e-5;
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                net.set(name, &Tensor::from_vec(w0.clone(), t.dims(), &Device::Cpu).unwrap()).unwrap();
                let tol = 1e-8 + 1e-6 * fd.abs().max(g[i].abs());
                assert!((fd - g[i]).abs() < tol, "{name}[{i}]: autograd {} vs finite difference {fd}", g[i]);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 42);
}

#[test]
fn training_lowers_the_loss_and_beats_random_selection() {
    // Samples of 32 span tokens (8 markers) and an 8-token tail the model wrote after them; a
    // cut after layer 1 keeps a quarter of the span. Keeping the markers keeps the prediction.
    let model = marker_model(31);
    let frozen = Frozen::new(&model, DType::F32).unwrap();
    let train_tokens = marker_samples(&model, 64, 32, 8, 100);
    let held_out = marker_samples(&model, 32, 32, 8, 200);
    let eval = samples(&held_out, 40);
    let mut s = TrainSettings::new(2, 0.25);
    (s.seq_len, s.protect_last, s.d, s.layers, s.heads, s.steps, s.lr, s.batch) = (40, 8, 16, 1, 2, 60, 3e-3, 2);
    let all = hard_nll(&frozen, None, &eval, &s, |_, logits, _| (0..logits.len()).collect()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let random = hard_nll(&frozen, None, &eval, &s, |_, logits, k| {
        let noise: Vec<f32> = logits.iter().map(|_| rng.random::<f32>()).collect();
        top_keep(&noise, k)
    })
    .unwrap();
    for mask in [MaskKind::Sigmoid, MaskKind::Gumbel] {
        s.mask = mask;
        // The gumbel run also holds out 8 of the 64 samples and watches them.
        s.eval_samples = if mask == MaskKind::Gumbel { 8 } else { 0 };
        let out = train(&frozen, &train_tokens, &s, |_| {}).unwrap();
        assert_eq!(out.curve.len(), 60);
        assert_eq!(out.samples, 64 - s.eval_samples);
        if let Some(h) = &out.held_out {
            let steps: Vec<usize> = h.learned.iter().map(|l| l.0).collect();
            assert_eq!(steps, vec![0, 12, 24, 36, 48, 60]);
            assert!(h.learned[5].1 < h.learned[0].1 && h.learned[5].1 < h.random && h.unpruned < h.random, "{h:?}");
            assert!(out.curve[11].held_out.is_some() && out.curve[10].held_out.is_none());
        }
        // The training objective on 16 fixed training samples (with fixed noise draws for
        // gumbel), before and after: the per-step curve mixes samples of different difficulty.
        let fixed = &samples(&train_tokens, 40)[..16];
        let mut draw = rand::rngs::StdRng::seed_from_u64(5);
        let noises: Vec<Option<Tensor>> = (0..fixed.len() * 4)
            .map(|_| {
                (mask == MaskKind::Gumbel).then(|| {
                    let n: Vec<f64> = (0..32)
                        .map(|_| {
                            let u: f64 = draw.random_range(1e-6..1.0 - 1e-6);
                            u.ln() - (1.0 - u).ln()
                        })
                        .collect();
                    Tensor::from_vec(n, 32, &Device::Cpu).unwrap()
                })
            })
            .collect();
        let loss_of = |net: &ScorerNet| -> f64 {
            let mut sum = 0.0;
            for (i, noise) in noises.iter().enumerate() {
                sum +=
                    sample_loss(&frozen, net, fixed[i / 4], &s, noise.as_ref()).unwrap().0.to_scalar::<f64>().unwrap();
            }
            sum / noises.len() as f64
        };
        let (first, last) = (loss_of(&initial_net(&frozen, &s).unwrap()), loss_of(&out.net));
        assert!(last < first, "{mask:?}: loss {first} → {last}");
        let kept = out.curve[45..].iter().map(|c| c.kept).sum::<f64>() / 15.0;
        assert!((kept - 0.25).abs() < 0.1, "{mask:?}: kept share {kept}");

        let (mut markers, mut picked) = (0, 0);
        let learned = hard_nll(&frozen, Some(&out.net), &eval, &s, |i, logits, k| {
            let top = top_keep(logits, k);
            markers += top.iter().filter(|&&j| eval[i][j] >= 128).count();
            picked += top.len();
            top
        })
        .unwrap();
        let precision = markers as f64 / picked as f64;
        eprintln!(
            "{mask:?}: held-out tail NLL: all kept {all:.4}, learned {learned:.4}, random {random:.4}; markers among kept {precision:.2}; train loss {first:.4} → {last:.4}"
        );
        assert!(
            learned < random - 0.5 * (random - all),
            "{mask:?}: learned {learned} vs random {random} (all kept: {all})"
        );
        assert!(precision > 0.6, "{mask:?}: {precision} of the kept tokens are markers (random: 0.25)");
    }
}

#[test]
fn bad_scorer_files_give_one_line_errors() {
    let one_line = |e: String, needle: &str| {
        assert!(!e.contains('\n') && e.contains(needle), "{e:?} should mention {needle:?}");
    };
    let missing = pare_token_prune::scorer("learned:/nonexistent/scorer.safetensors", 0).unwrap_err().to_string();
    one_line(missing, "cannot read learned scorer /nonexistent/scorer.safetensors");
    one_line(pare_token_prune::scorer("learned:", 0).unwrap_err().to_string(), "needs the scorer's file");
    one_line(pare_token_prune::scorer("bogus", 0).unwrap_err().to_string(), "learned:FILE");

    // Not a scorer: a model checkpoint.
    let path = scratch("notascorer");
    pare_formats::save_safetensors(
        &path,
        &[("w".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())],
        None,
    )
    .unwrap();
    one_line(LearnedScorer::load(path.to_str().unwrap()).unwrap_err().to_string(), "not a pare token scorer");
    std::fs::write(&path, b"garbage").unwrap();
    one_line(LearnedScorer::load(path.to_str().unwrap()).unwrap_err().to_string(), "not a safetensors file");

    // A scorer for hidden size 48 on a model of hidden size 32: the prefill fails in one line.
    ScorerNet::new(ScorerShape::new(48, 8, 1, 2).unwrap(), 0, DType::F32, &Device::Cpu)
        .unwrap()
        .save(&path, &ScorerInfo::default())
        .unwrap();
    let scorer = pare_token_prune::scorer(&format!("learned:{}", path.display()), 0).unwrap();
    let pruner =
        Pruner { schedule: PruneSchedule::parse("1:0.5").unwrap(), span: Span::Prompt { protect_last: 2 }, scorer };
    let model = tiny_model(2, 1, DType::F32);
    let err = model
        .prefill(PrefillInput::Tokens(&[random_tokens(12, 3)]), &mut Hooks::new(None, Some(Arc::new(pruner))))
        .unwrap_err()
        .to_string();
    one_line(err, "trained for hidden size 48");
    std::fs::remove_file(&path).unwrap();
}
