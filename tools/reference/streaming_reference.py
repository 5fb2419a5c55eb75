"""StreamingLLM perplexity reference (seed 001's hook semantics) for pare: tests/fixtures/presses/streaming_ppl*.json.

    tools/reference/.venv/bin/python tools/reference/streaming_reference.py

SmolLM2-135M-Instruct (assets/SmolLM2-135M-Instruct.Q4_1.gguf, dequantised by HF, float32, eager attention)
reads the first N_TOKENS tokens of assets/texts/wiki.utf8 (tokenizer(text).input_ids, no BOS: make_fixtures.py
conventions) one token per forward, from the first token, with an HF DynamicCache. Before each forward, every
layer whose cache holds more than max_capacity entries is cut to its n_sink oldest and (max_capacity - n_sink)
newest entries (cache.layers[i].keys / .values), as seed 001's pre-forward hook on every attention layer does.
The new token is then appended by the forward itself, so once the cache is full attention sees max_capacity + 1
keys. Token t's NLL comes from the logits of the step that read token t - 1; tokens 1..N-1 are scored and
ppl = exp(mean NLL) (NLLs summed in float64).

Positions (position_ids passed explicitly):
  - default (seed 001): cached keys keep the RoPE of their original positions; token t is fed at position t.
    Query t therefore sees exactly keys j < n_sink or t - (max_capacity - n_sink) <= j <= t; the script checks
    this against one full forward with that 4-D mask.
  - rerotate (StreamingLLM paper / kvpress KeyRerotationPress / HF's old SinkCache): after each cut the kept keys
    are re-rotated by RoPE(new index - old position) so the cache holds positions 0..C-1, and the new token is
    fed at position = number of entries in the cache after the cut.

Files:
  streaming_ppl.json           n_sink 4, max_capacity 64
  streaming_ppl_c128.json      n_sink 4, max_capacity 128
  streaming_ppl_rerotate.json  n_sink 4, max_capacity 64, rerotate
each also carrying ppl_full / nll_full: the same token-by-token loop with no cut (checked against one forward).
"""

import datetime
import math
import sys
from pathlib import Path

import torch

torch.set_num_threads(2)

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import rotate_half  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import sha256, to_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "assets/texts/wiki.utf8"
OUT = ROOT / "tests" / "fixtures" / "presses"
N_TOKENS = 400
N_SINK = 4
DIGITS = 6

RUNS = [
    ("streaming_ppl.json", dict(max_capacity=64, rerotate=False)),
    ("streaming_ppl_c128.json", dict(max_capacity=128, rerotate=False)),
    ("streaming_ppl_rerotate.json", dict(max_capacity=64, rerotate=True)),
]


def load():
    path = ROOT / "assets" / GGUF
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert model.model.rotary_emb.attention_scaling == 1.0
    return model, tokenizer


def rerotate(keys, inv_freq, delta):
    """Rotate cached (post-RoPE) keys [b, h, n, d] by RoPE angle delta[n] * inv_freq (kvpress KeyRerotationPress)."""
    freqs = delta.float()[:, None] * inv_freq.float()[None, :]  # [n, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return keys * emb.cos() + rotate_half(keys) * emb.sin()


def stream(model, ids, n_sink, max_capacity, rerotate_keys=False):
    """Per-token NLLs (float64 list, tokens 1..N-1) and the number of cuts made (per layer)."""
    inv_freq = model.model.rotary_emb.inv_freq
    cache = DynamicCache()
    nll, cuts, prev = [], 0, None
    with torch.no_grad():
        for t, tok in enumerate(ids):
            length = cache.get_seq_length()
            if length > max_capacity:
                keep = list(range(n_sink)) + list(range(length - (max_capacity - n_sink), length))
                index = torch.tensor(keep)
                for layer in cache.layers:
                    assert layer.keys.shape[2] == length
                    layer.keys = layer.keys[:, :, index].contiguous()
                    layer.values = layer.values[:, :, index].contiguous()
                    if rerotate_keys:
                        # cache index == position in this mode; new index = arange
                        layer.keys = rerotate(layer.keys, inv_freq, torch.arange(len(keep)) - index)
                cuts += 1
            position = cache.get_seq_length() if rerotate_keys else t
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, position_ids=torch.tensor([[position]]))
            if prev is not None:
                nll.append(-float(torch.log_softmax(prev.float(), dim=-1)[tok]))
            prev = out.logits[0, -1]
    return nll, cuts


def masked_forward_nll(model, ids, n_sink=None, max_capacity=None):
    """NLLs from one forward over all tokens (positions 0..N-1), causal, optionally with StreamingLLM's mask."""
    n = len(ids)
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    allowed = k <= q
    if max_capacity is not None:
        allowed &= (k < n_sink) | (k >= q - (max_capacity - n_sink))
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [-float(lp[t - 1, ids[t]]) for t in range(1, n)]


def ppl(nll):
    return math.exp(math.fsum(nll) / len(nll))


def check_rerotate(model):
    """Rotating a key fed at position p by delta equals feeding it at p + delta."""
    rot = model.model.rotary_emb
    x = torch.randn(1, 3, 5, model.config.head_dim, generator=torch.Generator().manual_seed(0))
    p = torch.tensor([[7, 100, 250, 399, 64]])
    delta = torch.tensor([-3, -36, -186, -335, 0])
    cos, sin = rot(x, p)
    cos2, sin2 = rot(x, p + delta)
    at_p = x * cos[:, None] + rotate_half(x) * sin[:, None]
    at_new = x * cos2[:, None] + rotate_half(x) * sin2[:, None]
    assert torch.allclose(rerotate(at_p, rot.inv_freq, delta), at_new, atol=1e-4)


def main():
    model, tokenizer = load()
    check_rerotate(model)
    ids = tokenizer((ROOT / WIKI).read_text(encoding="utf-8")).input_ids[:N_TOKENS]
    assert len(ids) == N_TOKENS and ids[0] != tokenizer.bos_token_id

    full, _ = stream(model, ids, N_SINK, max_capacity=10**9)
    one = masked_forward_nll(model, ids)
    err = max(abs(a - b) for a, b in zip(full, one))
    print(f"full: ppl {ppl(full):.6f}; token-by-token vs one forward: max |dNLL| {err:.2e}")
    assert err < 1e-4

    made_by = (
        f"tools/reference/streaming_reference.py; transformers {transformers.__version__}, torch {torch.__version__}; "
        f"assets/{GGUF} (sha256 {sha256(ROOT / 'assets' / GGUF)[:16]}) dequantised by HF, float32, eager attention; "
        f"{datetime.date.today().isoformat()}"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for file, run in RUNS:
        c, rot = run["max_capacity"], run["rerotate"]
        nll, cuts = stream(model, ids, N_SINK, c, rot)
        if not rot:
            masked = masked_forward_nll(model, ids, N_SINK, c)
            err = max(abs(a - b) for a, b in zip(nll, masked))
            assert err < 1e-4, err
            check = f"equal to one forward with the StreamingLLM mask (max |dNLL| {err:.1e})"
        else:
            plain = results[("streaming_ppl.json")]
            # identical until the first cut (token C + 1 is the first read after one)
            err = max(abs(a - b) for a, b in zip(nll[:c], plain[:c]))
            assert err < 1e-5, err
            check = f"equal to the non-rerotated run before the first cut (max |dNLL| {err:.1e})"
        results[file] = nll
        fixture = dict(
            made_by=made_by,
            text=WIKI,
            ids=ids,
            n_tokens=N_TOKENS,
            n_scored=len(nll),
            n_sink=N_SINK,
            max_capacity=c,
            rerotate=rot,
            positions=(
                "after each cut the kept keys are re-rotated to positions 0..C-1 (RoPE by new index - old position); "
                "the new token is fed at position = entries in the cache after the cut"
                if rot
                else "keys keep their original RoPE positions; token t is fed at position t"
            ),
            rule="before each forward, each layer holding more than max_capacity entries keeps its n_sink oldest and "
            "(max_capacity - n_sink) newest; the forward then appends the new token",
            cuts=cuts,
            ppl=ppl(nll),
            ppl_full=ppl(full),
            nll=[round(x, DIGITS) for x in nll],
            nll_full=[round(x, DIGITS) for x in full],
            notes=[
                "nll[i] is token i+1's NLL from the logits of the step that read token i; ppl = exp(mean nll), "
                "summed in float64 before rounding.",
                "Checked: " + check + "; the full run equals one causal forward.",
            ],
        )
        path = OUT / file
        path.write_text(to_json(fixture) + "\n", encoding="utf-8")
        print(f"  {path.relative_to(ROOT)}: ppl {fixture['ppl']:.6f} (full {fixture['ppl_full']:.6f}), {cuts} cuts; {check}")


if __name__ == "__main__":
    main()
