"""HF transformers' side of scripts/gpu-real-weights.sh (issue 16: real weights on the GPU).

Loads a GGUF with HF's own reader (the `gguf` package dequantizes it; then cast to bfloat16),
runs it on the GPU with sdpa attention, and prints one JSON object: per prompt the top-N
log-probabilities of the next token and the greedy continuation of --new-tokens tokens.

    python3 bench/hf_real_weights.py --gguf /tmp/q15.gguf --prompts-file P.txt --new-tokens 16
"""

import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts-file", required=True, help="one prompt per line")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    path = Path(args.gguf).resolve()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to("cuda")
    model.eval()
    cases = []
    for prompt in Path(args.prompts_file).read_text().splitlines():
        ids = tok(prompt, return_tensors="pt").input_ids.to("cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, -1)
            top = torch.topk(logprobs, args.top)
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1] :]
        cases.append(
            {
                "prompt": prompt,
                "prompt_ids": ids[0].tolist(),
                "top": [{"id": int(i), "logprob": float(v)} for v, i in zip(top.values, top.indices)],
                "tokens": out.tolist(),
                "text": tok.decode(out),
            }
        )
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    print(json.dumps({"meta": meta, "cases": cases}))


if __name__ == "__main__":
    main()
