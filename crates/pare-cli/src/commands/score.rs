//! `pare score`: the next-token distribution after a prompt.

use anyhow::Result;
use candle_core::D;
use serde::Serialize;
use serde_json::json;

use crate::common::{encode_prompt, print_json, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[arg(long)]
    pub chat: bool,
    /// How many of the most likely tokens to show.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Entry {
    id: u32,
    token: String,
    logprob: f32,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = args.model.load()?;
    let tok = loaded.tokenizer()?;
    let prompt = encode_prompt(&loaded, &args.prompt, args.chat)?;
    let (logits, _) = loaded.model.prefill(std::slice::from_ref(&prompt))?;
    let logprobs: Vec<f32> = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?.to_vec1()?;
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    order.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    let top: Vec<Entry> = order
        .iter()
        .take(args.top_k)
        .map(|&i| Entry { id: i as u32, token: tok.decode(&[i as u32], false).unwrap_or_default(), logprob: logprobs[i] })
        .collect();
    if args.json {
        print_json(&json!({ "prompt_tokens": prompt.len(), "top": top }))?;
    } else {
        println!("{:>4}  {:>8}  {:>9}  {:>7}  token", "rank", "id", "logprob", "prob");
        for (rank, e) in top.iter().enumerate() {
            println!("{:>4}  {:>8}  {:>9.4}  {:>7.4}  {:?}", rank + 1, e.id, e.logprob, e.logprob.exp(), e.token);
        }
    }
    Ok(())
}

