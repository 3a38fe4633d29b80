"""Generation throughput: `evaluation.generation.generate` against a plain Hugging Face loop,
and the time to load a task of 10,000 rows.

The plain loop is what FlowerTune's evaluation does (its medical `inference`): one prompt
at a time, `tokenizer.encode` then `model.generate(do_sample=False, max_new_tokens=...)`,
decode, cut at the stop strings. Ours batches prompts (longest first, left-padded, the
key/value cache) and stops each row at its stop string. Both get the same prompts (Code
Alpaca's validation prompts from its task file), the same greedy settings and the same
model, loaded once outside the timing; every output must be identical, or the benchmark
fails. Each repetition times ours then the plain loop; reported: prompts/s of each, their
ratio per repetition, and medians.

The task-load figure: a 10,000-row JSON Lines task file (TFNS rows repeated) read through
its task file into questions, median of `--repeats` loads, in a fresh process each so that
no import is already warm (and once more in-process, warm). Where lm-eval is installed, the
same task file is also read through lm-eval's own task machinery as a library (TaskManager
indexing only that file, then each row's prompt, choices and target): what using lm-eval
as our reader would cost.

    .venv/bin/python benchmarks/generation.py --model smollm2-135m --prompts 32 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import write_figures
from transformers import GenerationConfig

from fedcollm.config import ModelConfig
from fedcollm.data import TASKS, get_task, load_questions
from fedcollm.evaluation.generation import cut_at, generate
from fedcollm.models import load_model


def plain_loop(model, tokenizer, prompts, until, max_gen_toks) -> list[str]:
    greedy = GenerationConfig(
        max_new_tokens=max_gen_toks,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt)])
            out = model.generate(input_ids=ids, generation_config=greedy)
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            outputs.append(cut_at(text, until))
    return outputs


def fresh_process_seconds(code: str, repeats: int, rows: int) -> list[float]:
    """Seconds that `code` (which prints its seconds and its row count) takes, each time in
    a fresh interpreter, so that no import is already warm."""
    seconds = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"task load failed: {out.stderr.strip().splitlines()[-1]}")
        took, count = out.stdout.split()[-2:]
        assert int(count) == rows, (count, rows)
        seconds.append(float(took))
    return seconds


def lm_eval_code(folder: Path) -> str | None:
    """The same task file read through lm-eval's TaskManager (only our folder indexed) into
    prompts, choices and targets; None where lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    spec = yaml.safe_load((TASKS["tfns"]).read_text())
    for split, name in spec["dataset_kwargs"]["data_files"].items():
        spec["dataset_kwargs"]["data_files"][split] = str(folder / name)
    spec["metric_list"] = [{"metric": "acc"}]  # lm-eval knows no flowertune_finance
    (folder / "tasks").mkdir()
    (folder / "tasks" / "tfns.yaml").write_text(yaml.safe_dump(spec))
    return (
        "import time; t = time.perf_counter(); "
        "from lm_eval.tasks import TaskManager, get_task_dict; "
        f"m = TaskManager(include_path={str(folder / 'tasks')!r}, include_defaults=False); "
        "task = get_task_dict(['tfns'], m)['tfns']; "
        "q = [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) "
        "for d in task.training_docs()]; "
        "print(time.perf_counter() - t, len(q))"
    )


def task_load_seconds(data_dir: Path, rows: int, repeats: int) -> dict:
    # Lines split on "\n" only: some tweets hold U+2028, which splitlines() also splits on.
    source = (data_dir / "tfns" / "train.jsonl").read_text().rstrip("\n").split("\n")
    folder = Path(tempfile.mkdtemp())
    (folder / "tfns").mkdir()
    with (folder / "tfns" / "train.jsonl").open("w") as f:
        for i in range(rows):
            f.write(source[i % len(source)] + "\n")
    (folder / "tfns" / "validation.jsonl").write_text(source[0] + "\n")
    ours = (
        "import time; t = time.perf_counter(); from fedcollm.data import load_questions; "
        f"q = load_questions('tfns', 'train', {str(folder)!r}); "
        "print(time.perf_counter() - t, len(q))"
    )
    cold = fresh_process_seconds(ours, repeats, rows)
    start = time.perf_counter()
    load_questions("tfns", "train", folder)
    figures = {
        "rows": rows,
        "fresh_process_seconds_median": statistics.median(cold),
        "fresh_process_seconds": cold,
        "warm_seconds": time.perf_counter() - start,
    }
    theirs = lm_eval_code(folder)
    if theirs is not None:
        # The first load also writes the datasets cache; the median is the cached load.
        lm_eval = fresh_process_seconds(theirs, repeats, rows)
        figures["lm_eval_fresh_process_seconds"] = lm_eval
        figures["lm_eval_fresh_process_seconds_median"] = statistics.median(lm_eval)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="code_alpaca")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-gen-toks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--task-load-only", action="store_true", help="only the task-load figures")
    args = p.parse_args()
    if args.task_load_only:
        report(task_load_seconds(Path(args.data_dir), 10_000, args.repeats), args)
        return
    torch.set_num_threads(torch.get_num_threads())

    task = get_task(args.task)
    questions = load_questions(args.task, "validation", args.data_dir)[: args.prompts]
    prompts = [q.context for q in questions]
    until = task.spec.until
    model, tokenizer = load_model(ModelConfig(name=args.model), seed=0)
    model.eval()
    ours_s, plain_s, ratios = [], [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        ours = generate(model, tokenizer, prompts, until, args.max_gen_toks, args.batch_size)
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain = plain_loop(model, tokenizer, prompts, until, args.max_gen_toks)
        plain_s.append(time.perf_counter() - start)
        same = sum(a == b for a, b in zip(ours, plain, strict=True))
        if same != len(prompts):
            raise SystemExit(f"outputs differ: {len(prompts) - same} of {len(prompts)} prompts")
        ratios.append(plain_s[-1] / ours_s[-1])
        print(
            f"repeat {repeat}: ours {len(prompts) / ours_s[-1]:.2f} prompts/s, plain "
            f"{len(prompts) / plain_s[-1]:.2f} prompts/s, speed-up {ratios[-1]:.2f}x",
            flush=True,
        )
    figures = {
        "model": args.model,
        "task": args.task,
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_gen_toks": args.max_gen_toks,
        "identical_outputs": True,
        "ours_prompts_per_s_median": len(prompts) / statistics.median(ours_s),
        "plain_prompts_per_s_median": len(prompts) / statistics.median(plain_s),
        "speedup_per_repeat": ratios,
        "speedup_median": statistics.median(ratios),
        "task_load": task_load_seconds(Path(args.data_dir), 10_000, args.repeats),
    }
    report(figures, args)


def report(figures: dict, args: argparse.Namespace) -> None:
    print(json.dumps(figures, indent=1))
    write_figures(args, figures)


if __name__ == "__main__":
    main()
