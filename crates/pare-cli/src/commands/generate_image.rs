//! `pare generate --image FILE`: a LLaVA-1.5 prompt. The image is preprocessed, encoded and
//! merged into the prompt's embeddings by pare-vision; `generate` then runs them through the one
//! generation loop on the language model.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use pare_generate::Prompts;
use pare_model::Hooks;
use pare_vision::LoadedLlava;

use crate::common::ModelArgs;
use crate::press_args::PressArgs;
use crate::token_prune_args::TokenPruneArgs;

/// Load the LLaVA checkpoint `args.model` names (an HF directory).
pub fn load_llava(args: &crate::common::ModelArgs) -> Result<LoadedLlava> {
    if args.adapter.is_some() {
        bail!("--adapter applies to causal language models; LLaVA checkpoints take none");
    }
    let path = pare_model::loader::resolve_model(&args.model)?;
    if !pare_vision::is_llava_dir(&path) {
        bail!(
            "--image needs a LLaVA checkpoint directory (config.json with model_type \"llava\"); {} is not one",
            path.display()
        );
    }
    let mut llava = LoadedLlava::load(&path, args.weight_dtype(), &args.device()?)?;
    llava.model.language.set_kv_dtype(args.kv_dtype()).context("--kv-dtype")?;
    Ok(llava)
}

/// A LLaVA prompt ready for the generation loop: the checkpoint, the merged image and text
/// embeddings, and the hooks for them.
pub struct ImagePrompt {
    pub llava: LoadedLlava,
    /// Prompt ids with the image placeholders expanded (what the processors see).
    pub ids: Vec<u32>,
    pub embeds: Tensor,
    pub hooks: Hooks,
    pub image_tokens: usize,
}

impl ImagePrompt {
    /// Check the flags, load the checkpoint, preprocess and encode the image.
    pub fn open(
        model: &ModelArgs,
        press: &PressArgs,
        token_prune: &TokenPruneArgs,
        prompt: &str,
        image: &Path,
    ) -> Result<Self> {
        if !image.is_file() {
            bail!("--image {}: no such file", image.display());
        }
        let press = press.build()?;
        token_prune.check()?;
        let llava = load_llava(model)?;
        let ids = llava.prompt_ids(prompt)?;
        let language = &llava.model.language;
        let pixels = llava
            .processor
            .preprocess_file(image)?
            .to_tensor(language.dtype(), language.device())
            .with_context(|| format!("--image {}", image.display()))?;
        let image_positions = llava.model.image_positions(&ids);
        let pruner = token_prune.build(language.num_layers(), Some(image_positions.clone()))?;
        let hooks = Hooks::new(press, pruner.map(Arc::from));
        let embeds = llava.model.embed(&ids, &pixels)?;
        Ok(ImagePrompt { llava, ids, embeds, hooks, image_tokens: image_positions.len() })
    }

    /// The generation loop's input: the embeddings at positions 0..n.
    pub fn prompts(&self) -> Prompts<'static> {
        let positions = (0..self.ids.len() as i64).collect();
        Prompts::Embeds { x: self.embeds.clone(), positions, ids: self.ids.clone() }
    }
}
