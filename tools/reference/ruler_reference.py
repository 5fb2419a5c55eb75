"""Check pare's RULER items against RULER's own generation code, and write the fixture the Rust
test compares with (tests/fixtures/ruler_items.json).

    pare eval ruler -m smollm2-135m --ctx 1024 --samples 1 --dump-items /tmp/items.json
    tools/reference/.venv/bin/python tools/reference/ruler_reference.py /tmp/items.json \
        tests/fixtures/ruler_items.json

pare's RNG is not Python's, so pare dumps each item's random draws (its "recipe"). From those
draws this script rebuilds the text with the code of NVIDIA/RULER (scripts/data/synthetic/
niah.py, variable_tracking.py, common_words_extraction.py, freq_words_extraction.py; templates
from scripts/data/synthetic/constants.py, joined as scripts/data/prepare.py joins them for the
`base` template), splits it as kvpress's RULER dataset does (evaluation/benchmarks/ruler/
create_huggingface_dataset.py), and checks that pare's context, question, answer prefix and
outputs are the same strings. It then scores predictions with RULER's metrics
(scripts/eval/synthetic/constants.py, scripts/eval/evaluate.py's postprocess_pred).

One difference is by necessity: RULER splits essays into sentences with NLTK's pretrained
English Punkt model, which no package registry ships; this uses NLTK's Punkt without trained
parameters (`PunktSentenceTokenizer()`), which is what pare follows.
"""

import json
import re
import sys
from pathlib import Path

from nltk.tokenize.punkt import PunktSentenceTokenizer
from scipy.special import zeta

# scripts/data/synthetic/constants.py: template + answer_prefix (prepare.py, `base` template).
TEMPLATES = {
    "niah": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
    + " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
    + " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",
    "cwe": "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
    + " Answer: The top 10 words that appear most often in the list are:",
    "fwe": "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
    + " Answer: According to the coded text above, the three most frequently appeared words are:",
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# kvpress evaluation/benchmarks/ruler/create_huggingface_dataset.py
QUESTION_PATTERNS = {
    "niah": re.compile(r"What (?:is|are all) the special magic"),
    "vt": re.compile(r"Question: Find all variables that are assigned the value"),
    "cwe": re.compile(r"Question: What are the 10 most common words in the above list\?"),
    "fwe": re.compile(r"Question: Do not provide any explanation\."),
}
ANSWER_PATTERNS = {
    "niah": re.compile(r"The special magic"),
    "vt": re.compile(r"Answer:"),
    "cwe": re.compile(r"Answer:"),
    "fwe": re.compile(r"Answer:"),
}


def split_context_question(text, family):
    idx = list(QUESTION_PATTERNS[family].finditer(text))[-1].start()
    context, qa = text[:idx], text[idx:]
    idx = ANSWER_PATTERNS[family].search(qa).start()
    return context, qa[:idx], qa[idx:]


# scripts/eval/synthetic/constants.py and scripts/eval/evaluate.py
def string_match_part(preds, refs):
    score = (
        sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)])
        / len(preds)
        * 100
    )
    return round(score, 2)


def string_match_all(preds, refs):
    score = (
        sum(
            [sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref) for pred, ref in zip(preds, refs)]
        )
        / len(preds)
        * 100
    )
    return round(score, 2)


def postprocess_pred(predict_str):
    predict_str = predict_str.strip()
    np_pattern = re.compile(r"[\x00-\x1f]")
    return np_pattern.sub("\n", predict_str).strip()


def load_haystack(directory):
    """pare's haystack: every .txt file in name order, each followed by a newline; then RULER's
    `re.sub(r'\\s+', " ", essay).split(" ")`."""
    essay = "".join(p.read_text() + "\n" for p in sorted(Path(directory).glob("*.txt")))
    return re.sub(r"\s+", " ", essay).split(" ")


def niah_text(r, haystack):
    needles = r["needles"]
    if r["haystack"] == "essay":
        num_haystack = r["num_haystack"]
        if num_haystack <= len(haystack):
            text = " ".join(haystack[:num_haystack])
        else:
            repeats = (num_haystack + len(haystack) - 1) // len(haystack)
            text = " ".join((haystack * repeats)[:num_haystack])
        document_sents = PunktSentenceTokenizer().tokenize(text.strip())
        insertion_positions = (
            [0] + sorted([int(len(document_sents) * (depth / 100)) for depth in r["depths"]]) + [len(document_sents)]
        )
        document_sents_list = []
        for i in range(1, len(insertion_positions)):
            last_pos = insertion_positions[i - 1]
            next_pos = insertion_positions[i]
            document_sents_list.append(" ".join(document_sents[last_pos:next_pos]))
            if i - 1 < len(needles):
                document_sents_list.append(needles[i - 1])
        context = " ".join(document_sents_list)
    else:
        sentences = [NOISE] * r["num_haystack"] if r["haystack"] == "noise" else list(r["distractors"])
        indexes = r["indexes"]
        assert indexes == sorted(indexes, reverse=True)
        for index, element in zip(indexes, needles):
            sentences.insert(index, element)
        context = "\n".join(sentences)
    queries = r["queries"]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template = TEMPLATES["niah"]
    type_needle_v = r["type_needle_v"]
    if r["singular"]:
        template = template.replace("Some", "A")
        template = template.replace("are all", "is")
        template = template.replace("are", "is")
        template = template.replace("answers", "answer")
        type_needle_v = type_needle_v[:-1]
    # The answers are the asked keys' values: check them against the needles.
    for q in queries:
        assert any(f" for {q} is: " in n for n in needles), q
    for a in r["answers"]:
        assert any(n.endswith(f" is: {a}.") and any(f" for {q} is: " in n for q in queries) for n in needles), a
    return template.format(type_needle_v=type_needle_v, context=context, query=query), r["answers"]


def vt_input(chain):
    """variable_tracking.py, generate_input_output for one chain in a noise haystack."""
    vars_ = chain["vars"]
    this_chain = [f"VAR {vars_[0]} = {chain['value']}"]
    for j in range(len(vars_) - 1):
        this_chain.append(f"VAR {vars_[j+1]} = VAR {vars_[j]} ")
    sentences = [NOISE] * chain["num_noises"]
    positions = chain["positions"]
    assert positions == sorted(positions)
    for insert_pi, j in zip(positions, range(len(this_chain))):
        sentences.insert(insert_pi + j, this_chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    return TEMPLATES["vt"].format(context=context, query=chain["value"], num_v=len(vars_))


def vt_text(r):
    example = r["example"]
    icl_example = vt_input(example) + " " + " ".join(example["vars"]) + "\n"
    # randomize_icl, with pare's draws for the new names and value.
    icl_tgt = icl_example.strip().split()[-len(example["vars"]) :]
    assert icl_tgt == example["vars"]
    for item, new_item in zip(icl_tgt, r["example_vars"]):
        assert len(new_item) == len(item)
        icl_example = icl_example.replace(item, new_item)
    icl_example = icl_example.replace("12345", r["example_value"])
    assert example["value"] == "12345"
    return icl_example + "\n" + vt_input(r["main"]), r["main"]["vars"]


def cwe_text(r):
    def example(lst):
        words = lst["words"]
        common, uncommon = words[: lst["num_common"]], words[lst["num_common"] :]
        word_list = common * int(lst["common_repeats"]) + uncommon * int(lst["uncommon_repeats"])
        assert sorted(lst["order"]) == list(range(len(word_list)))
        word_list = [word_list[i] for i in lst["order"]]
        return " ".join([f"{i + 1}. {word}" for i, word in enumerate(word_list)]), common

    *shots, main = [example(lst) for lst in r["lists"]]
    template = TEMPLATES["cwe"]
    few_shots = [
        template.format(num_cw=10, context=c, query="") + " " + " ".join([f"{i + 1}. {word}" for i, word in enumerate(a)])
        for c, a in shots
    ]
    context, answer = main
    return "\n".join(few_shots) + "\n" + template.format(num_cw=10, context=context, query=""), answer


def fwe_text(r):
    vocab, alpha = r["vocab"], r["alpha"]
    assert vocab[0] == "..."
    import numpy as np

    k = np.arange(1, len(vocab) + 1)
    sampled_cnt = r["num_words"] * (k**-alpha) / zeta(alpha)
    sampled_words = [[w] * zi for w, zi in zip(vocab, sampled_cnt.astype(int))]
    sampled_words = [x for wlst in sampled_words for x in wlst]
    assert sorted(r["order"]) == list(range(len(sampled_words)))
    sampled_words = [sampled_words[i] for i in r["order"]]
    return TEMPLATES["fwe"].format(context=" ".join(sampled_words), query=""), vocab[1:4]


def main():
    dump, out = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(dump.read_text())
    haystack = load_haystack(data["haystack"])
    items, scores = [], []
    for entry in data["items"]:
        item = entry["item"]
        r = item["recipe"]
        family = r["family"]
        if family == "niah":
            text, outputs = niah_text(r, haystack)
        elif family == "vt":
            text, outputs = vt_text(r)
        elif family == "cwe":
            text, outputs = cwe_text(r)
        else:
            text, outputs = fwe_text(r)
        context, question, answer_prefix = split_context_question(text, family)
        for name, ours, theirs in [
            ("context", item["context"], context),
            ("question", item["question"], question),
            ("answer_prefix", item["answer_prefix"], answer_prefix),
            ("outputs", item["outputs"], outputs),
        ]:
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                sys.exit(f"{item['task']} item {item['index']}: {name} differs at {at}: "
                         f"pare {ours[max(0, at-80):at+80]!r} / RULER {theirs[max(0, at-80):at+80]!r}")
        items.append({"ctx": entry["ctx"], "task": item["task"], "recipe": r, "context": context,
                      "question": question, "answer_prefix": answer_prefix, "outputs": outputs})
        # Predictions that take every branch of the metrics: all, some, none, other case,
        # control characters.
        refs = outputs
        for pred in [
            " ".join(refs),
            f"  {refs[0].upper()}\t and nothing else\x01 ",
            "none of them",
            "\n".join(reversed(refs)) + "\x1f",
        ]:
            p = postprocess_pred(pred)
            scores.append({"pred": pred, "refs": refs, "postprocessed": p,
                           "string_match_all": string_match_all([p], [refs]),
                           "string_match_part": string_match_part([p], [refs])})
        print(f"{item['task']}: ok ({len(context)} context chars)")
    out.write_text(json.dumps({"haystack": "PaulGrahamEssays", "items": items, "scores": scores}, indent=1) + "\n")
    print(f"{len(items)} items match RULER's code; wrote {out}")


if __name__ == "__main__":
    main()
