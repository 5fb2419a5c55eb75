"""Count HF forward FLOPs with torch's FlopCounterMode: the independent reference for `pare flops`
(tests/fixtures/flops/flops.json).

    tools/reference/.venv/bin/python tools/reference/make_flops_fixtures.py

FlopCounterMode counts every matmul HF runs (2·m·n·k per mm/bmm/addmm, convolutions likewise),
with eager attention, so causal attention is counted over the full square as it is computed.
Each model records, per case: the prefill FLOPs of `seq` tokens with logits of the last position
only (what generate does), and the FLOPs of one decode step over a cache of `seq` entries; plus
`num_parameters()` for the 2·params·tokens cross-check. Models: the committed tiny checkpoints
(GQA, q/k/v biases, GELU MLP with fused QKV, sliding window), SmolLM2-135M's shapes with random
weights (tied embeddings, 9/3 heads), a llama-tiny whose second layer is structurally pruned
(fewer heads and a narrower MLP), and llava-tiny with its vision tower and projector per module.
"""

import datetime
import json
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "flops"
SEQS = [1, 17, 120]


def count(fn):
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        out = fn()
    return fc, out


def text_cases(model, vocab):
    cases = []
    for seq in SEQS:
        ids = torch.randint(3, vocab, (1, seq), generator=torch.Generator().manual_seed(seq))
        fc, out = count(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=True))
        step, _ = count(lambda: model(input_ids=ids[:, :1], past_key_values=out.past_key_values, logits_to_keep=1, use_cache=True))
        cases.append(dict(seq=seq, prefill_flops=fc.get_total_flops(), decode_cache_len=seq, decode_flops=step.get_total_flops()))
    return cases


def params(model):
    return dict(num_parameters=model.num_parameters(), num_parameters_exclude_embeddings=model.num_parameters(exclude_embeddings=True))


def fixture_model(name):
    d = FIXTURES / name / "model"
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    return dict(name=name, config=json.loads((d / "config.json").read_text()), **params(model),
                cases=text_cases(model, model.config.vocab_size))


def smollm2_shapes():
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return dict(name="smollm2-135m-shapes", config=cfg.to_dict(), **params(model), cases=text_cases(model, 49152))


def pruned_llama():
    """llama-tiny with layer 1 cut to 2 of 4 query heads, 1 of 2 KV heads and an MLP of 40."""
    d = FIXTURES / "llama-tiny" / "model"
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    layer = model.model.layers[1]
    hd = model.config.head_dim
    with torch.no_grad():
        a = layer.self_attn
        a.q_proj = torch.nn.Linear(64, 2 * hd, bias=False)
        a.k_proj = torch.nn.Linear(64, hd, bias=False)
        a.v_proj = torch.nn.Linear(64, hd, bias=False)
        a.o_proj = torch.nn.Linear(2 * hd, 64, bias=False)
        m = layer.mlp
        m.gate_proj, m.up_proj, m.down_proj = torch.nn.Linear(64, 40, bias=False), torch.nn.Linear(64, 40, bias=False), torch.nn.Linear(40, 64, bias=False)
    config = json.loads((d / "config.json").read_text())
    # pare's per-layer keys for structurally pruned checkpoints (transformers ignores them).
    config.update(num_attention_heads_per_layer=[4, 2], num_key_value_heads_per_layer=[2, 1], intermediate_size_per_layer=[96, 40])
    return dict(name="llama-tiny-pruned", config=config, **params(model), cases=text_cases(model, 256))


def llava():
    d = FIXTURES / "llava-tiny" / "model"
    model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = [1, 36, 224] + [cfg.image_token_index] * 16 + [224, 82, 73, 90]
    ids = torch.tensor([text])
    fc, _ = count(lambda: model(input_ids=ids, pixel_values=pixels, logits_to_keep=1))
    per_module = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    base = "LlavaForConditionalGeneration.model."
    tower = base + "vision_tower."
    layers = cfg.vision_config.num_hidden_layers
    return dict(
        name="llava-tiny",
        seq=len(text),
        image_tokens=16,
        total_flops=fc.get_total_flops(),
        vision_embeddings_flops=per_module.get(tower + "embeddings", 0),
        vision_layer_flops=[per_module.get(f"{tower}encoder.layers.{i}", 0) for i in range(layers)],
        projector_flops=per_module[base + "multi_modal_projector"],
        language_flops=per_module[base + "language_model"],
        lm_head_flops=per_module["LlavaForConditionalGeneration.lm_head"],
    )


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    models = [fixture_model(n) for n in ["llama-tiny", "qwen2-tiny", "mistral-tiny", "gptneox-tiny"]]
    models += [smollm2_shapes(), pruned_llama()]
    data = dict(
        meta=dict(
            command="tools/reference/.venv/bin/python tools/reference/make_flops_fixtures.py",
            date=datetime.date.today().isoformat(),
            versions=dict(transformers=transformers.__version__, torch=torch.__version__),
            counter="torch.utils.flop_counter.FlopCounterMode, eager attention, float32, logits_to_keep=1",
        ),
        models=models,
        llava=llava(),
    )
    (OUT / "flops.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {(OUT / 'flops.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
