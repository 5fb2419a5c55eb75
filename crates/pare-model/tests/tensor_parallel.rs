//! A model split over ranks (in-process transport) computes what the whole model computes:
//! logits within 1e-5 in f32, the same greedy tokens, and each rank's part of the cache holding
//! exactly its heads' entries of the whole model's cache.

use candle_core::{DType, Device, Tensor};
use pare_model::parallel::LocalComm;
use pare_model::{Hooks, KvCache, Model, PrefillInput};
use pare_test_support::{decode, fixture_path, load_f32, logits_all, max_abs_diff, prefill, TinyLlama};

fn split(model: &Model, world: usize) -> Model {
    model.split(LocalComm::group(world).unwrap()).unwrap()
}

/// Prefill two prompts of different lengths, then greedy-decode: the logits of every call and
/// the final cache.
fn run(model: &Model, steps: usize) -> pare_model::Result<(Vec<Tensor>, Vec<Vec<u32>>, KvCache)> {
    let prompts = vec![vec![1u32, 7, 42, 99, 3, 200], vec![5u32, 17, 250]];
    let (mut logits, mut cache) = prefill(model, &prompts)?;
    let mut all = vec![logits.clone()];
    let mut tokens = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        for (row, &t) in tokens.iter_mut().zip(&next) {
            row.push(t);
        }
        logits = decode(model, &mut cache, &next)?;
        all.push(logits.clone());
    }
    Ok((all, tokens, cache))
}

/// Every rank's keys of `layer` (row, head, entries, head_dim), heads stacked in rank order.
fn gathered_keys(caches: &[&KvCache], layer: usize) -> Tensor {
    let keys: Vec<Tensor> = caches.iter().map(|c| c.layer(layer).kv().unwrap().unwrap().0).collect();
    Tensor::cat(&keys, 1).unwrap()
}

fn check_split(model: &Model, world: usize) {
    let (whole_logits, whole_tokens, whole_cache) = run(model, 6).unwrap();
    let ids = [3u32, 9, 27, 81, 243, 1, 2, 4];
    let whole_all = logits_all(model, &ids).unwrap();
    let split = split(model, world);
    assert_eq!(split.ranks().len(), world);
    let (logits, tokens, cache) = run(&split, 6).unwrap();
    assert_eq!(tokens, whole_tokens, "{world} ranks: greedy tokens");
    for (step, (a, b)) in logits.iter().zip(&whole_logits).enumerate() {
        assert!(max_abs_diff(a, b) < 1e-5, "{world} ranks, call {step}: {}", max_abs_diff(a, b));
    }
    let all = logits_all(&split, &ids).unwrap();
    assert!(max_abs_diff(&all, &whole_all) < 1e-5, "every position's logits: {}", max_abs_diff(&all, &whole_all));
    assert_eq!(cache.bytes(), whole_cache.bytes(), "the parts hold what the whole cache holds");
    let caches: Vec<&KvCache> = cache.parts().collect();
    assert_eq!(caches.len(), world);
    for (rank, part) in caches.iter().enumerate() {
        let heads = whole_cache.layer(0).kv_heads() / world;
        assert_eq!(part.layer(0).kv_heads(), heads, "rank {rank} caches its own heads");
    }
    for layer in 0..model.num_layers() {
        let whole = whole_cache.layer(layer).kv().unwrap().unwrap().0;
        assert!(max_abs_diff(&gathered_keys(&caches, layer), &whole) < 1e-5, "layer {layer}'s keys");
        for (rank, c) in caches.iter().enumerate() {
            let heads = c.layer(layer).kv_heads();
            for row in 0..c.batch() {
                for h in 0..heads {
                    let whole_head = rank * heads + h;
                    assert_eq!(c.layer(layer).positions(row, h), whole_cache.layer(layer).positions(row, whole_head));
                }
            }
        }
    }
}

#[test]
fn two_ranks_compute_what_the_whole_model_does() {
    // Llama (GQA), Qwen2 (q/k/v biases, tied embeddings), GPT-NeoX (parallel residual, o and
    // down biases, a 50k vocabulary split unevenly).
    for name in ["llama-tiny", "qwen2-tiny", "gptneox-tiny"] {
        let loaded = load_f32(&fixture_path(&format!("{name}/model")));
        check_split(&loaded.model, 2);
    }
}

#[test]
fn three_ranks_compute_what_the_whole_model_does() {
    let mut rng = pare_model::rng::SplitMix64::new(11);
    let tiny = TinyLlama { layers: 2, heads: 6, kv_heads: 3, width: 100, lm_head_scale: 0.5, dtype: DType::F32 };
    let model = tiny.build(
        &Device::Cpu,
        |shape, base, scale| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| base + scale * (2.0 * rng.next_f64() as f32 - 1.0)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        },
        |_| {},
    );
    check_split(&model, 3);
}

#[test]
fn a_split_that_does_not_divide_the_heads_is_refused() {
    // Mistral-tiny has one KV head.
    let loaded = load_f32(&fixture_path("mistral-tiny/model"));
    let err = loaded.model.split(LocalComm::group(2).unwrap()).unwrap_err().to_string();
    assert_eq!(
        err,
        "`tp` 2 does not divide layer 0's 4 query heads and 1 KV heads (each rank needs as many whole heads)"
    );
}

#[test]
fn ranks_run_batches_of_caches_in_one_step() {
    // The server's step: several caches, each with its own hooks, in one forward call.
    let loaded = load_f32(&fixture_path("llama-tiny/model"));
    let step = |m: &Model| -> pare_model::Result<Tensor> {
        let (_, mut a) = prefill(m, &[vec![1, 2, 3]])?;
        let (_, mut b) = prefill(m, &[vec![4, 5], vec![6, 7]])?;
        let (mut ha, mut hb) = (Hooks::default(), Hooks::default());
        m.decode(&mut [(&mut a, &mut ha), (&mut b, &mut hb)], &[8, 9, 10])
    };
    let whole = step(&loaded.model).unwrap();
    let logits = step(&split(&loaded.model, 2)).unwrap();
    assert!(max_abs_diff(&logits, &whole) < 1e-5);
}

#[test]
fn a_failed_call_leaves_the_split_model_usable() {
    let loaded = load_f32(&fixture_path("llama-tiny/model"));
    let split = split(&loaded.model, 2);
    let vocab = loaded.model.config().vocab_size as u32;
    let err = prefill(&split, &[vec![1, vocab]]).unwrap_err().to_string();
    assert_eq!(err, format!("token id {vocab} is outside the vocabulary ({vocab})"));
    // A cache the whole model made has no parts for the other rank.
    let (_, mut whole_cache) = prefill(&loaded.model, &[vec![1, 2]]).unwrap();
    let err = split.decode(&mut [(&mut whole_cache, &mut Hooks::default())], &[3]).unwrap_err().to_string();
    assert!(err.starts_with("a cache made for 1 rank(s) given to a model split over 2"), "{err}");
    let (logits, _) = split.prefill(PrefillInput::Tokens(&[vec![1, 2]]), &mut Hooks::default()).unwrap();
    let (whole, _) = prefill(&loaded.model, &[vec![1, 2]]).unwrap();
    assert!(max_abs_diff(&logits, &whole) < 1e-5);
}
