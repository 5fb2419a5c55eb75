"""Write tests/fixtures/exports/remote_code.json: transformers' logits on pare's pruned exports whose
shapes transformers' own classes cannot hold (layers that differ, or pruned heads it derives or
checks from hidden_size).

    tools/reference/.venv/bin/python tools/reference/make_export_fixtures.py --pare target/release/pare

For each case, `pare prune` writes the export; transformers loads it with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (the directory's
modeling_pare.py, named in config.json's auto_map) and its float32 eager logits on fixed ids are
recorded. The Rust test (crates/pare-cli/tests/prune.rs) re-runs the same command and compares
pare's logits on the export with these.
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "exports"
IDS = [5, 17, 42, 99, 3, 250, 7]
COLUMNS = 256

# (name, model, pare prune flags): each leaves shapes that need modeling_pare.py.
CASES = [
    ("llama-layers-differ", "tests/fixtures/prune/llama-gqa-tiny/model",
     ["--importance", "l1", "--ratio", "0.5", "--attn-layers", "1..3", "--mlp-layers", "2..4"]),
    # 6 query heads over 2 KV heads in every layer: hidden_size 64 is no multiple of 6.
    ("llama-heads-indivisible", "tests/fixtures/prune/llama-gqa-tiny/model",
     ["--importance", "l2", "--gqa", "query-heads", "--ratio", "0.25", "--attn-layers", "0..4", "--mlp-layers", "0..4"]),
    ("mistral-layers-differ", "tests/fixtures/mistral-tiny/model",
     ["--importance", "l1", "--gqa", "query-heads", "--ratio", "0.5", "--attn-layers", "1..2", "--mlp-layers", "0..1"]),
    ("qwen2-layers-differ", "tests/fixtures/qwen2-tiny/model",
     ["--importance", "l1", "--ratio", "0.5", "--attn-layers", "1..2", "--mlp-layers", "0..1"]),
    ("gptneox-layers-differ", "tests/fixtures/gptneox-tiny/model",
     ["--importance", "l1", "--ratio", "0.5", "--attn-layers", "1..2", "--mlp-layers", "0..1"]),
    # The seed's own setting on the default model: layers 0-2 keep their MLP width.
    ("smollm2-seed-setting", "smollm2-135m", ["--importance", "taylor", "--ratio", "0.25"]),
    # 2 of 4 heads in both layers: transformers would derive head_dim 16 from hidden_size 32.
    ("gptneox-heads-pruned", "tests/fixtures/gptneox-tiny/model",
     ["--importance", "l2", "--ratio", "0.5", "--attn-layers", "0..2", "--mlp-layers", "0..2"]),
]


def run_case(pare, name, model, flags):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        cmd = [str(pare), "prune", "--model", model, *flags, "--out", str(out), "--json"]
        report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
        assert report["export"]["trust_remote_code"], f"{name}: pare says transformers needs no remote code"
        config = json.loads((out / "config.json").read_text())
        m = AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=True, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            logits = m(torch.tensor([IDS])).logits[0]
        layers = [
            dict(heads=layer_heads(m, i), mlp_width=layer_width(m, i)) for i in range(config["num_hidden_layers"])
        ]
        print(f"{name}: {type(m).__name__}, layers {layers}")
        return dict(
            name=name, model=model, flags=flags, transformers_class=type(m).__name__, layers=layers,
            # The first COLUMNS logits of each position (GPT-NeoX's vocabulary is 50k) and the argmax.
            logits=[[float(f"{v:.7g}") for v in row[:COLUMNS]] for row in logits.tolist()],
            argmax=logits.argmax(-1).tolist(),
        )


def layer_heads(m, i):
    if hasattr(m, "gpt_neox"):
        attn = m.gpt_neox.layers[i].attention
        return attn.query_key_value.out_features // (3 * attn.head_size)
    attn = m.model.layers[i].self_attn
    return attn.q_proj.out_features // attn.head_dim


def layer_width(m, i):
    if hasattr(m, "gpt_neox"):
        return m.gpt_neox.layers[i].mlp.dense_h_to_4h.out_features
    return m.model.layers[i].mlp.up_proj.out_features


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pare", type=Path, required=True, help="the pare binary that writes the exports")
    args = ap.parse_args()
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    fixture = dict(
        script="tools/reference/make_export_fixtures.py",
        command="tools/reference/.venv/bin/python tools/reference/make_export_fixtures.py --pare PARE",
        transformers=transformers.__version__, torch=torch.__version__, date=datetime.date.today().isoformat(),
        dtype="float32", attn_implementation="eager", ids=IDS, columns=COLUMNS,
        cases=[run_case(args.pare.resolve(), *c) for c in CASES],
    )
    (OUT / "remote_code.json").write_text(json.dumps(fixture, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    sys.exit(main())
