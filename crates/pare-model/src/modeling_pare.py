"""transformers classes for checkpoints whose layers differ in shape, written by `pare prune`.

Structured pruning leaves layers with different head counts and MLP widths (config.json lists
them per layer), which transformers' own Llama, Mistral, Qwen2 and GPT-NeoX classes cannot
hold. These classes build transformers' own model and then resize each layer's projections to
the listed shapes, so the forward pass stays transformers' code. Load with

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
"""

from torch import nn
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


def _layer_shape(config, i):
    """(query heads, KV heads, MLP width) of layer i."""

    def pick(key, uniform):
        values = getattr(config, key, None)
        return uniform if values is None else values[i]

    heads = pick("num_attention_heads_per_layer", config.num_attention_heads)
    kv_heads = pick("num_key_value_heads_per_layer", getattr(config, "num_key_value_heads", None) or heads)
    width = pick("intermediate_size_per_layer", config.intermediate_size)
    return heads, kv_heads, width


def _head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _linear(like, in_features, out_features):
    """A linear layer of a new shape, with `like`'s bias presence, dtype and device."""
    return nn.Linear(
        in_features, out_features, bias=like.bias is not None, dtype=like.weight.dtype, device=like.weight.device
    )


def _resize_llama_layers(model, config):
    """Llama, Mistral and Qwen2 layers: q/k/v/o and the gated MLP, per layer."""
    hidden, d = config.hidden_size, _head_dim(config)
    for i, layer in enumerate(model.model.layers):
        heads, kv_heads, width = _layer_shape(config, i)
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _linear(attn.q_proj, hidden, heads * d)
        attn.k_proj = _linear(attn.k_proj, hidden, kv_heads * d)
        attn.v_proj = _linear(attn.v_proj, hidden, kv_heads * d)
        attn.o_proj = _linear(attn.o_proj, heads * d, hidden)
        attn.num_key_value_groups = heads // kv_heads
        mlp.gate_proj = _linear(mlp.gate_proj, hidden, width)
        mlp.up_proj = _linear(mlp.up_proj, hidden, width)
        mlp.down_proj = _linear(mlp.down_proj, width, hidden)
        mlp.intermediate_size = width


def _resize_gpt_neox_layers(model, config):
    """GPT-NeoX layers: the fused per-head [q k v] projection, the output and the MLP."""
    hidden, d = config.hidden_size, _head_dim(config)
    for i, layer in enumerate(model.gpt_neox.layers):
        heads, _, width = _layer_shape(config, i)
        attn, mlp = layer.attention, layer.mlp
        attn.query_key_value = _linear(attn.query_key_value, hidden, 3 * heads * d)
        attn.dense = _linear(attn.dense, heads * d, hidden)
        attn.head_size = d
        attn.rotary_ndims = int(d * config.rope_parameters.get("partial_rotary_factor", 1.0))
        attn.scaling = d**-0.5
        mlp.dense_h_to_4h = _linear(mlp.dense_h_to_4h, hidden, width)
        mlp.dense_4h_to_h = _linear(mlp.dense_4h_to_h, width, hidden)


class _PerLayerShapes:
    """Head counts need not divide hidden_size once head_dim is stated: skip that check."""

    def validate_architecture(self):
        pass


class PareLlamaConfig(_PerLayerShapes, LlamaConfig):
    model_type = "pare_llama"


class PareLlamaForCausalLM(LlamaForCausalLM):
    config_class = PareLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_llama_layers(self, config)
        self.post_init()


class PareMistralConfig(_PerLayerShapes, MistralConfig):
    model_type = "pare_mistral"


class PareMistralForCausalLM(MistralForCausalLM):
    config_class = PareMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_llama_layers(self, config)
        self.post_init()


class PareQwen2Config(_PerLayerShapes, Qwen2Config):
    model_type = "pare_qwen2"


class PareQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = PareQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _resize_llama_layers(self, config)
        self.post_init()


class PareGPTNeoXConfig(_PerLayerShapes, GPTNeoXConfig):
    model_type = "pare_gpt_neox"


class PareGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    config_class = PareGPTNeoXConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_gpt_neox_layers(self, config)
        self.post_init()
