"""The `fedcollm` command: `run` a co-tuning job, `evaluate` a model, list `models`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedcollm.config import TASKS, ConfigError, ModelConfig, load_config
from fedcollm.models import ModelError
from fedcollm.registry import RegistryError
from fedcollm.tasks import DataError

USER_ERRORS = (ConfigError, DataError, ModelError, RegistryError)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=args.set, data_dir=args.data_dir)
    from fedcollm.models import model_path
    from fedcollm.simulation import simulate  # heavy imports only once the config is valid

    # Fetch and convert registry models here, once, before server and clients load them.
    for spec in (config.llm, config.slm):
        if spec.name != "tiny":
            model_path(spec.name)
    out_dir = Path(args.out or f"runs/{Path(args.config).stem}")
    print(f"fedcollm run: {config.num_clients} clients, {config.rounds} rounds, "
          f"task {config.task}, output in {out_dir}", flush=True)  # fmt: skip
    simulate(config, out_dir, verbose=args.verbose)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise ConfigError(f"--task: unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    from fedcollm.evaluation import evaluate_multiple_choice
    from fedcollm.models import load_model
    from fedcollm.tasks import load_questions

    questions = load_questions(args.task, args.split, args.data_dir)
    if args.limit:
        questions = questions[: args.limit]
    model, tokenizer = load_model(ModelConfig(name=args.model, dtype=args.dtype), seed=args.seed)
    if args.adapter:
        from peft import PeftModel

        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise ModelError(f"--adapter: {args.adapter} holds no adapter_config.json")
        model = PeftModel.from_pretrained(model, args.adapter)
    result = evaluate_multiple_choice(model, tokenizer, questions, args.batch_size, args.max_length)
    summary = {"model": args.model, "adapter": args.adapter, "task": args.task,
               "split": args.split, **result.summary()}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>8}  {value:.4f}" if isinstance(value, float) else f"{key:>8}  {value}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedcollm.registry import REGISTRY, ensure_model, model_dir

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcollm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one federated co-tuning run in Flower's simulation engine")
    run.add_argument("config", help="TOML experiment file (see configs/)")
    run.add_argument("--out", help="output directory (default runs/<config name>)")
    run.add_argument("--data-dir", help="directory holding <task>/<split>.jsonl")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set client.lr=1e-4 (repeatable)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("evaluate", help="multiple-choice accuracy of one model")
    ev.add_argument(
        "--model",
        required=True,
        help='"tiny", a registry name (fedcollm models), a model directory or a hub id',
    )
    ev.add_argument("--adapter", help="a saved PEFT adapter directory to apply")
    ev.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    ev.add_argument("--data-dir", help="directory holding <task>/<split>.jsonl")
    ev.add_argument("--split", default="validation")
    ev.add_argument("--limit", type=int, default=0, help="first N questions only")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-length", type=int, default=256)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--seed", type=int, default=0, help="seed of a tiny model's weights")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_evaluate)

    models = sub.add_parser("models", help="the registry of pretrained models usable offline")
    models.add_argument("--fetch", nargs="+", metavar="NAME", help="fetch and convert these now")
    models.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
