//! `pare generate --image FILE`: LLaVA-1.5 generation. The image is preprocessed, encoded and
//! placed in the prompt by pare-vision's prefill; decoding then runs on the language model's
//! cache one token at a time, through the same logits processors and sampling as `generate`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pare_generate::processors::ProcessContext;
use pare_generate::sampling::{argmax, logprob, sample};
use pare_generate::stopping::find_stop;
use pare_generate::{FinishReason, Generator};
use pare_model::TokenPruner;
use pare_token_prune::{PruneSchedule, Pruner, Span};
use pare_vision::LoadedLlava;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use super::generate::Args;
use crate::common::print_json;

/// Load the LLaVA checkpoint `args.model` names (an HF directory).
pub fn load_llava(args: &crate::common::ModelArgs) -> Result<LoadedLlava> {
    let path = pare_model::loader::resolve_model(&args.model)?;
    if !pare_vision::is_llava_dir(&path) {
        bail!(
            "--image needs a LLaVA checkpoint directory (config.json with model_type \"llava\"); {} is not one",
            path.display()
        );
    }
    Ok(LoadedLlava::load(&path, args.weight_dtype()?, &args.device()?)?)
}

/// The token pruner for a LLaVA prompt: `--prune-span image` cuts from its image tokens.
pub fn llava_pruner(
    prune: &crate::prune_args::PruneArgs,
    llava: &LoadedLlava,
    ids: &[u32],
) -> Result<Option<Box<dyn TokenPruner>>> {
    let Some(spec) = &prune.prune_tokens else { return Ok(None) };
    if prune.prune_span != "image" {
        return prune.build(llava.model.language.num_layers());
    }
    let schedule = PruneSchedule::parse(spec)?;
    schedule.check(llava.model.language.num_layers())?;
    let span = Span::Positions(vec![llava.model.image_positions(ids)]);
    let scorer = pare_token_prune::scorer(&prune.prune_score, 0)?;
    Ok(Some(Box::new(Pruner { schedule, span, scorer })))
}

pub fn run(args: &Args, image: &Path) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompts_file) {
        (Some(p), None) => p.clone(),
        _ => bail!("--image takes one --prompt (no --prompts-file)"),
    };
    if args.chat {
        bail!("--chat with --image: write the prompt in LLaVA-1.5's format instead, e.g. \"USER: <image>\\nWhat is shown? ASSISTANT:\"");
    }
    if !image.is_file() {
        bail!("--image {}: no such file", image.display());
    }
    let press = args.press.build()?;
    args.prune.check()?;
    let llava = load_llava(&args.model)?;
    let text_model = llava.text_model();
    let config = args.sampling.generation_config(&text_model, args.max_new_tokens)?;
    if config.num_beams() > 1 || config.num_return_sequences() > 1 {
        bail!("--image runs greedy or sampled decoding of one sequence (no --num-beams or --num-return-sequences)");
    }
    let tok = text_model.tokenizer()?;
    let ids = llava.prompt_ids(&prompt)?;
    let max_new = config.max_new_tokens();
    let ctx = llava.model.language.config.max_position_embeddings;
    if ids.len() + max_new > ctx {
        bail!(
            "the prompt ({} tokens with the image) plus max_new_tokens {max_new} exceeds the model's context of {ctx}",
            ids.len()
        );
    }
    let pixels = llava
        .processor
        .preprocess_file(image)?
        .to_tensor(llava.model.language.dtype, &llava.model.language.device)
        .with_context(|| format!("--image {}", image.display()))?;
    let pruner = llava_pruner(&args.prune, &llava, &ids)?;
    let generator = Generator::new(config.clone(), Some(tok))?;
    let mut chain = generator.chain()?;
    let mut rng = StdRng::seed_from_u64(config.seed.unwrap_or(0));
    let eos = config.eos_token_id.clone().unwrap_or_default();
    let stops = config.stop.clone().unwrap_or_default();

    let start = Instant::now();
    let (mut logits, mut cache) = llava.model.prefill(&ids, &pixels, press.as_deref(), pruner.as_deref())?;
    let prefill_s = start.elapsed().as_secs_f64();
    let kv_bytes_prefill = cache.bytes();
    let mut sequence = ids.clone();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    let mut finish = FinishReason::Length;
    let mut streamed = String::new();
    let mut stdout = std::io::stdout();
    let decode_start = Instant::now();
    for step in 0..max_new {
        let scores = logits.squeeze(0)?.to_vec1::<f32>()?;
        let mut processed = scores.clone();
        chain.process(
            &mut ProcessContext { input_ids: &sequence, prompt_len: ids.len(), rng: &mut rng },
            &mut processed,
        );
        let token = if config.do_sample() { sample(&processed, &mut rng) } else { argmax(&processed) };
        chain.accept(token, &processed);
        sequence.push(token);
        tokens.push(token);
        logprobs.push(logprob(&scores, token) as f32);
        let text = tok.decode(&tokens, true).unwrap_or_default();
        if !args.json
            && find_stop(&text, &stops).is_none()
            && !text.ends_with('\u{FFFD}')
            && text.starts_with(&streamed)
        {
            // Stream what no stop string can still claim.
            let holdback = stops.iter().map(String::len).max().unwrap_or(1).saturating_sub(1);
            let safe = text.len().saturating_sub(holdback);
            if safe > streamed.len() && text.is_char_boundary(safe) {
                let _ = write!(stdout, "{}", &text[streamed.len()..safe]);
                let _ = stdout.flush();
                streamed = text[..safe].to_string();
            }
        }
        if eos.contains(&token) {
            finish = FinishReason::Eos;
            break;
        }
        if !stops.is_empty() && find_stop(&text, &stops).is_some() {
            finish = FinishReason::Stop;
            break;
        }
        if step + 1 == max_new {
            break;
        }
        if config.max_time.is_some_and(|t| start.elapsed().as_secs_f64() >= t) {
            finish = FinishReason::Time;
            break;
        }
        logits = llava.model.language.decode(&mut cache, &[token])?;
    }
    let decode_s = decode_start.elapsed().as_secs_f64();
    let mut text = tok.decode(&tokens, true)?;
    if let Some(cut) = find_stop(&text, &stops) {
        text.truncate(cut);
    }
    let image_tokens = llava.model.image_positions(&ids).len();
    let decode_tok_s = if decode_s > 0.0 { tokens.len().saturating_sub(1) as f64 / decode_s } else { 0.0 };
    if args.json {
        return print_json(&json!({
            "text": text,
            "tokens": tokens,
            "logprobs": logprobs,
            "finish_reason": finish,
            "prompt_tokens": ids.len(),
            "image_tokens": image_tokens,
            "timings": {"prefill_s": prefill_s, "decode_s": decode_s, "prefill_tok_s": ids.len() as f64 / prefill_s.max(1e-9), "decode_tok_s": decode_tok_s},
            "cache": {"kv_bytes_prefill": kv_bytes_prefill, "kv_bytes_final": cache.bytes(), "kv_bytes_uncompressed": cache.uncompressed_bytes()},
        }));
    }
    if let Some(rest) = text.strip_prefix(streamed.as_str()) {
        print!("{rest}");
    }
    println!();
    eprintln!(
        "[{} prompt tokens ({image_tokens} image), {} generated: prefill {:.2} s, decode {decode_tok_s:.1} tok/s]",
        ids.len(),
        tokens.len(),
        prefill_s
    );
    Ok(())
}
