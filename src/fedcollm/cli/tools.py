"""`fedcollm evaluate`, `tasks`, `models` and `certs`: one model scored, what is built in,
and test credentials for a deployment."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedcollm.config import ConfigError, ModelConfig, load_config
from fedcollm.errors import DataError

MAX_SUPERNODES = 1000  # test credentials for a deployment, not a key store


def _evaluated_model(args: argparse.Namespace) -> tuple[ModelConfig, int, str]:
    """The model spec, its weights' seed and the task: from --model and --task, or from
    the run config (--config, --role) that trained the adapter, tiny models included."""
    if args.config:
        from fedcollm import seeds

        config = load_config(args.config, data_dir=args.data_dir)
        spec = getattr(config, args.role)
        seed = (seeds.llm_weights if args.role == "llm" else seeds.slm_weights)(config.seed)
        return spec, seed, args.task or config.task
    if not args.model or not args.task:
        raise ConfigError("evaluate: give --model and --task, or --config (and --role)")
    return ModelConfig(name=args.model, dtype=args.dtype), args.seed, args.task


def cmd_evaluate(args: argparse.Namespace) -> int:
    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--limit", args.limit, 0),
        ("--max-length", args.max_length, 0),
    ):
        if value < least:
            raise ConfigError(f"{flag}: must be {least} or more, got {value}")
    spec, seed, name = _evaluated_model(args)
    from fedcollm.data import get_task
    from fedcollm.data.tasks import split_questions, take
    from fedcollm.evaluation import evaluate_task
    from fedcollm.models import load_model
    from fedcollm.models.lora import load_saved_adapter

    try:
        task = get_task(name)
    except DataError as err:
        raise ConfigError(f"--task: {err}") from None
    # Default: the split the task scores on (validation, else test).
    split = args.split or ("validation" if "validation" in task.spec.splits else "test")
    questions = split_questions(task, split, args.data_dir)  # bad rows stop before the model
    questions = take(questions, args.limit, args.sample)
    model, tokenizer = load_model(spec, seed=seed)
    if args.adapter:
        model = load_saved_adapter(model, Path(args.adapter))
    scores = evaluate_task(model, tokenizer, task, questions, args.batch_size, args.max_length)
    summary = {
        "model": spec.name,
        "adapter": args.adapter,
        "task": task.name,
        "split": split,
        **scores.summary(),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>14}  {value:.4f}" if isinstance(value, float) else f"{key:>14}  {value}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """The built-in tasks (or the task files given) with their kind, splits and metrics."""
    from fedcollm.data import TASKS, get_task

    names = args.files or list(TASKS)
    rows = [("task", "kind", "splits", "metrics")]
    for name in names:
        task = get_task(name)
        splits = ", ".join(f"{role}={split}" for role, split in task.spec.splits.items())
        rows.append((name, task.spec.output_type, splits, ", ".join(task.metric_names)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[3]
        )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedcollm.tracking.run_dir import check_writable

    if not 0 <= args.supernodes <= MAX_SUPERNODES:
        raise ConfigError(
            f"--supernodes {args.supernodes}: give between 0 and {MAX_SUPERNODES} key pairs"
        )
    check_writable(Path(args.dir), option="certs DIR")
    from fedcollm.federation.certificates import write_test_credentials

    for path in write_test_credentials(Path(args.dir), args.supernodes):
        print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedcollm.models.registry import REGISTRY, ensure_model, model_dir

    if args.fetch:
        for name in args.fetch:
            if name not in REGISTRY:
                raise ConfigError(
                    f"--fetch: {name!r} is not in the registry: {', '.join(REGISTRY)}"
                )
            ensure_model(name)
    for name, entry in REGISTRY.items():
        ready = (model_dir(name) / "config.json").is_file()
        state = f"ready in {model_dir(name)}" if ready else "fetched and converted on first use"
        print(f"{name:<20} {entry.size / 2**20:>6.0f} MiB  {entry.description}\n{'':<20} {state}")
    return 0
