"""HF peft + torch side of bench/lora_speed.sh: LoRA training speed on the same run as `pare finetune`.

    tools/reference/.venv/bin/python bench/lora_speed_hf.py --model DIR --text FILE --pieces OUT.jsonl --prepare
    tools/reference/.venv/bin/python bench/lora_speed_hf.py --model DIR --pieces OUT.jsonl --steps N ...

--prepare cuts the text into pieces of exactly --max-len tokens with the model's tokenizer and
writes them as `{"input_ids", "labels"}` lines, which `pare finetune --data` reads too, so both
train on the same tokens. Training: peft LoRA on the seven projections, float32, AdamW, updates
of --batch pieces in micro-batches of --micro (gradient accumulation, HF Trainer's loss), one
JSON line with the seconds and tokens/s of the updates (loading excluded, as pare counts it).
"""

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pieces", required=True)
    ap.add_argument("--text")
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()

    if a.prepare:
        tok = AutoTokenizer.from_pretrained(a.model)
        ids = tok(open(a.text, encoding="utf-8").read())["input_ids"]
        with open(a.pieces, "w") as f:
            for s in range(0, len(ids) - a.max_len + 1, a.max_len):
                piece = ids[s : s + a.max_len]
                f.write(json.dumps({"input_ids": piece, "labels": piece}) + "\n")
        return

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    pieces = [json.loads(line)["input_ids"] for line in open(a.pieces)]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, trust_remote_code=True)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    tokens, start, at = 0, time.perf_counter(), 0
    for _ in range(a.steps):
        batch = [pieces[(at + i) % len(pieces)] for i in range(a.batch)]
        at += a.batch
        labels = a.batch * (a.max_len - 1)
        for m in range(0, a.batch, a.micro):
            ids = torch.tensor(batch[m : m + a.micro])
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            (loss / labels).backward()
            tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    print(json.dumps({"steps": a.steps, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
