"""FastV / PyramidDrop image-token pruning on the tiny LLaVA, written out over HF transformers'
layers: the reference for pare's token pruner on LLaVA (tests/fixtures/llava-tiny/fastv.json).

    tools/reference/.venv/bin/python tools/reference/make_llava_prune_fixtures.py

The input embeddings are HF LLaVA's own (`get_image_features`, `get_placeholder_mask`,
`masked_scatter`, exactly as `LlavaModel.forward` builds them) for the two prompts of
tests/fixtures/llava-tiny/logits.json, from the input_ids and pixel values recorded there. The
decoder then runs layer by layer with the rule of make_token_prune_fixtures.py, the span being the
image tokens (pare's `--prune-tokens L:KEEP --prune-span image --prune-score last-attn`):

  layers 0..L-1 run on every token; the attention of the last token at layer L-1, averaged over
  all heads, scores the span (the image placeholder positions, never the last token); the top
  KEEP span tokens (ties: earlier first) and every token outside the span go on to layers L.. at
  their ORIGINAL positions (RoPE and the causal mask by original position). Several stages repeat
  this on the survivors, and KEEP is a fraction (round(n * f), at least 1) or a count of the span
  tokens still present at that cut, as pare's `Keep::of` counts them.

The tiny checkpoint's decoder has two layers, so the only cut it allows is after layer 0
(`1:KEEP`). The FastV K=2 and multi-stage cases run on a four-layer decoder made of the same
checkpoint's layers in the order 0, 1, 0, 1 (`layer_order`): the same weights on both sides, no
new checkpoint. Float32, eager attention written out here, no KV cache.

fastv.json holds, per case and prompt: the kept original positions after each cut (every token
that goes on, image or text), the score margin at each cut (the last kept span score minus the
best dropped one; scores are attention probabilities, so float32 noise is ~1e-7, and every case
is checked to stay above 1e-5, so that identical kept indices are a fair demand), the full
logits of the last position, and the 8 largest logits of every token that reaches the last
layer. `unpruned` holds the last position's logits without pruning per layer order; for order
0, 1 they are also checked here against HF's own forward and logits.json.
"""

import datetime
import json
import math
from pathlib import Path

import torch
import transformers
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "llava-tiny"
MODEL = FIXTURES / "model"
OUT = FIXTURES / "fastv.json"
DIGITS = 6
TOP = 8

NATIVE = [0, 1]
DEEP = [0, 1, 0, 1]
CASES = [
    # FastV at the only cut two layers allow, keeping half of the 16 image tokens.
    dict(name="fastv_k1_half", layer_order=NATIVE, stages=[(1, 0.5)]),
    # A token count instead of a fraction.
    dict(name="fastv_k1_keep10", layer_order=NATIVE, stages=[(1, 10)]),
    # FastV K=2, R=50% (the paper's setting) on the four-layer decoder.
    dict(name="fastv_k2_half_deep", layer_order=DEEP, stages=[(2, 0.5)]),
    # PyramidDrop-like: halve the image tokens after layer 0, halve the survivors after layer 2.
    dict(name="pyramid_two_stages_deep", layer_order=DEEP, stages=[(1, 0.5), (3, 0.5)]),
    # Three cuts, fractions and a count mixed: 16 → 12 → 6 → 2 image tokens.
    dict(name="pyramid_three_stages_deep", layer_order=DEEP, stages=[(1, 0.75), (2, 0.5), (3, 2)]),
]


def keep_count(keep, n):
    if isinstance(keep, float):
        # Rust's f64::round (halves away from zero), not Python's round (halves to even).
        return min(max(math.floor(n * keep + 0.5), 1), max(n, 1))
    return min(max(keep, 1), max(n, 1))


def spec(stages):
    return ",".join(f"{l}:{k}" for l, k in stages)


def causal_mask(pos):
    allowed = pos[None, :] <= pos[:, None]
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask[~allowed] = float("-inf")
    return mask[None, None]


def last_token_attention(layer, h, cos, sin, cfg):
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, L, _ = x.shape
    d = cfg.head_dim
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
def inputs_embeds(model, ids, pv):
    """LlavaModel.forward's inputs_embeds, from its own methods."""
    m = model.model
    embeds = m.get_input_embeddings()(ids)
    features = m.get_image_features(pixel_values=pv, vision_feature_layer=-2, vision_feature_select_strategy="default", return_dict=True).pooler_output
    features = torch.cat(features, dim=0).to(embeds.dtype)
    mask = m.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    return embeds.masked_scatter(mask, features)


@torch.no_grad()
def run(model, embeds, span_positions, layer_order, stages):
    """Logits (kept tokens, vocab) at the last layer, original positions of those tokens, and per
    cut the kept positions and the score margin."""
    lm = model.model.language_model
    cfg = model.config.text_config
    layers = [lm.layers[i] for i in layer_order]
    pos = torch.arange(embeds.shape[1])
    h = embeds
    cut_at = dict(stages)
    kept_after, margins = {}, {}
    h_prev = None
    for l, layer in enumerate(layers):
        if l in cut_at:
            # Scores come from layer l-1, which has already run: recompute its attention input.
            cos, sin = lm.rotary_emb(h_prev, pos[None])
            scores = last_token_attention(layers[l - 1], h_prev, cos, sin, cfg)
            n = len(pos)
            plist = pos.tolist()
            span = [i for i in range(n) if plist[i] in span_positions and i != n - 1]
            keep_n = keep_count(cut_at[l], len(span))
            ranked = sorted(span, key=lambda i: (-scores[i].item(), i))
            if keep_n < len(span):
                margins[l] = scores[ranked[keep_n - 1]].item() - scores[ranked[keep_n]].item()
            kept = sorted(set(range(n)) - set(span) | set(ranked[:keep_n]))
            idx = torch.tensor(kept)
            h, pos = h[:, idx], pos[idx]
            kept_after[l] = pos.tolist()
        h_prev = h
        h = run_layer(layer, h, pos, lm.rotary_emb)
    logits = model.lm_head(lm.norm(h))[0]
    return logits, pos.tolist(), kept_after, margins


def rounded(t):
    return [round(float(x), DIGITS) for x in t.reshape(-1).tolist()]


def top(row):
    t = torch.topk(row, TOP)
    return [[i, round(v, DIGITS)] for i, v in zip(t.indices.tolist(), t.values.tolist())]


def main():
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    n_layers = cfg.text_config.num_hidden_layers
    assert n_layers == 2, n_layers
    image_id = cfg.image_token_index
    recorded = json.loads((FIXTURES / "logits.json").read_text())["cases"]

    prompts, unpruned, cases = [], [], []
    worst_hf = 0.0
    for pi, rec in enumerate(recorded):
        ids = torch.tensor([rec["input_ids"]])
        # The recorded (6-decimal) pixel values: the Rust test feeds exactly these.
        pv = torch.tensor(rec["pixel_values"], dtype=torch.float32).reshape(1, 3, 28, 28)
        span = [i for i, t in enumerate(rec["input_ids"]) if t == image_id]
        assert len(span) == 16, span
        prompts.append(dict(logits_case=pi, image=rec["image"], prompt=rec["prompt"], input_ids=rec["input_ids"], image_positions=span))
        embeds = inputs_embeds(model, ids, pv)

        # The written-out decoder is HF's: without cuts it gives HF's forward and logits.json.
        with torch.no_grad():
            hf = model(input_ids=ids, pixel_values=pv).logits[0]
        full, _, _, _ = run(model, embeds, set(span), NATIVE, [])
        d_hf = (full - hf).abs().max().item()
        d_fixture = (full - torch.tensor(rec["logits"]).reshape(full.shape)).abs().max().item()
        # logits.json came from unrounded pixel values: 6-decimal pixels move the logits ~1e-5.
        assert d_hf < 1e-5 and d_fixture < 1e-4, (d_hf, d_fixture)
        worst_hf = max(worst_hf, d_hf)
        for order in (NATIVE, DEEP):
            full, _, _, _ = run(model, embeds, set(span), order, [])
            unpruned.append(dict(prompt_index=pi, layer_order=order, last_logits=rounded(full[-1])))

        for c in CASES:
            assert all(0 < l < len(c["layer_order"]) for l, _ in c["stages"]), c
            logits, final_pos, kept_after, margins = run(model, embeds, set(span), c["layer_order"], c["stages"])
            assert all(m > 1e-5 for m in margins.values()), (c["name"], pi, margins)
            full, _, _, _ = run(model, embeds, set(span), c["layer_order"], [])
            moved = (logits[-1] - full[-1]).abs().max().item()
            # A case where pruning left the logits alone would prove nothing.
            assert moved > 1e-3, (c["name"], pi, moved)
            cases.append(
                dict(
                    name=c["name"],
                    prompt_index=pi,
                    layer_order=c["layer_order"],
                    prune_tokens=spec(c["stages"]),
                    kept_positions={str(l): p for l, p in kept_after.items()},
                    margins={str(l): m for l, m in margins.items()},
                    last_logits=rounded(logits[-1]),
                    max_change_from_unpruned=round(moved, DIGITS),
                    kept_top8=[[p, top(row)] for p, row in zip(final_pos, logits)],
                )
            )
            print(c["name"], pi, {l: len(p) for l, p in kept_after.items()}, f"min margin {min(margins.values()):.2e}", f"moved {moved:.3f}")

    fixture = dict(
        meta=dict(
            script="tools/reference/make_llava_prune_fixtures.py",
            command="tools/reference/.venv/bin/python tools/reference/make_llava_prune_fixtures.py",
            versions=dict(transformers=transformers.__version__, torch=torch.__version__),
            date=datetime.date.today().isoformat(),
            model="tests/fixtures/llava-tiny/model (LlavaForConditionalGeneration, float32, eager; decoder layers reused in layer_order)",
            inputs="input_ids and pixel_values of tests/fixtures/llava-tiny/logits.json cases[prompt_index]",
            rule=(
                "layers 0..L-1 on every token; last-token attention at layer L-1 averaged over heads scores the image "
                "placeholder positions (never the last token); the top KEEP of them (ties: earlier first) plus every "
                "other token continue at their original positions; KEEP is a fraction (round(n*f), >= 1) or a count of "
                "the span tokens present at that cut; stages repeat on the survivors"
            ),
            prune_span="image",
            prune_score="last-attn",
            digits=DIGITS,
            unpruned_vs_hf_forward_max_diff=worst_hf,
        ),
        image_token_id=image_id,
        prompts=prompts,
        unpruned=unpruned,
        cases=cases,
    )
    OUT.write_text(json.dumps(fixture) + "\n")
    print(f"{OUT.relative_to(ROOT)}: {len(cases)} cases, {OUT.stat().st_size / 1e3:.0f} kB; unpruned vs HF forward {worst_hf:.2e}")


if __name__ == "__main__":
    main()
