//! `pare generate`: greedy, sampling or beam search; streams text for a single sequence.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pare_generate::{GenerationOutput, Generator, Prompts};
use serde_json::json;

use super::generate_image::ImagePrompt;
use crate::common::{encode_prompt, ensure_run_fits, print_json, ModelArgs, ParallelArgs};
use crate::press_args::{human_bytes, PressArgs};
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
    /// The prompt text.
    #[arg(long, short = 'p', required_unless_present = "prompts_file")]
    pub prompt: Option<String>,
    /// Many prompts, run as one left-padded batch: one per line, or JSONL with a "prompt" field.
    #[arg(long, conflicts_with = "prompt")]
    pub prompts_file: Option<PathBuf>,
    /// Wrap each prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Default 64, or the model's generation_config.json / --config value; this flag wins over both.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
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
        if args.parallel.tp.get() > 1 {
            bail!("--tp with --image: a LLaVA model runs whole (its vision tower and projector are not split)");
        }
        return run_image(&args, image);
    }
    let prompts_text = match (&args.prompt, &args.prompts_file) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(file)) => read_prompts(file)?,
        (None, None) => bail!("give --prompt or --prompts-file"),
    };
    let session = Session::open(&args.model, &args.parallel, &args.press, &args.token_prune)?;
    let loaded = &session.loaded;
    let config = args.sampling.generation_config(loaded, args.max_new_tokens)?;
    let tok = loaded.tokenizer()?;
    let prompts = prompts_text.iter().map(|p| encode_prompt(loaded, p, args.chat)).collect::<Result<Vec<_>>>()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let sequences = prompts.len().saturating_mul(config.num_beams().max(config.num_return_sequences()));
    ensure_run_fits(loaded, sequences, longest, longest + config.max_new_tokens())?;
    let generator = Generator::new(config.clone(), Some(tok))?.with_hooks(session.hooks.clone());

    // Stream only when exactly one sequence is produced token by token.
    let streaming = !args.json && prompts.len() == 1 && config.num_return_sequences() == 1 && config.num_beams() == 1;
    let mut out = Stdout::new();
    let output = generator.generate(&loaded.model, Prompts::Tokens(&prompts), |_, _, text| {
        if streaming {
            out.stream(text);
        }
    })?;
    let shape = PromptShape { tokens: prompts[0].len(), image_tokens: None };
    report(&args, &output, shape, session.hooked(), streaming, &mut out)
}

/// LLaVA: one prompt with its image, through the same loop on the language model.
fn run_image(args: &Args, image: &Path) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompts_file) {
        (Some(p), None) => p,
        _ => bail!("--image takes one --prompt (no --prompts-file)"),
    };
    if args.chat {
        bail!("--chat with --image: write the prompt in LLaVA-1.5's format instead, e.g. \"USER: <image>\\nWhat is shown? ASSISTANT:\"");
    }
    let vlm = ImagePrompt::open(&args.model, &args.press, &args.token_prune, prompt, image)?;
    let text_model = vlm.llava.text_model();
    let config = args.sampling.generation_config(&text_model, args.max_new_tokens)?;
    if config.num_beams() > 1 || config.num_return_sequences() > 1 {
        bail!("--image runs greedy or sampled decoding of one sequence (no --num-beams or --num-return-sequences)");
    }
    let hooked = !vlm.hooks.is_empty();
    let generator = Generator::new(config, Some(text_model.tokenizer()?))?.with_hooks(vlm.hooks.clone());
    let mut out = Stdout::new();
    let output = generator.generate(&vlm.llava.model.language, vlm.prompts(), |_, _, text| {
        if !args.json {
            out.stream(text);
        }
    })?;
    let shape = PromptShape { tokens: vlm.ids.len(), image_tokens: Some(vlm.image_tokens) };
    report(args, &output, shape, hooked, !args.json, &mut out)
}

/// What the report says of the (first) prompt.
pub struct PromptShape {
    pub tokens: usize,
    /// For a VLM prompt: how many of its tokens stand for the image.
    pub image_tokens: Option<usize>,
}

/// Print a finished generation: one JSON object, or the text (what streaming did not show yet)
/// and the timings.
pub fn report(
    args: &Args,
    output: &GenerationOutput,
    prompt: PromptShape,
    hooked: bool,
    streamed: bool,
    out: &mut Stdout,
) -> Result<()> {
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
        let mut report = json!({
            "text": first.text,
            "tokens": first.tokens,
            "logprobs": first.logprobs,
            "finish_reason": first.finish_reason,
            "prompt_tokens": prompt.tokens,
            "sequences": sequences,
            "timings": output.timings,
            "cache": output.cache,
        });
        if let Some(n) = prompt.image_tokens {
            report["image_tokens"] = n.into();
        }
        return print_json(&report);
    }
    if streamed {
        out.finish(&output.sequences[0].text);
    } else {
        for s in &output.sequences {
            println!("--- prompt {} · score {:.4} · {:?}", s.prompt_index, s.score, s.finish_reason);
            println!("{}", s.text);
        }
    }
    let t = &output.timings;
    let image = prompt.image_tokens.map(|n| format!(" ({n} image)")).unwrap_or_default();
    // A press that replays the context (KVzip) spends that much more inside the prefill.
    let replay =
        if t.press_tokens > 0 { format!(" + {} replayed by the press", t.press_tokens) } else { String::new() };
    eprintln!(
        "[{} prompt tokens{image}{replay}, {} generated: prefill {:.1} tok/s, decode {:.1} tok/s]",
        t.prompt_tokens, t.generated_tokens, t.prefill_tok_s, t.decode_tok_s
    );
    if let (Some(c), true) = (&output.cache, hooked) {
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

/// Text streamed to stdout as it becomes safe to show.
#[derive(Default)]
pub struct Stdout {
    shown: String,
}

impl Stdout {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stream(&mut self, text: &str) {
        use std::io::Write;
        let mut stdout = std::io::stdout();
        let _ = write!(stdout, "{text}");
        let _ = stdout.flush();
        self.shown.push_str(text);
    }

    /// The final text: print what was not shown yet, then end the line.
    pub fn finish(&mut self, text: &str) {
        if let Some(rest) = text.strip_prefix(self.shown.as_str()) {
            print!("{rest}");
        }
        println!();
    }
}
