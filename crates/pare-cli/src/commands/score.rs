//! `pare score`: the next-token distribution after a prompt, raw and as the sampler would see it.

use anyhow::Result;
use candle_core::D;
use pare_generate::processors::ProcessContext;
use pare_generate::sampling::softmax;
use pare_generate::Generator;
use pare_model::PrefillInput;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::json;

use crate::common::{encode_prompt, print_json, ModelArgs, ParallelArgs};
use crate::press_args::PressArgs;
use crate::sampling_args::SamplingArgs;
use crate::session::Session;
use crate::token_prune_args::TokenPruneArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub press: PressArgs,
    #[command(flatten)]
    pub token_prune: TokenPruneArgs,
    /// Score the next token after this continuation, which runs over the (compressed) cache of the prompt.
    #[arg(long)]
    pub then: Option<String>,
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[arg(long)]
    pub chat: bool,
    /// Processor flags: the distribution after them is reported as "processed". `--top-k` also
    /// sets how many raw entries are shown (default 10).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Entry {
    id: u32,
    token: String,
    logprob: f32,
}

#[derive(Serialize)]
struct Processed {
    id: u32,
    token: String,
    prob: f64,
}

pub fn run(args: Args) -> Result<()> {
    let session = Session::open(&args.model, &args.parallel, &args.press, &args.token_prune)?;
    let loaded = &session.loaded;
    let mut hooks = session.hooks.clone();
    let tok = loaded.tokenizer()?;
    let prompt = encode_prompt(loaded, &args.prompt, args.chat)?;
    let config = args.sampling.generation_config(loaded, Some(1))?;
    let generator = Generator::new(config.clone(), Some(tok))?;
    let (mut logits, mut cache) =
        loaded.model.prefill(PrefillInput::Tokens(std::slice::from_ref(&prompt)), &mut hooks)?;
    let kv_bytes_prefill = cache.bytes();
    // kvpress's `compression_ratio`: the share of the prompt's entries a press removed.
    let compression_ratio = 1.0 - kv_bytes_prefill as f64 / cache.uncompressed_bytes().max(1) as f64;
    let mut context = prompt.clone();
    if let Some(then) = &args.then {
        // A compressed prompt only matters to what comes after it: score after a continuation.
        for token in tok.encode(then, false)? {
            logits = loaded.model.decode(&mut [(&mut cache, &mut hooks)], &[token])?;
            context.push(token);
        }
    }
    pare_model::finite::check_logits(&loaded.model, &logits, &prompt)?;
    let logits = logits.squeeze(0)?;
    let logprobs: Vec<f32> = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec1()?;
    let shown = args.sampling.flags.top_k.map_or(10, |k| k.max(1) as usize);
    let token_text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    order.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    let top: Vec<Entry> = order
        .iter()
        .take(shown)
        .map(|&i| Entry { id: i as u32, token: token_text(i as u32), logprob: logprobs[i] })
        .collect();

    // The processed distribution: the chain the sampler would apply at the first step.
    let mut scores: Vec<f32> = logits.to_vec1()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed.unwrap_or(0));
    let mut chain = generator.settings.chain()?;
    chain.process(
        &mut ProcessContext { input_ids: &context, prompt_len: prompt.len(), rng: &mut rng, candidates: None },
        &mut scores,
    );
    // Greedy decoding draws nothing: all mass sits on the argmax of the processed scores.
    let probs = if config.do_sample() {
        softmax(&scores)
    } else {
        let best = pare_generate::sampling::argmax(&scores) as usize;
        (0..scores.len()).map(|i| if i == best { 1.0 } else { 0.0 }).collect()
    };
    let mut kept: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    kept.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let processed: Vec<Processed> =
        kept.iter().map(|&i| Processed { id: i as u32, token: token_text(i as u32), prob: probs[i] }).collect();

    if args.json {
        return print_json(&json!({
            "prompt_tokens": prompt.len(), "top": top, "processed": processed, "processors": chain.names(),
            "kv_bytes_prefill": kv_bytes_prefill, "compression_ratio": compression_ratio, "kv_bytes": cache.bytes(), "kv_bytes_uncompressed": cache.uncompressed_bytes(),
        }));
    }
    println!("{:>4}  {:>8}  {:>9}  {:>7}  token", "rank", "id", "logprob", "prob");
    for (rank, e) in top.iter().enumerate() {
        println!("{:>4}  {:>8}  {:>9.4}  {:>7.4}  {:?}", rank + 1, e.id, e.logprob, e.logprob.exp(), e.token);
    }
    if !chain.is_empty() {
        println!("after {}: {} tokens possible", chain.names().join(" → "), processed.len());
        for e in processed.iter().take(shown) {
            println!("      {:>8}  {:>9.4}  {:?}", e.id, e.prob, e.token);
        }
    }
    Ok(())
}
