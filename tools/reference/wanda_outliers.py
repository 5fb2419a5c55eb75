"""Why Wanda-SP falls below random on Qwen2.5-Coder-0.5B but not on SmolLM2 (docs/pruning.md):
how much of each MLP channel's Wanda-SP score (|W| times the calibration inputs' norms ‖X‖, over
gate, up and down) comes from the few largest input dimensions. Same calibration as
`pare prune` (10 × 64 consecutive tokens of c4.utf8), layers 3 onward.

    tools/reference/.venv/bin/python tools/reference/wanda_outliers.py

Prints one line per model: the median over layers of max‖X_d‖ / median‖X_d‖ for the MLP's input
(the post-attention norm's output) and the share of the gate/up part of the score carried by the
top 1 % of input dimensions.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"]


def main():
    torch.set_num_threads(2)
    for name in MODELS:
        path = ROOT / "assets" / name
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        c4 = tok((ROOT / "assets/texts/c4.utf8").read_text(encoding="utf-8")).input_ids
        samples = [c4[i * 64 : (i + 1) * 64] for i in range(10)]
        layers = model.model.layers
        sq = {i: 0 for i in range(3, len(layers))}
        hooks = [layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: sq.__setitem__(i, sq[i] + args[0].pow(2).sum(dim=(0, 1)))) for i in sq]
        with torch.no_grad():
            for s in samples:
                model(torch.tensor([s]))
        for h in hooks:
            h.remove()
        ratios, shares = [], []
        for i, s in sq.items():
            norms = s.sqrt()
            ratios.append((norms.max() / norms.median()).item())
            mlp = layers[i].mlp
            # Per input dimension d, its part of every channel's gate/up score: |W[:, d]| ‖X_d‖.
            part = (mlp.gate_proj.weight.abs() + mlp.up_proj.weight.abs()) * norms
            top = max(1, norms.numel() // 100)
            idx = norms.topk(top).indices
            shares.append((part[:, idx].sum() / part.sum()).item())
        med = lambda v: sorted(v)[len(v) // 2]
        print(f"{name}: max/median input norm {med(ratios):.1f} (layers {min(sq)}..{max(sq)}, median; "
              f"max {max(ratios):.1f}); top 1 % of input dims carry {100 * med(shares):.1f} % of the gate/up "
              f"score (max {100 * max(shares):.1f} %)", flush=True)


if __name__ == "__main__":
    main()
