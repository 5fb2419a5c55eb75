//! pare's presses against NVIDIA kvpress 0.5.5 run on SmolLM2 in HF transformers
//! (tools/reference/make_press_fixtures.py), and the streaming rule against a Python reference
//! of seed 001's hook (tools/reference/streaming_reference.py).

use std::sync::{Arc, Mutex};

use pare_model::cache::LayerKv;
use pare_model::hooks::{CachePress, LayerContext};
use pare_model::Hooks;
use pare_press::compress::observe;
use pare_press::compress::{call_queries, compress_layer_with, LayerInfo, Selection};
use pare_press::presses::{think, AdaKv, DuoAttention, DuoPattern, FinchScorer, ReplayPrompt};
use pare_press::scorer::Scorer;
use pare_press::scorers::duo_attention::score_heads;
use pare_press::select::{HeadTopK, Selector};
use pare_press::{build, scorers, Budget, PositionPolicy, PressOptions};
use pare_test_support::{self as ts, press_hooks, smollm2};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    ts::fixture(&format!("presses/{name}"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Fixture file stem → pare press spec.
const CASES: &[(&str, &str)] = &[
    ("knorm_r0.5", "knorm"),
    ("knorm_r0.25", "knorm"),
    ("keydiff_r0.5", "keydiff"),
    ("keydiff_r0.25", "keydiff"),
    ("lagkv_r0.25", "lagkv"),
    ("cur_r0.5", "cur"),
    ("cur_r0.25", "cur"),
    ("snapkv_r0.5", "snapkv"),
    ("snapkv_r0.25", "snapkv"),
    ("tova_r0.5", "tova"),
    ("observed_attention_r0.5", "observed-attention"),
    ("expected_attention_r0.5", "expected-attention"),
    ("expected_attention_r0.25", "expected-attention"),
    ("streaming_llm_r0.5", "streaming"),
    ("pyramidkv_r0.5", "pyramidkv"),
    ("adakv_snapkv_r0.5", "adakv+snapkv"),
    ("adakv_expected_attention_r0.5", "adakv+expected-attention"),
    ("chunkkv_knorm_r0.5", "chunkkv+knorm"),
    ("chunkkv_snapkv_r0.5", "chunkkv+snapkv"),
    ("critical_knorm_r0.5", "critical+knorm"),
    ("critical_snapkv_r0.5", "critical+snapkv"),
    ("critical_snapkv_r0.25", "critical+snapkv"),
    ("critical_adakv_snapkv_r0.5", "critical+adakv+snapkv"),
    ("block_keydiff_r0.5", "block+keydiff"),
    ("block_keydiff_r0.25", "block+keydiff"),
    ("finch_r0.5", "finch"),
    ("finch_r0.25", "finch"),
    ("finch_chunked_r0.5", "finch"),
    ("compactor_r0.5", "compactor"),
    ("compactor_r0.25", "compactor"),
];

#[test]
fn kept_entries_match_kvpress() {
    let model = &smollm2().model;
    for (file, spec) in CASES {
        let f = fixture(&format!("{file}.json"));
        let param = |name: &str| f["params"][name].as_u64().map(|v| v as usize);
        let opts = PressOptions {
            ratio: f["ratio"].as_f64(),
            block_size: param("block_size"),
            // FinchPress's window: the last tokens of the prompt (kvpress: those after its delimiter).
            window: if *spec == "finch" { param("window_size") } else { None },
            chunk_length: if *spec == "finch" { param("chunk_length") } else { None },
            ..PressOptions::default()
        };
        let press = build(spec, &opts).unwrap();
        let (_, cache, _) =
            ts::prefill_hooked(model, &[ids(&f["prompt_ids"])], press_hooks(Some(press.as_ref()))).unwrap();
        // Entries whose kvpress score sits within float noise of the cut may fall either way.
        let near: Vec<(usize, usize, i64)> = f["near_boundary"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_u64().unwrap() as usize, e[2].as_i64().unwrap()))
            .collect();
        let mut differing = 0;
        for (layer, heads) in f["kept"].as_array().unwrap().iter().enumerate() {
            for (head, kept) in heads.as_array().unwrap().iter().enumerate() {
                let expected: Vec<i64> = kept.as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
                let got = cache.layer(layer).positions(0, head);
                for p in
                    expected.iter().filter(|p| !got.contains(p)).chain(got.iter().filter(|p| !expected.contains(p)))
                {
                    assert!(
                        near.contains(&(layer, head, *p)),
                        "{file}: layer {layer} head {head}: position {p} differs and is not near the boundary"
                    );
                    differing += 1;
                }
            }
        }
        assert!(differing <= near.len(), "{file}: {differing} differing entries");
        eprintln!("{file}: {differing} kept entries differ from kvpress's, {} near its cut", near.len());
    }
}

/// Captures a scorer's scores at one layer, compressing nothing.
#[derive(Debug, Clone)]
struct Capture {
    layer: usize,
    scorer: Arc<dyn Scorer>,
    scores: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl CachePress for Capture {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        if ctx.layer == self.layer {
            let rows = call_queries(ctx)?;
            let (obs, _) =
                observe(kv, 0, &LayerInfo::of(ctx), &rows[0]).map_err(pare_model::ModelError::from)?.unwrap();
            *self.scores.lock().unwrap() = self.scorer.score(&obs).map_err(pare_model::ModelError::from)?;
        }
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}

#[test]
fn scores_match_kvpress_within_1e4_relative() {
    let model = &smollm2().model;
    let cases: Vec<(&str, Arc<dyn Scorer>)> = vec![
        ("knorm_r0.5", Arc::new(scorers::Knorm)),
        ("keydiff_r0.5", Arc::new(scorers::KeyDiff)),
        ("lagkv_r0.25", Arc::new(scorers::LagKv::default())),
        ("cur_r0.5", Arc::new(scorers::Cur::default())),
        ("snapkv_r0.5", Arc::new(scorers::SnapKv::default())),
        ("tova_r0.5", Arc::new(scorers::Tova)),
        ("observed_attention_r0.5", Arc::new(scorers::ObservedAttention)),
        ("expected_attention_r0.5", Arc::new(scorers::ExpectedAttention::default())),
        ("finch_r0.5", Arc::new(FinchScorer { window: 32 })),
    ];
    for (file, scorer) in cases {
        let f = fixture(&format!("{file}.json"));
        let sample = &f["scores_sample"];
        let (layer, head) = (sample["layer"].as_u64().unwrap() as usize, sample["head"].as_u64().unwrap() as usize);
        let capture = Capture { layer, scorer, scores: Arc::default() };
        ts::prefill_hooked(model, &[ids(&f["prompt_ids"])], press_hooks(Some(&capture))).unwrap();
        let got = capture.scores.lock().unwrap()[head].clone();
        let expected: Vec<f64> = sample["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), expected.len(), "{file}");
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut worst = 0f64;
        for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
            let tol = 1e-4 * e.abs().max(1e-3 * scale);
            worst = worst.max((g as f64 - e).abs() / e.abs().max(1e-3 * scale));
            assert!((g as f64 - e).abs() <= tol, "{file}: entry {i}: {g} vs {e}");
        }
        eprintln!("{file}: largest relative score difference {worst:.2e}");
    }
}

/// Compactor's scores are sums of z-scores, so many sit near 0 where a relative bound means
/// nothing: they must agree within 1e-4 standard deviations (absolute).
#[test]
fn compactor_scores_match_kvpress_within_1e4_standard_deviations() {
    let model = &smollm2().model;
    for (file, blending) in [("compactor_r0.5", 0.5), ("compactor_r0.25", 0.25)] {
        let f = fixture(&format!("{file}.json"));
        let sample = &f["scores_sample"];
        let (layer, head) = (sample["layer"].as_u64().unwrap() as usize, sample["head"].as_u64().unwrap() as usize);
        // Blending is the ratio (kvpress's default); the fixture's sketch is pare's seed-0 draw.
        let scorer = Arc::new(scorers::Compactor { blending, ..Default::default() });
        let capture = Capture { layer, scorer, scores: Arc::default() };
        ts::prefill_hooked(model, &[ids(&f["prompt_ids"])], press_hooks(Some(&capture))).unwrap();
        let got = capture.scores.lock().unwrap()[head].clone();
        let expected: Vec<f64> = sample["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), expected.len(), "{file}");
        let worst = got.iter().zip(&expected).map(|(&g, &e)| (g as f64 - e).abs()).fold(0f64, f64::max);
        eprintln!("{file}: largest score difference {worst:.2e}");
        for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
            assert!((g as f64 - e).abs() <= 1e-4, "{file}: entry {i}: {g} vs {e}");
        }
    }
}

#[test]
fn greedy_continuations_after_compression_match_kvpress() {
    let model = &smollm2().model;
    for (file, spec) in
        [("knorm_r0.5", "knorm"), ("snapkv_r0.5", "snapkv"), ("expected_attention_r0.5", "expected-attention")]
    {
        let f = fixture(&format!("{file}.json"));
        let g = &f["greedy"];
        let press = build(spec, &PressOptions { ratio: f["ratio"].as_f64(), ..PressOptions::default() }).unwrap();
        let (mut logits, mut cache, mut hooks) =
            ts::prefill_hooked(model, &[ids(&f["prompt_ids"])], press_hooks(Some(press.as_ref()))).unwrap();
        let expected = ids(&g["tokens"]);
        for (step, &token) in expected.iter().enumerate() {
            let lp = candle_nn::ops::log_softmax(&logits.get(0).unwrap(), 0).unwrap().to_vec1::<f32>().unwrap();
            if let Some(top) =
                g.get(format!("top5_{}", if step == 0 { "first".to_string() } else { format!("step{step}") }))
            {
                for e in top.as_array().unwrap() {
                    let (id, want) = (e["id"].as_u64().unwrap() as usize, e["logprob"].as_f64().unwrap() as f32);
                    assert!((lp[id] - want).abs() < 1e-3, "{file} step {step} token {id}: {} vs {want}", lp[id]);
                }
            }
            let argmax = lp.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            assert_eq!(argmax, token, "{file}: greedy token {step}");
            logits = ts::decode_hooked(model, &mut cache, &mut hooks, &[token]).unwrap();
        }
    }
}

#[test]
fn streaming_perplexity_matches_the_seed_001_reference_within_half_a_percent() {
    let model = &smollm2().model;
    for (file, rerotate) in
        [("streaming_ppl.json", false), ("streaming_ppl_c128.json", false), ("streaming_ppl_rerotate.json", true)]
    {
        let f = fixture(file);
        let tokens = ids(&f["ids"]);
        let opts = PressOptions {
            sinks: f["n_sink"].as_u64().map(|v| v as usize),
            capacity: f["max_capacity"].as_u64().map(|v| v as usize),
            positions: if rerotate { PositionPolicy::Rerotate } else { PositionPolicy::Original },
            ..PressOptions::default()
        };
        let press = build("streaming", &opts).unwrap();
        let got = pare_eval::perplexity_stream(model, &tokens, &Hooks::new(Some(press), None), |_, _| {}).unwrap();
        let want = f["ppl"].as_f64().unwrap();
        assert!((got.ppl / want - 1.0).abs() < 0.005, "{file}: pare {} vs reference {want}", got.ppl);
        assert_eq!(got.scored_tokens, tokens.len() - 1);
    }
    let f = fixture("streaming_ppl.json");
    let full = pare_eval::perplexity_stream(model, &ids(&f["ids"]), &Hooks::default(), |_, _| {}).unwrap();
    assert!((full.ppl / f["ppl_full"].as_f64().unwrap() - 1.0).abs() < 0.005);
}

/// Compresses every prefill layer twice, ranking on the host and on the device (here the CPU
/// runs the device path's kernels' references), and checks that both keep the same entries.
#[derive(Debug, Clone)]
struct BothSelections {
    scorer: Arc<dyn Scorer>,
    adakv: bool,
    layers: Arc<Mutex<usize>>,
}

impl CachePress for BothSelections {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        let err = pare_model::ModelError::from;
        let scorer = Box::new(ArcScorer(self.scorer.clone()));
        let selector: Box<dyn Selector> =
            if self.adakv { Box::new(AdaKv { scorer, alpha_safeguard: 0.2 }) } else { Box::new(HeadTopK { scorer }) };
        let selector = selector.as_ref();
        let (rows, info, budget) = (call_queries(ctx)?, LayerInfo::of(ctx), Budget::ratio(0.5).map_err(err)?);
        let mut on_device = kv.clone();
        compress_layer_with(kv, &info, &rows, selector, budget, PositionPolicy::Original, Selection::Host)
            .map_err(err)?;
        compress_layer_with(
            &mut on_device,
            &info,
            &rows,
            selector,
            budget,
            PositionPolicy::Original,
            Selection::Device,
        )
        .map_err(err)?;
        assert_eq!(kv.all_positions(), on_device.all_positions(), "layer {}", ctx.layer);
        // Rows of different lengths keep different counts: the layer is ragged, read per (row, head).
        for (b, h) in (0..kv.batch()).flat_map(|b| (0..kv.kv_heads()).map(move |h| (b, h))) {
            let ((k, v), (dk, dv)) = (kv.head_kv(b, h)?.unwrap(), on_device.head_kv(b, h)?.unwrap());
            assert_eq!(ts::max_abs_diff(&k, &dk), 0.0);
            assert_eq!(ts::max_abs_diff(&v, &dv), 0.0);
        }
        *self.layers.lock().unwrap() += 1;
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}

#[derive(Debug)]
struct ArcScorer(Arc<dyn Scorer>);

impl Scorer for ArcScorer {
    fn score(&self, obs: &pare_press::observation::Observation) -> pare_press::Result<Vec<Vec<f32>>> {
        self.0.score(obs)
    }

    fn score_tensor(
        &self,
        obs: &pare_press::observation::Observation,
    ) -> pare_press::Result<Option<candle_core::Tensor>> {
        self.0.score_tensor(obs)
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(ArcScorer(self.0.clone()))
    }
}

#[test]
fn ranking_on_the_device_keeps_what_the_host_keeps() {
    let model = &smollm2().model;
    let prompt = ids(&fixture("snapkv_r0.5.json")["prompt_ids"]);
    // Two rows of different lengths: the shorter is left-padded, so its entries start past slot 0.
    let prompts = [prompt.clone(), prompt[..prompt.len() * 2 / 3].to_vec()];
    let snapkv: Arc<dyn Scorer> = Arc::new(scorers::SnapKv::default());
    let scorers: Vec<Arc<dyn Scorer>> = vec![
        Arc::new(scorers::Knorm),
        snapkv.clone(),
        Arc::new(scorers::ExpectedAttention::default()),
        Arc::new(scorers::Compactor::default()),
    ];
    // Per-head top-k with each scorer, and AdaKV's budgets across heads (a ragged result).
    for (scorer, adakv) in scorers.into_iter().map(|s| (s, false)).chain([(snapkv, true)]) {
        let press = BothSelections { scorer: scorer.clone(), adakv, layers: Arc::default() };
        ts::prefill_hooked(model, &prompts, press_hooks(Some(&press))).unwrap();
        assert_eq!(*press.layers.lock().unwrap(), model.num_layers(), "{scorer:?}");
    }
}

/// `[layer, head, x]` triples of a fixture's near-boundary list.
fn near_triples(v: &Value) -> Vec<(usize, usize, i64)> {
    let e = v["entries"].as_array().unwrap();
    e.iter()
        .map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_u64().unwrap() as usize, e[2].as_i64().unwrap()))
        .collect()
}

/// The key channels that are zero in every entry of (row 0, head) of a layer.
fn zero_channels(layer: &LayerKv, head: usize) -> Vec<i64> {
    let (k, _) = layer.head_kv(0, head).unwrap().unwrap();
    let rows = k.to_dtype(candle_core::DType::F32).unwrap().to_vec2::<f32>().unwrap();
    (0..rows[0].len()).filter(|&c| rows.iter().all(|r| r[c] == 0.0)).map(|c| c as i64).collect()
}

#[test]
fn think_zeroes_the_key_channels_kvpress_zeroes() {
    let model = &smollm2().model;
    for (file, spec) in [("think_r0.5", "think"), ("think_r0.25", "think"), ("think_snapkv_r0.5", "think+snapkv")] {
        let f = fixture(&format!("{file}.json"));
        let opts = PressOptions {
            key_channel_ratio: f["ratio"].as_f64(),
            ratio: f["params"]["inner_ratio"].as_f64(),
            ..PressOptions::default()
        };
        let press = build(spec, &opts).unwrap();
        let (_, cache, _) =
            ts::prefill_hooked(model, &[ids(&f["prompt_ids"])], press_hooks(Some(press.as_ref()))).unwrap();
        let near = near_triples(&f["near_boundary"]);
        let kept_near = if f["kept"].is_null() { Vec::new() } else { near_triples(&f["kept_near_boundary"]) };
        for (layer, heads) in f["pruned_channels"].as_array().unwrap().iter().enumerate() {
            for (head, pruned) in heads.as_array().unwrap().iter().enumerate() {
                let expected: Vec<i64> = pruned.as_array().unwrap().iter().map(|c| c.as_i64().unwrap()).collect();
                let got = zero_channels(cache.layer(layer), head);
                assert_eq!(got.len(), expected.len(), "{file}: layer {layer} head {head}");
                for c in
                    expected.iter().filter(|c| !got.contains(c)).chain(got.iter().filter(|c| !expected.contains(c)))
                {
                    assert!(
                        near.contains(&(layer, head, *c)),
                        "{file}: layer {layer} head {head}: channel {c} differs"
                    );
                }
                if let Some(kept) = f["kept"].get(layer) {
                    let expected: Vec<i64> =
                        kept[head].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
                    let got = cache.layer(layer).positions(0, head);
                    for p in
                        expected.iter().filter(|p| !got.contains(p)).chain(got.iter().filter(|p| !expected.contains(p)))
                    {
                        assert!(kept_near.contains(&(layer, head, *p)), "{file}: layer {layer} head {head}: entry {p}");
                    }
                }
            }
        }
    }
}

/// Captures ThinK's channel scores of one layer's cached keys, changing nothing.
#[derive(Debug, Clone)]
struct ChannelScores {
    layer: usize,
    scores: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl CachePress for ChannelScores {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        if ctx.layer == self.layer {
            let keys: Vec<_> = (0..kv.kv_heads()).map(|h| kv.head_kv(0, h).unwrap().unwrap().0).collect();
            let group = ctx.attention.num_heads() / ctx.attention.num_kv_heads();
            let scores = think::channel_scores(&call_queries(ctx)?[0], &keys, ctx.rope, group, 32)
                .map_err(pare_model::ModelError::from)?;
            *self.scores.lock().unwrap() = scores;
        }
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}

#[test]
fn think_channel_scores_match_kvpress_within_1e4_relative() {
    let model = &smollm2().model;
    let f = fixture("think_r0.5.json");
    let sample = &f["scores_sample"];
    let (layer, head) = (sample["layer"].as_u64().unwrap() as usize, sample["head"].as_u64().unwrap() as usize);
    let capture = ChannelScores { layer, scores: Arc::default() };
    ts::prefill_hooked(model, &[ids(&f["prompt_ids"])], press_hooks(Some(&capture))).unwrap();
    let got = capture.scores.lock().unwrap()[head].clone();
    let expected: Vec<f64> = sample["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.len(), expected.len());
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
        assert!((g as f64 - e).abs() <= 1e-4 * e.abs().max(1e-3 * scale), "channel {i}: {g} vs {e}");
    }
}

/// kvzip fixture stem → the options kvpress ran with.
fn kvzip_options(f: &Value) -> PressOptions {
    let p = &f["params"];
    PressOptions {
        ratio: f["ratio"].as_f64(),
        chunk_size: p["chunk_size"].as_u64().map(|v| v as usize),
        layerwise: p["layerwise"].as_bool(),
        kvzip_plus: p["kvzip_plus_normalization"].as_bool(),
        sinks: p["n_sink"].as_u64().map(|v| v as usize),
        ..PressOptions::default()
    }
}

const KVZIP_CASES: &[&str] = &["kvzip_r0.5", "kvzip_r0.25", "kvzip_layerwise_r0.5", "kvzip_plus_r0.5"];

#[test]
fn kvzip_replays_the_tokens_kvpress_replays() {
    let replay = ReplayPrompt::new(smollm2().tokenizer().unwrap()).unwrap();
    for file in KVZIP_CASES {
        let f = fixture(&format!("{file}.json"));
        let prompt = ids(&f["prompt_ids"]);
        let chunks = replay.chunks(&prompt, f["params"]["chunk_size"].as_u64().unwrap() as usize);
        assert_eq!(replay.prefix.len() as u64, f["prefix_length"].as_u64().unwrap(), "{file}");
        let expected: Vec<Vec<u32>> = f["replay_ids"].as_array().unwrap().iter().map(ids).collect();
        assert_eq!(chunks.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), expected, "{file}");
    }
}

#[test]
fn kvzip_keeps_the_entries_kvpress_keeps() {
    let loaded = smollm2();
    for file in KVZIP_CASES {
        let f = fixture(&format!("{file}.json"));
        let mut hooks = Hooks::new(Some(build("kvzip", &kvzip_options(&f)).unwrap()), None);
        hooks.bind(loaded).unwrap();
        let (_, cache, _) = ts::prefill_hooked(&loaded.model, &[ids(&f["prompt_ids"])], hooks).unwrap();
        let near: Vec<(usize, usize, i64)> = f["near_boundary"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_u64().unwrap() as usize, e[2].as_i64().unwrap()))
            .collect();
        let mut differing = Vec::new();
        for (layer, heads) in f["kept"].as_array().unwrap().iter().enumerate() {
            for (head, kept) in heads.as_array().unwrap().iter().enumerate() {
                let expected: Vec<i64> = kept.as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
                let got = cache.layer(layer).positions(0, head);
                for p in
                    expected.iter().filter(|p| !got.contains(p)).chain(got.iter().filter(|p| !expected.contains(p)))
                {
                    differing.push((layer, head, *p));
                }
            }
        }
        // A swap across the cut moves an entry out and another in: both near the boundary.
        assert!(differing.iter().all(|d| near.contains(d)), "{file}: {differing:?} differ, near the cut: {near:?}");
        eprintln!("{file}: {} entries differ from kvpress's, {} near its cut", differing.len(), near.len());
        // The replay left nothing behind and the context continues where it ended.
        let n = f["seq_len"].as_i64().unwrap();
        assert_eq!(cache.next_positions(), &[n]);
        assert!(cache.layers().iter().flat_map(|l| l.all_positions().iter().flatten()).all(|&p| p < n));
    }
}

#[test]
fn kvzip_scores_match_kvpress_within_1e4_relative() {
    let loaded = smollm2();
    for file in KVZIP_CASES {
        let f = fixture(&format!("{file}.json"));
        let mut press = pare_press::presses::KvZip::new(&kvzip_options(&f)).unwrap();
        press.bind(loaded.tokenizer().unwrap()).unwrap();
        let prompt = ids(&f["prompt_ids"]);
        let (_, mut cache) = ts::prefill(&loaded.model, std::slice::from_ref(&prompt)).unwrap();
        let scores = press.replay_scores(&loaded.model, &mut cache, &prompt).unwrap();
        let sample = &f["scores_sample"];
        let (layer, head) = (sample["layer"].as_u64().unwrap() as usize, sample["head"].as_u64().unwrap() as usize);
        let got = &scores[layer][head];
        let expected: Vec<f64> = sample["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), expected.len(), "{file}");
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut worst = 0f64;
        for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
            let tol = 1e-4 * e.abs().max(1e-3 * scale);
            worst = worst.max((g as f64 - e).abs() / e.abs().max(1e-3 * scale));
            assert!((g as f64 - e).abs() <= tol, "{file}: entry {i}: {g} vs {e}");
        }
        eprintln!("{file}: largest relative score difference {worst:.2e}");
    }
}

/// A DuoAttention head pattern with `scores`, written where a test may read it back.
fn duo_pattern_file(name: &str, scores: Vec<Vec<f32>>, sink_size: usize, recent_size: usize) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("pare-duo-{}-{name}.json", std::process::id()));
    DuoPattern { sink_size, recent_size, scores, calibration: None }.save(&path).unwrap();
    path
}

fn f32_rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

#[test]
fn duo_attention_head_scores_match_kvpress_on_the_fly_scoring() {
    let model = &smollm2().model;
    let f = fixture("duo_attention_r0.5.json");
    let samples: Vec<Vec<u32>> = f["calibration_samples"].as_array().unwrap().iter().map(ids).collect();
    let got = score_heads(model, &samples, f["params"]["q_len"].as_u64().unwrap() as usize).unwrap();
    let expected = f32_rows(&f["head_scores"]);
    assert_eq!((got.len(), got[0].len()), (expected.len(), expected[0].len()));
    for (layer, (g, e)) in got.iter().zip(&expected).enumerate() {
        for (head, (&g, &e)) in g.iter().zip(e).enumerate() {
            assert!((g - e).abs() <= 1e-4 * e.abs(), "layer {layer} head {head}: {g} vs {e}");
        }
    }
    // pare's own scores choose kvpress's streaming heads, up to heads tied within float noise.
    let near: Vec<(usize, usize)> = f["near_boundary"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_u64().unwrap() as usize))
        .collect();
    let pattern = DuoPattern { sink_size: 16, recent_size: 64, scores: got, calibration: None };
    let mask = pattern.streaming_mask(f["ratio"].as_f64().unwrap());
    for (layer, heads) in f["streaming_mask"].as_array().unwrap().iter().enumerate() {
        for (head, m) in heads.as_array().unwrap().iter().enumerate() {
            let want = m.as_u64().unwrap() == 1;
            assert!(mask[layer][head] == want || near.contains(&(layer, head)), "layer {layer} head {head}");
        }
    }
}

#[test]
fn duo_attention_keeps_kvpress_entries_and_reports_its_compression_ratio() {
    let model = &smollm2().model;
    for file in ["duo_attention_r0.5", "duo_attention_r0.25"] {
        let f = fixture(&format!("{file}.json"));
        let p = &f["params"];
        let (sink, recent) = (p["sink_size"].as_u64().unwrap() as usize, p["recent_size"].as_u64().unwrap() as usize);
        let path = duo_pattern_file(file, f32_rows(&f["head_scores"]), sink, recent);
        let opts =
            PressOptions { head_ratio: f["ratio"].as_f64(), duo_pattern: Some(path.clone()), ..Default::default() };
        let press = build("duo-attention", &opts).unwrap();
        let prompt = ids(&f["prompt_ids"]);
        let (_, cache, _) =
            ts::prefill_hooked(model, std::slice::from_ref(&prompt), press_hooks(Some(press.as_ref()))).unwrap();
        for (layer, heads) in f["kept"].as_array().unwrap().iter().enumerate() {
            for (head, kept) in heads.as_array().unwrap().iter().enumerate() {
                let expected: Vec<i64> = kept.as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
                assert_eq!(cache.layer(layer).positions(0, head), expected, "{file}: layer {layer} head {head}");
            }
        }
        // The memory is freed: the cache holds exactly the kept share, kvpress's compression_ratio_.
        let pattern = DuoPattern::load(&path).unwrap();
        let duo = DuoAttention::new(&pattern, f["ratio"].as_f64().unwrap(), PositionPolicy::Original).unwrap();
        let want = f["compression_ratio"].as_f64().unwrap();
        assert!((duo.compression_ratio(prompt.len()) - want).abs() < 1e-9, "{file}");
        let achieved = 1.0 - cache.bytes() as f64 / cache.uncompressed_bytes() as f64;
        assert!((achieved - want).abs() < 1e-9, "{file}: {achieved} vs {want}");
        std::fs::remove_file(path).unwrap();
    }
}
