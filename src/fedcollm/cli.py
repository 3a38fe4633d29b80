"""The `fedcollm` command: `run` a co-tuning job, run an `experiment` and its `report`,
`evaluate` a model, list `models`, write test `certs` for a deployment."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedcollm.config import ConfigError, ModelConfig, load_config
from fedcollm.data import TASKS, DataError
from fedcollm.models import ModelError
from fedcollm.models.registry import RegistryError
from fedcollm.preflight import check_run

USER_ERRORS = (ConfigError, DataError, ModelError, RegistryError)


def cmd_run(args: argparse.Namespace) -> int:
    config = check_run(load_config(args.config, overrides=args.set, data_dir=args.data_dir))
    from fedcollm.data import training_split
    from fedcollm.federation.simulation import simulate  # heavy: only for a valid config
    from fedcollm.tracking.checkpoint import check_out_dir

    training_split(config)  # a config that the data cannot serve fails before any model loads
    _prepare_models(config)
    out_dir = Path(args.out or f"runs/{Path(args.config).stem}")
    check_out_dir(out_dir, args.resume)
    print(
        f"fedcollm run: {config.num_clients} clients, {config.rounds} rounds, "
        f"task {config.task}, output in {out_dir}",
        flush=True,
    )
    simulate(config, out_dir, verbose=args.verbose, resume=args.resume)
    return 0


def _prepare_models(config) -> None:
    """Fetch and convert registry models once, before any server or client loads them."""
    from fedcollm.models import model_path

    for spec in (config.llm, config.slm):
        if spec.name != "tiny":
            model_path(spec.name)


def cmd_experiment(args: argparse.Namespace) -> int:
    from fedcollm.experiments.methods import METHODS

    config = check_run(load_config(args.config, overrides=args.set, data_dir=args.data_dir))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tasks = [t.strip() for t in (args.tasks or config.task).split(",") if t.strip()]
    for method in methods:
        if method not in METHODS:
            raise ConfigError(
                f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}"
            )
    for task in tasks:
        overrides = [*args.set, f"task={task!r}"]
        check_run(load_config(args.config, overrides=overrides, data_dir=args.data_dir))
    if args.seeds < 1:
        raise ConfigError("--seeds: must be 1 or more")
    from fedcollm.experiments.methods import run_experiment
    from fedcollm.experiments.tables import write_experiment_report

    _prepare_models(config)
    out = Path(args.out or f"runs/experiment-{Path(args.config).stem}")
    seeds = [config.seed + i for i in range(args.seeds)]
    run_experiment(config, methods, seeds, tasks, out)
    print(f"\nreport: {write_experiment_report(out)}")
    print((out / "report.md").read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedcollm.experiments.tables import compare, write_experiment_report

    for directory in args.dirs:
        if not (Path(directory) / "runs").is_dir():
            raise ConfigError(f"{directory}: not an experiment directory (it has no runs/)")
    if len(args.dirs) == 1:
        print(write_experiment_report(Path(args.dirs[0])).read_text())
    else:
        print(compare(Path(args.dirs[0]), Path(args.dirs[1]), args.metric))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise ConfigError(f"--task: unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    from fedcollm.data import load_questions
    from fedcollm.evaluation import evaluate_multiple_choice
    from fedcollm.models import load_model

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
    summary = {
        "model": args.model,
        "adapter": args.adapter,
        "task": args.task,
        "split": args.split,
        **result.summary(),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>8}  {value:.4f}" if isinstance(value, float) else f"{key:>8}  {value}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
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
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last round"
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

    exp = sub.add_parser("experiment", help="the paper's comparison: every method, every seed")
    exp.add_argument("config", help="TOML experiment file (models, split, budget)")
    exp.add_argument("--methods", default="zero-shot,standalone,fedavg,centralized,fedcollm")
    exp.add_argument("--seeds", type=int, default=3, help="seeds seed, seed+1, ...")
    exp.add_argument("--tasks", help="comma-separated tasks (default: the config's task)")
    exp.add_argument("--data-dir", help="directory holding <task>/<split>.jsonl")
    exp.add_argument("--out", help="experiment directory; a re-run resumes there")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    exp.set_defaults(func=cmd_experiment)

    rep = sub.add_parser("report", help="rebuild an experiment's report, or compare two")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="one directory, or two to compare")
    rep.add_argument("--metric", default="acc", choices=["acc", "acc_norm"])
    rep.set_defaults(func=cmd_report)

    models = sub.add_parser("models", help="the registry of pretrained models usable offline")
    models.add_argument("--fetch", nargs="+", metavar="NAME", help="fetch and convert these now")
    models.set_defaults(func=cmd_models)

    certs = sub.add_parser("certs", help="test TLS and SuperNode credentials (docs/DEPLOYMENT.md)")
    certs.add_argument("dir", help="where to write them")
    certs.add_argument("--supernodes", type=int, default=3, help="key pairs to make")
    certs.set_defaults(func=cmd_certs)
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
