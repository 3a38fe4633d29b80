"""Does `fedcollm evaluate` score multiple choice exactly as lm-evaluation-harness does?

Scores the same model on the same questions with lm-eval (its tasks pointed at the local
JSONL files by task YAMLs with `dataset_path: json`) and with fedcollm, and reports each
one's acc and acc_norm, the share of questions with the same prediction, and the speed of
each (benchmark 3). lm-eval is a benchmark-only dependency: `make bench-agreement` installs
it. Both load the model once, outside the timed part. Each repetition scores every task with
both, one after the other; the speed-up is lm-eval's seconds over fedcollm's within one
repetition, median over repetitions. lm-eval's seconds are given twice: its whole
`simple_evaluate` call (what a user waits for) and only the time inside its model's
`loglikelihood` (its model work, without building requests from the dataset).

    .venv/bin/python benchmarks/lm_eval_agreement.py --model smollm2-135m --limit 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import machine

from fedcollm.config import ModelConfig
from fedcollm.data import load_questions
from fedcollm.evaluation import evaluate_multiple_choice
from fedcollm.models import load_model, model_path

# The lm-eval task definitions of these four tasks (lm_eval/tasks/{arc,openbookqa,
# commonsense_qa}), with the dataset swapped for the local validation file.
PROMPTS = {
    "arc_easy": (
        '"Question: {{question}}\\nAnswer:"',
        '"{{choices.label.index(answerKey)}}"',
        '"{{choices.text}}"',
    ),
    "arc_challenge": (
        '"Question: {{question}}\\nAnswer:"',
        '"{{choices.label.index(answerKey)}}"',
        '"{{choices.text}}"',
    ),
    "openbookqa": (
        "question_stem",
        '"{{choices.label.index(answerKey.lstrip())}}"',
        '"{{choices.text}}"',
    ),
    "commonsense_qa": (
        "\"Question: {{ question.strip() }}\\nA. {{choices['text'][0]}}\\nB. "
        "{{choices['text'][1]}}\\nC. {{choices['text'][2]}}\\nD. {{choices['text'][3]}}\\nE. "
        "{{choices['text'][4]}}\\nAnswer:\"",
        "answerKey",
        "['A', 'B', 'C', 'D', 'E']",
    ),
}


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


def lm_eval_model(model_dir: Path, batch: int):
    """lm-eval's HF model, with the seconds spent in its `loglikelihood` counted."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=batch, device="cpu")
    inside = {"seconds": 0.0}
    loglikelihood = lm.loglikelihood

    def timed_loglikelihood(*args, **kwargs):
        start = time.perf_counter()
        result = loglikelihood(*args, **kwargs)
        inside["seconds"] += time.perf_counter() - start
        return result

    lm.loglikelihood = timed_loglikelihood
    return lm, inside


def lm_eval_scores(lm, inside: dict, tasks: list[str], data_dir: Path, limit: int):
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as yamls:
        for task in tasks:
            (Path(yamls) / f"local_{task}.yaml").write_text(task_yaml(task, data_dir))
        out = {}
        for task in tasks:
            start, inside["seconds"] = time.perf_counter(), 0.0
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[f"local_{task}"],
                task_manager=TaskManager(include_path=yamls),
                limit=limit,
                log_samples=True,
            )
            seconds = time.perf_counter() - start
            metrics = results["results"][f"local_{task}"]
            samples = sorted(results["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
            predictions = [
                max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])
                for s in samples
            ]
            out[task] = {
                "acc": metrics["acc,none"],
                "acc_norm": metrics["acc_norm,none"],
                "predictions": predictions,
                "seconds": seconds,
                "model_seconds": inside["seconds"],
            }
    return out


def fedcollm_scores(model, tokenizer, tasks: list[str], data_dir: Path, limit: int, batch: int):
    out = {}
    for task in tasks:
        questions = load_questions(task, "validation", data_dir)[:limit]
        start = time.perf_counter()
        result = evaluate_multiple_choice(model, tokenizer, questions, batch)
        out[task] = {
            "acc": result.acc,
            "acc_norm": result.acc_norm,
            "predictions": result.predictions,
            "seconds": time.perf_counter() - start,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name or directory")
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,openbookqa,commonsense_qa")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--limit", type=int, default=200, help="first N validation questions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/lm_eval_agreement.json")
    args = parser.parse_args()
    tasks, data_dir = args.tasks.split(","), Path(args.data_dir)

    model_dir = model_path(args.model)
    model, tokenizer = load_model(ModelConfig(name=args.model), seed=0)
    lm, inside = lm_eval_model(model_dir, args.batch_size)
    speedups: dict[str, list[float]] = {t: [] for t in tasks}
    model_speedups: dict[str, list[float]] = {t: [] for t in tasks}
    for repeat in range(args.repeats):
        ours = fedcollm_scores(model, tokenizer, tasks, data_dir, args.limit, args.batch_size)
        theirs = lm_eval_scores(lm, inside, tasks, data_dir, args.limit)
        for task in tasks:
            speedups[task].append(theirs[task]["seconds"] / ours[task]["seconds"])
            model_speedups[task].append(theirs[task]["model_seconds"] / ours[task]["seconds"])
        shown = ", ".join(f"{t} {speedups[t][-1]:.2f}x" for t in tasks)
        print(f"repeat {repeat + 1}/{args.repeats}: speed-up {shown}", flush=True)

    rows = []
    print(
        f"\n{machine()}\nmodel {args.model}, first {args.limit} validation questions per "
        f"task, batch size {args.batch_size}, median of {args.repeats} repetitions\n"
    )
    print(
        "| task | n | acc lm-eval | acc fedcollm | acc_norm lm-eval | acc_norm fedcollm | "
        "same prediction | s lm-eval (model only) | s fedcollm | speed-up (vs model only) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in tasks:
        a, b = theirs[task], ours[task]
        same = sum(x == y for x, y in zip(a["predictions"], b["predictions"], strict=True))
        n = len(b["predictions"])
        speedup = statistics.median(speedups[task])
        model_speedup = statistics.median(model_speedups[task])
        row = {
            "task": task,
            "n": n,
            "lm_eval": {k: a[k] for k in ("acc", "acc_norm", "seconds", "model_seconds")},
            "fedcollm": {k: b[k] for k in ("acc", "acc_norm", "seconds")},
            "same_prediction": same / n,
            "speedup": speedup,
            "speedups": speedups[task],
            "speedup_vs_model_only": model_speedup,
        }
        rows.append(row)
        print(
            f"| {task} | {n} | {a['acc']:.4f} | {b['acc']:.4f} | {a['acc_norm']:.4f} | "
            f"{b['acc_norm']:.4f} | {100 * same / n:.1f}% | {a['seconds']:.1f} "
            f"({a['model_seconds']:.1f}) | {b['seconds']:.1f} | {speedup:.2f}x "
            f"({model_speedup:.2f}x) |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, "limit": args.limit, "machine": machine(), "tasks": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
