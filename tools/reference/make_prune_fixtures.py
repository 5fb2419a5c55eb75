"""Write the structured-pruning reference fixtures under tests/fixtures/prune/.

    tools/reference/.venv/bin/python tools/reference/make_prune_fixtures.py [--pare target/release/pare]

- llama-gqa-tiny/model/: a tiny random LlamaForCausalLM with 8 query heads over 2 KV heads
  (head_dim 8, 4 layers, MLP 128, vocab 256, default RoPE), seeded like make_tiny_models.py.
- tiny.json: calibration ids, and for each configuration (importance × gqa mode × reduction) the
  unit scores and the kept heads / channels of prune_reference.py (LLM-Pruner-equivalent torch);
  an HF export case: the logits transformers gives for the uniformly pruned model.
- smollm2.json: the same for SmolLM2-135M (GGUF, dequantized by HF): calibration ids cut from
  assets/texts/c4.utf8 (10 × 64, LLM-Pruner's size), Taylor and L2 scores of a few layers, kept
  indices of every layer, and an HF export case with top-20 logprobs and a perplexity.
- meta.json: versions, date, commands, notes.

With --pare BIN, the export cases are also run through `pare prune --out DIR --gguf`, and the
script asserts that transformers loads DIR (and DIR/model.gguf) and gives the reference logits.
"""

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_models as tiny  # noqa: E402
import prune_reference as ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "prune"
SMOL = ROOT / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_DIR = OUT / "llama-gqa-tiny" / "model"
METHODS = ["l1", "l2", "param_first", "vectorize", "param_second", "param_mix", "wanda-sp"]


def r9(x):
    return float(f"{x:.9g}")


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def importance_of(method):
    if method in ("l1", "l2", "wanda-sp"):
        return dict(importance=method, taylor=None)
    return dict(importance="taylor", taylor=method)


def case(model, method, reduction, gqa, ratio, attn_layers, mlp_layers, samples, score_layers=None):
    s, loss = ref.scores(model, method, reduction, gqa, list(range(*attn_layers)), list(range(*mlp_layers)), samples)
    kept = ref.plan(model, s, gqa, ratio)
    keep_scores = lambda d: {str(l): [r9(v) for v in t.tolist()] for l, t in d.items() if score_layers is None or l in score_layers}
    layers = []
    for l in sorted(kept):
        entry = {"layer": l}
        if "attn" in kept[l]:
            entry["kept_heads"], entry["kept_kv_heads"] = kept[l]["attn"]
        if "mlp" in kept[l]:
            width = model.model.layers[l].mlp.gate_proj.out_features
            entry["removed_channels"] = sorted(set(range(width)) - set(kept[l]["mlp"]))
        layers.append(entry)
    return dict(
        **importance_of(method), reduction=reduction, gqa=gqa, ratio=ratio, attn_layers=list(attn_layers),
        mlp_layers=list(mlp_layers), calibration_loss=loss,
        scores=dict(attn=keep_scores(s["attn"]), mlp=keep_scores(s["mlp"])), layers=layers,
    )


def make_tiny_model():
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=4, intermediate_size=128, tie_word_embeddings=False, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        initializer_range=0.2, **tiny.ID_ONLY_SPECIAL,
    )
    model = tiny.build(config, seed=21)
    out = tiny.save(model, "prune/llama-gqa-tiny")
    assert out == TINY_DIR
    return out


def pare_export(pare, model_path, flags, out):
    cmd = [str(pare), "prune", "--model", str(model_path), *flags, "--out", str(out), "--gguf", "--gguf-dtype", "f32", "--json"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return " ".join(cmd[1:])


def check_export(pare, model_path, flags, ids, reference_logits, gguf_ok=True):
    """transformers loads pare's export (directory and GGUF) and gives the reference logits."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        command = pare_export(pare, model_path, flags, out)
        checked = {"command": "pare " + command.replace(str(out), "OUT")}
        for name, kw in (("hf_dir", {}), ("gguf", {"gguf_file": "model.gguf"})):
            if name == "gguf" and not gguf_ok:
                continue
            m = load(out, **kw)
            with torch.no_grad():
                got = m(torch.tensor([ids])).logits[0]
            delta = (got - reference_logits).abs().max().item()
            assert delta < 2e-4, f"{name}: transformers on pare's export differs by {delta}"
            checked[name + "_max_abs_logit_diff"] = delta
        return checked


def tiny_fixture(pare):
    make_tiny_model()
    model = load(TINY_DIR)
    gen = torch.Generator().manual_seed(5)
    samples = torch.randint(3, 256, (4, 16), generator=gen).tolist()
    cases = []
    for gqa in ("kv-groups", "query-heads"):
        for method in METHODS:
            cases.append(case(model, method, "sum", gqa, 0.5, (0, 4), (1, 3), samples))
    for method in ("l2", "param_first"):
        for reduction in ("mean", "max"):
            cases.append(case(model, method, reduction, "kv-groups", 0.5, (0, 4), (1, 3), samples))

    # Export: a uniform result (every layer pruned alike) that transformers can load.
    exp = case(model, "l2", "sum", "query-heads", 0.5, (0, 4), (0, 4), samples)
    pruned = ref.apply(load(TINY_DIR), {e["layer"]: {"attn": (e["kept_heads"], e["kept_kv_heads"]), "mlp": sorted(set(range(128)) - set(e["removed_channels"]))} for e in exp["layers"]})
    ids = torch.randint(3, 256, (24,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.no_grad():
        logits = pruned(torch.tensor([ids])).logits[0]
    export = dict(config={k: exp[k] for k in ("importance", "reduction", "gqa", "ratio", "attn_layers", "mlp_layers")}, ids=ids,
                  logits=[[round(v, 6) for v in row] for row in logits.tolist()])
    if pare:
        flags = ["--importance", "l2", "--gqa", "query-heads", "--ratio", "0.5", "--attn-layers", "0..4", "--mlp-layers", "0..4"]
        export["checked_with_pare"] = check_export(pare, TINY_DIR, flags, ids, logits)
    return dict(model="tests/fixtures/prune/llama-gqa-tiny/model", calibration_ids=samples, cases=cases, export=export)


def smollm2_fixture(pare):
    model = load(SMOL.parent, gguf_file=SMOL.name)
    tok = AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    c4 = tok((ROOT / "assets/texts/c4.utf8").read_text(encoding="utf-8")).input_ids
    samples = [c4[i * 64 : (i + 1) * 64] for i in range(10)]
    show = {3, 16, 29}
    cases = [
        # The seed's configuration: Taylor param_first, sum, layers 3..30, ratio 0.25.
        case(model, "param_first", "sum", "kv-groups", 0.25, (3, 30), (3, 30), samples, show),
        case(model, "param_first", "sum", "query-heads", 0.34, (3, 30), (0, 0), samples, show),
        case(model, "l2", "sum", "kv-groups", 0.34, (3, 30), (3, 30), samples, show),
    ]
    exp = case(model, "l2", "sum", "query-heads", 0.34, (0, 30), (0, 30), samples, set())
    width = model.config.intermediate_size
    kept = {e["layer"]: {"attn": (e["kept_heads"], e["kept_kv_heads"]), "mlp": sorted(set(range(width)) - set(e["removed_channels"]))} for e in exp["layers"]}
    pruned = ref.apply(load(SMOL.parent, gguf_file=SMOL.name), kept)
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = tok(prompt).input_ids
    with torch.no_grad():
        logits = pruned(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits, -1)
    top = [[{"id": i, "logprob": round(v, 6)} for v, i in zip(*[t.tolist() for t in row.topk(20)])] for row in lp[-4:]]
    wiki = tok((ROOT / "assets/texts/wiki.utf8").read_text(encoding="utf-8")).input_ids[:1024]
    export = dict(
        config={k: exp[k] for k in ("importance", "reduction", "gqa", "ratio", "attn_layers", "mlp_layers")},
        prompt=prompt, ids=ids, last_positions_top20=top,
        ppl=dict(file="assets/texts/wiki.utf8", tokens=1024, ctx=512, stride=512, ppl=ref.perplexity(pruned, wiki, 512)),
    )
    if pare:
        flags = ["--importance", "l2", "--gqa", "query-heads", "--ratio", "0.34", "--attn-layers", "0..30", "--mlp-layers", "0..30"]
        export["checked_with_pare"] = check_export(pare, SMOL, flags, ids, logits)
    return dict(model="assets/SmolLM2-135M-Instruct.Q4_1.gguf", calibration=dict(file="assets/texts/c4.utf8", samples=10, tokens=64),
                calibration_ids=samples, cases=cases, export=export)


def write(name, obj):
    text = json.dumps(obj, separators=(",", ":"))
    (OUT / name).write_text(text + "\n")
    print(f"{name}: {len(text) / 1e3:.0f} kB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pare", type=Path, help="a pare binary: also check that transformers loads its exports")
    ap.add_argument("--only", choices=["tiny", "smollm2"])
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.only in (None, "tiny"):
        write("tiny.json", tiny_fixture(args.pare))
    if args.only in (None, "smollm2"):
        write("smollm2.json", smollm2_fixture(args.pare))
    meta = dict(
        script="tools/reference/make_prune_fixtures.py",
        command="tools/reference/.venv/bin/python " + " ".join(["tools/reference/make_prune_fixtures.py", *sys.argv[1:]]),
        transformers=transformers.__version__, torch=torch.__version__, date=datetime.date.today().isoformat(),
        dtype="float32", attn_implementation="eager",
        notes=[
            "Algorithm: tools/reference/prune_reference.py (LLM-Pruner-equivalent, explicit coupled groups).",
            "Scores: unit scores (KV heads under kv-groups, query heads under query-heads, MLP channels), 9 significant digits.",
            "Taylor gradients: one backward of the mean loss over the batch (g) and per-sample squared gradients (F).",
            "Counts: C - int(C * (1 - ratio)) root channels, in whole units; lowest scores removed (stable on ties).",
            "layers[].removed_channels: MLP channels removed; kept_heads / kept_kv_heads: attention heads kept.",
            "smollm2 calibration: tokenizer(c4.utf8).input_ids cut into 10 consecutive samples of 64 tokens.",
            "export.checked_with_pare: transformers loaded pare's export (HF dir and GGUF) and matched the reference logits.",
        ],
    )
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
