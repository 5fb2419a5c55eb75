"""Perplexity of SmolLM2 pruned by the LLM-Pruner-equivalent reference (prune_reference.py), for the
side-by-side table in docs/pruning.md: the same configurations `pare prune --eval-ppl` runs, the
same calibration data (10 × 64 consecutive tokens of c4.utf8) and the same protocol (the first 8192
tokens of wiki.utf8, non-overlapping windows of 512, each scoring all its tokens but the first).

    tools/reference/.venv/bin/python tools/reference/prune_ppl_reference.py

Writes tests/fixtures/prune/ppl_reference.json.
"""

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


def load():
    return AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32, attn_implementation="eager").eval()


def main():
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    c4 = tok((ROOT / "assets/texts/c4.utf8").read_text(encoding="utf-8")).input_ids
    samples = [c4[i * 64 : (i + 1) * 64] for i in range(10)]
    wiki = tok((ROOT / "assets/texts/wiki.utf8").read_text(encoding="utf-8")).input_ids[:8192]
    model = load()
    base = ref.perplexity(model, wiki, 512)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for method, gqa, ratio, attn, mlp in CONFIGS:
        t = time.time()
        scores, loss = ref.scores(model, method, "sum", gqa, list(range(*attn)), list(range(*mlp)), samples)
        kept = ref.plan(model, scores, gqa, ratio)
        pruned = ref.apply(load(), kept)
        row = dict(importance=method, gqa=gqa, ratio=ratio, attn_layers=list(attn), mlp_layers=list(mlp),
                   params_after=sum(p.numel() for p in pruned.parameters()), ppl=ref.perplexity(pruned, wiki, 512),
                   layer3=dict(heads=pruned.model.layers[3].self_attn.q_proj.out_features // 64,
                               kv_heads=pruned.model.layers[3].self_attn.k_proj.out_features // 64,
                               mlp_width=pruned.model.layers[3].mlp.gate_proj.out_features))
        print(row, f"{time.time() - t:.0f} s", flush=True)
        rows.append(row)
    out = dict(
        meta=dict(script="tools/reference/prune_ppl_reference.py", command="tools/reference/.venv/bin/python tools/reference/prune_ppl_reference.py",
                  transformers=transformers.__version__, torch=torch.__version__, date=datetime.date.today().isoformat(),
                  protocol="first 8192 tokens of assets/texts/wiki.utf8 (tokenizer(text).input_ids), windows of 512, stride 512",
                  calibration="10 × 64 consecutive tokens of assets/texts/c4.utf8", reduction="sum", mode="local"),
        params_before=params, ppl_before=base, configs=rows)
    (ROOT / "tests/fixtures/prune/ppl_reference.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
