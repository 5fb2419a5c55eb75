"""FastV-style prefill token pruning, written out over HF transformers' SmolLM2 layers: the
reference for pare's token pruner (tests/fixtures/token-prune/).

    tools/reference/.venv/bin/python tools/reference/make_token_prune_fixtures.py

The rule (pare's `--prune-tokens L:KEEP --prune-span prompt --protect-last P --prune-score
last-attn`): layers 0..L-1 run on every token; the attention of the last token at layer L-1,
averaged over all heads, scores the span (every prompt token but the last P and the last one);
the top KEEP span tokens (ties: earlier first) and every token outside the span go on to layers
L.. at their original positions. Several stages repeat this on the survivors. Float32, eager
attention written out here (no kernels), the causal mask decided by original positions.
"""

import datetime
import json
import math
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "token-prune"
GGUF = ROOT / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CASES = [
    dict(name="fastv_k3_half", n=100, stages=[(3, 0.5)], protect_last=8),
    dict(name="pyramid_two_stages", n=120, stages=[(4, 0.5), (12, 20)], protect_last=6),
]


def keep_count(keep, n):
    if isinstance(keep, float):
        return min(max(math.floor(n * keep + 0.5), 1), max(n, 1))
    return min(max(keep, 1), max(n, 1))


def causal_mask(pos):
    # pos (L,): entry j visible to query i when pos[j] <= pos[i].
    allowed = pos[None, :] <= pos[:, None]
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask[~allowed] = float("-inf")
    return mask[None, None]


def last_token_attention(layer, h, cos, sin, cfg):
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, L, _ = x.shape
    d = cfg.hidden_size // cfg.num_attention_heads
    q = attn.q_proj(x).view(b, L, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, L, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, cfg.num_attention_heads // cfg.num_key_value_heads)
    w = torch.softmax((q[:, :, -1:] @ k.transpose(2, 3)) / math.sqrt(d), dim=-1)  # (1, H, 1, L)
    return w.mean(dim=1)[0, 0]  # (L,)


def run_layer(layer, h, pos, rotary):
    cos, sin = rotary(h, pos[None])
    out = layer(h, attention_mask=causal_mask(pos), position_ids=pos[None], position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def case(model, ids, stages, protect_last):
    m, cfg = model.model, model.config
    pos = torch.arange(len(ids))
    h = m.embed_tokens(torch.tensor([ids]))
    cut_at = {layer: keep for layer, keep in stages}
    kept_after = {}
    for l, layer in enumerate(m.layers):
        if l in cut_at:
            prev = m.layers[l - 1]
            # Scores come from layer l-1, which has already run: recompute its attention input.
            cos, sin = m.rotary_emb(h_prev, pos[None])
            scores = last_token_attention(prev, h_prev, cos, sin, cfg)
            n = len(pos)
            span = list(range(max(n - protect_last, 0)))
            span = [i for i in span if i != n - 1]
            keep_n = keep_count(cut_at[l], len(span))
            ranked = sorted(span, key=lambda i: (-scores[i].item(), i))
            kept = sorted(set(range(n)) - set(span) | set(ranked[:keep_n]))
            idx = torch.tensor(kept)
            h, pos = h[:, idx], pos[idx]
            kept_after[l] = pos.tolist()
        h_prev = h
        h = run_layer(layer, h, pos, m.rotary_emb)
    logits = model.lm_head(m.norm(h))[0, -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, 20)
    return kept_after, [[i, round(v, 6)] for i, v in zip(top.indices.tolist(), top.values.tolist())]


def main():
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    text = (ROOT / "assets" / "texts" / "wiki.utf8").read_text(encoding="utf-8")
    all_ids = tok(text).input_ids
    if tok.bos_token_id is not None and (not all_ids or all_ids[0] != tok.bos_token_id):
        all_ids = [tok.bos_token_id] + all_ids
    OUT.mkdir(parents=True, exist_ok=True)
    for c in CASES:
        ids = all_ids[: c["n"]]
        kept_after, top = case(model, ids, c["stages"], c["protect_last"])
        spec = ",".join(f"{l}:{k}" for l, k in c["stages"])
        fixture = dict(
            made_by=dict(
                script="tools/reference/make_token_prune_fixtures.py",
                transformers=transformers.__version__,
                torch=torch.__version__,
                model="assets/SmolLM2-135M-Instruct.Q4_1.gguf (float32, dequantized by transformers)",
                date=datetime.date.today().isoformat(),
            ),
            prune_tokens=spec,
            prune_span="prompt",
            protect_last=c["protect_last"],
            prune_score="last-attn",
            prompt_ids=ids,
            kept_positions={str(l): p for l, p in kept_after.items()},
            top20_last=top,
        )
        (OUT / f"{c['name']}.json").write_text(json.dumps(fixture) + "\n")
        print(c["name"], {l: len(p) for l, p in kept_after.items()}, top[:3])


if __name__ == "__main__":
    main()
