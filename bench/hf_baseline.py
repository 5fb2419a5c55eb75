"""HF transformers baseline for `pare bench` on a GPU: same model, shapes and token ids.

Loads the model once and measures every (batch, prompt, new tokens) shape with each attention
implementation asked for, printing one JSON line per measurement with the fields `pare bench
--json` has. Prefill is one forward over the prompts (median of --repeat); decode is a greedy loop
of single-token forwards over HF's DynamicCache, as `generate` does. With --bandwidth it first
prints the device-to-device copy rate, the memory-bandwidth ceiling the roofline uses.

    python3 bench/hf_baseline.py --model DIR_OR_GGUF --shapes 1:512:256,8:4096:256 --attn sdpa,eager
"""
import argparse
import json
import os
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def copy_bandwidth(device):
    """Bytes read plus written per second by a 4 GiB device-to-device copy (median of 10)."""
    src = torch.empty(1 << 31, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = sorted(times[3:])[len(times[3:]) // 2]
    return 2 * src.numel() * src.element_size() / t


def measure(model, ids, gen_len, repeat, device):
    """Prefill (median of `repeat`) and a greedy decode of `gen_len` tokens, timed."""
    batch, prompt_len = ids.shape
    sync = torch.cuda.synchronize
    with torch.inference_mode():
        out = model(ids[:1, :16])  # warm-up
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        model(nxt, past_key_values=out.past_key_values, use_cache=True)
        out = None
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(max(1, repeat)):
            out = None  # free the last run's cache first
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
        prefill_s = sorted(times)[len(times) // 2]
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(gen_len):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        decode_s = time.perf_counter() - t0
    return {
        "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_tok_s": batch * gen_len / decode_s if gen_len else 0.0,
        "gpu_mem_peak_bytes": torch.cuda.max_memory_allocated(device),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="HF directory or GGUF file (without: --bandwidth only)")
    ap.add_argument("--shapes", default="1:512:256", help="comma-separated batch:prompt_len:gen_len")
    ap.add_argument("--attn", default="sdpa", help="comma-separated attention implementations")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=3, help="prefill timed this many times; median reported")
    ap.add_argument("--bandwidth", action="store_true", help="first print the device copy bandwidth")
    a = ap.parse_args()

    if a.bandwidth:
        print(json.dumps({"engine": "torch", "copy_bytes_per_s": copy_bandwidth(a.device),
                          "gpu": torch.cuda.get_device_name(a.device)}), flush=True)
    if not a.model:
        return
    kwargs = dict(dtype=getattr(torch, a.dtype), device_map=a.device)
    if os.path.isdir(a.model):
        model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(a.model)),
                                                     gguf_file=os.path.basename(a.model), **kwargs)
    model.eval()
    vocab = model.config.vocab_size
    for attn in a.attn.split(","):
        model.set_attn_implementation(attn)
        for shape in a.shapes.split(","):
            batch, prompt_len, gen_len = (int(x) for x in shape.split(":"))
            # The same deterministic ids `pare bench` uses.
            ids = torch.tensor([[(i * 7919 + b * 104729 + 13) % vocab for i in range(prompt_len)] for b in range(batch)],
                               device=a.device)
            try:
                row = measure(model, ids, gen_len, a.repeat, a.device)
            except torch.OutOfMemoryError as e:
                row = {"error": "out of memory: " + str(e)[:100]}
            row.update({"engine": "hf", "transformers": transformers.__version__, "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(a.device), "attn": attn, "dtype": a.dtype,
                        "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len})
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
