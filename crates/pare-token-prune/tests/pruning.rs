//! Prefill token pruning on SmolLM2: exactness when nothing is dropped, caches that hold only the
//! kept tokens after a cut, original positions, batches whose rows keep different counts.

use std::sync::Arc;

use pare_model::{PrefillInput, TokenPruner};
use pare_test_support::{self as ts, repo, smollm2};
use pare_token_prune::{scorer, PruneSchedule, Pruner, Span};

fn text_tokens(n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(repo().join("assets/texts/wiki.utf8")).expect("make assets");
    let mut ids = smollm2().tokenizer().unwrap().encode(&text, true).unwrap();
    ids.truncate(n);
    ids
}

fn pruner(spec: &str, span: Span, score: &str) -> Arc<dyn TokenPruner> {
    Arc::new(Pruner { schedule: PruneSchedule::parse(spec).unwrap(), span, scorer: scorer(score, 0).unwrap() })
}

#[test]
fn keeping_everything_gives_exactly_the_unpruned_logits() {
    let model = &smollm2().model;
    let prompt = vec![text_tokens(90)];
    let (reference, ref_cache) = ts::prefill(model, &prompt).unwrap();
    for score in ["last-attn", "mean-attn", "knorm", "random"] {
        let p = pruner("2:1.0,10:1.0", Span::Prompt { protect_last: 4 }, score);
        let (logits, mut cache) = model.prefill(PrefillInput::Tokens(&prompt), &mut ts::pruner_hooks(&p)).unwrap();
        assert_eq!(pare_test_support::max_abs_diff(&reference, &logits), 0.0, "{score}");
        let a = ts::decode(model, &mut cache, &[42]).unwrap();
        let b = ts::decode(model, &mut ref_cache.clone(), &[42]).unwrap();
        assert_eq!(pare_test_support::max_abs_diff(&a, &b), 0.0, "{score}");
    }
}

#[test]
fn layers_after_the_cut_hold_only_kept_tokens_at_their_original_positions() {
    let model = &smollm2().model;
    let prompt = text_tokens(100);
    let p = pruner("3:0.5,20:10", Span::Prompt { protect_last: 8 }, "last-attn");
    let (_, mut cache) =
        model.prefill(PrefillInput::Tokens(std::slice::from_ref(&prompt)), &mut ts::pruner_hooks(&p)).unwrap();
    // Span = the first 92 tokens; 46 kept after layer 2, then 10 of those after layer 19.
    assert_eq!(cache.layers()[2].entries(0, 0), 100);
    assert_eq!(cache.layers()[3].entries(0, 1), 46 + 8);
    assert_eq!(cache.layers()[19].entries(0, 2), 46 + 8);
    assert_eq!(cache.layers()[20].entries(0, 0), 10 + 8);
    let kept = cache.layers()[20].positions(0, 0).to_vec();
    assert!(kept.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(&kept[kept.len() - 8..], &(92..100).collect::<Vec<i64>>()[..], "protected tail kept");
    assert!(
        kept.iter().all(|p| cache.layers()[3].positions(0, 0).contains(p)),
        "later cuts choose among earlier survivors"
    );
    // Decoding continues at the next original position over the shorter caches.
    assert_eq!(cache.next_positions(), vec![100]);
    let logits = ts::decode(model, &mut cache, &[42]).unwrap();
    assert_eq!(logits.dims(), &[1, 49152]);
    assert_eq!(cache.layers()[20].positions(0, 0).last(), Some(&100));
}

#[test]
fn rows_keeping_different_counts_match_running_alone() {
    let model = &smollm2().model;
    let long = text_tokens(110);
    let short = long[20..80].to_vec();
    let p = pruner("4:0.4", Span::Prompt { protect_last: 6 }, "last-attn");
    let (batch, mut cache) =
        model.prefill(PrefillInput::Tokens(&[long.clone(), short.clone()]), &mut ts::pruner_hooks(&p)).unwrap();
    let next = [7u32, 9];
    let batch_step = ts::decode(model, &mut cache, &next).unwrap();
    for (row, prompt) in [long, short].into_iter().enumerate() {
        let (alone, mut c) = model.prefill(PrefillInput::Tokens(&[prompt]), &mut ts::pruner_hooks(&p)).unwrap();
        let d = pare_test_support::max_abs_diff(&alone.get(0).unwrap(), &batch.get(row).unwrap());
        assert!(d < 2e-3, "row {row}: {d}");
        let step = ts::decode(model, &mut c, &[next[row]]).unwrap();
        let d = pare_test_support::max_abs_diff(&step.get(0).unwrap(), &batch_step.get(row).unwrap());
        assert!(d < 2e-3, "row {row} after a decode step: {d}");
    }
}

#[test]
fn range_span_only_touches_its_positions() {
    let model = &smollm2().model;
    let prompt = text_tokens(80);
    let p = pruner("6:5", Span::Range(10, 50), "knorm");
    let (_, cache) = model.prefill(PrefillInput::Tokens(&[prompt]), &mut ts::pruner_hooks(&p)).unwrap();
    let kept = cache.layers()[6].positions(0, 0);
    assert_eq!(kept.len(), 80 - 40 + 5);
    assert_eq!(kept.iter().filter(|&&p| (10..50).contains(&p)).count(), 5);
    assert!((0..10).chain(50..80).all(|p| kept.contains(&p)));
}

/// tools/reference/make_token_prune_fixtures.py: the same rule written out over HF's layers.
#[test]
fn pruned_prefill_matches_the_python_reference() {
    let model = &smollm2().model;
    for name in ["fastv_k3_half", "pyramid_two_stages"] {
        let path = repo().join("tests/fixtures/token-prune").join(format!("{name}.json"));
        let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ids: Vec<u32> = f["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let protect = f["protect_last"].as_u64().unwrap() as usize;
        let p = pruner(f["prune_tokens"].as_str().unwrap(), Span::Prompt { protect_last: protect }, "last-attn");
        let (logits, cache) = model.prefill(PrefillInput::Tokens(&[ids]), &mut ts::pruner_hooks(&p)).unwrap();
        for (layer, kept) in f["kept_positions"].as_object().unwrap() {
            let expected: Vec<i64> = kept.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let layer: usize = layer.parse().unwrap();
            assert_eq!(cache.layers()[layer].positions(0, 0), expected.as_slice(), "{name}: kept after layer {layer}");
        }
        let logprobs = candle_nn::ops::log_softmax(&logits.get(0).unwrap(), 0).unwrap().to_vec1::<f32>().unwrap();
        for pair in f["top20_last"].as_array().unwrap() {
            let (id, lp) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            assert!((logprobs[id] - lp).abs() < 1e-3, "{name}: token {id}: {} vs {lp}", logprobs[id]);
        }
    }
}

#[test]
fn ranks_of_a_split_model_keep_the_tokens_the_whole_model_keeps() {
    use pare_model::parallel::LocalComm;
    let model = &smollm2().model;
    let prompt = vec![text_tokens(100)];
    // SmolLM2's 3 KV heads, one per rank: every rank's scores join the head average.
    let split = model.split(LocalComm::group(3).unwrap()).unwrap();
    for score in ["last-attn", "mean-attn", "knorm", "random"] {
        let p = pruner("3:0.5,20:10", Span::Prompt { protect_last: 8 }, score);
        let (whole_logits, whole) = model.prefill(PrefillInput::Tokens(&prompt), &mut ts::pruner_hooks(&p)).unwrap();
        let (logits, cache) = split.prefill(PrefillInput::Tokens(&prompt), &mut ts::pruner_hooks(&p)).unwrap();
        assert!(ts::max_abs_diff(&logits, &whole_logits) < 5e-4, "{score}");
        for (rank, part) in cache.parts().enumerate() {
            for (layer, (mine, all)) in part.layers().iter().zip(whole.layers()).enumerate() {
                assert_eq!(mine.positions(0, 0), all.positions(0, rank), "{score}: layer {layer}, rank {rank}");
            }
        }
    }
}
