"""Write kvpress reference fixtures for pare's KV-cache presses: tests/fixtures/presses/<name>_r<ratio>.json.

    tools/reference/.venv/bin/pip install --no-deps kvpress==0.5.5     # once
    tools/reference/.venv/bin/python tools/reference/make_press_fixtures.py [NAME...]

Runs NVIDIA kvpress's own press classes on SmolLM2-135M-Instruct (assets/SmolLM2-135M-Instruct.Q4_1.gguf,
dequantised by HF, float32) over the first PROMPT_TOKENS tokens of assets/texts/wiki.utf8, batch 1:

    with press(model): model(input_ids, past_key_values=DynamicCache(), cache_position=arange(T))

and reads back what kvpress kept. Each press's `score` is wrapped to capture its raw scores
(batch, kv_heads, T) per layer; the kept set is recomputed from them the way kvpress selects
(ScorerPress: per-head topk of int(T * (1 - ratio)); PyramidKV: its per-layer budget; AdaKV: its
global selection with alpha_safeguard; ChunkKV: its chunk selection) and checked against what
kvpress left behind: the rows of the compressed cache (keys and values, matched exactly to rows of
the uncompressed ones) or, for AdaKV, each attention module's masked_key_indices.

kvpress 0.5.5 pins transformers < 5.3 and reads kwargs["cache_position"] in its forward hook;
transformers 5.x no longer passes cache_position, so the prefill passes it explicitly
(torch.arange(T)); it reaches the hook through the attention kwargs and nothing else reads it.
kvpress's optional dependencies that are not in the venv (cachetools, datasets, fire: used only by
presses not run here) are stubbed before the import.

KVzipPress (kvzip*) runs its own replay after the prefill and masks what it evicts; its fixtures
prefill the chat template's user prefix followed by the wiki tokens (PROMPT_TOKENS in all), as
kvpress's pipeline gives it a templated context, and record each chunk's replay ids, the raw
scores (before the sinks' padding) and the kept sets read back from masked_key_indices.

CompactorPress's LeverageScorePress draws a Gaussian sketch with torch.randn on every call; its fixtures replace that
one call by pare's seeded draw (seeded_sketch: SplitMix64, Box-Muller), so pare's scores can be compared exactly.

For knorm, snapkv and expected_attention at ratio 0.5 the fixture also records a 16-token greedy
continuation the way kvpress's pipeline decodes (generate_answer): no compression while decoding,
the i-th generated token fed at position T + i (explicit position_ids; the cache holds fewer entries).
"""

import argparse
import contextlib
import datetime
import math
import sys
import types
from pathlib import Path

import torch

torch.set_num_threads(2)


def _stub_missing(name, **attrs):
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def _unavailable(*args, **kwargs):
    raise RuntimeError("stubbed: not installed in the reference venv")


# kvpress/__init__ imports every press; these three are only used by presses not run here.
_stub_missing("cachetools", LRUCache=lambda *a, **k: None, cached=lambda *a, **k: (lambda f: f))
_stub_missing("datasets", load_dataset=_unavailable)
_stub_missing("fire", Fire=_unavailable)

import kvpress  # noqa: E402
import transformers  # noqa: E402
from importlib.metadata import version  # noqa: E402
from kvpress import (  # noqa: E402
    AdaKVPress,
    BlockPress,
    ComposedPress,
    ChunkKVPress,
    CompactorPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    CURPress,
    ExpectedAttentionPress,
    FinchPress,
    KeyDiffPress,
    KnormPress,
    KVzipPress,
    LagKVPress,
    ObservedAttentionPress,
    PyramidKVPress,
    ScorerPress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import sha256, to_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "assets/texts/wiki.utf8"
OUT = ROOT / "tests" / "fixtures" / "presses"

PROMPT_TOKENS = 300
SAMPLE_LAYER, SAMPLE_HEAD = 5, 1
GREEDY_TOKENS = 16
GREEDY_STEP = 8
TOP = 5
DIGITS = 6  # decimals of log-probabilities
NEAR_TOL = 1e-4  # relative: scores this close to the kept/dropped boundary are listed in near_boundary

SNAP = dict(window_size=64, kernel_size=5)
EXPECTED = dict(n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0.0)

# name -> (kind, inner press name or None, params, ratios, attention implementation, greedy?)
# kind: "scorer" (ScorerPress.compress), "pyramid", "adakv", "critical_adakv", "chunkkv", "block"
INNER = {
    "knorm": (KnormPress, {}),
    "keydiff": (KeyDiffPress, {}),
    "cur": (CURPress, dict(num_sinks=4, local_window_size=16)),
    "lagkv": (LagKVPress, dict(n_sink=4, lag_size=128)),
    "snapkv": (SnapKVPress, SNAP),
    "tova": (TOVAPress, {}),
    "observed_attention": (ObservedAttentionPress, {}),
    "expected_attention": (ExpectedAttentionPress, EXPECTED),
    "streaming_llm": (StreamingLLMPress, dict(n_sink=4)),
    "pyramidkv": (PyramidKVPress, dict(SNAP, beta=20)),
    # FinchPress takes its window from a delimiter token (embed hook); here delimiter_token_id is an id absent from
    # the prompt, so the hook leaves window_size as set: the last 32 prompt tokens. rerotate_keys=False leaves the kept
    # keys as they were, so the cache rows show which entries were kept (re-rotation moves positions only).
    "finch": (FinchPress, dict(window_size=32, rerotate_keys=False)),
    # Chunks of 100: the last one (entries 200..299) keeps 50, more than the 32 tied window entries it holds.
    "finch_chunked": (FinchPress, dict(window_size=32, rerotate_keys=False, chunk_length=100)),
    # The Gaussian sketch is pare's seeded one (seeded_sketch below), so the scores can be compared.
    "compactor": (CompactorPress, dict(sink_size_start=8, sink_size_end=4, chunk_size=256, sketch_dimension=48)),
    "critical_knorm": (lambda compression_ratio: CriticalKVPress(KnormPress(compression_ratio)), {}),
    "critical_snapkv": (lambda compression_ratio: CriticalKVPress(SnapKVPress(compression_ratio, **SNAP)), {}),
}
CASES = {
    "knorm": dict(kind="scorer", ratios=[0.5, 0.25], greedy=True),
    "keydiff": dict(kind="scorer", ratios=[0.5, 0.25]),
    "cur": dict(kind="scorer", ratios=[0.5, 0.25]),
    # At 0.5 the 300-token prompt keeps fewer entries than the sinks and the unscored last partition
    # (4 + 168, all scored 1): which of them survive is a tie, so only 0.25 is a test.
    "lagkv": dict(kind="scorer", ratios=[0.25]),
    "snapkv": dict(kind="scorer", ratios=[0.5, 0.25], greedy=True),
    "tova": dict(kind="scorer", ratios=[0.5]),
    # ObservedAttentionPress needs the attention weights: eager attention.
    "observed_attention": dict(kind="scorer", ratios=[0.5], attn="eager"),
    "expected_attention": dict(kind="scorer", ratios=[0.5, 0.25], greedy=True),
    "streaming_llm": dict(kind="scorer", ratios=[0.5]),
    # blending defaults to the ratio: the two ratios weigh the leverage scores differently. The 288 scored entries
    # (300 less 8 + 4 sinks) make one full chunk of 256 and one padded one.
    "compactor": dict(kind="scorer", ratios=[0.5, 0.25]),
    "pyramidkv": dict(kind="pyramid", ratios=[0.5]),
    "finch": dict(kind="scorer", ratios=[0.5, 0.25]),
    "finch_chunked": dict(kind="finch_chunked", ratios=[0.5]),
    # CriticalKVPress is a ScorerPress: its score is the wrapped score reweighted (epsilon 1e-4,
    # first_stage_ratio 0.5), then each head keeps its top entries.
    "critical_knorm": dict(kind="scorer", ratios=[0.5]),
    "critical_snapkv": dict(kind="scorer", ratios=[0.5, 0.25]),
    "adakv_snapkv": dict(kind="adakv", inner="snapkv", params=dict(alpha_safeguard=0.2), ratios=[0.5]),
    "adakv_expected_attention": dict(
        kind="adakv", inner="expected_attention", params=dict(alpha_safeguard=0.2), ratios=[0.5]
    ),
    "critical_adakv_snapkv": dict(
        kind="critical_adakv", inner="snapkv", params=dict(alpha_safeguard=0.2, first_stage_ratio=0.5), ratios=[0.5]
    ),
    "chunkkv_knorm": dict(kind="chunkkv", inner="knorm", params=dict(chunk_length=20), ratios=[0.5]),
    "chunkkv_snapkv": dict(kind="chunkkv", inner="snapkv", params=dict(chunk_length=20), ratios=[0.5]),
    # BlockPress scores each head's kept entries (best first) followed by the next block: keydiff's anchor
    # depends on that subset. (An order-sensitive scorer such as CUR, whose local blocks follow the subset's
    # order, is no test: torch.topk orders exactly tied scores, which repeated tokens give at layer 0, its own way.)
    "block_keydiff": dict(kind="block", inner="keydiff", params=dict(block_size=128), ratios=[0.5, 0.25]),
    # ThinK zeroes key channels; the ratio is key_channel_compression_ratio (and, composed, SnapKV's ratio too:
    # kvpress's docstring example ComposedPress([SnapKVPress(0.5), ThinKPress(0.5)])).
    "think": dict(kind="think", params=dict(window_size=32), ratios=[0.5, 0.25]),
    "think_snapkv": dict(kind="think", inner="snapkv", params=dict(window_size=32), ratios=[0.5]),
    # DuoAttentionPress(on_the_fly_scoring=True) on DUO_SAMPLES windows of c4.utf8 instead of BookSum (no download);
    # the ratio is head_compression_ratio. sink/recent are set to 16/64 after post_init (kvpress: 128/256), so the
    # 300-token prompt is cut.
    "duo_attention": dict(kind="duo", ratios=[0.5, 0.25]),
}
DUO_TEXT = "assets/texts/c4.utf8"
DUO_SAMPLES = [(0, 256), (2000, 256), (5000, 256)]  # (start, length) in the text's token ids
DUO_SINK, DUO_RECENT, DUO_Q_LEN = 16, 64, 500

# name -> KVzipPress parameters and ratios (chunk_size 128: the ~280 context tokens replay in three chunks)
KVZIP = {
    "kvzip": dict(params=dict(chunk_size=128), ratios=[0.5, 0.25]),
    "kvzip_layerwise": dict(params=dict(chunk_size=128, layerwise=True), ratios=[0.5]),
    "kvzip_plus": dict(params=dict(chunk_size=128, kvzip_plus_normalization=True), ratios=[0.5]),
}

SCORE_NOTES = {
    "knorm": "-||k||_2 of the cached (post-RoPE) key, float32.",
    "keydiff": "-cos(k, anchor) of the cached (post-RoPE) key, anchor = mean over the layer's cached keys of k/||k||, "
    "float32.",
    "cur": "kv_product leverage: (||k||^2 / its 16-entry block's sum) x (the same for v), normalized over the head; "
    "the first 4 entries set to 1.",
    "lagkv": "sinks 4 and the last partition with the remainder (entries 260..299) score 1; entries 4..131 "
    "rank/128 of (std over channels of keys min-max normalized by entries 132..259, softmaxed over the partition, "
    "+ the same for values) / 2.",
    "snapkv": "mean over the last 64 queries (recomputed from the attention input with q_proj + RoPE, softmax over "
    "all T keys, causal inside the window) of the attention to keys 0..T-65, avg_pool1d(kernel 5, stride 1, "
    "padding 2, count_include_pad) along keys, mean over the 3 query heads of each kv head; the last 64 entries "
    "are padded with max+1, the max taken over all kv heads of the layer.",
    "tova": "attention of the last query to keys 0..T-2, averaged over all 9 query heads (the same for every kv "
    "head); the last entry is padded with max+1.",
    "observed_attention": "sum over all queries of the (eager, causal) attention to each key divided by the number "
    "of queries that see it (T - j), mean over the 3 query heads of each kv head. No padding.",
    "expected_attention": "keys n_sink.. only: softmax over them of mu.k/sqrt(d) + k^T Sigma k/(2d), with mu/Sigma "
    "the mean/covariance of the pre-RoPE queries of positions n_sink..T-1 (covariance divided by their count), "
    "rotated by R = mean over positions T..T+511 of the RoPE matrix; mean over the 3 query heads, times ||v||_2; "
    "the first n_sink entries are padded with max+1 (max over all kv heads of the layer).",
    "streaming_llm": "1 for kept, 0 for positions n_sink..n_sink+n_pruned-1 (n_pruned = T - int(T*(1-ratio))).",
    "pyramidkv": "same as snapkv (last 64 entries padded with max+1).",
    "compactor": "entries 8..T-5 only: blending (= ratio) x z(leverage) + z(attention), z over all kv heads of the "
    "layer (unbiased std). leverage: pre-RoPE keys (k_proj of the attention input), centred over the entries, times "
    "the sketch Phi (64 x 48, pare's SplitMix64 Box-Muller draw for seed 0, layer, kv head, times 1/sqrt(48)), "
    "diag(X (X^T X + 0.01 I)^-1 X^T) by Cholesky. attention: queries (q_proj + RoPE) and keys zero-padded to chunks "
    "of 256, softmax(q.k) without 1/sqrt(d) within each chunk, summed over queries, mean over the 3 query heads, "
    "times ||v||, avg_pool1d(kernel 3, padding 1). The first 8 and last 4 entries padded with the max (not max+1).",
    "finch": "mean over the last 32 queries (as snapkv computes them, causal inside the window) of the attention to "
    "keys 0..T-33, query j weighted by T-32+j, no pooling, mean over the 3 query heads; the last 32 entries padded "
    "with max+1.",
    "finch_chunked": "as finch; chunks of 100 entries each keep int(len * (1 - ratio)).",
    "critical_knorm": "CriticalKV over knorm: (score + 1e-4) x mean over the 3 query heads of ||v W_o,q||_1; the "
    "top int(n_kept * 0.5) knorm entries of each head set to float32 max.",
    "critical_snapkv": "CriticalKV over snapkv: as critical_knorm with snapkv's scores.",
    "think": "per key channel of the kv head: mean over the last 32 queries (q_proj + RoPE) of q^2, averaged over the "
    "3 query heads, times the mean over the cached entries (after the composed press, if any) of k^2 (post-RoPE); "
    "the int(64 * ratio) lowest channels are zeroed.",
    "kvzip": "max over the replay queries and the 3 query heads of each kv head of the softmax attention (over the "
    "sinks min(4, chunk start), the chunk's entries and the replay tokens, causal among them) to each entry of the "
    "chunk; entries before the template prefix's end score 0; raw, before the sinks are padded with max+1.",
    "kvzip_plus": "as kvzip, each weight divided by ||h|| of the replay token (the attention input) and multiplied "
    "by ||v W_o,q||_2 of the entry for its query head q, before the max.",
}


# ---------------------------------------------------------------- helpers


def f32(x):
    """A float32 value as the shortest decimal that round-trips float32."""
    return float(f"{float(x):.9g}")


def top(logits_row):
    lp = torch.log_softmax(logits_row.float(), dim=-1)
    values, indices = torch.topk(lp, TOP)
    return [dict(id=int(i), logprob=round(float(v), DIGITS)) for v, i in zip(values, indices)]


def load():
    path = ROOT / "assets" / GGUF
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert next(model.parameters()).dtype == torch.float32
    return model, tokenizer


def set_attn(model, name):
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    assert model.config._attn_implementation == name


def prompt_ids(tokenizer):
    # make_fixtures.py conventions: tokenizer(text).input_ids, no BOS added for SmolLM2.
    ids = tokenizer((ROOT / WIKI).read_text(encoding="utf-8")).input_ids[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS and ids[0] != tokenizer.bos_token_id
    return ids


def attn_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def build(name, ratio):
    case = CASES[name]
    if case["kind"] in ("scorer", "pyramid", "finch_chunked"):
        cls, params = INNER[name]
        press = cls(compression_ratio=ratio, **{k: v for k, v in params.items() if k != "window_size"})
        if isinstance(press, FinchPress):
            press.delimiter_token_id, press.window_size = -1, params["window_size"]
        else:
            press = cls(compression_ratio=ratio, **params)
        return press, None
    cls, inner_params = INNER[case["inner"]]
    inner = cls(compression_ratio=ratio, **inner_params)
    outer = {"adakv": AdaKVPress, "critical_adakv": CriticalAdaKVPress, "chunkkv": ChunkKVPress, "block": BlockPress}[
        case["kind"]
    ]
    return outer(press=inner, **case["params"]), inner


# ---------------------------------------------------------------- capture


class Capture:
    """Wraps a press's score (the scorer) and compress (the press kvpress's hook calls) per instance."""

    def __init__(self, press, scorer):
        self.scores, self.keys_in, self.values_in, self.keys_out, self.values_out = {}, {}, {}, {}, {}
        orig_score, orig_compress = scorer.score, press.compress

        def score(module, *args, **kwargs):
            s = orig_score(module, *args, **kwargs)
            if isinstance(press, BlockPress):  # one call per block
                self.scores.setdefault(module.layer_idx, []).append(s.detach().clone())
                return s
            assert module.layer_idx not in self.scores
            self.scores[module.layer_idx] = s.detach().clone()  # AdaKV scatters into s in place
            return s

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            i = module.layer_idx
            self.keys_in[i], self.values_in[i] = keys.detach().clone(), values.detach().clone()
            k, v = orig_compress(module, hidden_states, keys, values, attentions, kwargs)
            self.keys_out[i], self.values_out[i] = k.detach().clone(), v.detach().clone()
            return k, v

        scorer.score = score
        press.compress = compress


def rows_taken(out, inp):
    """Index in inp (seq, d) of each row of out (n, d): exact equality, exactly one match each."""
    eq = (out[:, None, :] == inp[None, :, :]).all(-1)
    assert (eq.sum(1) == 1).all(), "a compressed row matches no (or several) uncompressed rows"
    return eq.float().argmax(1).tolist()


# ---------------------------------------------------------------- selection as kvpress does it


def pyramid_budget(press, module, q_len):
    """PyramidKVPress.get_layer_budget, restated (checked against kvpress's own)."""
    r, w, beta = press.compression_ratio, press.window_size, press.beta
    max_capacity_prompt = w + q_len * (1 - r)
    min_num = (max_capacity_prompt - w) / beta
    max_num = (max_capacity_prompt - w) * 2 - min_num
    if max_num >= q_len - w:
        max_num = q_len - w
        min_num = (max_capacity_prompt - w) * 2 - max_num
    if not (q_len >= max_num >= min_num >= w):
        return max(1, round(q_len * (1 - r)))
    n_layers = module.config.num_hidden_layers
    steps = (max_num - min_num) / (n_layers - 1) if n_layers > 1 else 0.0
    return round(max_num - module.layer_idx * steps)


def near(values, hi, lo):
    """Indices of values within NEAR_TOL (relative) of the boundary between the last kept (hi) and the first
    dropped (lo) score: entries that a float-level difference in the scores could move across it."""
    b = (hi + lo) / 2
    return torch.nonzero((values - b).abs() <= NEAR_TOL * b.abs()).flatten().tolist()


def select_topk(scores, n_kept):
    """Per-head kept sets (sorted) and near-boundary (head, position) pairs."""
    kept, close = [], []
    for h in range(scores.shape[1]):
        s = scores[0, h]
        kept.append(sorted(s.topk(n_kept).indices.tolist()))
        if n_kept < s.numel():
            ordered = s.sort(descending=True).values
            close += [[h, j] for j in near(s, ordered[n_kept - 1], ordered[n_kept])]
    return kept, close


def select_adakv(scores, ratio, alpha):
    """AdaKVPress.compress restated: protect each head's n_safe best, prune the n_pruned lowest over all heads."""
    s = scores.clone()
    _, n_heads, k_len = s.shape
    n_kept = compute_n_kept(k_len, ratio)
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    s.scatter_(-1, torch.topk(s, n_safe, dim=-1).indices, torch.finfo(s.dtype).max)
    n_pruned = n_heads * (k_len - n_kept)
    flat = -s.reshape(-1)
    pruned = torch.topk(flat, n_pruned).indices
    ordered = flat.sort(descending=True).values
    close = [[i // k_len, i % k_len] for i in near(flat, ordered[n_pruned], ordered[n_pruned - 1])]
    pruned_sets = [set() for _ in range(n_heads)]
    for i in pruned.tolist():
        pruned_sets[i // k_len].add(i % k_len)
    kept = [sorted(set(range(k_len)) - p) for p in pruned_sets]
    return kept, close, dict(n_kept_mean=n_kept, n_safe=n_safe, n_pruned_total=n_pruned)


def select_critical_adakv(scores, values, module, ratio, alpha, first_stage_ratio, epsilon=1e-4):
    """CriticalAdaKVPress.compress restated: AdaKV's per-head budgets, then CriticalKV's two stages in each head."""
    s = scores.clone()
    _, n_heads, k_len = s.shape
    top = torch.finfo(s.dtype).max
    n_kept = compute_n_kept(k_len, ratio)
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    s.scatter_(-1, torch.topk(s, n_safe, dim=-1).indices, top)
    flat = s.reshape(-1)
    budgets = torch.bincount(torch.topk(flat, n_kept * n_heads).indices // k_len, minlength=n_heads).tolist()
    ordered = flat.sort(descending=True).values
    # Entries near the across-heads cut may move one unit of budget between heads.
    close = [[i // k_len, i % k_len] for i in near(flat, ordered[n_kept * n_heads - 1], ordered[n_kept * n_heads])]
    for h, b in enumerate(budgets):
        s[0, h].scatter_(-1, torch.topk(s[0, h], int(b * first_stage_ratio)).indices, top)
    weighted = (s + epsilon) * CriticalKVPress.vwl1norm(values, module)
    kept = []
    for h, b in enumerate(budgets):
        w = weighted[0, h]
        kept.append(sorted(w.topk(b).indices.tolist()))
        if b < k_len:
            ordered = w.sort(descending=True).values
            close += [[h, j] for j in near(w, ordered[b - 1], ordered[b])]
    return kept, close, dict(head_budgets=budgets, n_safe=n_safe)


def select_block(calls, k_len, ratio, block_size):
    """BlockPress.compress restated from its scorer's calls, one per block: per head the kept set (sorted) and the
    near-boundary (head, position) pairs of every block's selection."""
    n_kept = compute_n_kept(k_len, ratio)
    block_size = min(block_size, k_len)
    n_heads = calls[0].shape[1]
    kept = torch.arange(n_kept).expand(1, n_heads, -1)
    starts = list(range(n_kept, k_len, block_size))
    assert len(calls) == len(starts)
    close = []
    for i, scores in zip(starts, calls):
        current = torch.cat([kept, torch.arange(i, min(i + block_size, k_len)).expand(1, n_heads, -1)], dim=-1)
        assert scores.shape == current.shape
        kept = current.gather(-1, scores.topk(n_kept, dim=-1).indices)
        for h in range(n_heads):
            ordered = scores[0, h].sort(descending=True).values
            close += [[h, int(current[0, h, j])] for j in near(scores[0, h], ordered[n_kept - 1], ordered[n_kept])]
    return [sorted(k.tolist()) for k in kept[0]], close


def chunk_scores_of(scores, chunk_length):
    """ChunkKVPress.compress's chunk scores: sum over kv heads, mean over each chunk (the remainder is one chunk)."""
    k_len = scores.shape[-1]
    n_full, rem = k_len // chunk_length, k_len % chunk_length
    assert n_full > 0
    main = scores[..., : n_full * chunk_length].sum(dim=1).view(-1, n_full, chunk_length).mean(dim=-1)
    if rem:
        main = torch.cat([main, scores[..., -rem:].sum(dim=1).mean(dim=-1, keepdim=True)], dim=-1)
    return main[0], n_full, rem


def select_chunks(scores, ratio, chunk_length):
    """Kept positions (the same for every head), near-boundary chunk indices, chunk scores, chunks kept."""
    k_len = scores.shape[-1]
    cs, n_full, rem = chunk_scores_of(scores, chunk_length)
    n_chunks_kept = max(1, int((n_full + (rem > 0)) * (1 - ratio)))
    chosen = cs.topk(n_chunks_kept).indices.tolist()
    ordered = cs.sort(descending=True).values
    close = [[c] for c in near(cs, ordered[n_chunks_kept - 1], ordered[n_chunks_kept])] if n_chunks_kept < len(cs) else []
    kept = sorted(j for c in chosen for j in range(c * chunk_length, min((c + 1) * chunk_length, k_len)))
    return [kept] * scores.shape[1], close, cs, n_chunks_kept


# ---------------------------------------------------------------- one fixture


def run_think(model, ids, name, ratio):
    """ThinKPress alone or after a sequence press (ComposedPress): the zeroed channels per (layer, head), each
    checked against the channel scores restated from ThinK's own window queries, and the inner press's kept entries."""
    case = CASES[name]
    set_attn(model, "sdpa")
    think = ThinKPress(key_channel_compression_ratio=ratio, **case["params"])
    inner = None
    if case.get("inner"):
        cls, params = INNER[case["inner"]]
        inner = cls(compression_ratio=ratio, **params)
        cap = Capture(inner, inner)
    press = ComposedPress([inner, think]) if inner is not None else think
    channel_scores = {}
    orig_compress = think.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        q = think.compute_window_queries(module, kwargs["hidden_states"], kwargs["position_embeddings"])
        _, n_kv, _, d = keys.shape
        qn = q.pow(2).mean(dim=2).view(1, n_kv, -1, d).mean(2)
        channel_scores[module.layer_idx] = (qn * keys.pow(2).mean(dim=2))[0].detach().clone()
        return orig_compress(module, hidden_states, keys, values, attentions, kwargs)

    think.compress = compress
    T = len(ids)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=cache, cache_position=torch.arange(T))
    pruned_all, close, kept_all, kept_close = [], [], [], []
    for i in range(len(attn_modules(model))):
        keys = cache.layers[i].keys[0]
        n_pruned = int(keys.shape[-1] * ratio)
        pruned = []
        for h in range(keys.shape[0]):
            s = channel_scores[i][h]
            zero = sorted(torch.nonzero((keys[h] == 0).all(0)).flatten().tolist())
            assert zero == sorted(s.topk(n_pruned, largest=False).indices.tolist()), f"{name} layer {i} head {h}"
            pruned.append(zero)
            ordered = s.sort().values
            close += [[i, h, c] for c in near(s, ordered[n_pruned - 1], ordered[n_pruned])]
        pruned_all.append(pruned)
        if inner is not None:
            kept, near_kept = select_topk(cap.scores[i], compute_n_kept(T, ratio))
            for h in range(len(kept)):
                assert sorted(rows_taken(cap.keys_out[i][0, h], cap.keys_in[i][0, h])) == kept[h]
                assert torch.equal(cache.layers[i].values[0, h], cap.values_out[i][0, h])
            kept_all.append(kept)
            kept_close += [[i] + c for c in near_kept]
    fixture = dict(
        made_by=None,
        press="think",
        params=dict(case["params"], key_channel_compression_ratio=ratio)
        | (dict(inner=case["inner"], inner_params=dict(INNER[case["inner"]][1]), inner_ratio=ratio) if inner else {}),
        ratio=ratio,
        seq_len=T,
        prompt_ids=ids,
        pruned_channels=pruned_all,
        scores_sample=dict(
            layer=SAMPLE_LAYER,
            head=SAMPLE_HEAD,
            note=SCORE_NOTES["think"],
            scores=[f32(v) for v in channel_scores[SAMPLE_LAYER][SAMPLE_HEAD].tolist()],
        ),
        near_boundary=dict(
            rel_tol=NEAR_TOL,
            note="[layer, head, channel]: channels whose score is within rel_tol of the midpoint between the last "
            "pruned and the first kept channel score",
            entries=close,
        ),
    )
    if inner is not None:
        fixture["kept"] = kept_all
        fixture["kept_near_boundary"] = dict(
            note="[layer, head, position]: entries near the inner press's cut, as near_boundary of its own fixtures",
            entries=kept_close,
        )
    return fixture, None


def run_duo(model, tokenizer, ids, ratio):
    """DuoAttentionPress with on-the-fly head scores: kvpress's duo_attention_on_the_fly runs unchanged, fed the
    DUO_SAMPLES token windows where it would draw BookSum chapters (load_dataset, pandas' sample(random_state=42),
    AutoTokenizer patched), with num_samples = their count. The kept entries are read from masked_key_indices."""
    import kvpress.presses.duo_attention_press as duo

    set_attn(model, "sdpa")
    text_ids = tokenizer((ROOT / DUO_TEXT).read_text(encoding="utf-8")).input_ids
    samples = [text_ids[a : a + n] for a, n in DUO_SAMPLES]
    assert all(len(x) == n for x, (_, n) in zip(samples, DUO_SAMPLES))
    chapters = types.SimpleNamespace(tolist=lambda: list(range(len(samples))))
    frame = types.SimpleNamespace(sample=lambda n, random_state: {"chapter": chapters})
    duo.load_dataset = lambda *a, **k: types.SimpleNamespace(to_pandas=lambda: frame)
    fake_tok = lambda i, return_tensors: transformers.BatchEncoding({"input_ids": torch.tensor([samples[i]])})
    duo.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: fake_tok)
    captured = {}
    on_the_fly = duo.duo_attention_on_the_fly

    def scores_of(m):
        captured["scores"] = on_the_fly(m, num_samples=len(samples), q_len=DUO_Q_LEN)
        return captured["scores"]

    duo.duo_attention_on_the_fly = scores_of
    press = duo.DuoAttentionPress(head_compression_ratio=ratio, on_the_fly_scoring=True)
    post_init = press.post_init_from_model

    def post_init_small(m):
        post_init(m)
        assert (press.sink_size, press.recent_size) == (128, 256)
        press.sink_size, press.recent_size = DUO_SINK, DUO_RECENT

    press.post_init_from_model = post_init_small
    T = len(ids)
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(), cache_position=torch.arange(T))
    duo.duo_attention_on_the_fly = on_the_fly
    scores = torch.tensor(captured["scores"], dtype=torch.float32)
    mask = press.streaming_mask.cpu()
    n_pruned = round(scores.numel() * ratio)
    flat = scores.flatten()
    ordered = flat.sort().values
    close = [[i // scores.shape[1], i % scores.shape[1]] for i in near(flat, ordered[n_pruned - 1], ordered[n_pruned])]
    kept_all = []
    for i, module in enumerate(attn_modules(model)):
        b, h, s = module.masked_key_indices
        assert (b == 0).all()
        pruned = [set() for _ in range(scores.shape[1])]
        for hh, ss in zip(h.tolist(), s.tolist()):
            pruned[hh].add(ss)
        for hh in range(scores.shape[1]):
            window = set(range(DUO_SINK)) | set(range(T - DUO_RECENT, T))
            assert pruned[hh] == (set(range(T)) - window if mask[i, hh] else set())
        kept_all.append([sorted(set(range(T)) - p) for p in pruned])
    fixture = dict(
        made_by=None,
        press="duo_attention",
        params=dict(head_compression_ratio=ratio, on_the_fly_scoring=True, sink_size=DUO_SINK,
                    recent_size=DUO_RECENT, q_len=DUO_Q_LEN, calibration_text=DUO_TEXT),
        ratio=ratio,
        seq_len=T,
        prompt_ids=ids,
        calibration_samples=samples,
        head_scores=[[f32(v) for v in row] for row in scores.tolist()],
        head_scores_note="duo_attention_on_the_fly: per sample and layer, mean pre-RoPE q and k over the sample's "
        "tokens, repeated q_len times and rotated at 0..q_len-1; the last query's softmax attention over those keys, "
        "cumsum along the keys, mean; mean over the 3 query heads of each kv head; mean over the samples (f32).",
        streaming_mask=mask.int().tolist(),
        compression_ratio=press.compression_ratio_,
        kept=kept_all,
        near_boundary=dict(
            rel_tol=NEAR_TOL,
            note="[layer, head]: heads whose score is within rel_tol of the midpoint between the last streaming and the "
            "first retrieval score",
            entries=close,
        ),
    )
    return fixture, None


# ---------------------------------------------------------------- Compactor's sketch

SKETCH_SEED = 0
MASK64 = (1 << 64) - 1


def splitmix_mix(z):
    """pare_model::rng::mix: the first value SplitMix64 seeded with z draws."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def pare_sketch(seed, layer, head, d, k):
    """pare's Compactor sketch (crates/pare-press/src/scorers/compactor.rs, sketch()): N(0, 1) by Box-Muller from
    counter-based SplitMix64 uniforms, f64 then f32, (d, k) row-major. Without the 1/sqrt(k): kvpress applies it."""
    key = splitmix_mix(splitmix_mix(seed) ^ (layer << 16 | head))

    def uniform(n):
        return (splitmix_mix(key ^ n) >> 11) / float(1 << 53)

    values = []
    for e in range(d * k):
        u, v = uniform(2 * e), uniform(2 * e + 1)
        values.append(math.sqrt(-2.0 * math.log(1.0 - u)) * math.cos(2.0 * math.pi * v))
    return torch.tensor(values, dtype=torch.float64).to(torch.float32).view(d, k)


@contextlib.contextmanager
def seeded_sketch(press, seed):
    """kvpress's LeverageScorePress draws its sketch with torch.randn(B, H, d, k) on every call. Inside this context
    that one call returns pare's seeded draw for the layer being scored (and the press's kv heads); every other
    line of kvpress runs unchanged. The layer comes from the module the leverage press is handed."""
    import kvpress.presses.leverage_press as leverage

    lev = press._leverage_press
    current = {}
    orig_score = lev.score

    def score(module, *args, **kwargs):
        current["layer"] = module.layer_idx
        return orig_score(module, *args, **kwargs)

    class SeededTorch:
        def __getattr__(self, attr):
            return getattr(torch, attr)

        def randn(self, b, h, d, k, device=None, dtype=None):
            assert b == 1
            phi = torch.stack([pare_sketch(seed, current["layer"], hh, d, k) for hh in range(h)])
            return phi.unsqueeze(0).to(device=device, dtype=dtype)

    lev.score, leverage.torch = score, SeededTorch()
    try:
        yield
    finally:
        del lev.score
        leverage.torch = torch


def run_press(model, tokenizer, ids, name, ratio):
    case = CASES[name]
    if case["kind"] == "think":
        return run_think(model, ids, name, ratio)
    if case["kind"] == "duo":
        return run_duo(model, tokenizer, ids, ratio)
    attn = case.get("attn", "sdpa")
    set_attn(model, attn)
    press, inner = build(name, ratio)
    scorer = inner if inner is not None else press
    cap = Capture(press, scorer)
    x = torch.tensor([ids])
    T = len(ids)
    cache = DynamicCache()
    sketch = seeded_sketch(press, SKETCH_SEED) if isinstance(press, CompactorPress) else contextlib.nullcontext()
    with torch.no_grad(), press(model), sketch:
        out = model(input_ids=x, past_key_values=cache, cache_position=torch.arange(T))
    modules = attn_modules(model)
    n_layers = len(modules)
    assert sorted(cap.scores) == list(range(n_layers))

    kept_all, close_all, extra = [], [], {}
    budgets = []
    for i, module in enumerate(modules):
        scores = cap.scores[i]
        if case["kind"] != "block":
            assert scores.shape == (1, model.config.num_key_value_heads, T) and scores.dtype == torch.float32
        if case["kind"] == "block":
            kept, close = select_block(scores, T, ratio, press.block_size)
        elif case["kind"] == "scorer":
            kept, close = select_topk(scores, compute_n_kept(T, ratio))
        elif case["kind"] == "finch_chunked":
            kept, close = [[] for _ in range(scores.shape[1])], []
            for start in range(0, T, press.chunk_length):
                part = scores[..., start : start + press.chunk_length]
                k, c = select_topk(part, compute_n_kept(part.shape[-1], ratio))
                kept = [a + [start + j for j in b] for a, b in zip(kept, k)]
                close += [[h, start + j] for h, j in c]
        elif case["kind"] == "pyramid":
            budget = pyramid_budget(press, module, T)
            assert budget == press.get_layer_budget(module, T)
            budgets.append(budget)
            kept, close = select_topk(scores, budget)
        elif case["kind"] == "adakv":
            kept, close, info = select_adakv(scores, ratio, press.alpha_safeguard)
            extra["adakv"] = info
        elif case["kind"] == "critical_adakv":
            kept, close, info = select_critical_adakv(
                scores, cap.values_in[i], module, ratio, press.alpha_safeguard, press.first_stage_ratio
            )
            extra.setdefault("head_budgets", []).append(info["head_budgets"])
        else:
            kept, close, cs, n_chunks_kept = select_chunks(scores, ratio, press.chunk_length)
            if i == SAMPLE_LAYER:
                extra["chunk_scores"] = [f32(v) for v in cs.tolist()]
                extra["n_chunks_kept"] = n_chunks_kept
        close_all += [[i] + c for c in close]

        # What kvpress actually left behind.
        if case["kind"] in ("adakv", "critical_adakv"):
            assert cache.layers[i].keys.shape[2] == T  # AdaKV masks, it does not shrink
            b, h, s = module.masked_key_indices
            assert (b == 0).all()
            pruned = [set() for _ in kept]
            for hh, ss in zip(h.tolist(), s.tolist()):
                pruned[hh].add(ss)
            actual = [sorted(set(range(T)) - p) for p in pruned]
            assert actual == kept, f"{name} layer {i}: masked_key_indices differ from the recomputed selection"
        else:
            assert torch.equal(cache.layers[i].keys, cap.keys_out[i])
            for h in range(len(kept)):
                taken_k = rows_taken(cap.keys_out[i][0, h], cap.keys_in[i][0, h])
                # values carry no RoPE: a token repeated in the prompt repeats its layer-0 value row
                assert torch.equal(cap.values_out[i][0, h], cap.values_in[i][0, h][taken_k])
                assert sorted(taken_k) == kept[h], f"{name} layer {i} head {h}: cache rows differ from the recomputed kept set"
        kept_all.append(kept)

    inner_name = case.get("inner", name)
    params = dict(INNER[inner_name][1]) if case["kind"] in ("scorer", "pyramid", "finch_chunked") else dict(
        case["params"], inner=inner_name, inner_params=dict(INNER[inner_name][1])
    )
    if name == "compactor":
        params["sketch_seed"] = SKETCH_SEED
    sample = cap.scores[SAMPLE_LAYER]
    sample = (sample[-1] if case["kind"] == "block" else sample)[0, SAMPLE_HEAD]
    fixture = dict(
        made_by=None,  # filled in by main
        press=case["kind"] if case["kind"] in ("adakv", "critical_adakv", "chunkkv", "block") else name,
        params=params,
        ratio=ratio,
        attn_implementation=attn,
        seq_len=T,
        prompt_ids=ids,
        kept=kept_all,
        scores_sample=dict(
            layer=SAMPLE_LAYER,
            head=SAMPLE_HEAD,
            note=("raw scores of the inner press (before AdaKV's safeguard) " if case["kind"] == "adakv" else "")
            + ("the last block's call of the inner press (the head's kept entries, best first, then the block): "
               if case["kind"] == "block" else "")
            + SCORE_NOTES[inner_name],
            scores=[f32(v) for v in sample.tolist()],
        ),
        near_boundary=dict(
            rel_tol=NEAR_TOL,
            note=("[layer, chunk]: chunks" if case["kind"] == "chunkkv" else "[layer, head, position]: entries")
            + " whose score is within rel_tol of the midpoint between the last kept and the first dropped score "
            "(for adakv: over the layer's flattened, safeguarded scores); float-level score differences may swap them",
            entries=close_all,
        ),
    )
    if budgets:
        fixture["layer_budgets"] = budgets
    if "adakv" in extra:
        fixture["adakv"] = extra["adakv"]
    if "head_budgets" in extra:
        fixture["head_budgets"] = extra["head_budgets"]
    if "chunk_scores" in extra:
        fixture["scores_sample"]["chunk_scores"] = extra["chunk_scores"]
        fixture["scores_sample"]["n_chunks_kept"] = extra["n_chunks_kept"]
    if case.get("greedy") and ratio == 0.5:
        fixture["greedy"] = greedy(model, cache, out.logits[0, -1], T)
        check_with_pipeline(model, tokenizer, ids, name, ratio, fixture["greedy"]["tokens"])
    return fixture, cap


def check_with_pipeline(model, tokenizer, ids, name, ratio, tokens):
    """kvpress's own KVPressTextGenerationPipeline.generate_answer, given tokens[0] as the 'question' after the
    compressed prompt, must generate tokens[1:]."""
    from kvpress.pipeline import KVPressTextGenerationPipeline

    press, _ = build(name, ratio)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=cache, cache_position=torch.arange(len(ids)))
    fake = types.SimpleNamespace(model=model, tokenizer=tokenizer)
    with torch.no_grad():
        answer = KVPressTextGenerationPipeline.generate_answer(
            fake, question_ids=torch.tensor([tokens[:1]]), cache=cache, context_length=len(ids),
            max_new_tokens=len(tokens) - 1,
        )
    expected = tokenizer.decode(tokens[1:], skip_special_tokens=True)
    assert answer == expected, (name, answer, expected)


def greedy(model, cache, first_logits, T):
    """kvpress pipeline decoding (generate_answer): no press, token i at position T + i, argmax."""
    tokens, tops = [], {}
    logits = first_logits
    tops[0] = top(logits)
    with torch.no_grad():
        for i in range(GREEDY_TOKENS):
            tokens.append(int(logits.argmax()))
            if i == GREEDY_TOKENS - 1:
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=torch.tensor([[T + i]]))
            logits = out.logits[0, -1]
            tops[i + 1] = top(logits)
    return dict(
        positions=f"generated token i is fed at position {T} + i (kvpress generate_answer); "
        f"top5_first: logits of the prefill's last position; top5_stepK: logits after feeding generated "
        "tokens 0..K-1 (they predict tokens[K])",
        tokens=tokens,
        top5_first=tops[0],
        top5_step1=tops[1],
        top5_step8=tops[GREEDY_STEP],
    )


def uncompressed(model, ids):
    """Last-position logits and greedy tokens with no press (same decode loop)."""
    set_attn(model, "sdpa")
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache)
    return out.logits[0, -1], greedy(model, cache, out.logits[0, -1], len(ids))


# ---------------------------------------------------------------- KVzip


def kvzip_ids(tokenizer):
    """The chat template's user prefix (what KVzipPress takes as prefix_length), then wiki tokens."""
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + separator}], add_generation_prompt=True, tokenize=False
    )
    prefix = tokenizer.encode(rendered.split(separator)[0].split(dummy)[0], add_special_tokens=False)
    return prefix + prompt_ids(tokenizer)[: PROMPT_TOKENS - len(prefix)], len(prefix)


def run_kvzip(model, tokenizer, name, ratio):
    """KVzipPress with its replay and compress_post captured; the kept sets recomputed from its scores as
    compress_post selects (global or layerwise bottom-k) and checked against masked_key_indices."""
    import kvpress.presses.kvzip_press as kvzip_module

    set_attn(model, "sdpa")
    params = KVZIP[name]["params"]
    press = KVzipPress(compression_ratio=ratio, **params)
    # KVzipPress loads the tokenizer by the model's name_or_path; the GGUF's is the one.
    kvzip_module.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer)
    ids, prefix_length = kvzip_ids(tokenizer)
    T = len(ids)
    cap = {}
    orig_prepare, orig_post = press.prepare, press.compress_post

    def prepare(model, tokenizer, prev_postfix_size=8):
        pairs = orig_prepare(model, tokenizer, prev_postfix_size)
        cap["replay"] = [repeat[0].tolist() for _, repeat in pairs]
        return pairs

    def compress_post(model):
        cap["scores"] = press.score_val.detach().clone()  # compress_post pads the sinks in place
        cap["prefix_length"] = press.prefix_length
        return orig_post(model)

    press.prepare, press.compress_post = prepare, compress_post
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=cache, cache_position=torch.arange(T))
    assert cap["prefix_length"] == prefix_length
    raw = cap["scores"]
    n_layers, _, n_heads, _ = raw.shape
    assert raw.shape == (n_layers, 1, n_heads, T) and raw.dtype == torch.float32

    s = raw.clone()
    s[..., : press.n_sink] = s.amax() + 1.0
    close = []
    if press.layerwise:
        n_pruned = [int(n_heads * T * ratio)] * n_layers
        for layer in range(n_layers):
            flat = s[layer].reshape(-1)
            ordered = flat.sort().values
            close += [[layer, i // T, i % T] for i in near(flat, ordered[n_pruned[layer]], ordered[n_pruned[layer] - 1])]
    else:
        flat = s.reshape(-1)
        total = int(flat.numel() * ratio)
        pruned = torch.topk(-flat, total).indices
        n_pruned = torch.bincount(pruned // (n_heads * T), minlength=n_layers).tolist()
        ordered = flat.sort().values
        close = [[i // (n_heads * T), i // T % n_heads, i % T] for i in near(flat, ordered[total], ordered[total - 1])]
    kept_all = []
    for layer, module in enumerate(attn_modules(model)):
        assert cache.layers[layer].keys.shape[2] == T  # the replay left nothing behind; KVzip masks
        flat = s[layer].reshape(-1)
        recomputed = set(torch.topk(-flat, n_pruned[layer]).indices.tolist())
        b, h, j = module.masked_key_indices
        assert (b == 0).all() and len(j) == n_pruned[layer]
        masked = {hh * T + jj for hh, jj in zip(h.tolist(), j.tolist())}
        assert masked == recomputed, f"{name} layer {layer}: masked_key_indices differ from the recomputed selection"
        kept_all.append([sorted(set(range(T)) - {i % T for i in masked if i // T == hh}) for hh in range(n_heads)])
        del module.masked_key_indices  # later presses run on the same modules

    fixture = dict(
        made_by=None,
        press="kvzip",
        params=dict(params, n_sink=press.n_sink),
        ratio=ratio,
        attn_implementation="sdpa",
        seq_len=T,
        prompt_ids=ids,
        prefix_length=prefix_length,
        replay_ids=cap["replay"],
        n_pruned_per_layer=n_pruned,
        kept=kept_all,
        scores_sample=dict(
            layer=SAMPLE_LAYER,
            head=SAMPLE_HEAD,
            note=SCORE_NOTES["kvzip_plus" if params.get("kvzip_plus_normalization") else "kvzip"],
            scores=[f32(v) for v in raw[SAMPLE_LAYER, 0, SAMPLE_HEAD].tolist()],
        ),
        near_boundary=dict(
            rel_tol=NEAR_TOL,
            note="[layer, head, position]: entries whose score is within rel_tol of the midpoint between the last "
            "pruned and the first kept score (over all layers, or the layer's own with layerwise); float-level "
            "score differences may swap them",
            entries=close,
        ),
    )
    return fixture


# ---------------------------------------------------------------- main


def file_name(name, ratio):
    return f"{name}_r{ratio:g}.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=", ".join([*CASES, *KVZIP]) + " (default: all)")
    args = ap.parse_args()
    names = args.names or [*CASES, *KVZIP]
    if set(names) - set(CASES) - set(KVZIP):
        ap.error(f"names among {', '.join([*CASES, *KVZIP])}")

    model, tokenizer = load()
    ids = prompt_ids(tokenizer)
    gguf = ROOT / "assets" / GGUF
    made_by = (
        f"tools/reference/make_press_fixtures.py; kvpress {version('kvpress')}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}; assets/{GGUF} (sha256 {sha256(gguf)[:16]}) dequantised by HF, float32; "
        f"{datetime.date.today().isoformat()}"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    base_logits, base_greedy = uncompressed(model, ids)
    snap_eager_check = {}
    for name in [n for n in names if n in KVZIP]:
        for ratio in KVZIP[name]["ratios"]:
            fixture = run_kvzip(model, tokenizer, name, ratio)
            fixture["made_by"] = made_by
            path = OUT / file_name(name, ratio)
            path.write_text(to_json(fixture) + "\n", encoding="utf-8")
            print(f"  {path.relative_to(ROOT)} ({path.stat().st_size / 1e3:.1f} kB) "
                  f"near_boundary={len(fixture['near_boundary']['entries'])}")
    for name in [n for n in names if n in CASES]:
        for ratio in CASES[name]["ratios"]:
            fixture, cap = run_press(model, tokenizer, ids, name, ratio)
            fixture["made_by"] = made_by
            if "greedy" in fixture:
                g = fixture["greedy"]
                # kvpress compresses each layer after its attention ran: the prefill logits are the uncompressed ones.
                assert g["top5_first"] == base_greedy["top5_first"]
                g["tokens_uncompressed"] = base_greedy["tokens"]
            path = OUT / file_name(name, ratio)
            path.write_text(to_json(fixture) + "\n", encoding="utf-8")
            print(f"  {path.relative_to(ROOT)} ({path.stat().st_size / 1e3:.1f} kB) near_boundary={len(fixture['near_boundary']['entries'])}"
                  + (f" greedy differs from uncompressed at {next((i for i, (a, b) in enumerate(zip(fixture['greedy']['tokens'], base_greedy['tokens'])) if a != b), None)}" if "greedy" in fixture else ""))
            if name in ("snapkv", "tova") and ratio == 0.5:
                snap_eager_check[name] = fixture

    # SnapKV and TOVA recompute the window attention themselves under sdpa; under eager they take the model's
    # attention weights instead. Both must select the same entries.
    for name, fixture in snap_eager_check.items():
        CASES[name]["attn"] = "eager"
        eager, _ = run_press(model, tokenizer, ids, name, 0.5)
        CASES[name].pop("attn")
        same = sum(a == b for la, lb in zip(eager["kept"], fixture["kept"]) for a, b in zip(la, lb))
        print(f"  {name}: eager-attention path keeps the same set in {same}/{3 * len(fixture['kept'])} (layer, head)s")
        assert same == 3 * len(fixture["kept"])


if __name__ == "__main__":
    main()
