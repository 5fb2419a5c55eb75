//! `pare generate`: greedy, sampling or beam search; streams text for a single sequence.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pare_generate::Generator;
use serde_json::json;

use crate::common::{encode_prompt, print_json, ModelArgs};
use crate::press_args::{human_bytes, PressArgs};
use crate::prune_args::PruneArgs;
use crate::sampling_args::SamplingArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub press: PressArgs,
    #[command(flatten)]
    pub prune: PruneArgs,
    /// The prompt text.
    #[arg(long, short = 'p', required_unless_present = "prompts_file")]
    pub prompt: Option<String>,
    /// Many prompts, run as one left-padded batch: one per line, or JSONL with a "prompt" field.
    #[arg(long, conflicts_with = "prompt")]
    pub prompts_file: Option<PathBuf>,
    /// Wrap each prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// An image for a LLaVA model (PNG or JPEG); `<image>` in the prompt marks its place.
    #[arg(long)]
    pub image: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(image) = &args.image {
        return super::generate_image::run(&args, image);
    }
    let prompts_text = match (&args.prompt, &args.prompts_file) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(file)) => read_prompts(file)?,
        (None, None) => bail!("give --prompt or --prompts-file"),
    };
    let press = args.press.build()?;
    args.prune.check()?;
    let loaded = args.model.load()?;
    let pruner = args.prune.build(loaded.model.num_layers())?;
    let config = args.sampling.generation_config(&loaded, args.max_new_tokens)?;
    let tok = loaded.tokenizer()?;
    let prompts = prompts_text.iter().map(|p| encode_prompt(&loaded, p, args.chat)).collect::<Result<Vec<_>>>()?;
    let generator = Generator::new(config.clone(), Some(tok))?.with_press(press).with_pruner(pruner);

    // Stream only when exactly one sequence is produced token by token.
    let streaming = !args.json && prompts.len() == 1 && config.num_return_sequences() == 1 && config.num_beams() == 1;
    let holdback = config.stop.iter().flatten().map(String::len).max().unwrap_or(1).saturating_sub(1);
    let stops = config.stop.clone().unwrap_or_default();
    let mut streamed = String::new();
    let mut tokens = Vec::new();
    let mut stdout = std::io::stdout();
    let output = generator.generate(&loaded.model, &prompts, |_, token| {
        if streaming {
            tokens.push(token);
            let mut text = tok.decode(&tokens, true).unwrap_or_default();
            if let Some(cut) = pare_generate::stopping::find_stop(&text, &stops) {
                text.truncate(cut);
            }
            // Hold back an incomplete character and anything a stop string could still cover.
            let safe = text.len().saturating_sub(holdback);
            if !text.ends_with('\u{FFFD}')
                && safe > streamed.len()
                && text.is_char_boundary(safe)
                && text.starts_with(&streamed)
            {
                let _ = write!(stdout, "{}", &text[streamed.len()..safe]);
                let _ = stdout.flush();
                streamed = text[..safe].to_string();
            }
        }
    })?;

    if args.json {
        let sequences: Vec<_> = output
            .sequences
            .iter()
            .map(|s| {
                json!({"prompt_index": s.prompt_index, "text": s.text, "tokens": s.tokens, "logprobs": s.logprobs,
                       "score": s.score, "finish_reason": s.finish_reason})
            })
            .collect();
        let first = &output.sequences[0];
        print_json(&json!({
            "text": first.text,
            "tokens": first.tokens,
            "finish_reason": first.finish_reason,
            "prompt_tokens": prompts[0].len(),
            "sequences": sequences,
            "timings": output.timings,
            "cache": output.cache,
        }))?;
        return Ok(());
    }
    if streaming {
        let text = &output.sequences[0].text;
        if let Some(rest) = text.strip_prefix(streamed.as_str()) {
            print!("{rest}");
        }
        println!();
    } else {
        for s in &output.sequences {
            println!("--- prompt {} · score {:.4} · {:?}", s.prompt_index, s.score, s.finish_reason);
            println!("{}", s.text);
        }
    }
    let t = &output.timings;
    eprintln!(
        "[{} prompt tokens, {} generated: prefill {:.1} tok/s, decode {:.1} tok/s]",
        t.prompt_tokens, t.generated_tokens, t.prefill_tok_s, t.decode_tok_s
    );
    if let (Some(c), true) = (&output.cache, args.press.press.is_some() || args.prune.prune_tokens.is_some()) {
        eprintln!(
            "[KV cache: {} after prefill, {} at the end, {} uncompressed ({:.1}× smaller)]",
            human_bytes(c.kv_bytes_prefill),
            human_bytes(c.kv_bytes_final),
            human_bytes(c.kv_bytes_uncompressed),
            c.kv_bytes_uncompressed as f64 / c.kv_bytes_final.max(1) as f64
        );
    }
    Ok(())
}

fn read_prompts(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let p = v.get("prompt").and_then(|p| p.as_str());
            prompts.push(p.with_context(|| format!("{}:{}: no \"prompt\" string", path.display(), i + 1))?.to_string());
        } else {
            prompts.push(line.to_string());
        }
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}
