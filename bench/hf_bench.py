"""HF transformers baseline for `pare bench`: same model, same shapes, same token ids.

Prints one JSON object like `pare bench --json`. Prefill is one forward over the prompt; decode
is a greedy loop of single-token forwards over HF's DynamicCache (what `generate` does), so the
two engines do the same work.
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="GGUF file or HF directory")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3, help="prefill timed this many times; median reported")
    a = ap.parse_args()

    dtype = getattr(torch, a.dtype)
    if os.path.isdir(a.model):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(a.model)), gguf_file=os.path.basename(a.model),
            dtype=dtype, attn_implementation=a.attn)
    model.to(a.device).eval()
    vocab = model.config.vocab_size
    # The same deterministic ids `pare bench` uses.
    ids = torch.tensor([[(i * 7919 + b * 104729 + 13) % vocab for i in range(a.prompt_len)] for b in range(a.batch)],
                       device=a.device)

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        model(ids[:1, :16])  # warm-up
        sync()
        times = []
        for _ in range(max(1, a.repeat)):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            sync()
            times.append(time.perf_counter() - t0)
        prefill_s = sorted(times)[len(times) // 2]
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(a.gen_len):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        decode_s = time.perf_counter() - t0

    print(json.dumps({
        "engine": "hf", "transformers": __import__("transformers").__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "attn": a.attn, "dtype": a.dtype,
        "batch": a.batch, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
        "prefill_tok_s": a.batch * a.prompt_len / prefill_s,
        "decode_tok_s": a.batch * a.gen_len / decode_s if a.gen_len else 0.0,
    }))


if __name__ == "__main__":
    main()
