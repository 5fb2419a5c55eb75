//! FastV / PyramidDrop image-token pruning in LLaVA's prefill against the Python reference of the
//! same rule (tools/reference/make_llava_prune_fixtures.py → tests/fixtures/llava-tiny/fastv.json):
//! the kept positions after every cut identical, logits within 1e-4, keeping everything exact, and
//! caches that hold every token before a cut and only the kept ones after it.
//!
//! The tiny checkpoint's decoder has two layers, so only `1:KEEP` fits it. The FastV K=2 and
//! multi-stage cases run on a four-layer decoder built from its layers in the order 0, 1, 0, 1
//! (`layer_order` in the fixture), here and in the reference alike.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use pare_model::{Hooks, KvCache, Logits, Phase, TokenPruner, WeightDType};
use pare_test_support as ts;
use pare_token_prune::{scorer, PruneSchedule, Pruner, Span};
use pare_vision::{LlavaModel, LoadedLlava};
use serde_json::Value;

/// The fixture keeps 6 decimals (±5e-7); the rest is float32 summation order.
const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava-tiny")
}

fn read(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn fastv() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| read("fastv.json"))
}

fn llava() -> &'static LoadedLlava {
    static M: OnceLock<LoadedLlava> = OnceLock::new();
    M.get_or_init(|| {
        LoadedLlava::load(&fixtures().join("model"), WeightDType::Float(DType::F32), &Device::Cpu).unwrap()
    })
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ints<T: TryFrom<u64>>(v: &Value) -> Vec<T> {
    v.as_array().unwrap().iter().map(|x| T::try_from(x.as_u64().unwrap()).ok().unwrap()).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The tiny LLaVA with its decoder layers in `order` (the checkpoint itself for 0, 1).
fn with_layers(order: &[usize]) -> LlavaModel {
    let mut m = llava().model.clone();
    m.language.keep_layers(order).unwrap();
    m
}

fn layer_order(v: &Value) -> Vec<usize> {
    ints(v)
}

/// Prompt `i` of the fixture: its ids and the recorded pixel values the reference used.
fn prompt(i: usize) -> (Vec<u32>, Tensor) {
    let p = &fastv()["prompts"][i];
    let case = &read("logits.json")["cases"][p["logits_case"].as_u64().unwrap() as usize];
    let ids: Vec<u32> = ints(&case["input_ids"]);
    assert_eq!(ids, ints::<u32>(&p["input_ids"]));
    let pv = Tensor::from_vec(floats(&case["pixel_values"]), (1, 3, 28, 28), &Device::Cpu).unwrap();
    (ids, pv)
}

/// pare's image-span pruner, as `pare generate --image --prune-tokens SPEC --prune-span image
/// --prune-score last-attn` builds it (pare-cli's `PruneArgs::build` with the image positions).
fn image_pruner(m: &LlavaModel, spec: &str, ids: &[u32]) -> Arc<dyn TokenPruner> {
    let schedule = PruneSchedule::parse(spec).unwrap();
    schedule.check(m.language.num_layers()).unwrap();
    let span = Span::Positions(vec![m.image_positions(ids)]);
    Arc::new(Pruner { schedule, span, scorer: scorer("last-attn", 0).unwrap() })
}

/// The pruned prefill with logits at every token that reached the last layer (seq', vocab).
fn prefill_all(m: &LlavaModel, ids: &[u32], pv: &Tensor, pruner: Option<Arc<dyn TokenPruner>>) -> (Tensor, KvCache) {
    let x = m.embed(ids, pv).unwrap();
    let positions = vec![(0..ids.len() as i64).collect::<Vec<_>>()];
    let mut cache = m.language.new_cache(1);
    let mut hooks = Hooks::new(None, pruner);
    let logits = m.language.forward(x, &positions, &mut cache, &mut hooks, Phase::Prefill, Logits::All).unwrap();
    (logits.squeeze(0).unwrap(), cache)
}

fn last_row(logits: &Tensor) -> Vec<f32> {
    logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn the_fixture_covers_fastv_counts_and_several_stages_on_both_prompts() {
    let cases = fastv()["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in [
        "fastv_k1_half",
        "fastv_k1_keep10",
        "fastv_k2_half_deep",
        "pyramid_two_stages_deep",
        "pyramid_three_stages_deep",
    ] {
        assert_eq!(names.iter().filter(|&&n| n == name).count(), 2, "{name} on both prompts");
    }
    assert_eq!(fastv()["meta"]["prune_span"], "image");
    assert_eq!(fastv()["meta"]["prune_score"], "last-attn");
    assert_eq!(fastv()["image_token_id"].as_u64().unwrap() as u32, llava().model.config.image_token_id);
    for (i, p) in fastv()["prompts"].as_array().unwrap().iter().enumerate() {
        let (ids, _) = prompt(i);
        assert_eq!(
            llava().model.image_positions(&ids),
            ints::<u64>(&p["image_positions"]).into_iter().map(|x| x as i64).collect::<Vec<_>>()
        );
    }
}

#[test]
fn unpruned_prefill_matches_the_reference_for_each_layer_order() {
    for u in fastv()["unpruned"].as_array().unwrap() {
        let order = layer_order(&u["layer_order"]);
        let m = with_layers(&order);
        let (ids, pv) = prompt(u["prompt_index"].as_u64().unwrap() as usize);
        let (logits, _) = m.prefill(&ids, &pv, &mut Hooks::default()).unwrap();
        let d = max_diff(&last_row(&logits), &floats(&u["last_logits"]));
        eprintln!("unpruned {order:?} prompt {}: max |Δlogit| {d:.2e}", u["prompt_index"]);
        assert!(d < TOL, "layers {order:?}, prompt {}: {d}", u["prompt_index"]);
    }
}

#[test]
fn pruned_prefill_matches_the_python_fastv_reference() {
    let mut worst = 0f32;
    for case in fastv()["cases"].as_array().unwrap() {
        let name = format!("{} (prompt {})", case["name"].as_str().unwrap(), case["prompt_index"]);
        let order = layer_order(&case["layer_order"]);
        let m = with_layers(&order);
        let (ids, pv) = prompt(case["prompt_index"].as_u64().unwrap() as usize);
        let spec = case["prune_tokens"].as_str().unwrap();
        let pruner = image_pruner(&m, spec, &ids);

        // LlavaModel::prefill, the path `pare generate --image` takes: the last position's logits.
        let (last, cache) = m.prefill(&ids, &pv, &mut Hooks::new(None, Some(pruner.clone()))).unwrap();
        let last = last_row(&last);
        let d_last = max_diff(&last, &floats(&case["last_logits"]));

        // Kept indices: after each cut, the cache of the first layer past it holds exactly the
        // reference's kept original positions, in every KV head.
        let cuts: Vec<(usize, Vec<i64>)> = case["kept_positions"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(l, p)| (l.parse().unwrap(), p.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()))
            .collect();
        let schedule = PruneSchedule::parse(spec).unwrap();
        assert_eq!(
            cuts.iter().map(|c| c.0).collect::<Vec<_>>(),
            schedule.stages.iter().map(|s| s.layer).collect::<Vec<_>>(),
            "{name}"
        );
        let mut held = ids.len();
        for layer in 0..order.len() {
            if let Some((_, kept)) = cuts.iter().find(|c| c.0 == layer) {
                held = kept.len();
                for h in 0..cache.layers()[layer].kv_heads() {
                    assert_eq!(
                        cache.layers()[layer].positions(0, h),
                        kept.as_slice(),
                        "{name}: kept after the cut before layer {layer}, head {h}"
                    );
                }
            }
            // Before the first cut every token; between cuts the previous cut's survivors.
            for h in 0..cache.layers()[layer].kv_heads() {
                assert_eq!(cache.layers()[layer].entries(0, h), held, "{name}: layer {layer} head {h}");
            }
        }
        assert!(
            cache.layers()[0].positions(0, 0).iter().copied().eq(0..ids.len() as i64),
            "{name}: layer 0 sees every token"
        );
        assert_eq!(
            cache.next_positions(),
            vec![ids.len() as i64],
            "{name}: decoding goes on at the next original position"
        );

        // Every token that reached the last layer: its logits against the reference's 8 largest.
        let (all, _) = prefill_all(&m, &ids, &pv, Some(pruner.clone()));
        let reached = case["kept_top8"].as_array().unwrap();
        assert_eq!(all.dim(0).unwrap(), reached.len(), "{name}");
        let final_kept = &cuts.last().unwrap().1;
        let mut d_all = 0f32;
        for (row, entry) in reached.iter().enumerate() {
            assert_eq!(entry[0].as_i64().unwrap(), final_kept[row], "{name}");
            let got = all.get(row).unwrap().to_vec1::<f32>().unwrap();
            for pair in entry[1].as_array().unwrap() {
                let (id, v) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
                d_all = d_all.max((got[id] - v).abs());
            }
        }
        let all_last = all.get(all.dim(0).unwrap() - 1).unwrap().to_vec1::<f32>().unwrap();
        // The LM head over one row or over all of them: the same sums in another GEMM blocking.
        assert!(max_diff(&all_last, &last) < 1e-5, "{name}: Logits::All and Logits::Last agree");

        eprintln!("{name}: {spec} on layers {order:?}: max |Δlogit| last {d_last:.2e}, kept tokens' top-8 {d_all:.2e}");
        assert!(d_last < TOL, "{name}: last-position logits differ by {d_last}");
        assert!(d_all < TOL, "{name}: kept tokens' logits differ by {d_all}");
        // The cut must matter, or the comparison above proves nothing about it.
        let (unpruned, _) = m.prefill(&ids, &pv, &mut Hooks::default()).unwrap();
        assert!(max_diff(&last_row(&unpruned), &last) > 1e-2, "{name}: pruning did not move the logits");
        worst = worst.max(d_last).max(d_all);
    }
    eprintln!("worst |Δlogit| over all cases: {worst:.2e}");
}

#[test]
fn keeping_every_image_token_gives_exactly_the_unpruned_prefill() {
    for (order, spec) in [(vec![0, 1], "1:1.0"), (vec![0, 1, 0, 1], "1:1.0,2:16,3:1.0")] {
        let m = with_layers(&order);
        for i in 0..fastv()["prompts"].as_array().unwrap().len() {
            let (ids, pv) = prompt(i);
            let (reference, mut ref_cache) = m.prefill(&ids, &pv, &mut Hooks::default()).unwrap();
            let pruner = image_pruner(&m, spec, &ids);
            let (logits, mut cache) = m.prefill(&ids, &pv, &mut Hooks::new(None, Some(pruner.clone()))).unwrap();
            assert_eq!(max_diff(&last_row(&reference), &last_row(&logits)), 0.0, "{spec} prompt {i}");
            for layer in 0..order.len() {
                assert_eq!(
                    cache.layers()[layer].positions(0, 0),
                    ref_cache.layers()[layer].positions(0, 0),
                    "{spec} layer {layer}"
                );
            }
            let a = ts::decode(&m.language, &mut cache, &[42]).unwrap();
            let b = ts::decode(&m.language, &mut ref_cache, &[42]).unwrap();
            assert_eq!(max_diff(&last_row(&a), &last_row(&b)), 0.0, "{spec} prompt {i}: decode step");
        }
    }
}

#[test]
fn decoding_continues_over_the_pruned_cache() {
    // FastV K=1 keeping 4 of the 16 image tokens: the decode step attends over 58 - 12 entries
    // in layer 1, and its new entry lands at the next original position.
    let m = with_layers(&[0, 1]);
    let (ids, pv) = prompt(0);
    let pruner = image_pruner(&m, "1:4", &ids);
    let (_, mut cache) = m.prefill(&ids, &pv, &mut Hooks::new(None, Some(pruner.clone()))).unwrap();
    assert_eq!((cache.layers()[0].entries(0, 0), cache.layers()[1].entries(0, 0)), (58, 46));
    let logits = ts::decode(&m.language, &mut cache, &[42]).unwrap();
    assert_eq!(logits.dims(), &[1, 260]);
    assert_eq!((cache.layers()[0].entries(0, 0), cache.layers()[1].entries(0, 0)), (59, 47));
    assert_eq!(cache.layers()[1].positions(0, 0).last(), Some(&58));
    assert_eq!(cache.next_positions(), vec![59]);
}
