"""HF peft + torch LoRA training speed on the same run `pare finetune` makes (bench/finetune_speed.sh).

    python bench/hf_finetune.py MODEL_DIR TEXT --steps N --batch-size B --micro-batch M --max-len L

The text is tokenized whole and cut into pieces of L tokens, as `pare finetune` does with plain
text; LoRA r 8, alpha 16, dropout 0.05 on all seven projections; AdamW at 1e-4; every update runs
B sequences in micro-batches of M (gradient accumulation), the loss normalised by the batch's
label count (HF Trainer's). Prints one JSON object: tokens/s over the updates.
"""

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("text")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok(open(a.text, encoding="utf-8").read())["input_ids"]
    pieces = [ids[i:i + a.max_len] for i in range(0, len(ids) - a.max_len + 1, a.max_len)]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, start = 0, time.perf_counter()
    for step in range(a.steps):
        batch = [pieces[(step * a.batch_size + j) % len(pieces)] for j in range(a.batch_size)]
        labels = sum(len(s) - 1 for s in batch)
        opt.zero_grad()
        for m in range(0, a.batch_size, a.micro_batch):
            x = torch.tensor(batch[m:m + a.micro_batch])
            logits = model(input_ids=x).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum") / labels
            loss.backward()
            tokens += x.numel()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    print(json.dumps({"engine": "hf-peft", "torch": torch.__version__, "steps": a.steps, "tokens": tokens,
                      "seconds": seconds, "tokens_per_second": tokens / seconds, "threads": a.threads}))


if __name__ == "__main__":
    main()
