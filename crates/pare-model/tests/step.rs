//! `Model::step_all`: several caches' tokens in one forward, the logits of every token, each
//! cache's what the cache computes alone (f32 on the CPU: within 1e-5, the dense products'
//! rounding moving with the rows they run over).

use candle_core::Tensor;
use pare_model::parallel::LocalComm;
use pare_model::{Hooks, KvCache, Logits, Model, Phase};
use pare_test_support::{fixture_path, load_f32, max_abs_diff, prefill};

/// Two caches (one of two rows, prefilled; one empty, so a prefill) with their tokens.
fn caches(model: &Model) -> (Vec<KvCache>, Vec<Vec<Vec<u32>>>) {
    let (_, filled) = prefill(model, &[vec![1, 7, 42, 99], vec![5, 17, 250, 3]]).unwrap();
    (vec![filled, model.new_cache(1)], vec![vec![vec![8, 9, 10], vec![11, 12, 13]], vec![vec![20, 21, 22, 23, 24]]])
}

/// Each cache alone: its tokens' logits through `forward`, (rows × tokens, vocab).
fn alone(model: &Model) -> Tensor {
    let (mut caches, tokens) = caches(model);
    let mut outs = Vec::new();
    for (cache, rows) in caches.iter_mut().zip(&tokens) {
        let phase = if cache.next_positions().iter().all(|&p| p == 0) { Phase::Prefill } else { Phase::Extend };
        let positions: Vec<Vec<i64>> =
            rows.iter().zip(cache.next_positions()).map(|(r, &next)| (next..next + r.len() as i64).collect()).collect();
        let x = model.embed(rows).unwrap();
        let logits = model.forward(x, &positions, cache, &mut Hooks::default(), phase, Logits::All).unwrap();
        outs.push(logits.flatten_to(1).unwrap());
    }
    Tensor::cat(&outs, 0).unwrap()
}

fn together(model: &Model) -> Tensor {
    let (mut caches, tokens) = caches(model);
    let mut hooks = [Hooks::default(), Hooks::default()];
    let mut seqs: Vec<(&mut KvCache, &mut Hooks)> = caches.iter_mut().zip(hooks.iter_mut()).collect();
    model.step_all(&mut seqs, &tokens).unwrap()
}

#[test]
fn every_tokens_logits_of_several_caches_equal_each_cache_alone() {
    let loaded = load_f32(&fixture_path("llama-tiny/model"));
    let (model, vocab) = (&loaded.model, loaded.model.config().vocab_size);
    let want = alone(model);
    let got = together(model);
    assert_eq!(got.dims(), &[2 * 3 + 5, vocab]);
    assert!(max_abs_diff(&got, &want) < 1e-5, "{}", max_abs_diff(&got, &want));
    // A split model gives the same through its ranks.
    let split = model.split(LocalComm::group(2).unwrap()).unwrap();
    assert!(max_abs_diff(&together(&split), &want) < 1e-5);
}
