"""LoRA training fixtures: HF peft + torch AdamW on the tiny random Llama, for `pare finetune`.

    tools/reference/.venv/bin/python tools/reference/make_lora_fixtures.py

Writes tests/fixtures/lora/:
  init/                 the starting adapter, saved by peft (adapter_config.json +
                        adapter_model.safetensors); A and B are seeded normals (peft's own init
                        sets B = 0, which would leave A's gradient zero on the first step)
  train.json            the batches (token ids + label masks), the optimizer and schedule
                        settings, and per step: learning rate, loss (HF Trainer's: the sum of
                        token cross-entropies over the accumulated batch divided by its label
                        count), gradient norm before clipping
  after.safetensors     the adapter after the steps, under peft's names
  logits.json           the adapter-applied logits (peft, unmerged) of one sequence before and
                        after training, and the merged model's (merge_and_unload)
  schedule.json         learning rates of transformers' linear and cosine schedules with warm-up

Everything runs in float64, so the comparison measures the algorithm, not rounding.
"""

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests/fixtures/llama-tiny/model"
OUT = ROOT / "tests/fixtures/lora"

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-2, (0.9, 0.999), 1e-8, 0.01, 0.5
WARMUP, TOTAL = 1, 4


def batches():
    """Three optimizer steps of two sequences each; label masks hide a 'prompt' prefix."""
    g = torch.Generator().manual_seed(7)
    out = []
    for step in range(3):
        seqs = []
        for length, prompt in [(11 + step, 4), (7 + 2 * step, 0)]:
            ids = torch.randint(3, 256, (length,), generator=g).tolist()
            labels = [i >= max(prompt, 1) for i in range(length)]
            seqs.append({"ids": ids, "labels": labels})
        out.append(seqs)
    return out


def step_loss(model, seqs):
    """Σ token cross-entropy over labels / number of labels, sequences run one by one."""
    total, count = 0.0, 0
    for s in seqs:
        ids = torch.tensor([s["ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:]
        mask = torch.tensor(s["labels"][1:])
        ce = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
        total = total + ce
        count += int(mask.sum())
    return total / count


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    model.save_pretrained(OUT / "init")
    (OUT / "init" / "README.md").unlink()  # peft's model card template

    probe = torch.tensor([[5, 17, 99, 3, 250, 42, 8, 120, 64]])
    model.eval()
    with torch.no_grad():
        logits_before = model(input_ids=probe).logits[0].tolist()

    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, TOTAL)
    steps = []
    data = batches()
    for seqs in data:
        opt.zero_grad()
        lr = opt.param_groups[0]["lr"]
        loss = step_loss(model, seqs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        sched.step()
        steps.append({"lr": lr, "loss": loss.item(), "grad_norm": norm.item()})

    after = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    save_file(after, OUT / "after.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        logits_after = model(input_ids=probe).logits[0].tolist()
        merged = model.merge_and_unload()
        logits_merged = merged(input_ids=probe).logits[0].tolist()

    train = {
        "rank": RANK,
        "alpha": ALPHA,
        "lr": LR,
        "betas": BETAS,
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "warmup_steps": WARMUP,
        "total_steps": TOTAL,
        "batches": data,
        "steps": steps,
    }
    (OUT / "train.json").write_text(json.dumps(train) + "\n")
    logits = {
        "ids": probe[0].tolist(),
        "before": logits_before,
        "after": logits_after,
        "merged": logits_merged,
    }
    (OUT / "logits.json").write_text(json.dumps(logits) + "\n")

    sched_out = {}
    for name, make in [("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        s = make(opt, 10, 50)
        lrs = []
        for _ in range(55):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            s.step()
        sched_out[name] = {"warmup_steps": 10, "total_steps": 50, "lr": lrs}
    (OUT / "schedule.json").write_text(json.dumps(sched_out) + "\n")
    print("wrote", OUT, [round(s["loss"], 6) for s in steps], [round(s["grad_norm"], 4) for s in steps])
    assert not math.isnan(steps[-1]["loss"])


if __name__ == "__main__":
    main()
