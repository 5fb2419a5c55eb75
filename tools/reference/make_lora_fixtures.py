"""LoRA training fixtures: HF peft + torch AdamW on the tiny random Llama, for `pare finetune`.

    tools/reference/.venv/bin/python tools/reference/make_lora_fixtures.py [--pare target/debug/pare]

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

  ids.jsonl             tokenized training records (HF's input_ids + labels with -100)
  pare_adapters.json    with --pare: `pare finetune` runs (a dense Llama, a pruned Llama whose
                        layers differ, GPT-NeoX), each adapter loaded by
                        `PeftModel.from_pretrained` and its merged model by
                        `AutoModelForCausalLM.from_pretrained`; the first 256 logits of each
                        position on fixed ids. The Rust test re-runs each command and compares
                        pare's.

The step-for-step part runs in float64, so the comparison measures the algorithm, not rounding.
"""

import argparse
import json
import math
import subprocess
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
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


def ids_jsonl():
    """Twelve tokenized records, half with a masked prompt."""
    g = torch.Generator().manual_seed(5)
    lines = []
    for i in range(12):
        ids = torch.randint(3, 256, (8 + i % 5,), generator=g).tolist()
        if i % 2:
            labels = [-100] * 3 + ids[3:]
            lines.append(json.dumps({"input_ids": ids, "labels": labels}))
        else:
            lines.append(json.dumps({"input_ids": ids}))
    (OUT / "ids.jsonl").write_text("\n".join(lines) + "\n")


FINETUNE = ["--data", "tests/fixtures/lora/ids.jsonl", "--steps", "3", "--batch-size", "4", "--micro-batch", "2",
            "--max-len", "64", "--eval-examples", "2", "--warmup-steps", "1", "--lr", "0.01", "--seed", "1",
            "--lora-r", "4", "--lora-alpha", "8", "--merge"]
PROBE = [5, 17, 42, 99, 3, 250, 7]
# Logit columns recorded: GPT-NeoX's vocabulary (50 k) would make the file megabytes.
COLUMNS = 256

# (name, model, pare prune flags to run first or None, pare finetune flags)
ADAPTER_CASES = [
    ("llama-dense", "tests/fixtures/llama-tiny/model", None, []),
    ("llama-pruned-layers-differ", "tests/fixtures/prune/llama-gqa-tiny/model",
     ["--importance", "l1", "--ratio", "0.5", "--attn-layers", "1..3", "--mlp-layers", "2..4"], ["--lora-targets", "q,v,down"]),
    ("gptneox", "tests/fixtures/gptneox-tiny/model", None, ["--lora-dropout", "0.1"]),
]


def adapter_cases(pare):
    results = []
    for name, model, prune, flags in ADAPTER_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            base = model
            if prune is not None:
                base = str(Path(tmp) / "pruned")
                subprocess.run([pare, "prune", "--model", model, *prune, "--out", base], check=True, cwd=ROOT,
                               capture_output=True)
            out = Path(tmp) / "adapter"
            cmd = ["finetune", "--model", base, *FINETUNE, *flags, "--out", str(out), "--json"]
            report = json.loads(subprocess.run([pare, *cmd], check=True, capture_output=True, text=True,
                                               cwd=ROOT).stdout)
            remote = prune is not None
            hf = AutoModelForCausalLM.from_pretrained(ROOT / base, dtype=torch.float32, trust_remote_code=remote,
                                                      attn_implementation="eager")
            peft_model = PeftModel.from_pretrained(hf, out)
            peft_model.eval()
            merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32,
                                                          trust_remote_code=remote, attn_implementation="eager")
            with torch.no_grad():
                ids = torch.tensor([PROBE])
                adapted = peft_model(input_ids=ids).logits[0]
                merged_logits = merged(input_ids=ids).logits[0]
            results.append({
                "name": name,
                "model": model,
                "prune": prune,
                "finetune": [*FINETUNE, *flags],
                "targets": report["adapter"]["targets"],
                "last_loss": report["last_loss"],
                "peft_logits": adapted[:, :COLUMNS].tolist(),
                "merged_logits": merged_logits[:, :COLUMNS].tolist(),
            })
            print(name, report["adapter"], report["last_loss"])
    (OUT / "pare_adapters.json").write_text(json.dumps({"ids": PROBE, "columns": COLUMNS, "cases": results}) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pare", help="a pare binary: also check its adapters load in peft")
    args = parser.parse_args()
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
    ids_jsonl()
    if args.pare:
        adapter_cases(str(Path(args.pare).resolve()))


if __name__ == "__main__":
    main()
