//! The decoder: embed → layers (attention, MLP) → final norm → LM head, in explicit prefill and
//! decode phases over a [`KvCache`].

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::attention::{Attention, AttentionInputs, KvSlot, RowRun};
use crate::cache::{KvCache, KvDtype, MaskCache, PAD_POSITION};
use crate::config::{LayerShapes, ModelConfig};
use crate::diff::Role;
use crate::error::{ModelError, Result};
use crate::hooks::{Hooks, Phase, TokenPruner};
use crate::layers::{Linear, LoraLinear, Mlp, Norm};
use crate::parallel::{block, on_every_rank, Comm, Shard};
use crate::rope::Rope;

#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
}

impl Block {
    /// x: (1, tokens, hidden), the tokens of every slot in order. Returns the block's output and,
    /// when a pruner cut after this layer, the kept tokens. On a rank of a sharded model the
    /// attention's and the MLP's outputs are partial sums over the rank's heads and channels,
    /// summed across ranks before they join the residual stream.
    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        inputs: &AttentionInputs,
        slots: &mut [KvSlot],
        pruner: Option<&dyn TokenPruner>,
        parallel_residual: bool,
    ) -> Result<(Tensor, Option<Vec<Vec<usize>>>)> {
        let reduce = |partial: Tensor| match inputs.shard {
            Some(shard) => shard.comm.all_reduce_sum(&partial),
            None => Ok(partial),
        };
        let segments: Vec<usize> =
            inputs.runs.iter().flat_map(|r| slots[r.slots.clone()].iter().map(|s| s.rows.len() * r.seq)).collect();
        let attn = self.attn.forward(layer, &self.attn_norm.forward(x)?, inputs, slots, pruner)?;
        let attn_out = reduce(attn.out)?;
        let out = if parallel_residual {
            // GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            let mlp_out = reduce(self.mlp.forward(&self.mlp_norm.forward(x)?, &segments)?)?;
            ((x + attn_out)? + mlp_out)?
        } else {
            let (h, normed) = self.mlp_norm.forward_residual(&attn_out, x)?;
            (h + reduce(self.mlp.forward(&normed, &segments)?)?)?
        };
        Ok((out, attn.kept))
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
    pub(crate) config: ModelConfig,
    /// (vocab, hidden), in the activation dtype.
    pub(crate) embed_tokens: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) final_norm: Norm,
    pub(crate) lm_head: Linear,
    pub(crate) rope: Rope,
    pub(crate) dtype: DType,
    /// How keys and values are cached.
    pub(crate) kv_dtype: KvDtype,
    pub(crate) device: Device,
    /// Set on a rank of a tensor-parallel model: its blocks hold its heads and channels, its
    /// embedding and head its slice of the vocabulary.
    pub(crate) shard: Option<Shard>,
    /// Set on a model split over the threads of this process ([`Model::split`]): every rank, rank
    /// 0 first (this model's own weights are rank 0's, shared). Each forward call runs them all.
    pub(crate) ranks: Vec<Model>,
}

impl Model {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The activations' dtype (and the dense weights').
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How keys and values are cached (the activations' dtype unless set).
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Cache keys and values as `kv`: f16 halves an f32 cache (llama.cpp's default on the CPU),
    /// q8_0 takes 34 bytes per 32 values. Attention reads them as stored; presses score in f32 as
    /// before. On CUDA the kernels read the cache in the activations' dtype, so no other is
    /// accepted there; q8_0 needs head sizes that are multiples of 32.
    pub fn set_kv_dtype(&mut self, kv: KvDtype) -> Result<()> {
        if let KvDtype::Float(dtype) = kv {
            if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
                return Err(ModelError::input(format!(
                    "a KV cache in {dtype:?} (f32, f16, bf16 or q8_0 are supported)"
                )));
            }
        }
        if self.device.is_cuda() && kv != KvDtype::Float(self.dtype) {
            return Err(ModelError::input(format!(
                "a {} KV cache on CUDA with {:?} activations (the GPU kernels read the cache in the activations' dtype)",
                kv.name(),
                self.dtype
            )));
        }
        if let Some(d) = self.blocks.iter().map(|b| b.attn.head_dim).find(|d| kv == KvDtype::Q8_0 && d % 32 != 0) {
            return Err(ModelError::input(format!(
                "a q8_0 KV cache needs head sizes that are multiples of 32, not {d}"
            )));
        }
        self.kv_dtype = kv;
        Ok(())
    }

    /// What this rank holds of a tensor-parallel model; None for a whole model.
    pub fn shard(&self) -> Option<&Shard> {
        self.shard.as_ref()
    }

    /// This model split over the ranks of `comms` (rank order) as one model that callers use as
    /// they use the whole: each forward call runs every rank at once, one thread each, and
    /// returns rank 0's logits (every rank computes the same bits); its caches hold every rank's
    /// heads ([`KvCache::parts`]), and hooks get a copy of their press per rank, so each rank
    /// compresses its own heads. The ranks stay on this model's device. See
    /// [`Model::split_rank`] for what a rank holds; settings that change the model (KV dtype,
    /// adapters) are made before the split.
    pub fn split(&self, comms: Vec<Arc<dyn Comm>>) -> Result<Model> {
        let device = self.device.clone();
        self.split_on(comms.into_iter().map(|comm| (comm, device.clone())).collect())
    }

    /// [`Model::split`] with rank r's part moved to the rank's device (its GPU): the whole model
    /// can stay in host memory and each GPU receive only its part.
    pub fn split_on(&self, group: Vec<(Arc<dyn Comm>, Device)>) -> Result<Model> {
        let world = group.len();
        let ranks = group
            .into_iter()
            .enumerate()
            .map(|(rank, (comm, device))| {
                if comm.rank() != rank || comm.world_size() != world {
                    return Err(ModelError::input("a split's communicators must come in rank order"));
                }
                self.split_rank_on(comm, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut split = ranks.first().ok_or_else(|| ModelError::input("a split needs at least one rank"))?.clone();
        split.ranks = ranks;
        Ok(split)
    }

    /// The ranks a split model runs on, rank 0 first; the model itself when it runs whole.
    pub fn ranks(&self) -> &[Model] {
        if self.ranks.is_empty() {
            std::slice::from_ref(self)
        } else {
            &self.ranks
        }
    }

    /// Rank `comm.rank()` of this model split over `comm.world_size()` ranks (see
    /// [`crate::parallel`]): whole query and KV heads and a block of MLP channels per layer, a
    /// slice of the vocabulary. A map's bias after the split (o, down) stays on rank 0 alone, so
    /// the ranks' partial sums add up to the whole layer's output once. Dense weights (quantized
    /// ones are dequantized to the activations' dtype). Refuses a split that does not divide
    /// some layer's query or KV heads. The rank stays on this model's device. A rank runs only
    /// beside the group's other ranks, each in its own thread ([`Model::split`] does that).
    pub fn split_rank(&self, comm: Arc<dyn Comm>) -> Result<Model> {
        let device = self.device.clone();
        self.split_rank_on(comm, &device)
    }

    /// [`Model::split_rank`], the rank's part moved to `device`.
    pub fn split_rank_on(&self, comm: Arc<dyn Comm>, device: &Device) -> Result<Model> {
        let (rank, world) = (comm.rank(), comm.world_size());
        if self.shard.is_some() {
            return Err(ModelError::input("the model is already split for tensor parallelism"));
        }
        for (layer, b) in self.blocks.iter().enumerate() {
            let (heads, kv_heads) = (b.attn.num_heads, b.attn.num_kv_heads);
            if heads % world != 0 || kv_heads % world != 0 {
                return Err(ModelError::input(format!(
                    "`tp` {world} does not divide layer {layer}'s {heads} query heads and {kv_heads} KV heads (each rank needs as many whole heads)"
                )));
            }
            if b.mlp.width() < world {
                return Err(ModelError::input(format!(
                    "`tp` {world} is more than layer {layer}'s {} MLP channels",
                    b.mlp.width()
                )));
            }
        }
        let dtype = self.dtype;
        let mut m = self.clone();
        for b in &mut m.blocks {
            let heads: Vec<usize> = block(b.attn.num_heads, world, rank).collect();
            let kv_heads: Vec<usize> = block(b.attn.num_kv_heads, world, rank).collect();
            b.attn.keep_heads(&heads, &kv_heads, dtype)?;
            let channels: Vec<usize> = block(b.mlp.width(), world, rank).collect();
            b.mlp.keep_channels(&channels, dtype)?;
            if rank != 0 {
                b.attn.o.drop_bias();
                b.mlp.down.drop_bias();
            }
        }
        let vocab = block(self.config.vocab_size, world, rank);
        m.embed_tokens = self.embed_tokens.narrow(0, vocab.start, vocab.len())?.contiguous()?;
        m.lm_head = self.lm_head.keep_outputs(&vocab.clone().collect::<Vec<_>>(), dtype)?;
        m.restate_shapes();
        if !device.same_device(&m.device) {
            m.move_to(device)?;
        }
        if m.device.is_cuda() {
            m.fuse_projections()?;
        }
        m.shard = Some(Shard { comm, vocab });
        Ok(m)
    }

    /// Move every weight to `device`: a rank's maps, dense and not stacked yet (see
    /// [`Linear::to_device`]).
    fn move_to(&mut self, device: &Device) -> Result<()> {
        for b in &mut self.blocks {
            b.attn_norm = b.attn_norm.to_device(device)?;
            b.mlp_norm = b.mlp_norm.to_device(device)?;
            let (a, m) = (&mut b.attn, &mut b.mlp);
            for map in
                [&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut m.up, &mut m.down].into_iter().chain(m.gate.as_mut())
            {
                *map = map.to_device(device)?;
            }
        }
        self.embed_tokens = self.embed_tokens.to_device(device)?;
        self.final_norm = self.final_norm.to_device(device)?;
        self.lm_head = self.lm_head.to_device(device)?;
        self.device = device.clone();
        Ok(())
    }

    /// (vocab, hidden), in the activation dtype (a rank's slice of the vocabulary when sharded).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// A layer to edit in place (structured pruning); call [`Model::restate_shapes`] after
    /// changing its heads or channels.
    pub fn block_mut(&mut self, layer: usize) -> &mut Block {
        &mut self.blocks[layer]
    }

    /// Keep only these layers, in this order (layer pruning; a layer may repeat).
    pub fn keep_layers(&mut self, order: &[usize]) -> Result<()> {
        if let Some(&bad) = order.iter().find(|&&l| l >= self.blocks.len()) {
            return Err(ModelError::input(format!(
                "layer {bad} is out of range (the model has {})",
                self.blocks.len()
            )));
        }
        self.blocks = order.iter().map(|&l| self.blocks[l].clone()).collect();
        self.config.num_layers = order.len();
        self.restate_shapes();
        Ok(())
    }

    pub fn final_norm(&self) -> &Norm {
        &self.final_norm
    }

    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Make the config state the layers' shapes: the uniform fields when all layers agree (an HF
    /// checkpoint can express that), per-layer lists otherwise.
    pub fn restate_shapes(&mut self) {
        let heads: Vec<usize> = self.blocks.iter().map(|b| b.attn.num_heads).collect();
        let kv: Vec<usize> = self.blocks.iter().map(|b| b.attn.num_kv_heads).collect();
        let widths: Vec<usize> = self.blocks.iter().map(|b| b.mlp.width()).collect();
        let uniform = |v: &[usize]| v.windows(2).all(|w| w[0] == w[1]);
        let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
        let cfg = &mut self.config;
        cfg.num_heads = max(&heads);
        cfg.num_kv_heads = max(&kv);
        cfg.intermediate_size = max(&widths);
        cfg.layer_shapes = if uniform(&heads) && uniform(&kv) && uniform(&widths) {
            None
        } else {
            Some(LayerShapes { num_heads: heads, num_kv_heads: kv, intermediate_size: widths })
        };
    }

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

    /// Layer `layer`'s map in `role`; None where the architecture has none (no gate in GPT-NeoX's
    /// MLP) or the layer does not exist.
    pub fn linear(&self, layer: usize, role: Role) -> Option<&Linear> {
        let block = self.blocks.get(layer)?;
        match role {
            Role::Q => Some(&block.attn.q),
            Role::K => Some(&block.attn.k),
            Role::V => Some(&block.attn.v),
            Role::O => Some(&block.attn.o),
            Role::Gate => block.mlp.gate.as_ref(),
            Role::Up => Some(&block.mlp.up),
            Role::Down => Some(&block.mlp.down),
        }
    }

    /// Put a LoRA adapter (A (rank, in), B (out, rank), scale alpha/rank) beside layer `layer`'s
    /// map in `role`. A stacked q/k/v or gate/up map holding the plain weight is dropped first,
    /// so the adapted map is the one that runs.
    pub fn attach_lora(&mut self, layer: usize, role: Role, a: &Tensor, b: &Tensor, scale: f64) -> Result<()> {
        let missing = || ModelError::input(format!("the model has no {} projection in layer {layer}", role.name()));
        let block = self.blocks.get_mut(layer).ok_or_else(missing)?;
        let slot = match role {
            Role::Q | Role::K | Role::V | Role::O => {
                block.attn.qkv = None;
                match role {
                    Role::Q => &mut block.attn.q,
                    Role::K => &mut block.attn.k,
                    Role::V => &mut block.attn.v,
                    _ => &mut block.attn.o,
                }
            }
            Role::Gate | Role::Up | Role::Down => {
                block.mlp.gate_up = None;
                match role {
                    Role::Gate => block.mlp.gate.as_mut().ok_or_else(missing)?,
                    Role::Up => &mut block.mlp.up,
                    _ => &mut block.mlp.down,
                }
            }
        };
        *slot = Linear::Lora(Box::new(LoraLinear::new(slot.clone(), a, b, scale)?));
        Ok(())
    }

    /// Fold every attached LoRA adapter into its map's weight (W + scale · B A, dense in the
    /// model's dtype): what peft's `merge_and_unload` does.
    pub fn merge_lora(&mut self) -> Result<()> {
        let dtype = if self.dtype.is_float() { self.dtype } else { DType::F32 };
        for block in &mut self.blocks {
            let a = &mut block.attn;
            let m = &mut block.mlp;
            for slot in
                [&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut m.up, &mut m.down].into_iter().chain(m.gate.as_mut())
            {
                if let Linear::Lora(l) = slot {
                    let bias = l.base.bias().cloned();
                    *slot = Linear::Dense { weight: slot.dense_weight(dtype)?, bias };
                }
            }
        }
        Ok(())
    }

    /// An empty cache for `batch` rows.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        let kv_heads: Vec<usize> = self.blocks.iter().map(|b| b.attn.num_kv_heads).collect();
        let mut cache = KvCache::new(&kv_heads, batch);
        cache.peers = self.ranks.iter().skip(1).map(|rank| rank.new_cache(batch)).collect();
        cache
    }

    /// Token embeddings (batch, seq, hidden) of a (batch × seq) grid of ids.
    pub fn embed(&self, tokens: &[Vec<u32>]) -> Result<Tensor> {
        if !self.ranks.is_empty() {
            let states = self.ranks.iter().map(|_| ()).collect();
            return Ok(self.on_ranks(states, |rank, ()| rank.embed(tokens))?.swap_remove(0));
        }
        let batch = tokens.len();
        let seq = tokens.first().map_or(0, Vec::len);
        if batch == 0 || seq == 0 {
            return Err(ModelError::input("empty input: no tokens to run"));
        }
        if tokens.iter().any(|t| t.len() != seq) {
            return Err(ModelError::input("tokens must form a (batch, seq) grid"));
        }
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::input(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        let flat_ids: Vec<u32> = tokens.iter().flatten().copied().collect();
        let shape = (batch, seq, self.config.hidden_size);
        let Some(shard) = &self.shard else {
            let ids = Tensor::from_vec(flat_ids, batch * seq, &self.device)?;
            return Ok(self.embed_tokens.index_select(&ids, 0)?.reshape(shape)?);
        };
        // Each rank embeds the ids in its slice and zeros elsewhere; the sum is every embedding.
        let held = |id: u32| shard.vocab.contains(&(id as usize));
        let local: Vec<u32> =
            flat_ids.iter().map(|&id| if held(id) { id - shard.vocab.start as u32 } else { 0 }).collect();
        let mask: Vec<f32> = flat_ids.iter().map(|&id| if held(id) { 1.0 } else { 0.0 }).collect();
        let ids = Tensor::from_vec(local, batch * seq, &self.device)?;
        let mask = Tensor::from_vec(mask, (batch * seq, 1), &self.device)?.to_dtype(self.dtype)?;
        let partial = self.embed_tokens.index_select(&ids, 0)?.broadcast_mul(&mask)?;
        Ok(shard.comm.all_reduce_sum(&partial)?.reshape(shape)?)
    }

    /// The LM head over x (1, rows, hidden), rows in segments (see [`Linear::forward_segments`]):
    /// (1, rows, vocab) in f32; a rank's slices of the vocabulary are gathered.
    fn head(&self, x: &Tensor, segments: &[usize]) -> Result<Tensor> {
        let logits = self.lm_head.forward_segments(&self.final_norm.forward(x)?, segments)?.to_dtype(DType::F32)?;
        match &self.shard {
            Some(shard) => shard.comm.all_gather(&logits, 2),
            None => Ok(logits),
        }
    }

    /// Prefill prompts into a fresh cache: the last position's logits (batch, vocab) in f32 and
    /// the filled cache. Token prompts of any lengths are left-padded, with positions counted
    /// from 0 at each row's first real token, as HF `generate` does with an attention mask.
    pub fn prefill(&self, input: PrefillInput, hooks: &mut Hooks) -> Result<(Tensor, KvCache)> {
        if !self.ranks.is_empty() {
            return self.prefill_split(input, hooks);
        }
        let (x, positions, prompts) = match input {
            PrefillInput::Tokens(prompts) => {
                let (tokens, positions) = left_pad(prompts)?;
                (self.embed(&tokens)?, positions, Some(prompts))
            }
            PrefillInput::Embeds { x, positions } => (x, positions, None),
        };
        let mut cache = self.new_cache(positions.len());
        let logits = self.forward(x, &positions, &mut cache, hooks, Phase::Prefill, Logits::Last)?;
        if let Some(press) = hooks.press.as_deref_mut() {
            press.after_prefill(self, &mut cache, prompts)?;
            cache.next_position = press.next_positions(&cache.layers, &cache.next_position);
        }
        Ok((logits, cache))
    }

    /// One decode step for many sequences at once, each over its own cache with its own hooks:
    /// `next_tokens` holds one token per cache row, caches in order. Returns logits (rows, vocab)
    /// in f32 (see [`Model::step`]).
    pub fn decode(&self, seqs: &mut [(&mut KvCache, &mut Hooks)], next_tokens: &[u32]) -> Result<Tensor> {
        let rows: usize = seqs.iter().map(|(c, _)| c.batch()).sum();
        if next_tokens.len() != rows {
            return Err(ModelError::input(format!(
                "decode got {} tokens for caches of {rows} rows",
                next_tokens.len()
            )));
        }
        let mut next = next_tokens.iter();
        let tokens: Vec<Vec<Vec<u32>>> =
            seqs.iter().map(|(c, _)| next.by_ref().take(c.batch()).map(|&t| vec![t]).collect()).collect();
        self.step(seqs, &tokens)
    }

    /// One forward over many sequences, each over its own cache with its own hooks, each running
    /// its own tokens at the positions after what its cache holds: `tokens[i][row]` are the
    /// tokens row `row` of cache i runs (as many for every row of a cache; one in a decode step,
    /// a prompt or a chunk of it in a prefill). The projections, the MLP and the LM head run once
    /// over all tokens, each sequence's rows on the product path they would take alone, so a
    /// sequence's result does not depend on what runs beside it; attention runs per cache, causal
    /// within its own tokens. Returns the logits (cache rows, vocab) of every row's last token,
    /// in f32. A pruner, which cuts tokens out of the forward, needs a cache of its own.
    pub fn step(&self, seqs: &mut [(&mut KvCache, &mut Hooks)], tokens: &[Vec<Vec<u32>>]) -> Result<Tensor> {
        self.step_logits(seqs, tokens, Logits::Last)
    }

    /// [`Model::step`] with the logits of every token: (tokens, vocab) in f32, cache by cache,
    /// each cache's rows in order and each row's tokens in order (log-likelihoods of several
    /// contexts' continuations in one forward).
    pub fn step_all(&self, seqs: &mut [(&mut KvCache, &mut Hooks)], tokens: &[Vec<Vec<u32>>]) -> Result<Tensor> {
        self.step_logits(seqs, tokens, Logits::All)
    }

    fn step_logits(
        &self,
        seqs: &mut [(&mut KvCache, &mut Hooks)],
        tokens: &[Vec<Vec<u32>>],
        logits: Logits,
    ) -> Result<Tensor> {
        if !self.ranks.is_empty() {
            return self.on_ranks_caches(seqs, |rank, seqs| rank.step_logits(seqs, tokens, logits));
        }
        if tokens.len() != seqs.len() || seqs.iter().zip(tokens).any(|((c, _), t)| t.len() != c.batch()) {
            return Err(ModelError::input("a step needs one token list per cache row"));
        }
        if seqs.len() > 1 && seqs.iter().any(|(_, h)| h.pruner.is_some()) {
            return Err(ModelError::input("token pruning runs on one cache at a time"));
        }
        let mut flat = Vec::new();
        let mut positions = Vec::new();
        let mut shapes = Vec::with_capacity(seqs.len());
        for ((cache, _), rows) in seqs.iter().zip(tokens) {
            let seq = rows.first().map_or(0, Vec::len);
            if rows.iter().any(|r| r.len() != seq) {
                return Err(ModelError::input("every row of a cache runs as many tokens"));
            }
            for (row, &next) in rows.iter().zip(&cache.next_position) {
                flat.extend_from_slice(row);
                positions.push((next..next + seq as i64).collect());
            }
            // A cache that holds nothing yet is being prefilled.
            let phase = if cache.next_position.iter().all(|&p| p == 0) { Phase::Prefill } else { Phase::Extend };
            shapes.push((seq, phase));
        }
        let x = self.embed(&[flat])?;
        let out = self.run(x, &positions, seqs, &shapes, logits)?;
        match logits {
            Logits::Last => Ok(out),
            Logits::All => Ok(out.flatten_to(D::Minus2)?),
        }
    }

    /// Run input embeddings x (batch, seq, hidden) at `positions` through the decoder, extending
    /// the cache, and return the chosen positions' logits in f32. In a prefill the pruner may
    /// cut: the following layers run on the kept tokens only (rows that keep fewer are
    /// left-padded), and `Logits::All` gives the logits of the tokens that reached the end.
    pub fn forward(
        &self,
        x: Tensor,
        positions: &[Vec<i64>],
        cache: &mut KvCache,
        hooks: &mut Hooks,
        phase: Phase,
        logits: Logits,
    ) -> Result<Tensor> {
        if !self.ranks.is_empty() {
            return self.on_ranks_caches(&mut [(cache, hooks)], |rank, seqs| {
                let [(cache, hooks)] = seqs else { unreachable!("one cache per rank") };
                rank.forward(x.to_device(rank.device())?, positions, cache, hooks, phase, logits)
            });
        }
        let (batch, seq, hidden) = x.dims3()?;
        let x = x.reshape((1, batch * seq, hidden))?;
        self.run(x, positions, &mut [(cache, hooks)], &[(seq, phase)], logits)
    }

    /// embed → blocks → norm → head over the tokens x (1, tokens, hidden) of one or more caches:
    /// cache i's rows run `shapes[i].0` tokens each (in `positions`, one list per cache row), in
    /// phase `shapes[i].1`. `Logits::All`: (batch, seq, vocab) for one cache, (1, tokens, vocab) for several.
    fn run(
        &self,
        x: Tensor,
        positions: &[Vec<i64>],
        seqs: &mut [(&mut KvCache, &mut Hooks)],
        shapes: &[(usize, Phase)],
        logits: Logits,
    ) -> Result<Tensor> {
        self.check_input(&x, positions, seqs, shapes)?;
        let pruner = match (&*seqs, shapes) {
            ([(_, hooks)], [(_, Phase::Prefill)]) => hooks.pruner.clone(),
            _ => None,
        };
        let masks: Vec<MaskCache> = seqs.iter().map(|_| MaskCache::default()).collect();
        let batches: Vec<usize> = seqs.iter().map(|(c, _)| c.batch()).collect();
        let mut seq_lens: Vec<usize> = shapes.iter().map(|&(s, _)| s).collect();
        let mut x = x;
        let mut current: Vec<Vec<i64>> = positions.to_vec();
        let mut runs = self.row_runs(&batches, &seq_lens, &current)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let inputs = AttentionInputs {
                rope: &self.rope,
                positions: &current,
                runs: &runs,
                sliding_window: self.config.sliding_window,
                num_layers: self.num_layers(),
                kv_dtype: self.kv_dtype,
                shard: self.shard.as_ref(),
            };
            let mut start = 0;
            let mut slots: Vec<KvSlot> = seqs
                .iter_mut()
                .zip(&masks)
                .zip(shapes)
                .map(|(((cache, hooks), masks), &(_, phase))| {
                    let rows = start..start + cache.batch();
                    start = rows.end;
                    KvSlot { rows, kv: &mut cache.layers[layer], press: hooks.press.as_deref_mut(), masks, phase }
                })
                .collect();
            let kept;
            (x, kept) =
                block.forward(layer, &x, &inputs, &mut slots, pruner.as_deref(), self.config.parallel_residual)?;
            if let Some(keep) = kept {
                // One cache (pruning runs alone): its (batch, seq) grid loses tokens.
                let (batch, hidden) = (batches[0], x.dim(2)?);
                let grid = x.reshape((batch, seq_lens[0], hidden))?;
                let (kept_x, kept_positions) = keep_tokens(&grid, &current, &keep)?;
                seq_lens[0] = kept_x.dim(1)?;
                x = kept_x.reshape((1, batch * seq_lens[0], hidden))?;
                current = kept_positions;
                runs = self.row_runs(&batches, &seq_lens, &current)?;
                // Later layers see other positions: their masks are built afresh.
                masks[0].clear();
            }
        }

        let mut start = 0;
        for (cache, hooks) in seqs.iter_mut() {
            let rows = &positions[start..start + cache.batch()];
            start += cache.batch();
            for (next, row) in cache.next_position.iter_mut().zip(rows) {
                if let Some(&last) = row.iter().filter(|&&p| p != PAD_POSITION).max() {
                    *next = (*next).max(last + 1);
                }
            }
            if let Some(press) = &hooks.press {
                cache.next_position = press.next_positions(&cache.layers, &cache.next_position);
            }
        }
        match logits {
            Logits::Last => {
                // Each row's last token; the head runs each cache's rows as it would alone.
                let x = if seq_lens.iter().all(|&s| s == 1) {
                    x
                } else {
                    let mut last = Vec::with_capacity(positions.len());
                    let mut offset = 0;
                    for (&batch, &seq) in batches.iter().zip(&seq_lens) {
                        last.extend((0..batch).map(|r| (offset + r * seq + seq - 1) as u32));
                        offset += batch * seq;
                    }
                    let last = Tensor::from_vec(last, positions.len(), &self.device)?;
                    x.index_select(&last, 1)?
                };
                Ok(self.head(&x, &batches)?.squeeze(0)?)
            }
            Logits::All if seqs.len() == 1 => {
                Ok(self.head(&x, &[x.dim(1)?])?.reshape((batches[0], seq_lens[0], ()))?)
            }
            // Several caches: (1, tokens, vocab), each cache's tokens on the head's path alone.
            Logits::All => {
                let segments: Vec<usize> = batches.iter().zip(&seq_lens).map(|(b, s)| b * s).collect();
                self.head(&x, &segments)
            }
        }
    }

    /// Run `work` on every rank of a split model at once, rank r with `states[r]`: the ranks'
    /// results in rank order (see [`on_every_rank`]).
    fn on_ranks<S: Send, T: Send>(
        &self,
        states: Vec<S>,
        work: impl Fn(&Model, S) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        on_every_rank(&self.ranks, states, |rank| &rank.shard.as_ref().expect("a rank of a split model").comm, work)
    }

    /// [`Model::prefill`] on every rank: rank 0's logits, and a cache of every rank's part.
    fn prefill_split(&self, input: PrefillInput, hooks: &mut Hooks) -> Result<(Tensor, KvCache)> {
        let mut peers = hooks.take_peers(self.ranks.len() - 1);
        let inputs = self.ranks.iter().map(|rank| input.to_device(rank.device())).collect::<Result<Vec<_>>>()?;
        let states = inputs.into_iter().zip(std::iter::once(&mut *hooks).chain(&mut peers)).collect();
        let out = self.on_ranks(states, |rank, (input, hooks)| rank.prefill(input, hooks));
        hooks.peers = peers;
        let mut parts = out?.into_iter();
        let (logits, mut cache) = parts.next().expect("rank 0");
        cache.peers = parts.map(|(_, part)| part).collect();
        Ok((logits, cache))
    }

    /// `work` over caches on every rank, each rank with its parts of the caches and its copy of
    /// the hooks: rank 0's logits.
    fn on_ranks_caches(
        &self,
        seqs: &mut [(&mut KvCache, &mut Hooks)],
        work: impl Fn(&Model, &mut [(&mut KvCache, &mut Hooks)]) -> Result<Tensor> + Sync,
    ) -> Result<Tensor> {
        for (cache, _) in seqs.iter() {
            cache.check_parts(self.ranks.len())?;
        }
        let peers = self.ranks.len() - 1;
        let mut taken: Vec<(Vec<KvCache>, Vec<Hooks>)> =
            seqs.iter_mut().map(|(c, h)| (std::mem::take(&mut c.peers), h.take_peers(peers))).collect();
        let mut states: Vec<Vec<(&mut KvCache, &mut Hooks)>> = self.ranks.iter().map(|_| Vec::new()).collect();
        for (cache, hooks) in seqs.iter_mut() {
            states[0].push((&mut **cache, &mut **hooks));
        }
        for (caches, hooks) in &mut taken {
            for (rank, part) in caches.iter_mut().zip(hooks.iter_mut()).enumerate() {
                states[rank + 1].push(part);
            }
        }
        let out = self.on_ranks(states, |rank, mut seqs| work(rank, &mut seqs));
        for ((cache, hooks), (cache_peers, hook_peers)) in seqs.iter_mut().zip(taken) {
            cache.peers = cache_peers;
            hooks.peers = hook_peers;
        }
        Ok(out?.swap_remove(0))
    }

    /// Group consecutive caches whose rows run equally many tokens (see [`RowRun`]).
    fn row_runs(&self, batches: &[usize], seq_lens: &[usize], positions: &[Vec<i64>]) -> Result<Vec<RowRun>> {
        // (slots, rows, seq, offset) of each run, then its rotation.
        let mut runs: Vec<(Range<usize>, Range<usize>, usize, usize)> = Vec::new();
        let (mut row, mut offset) = (0, 0);
        for (slot, (&batch, &seq)) in batches.iter().zip(seq_lens).enumerate() {
            match runs.last_mut() {
                Some((slots, rows, run_seq, _)) if *run_seq == seq => {
                    slots.end = slot + 1;
                    rows.end = row + batch;
                }
                _ => runs.push((slot..slot + 1, row..row + batch, seq, offset)),
            }
            row += batch;
            offset += batch * seq;
        }
        runs.into_iter()
            .map(|(slots, rows, seq, offset)| {
                let (cos, sin) = self.rope_for(&positions[rows.clone()])?;
                Ok(RowRun { slots, rows, seq, offset, cos, sin })
            })
            .collect()
    }

    fn check_input(
        &self,
        x: &Tensor,
        positions: &[Vec<i64>],
        seqs: &[(&mut KvCache, &mut Hooks)],
        shapes: &[(usize, Phase)],
    ) -> Result<()> {
        let (_, tokens, _) = x.dims3()?;
        if tokens == 0 || shapes.iter().any(|&(s, _)| s == 0) {
            return Err(ModelError::input("empty input: no tokens to run"));
        }
        let rows: usize = seqs.iter().map(|(c, _)| c.batch()).sum();
        if shapes.len() != seqs.len() || seqs.iter().any(|(c, _)| c.layers.len() != self.num_layers()) {
            return Err(ModelError::input(format!(
                "{} caches for {} layers, input for {} caches",
                seqs.len(),
                self.num_layers(),
                shapes.len()
            )));
        }
        let row_seqs = seqs.iter().zip(shapes).flat_map(|((c, _), &(s, _))| std::iter::repeat_n(s, c.batch()));
        if positions.len() != rows || positions.iter().zip(row_seqs).any(|(p, s)| p.len() != s) {
            return Err(ModelError::input("positions must give every cache row's tokens"));
        }
        if positions.iter().map(Vec::len).sum::<usize>() != tokens {
            return Err(ModelError::input(format!("caches hold {rows} rows; the input's tokens do not match them")));
        }
        let max_pos = positions.iter().flatten().copied().max().unwrap_or(0);
        if max_pos as usize >= self.config.max_position_embeddings {
            return Err(ModelError::input(format!(
                "sequence reaches position {max_pos}, beyond the model's context of {} tokens",
                self.config.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// cos and sin for a (batch × seq) grid of positions.
    fn rope_for(&self, positions: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        let (batch, seq) = (positions.len(), positions.first().map_or(0, Vec::len));
        let flat: Vec<i64> = positions.iter().flatten().copied().collect();
        self.rope.cos_sin(&flat, batch, seq, self.dtype, &self.device)
    }
}

/// What a prefill runs: token prompts, or input embeddings (batch, seq, hidden) at positions.
pub enum PrefillInput<'a> {
    Tokens(&'a [Vec<u32>]),
    Embeds { x: Tensor, positions: Vec<Vec<i64>> },
}

impl PrefillInput<'_> {
    /// The same input with its embeddings on `device` (a rank's).
    fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            PrefillInput::Tokens(prompts) => PrefillInput::Tokens(prompts),
            PrefillInput::Embeds { x, positions } => {
                PrefillInput::Embeds { x: x.to_device(device)?, positions: positions.clone() }
            }
        })
    }
}

/// Token ids and their positions, (batch × seq) each.
pub type TokenGrid = (Vec<Vec<u32>>, Vec<Vec<i64>>);

/// Left-pad prompts to a (batch, seq) grid; padding slots get token 0 and PAD_POSITION.
pub fn left_pad(prompts: &[Vec<u32>]) -> Result<TokenGrid> {
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
