//! Presses on real models: exactness at ratio 0, budgets that really shrink the cache, batches
//! where every row keeps its own budget, every architecture, beam search, and position policies.

use std::path::PathBuf;

use candle_core::Tensor;
use pare_model::{CachePress, Hooks, KvCache, LoadedModel, Model};
use pare_press::{build, PositionPolicy, PressOptions};
use pare_test_support::{self as ts, press_hooks, repo, smollm2};

fn load(path: PathBuf) -> LoadedModel {
    ts::load_f32(&path)
}

fn text_tokens(n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(repo().join("assets/texts/wiki.utf8")).expect("make assets");
    let mut ids = smollm2().tokenizer().unwrap().encode(&text, true).unwrap();
    ids.truncate(n);
    ids
}

fn press(spec: &str, opts: PressOptions) -> Box<dyn CachePress> {
    build(spec, &opts).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn ratio(r: f64) -> PressOptions {
    PressOptions { ratio: Some(r), ..PressOptions::default() }
}

/// Prefill, then `steps` greedy decode steps; the logits of every step.
fn run(model: &Model, prompts: &[Vec<u32>], press: Option<&dyn CachePress>, steps: usize) -> (Vec<Tensor>, KvCache) {
    let (mut logits, mut cache, mut hooks) = ts::prefill_hooked(model, prompts, press_hooks(press)).unwrap();
    let mut all = vec![logits.clone()];
    for _ in 0..steps {
        let next: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        logits = ts::decode_hooked(model, &mut cache, &mut hooks, &next).unwrap();
        all.push(logits.clone());
    }
    (all, cache)
}

/// Every scorer the crate builds, pyramidkv, kvzip, and each selection wrapper around one of them.
fn all_presses() -> Vec<&'static str> {
    let mut all = pare_press::SCORERS.to_vec();
    all.extend([
        "pyramidkv",
        "kvzip",
        "adakv+snapkv",
        "chunkkv+knorm",
        "critical+snapkv",
        "critical+adakv+snapkv",
        "block+keydiff",
        "finch",
    ]);
    all
}

#[test]
fn ratio_zero_gives_exactly_the_uncompressed_logits() {
    let model = &smollm2().model;
    let prompt = vec![text_tokens(80)];
    let (reference, _) = run(model, &prompt, None, 3);
    for spec in all_presses() {
        let p = press(spec, ratio(0.0));
        let (got, cache) = run(model, &prompt, Some(p.as_ref()), 3);
        for (a, b) in reference.iter().zip(&got) {
            assert_eq!(pare_test_support::max_abs_diff(a, b), 0.0, "{spec}");
        }
        assert_eq!(cache.bytes(), cache.uncompressed_bytes(), "{spec}");
    }
    // The streaming rule with room for everything, a decoding press that never fires, and ThinK
    // pruning no channel.
    let streaming = press("streaming", PressOptions { capacity: Some(1000), ..PressOptions::default() });
    let decoding =
        press("decoding+knorm", PressOptions { budget: Some(1000), interval: Some(2), ..PressOptions::default() });
    let think = press("think+snapkv", PressOptions { key_channel_ratio: Some(0.0), ..ratio(0.0) });
    // DuoAttention with no streaming head, its window shorter than the prompt.
    let pattern = std::env::temp_dir().join(format!("pare-duo-zero-{}.json", std::process::id()));
    let scores = (0..model.num_layers()).map(|l| (0..3).map(|h| (l * 3 + h) as f32).collect()).collect();
    pare_press::presses::DuoPattern { sink_size: 4, recent_size: 8, scores, calibration: None }.save(&pattern).unwrap();
    let duo = press(
        "duo-attention",
        PressOptions { head_ratio: Some(0.0), duo_pattern: Some(pattern.clone()), ..PressOptions::default() },
    );
    std::fs::remove_file(pattern).unwrap();
    for p in [streaming, decoding, think, duo] {
        let (got, _) = run(model, &prompt, Some(p.as_ref()), 3);
        for (a, b) in reference.iter().zip(&got) {
            assert_eq!(pare_test_support::max_abs_diff(a, b), 0.0, "{p:?}");
        }
    }
}

#[test]
fn budgets_shrink_the_cache_in_proportion_per_head_budgets_included() {
    let model = &smollm2().model;
    let prompt = vec![text_tokens(200)];
    for (spec, r) in [
        ("knorm", 0.5),
        ("snapkv", 0.75),
        ("adakv+snapkv", 0.5),
        ("adakv+expected-attention", 0.75),
        ("block+keydiff", 0.5),
    ] {
        let (_, cache, _) =
            ts::prefill_hooked(model, &prompt, press_hooks(Some(press(spec, ratio(r)).as_ref()))).unwrap();
        let kept_per_head = (200.0 * (1.0 - r)) as usize;
        for layer in cache.layers() {
            let counts = layer.entry_counts();
            assert_eq!(counts.iter().sum::<usize>(), 3 * kept_per_head, "{spec}: the row's budget is spent exactly");
        }
        assert_eq!(cache.bytes(), cache.uncompressed_bytes() / 200 * kept_per_head, "{spec}");
        // What is allocated is what is kept: per-head budgets free memory for real.
        assert_eq!(cache.allocated_bytes(), cache.bytes(), "{spec}");
        if spec.starts_with("adakv") {
            let ragged = cache.layers().iter().any(|l| l.entry_counts().windows(2).any(|w| w[0] != w[1]));
            assert!(ragged, "{spec}: heads should get different budgets");
        }
    }
    let (_, cache, _) =
        ts::prefill_hooked(model, &prompt, press_hooks(Some(press("pyramidkv", ratio(0.5)).as_ref()))).unwrap();
    let per_layer: Vec<usize> = cache.layers().iter().map(|l| l.entries(0, 0)).collect();
    assert!(per_layer.windows(2).all(|w| w[0] >= w[1]) && per_layer[0] > per_layer[29], "pyramid: {per_layer:?}");
    let total: usize = per_layer.iter().sum();
    assert!((total as f64 / (30.0 * 100.0) - 1.0).abs() < 0.02, "pyramid keeps the uniform total: {total}");
}

#[test]
fn each_row_of_a_batch_keeps_its_own_budget_and_matches_running_alone() {
    let model = &smollm2().model;
    let long = text_tokens(120);
    let short = long[30..100].to_vec();
    for spec in ["snapkv", "adakv+knorm", "expected-attention", "compactor"] {
        let p = press(spec, ratio(0.5));
        let (batch, cache) = run(model, &[long.clone(), short.clone()], Some(p.as_ref()), 2);
        assert_eq!(
            cache.layers()[0].entries(0, 0) + cache.layers()[0].entries(0, 1) + cache.layers()[0].entries(0, 2),
            3 * 60 + 3 * 2
        );
        assert_eq!(
            cache.layers()[0].entries(1, 0) + cache.layers()[0].entries(1, 1) + cache.layers()[0].entries(1, 2),
            3 * 35 + 3 * 2
        );
        for (row, prompt) in [long.clone(), short.clone()].into_iter().enumerate() {
            let (alone, _) = run(model, &[prompt], Some(p.as_ref()), 2);
            for (step, (a, b)) in alone.iter().zip(&batch).enumerate() {
                let d = pare_test_support::max_abs_diff(&a.get(0).unwrap(), &b.get(row).unwrap());
                assert!(d < 2e-3, "{spec} row {row} step {step}: {d}");
            }
        }
    }
}

#[test]
fn compactor_keeps_its_sinks_whatever_the_prompt_length_and_settings() {
    let model = &smollm2().model;
    let tokens = text_tokens(60);
    let kept = |n: usize, spec: &str, opts: PressOptions| -> KvCache {
        let p = press(spec, opts);
        ts::prefill_hooked(model, &[tokens[..n].to_vec()], press_hooks(Some(p.as_ref()))).unwrap().1
    };
    let with = |o: PressOptions| PressOptions { ratio: Some(0.5), ..o };
    // 40 tokens: the first 8 and the last 4 survive in every layer and head, among 20 kept.
    for opts in [
        with(PressOptions::default()),
        // Each token its own chunk; chunks that divide the 28 scored entries; a sketch wider than
        // the 64 key channels (its Gram matrix is singular but for the jitter).
        with(PressOptions { chunk_size: Some(1), ..Default::default() }),
        with(PressOptions { chunk_size: Some(14), ..Default::default() }),
        with(PressOptions { sketch_dimension: Some(100), blending: Some(1.0), ..Default::default() }),
    ] {
        let cache = kept(40, "compactor", opts.clone());
        for layer in cache.layers() {
            for h in 0..3 {
                let p = layer.positions(0, h);
                assert_eq!(p.len(), 20, "{opts:?}");
                assert!((0..8).chain(36..40).all(|s| p.contains(&s)), "{opts:?}: {p:?}");
            }
        }
    }
    // No sinks at all, every entry a sink (10 ≤ 8 + 4), one scored entry, and wrapped by adakv and chunkkv.
    let none = with(PressOptions { sinks: Some(0), sinks_end: Some(0), ..Default::default() });
    assert_eq!(kept(40, "compactor", none).layers()[3].entries(0, 1), 20);
    assert_eq!(kept(10, "compactor", with(PressOptions::default())).layers()[3].positions(0, 1), &[0, 1, 2, 3, 4]);
    assert_eq!(kept(13, "compactor", with(PressOptions::default())).layers()[3].entries(0, 1), 6);
    for spec in ["adakv+compactor", "chunkkv+compactor"] {
        assert_eq!(kept(40, spec, with(PressOptions::default())).total_entries(), 30 * 3 * 20, "{spec}");
    }
    // The sketch is seeded: the same seed keeps the same entries, another seed may not.
    let seeded = |seed| kept(60, "compactor", with(PressOptions { seed: Some(seed), ..Default::default() }));
    let all = |c: &KvCache| c.layers().iter().map(|l| l.all_positions().to_vec()).collect::<Vec<_>>();
    assert_eq!(all(&seeded(1)), all(&seeded(1)));
    assert_ne!(all(&seeded(1)), all(&seeded(2)));
}

#[test]
fn streaming_rule_keeps_sinks_and_the_newest_entries() {
    let model = &smollm2().model;
    let tokens = text_tokens(60);
    let p = press("streaming", PressOptions { sinks: Some(4), capacity: Some(16), ..PressOptions::default() });
    let (mut logits, mut cache, mut hooks) =
        ts::prefill_hooked(model, &[tokens[..1].to_vec()], press_hooks(Some(p.as_ref()))).unwrap();
    for &t in &tokens[1..] {
        logits = ts::decode_hooked(model, &mut cache, &mut hooks, &[t]).unwrap();
    }
    assert!(logits.dims() == [1, 49152]);
    // Cut to 16 before the last token came in, which then added one.
    let expected: Vec<i64> = (0..4).chain(47..60).collect();
    for layer in cache.layers() {
        for h in 0..3 {
            assert_eq!(layer.positions(0, h), expected.as_slice());
        }
    }
    // Rerotate: the cache holds contiguous positions and the next token continues right after.
    let opts = PressOptions {
        sinks: Some(4),
        capacity: Some(16),
        positions: PositionPolicy::Rerotate,
        ..PressOptions::default()
    };
    let p = press("streaming", opts);
    let (_, mut cache, mut hooks) =
        ts::prefill_hooked(model, &[tokens[..1].to_vec()], press_hooks(Some(p.as_ref()))).unwrap();
    for &t in &tokens[1..] {
        ts::decode_hooked(model, &mut cache, &mut hooks, &[t]).unwrap();
    }
    assert_eq!(cache.layers()[5].positions(0, 1), (0..17).collect::<Vec<i64>>().as_slice());
    assert_eq!(cache.next_positions(), vec![16]);
}

#[test]
fn rerotated_keys_equal_keys_rotated_at_the_new_positions() {
    // A knorm prefill with rerotate must equal computing the kept tokens' keys at 0..n directly:
    // check through the logits of a follow-up token against a fresh prefill of the kept tokens
    // in layer 0, whose keys depend only on token and position.
    let model = &smollm2().model;
    let tokens = text_tokens(40);
    let opts = PressOptions { ratio: Some(0.5), positions: PositionPolicy::Rerotate, ..PressOptions::default() };
    let (_, cache, _) =
        ts::prefill_hooked(model, std::slice::from_ref(&tokens), press_hooks(Some(press("streaming", opts).as_ref())))
            .unwrap();
    let layer0 = &cache.layers()[0];
    let kept: Vec<i64> = (0..4).chain(24..40).collect();
    assert_eq!(layer0.positions(0, 0), (0..20).collect::<Vec<i64>>().as_slice());
    let kept_tokens: Vec<u32> = kept.iter().map(|&p| tokens[p as usize]).collect();
    let (_, fresh) = ts::prefill(model, &[kept_tokens]).unwrap();
    let (k_rot, _) = layer0.head_kv(0, 2).unwrap().unwrap();
    let (k_fresh, _) = fresh.layers()[0].head_kv(0, 2).unwrap().unwrap();
    let d = pare_test_support::max_abs_diff(&k_rot, &k_fresh);
    assert!(d < 1e-3, "re-rotated keys differ by {d}");
    assert_eq!(cache.next_positions(), vec![20]);
}

#[test]
fn presses_run_on_gpt_neox_and_other_architectures() {
    for name in ["gptneox-tiny", "mistral-tiny", "qwen2-tiny", "llama-tiny"] {
        let loaded = load(repo().join("tests/fixtures").join(name).join("model"));
        let model = &loaded.model;
        let prompt: Vec<u32> = (0..48u32).map(|i| (i * 37 + 5) % 200).collect();
        let (reference, _) = run(model, std::slice::from_ref(&prompt), None, 2);
        for spec in ["snapkv", "expected-attention", "adakv+tova", "observed-attention", "compactor"] {
            let (zero, _) = run(model, std::slice::from_ref(&prompt), Some(press(spec, ratio(0.0)).as_ref()), 2);
            assert_eq!(pare_test_support::max_abs_diff(&zero[2], &reference[2]), 0.0, "{name} {spec}");
            let (got, cache) = run(model, std::slice::from_ref(&prompt), Some(press(spec, ratio(0.5)).as_ref()), 2);
            assert!(
                got.iter().all(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())),
                "{name} {spec}"
            );
            assert_eq!(
                cache.total_entries() * 2,
                cache.layers().iter().map(|l| l.kv_heads()).sum::<usize>() * (48 + 4),
                "{name} {spec}"
            );
        }
    }
}

#[test]
fn decoding_press_compresses_back_to_the_budget_every_interval() {
    let model = &smollm2().model;
    let prompt = vec![text_tokens(50)];
    let opts = PressOptions { budget: Some(32), interval: Some(8), buffer: Some(8), ..PressOptions::default() };
    for spec in ["decoding+snapkv", "decoding+adakv+knorm", "decoding+expected-attention"] {
        let p = press(spec, opts.clone());
        let (_, mut cache, mut hooks) = ts::prefill_hooked(model, &prompt, press_hooks(Some(p.as_ref()))).unwrap();
        assert_eq!(cache.layers()[3].entries(0, 0), 50, "{spec}: no compression at prefill");
        let mut sizes = Vec::new();
        for step in 0..16u32 {
            ts::decode_hooked(model, &mut cache, &mut hooks, &[100 + step]).unwrap();
            sizes.push(cache.layers()[3].entry_counts().iter().sum::<usize>());
        }
        // Steps 1..7 grow, step 8 compresses to 32 per head, then grows again to step 16.
        assert_eq!(sizes[7], 3 * 32, "{spec}: {sizes:?}");
        assert_eq!(sizes[15], 3 * 32, "{spec}: {sizes:?}");
        assert_eq!(sizes[8], 3 * 33, "{spec}: {sizes:?}");
    }
}

#[test]
fn beam_search_runs_over_a_compressed_cache() {
    let loaded = smollm2();
    let prompt = text_tokens(60);
    let cfg = pare_generate::beam::BeamConfig::new(3, 6, vec![2]);
    let plain =
        pare_generate::beam_search_with(&loaded.model, &prompt, &cfg, Hooks::default(), &mut |_, _, _, _| {}).unwrap();
    let zero = press("snapkv", ratio(0.0));
    let same = pare_generate::beam_search_with(
        &loaded.model,
        &prompt,
        &cfg,
        Hooks::new(Some(zero), None),
        &mut |_, _, _, _| {},
    )
    .unwrap();
    assert_eq!(
        plain.iter().map(|h| h.tokens.clone()).collect::<Vec<_>>(),
        same.iter().map(|h| h.tokens.clone()).collect::<Vec<_>>()
    );
    let decoding =
        press("decoding+adakv+snapkv", PressOptions { budget: Some(40), interval: Some(2), ..PressOptions::default() });
    let hyps = pare_generate::beam_search_with(
        &loaded.model,
        &prompt,
        &cfg,
        Hooks::new(Some(decoding), None),
        &mut |_, _, _, _| {},
    )
    .unwrap();
    assert_eq!(hyps.len(), 1);
    assert_eq!(hyps[0].tokens.len(), 6);
}

#[test]
fn think_zeroes_key_channels_in_the_prompt_only_and_frees_nothing() {
    let model = &smollm2().model;
    let prompt = vec![text_tokens(120)];
    let (_, snapkv) = run(model, &prompt, Some(press("snapkv", ratio(0.5)).as_ref()), 2);
    let opts = PressOptions { key_channel_ratio: Some(0.25), ..ratio(0.5) };
    let (logits, think) = run(model, &prompt, Some(press("think+snapkv", opts).as_ref()), 2);
    assert!(logits.iter().all(|l| l.to_vec2::<f32>().unwrap()[0].iter().all(|x| x.is_finite())));
    // The same entries, as wide as before: kvpress's ThinK saves no memory, nor does pare's.
    assert_eq!(think.bytes(), snapkv.bytes());
    for (layer, kept) in think.layers().iter().zip(snapkv.layers()) {
        assert_eq!(layer.all_positions(), kept.all_positions());
        for head in 0..layer.kv_heads() {
            let (k, _) = layer.head_kv(0, head).unwrap().unwrap();
            let rows = k.to_vec2::<f32>().unwrap();
            let (prompt_rows, decoded) = rows.split_at(rows.len() - 2);
            // 16 of 64 channels zero in every prompt entry; the two decoded entries keep them all.
            let zero = (0..64).filter(|&c| prompt_rows.iter().all(|r| r[c] == 0.0)).count();
            assert_eq!(zero, 16);
            assert!(decoded.iter().all(|r| r.iter().all(|&x| x != 0.0)));
        }
    }
}

#[test]
fn kvzip_frees_its_share_over_all_layers_and_leaves_no_replay_behind() {
    let loaded = smollm2();
    let model = &loaded.model;
    let prompt = text_tokens(80);
    let heads: usize = model.new_cache(1).layers().iter().map(|l| l.kv_heads()).sum();
    for positions in [PositionPolicy::Original, PositionPolicy::Rerotate] {
        let opts = PressOptions { ratio: Some(0.5), chunk_size: Some(32), positions, ..PressOptions::default() };
        let mut hooks = Hooks::new(Some(press("kvzip", opts)), None);
        hooks.bind(loaded).unwrap();
        let (logits, mut cache, mut hooks) = ts::prefill_hooked(model, std::slice::from_ref(&prompt), hooks).unwrap();
        // Raw text (no chat template prefix): all 80 tokens replay, in chunks of 32, 32 and 16.
        assert!(hooks.extra_tokens() > 80, "{}", hooks.extra_tokens());
        assert_eq!(cache.total_entries(), heads * 80 - heads * 80 / 2, "{positions:?}");
        let counts: Vec<usize> = cache.layers().iter().flat_map(|l| l.entry_counts()).collect();
        assert!(counts.iter().any(|&c| c != counts[0]), "global eviction gives heads different budgets");
        let newest = cache.layers().iter().flat_map(|l| l.all_positions().iter().flatten()).max().copied().unwrap();
        match positions {
            PositionPolicy::Original => {
                assert!(newest < 80);
                assert_eq!(cache.next_positions(), &[80]);
            }
            PositionPolicy::Rerotate => assert_eq!(cache.next_positions(), &[newest + 1]),
        }
        // The prefill's logits are the uncompressed ones; decoding continues over the kept cache.
        assert_eq!(ts::max_abs_diff(&logits, &run(model, std::slice::from_ref(&prompt), None, 0).0[0]), 0.0);
        let next: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        let after = ts::decode_hooked(model, &mut cache, &mut hooks, &next).unwrap();
        assert!(after.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
    // Without the tokenizer bound there is no replay prompt: an error, not a silent no-op.
    let unbound = press_hooks(Some(press("kvzip", ratio(0.5)).as_ref()));
    let err = ts::prefill_hooked(model, &[prompt], unbound).unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}
