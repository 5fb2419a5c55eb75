//! The decoder: embed → layers (attention, MLP) → final norm → LM head, in explicit prefill and
//! decode phases over a [`KvCache`].

use candle_core::{DType, Device, Tensor};

use crate::attention::{Attention, AttentionInputs};
use crate::cache::{KvCache, PAD_POSITION};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::{Linear, Mlp, Norm};
use crate::press::{CachePress, TokenPruner};
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
            let (h, normed) = self.mlp_norm.forward_residual(&attn_out, x)?;
            let mlp_out = self.mlp.forward(&normed)?;
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

    /// Stack each layer's q, k, v and its gate and up projections into single maps (the loader does
    /// this on CUDA). The separate maps stay readable as views of the stacked weights.
    pub fn fuse_projections(&mut self) -> Result<()> {
        for block in &mut self.blocks {
            block.attn.fuse_qkv()?;
            block.mlp.fuse_gate_up()?;
        }
        Ok(())
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
    pub fn forward(
        &self,
        tokens: &[Vec<u32>],
        positions: &[Vec<i64>],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let x = self.embed(tokens)?;
        self.forward_embeds(x, positions, cache, logits)
    }

    /// Run input embeddings x (batch, seq, hidden) at `positions` through the decoder layers,
    /// extending the cache. Multimodal models enter here with image features in place.
    pub fn forward_embeds(
        &self,
        x: Tensor,
        positions: &[Vec<i64>],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        self.forward_embeds_pruned(x, positions, cache, logits, None)
    }

    /// [`Model::forward_embeds`] with prefill token pruning: after a layer where `pruner` cuts,
    /// the following layers run on the kept tokens only (rows that keep fewer are left-padded).
    /// With `Logits::All` the logits are those of the tokens that reached the last layer.
    pub fn forward_embeds_pruned(
        &self,
        x: Tensor,
        positions: &[Vec<i64>],
        cache: &mut KvCache,
        logits: Logits,
        pruner: Option<&dyn TokenPruner>,
    ) -> Result<Tensor> {
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
        let mut current: Vec<Vec<i64>> = positions.to_vec();
        let masks_slot = std::cell::RefCell::new(crate::cache::MaskCache::default());
        let pruned = std::cell::RefCell::new(None);
        let (mut cos, mut sin) = self.rope_for(&current)?;
        for (layer, (block, kv)) in self.blocks.iter().zip(cache.layers.iter_mut()).enumerate() {
            let masks = masks_slot.borrow();
            let inputs = AttentionInputs {
                rope: &self.rope,
                cos: &cos,
                sin: &sin,
                positions: &current,
                sliding_window: self.config.sliding_window,
                masks: &masks,
                num_layers: self.num_layers(),
                pruner,
                pruned: &pruned,
            };
            x = block.forward(layer, &x, &inputs, kv, cache.press.as_mut(), self.config.parallel_residual)?;
            drop(masks);
            if let Some(keep) = pruned.borrow_mut().take() {
                (x, current) = keep_tokens(&x, &current, &keep)?;
                (cos, sin) = self.rope_for(&current)?;
                // Later layers see other positions: their masks are built afresh.
                *masks_slot.borrow_mut() = crate::cache::MaskCache::default();
            }
        }
        let seq = x.dim(1)?;

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

    /// cos and sin for a (batch × seq) grid of positions.
    fn rope_for(&self, positions: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        let (batch, seq) = (positions.len(), positions.first().map_or(0, Vec::len));
        let flat: Vec<i64> = positions.iter().flatten().copied().collect();
        self.rope.cos_sin(&flat, batch, seq, self.dtype, &self.device)
    }

    /// [`Model::prefill_with`] plus prefill token pruning.
    pub fn prefill_pruned(
        &self,
        prompts: &[Vec<u32>],
        press: Option<&dyn CachePress>,
        pruner: Option<&dyn TokenPruner>,
    ) -> Result<(Tensor, KvCache)> {
        let (tokens, positions) = left_pad(prompts)?;
        let mut cache = self.new_cache(prompts.len()).with_press(press.map(|p| p.box_clone()));
        let x = self.embed(&tokens)?;
        let logits = self.forward_embeds_pruned(x, &positions, &mut cache, Logits::Last, pruner)?;
        Ok((logits, cache))
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

/// Keep, per row, the tokens at `keep[row]` of x (batch, seq, hidden) and their positions. Rows
/// that keep fewer tokens are left-padded (zero states at PAD_POSITION, masked everywhere).
fn keep_tokens(x: &Tensor, positions: &[Vec<i64>], keep: &[Vec<usize>]) -> Result<(Tensor, Vec<Vec<i64>>)> {
    let (batch, seq, hidden) = x.dims3()?;
    if keep.len() != batch
        || keep.iter().any(|k| k.is_empty() || k.iter().any(|&i| i >= seq) || k.windows(2).any(|w| w[0] >= w[1]))
    {
        return Err(ModelError::input(
            "token pruning: kept indices must be ascending, in range, and at least one per row",
        ));
    }
    let width = keep.iter().map(Vec::len).max().unwrap_or(0);
    let mut rows = Vec::with_capacity(batch);
    let mut new_positions = Vec::with_capacity(batch);
    for (b, idx) in keep.iter().enumerate() {
        let ids = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), x.device())?;
        let kept = x.get(b)?.index_select(&ids, 0)?;
        let pad = width - idx.len();
        rows.push(if pad > 0 {
            Tensor::cat(&[&Tensor::zeros((pad, hidden), x.dtype(), x.device())?, &kept], 0)?
        } else {
            kept
        });
        new_positions
            .push(std::iter::repeat_n(PAD_POSITION, pad).chain(idx.iter().map(|&i| positions[b][i])).collect());
    }
    Ok((Tensor::stack(&rows, 0)?, new_positions))
}
