"""Write HF transformers beam-search fixtures for pare: tests/fixtures/beam/smollm2.json (+ meta.json).

    tools/reference/.venv/bin/python tools/reference/make_beam_fixtures.py

Every prompt runs under every configuration in CONFIGS with
model.generate(do_sample=False, num_beams=..., num_return_sequences=..., length_penalty=...,
early_stopping=..., [no_repeat_ngram_size / repetition_penalty], return_dict_in_generate=True,
output_scores=True), the model in float32 with attn_implementation="eager".

Per case the fixture keeps the prompt ids, the configuration, and each returned hypothesis (best
first): its generated tokens (the returned row cut to its own length, read from beam_indices, so
the pad filling of shorter rows is dropped), HF's sequences_scores entry, the per-token processed
log-probabilities (compute_transition_scores), and whether it ended with EOS.
"""

import datetime
import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "tests" / "fixtures" / "beam"
DIGITS = 6

PROMPTS = [
    dict(text="The capital of France is", max_new_tokens=24),
    dict(text="Once upon a time", max_new_tokens=24),
    dict(text="def fibonacci(n):", max_new_tokens=24),
    dict(messages=[{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40),
    dict(messages=[{"role": "user", "content": "Name three colors."}], max_new_tokens=40),
]

CONFIGS = [
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=True, no_repeat_ngram_size=3),
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=False, repetition_penalty=1.3),
    dict(num_beams=3, num_return_sequences=3, length_penalty=-1.0, early_stopping="never"),
    dict(num_beams=2, num_return_sequences=1, length_penalty=0.0, early_stopping="never"),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prompt_ids(tokenizer, prompt):
    if "messages" in prompt:
        rendered = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
        return rendered, tokenizer(rendered, add_special_tokens=False).input_ids
    return prompt["text"], tokenizer(prompt["text"]).input_ids


def run_case(model, ids, cfg, max_new_tokens, eos, pad):
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=True,
            **cfg,
        )
    prompt_len = len(ids)
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    hyps = []
    for row in range(out.sequences.shape[0]):
        length = int((out.beam_indices[row] >= 0).sum())
        tokens = out.sequences[row, prompt_len : prompt_len + length].tolist()
        hyps.append(
            dict(
                tokens=tokens,
                score=round(float(out.sequences_scores[row]), DIGITS),
                token_logprobs=[round(float(x), DIGITS) for x in transition[row, :length]],
                finished_by_eos=bool(tokens and tokens[-1] == eos),
            )
        )
    return hyps


def main():
    model = AutoModelForCausalLM.from_pretrained(
        ROOT / "assets", gguf_file=GGUF, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets", gguf_file=GGUF)
    assert model.config._attn_implementation == "eager"
    # generate() fills unset fields from model.generation_config: keep it to the ids only.
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    eos, pad = 2, 2

    cases = []
    for prompt in PROMPTS:
        text, ids = prompt_ids(tokenizer, prompt)
        for cfg in CONFIGS:
            hyps = run_case(model, ids, cfg, prompt["max_new_tokens"], eos, pad)
            config = dict(
                num_beams=cfg["num_beams"],
                num_return_sequences=cfg["num_return_sequences"],
                max_new_tokens=prompt["max_new_tokens"],
                length_penalty=cfg["length_penalty"],
                early_stopping=cfg["early_stopping"],
                eos_token_ids=[eos],
                no_repeat_ngram_size=cfg.get("no_repeat_ngram_size"),
                repetition_penalty=cfg.get("repetition_penalty"),
            )
            cases.append(dict(prompt=text, ids=ids, config=config, hypotheses=hyps))
            print(repr(text[-30:]), cfg, [(len(h["tokens"]), h["score"], h["finished_by_eos"]) for h in hyps], flush=True)

    n_eos = sum(h["finished_by_eos"] for c in cases for h in c["hypotheses"])
    assert n_eos > 0, "no hypothesis ended with EOS: the fixture would not test EOS handling"
    OUT.mkdir(parents=True, exist_ok=True)
    write(OUT / "smollm2.json", dict(model="assets/" + GGUF, cases=cases))
    meta = dict(
        script="tools/reference/make_beam_fixtures.py",
        command="tools/reference/.venv/bin/python " + " ".join(["tools/reference/make_beam_fixtures.py", *sys.argv[1:]]),
        transformers=transformers.__version__,
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        model_files=[dict(path="assets/" + GGUF, sha256=sha256(ROOT / "assets" / GGUF))],
        model_class=type(model).__name__,
        dtype="float32",
        attn_implementation="eager",
        notes=[
            "generate(do_sample=False, num_beams, num_return_sequences, max_new_tokens, length_penalty, "
            "early_stopping, eos_token_id=2, pad_token_id=2, return_dict_in_generate=True, output_scores=True) "
            "plus no_repeat_ngram_size or repetition_penalty where the config names one.",
            "hypotheses: best first; tokens are the generated part only, cut to the row's own length "
            "(beam_indices >= 0), EOS included when the row ended with it.",
            "score: sequences_scores (sum of processed log-probs / generated_len ** length_penalty); "
            "token_logprobs: compute_transition_scores(normalize_logits=False); both rounded to 6 decimals.",
            "HF applies the logits processors to the log-softmaxed scores of each beam.",
        ],
    )
    write(OUT / "meta.json", meta)
    print(f"{len(cases)} cases, {n_eos} hypotheses ended with EOS")


def write(path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
