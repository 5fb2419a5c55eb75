"""Perplexity of SmolLM2 pruned by the LLM-Pruner-equivalent reference (prune_reference.py), for the
side-by-side table in docs/pruning.md: the same configurations `pare prune --eval-ppl` runs, the
same calibration data (10 × 64 consecutive tokens of c4.utf8) and the same protocol (the first 8192
tokens of wiki.utf8, non-overlapping windows of 512, each scoring all its tokens but the first).

    tools/reference/.venv/bin/python tools/reference/prune_ppl_reference.py

Writes tests/fixtures/prune/ppl_reference.json. Another GGUF model, some of the importances, layers
clipped to its depth, the result elsewhere (docs/pruning.md's Qwen check):

    tools/reference/.venv/bin/python tools/reference/prune_ppl_reference.py \
        --model assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf --importance wanda-sp,param_first \
        --out bench/results/prune-reference-qwen.json
"""

import argparse

import datetime
import json
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import prune_reference as ref

ROOT = Path(__file__).resolve().parents[2]
SMOL = ROOT / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = [
    # (importance, gqa, ratio, attn layers, mlp layers)
    ("l2", "kv-groups", 0.25, (3, 30), (3, 30)),
    ("param_first", "kv-groups", 0.25, (3, 30), (3, 30)),
    ("wanda-sp", "kv-groups", 0.25, (3, 30), (3, 30)),
    ("param_first", "query-heads", 0.34, (3, 30), (3, 30)),
]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def main():
    cli = argparse.ArgumentParser()
    cli.add_argument("--model", type=Path, default=SMOL)
    cli.add_argument("--importance", help="comma-separated: only these importances' rows")
    cli.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/prune/ppl_reference.json")
    args = cli.parse_args()
    torch.set_num_threads(2)
    path = args.model.resolve()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    c4 = tok((ROOT / "assets/texts/c4.utf8").read_text(encoding="utf-8")).input_ids
    samples = [c4[i * 64 : (i + 1) * 64] for i in range(10)]
    wiki = tok((ROOT / "assets/texts/wiki.utf8").read_text(encoding="utf-8")).input_ids[:8192]
    model = load(path)
    base = ref.perplexity(model, wiki, 512)
    params = sum(p.numel() for p in model.parameters())
    layers = model.config.num_hidden_layers
    rows = []
    for method, gqa, ratio, attn, mlp in CONFIGS:
        if args.importance and method not in args.importance.split(","):
            continue
        # pare clips a layer range to the model's depth.
        attn, mlp = (attn[0], min(attn[1], layers)), (mlp[0], min(mlp[1], layers))
        t = time.time()
        scores, loss = ref.scores(model, method, "sum", gqa, list(range(*attn)), list(range(*mlp)), samples)
        kept = ref.plan(model, scores, gqa, ratio)
        pruned = ref.apply(load(path), kept)
        row = dict(importance=method, gqa=gqa, ratio=ratio, attn_layers=list(attn), mlp_layers=list(mlp),
                   params_after=sum(p.numel() for p in pruned.parameters()), ppl=ref.perplexity(pruned, wiki, 512),
                   layer3=dict(heads=pruned.model.layers[3].self_attn.q_proj.out_features // ref.shape(model)[2],
                               kv_heads=pruned.model.layers[3].self_attn.k_proj.out_features // ref.shape(model)[2],
                               mlp_width=pruned.model.layers[3].mlp.gate_proj.out_features))
        print(row, f"{time.time() - t:.0f} s", flush=True)
        rows.append(row)
    out = dict(
        meta=dict(script="tools/reference/prune_ppl_reference.py", model=path.name,
                  command="tools/reference/.venv/bin/python tools/reference/prune_ppl_reference.py",
                  transformers=transformers.__version__, torch=torch.__version__, date=datetime.date.today().isoformat(),
                  protocol="first 8192 tokens of assets/texts/wiki.utf8 (tokenizer(text).input_ids), windows of 512, stride 512",
                  calibration="10 × 64 consecutive tokens of assets/texts/c4.utf8", reduction="sum", mode="local"),
        params_before=params, ppl_before=base, configs=rows)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
