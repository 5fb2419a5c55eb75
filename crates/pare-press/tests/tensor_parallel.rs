//! Presses on a model split over ranks (in-process transport): each rank compresses its own KV
//! heads, and together they keep exactly the entries the whole model's press keeps. SmolLM2 has
//! 3 KV heads, so 3 ranks hold one each: every rule that decides over a layer's heads at once
//! (AdaKV's budgets, ChunkKV's chunks, TOVA's mean, Compactor's z-scores, KVzip's global
//! ranking, FastV-style pruning) must exchange what it needs.

use candle_core::Tensor;
use pare_model::parallel::LocalComm;
use pare_model::{CachePress, Hooks, KvCache, LoadedModel, Model};
use pare_press::{build, PressOptions};
use pare_test_support::{self as ts, max_abs_diff, repo, smollm2};

const RANKS: usize = 3;

fn text_tokens(n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(repo().join("assets/texts/wiki.utf8")).expect("make assets");
    let mut ids = smollm2().tokenizer().unwrap().encode(&text, true).unwrap();
    ids.truncate(n);
    ids
}

fn split(model: &Model) -> Model {
    model.split(LocalComm::group(RANKS).unwrap()).unwrap()
}

/// Prefill with `hooks`, then 3 greedy steps: every call's logits, the tokens, the cache.
fn run(model: &Model, prompts: &[Vec<u32>], hooks: Hooks) -> pare_model::Result<(Vec<Tensor>, Vec<u32>, KvCache)> {
    let (mut logits, mut cache, mut hooks) = ts::prefill_hooked(model, prompts, hooks)?;
    let mut all = vec![logits.clone()];
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        tokens.extend(&next);
        logits = ts::decode_hooked(model, &mut cache, &mut hooks, &next)?;
        all.push(logits.clone());
    }
    Ok((all, tokens, cache))
}

fn hooks_for(press: &dyn CachePress, loaded: &LoadedModel) -> Hooks {
    let mut hooks = Hooks::new(Some(press.box_clone()), None);
    hooks.bind(loaded).unwrap();
    hooks
}

/// The whole model's run against the split model's: the same tokens, logits within 5e-4 (f32
/// over 30 layers, sums in another order), and rank r's part of the cache holding exactly whole
/// head r's entries.
fn check(name: &str, loaded: &LoadedModel, split: &Model, prompts: &[Vec<u32>], hooks: Hooks) {
    let (whole_logits, whole_tokens, whole) = run(&loaded.model, prompts, hooks.clone()).unwrap();
    let (logits, tokens, cache) = run(split, prompts, hooks).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (rank, part) in cache.parts().enumerate() {
        for (layer, (mine, all)) in part.layers().iter().zip(whole.layers()).enumerate() {
            for row in 0..part.batch() {
                assert_eq!(
                    mine.positions(row, 0),
                    all.positions(row, rank),
                    "{name}: layer {layer}, row {row}: rank {rank} keeps what head {rank} keeps"
                );
            }
        }
    }
    assert_eq!(cache.parts().count(), RANKS);
    assert_eq!(cache.bytes(), whole.bytes(), "{name}: the parts hold what the whole cache holds");
    assert_eq!(tokens, whole_tokens, "{name}: tokens");
    for (a, b) in logits.iter().zip(&whole_logits) {
        assert!(max_abs_diff(a, b) < 5e-4, "{name}: {}", max_abs_diff(a, b));
    }
    assert!(whole.bytes() < whole.uncompressed_bytes(), "{name} compressed something");
}

#[test]
fn every_press_keeps_on_each_rank_what_it_keeps_of_that_rank_s_heads() {
    let loaded = smollm2();
    let split = split(&loaded.model);
    let long = text_tokens(90);
    // Two rows of different lengths: padding, and each row its own budget.
    let two = vec![long.clone(), long[20..].to_vec()];
    let ratio = PressOptions { ratio: Some(0.5), ..PressOptions::default() };
    let mut specs: Vec<&str> = pare_press::SCORERS.to_vec();
    specs.extend([
        "pyramidkv",
        "adakv+snapkv",
        "adakv+expected-attention",
        "chunkkv+knorm",
        "critical+snapkv",
        "critical+adakv+snapkv",
        "block+keydiff",
        "finch",
    ]);
    for spec in specs {
        let press = build(spec, &ratio).unwrap_or_else(|e| panic!("{spec}: {e}"));
        // kvzip and compactor score one prompt at a time.
        let prompts = if ["kvzip", "compactor"].contains(&spec) { &two[..1] } else { &two[..] };
        check(spec, loaded, &split, prompts, hooks_for(press.as_ref(), loaded));
    }
    let decoding = PressOptions { budget: Some(40), interval: Some(2), ..PressOptions::default() };
    let press = build("decoding+adakv+knorm", &decoding).unwrap();
    check("decoding+adakv+knorm", loaded, &split, &two, hooks_for(press.as_ref(), loaded));
    let think = PressOptions { key_channel_ratio: Some(0.5), ..ratio.clone() };
    let press = build("think+snapkv", &think).unwrap();
    check("think+snapkv", loaded, &split, &two, hooks_for(press.as_ref(), loaded));
}

#[test]
fn duo_attention_streams_the_same_heads_on_their_ranks() {
    let loaded = smollm2();
    let model = &loaded.model;
    let pattern = std::env::temp_dir().join(format!("pare-duo-tp-{}.json", std::process::id()));
    // Scores that make some but not all of each layer's heads stream.
    let scores = (0..model.num_layers()).map(|l| (0..3).map(|h| ((l * 7 + h * 5) % 11) as f32).collect()).collect();
    pare_press::presses::DuoPattern { sink_size: 4, recent_size: 8, scores, calibration: None }.save(&pattern).unwrap();
    let opts = PressOptions { head_ratio: Some(0.5), duo_pattern: Some(pattern.clone()), ..PressOptions::default() };
    let press = build("duo-attention", &opts).unwrap();
    check("duo-attention", loaded, &split(model), &[text_tokens(60)], hooks_for(press.as_ref(), loaded));
    std::fs::remove_file(pattern).unwrap();
}
