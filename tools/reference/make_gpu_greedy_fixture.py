"""Greedy continuations of SmolLM2 in HF transformers, float32 and bfloat16: the anchor for
scripts/gpu-check.sh, which runs pare's CUDA path in both dtypes (tests/fixtures/smollm2/greedy_dtypes.json).

    tools/reference/.venv/bin/python tools/reference/make_gpu_greedy_fixture.py

bf16 rounds differently from f32, and over 16 greedy steps a near-tie can go the other way; the
fair check of a bf16 engine is against HF's own bf16 run, token for token.
"""

import datetime
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,", "The three primary colors are"]
NEW_TOKENS = 16


def main():
    tok = AutoTokenizer.from_pretrained(ROOT / "assets", gguf_file=GGUF)
    cases = {p: {} for p in PROMPTS}
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        model = AutoModelForCausalLM.from_pretrained(ROOT / "assets", gguf_file=GGUF, dtype=dtype)
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
            cases[p][name] = {"tokens": out.tolist(), "text": tok.decode(out)}
    fixture = {
        "meta": {
            "script": "tools/reference/make_gpu_greedy_fixture.py",
            "command": "tools/reference/.venv/bin/python tools/reference/make_gpu_greedy_fixture.py",
            "model": f"assets/{GGUF}",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "device": "cpu",
            "new_tokens": NEW_TOKENS,
        },
        "cases": [{"prompt": p, **cases[p]} for p in PROMPTS],
    }
    out = ROOT / "tests" / "fixtures" / "smollm2" / "greedy_dtypes.json"
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
