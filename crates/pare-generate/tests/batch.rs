//! Continuous batching: sequences admitted at different steps, with different lengths, samplers
//! and presses, decode in one step together and each produce what it produces alone.

use pare_generate::{Batch, Event, GenerationConfig, GroupSpec, Settings};
use pare_model::{Hooks, PrefillInput};
use pare_press::PressOptions;
use pare_test_support::smollm2;

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
    let model = &smollm2().model;
    let mut batch = Batch::new(model, smollm2().tokenizer().ok());
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
