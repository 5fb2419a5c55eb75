//! Continuous batching: sequences admitted at different steps, with different lengths, samplers
//! and presses, decode in one step together and each produce what it produces alone.

use std::sync::OnceLock;

use candle_core::Device;
use pare_generate::{Batch, Event, GenerationConfig, GroupSpec, Settings};
use pare_model::{Hooks, LoadedModel, PrefillInput, WeightDType};
use pare_press::PressOptions;
use pare_test_support::{smollm2, smollm2_path};

/// SmolLM2 with its weights kept in their GGUF blocks: 8-bit kernels for fewer than 32 rows, a
/// GEMM on the dequantized weight for more (two paths that round differently).
fn smollm2_quantized() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        pare_model::load(smollm2_path().to_str().unwrap(), WeightDType::Quantized, &Device::Cpu).unwrap()
    })
}

fn text_tokens(start: usize, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(pare_test_support::asset("texts/wiki.utf8")).expect("make assets");
    let ids = smollm2().tokenizer().unwrap().encode(&text, true).unwrap();
    ids[start..start + n].to_vec()
}

struct Request {
    prompt: Vec<u32>,
    config: GenerationConfig,
    press: Option<&'static str>,
    /// The step at which it joins the batch.
    arrives: usize,
}

fn hooks(press: Option<&str>) -> Hooks {
    let press = press.map(|p| pare_press::build(p, &PressOptions { ratio: Some(0.5), ..Default::default() }).unwrap());
    Hooks::new(press, None)
}

fn spec(r: &Request) -> GroupSpec<'_> {
    let settings = Settings::new(r.config.clone(), smollm2().tokenizer().ok()).unwrap();
    GroupSpec {
        input: PrefillInput::Tokens(std::slice::from_ref(&r.prompt)),
        prompt_ids: vec![r.prompt.clone()],
        settings,
        hooks: hooks(r.press),
        top_logprobs: 3,
    }
}

/// Every request's tokens and log-probs, stepping all of them in one batch.
fn run_together(requests: &[Request], prefill_chunk: Option<usize>) -> Vec<(Vec<u32>, Vec<f32>)> {
    run_on(smollm2(), requests, prefill_chunk, usize::MAX)
}

/// [`run_together`] on `loaded`, with at most `step_tokens` prompt tokens per step.
fn run_on(
    loaded: &LoadedModel,
    requests: &[Request],
    prefill_chunk: Option<usize>,
    step_tokens: usize,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut batch = Batch::new(&loaded.model, loaded.tokenizer().ok()).with_step_tokens(step_tokens);
    if let Some(chunk) = prefill_chunk {
        batch = batch.with_prefill_chunk(chunk);
    }
    let mut ids = vec![None; requests.len()];
    let mut out = vec![(Vec::new(), Vec::new()); requests.len()];
    let mut step = 0;
    loop {
        for (i, r) in requests.iter().enumerate() {
            if r.arrives == step {
                ids[i] = Some(batch.admit(spec(r)).unwrap()[0]);
            }
        }
        for event in batch.step().unwrap() {
            if let Event::Token { id, token, logprob, top, .. } = event {
                let i = ids.iter().position(|&x| x == Some(id)).unwrap();
                assert_eq!(top.len(), 3);
                assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1, "top log-probs best first");
                out[i].0.push(token);
                out[i].1.push(logprob);
            }
        }
        batch.retire_finished();
        step += 1;
        if batch.is_empty() && requests.iter().all(|r| r.arrives < step) {
            break;
        }
    }
    out
}

#[test]
fn sequences_that_share_steps_match_running_alone() {
    let greedy = |n| GenerationConfig { max_new_tokens: Some(n), ..Default::default() };
    let sampled = |n, seed| GenerationConfig {
        max_new_tokens: Some(n),
        do_sample: Some(true),
        temperature: Some(0.8),
        top_k: Some(40),
        seed: Some(seed),
        ..Default::default()
    };
    let requests = vec![
        Request { prompt: text_tokens(0, 40), config: greedy(12), press: None, arrives: 0 },
        Request { prompt: text_tokens(100, 90), config: greedy(8), press: Some("knorm"), arrives: 2 },
        Request { prompt: text_tokens(300, 17), config: sampled(10, 7), press: None, arrives: 2 },
        Request { prompt: text_tokens(700, 75), config: greedy(9), press: None, arrives: 3 },
        Request { prompt: text_tokens(500, 64), config: greedy(6), press: Some("adakv+snapkv"), arrives: 5 },
        // ignore_eos as the server sends it (candidates that count the EOS tokens), and a
        // penalty that reads whole rows, beside the others' candidate searches.
        Request {
            prompt: text_tokens(900, 20),
            config: GenerationConfig { min_new_tokens: Some(7), eos_token_id: Some(vec![0, 2]), ..greedy(7) },
            press: None,
            arrives: 1,
        },
        Request {
            prompt: text_tokens(1000, 25),
            config: GenerationConfig { repetition_penalty: Some(1.3), ..greedy(7) },
            press: None,
            arrives: 1,
        },
    ];
    // Chunks of 16: the long hook-free prompts prefill over several steps beside the others.
    let together = run_together(&requests, Some(16));
    for (i, r) in requests.iter().enumerate() {
        let alone = run_together(
            &[Request { prompt: r.prompt.clone(), config: r.config.clone(), press: r.press, arrives: 0 }],
            None,
        );
        assert_eq!(together[i].0, alone[0].0, "request {i}: tokens beside others vs alone");
        for (a, b) in together[i].1.iter().zip(&alone[0].1) {
            assert!((a - b).abs() < 2e-3, "request {i}: log-prob {a} vs {b}");
        }
        assert_eq!(together[i].0.len(), r.config.max_new_tokens.unwrap());
    }
}

#[test]
fn prompts_prefilled_in_one_forward_match_prefilling_alone_bit_for_bit() {
    // Quantized weights, prompts on both sides of the 32-row switch between the 8-bit kernels
    // and the GEMM, several arriving together and beside decoding rows, one chunked: each
    // sequence's rows take the path they take alone, so its log-probs are equal to the bit.
    let loaded = smollm2_quantized();
    let greedy = |n| GenerationConfig { max_new_tokens: Some(n), ..Default::default() };
    let requests = vec![
        Request { prompt: text_tokens(0, 12), config: greedy(6), press: None, arrives: 0 },
        Request { prompt: text_tokens(50, 70), config: greedy(5), press: None, arrives: 0 },
        Request { prompt: text_tokens(200, 24), config: greedy(5), press: None, arrives: 0 },
        Request { prompt: text_tokens(300, 100), config: greedy(4), press: None, arrives: 2 },
        Request { prompt: text_tokens(450, 9), config: greedy(4), press: None, arrives: 2 },
        Request { prompt: text_tokens(600, 150), config: greedy(3), press: Some("knorm"), arrives: 3 },
        Request { prompt: text_tokens(800, 200), config: greedy(3), press: None, arrives: 3 },
    ];
    // Chunks of 128 (the press's prompt prefills whole at admission: its press acts on all of
    // it), and at most 160 prompt tokens a step, so some prompts wait a step or two.
    let chunk = 128;
    let together = run_on(loaded, &requests, Some(chunk), 160);
    for (i, r) in requests.iter().enumerate() {
        let one = [Request { prompt: r.prompt.clone(), config: r.config.clone(), press: r.press, arrives: 0 }];
        // Alone: prefilled at admission in one forward, or chunk by chunk where it is longer.
        let alone = run_on(loaded, &one, Some(chunk).filter(|&c| r.prompt.len() > c), usize::MAX).remove(0);
        assert_eq!(together[i].0, alone.0, "request {i}: tokens beside others vs alone");
        assert_eq!(together[i].1, alone.1, "request {i}: log-probs beside others vs alone");
        assert_eq!(together[i].0.len(), r.config.max_new_tokens.unwrap());
    }
}

#[test]
fn a_cancelled_sequence_frees_its_cache_at_once() {
    let model = &smollm2().model;
    let mut batch = Batch::new(model, smollm2().tokenizer().ok());
    let cfg = GenerationConfig { max_new_tokens: Some(50), ..Default::default() };
    let prompts = [text_tokens(0, 30), text_tokens(60, 30)];
    fn make<'a>(prompt: &'a [Vec<u32>], cfg: &GenerationConfig) -> GroupSpec<'a> {
        GroupSpec {
            input: PrefillInput::Tokens(prompt),
            prompt_ids: prompt.to_vec(),
            settings: Settings::new(cfg.clone(), None).unwrap(),
            hooks: Hooks::default(),
            top_logprobs: 0,
        }
    }
    let a = batch.admit(make(&prompts[..1], &cfg)).unwrap()[0];
    batch.admit(make(&prompts[1..], &cfg)).unwrap();
    batch.step().unwrap();
    let both = batch.cache_bytes().in_use;
    batch.cancel(a);
    let retired = batch.retire_finished();
    assert_eq!(retired.len(), 1);
    assert_eq!(batch.cache_bytes().in_use, both - retired[0].in_use);
    assert_eq!(batch.running(), 1);
    let events = batch.step().unwrap();
    assert!(events.iter().all(|e| !matches!(e, Event::Token { id, .. } if *id == a)), "no tokens after cancel");
}

/// Every token of one group, with a pause (`suspend`, then `resume` once `pause` more steps have
/// passed) after `at` tokens when given.
fn run_with_pause(r: &Request, pause: Option<(usize, usize)>, prefill_chunk: Option<usize>) -> Vec<u32> {
    let model = &smollm2().model;
    let mut batch = Batch::new(model, smollm2().tokenizer().ok());
    if let Some(chunk) = prefill_chunk {
        batch = batch.with_prefill_chunk(chunk);
    }
    let id = batch.admit(spec(r)).unwrap()[0];
    let mut tokens = Vec::new();
    let mut suspended = None;
    let mut steps_out = 0;
    loop {
        if let Some((at, _)) = pause.filter(|&(at, _)| tokens.len() == at && suspended.is_none() && steps_out == 0) {
            suspended = batch.suspend(id);
            assert!(suspended.as_ref().is_some_and(|s| s.tokens() == r.prompt.len() + at));
            assert_eq!(batch.cache_bytes().in_use, 0, "a suspended group holds no cache");
        }
        if suspended.is_some() {
            steps_out += 1;
            if steps_out > pause.unwrap().1 {
                batch.resume(suspended.take().unwrap()).unwrap();
            }
        }
        for event in batch.step().unwrap() {
            if let Event::Token { token, .. } = event {
                tokens.push(token);
            }
        }
        batch.retire_finished();
        if batch.is_empty() && suspended.is_none() {
            return tokens;
        }
    }
}

#[test]
fn a_suspended_sequence_resumes_where_it_stopped() {
    // Sampling with stateful processors: the random stream and the penalties' counts carry over.
    let config = GenerationConfig {
        max_new_tokens: Some(24),
        min_new_tokens: Some(24),
        do_sample: Some(true),
        temperature: Some(0.9),
        top_k: Some(20),
        repetition_penalty: Some(1.2),
        seed: Some(7),
        ..Default::default()
    };
    let r = Request { prompt: text_tokens(0, 40), config, press: None, arrives: 0 };
    let alone = run_with_pause(&r, None, None);
    assert_eq!(alone.len(), 24);
    assert_eq!(run_with_pause(&r, Some((10, 2)), None), alone);
    // Resumed with its 50 tokens prefilled in chunks of 16.
    assert_eq!(run_with_pause(&r, Some((10, 2)), Some(16)), alone);
    // A group with a press is not suspended: running its tokens again would compress another prompt.
    let pressed = Request { press: Some("knorm"), ..r };
    let mut batch = Batch::new(&smollm2().model, smollm2().tokenizer().ok());
    let id = batch.admit(spec(&pressed)).unwrap()[0];
    assert!(batch.suspend(id).is_none());
}

#[test]
fn a_group_continues_a_copy_of_a_prefix_cache() {
    let model = &smollm2().model;
    let prompt = text_tokens(0, 48);
    let config = GenerationConfig { max_new_tokens: Some(12), min_new_tokens: Some(12), ..Default::default() };
    let r = Request { prompt: prompt.clone(), config: config.clone(), press: None, arrives: 0 };
    let alone = run_with_pause(&r, None, None);
    let (_, mut prefix) =
        model.prefill(PrefillInput::Tokens(std::slice::from_ref(&prompt)), &mut Hooks::default()).unwrap();
    prefix.truncate(32).unwrap();
    assert_eq!(prefix.next_positions(), vec![32]);
    assert_eq!(prefix.bytes(), prefix.uncompressed_bytes(), "cut entries are gone, not compressed");
    let mut batch = Batch::new(model, smollm2().tokenizer().ok());
    let rest = [prompt[32..].to_vec()];
    let settings = Settings::new(config, smollm2().tokenizer().ok()).unwrap();
    let spec = GroupSpec {
        input: PrefillInput::Tokens(&rest),
        prompt_ids: vec![prompt],
        settings,
        hooks: Hooks::default(),
        top_logprobs: 0,
    };
    batch.admit_after(prefix, spec).unwrap();
    let mut tokens = Vec::new();
    while !batch.is_empty() {
        for event in batch.step().unwrap() {
            if let Event::Token { token, .. } = event {
                tokens.push(token);
            }
        }
        batch.retire_finished();
    }
    assert_eq!(tokens, alone);
}

/// llama-tiny with token `bad`'s embedding row set to NaN: a prompt holding it gets NaN logits,
/// every other prompt is unaffected.
fn llama_tiny_with_nan_token(bad: u32) -> LoadedModel {
    let src = pare_test_support::fixture_path("llama-tiny/model");
    let dir = std::env::temp_dir().join(format!("pare-nan-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let embed = tensors.get_mut("model.embed_tokens.weight").unwrap();
    let mut rows = embed.to_vec2::<f32>().unwrap();
    rows[bad as usize].fill(f32::NAN);
    *embed = candle_core::Tensor::new(rows, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let loaded =
        pare_model::load(dir.to_str().unwrap(), WeightDType::Float(candle_core::DType::F32), &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    loaded
}

/// The tokens `events` report for row `id`.
fn tokens_for(events: &[Event], id: u64) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { id: i, token, .. } if *i == id => Some(*token),
            _ => None,
        })
        .collect()
}

#[test]
fn a_prompt_that_fails_in_a_shared_step_ends_alone() {
    let loaded = llama_tiny_with_nan_token(7);
    let greedy = GenerationConfig { max_new_tokens: Some(5), ..Default::default() };
    let spec = |prompt: &'static [Vec<u32>]| GroupSpec {
        input: PrefillInput::Tokens(prompt),
        prompt_ids: prompt.to_vec(),
        settings: Settings::new(greedy.clone(), None).unwrap(),
        hooks: Hooks::default(),
        top_logprobs: 0,
    };
    let good: &'static [Vec<u32>] = Box::leak(Box::new([(10..30).collect::<Vec<u32>>()]));
    let bad: &'static [Vec<u32>] = Box::leak(Box::new([vec![11, 12, 7, 13]]));
    let run_out = |batch: &mut Batch, id| {
        let mut out = Vec::new();
        while !batch.is_empty() {
            out.extend(tokens_for(&batch.step().unwrap(), id));
            batch.retire_finished();
        }
        out
    };
    let alone = {
        let mut batch = Batch::new(&loaded.model, None).with_prefill_chunk(64);
        let id = batch.admit(spec(good)).unwrap()[0];
        run_out(&mut batch, id)
    };
    // Both prompts wait for the first step and prefill in its one forward.
    let mut batch = Batch::new(&loaded.model, None).with_prefill_chunk(64);
    let good_id = batch.admit(spec(good)).unwrap()[0];
    let bad_id = batch.admit(spec(bad)).unwrap()[0];
    let first = batch.step().unwrap();
    let failures = batch.take_failures();
    assert_eq!(failures.len(), 1, "one failure: {failures:?}");
    assert_eq!(failures[0].0, vec![bad_id]);
    assert!(failures[0].1.to_string().contains("NaN or infinite logits"), "{}", failures[0].1);
    assert!(tokens_for(&first, bad_id).is_empty());
    assert!(batch.take_failures().is_empty(), "each failure is reported once");
    let mut together = tokens_for(&first, good_id);
    batch.retire_finished();
    together.extend(run_out(&mut batch, good_id));
    assert_eq!(together, alone, "the other prompt runs on as alone");
    assert_eq!(alone.len(), 5);
}
