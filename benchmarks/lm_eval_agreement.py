"""Does `fedcollm evaluate` score multiple choice exactly as lm-evaluation-harness does?

Scores the same model on the same questions with lm-eval (its tasks pointed at the local
JSONL files by task YAMLs with `dataset_path: json`) and with fedcollm, and reports each
one's acc and acc_norm, the share of questions with the same prediction, and the seconds
each took. lm-eval is a benchmark-only dependency: `make bench-agreement` installs it.

    .venv/bin/python benchmarks/lm_eval_agreement.py --model smollm2-135m --limit 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedcollm.config import ModelConfig
from fedcollm.evaluation import evaluate_multiple_choice
from fedcollm.models import load_model, model_path
from fedcollm.tasks import load_questions

# The lm-eval task definitions of these four tasks (lm_eval/tasks/{arc,openbookqa,
# commonsense_qa}), with the dataset swapped for the local validation file.
PROMPTS = {
    "arc_easy": ('"Question: {{question}}\\nAnswer:"', '"{{choices.label.index(answerKey)}}"',
                 '"{{choices.text}}"'),
    "arc_challenge": ('"Question: {{question}}\\nAnswer:"',
                      '"{{choices.label.index(answerKey)}}"', '"{{choices.text}}"'),
    "openbookqa": ("question_stem", '"{{choices.label.index(answerKey.lstrip())}}"',
                   '"{{choices.text}}"'),
    "commonsense_qa": (
        "\"Question: {{ question.strip() }}\\nA. {{choices['text'][0]}}\\nB. "
        "{{choices['text'][1]}}\\nC. {{choices['text'][2]}}\\nD. {{choices['text'][3]}}\\nE. "
        "{{choices['text'][4]}}\\nAnswer:\"",
        "answerKey", "['A', 'B', 'C', 'D', 'E']"),
}  # fmt: skip


def task_yaml(task: str, data_dir: Path) -> str:
    text, target, choice = PROMPTS[task]
    data_file = (data_dir / task / "validation.jsonl").resolve()
    return f"""task: local_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data_file}
output_type: multiple_choice
validation_split: validation
doc_to_text: {text}
doc_to_target: {target}
doc_to_choice: {choice}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_scores(model_dir: Path, tasks: list[str], data_dir: Path, limit: int, batch: int):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # Loaded once, outside the timed part, as fedcollm's model is.
    lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=batch, device="cpu")
    with tempfile.TemporaryDirectory() as yamls:
        for task in tasks:
            (Path(yamls) / f"local_{task}.yaml").write_text(task_yaml(task, data_dir))
        out = {}
        for task in tasks:
            start = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[f"local_{task}"], task_manager=TaskManager(include_path=yamls),
                limit=limit, log_samples=True,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            metrics = results["results"][f"local_{task}"]
            samples = sorted(results["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
            predictions = [
                max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])
                for s in samples
            ]
            out[task] = {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
                         "predictions": predictions, "seconds": seconds}  # fmt: skip
    return out


def fedcollm_scores(model_name: str, tasks: list[str], data_dir: Path, limit: int, batch: int):
    model, tokenizer = load_model(ModelConfig(name=model_name), seed=0)
    out = {}
    for task in tasks:
        questions = load_questions(task, "validation", data_dir)[:limit]
        start = time.perf_counter()
        result = evaluate_multiple_choice(model, tokenizer, questions, batch, max_length=2048)
        out[task] = {"acc": result.acc, "acc_norm": result.acc_norm,
                     "predictions": result.predictions,
                     "seconds": time.perf_counter() - start}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name or directory")
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,openbookqa,commonsense_qa")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--limit", type=int, default=200, help="first N validation questions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/lm_eval_agreement.json")
    args = parser.parse_args()
    tasks, data_dir = args.tasks.split(","), Path(args.data_dir)

    model_dir = model_path(args.model)
    ours = fedcollm_scores(args.model, tasks, data_dir, args.limit, args.batch_size)
    theirs = lm_eval_scores(model_dir, tasks, data_dir, args.limit, args.batch_size)

    rows = []
    print(f"model {args.model}, first {args.limit} validation questions per task\n")
    print("| task | n | acc lm-eval | acc fedcollm | acc_norm lm-eval | acc_norm fedcollm | "
          "same prediction | s lm-eval | s fedcollm | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in tasks:
        a, b = theirs[task], ours[task]
        same = sum(x == y for x, y in zip(a["predictions"], b["predictions"], strict=True))
        n = len(b["predictions"])
        row = {"task": task, "n": n, "lm_eval": {k: a[k] for k in ("acc", "acc_norm", "seconds")},
               "fedcollm": {k: b[k] for k in ("acc", "acc_norm", "seconds")},
               "same_prediction": same / n}  # fmt: skip
        rows.append(row)
        print(f"| {task} | {n} | {a['acc']:.4f} | {b['acc']:.4f} | {a['acc_norm']:.4f} | "
              f"{b['acc_norm']:.4f} | {100 * same / n:.1f}% | {a['seconds']:.1f} | "
              f"{b['seconds']:.1f} | {a['seconds'] / b['seconds']:.2f}x |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "limit": args.limit,
                                          "tasks": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
