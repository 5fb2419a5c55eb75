"""Regenerates the transformers reference data these tests compare against.

Run with the reference venv from the repository root:
    tools/reference/.venv/bin/python crates/pare-formats/tests/data/make_hf_data.py
It reads tokenizer_cases.json and the two GGUFs in assets/, and writes hf_ids_<tag>.json,
hf_chat.json and hf_text_digests.json with transformers' AutoTokenizer(gguf_file=...).
"""

import glob
import json
import os
import struct

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "../../../../assets")
MODELS = [
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("qwen2", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"),
]
CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi there!\nHow are you?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about café ☕ & <tags>."},
    ],
}


def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for b in struct.pack(f"<{len(ids)}I", *ids):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def write(name, value, **kw):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, **kw)


def main():
    with open(os.path.join(HERE, "tokenizer_cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    chat, digests = {}, {}
    for tag, gguf in MODELS:
        tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=gguf)
        ids = []
        for text in cases:
            with_special = tok(text).input_ids
            ids.append({
                "text": text,
                "ids": with_special,
                "ids_no_special": tok(text, add_special_tokens=False).input_ids,
                "decoded": tok.decode(with_special),
                "decoded_skip": tok.decode(with_special, skip_special_tokens=True),
            })
        write(f"hf_ids_{tag}.json", ids)

        rendered = {}
        for name, messages in CONVERSATIONS.items():
            for agp in (True, False):
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
                chat_ids = tok.apply_chat_template(messages, add_generation_prompt=agp, return_dict=False)
                rendered[f"{name}/{agp}"] = {
                    "messages": messages, "add_generation_prompt": agp, "text": text, "ids": chat_ids,
                }
        chat[tag] = {
            "template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "cases": rendered,
        }

        digests[tag] = {}
        for path in sorted(glob.glob(os.path.join(ASSETS, "texts", "*.utf8"))):
            with open(path, encoding="utf-8") as f:
                text_ids = tok(f.read()).input_ids
            digests[tag][os.path.basename(path)] = {
                "n_ids": len(text_ids), "fnv1a64": format(fnv1a64(text_ids), "016x"), "first": text_ids[:16],
            }
    write("hf_chat.json", chat, indent=1)
    write("hf_text_digests.json", digests, indent=1)


if __name__ == "__main__":
    main()
