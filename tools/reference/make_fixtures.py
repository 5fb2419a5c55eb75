"""Write HF transformers reference fixtures for pare under tests/fixtures/<model>/.

    tools/reference/.venv/bin/python tools/reference/make_fixtures.py --all
    tools/reference/.venv/bin/python tools/reference/make_fixtures.py llama-tiny mistral-tiny

Every model runs in float32 with attn_implementation="eager". Files per model
(see tools/reference/README.md for their exact schemas):
  tokenize.json   tokenizer(text).input_ids for varied texts   (tokenizer models)
  chat.json       chat template rendering and its ids          (GGUF models)
  logits.json     top-20 log-softmax of the last position
  all_logits.json full log-softmax at every position           (vocab-256 models)
  greedy.json     32 greedy tokens, EOS never stops generation
  batch.json      left-padded batch: last-position top-20 and 16 greedy tokens
  ppl.json        sliding-window perplexity on assets/texts/wiki.utf8 (tokenizer models)
  meta.json       how the files were made
"""

import argparse
import datetime
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
FIXTURES = ROOT / "tests" / "fixtures"
WIKI = "assets/texts/wiki.utf8"

TOP_K = 20
GREEDY_TOKENS = 32
BATCH_GREEDY_TOKENS = 16
ALL_LOGITS_LEN = 40
DIGITS = 6  # decimals kept for log-probabilities

# name -> how to load it and what to generate for it
MODELS = {
    "smollm2": dict(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", ppl=(4096, [(512, 512), (512, 256)])),
    "qwen2": dict(gguf="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", ppl=(2048, [(512, 512), (512, 256)])),
    "gptneox-tiny": dict(dir="tests/fixtures/gptneox-tiny/model", ppl=(1024, [(128, 128), (128, 64)])),
    "llama-tiny": dict(dir="tests/fixtures/llama-tiny/model", seed=12),
    # The sliding window is 16: random prompts are 16 tokens longer so that it matters.
    "mistral-tiny": dict(dir="tests/fixtures/mistral-tiny/model", seed=13, len_offset=16),
    "qwen2-tiny": dict(dir="tests/fixtures/qwen2-tiny/model", seed=14),
}


def wiki_text():
    return (ROOT / WIKI).read_text(encoding="utf-8")


def tokenize_texts():
    long_line = " ".join(wiki_text()[:1500].split())
    return [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "   leading and trailing spaces   ",
        "whitespace    runs\tand\t\ttabs  \t end",
        "line one\nline two\r\nline three\n",
        "\n\n\n",
        "1234567 3.14159 -42 1,000,000 2024-01-31",
        "    10, 20\n\t42 x\u00b2 5 km\u00b2",
        "don't, I'll, we're, they've, she'd, it's; DON'T YOU'LL",
        "def greet(name):\n    if name:\n        return f\"Hello, {name}!\"\n    return None\n",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}",
        "Café, naïve, über, Straße, façade, e\u0301 (combining)",
        "你好世界",
        "日本語のテキストです。カタカナとひらがな。",
        "👍🏽 emoji 🎉 and a family 👨‍👩‍👧",
        "مرحبا بالعالم",
        "<|im_start|>user\nhi<|im_end|>",
        "<|endoftext|>",
        "text<|endoftext|>more text",
        " ",
        "",
        "x=1+2*3; y==z != w >= 10% && a->b :: c ... !!!",
        long_line,
    ]


CHAT_CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one?"},
    ],
]

TEXT_GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
TEXT_BATCH_PROMPTS = [
    "Hi",
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea, there lived",
]


# ---------------------------------------------------------------- loading


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(spec):
    """(model, tokenizer or None, description of the files for meta.json)."""
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if "gguf" in spec:
        path = (ASSETS / spec["gguf"]).resolve()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        files = [dict(path=f"assets/{spec['gguf']}", sha256=sha256(path))]
    else:
        path = ROOT / spec["dir"]
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
        files = [dict(path=str(p.relative_to(ROOT)), sha256=sha256(p)) for p in sorted(path.iterdir())]
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    return model.eval(), tokenizer, files


# ---------------------------------------------------------------- model calls


def log_probs(model, ids, attention_mask=None, position_ids=None):
    """float32 log-softmax over the vocabulary for every position: [batch, seq, vocab]."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return torch.log_softmax(logits.float(), dim=-1)


def top(logprobs_row):
    values, indices = torch.topk(logprobs_row, TOP_K)
    return [dict(id=int(i), logprob=round(float(v), DIGITS)) for v, i in zip(values, indices)]


def use_greedy_generation_config(model, pad_token_id):
    """Make generate() plain greedy with no EOS id, so that nothing stops it early.

    It has to replace model.generation_config: generate() fills every unset (None)
    field of the config it is given from that one, EOS included.
    """
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=pad_token_id)


def generate(model, ids, max_new_tokens, attention_mask=None):
    """HF generate (with its KV cache); returns the new ids, one list per row."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
            max_new_tokens=max_new_tokens,
        )
    new = out[:, ids.shape[1] :].tolist()
    assert all(len(row) == max_new_tokens for row in new)
    return new


def greedy_without_cache(model, ids, max_new_tokens):
    """Argmax loop re-running the whole sequence each step: cross-checks generate()."""
    seq = list(ids)
    for _ in range(max_new_tokens):
        seq.append(int(log_probs(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids) :]


# ---------------------------------------------------------------- prompts


def random_ids(gen, length):
    # 0, 1, 2 are pad/bos/eos in the id-only models: keep prompts to ordinary ids.
    return torch.randint(3, 256, (length,), generator=gen).tolist()


class Prompts:
    """Text prompts for tokenizer models, seeded random id sequences otherwise."""

    def __init__(self, spec, tokenizer):
        self.tokenizer = tokenizer
        self.gen = torch.Generator().manual_seed(spec.get("seed", 0))
        self.len_offset = spec.get("len_offset", 0)
        self.chat = tokenizer is not None and tokenizer.chat_template is not None

    def cases(self, texts, lengths):
        if self.tokenizer is None:
            return [(None, random_ids(self.gen, n + self.len_offset)) for n in lengths]
        if self.chat:
            texts = texts + [render_chat(self.tokenizer, CHAT_CASES[0])]
        return [(t, self.tokenizer(t).input_ids) for t in texts]

    def logits(self):
        texts = [
            "The capital of France is",
            "Hello",
            "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
            "Le café est très bon. 你好，世界！ Ça va? 👍",
        ]
        if self.tokenizer is not None:
            texts.append(wiki_prompt(self.tokenizer, 300))
        return self.cases(texts, [1, 5, 17, 40, 100, 257])

    def greedy(self):
        return self.cases(TEXT_GREEDY_PROMPTS, [3, 17, 40])

    def batch(self):
        return self.cases(TEXT_BATCH_PROMPTS, [3, 9, 20, 33])


def wiki_prompt(tokenizer, n_tokens):
    """The start of wiki.utf8, cut at a word boundary to at most n_tokens tokens."""
    words = wiki_text()[: 8 * n_tokens].split(" ")
    while len(tokenizer(" ".join(words)).input_ids) > n_tokens:
        words.pop()
    return " ".join(words)


def render_chat(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------- fixtures


def tokenize_fixture(tokenizer):
    return dict(cases=[dict(text=t, ids=tokenizer(t).input_ids) for t in tokenize_texts()])


def chat_fixture(tokenizer):
    cases = []
    for messages in CHAT_CASES:
        rendered = render_chat(tokenizer, messages)
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
        cases.append(dict(messages=messages, rendered=rendered, ids=ids))
    return dict(cases=cases)


def logits_fixture(model, prompts):
    cases = []
    for text, ids in prompts.logits():
        lp = log_probs(model, torch.tensor([ids]))
        cases.append(dict(prompt=text, ids=ids, top=top(lp[0, -1])))
    return dict(top_k=TOP_K, cases=cases)


def all_logits_fixture(model, prompts):
    ids = random_ids(prompts.gen, ALL_LOGITS_LEN)
    lp = log_probs(model, torch.tensor([ids]))[0]
    rows = [[round(x, DIGITS) for x in row] for row in lp.tolist()]
    return dict(ids=ids, logprobs=rows)


def greedy_fixture(model, prompts):
    cases = []
    for text, ids in prompts.greedy():
        new = generate(model, torch.tensor([ids]), GREEDY_TOKENS)[0]
        assert new == greedy_without_cache(model, ids, GREEDY_TOKENS), f"generate() vs no-cache loop: {text!r}"
        cases.append(dict(prompt=text, ids=ids, new_ids=new))
    return dict(max_new_tokens=GREEDY_TOKENS, cases=cases)


def batch_fixture(model, prompts):
    """Left-padded batch; positions as HF generate makes them: attention_mask.cumsum(-1) - 1.

    Each row is checked against the same prompt run alone.
    """
    rows = prompts.batch()
    pad = model.config.pad_token_id
    width = max(len(ids) for _, ids in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for _, r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for _, r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lp = log_probs(model, ids, attention_mask=mask, position_ids=positions)[:, -1]
    greedy = generate(model, ids, BATCH_GREEDY_TOKENS, attention_mask=mask)

    out_rows = []
    for (text, row_ids), row_lp, row_new in zip(rows, lp, greedy):
        alone = log_probs(model, torch.tensor([row_ids]))[0, -1]
        assert torch.allclose(row_lp, alone, atol=1e-4), f"padded vs alone logits differ: {text!r}"
        assert row_new == greedy_without_cache(model, row_ids, BATCH_GREEDY_TOKENS), f"padded greedy: {text!r}"
        out_rows.append(dict(prompt=text, ids=row_ids, top=top(row_lp)))
    return dict(pad_id=pad, max_new_tokens=BATCH_GREEDY_TOKENS, cases=[dict(rows=out_rows, greedy=greedy)])


def perplexity(model, ids, ctx, stride):
    """Sliding-window NLL (HF "Perplexity of fixed-length models", summed exactly).

    Windows [begin, end) with begin = 0, stride, 2*stride, ... and end = min(begin + ctx, T).
    A window scores targets prev_end..end, never its own first token; it stops at the
    window that reaches T.
    """
    total, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        first = max(prev_end, begin + 1)
        lp = log_probs(model, torch.tensor([ids[begin:end]]))[0]
        targets = torch.tensor(ids[first:end])
        picked = lp[first - 1 - begin : end - 1 - begin].gather(-1, targets[:, None])
        total -= picked.double().sum().item()
        scored += end - first
        prev_end = end
        if end == len(ids):
            break
    return total, scored


def ppl_fixture(model, tokenizer, spec):
    max_tokens, settings = spec["ppl"]
    ids = tokenizer(wiki_text()).input_ids[:max_tokens]
    assert len(ids) == max_tokens
    cases = []
    for ctx, stride in settings:
        nll, scored = perplexity(model, ids, ctx, stride)
        cases.append(
            dict(
                file=WIKI, max_tokens=max_tokens, ctx=ctx, stride=stride,
                ppl=math.exp(nll / scored), nll_sum=nll, scored_tokens=scored, tokens=len(ids),
            )
        )
    return dict(cases=cases)


def check_sliding_window(model, dir):
    """HF must really apply Mistral's window: positions < window match full attention, later ones don't."""
    full = AutoModelForCausalLM.from_pretrained(
        ROOT / dir, dtype=torch.float32, attn_implementation="eager", sliding_window=None
    ).eval()
    window = model.config.sliding_window
    ids = torch.randint(3, 256, (1, 3 * window), generator=torch.Generator().manual_seed(0))
    a, b = log_probs(model, ids)[0], log_probs(full, ids)[0]
    assert torch.allclose(a[:window], b[:window], atol=1e-5)
    assert not torch.allclose(a[window:], b[window:], atol=1e-3)


# ---------------------------------------------------------------- output


def to_json(obj, indent=0):
    """JSON with flat lists and flat objects on one line; nested ones (and long lists of strings)
    one item per line."""

    def flat(o):
        if isinstance(o, list):
            if any(isinstance(x, str) for x in o) and len(json.dumps(o, ensure_ascii=False)) > 120:
                return False
            return all(not isinstance(x, (list, dict)) for x in o)
        if isinstance(o, dict):
            return all(not isinstance(v, dict) and (not isinstance(v, list) or flat(v)) for v in o.values())
        return True

    if flat(obj):
        return json.dumps(obj, ensure_ascii=False)
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, list):
        items = [inner + to_json(x, indent + 1) for x in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    items = [f"{inner}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"


def write(out_dir, name, obj):
    path = out_dir / name
    path.write_text(to_json(obj) + "\n", encoding="utf-8")
    print(f"  {path.relative_to(ROOT)} ({path.stat().st_size / 1e3:.1f} kB)")


def tokenizer_meta(tokenizer):
    if tokenizer is None:
        return None
    pre = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]
    return dict(
        cls=type(tokenizer).__name__,
        size=len(tokenizer),
        bos=[tokenizer.bos_token, tokenizer.bos_token_id],
        eos=[tokenizer.eos_token, tokenizer.eos_token_id],
        pad=[tokenizer.pad_token, tokenizer.pad_token_id],
        adds_bos=tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id],
        pre_tokenizer=pre,
    )


def make(name):
    spec = MODELS[name]
    out_dir = FIXTURES / name
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{name}:")
    model, tokenizer, files = load(spec)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    use_greedy_generation_config(model, model.config.pad_token_id)
    if getattr(model.config, "sliding_window", None):
        check_sliding_window(model, spec["dir"])
    prompts = Prompts(spec, tokenizer)

    if tokenizer is not None:
        write(out_dir, "tokenize.json", tokenize_fixture(tokenizer))
    if tokenizer is not None and tokenizer.chat_template:
        write(out_dir, "chat.json", chat_fixture(tokenizer))
    write(out_dir, "logits.json", logits_fixture(model, prompts))
    if model.config.vocab_size <= 256:
        write(out_dir, "all_logits.json", all_logits_fixture(model, prompts))
    write(out_dir, "greedy.json", greedy_fixture(model, prompts))
    write(out_dir, "batch.json", batch_fixture(model, prompts))
    if "ppl" in spec:
        write(out_dir, "ppl.json", ppl_fixture(model, tokenizer, spec))

    meta = dict(
        script="tools/reference/make_fixtures.py",
        command="tools/reference/.venv/bin/python " + " ".join(["tools/reference/make_fixtures.py", *sys.argv[1:]]),
        transformers=transformers.__version__,
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        model_files=files,
        model_class=type(model).__name__,
        dtype="float32",
        attn_implementation="eager",
        pad_token_id=model.config.pad_token_id,
        tokenizer=tokenizer_meta(tokenizer),
        notes=NOTES.get(name, []) + COMMON_NOTES,
    )
    write(out_dir, "meta.json", meta)


COMMON_NOTES = [
    "logprobs: float32 log_softmax of the logits, rounded to 6 decimals.",
    "greedy/batch: HF generate(do_sample=False) with eos_token_id=None, so EOS never stops generation; "
    "each result is also checked against a no-KV-cache argmax loop.",
    "batch: rows left-padded with pad_token_id, attention_mask 0 on pads, position_ids = "
    "attention_mask.cumsum(-1) - 1 (a row's first real token is at position 0; pads are never attended to, "
    "so their positions do not matter); each row is checked against the prompt run alone.",
]

NOTES = {
    "smollm2": [
        "Tokenizer built by HF from the GGUF (tokenizer.ggml.pre = 'smollm'): HF maps no split regex to "
        "'smollm', so it pre-tokenizes with plain GPT-2 ByteLevel (its regex). SmolLM2's own tokenizer.json "
        "and llama.cpp split every \\p{N} digit off first. The vocabulary has no multi-digit tokens, so ids "
        "mostly agree, but not always (tokens in byte-level spelling): HF gives ['ĠĠĠ', 'Ġ', '1'] "
        "for '    1' where llama.cpp gives ['ĠĠĠĠ', '1'], and ['ĠÂ', '²'] for ' ²' "
        "where llama.cpp gives ['Ġ', 'Â²']; see the '    10, 20' tokenize case. "
        "No BOS is added (tokenizer.ggml.add_bos_token = false).",
    ],
    "qwen2": ["Tokenizer built by HF from the GGUF (tokenizer.ggml.pre = 'qwen2'): Qwen2 split regex + ByteLevel."],
    "gptneox-tiny": ["Weights stored as float16 (2 shards); loaded and run in float32."],
    "mistral-tiny": [
        "sliding_window=16: query i attends to keys j with i - 16 < j <= i (checked to differ from full attention).",
    ],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", metavar="MODEL", help=", ".join(MODELS))
    ap.add_argument("--all", action="store_true", help="every model")
    args = ap.parse_args()
    names = list(MODELS) if args.all else args.models
    if not names or set(names) - set(MODELS):
        ap.error(f"name models among {', '.join(MODELS)}, or pass --all")
    for name in names:
        make(name)


if __name__ == "__main__":
    main()
