//! The decoder: embed → layers (attention, MLP) → final norm → LM head, in explicit prefill and
//! decode phases over a [`KvCache`].

use candle_core::{DType, Device, Tensor};

use crate::attention::{Attention, AttentionInputs};
use crate::cache::{KvCache, PAD_POSITION};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::{Linear, Mlp, Norm};
use crate::press::CachePress;
use crate::rope::Rope;

#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        inputs: &AttentionInputs,
        kv: &mut crate::cache::LayerKv,
        press: Option<&mut Box<dyn CachePress>>,
        parallel_residual: bool,
    ) -> Result<Tensor> {
        let attn_out = self.attn.forward(layer, &self.attn_norm.forward(x)?, inputs, kv, press)?;
        if parallel_residual {
            // GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            let mlp_out = self.mlp.forward(&self.mlp_norm.forward(x)?)?;
            Ok(((x + attn_out)? + mlp_out)?)
        } else {
            let h = (x + attn_out)?;
            let mlp_out = self.mlp.forward(&self.mlp_norm.forward(&h)?)?;
            Ok((h + mlp_out)?)
        }
    }

    pub fn param_count(&self) -> usize {
        self.attn_norm.param_count() + self.attn.param_count() + self.mlp_norm.param_count() + self.mlp.param_count()
    }
}

/// Which positions' logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// (batch, vocab): the last position of every row (prefill, decode).
    Last,
    /// (batch, seq, vocab): every position (perplexity).
    All,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// (vocab, hidden), in the activation dtype.
    pub embed_tokens: Tensor,
    pub blocks: Vec<Block>,
    pub final_norm: Norm,
    pub lm_head: Linear,
    pub rope: Rope,
    pub dtype: DType,
    pub device: Device,
}

impl Model {
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    pub fn param_count(&self) -> usize {
        let head = if self.config.tie_word_embeddings { 0 } else { self.lm_head.param_count() };
        self.embed_tokens.elem_count()
            + self.blocks.iter().map(Block::param_count).sum::<usize>()
            + self.final_norm.param_count()
            + head
    }

    /// An empty cache for `batch` rows, compressed by `press` if given.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        let kv_heads: Vec<usize> = self.blocks.iter().map(|b| b.attn.num_kv_heads).collect();
        KvCache::new(&kv_heads, batch)
    }

    /// Token embeddings (batch, seq, hidden) of a (batch × seq) grid of ids.
    pub fn embed(&self, tokens: &[Vec<u32>]) -> Result<Tensor> {
        let batch = tokens.len();
        let seq = tokens.first().map_or(0, Vec::len);
        if batch == 0 || seq == 0 {
            return Err(ModelError::input("empty input: no tokens to run"));
        }
        if tokens.iter().any(|t| t.len() != seq) {
            return Err(ModelError::input("tokens must form a (batch, seq) grid"));
        }
        let vocab = self.embed_tokens.dim(0)?;
        if let Some(&bad) = tokens.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::input(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        let flat_ids: Vec<u32> = tokens.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat_ids, batch * seq, &self.device)?;
        Ok(self.embed_tokens.index_select(&ids, 0)?.reshape((batch, seq, self.config.hidden_size))?)
    }

    /// Run `tokens` (batch × seq, already padded) at `positions` through the model, extending the cache.
    pub fn forward(&self, tokens: &[Vec<u32>], positions: &[Vec<i64>], cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let x = self.embed(tokens)?;
        self.forward_embeds(x, positions, cache, logits)
    }

    /// Run input embeddings x (batch, seq, hidden) at `positions` through the decoder layers,
    /// extending the cache. Multimodal models enter here with image features in place.
    pub fn forward_embeds(&self, x: Tensor, positions: &[Vec<i64>], cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        if batch == 0 || seq == 0 {
            return Err(ModelError::input("empty input: no tokens to run"));
        }
        if positions.len() != batch || positions.iter().any(|p| p.len() != seq) {
            return Err(ModelError::input("positions must form the input's (batch, seq) grid"));
        }
        if cache.batch() != batch || cache.layers.len() != self.num_layers() {
            return Err(ModelError::input(format!(
                "cache holds {} rows for {} layers, input has {batch} rows",
                cache.batch(),
                cache.layers.len()
            )));
        }
        let max_pos = positions.iter().flatten().copied().max().unwrap_or(0);
        if max_pos as usize >= self.config.max_position_embeddings {
            return Err(ModelError::input(format!(
                "sequence reaches position {max_pos}, beyond the model's context of {} tokens",
                self.config.max_position_embeddings
            )));
        }

        let mut x = x;
        let flat_pos: Vec<i64> = positions.iter().flatten().copied().collect();
        let (cos, sin) = self.rope.cos_sin(&flat_pos, batch, seq, self.dtype, &self.device)?;
        let masks = crate::cache::MaskCache::default();
        let inputs = AttentionInputs {
            rope: &self.rope,
            cos: &cos,
            sin: &sin,
            positions,
            sliding_window: self.config.sliding_window,
            masks: &masks,
            num_layers: self.num_layers(),
        };
        for (layer, (block, kv)) in self.blocks.iter().zip(cache.layers.iter_mut()).enumerate() {
            x = block.forward(layer, &x, &inputs, kv, cache.press.as_mut(), self.config.parallel_residual)?;
        }

        for (next, row) in cache.next_position.iter_mut().zip(positions) {
            if let Some(&last) = row.iter().filter(|&&p| p != PAD_POSITION).max() {
                *next = (*next).max(last + 1);
            }
        }
        if let Some(press) = &cache.press {
            cache.next_position = press.next_positions(&cache.layers, &cache.next_position);
        }
        let x = match logits {
            Logits::Last => x.narrow(1, seq - 1, 1)?.contiguous()?,
            Logits::All => x,
        };
        let out = self.lm_head.forward(&self.final_norm.forward(&x)?)?.to_dtype(DType::F32)?;
        Ok(match logits {
            Logits::Last => out.squeeze(1)?,
            Logits::All => out,
        })
    }

    /// Prefill a batch of prompts of any lengths: left-pads them, and returns the last position's
    /// logits (batch, vocab) in f32 with the filled cache. Positions count from 0 at each row's
    /// first real token, as HF `generate` does with an attention mask.
    pub fn prefill(&self, prompts: &[Vec<u32>]) -> Result<(Tensor, KvCache)> {
        self.prefill_with(prompts, None)
    }

    /// [`Model::prefill`] into a cache compressed by (a fresh copy of) `press`.
    pub fn prefill_with(&self, prompts: &[Vec<u32>], press: Option<&dyn CachePress>) -> Result<(Tensor, KvCache)> {
        let (tokens, positions) = left_pad(prompts)?;
        let mut cache = self.new_cache(prompts.len()).with_press(press.map(|p| p.box_clone()));
        let logits = self.forward(&tokens, &positions, &mut cache, Logits::Last)?;
        Ok((logits, cache))
    }

    /// One decode step: the next token of every row → logits (batch, vocab) in f32.
    pub fn decode(&self, cache: &mut KvCache, next_tokens: &[u32]) -> Result<Tensor> {
        if next_tokens.len() != cache.batch() {
            return Err(ModelError::input(format!(
                "decode got {} tokens for a cache of {} rows",
                next_tokens.len(),
                cache.batch()
            )));
        }
        let tokens: Vec<Vec<u32>> = next_tokens.iter().map(|&t| vec![t]).collect();
        let positions: Vec<Vec<i64>> = cache.next_position.iter().map(|&p| vec![p]).collect();
        self.forward(&tokens, &positions, cache, Logits::Last)
    }

    /// Logits at every position of one sequence, starting from an empty cache (perplexity).
    pub fn logits_all(&self, tokens: &[u32]) -> Result<Tensor> {
        let positions: Vec<i64> = (0..tokens.len() as i64).collect();
        let mut cache = self.new_cache(1);
        Ok(self.forward(&[tokens.to_vec()], &[positions], &mut cache, Logits::All)?.squeeze(0)?)
    }
}

/// Left-pad prompts to a (batch, seq) grid; padding slots get token 0 and PAD_POSITION.
pub fn left_pad(prompts: &[Vec<u32>]) -> Result<(Vec<Vec<u32>>, Vec<Vec<i64>>)> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::input("every prompt needs at least one token"));
    }
    let seq = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut tokens = Vec::with_capacity(prompts.len());
    let mut positions = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pad = seq - p.len();
        tokens.push(std::iter::repeat_n(0, pad).chain(p.iter().copied()).collect());
        positions.push(std::iter::repeat_n(PAD_POSITION, pad).chain(0..p.len() as i64).collect());
    }
    Ok((tokens, positions))
}
