"""Write HF transformers reference fixtures for pare's logits processors.

    tools/reference/.venv/bin/python tools/reference/make_processor_fixtures.py

Writes tests/fixtures/processors/processors.json: fixed seeded score rows (vocab 64, 3 rows, ~N(0, 3),
with ties and -inf entries) and input_ids (prompt + generated, with repeats), and for each case the
scores after HF's processors. Two kinds of cases:

  single  one HF processor/warper, instantiated directly (2-3 settings each, min_tokens_to_keep > 1
          included);
  chain   the list returned by the real GenerationMixin._get_logits_processor of a tiny model
          (tests/fixtures/llama-tiny/model) for generation kwargs, after the same
          _prepare_generation_config as generate() (so HF's global defaults, e.g. top_k=50, apply).

Each case carries `config`, the same settings as pare's ProcessorConfig (serde field names), and
`hf_processors`, the HF class names applied in order. Float parameters are rounded to float32 first,
so that pare (f32 parameters) and HF (Python floats) use the same values. Scores are float32;
-inf is written as the string "-inf". Output is deterministic: re-running changes only meta.date.
"""

import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "processors"
TINY_MODEL = ROOT / "tests" / "fixtures" / "llama-tiny" / "model"

VOCAB = 64
ROWS = 3
SEQ_LEN = 20
PROMPT_LEN = 12  # so 8 tokens are "generated"
EOS = [0, 63]


def f32(x):
    return float(np.float32(x))


def make_inputs():
    g = torch.Generator().manual_seed(20240611)
    scores = (torch.randn(ROWS, VOCAB, generator=g) * 3.0).to(torch.float32)
    # ties: a tie for the maximum, a run of equal middle values, a pair of equal small values
    scores[0, 40] = scores[0].max()
    scores[1, 10:13] = scores[1, 3]
    scores[2, 50] = scores[2, 51]
    # -inf entries (one of them on a token that occurs in input_ids)
    scores[0, 7] = -math.inf
    scores[1, 20] = -math.inf
    scores[2, 1] = -math.inf
    scores[2, 2] = -math.inf

    ids = torch.randint(0, 24, (ROWS, SEQ_LEN), generator=g)
    # repeated n-grams so that no_repeat_ngram and the penalties matter
    ids[0, 2:5] = torch.tensor([5, 6, 8])
    ids[0, 10:13] = torch.tensor([5, 6, 8])
    ids[0, 17:20] = torch.tensor([3, 5, 6])  # ends with "5 6": bans 8 for n=3
    ids[1, 0:2] = torch.tensor([7, 9])  # 7 is -inf in row 0 only
    ids[1, 18:20] = torch.tensor([7, 9])
    ids[2, 5] = 1  # a -inf score in input_ids
    ids[2, 18:20] = torch.tensor([11, 11])
    return scores, ids


def enc_row(row):
    return [("-inf" if v == -math.inf else ("inf" if v == math.inf else float(v))) for v in row.tolist()]


def apply(processors, ids, scores):
    out = scores.clone()
    for p in processors:
        out = p(ids, out)
    return out


def single_cases(scores, ids):
    last0 = int(ids[0, -1])
    last1 = ids[1, -2:].tolist()
    bad = [[5], [EOS[0]], [last0, 17], last1 + [21], [2, 30], [44, 45, 46]]
    cases = []

    def add(name, cfg, procs):
        cases.append(dict(name=name, config=cfg, procs=procs))

    for pen in (1.3, 0.8):
        add(f"repetition_penalty_{pen}", dict(repetition_penalty=f32(pen)), [RepetitionPenaltyLogitsProcessor(f32(pen))])
    for n in (1, 2, 3):
        add(f"no_repeat_ngram_{n}", dict(no_repeat_ngram_size=n), [NoRepeatNGramLogitsProcessor(n)])
    add("bad_words", dict(bad_words_ids=bad, eos_token_ids=EOS), [NoBadWordsLogitsProcessor(bad, EOS)])
    add("bad_words_no_eos", dict(bad_words_ids=bad), [NoBadWordsLogitsProcessor(bad)])
    bias = [[5, 2.5], [9, -3.0], [7, 1.0], [33, float("-inf")]]
    add(
        "logit_bias",
        dict(logit_bias=[[t, b] if b != -math.inf else [t, "-inf"] for t, b in bias]),
        [SequenceBiasLogitsProcessor([[[t], f32(b)] for t, b in bias])],
    )
    add("suppress_tokens", dict(suppress_tokens=[1, 4, 63]), [SuppressTokensLogitsProcessor([1, 4, 63])])
    for m in (10, 8):  # 8 tokens generated: 10 bans EOS, 8 does not
        add(
            f"min_new_tokens_{m}",
            dict(min_new_tokens=m, eos_token_ids=EOS),
            [MinNewTokensLengthLogitsProcessor(PROMPT_LEN, m, EOS)],
        )
    for t in (0.7, 1.5):
        add(f"temperature_{t}", dict(do_sample=True, temperature=f32(t)), [TemperatureLogitsWarper(f32(t))])
    for k, keep in ((5, 1), (1, 1), (10, 15)):
        add(
            f"top_k_{k}_keep{keep}",
            dict(do_sample=True, top_k=k, min_tokens_to_keep=keep),
            [TopKLogitsWarper(k, min_tokens_to_keep=keep)],
        )
    for p, keep in ((0.9, 1), (0.5, 5), (0.3, 1), (0.999, 1)):
        add(
            f"top_p_{p}_keep{keep}",
            dict(do_sample=True, top_p=f32(p), min_tokens_to_keep=keep),
            [TopPLogitsWarper(f32(p), min_tokens_to_keep=keep)],
        )
    for p, keep in ((0.1, 1), (0.05, 3), (0.5, 1), (0.9, 4)):
        add(
            f"min_p_{p}_keep{keep}",
            dict(do_sample=True, min_p=f32(p), min_tokens_to_keep=keep),
            [MinPLogitsWarper(f32(p), min_tokens_to_keep=keep)],
        )
    for p, keep in ((0.9, 1), (0.5, 4), (0.2, 1)):
        add(
            f"typical_p_{p}_keep{keep}",
            dict(do_sample=True, typical_p=f32(p), min_tokens_to_keep=keep),
            [TypicalLogitsWarper(f32(p), min_tokens_to_keep=keep)],
        )
    for e, keep in ((0.01, 1), (0.05, 3), (0.3, 1), (0.3, 5)):
        add(
            f"epsilon_cutoff_{e}_keep{keep}",
            dict(do_sample=True, epsilon_cutoff=f32(e), min_tokens_to_keep=keep),
            [EpsilonLogitsWarper(f32(e), min_tokens_to_keep=keep)],
        )
    for e, keep in ((0.001, 1), (0.01, 3), (0.2, 1), (0.2, 6)):
        add(
            f"eta_cutoff_{e}_keep{keep}",
            dict(do_sample=True, eta_cutoff=f32(e), min_tokens_to_keep=keep),
            [EtaLogitsWarper(f32(e), min_tokens_to_keep=keep)],
        )
    return cases


# GenerationConfig settings for the chain cases, as (name, kwargs, num_beams).
CHAINS = [
    (
        "greedy_processors",
        dict(do_sample=False, repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=10,
             suppress_tokens=[4, 62], bad_words_ids=[[5], [0], [3, 9]],
             sequence_bias=[[[9], 1.5], [[12], -2.0]], temperature=0.5, top_k=5),
        1,
    ),
    ("sample_defaults_temp", dict(do_sample=True, temperature=0.7), 1),
    ("sample_topk_topp", dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.8, repetition_penalty=1.1), 1),
    (
        "sample_everything",
        dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, typical_p=0.95,
             epsilon_cutoff=0.002, eta_cutoff=0.002, repetition_penalty=1.3, no_repeat_ngram_size=3,
             min_new_tokens=4, suppress_tokens=[2], bad_words_ids=[[6, 8], [10]],
             sequence_bias=[[[30], 3.0]]),
        1,
    ),
    ("sample_minp_only", dict(do_sample=True, top_k=0, min_p=0.1, temperature=1.0), 1),
    # Beam search with sampling: HF keeps len(eos) + 1 tokens in every warper.
    ("beam_sample_keep", dict(do_sample=True, top_k=2, top_p=0.2, min_p=0.9, typical_p=0.1), 2),
]

HF_NAME_TO_PARE = {
    "SequenceBiasLogitsProcessor": "logit_bias",
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram",
    "NoBadWordsLogitsProcessor": "bad_words",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "TemperatureLogitsWarper": "temperature",
    "TopKLogitsWarper": "top_k",
    "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
}


def pare_config(gc, min_tokens_to_keep):
    """pare's ProcessorConfig for a GenerationConfig (only the fields pare has)."""
    cfg = dict(do_sample=bool(gc.do_sample), eos_token_ids=EOS)
    if gc.repetition_penalty is not None:
        cfg["repetition_penalty"] = gc.repetition_penalty
    if gc.no_repeat_ngram_size is not None:
        cfg["no_repeat_ngram_size"] = gc.no_repeat_ngram_size
    if gc.bad_words_ids is not None:
        cfg["bad_words_ids"] = gc.bad_words_ids
    if gc.sequence_bias is not None:
        assert all(len(seq) == 1 for seq, _ in gc.sequence_bias)
        cfg["logit_bias"] = [[seq[0], b] for seq, b in gc.sequence_bias]
    if gc.suppress_tokens is not None:
        cfg["suppress_tokens"] = gc.suppress_tokens
    if gc.min_new_tokens is not None:
        cfg["min_new_tokens"] = gc.min_new_tokens
    for key in ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):
        if getattr(gc, key) is not None:
            cfg[key] = getattr(gc, key)
    cfg["min_tokens_to_keep"] = min_tokens_to_keep
    return cfg


def chain_cases(ids):
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    cases = []
    for name, kwargs, num_beams in CHAINS:
        kwargs = {k: (f32(v) if isinstance(v, float) else v) for k, v in kwargs.items()}
        if "sequence_bias" in kwargs:
            kwargs["sequence_bias"] = [[seq, f32(b)] for seq, b in kwargs["sequence_bias"]]
        # As generate(): user kwargs > the model's generation_config.json > HF's global defaults
        # (which sample with top_k=50 and fill the neutral values: temperature 1.0, top_p 1.0, ...).
        gc, _ = model._prepare_generation_config(None, eos_token_id=EOS, num_beams=num_beams, **kwargs)
        model._prepare_special_tokens(gc, kwargs_has_attention_mask=True, device="cpu")
        procs = model._get_logits_processor(
            generation_config=gc,
            input_ids_seq_length=PROMPT_LEN,
            encoder_input_ids=ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(),
            device="cpu",
            model_kwargs={"attention_mask": torch.ones_like(ids)},
        )
        keep = len(EOS) + 1 if (gc.do_sample and num_beams > 1) else 1
        for p in procs:
            if hasattr(p, "min_tokens_to_keep"):
                assert p.min_tokens_to_keep == keep, (name, type(p).__name__)
        cases.append(dict(name=name, config=pare_config(gc, keep), procs=list(procs)))
    return cases


def main():
    scores, ids = make_inputs()
    cases = []
    for kind, group in (("single", single_cases(scores, ids)), ("chain", chain_cases(ids))):
        for c in group:
            names = [type(p).__name__ for p in c["procs"]]
            out = apply(c["procs"], ids, scores)
            cases.append(
                dict(
                    name=c["name"],
                    kind=kind,
                    config=c["config"],
                    hf_processors=names,
                    pare_processors=[HF_NAME_TO_PARE[n] for n in names],
                    expected=[enc_row(r) for r in out],
                )
            )
    fixture = dict(
        meta=dict(
            script="tools/reference/make_processor_fixtures.py",
            command="tools/reference/.venv/bin/python tools/reference/make_processor_fixtures.py",
            transformers=transformers.__version__,
            torch=torch.__version__,
            date=datetime.date.today().isoformat(),
            notes=[
                "scores: float32, seeded N(0, 3) with ties and -inf entries; '-inf' encodes -infinity.",
                f"input_ids: prompt ({PROMPT_LEN} tokens) + generated ({SEQ_LEN - PROMPT_LEN}); no padding.",
                "single cases: the HF class instantiated directly; chain cases: "
                "GenerationMixin._get_logits_processor of the llama-tiny model.",
                "float parameters are rounded to float32 before HF sees them.",
            ],
        ),
        vocab_size=VOCAB,
        prompt_len=PROMPT_LEN,
        eos_token_ids=EOS,
        input_ids=ids.tolist(),
        scores=[enc_row(r) for r in scores],
        cases=cases,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "processors.json"
    path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
