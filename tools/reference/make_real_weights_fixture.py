"""HF transformers float32 next-token top-10 log-probabilities of the Qwen2.5-Coder GGUFs on the
prompts scripts/gpu-real-weights.sh runs: the reference both bf16 runs there (HF's and pare's, on
the GPU) are measured against (tests/fixtures/qwen2/real_weights_f32.json). Two bf16
implementations each stray from float32 by a few hundredths of a nat and in different directions,
so how far pare's bf16 is from float32, beside how far HF's bf16 is, is the fair comparison.

    tools/reference/.venv/bin/python tools/reference/make_real_weights_fixture.py
"""

import datetime
import hashlib
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"q05": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", "q15": "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
           "The three primary colors are"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    models = {}
    for key, name in MODELS.items():
        tok = AutoTokenizer.from_pretrained(ROOT / "assets", gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(ROOT / "assets", gguf_file=name, dtype=torch.float32)
        cases = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
            top = torch.topk(logprobs, 10)
            cases.append({"prompt": prompt, "prompt_ids": ids[0].tolist(),
                          "top": [{"id": int(i), "logprob": float(v)} for v, i in zip(top.values, top.indices)]})
        models[key] = {"model": f"assets/{name}", "sha256": sha256(ROOT / "assets" / name), "cases": cases}
    fixture = {
        "meta": {
            "script": "tools/reference/make_real_weights_fixture.py",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "device": "cpu",
            "dtype": "float32",
        },
        "models": models,
    }
    out = ROOT / "tests" / "fixtures" / "qwen2" / "real_weights_f32.json"
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
