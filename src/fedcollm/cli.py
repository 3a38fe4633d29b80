"""The `fedcollm` command: `run` a co-tuning job, run an `experiment` and its `report`,
`evaluate` a model, list `models`, write test `certs` for a deployment."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from fedcollm.config import Config, ConfigError, ModelConfig, load_config
from fedcollm.console import plain_when_logged
from fedcollm.errors import DataError, ModelError, RegistryError

# Nothing heavier is imported here: `fedcollm --help` and a refused command answer before
# torch and transformers load; each command imports what it needs.
USER_ERRORS = (ConfigError, DataError, ModelError, RegistryError)
MAX_SUPERNODES = 1000  # test credentials for a deployment, not a key store


def check_run(config: Config, simulated: bool = True) -> Config:
    from fedcollm.preflight import check_run as preflight

    return preflight(config, simulated)


def cmd_run(args: argparse.Namespace) -> int:
    """Every check first (config, data, output directory, checkpoint, models), then the
    simulation: a run that is refused has written nothing and started nothing."""
    config = check_run(load_config(args.config, overrides=args.set, data_dir=args.data_dir))
    from fedcollm.federation.simulation import simulate  # heavy: only for a valid config
    from fedcollm.preflight import check_data, check_models
    from fedcollm.tracking import checkpoint as ckpt
    from fedcollm.tracking.run_dir import prepare_run

    split = check_data(config)
    if split.duplicates:
        print(
            f"data: {split.duplicates} training rows repeat an earlier row (the same "
            "question, choices and answer) and are left out",
            file=sys.stderr,
        )
    out_dir = Path(args.out or f"runs/{Path(args.config).stem}")
    resume = args.resume
    if args.continue_run:
        resume = ckpt.latest_round(out_dir / "checkpoint") is not None
    start = prepare_run(config, out_dir, resume, split)
    if args.continue_run and resume and _finished(out_dir, start.checkpoint, config):
        return 0
    try:
        _prepare_models(config)
        check_models(config)
        _check_gpu_memory(config)
    except USER_ERRORS:
        start.abandon()
        raise
    print(
        f"fedcollm run: {config.num_clients} clients, {config.rounds} rounds, "
        f"task {config.task}, output in {out_dir}",
        flush=True,
    )
    simulate(config, out_dir, verbose=args.verbose, resume=resume, start=start)
    return 0


def _finished(out_dir: Path, checkpoint, config) -> bool:
    """A run that has done all its rounds: say where its results are instead of rerunning."""
    from fedcollm.tracking.metrics import read_metrics, summary_table

    metrics = out_dir / "metrics.jsonl"
    if checkpoint.server_round < config.rounds or not (out_dir / "adapters").is_dir():
        return False
    print(summary_table(read_metrics(metrics) if metrics.is_file() else checkpoint.rows))
    print(f"\n{out_dir} holds this finished run (all {config.rounds} rounds)")
    print(f"report: {out_dir / 'report.md'}\nmetrics: {metrics}\nadapters: {out_dir / 'adapters'}")
    print(f"to run it again from the start: rm -r {out_dir}, or choose another --out")
    return True


def _prepare_models(config) -> None:
    """Fetch and convert registry models once, before any server or client loads them."""
    from fedcollm.models import model_path
    from fedcollm.preflight import model_specs

    for _, spec in model_specs(config):
        if spec.name != "tiny":
            model_path(spec.name)


def _check_gpu_memory(config) -> None:
    """Clients sharing a GPU (federation.client_gpus) must fit on it, by the memory plan."""
    import torch

    if config.federation.client_gpus > 0 and torch.cuda.is_available():
        from fedcollm.plan import check_clients_fit

        check_clients_fit(config, torch.cuda.get_device_properties(0).total_memory)


def cmd_plan(args: argparse.Namespace) -> int:
    """The predicted peak memory of the server and of one client (plan.py), from the
    models' configs only; with --device-memory, how many simulated clients fit on one."""
    config = check_run(load_config(args.config, overrides=args.set), simulated=False)
    from fedcollm.plan import memory_plan, parse_size, plan_table
    from fedcollm.preflight import check_models

    device = parse_size(args.device_memory) if args.device_memory else None
    _prepare_models(config)
    check_models(config)
    print(plan_table(config, memory_plan(config), device))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from fedcollm.registry import METHODS

    config = check_run(load_config(args.config, overrides=args.set, data_dir=args.data_dir))
    chosen = args.methods or ",".join(m.name for m in METHODS.values() if m.default)
    methods = [m.strip() for m in chosen.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods {args.methods!r}: name at least one method")
    tasks = [t.strip() for t in (args.tasks or config.task).split(",") if t.strip()]
    for method in methods:
        if method not in METHODS:
            raise ConfigError(
                f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}"
            )
    if args.seeds < 1:
        raise ConfigError("--seeds: must be 1 or more")
    _check_task_names(tasks)
    from fedcollm.experiments import sweep
    from fedcollm.experiments.runs import run_experiment
    from fedcollm.experiments.tables import write_experiment_report
    from fedcollm.preflight import check_data, check_models
    from fedcollm.tracking.run_dir import check_writable, hold

    grid = sweep.parse_sweeps(args.sweep)
    points = sweep.grid_points(grid) if grid else [{}]
    configs = []  # every point's config and every task's data are read before a run starts
    for point in points:
        extra = [*args.set, *sweep.overrides(point)]
        configs.append(check_run(load_config(args.config, overrides=extra, data_dir=args.data_dir)))
        for task in tasks:
            with_task = [*extra, f"task={task!r}"]
            check_data(
                check_run(load_config(args.config, overrides=with_task, data_dir=args.data_dir))
            )
    out = Path(args.out or f"runs/experiment-{Path(args.config).stem}")
    check_writable(out)
    hold(out)  # one experiment at a time in a directory
    for point_config in configs:
        _prepare_models(point_config)
        check_models(point_config)

    def seeds(base: Config) -> list[int]:  # a swept `seed` moves every run's seed
        return [base.seed + i for i in range(args.seeds)]

    if not grid:
        run_experiment(config, methods, seeds(config), tasks, out)
        print(f"\nreport: {write_experiment_report(out)}")
        print((out / "report.md").read_text())
        return 0
    sweep.write_grid(out, grid)
    for number, (point, point_config) in enumerate(zip(points, configs, strict=True), start=1):
        print(f"sweep point {number}/{len(points)}: {sweep.point_label(point)}", flush=True)
        run_experiment(
            point_config, methods, seeds(point_config), tasks, sweep.point_dir(out, point)
        )
    print(f"\nreport: {sweep.write_sweep_report(out)}")
    print((out / "report.md").read_text())
    return 0


def _check_task_names(tasks: list[str]) -> None:
    """Each task of an experiment has a name of its own: results live under it."""
    from fedcollm.data import get_task

    named: dict[str, str] = {}
    for task in tasks:
        try:
            name = get_task(task).name
        except DataError as err:
            raise ConfigError(f"--tasks: {err}") from None
        if name in named:
            raise ConfigError(
                f"--tasks: {named[name]} and {task} are both named {name!r}, and results live "
                "under the task's name; give one of them another `task:` name"
            )
        named[name] = task


def cmd_audit(args: argparse.Namespace) -> int:
    """The leakage audit (experiments/audit.py): a run with canaries in client 0's data, then
    what each artefact gives away; audit.json and audit.md in --out. With --compare, the
    audits in the given directories side by side (comparison.md, comparison.png)."""
    if args.compare:
        return _compare_audits(args)
    config = check_run(load_config(args.config, overrides=args.set, data_dir=args.data_dir))
    if args.attack == "reconstruction":
        return _reconstruction_audit(config, args)
    from fedcollm.experiments.audit import (
        NAMES,
        SECRETS,
        AuditSettings,
        audit_table,
        run_audit,
    )
    from fedcollm.preflight import check_data, check_models
    from fedcollm.tracking.run_dir import check_writable

    if min(args.canaries, args.repeats, args.candidates) < 1:
        raise ConfigError("--canaries, --repeats and --candidates: each must be 1 or more")
    if args.canaries > len(NAMES):
        raise ConfigError(f"--canaries: between 1 and {len(NAMES)}, got {args.canaries}")
    if args.candidates > SECRETS - args.canaries:
        raise ConfigError(
            f"--candidates: at most {SECRETS - args.canaries:,} (the six-digit secrets not "
            f"inserted), got {args.candidates:,}"
        )
    check_data(config)
    out = Path(args.out or f"runs/audit-{Path(args.config).stem}")
    check_writable(out)
    _prepare_models(config)
    check_models(config)
    settings = AuditSettings(args.canaries, args.repeats, args.candidates)
    results = run_audit(config, settings, progress=lambda m: print(m, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps({"config": config.to_dict(), **results}, indent=2))
    table = audit_table(results)
    (out / "audit.md").write_text(table + "\n")
    print(f"\n{table}\n\naudit: {out / 'audit.json'}")
    return 0


def _reconstruction_audit(config, args: argparse.Namespace) -> int:
    """What the server reads of client batches from one AdamW step's uploads
    (experiments/reconstruction_audit.py): reconstruction.json, .md and .png in --out."""
    from fedcollm.experiments.reconstruction_audit import (
        AttackSettings,
        plot_reconstruction,
        reconstruction_table,
        run_reconstruction,
    )
    from fedcollm.preflight import check_data, check_models
    from fedcollm.tracking.run_dir import check_writable

    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise ConfigError(
            f"--batches: comma-separated sizes such as 1,4,16, got {args.batches!r}"
        ) from None
    if min(*batches, args.draws, args.steps) < 1:
        raise ConfigError("--batches, --draws and --steps: each must be 1 or more")
    check_data(config)
    out = Path(args.out or f"runs/audit-{Path(args.config).stem}")
    check_writable(out)
    _prepare_models(config)
    check_models(config)
    settings = AttackSettings(batches, args.draws, args.steps)
    results = run_reconstruction(config, settings, progress=lambda m: print(m, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconstruction.json").write_text(json.dumps(results, indent=2))
    table = reconstruction_table(results)
    (out / "reconstruction.md").write_text(table + "\n")
    plot_reconstruction(results, out / "reconstruction.png")
    print(f"\n{table}\n\nreconstruction: {out / 'reconstruction.md'}, {out / 'reconstruction.png'}")
    return 0


def _compare_audits(args: argparse.Namespace) -> int:
    from fedcollm.experiments.audit import comparison_table, plot_comparison
    from fedcollm.tracking.run_dir import check_writable

    audits = []
    for directory in [args.config, *args.compare]:
        path = Path(directory) / "audit.json"
        if not path.is_file():
            raise ConfigError(f"--compare: {directory} holds no audit.json; run fedcollm audit")
        try:
            audit = json.loads(path.read_text())
            if not isinstance(audit, dict) or "artefacts" not in audit:
                raise ValueError
        except (OSError, ValueError):
            raise ConfigError(
                f"--compare: {path} is damaged (not an audit's results); run fedcollm audit "
                "again into that directory"
            ) from None
        audits.append(audit)
    out = Path(args.out or "runs/audit-comparison")
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(audits)
    (out / "comparison.md").write_text(table + "\n")
    plot_comparison(audits, out / "comparison.png")
    print(f"{table}\n\n{out / 'comparison.md'}\n{out / 'comparison.png'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedcollm.experiments.sweep import read_grid, write_sweep_report
    from fedcollm.experiments.tables import compare, write_experiment_report
    from fedcollm.tracking.run_dir import check_writable

    if len(args.dirs) == 1:  # the report, its table and plots are written beside the runs
        check_writable(Path(args.dirs[0]), "report", "copy the directory somewhere writable")
    if len(args.dirs) == 1 and read_grid(Path(args.dirs[0])) is not None:
        print(write_sweep_report(Path(args.dirs[0])).read_text())
        return 0
    for directory in args.dirs:
        if not (Path(directory) / "runs").is_dir():
            raise ConfigError(f"{directory}: not an experiment directory (it has no runs/)")
    if len(args.dirs) == 1:
        print(write_experiment_report(Path(args.dirs[0])).read_text())
    else:
        print(compare(Path(args.dirs[0]), Path(args.dirs[1]), args.metric))
    return 0


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
    run.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="resume the run in --out if there is one, else start it; a finished run "
        "shows its results",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("evaluate", help="a task's metrics of one model (and adapter)")
    ev.add_argument(
        "--model",
        help='"tiny", a registry name (fedcollm models), a model directory or a hub id',
    )
    ev.add_argument(
        "--config",
        help="instead of --model: the run's TOML file, whose model (--role) is evaluated",
    )
    ev.add_argument("--role", choices=["slm", "llm"], default="slm", help="with --config")
    ev.add_argument("--adapter", help="a saved PEFT adapter directory to apply")
    ev.add_argument(
        "--task", help="a built-in task (fedcollm tasks) or a task file; with --config: its task"
    )
    ev.add_argument("--data-dir", help="where the task's relative data files are")
    ev.add_argument(
        "--split",
        default="",
        choices=["", "train", "validation", "test"],
        help="the task's split to score (default: validation, else test)",
    )
    ev.add_argument("--limit", type=int, default=0, help="N questions only (see --sample)")
    ev.add_argument(
        "--sample",
        default="first",
        choices=["first", "random"],
        help="with --limit: the first N (lm-eval's --limit) or a fixed random draw of N",
    )
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument(
        "--max-length", type=int, default=0, help="tokens per (prompt, choice); 0: the model's"
    )
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--seed", type=int, default=0, help="seed of a tiny model's weights")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_evaluate)

    exp = sub.add_parser("experiment", help="the paper's comparison: every method, every seed")
    exp.add_argument("config", help="TOML experiment file (models, split, budget)")
    exp.add_argument(
        "--methods",
        default="",
        help="comma-separated (default: zero-shot,standalone,fedavg,centralized,fedcollm)",
    )
    exp.add_argument("--seeds", type=int, default=3, help="seeds seed, seed+1, ...")
    exp.add_argument("--tasks", help="comma-separated tasks (default: the config's task)")
    exp.add_argument("--data-dir", help="directory holding <task>/<split>.jsonl")
    exp.add_argument("--out", help="experiment directory; a re-run resumes there")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    exp.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="run the experiment at each value (several --sweep: their Cartesian grid)",
    )
    exp.set_defaults(func=cmd_experiment)

    audit = sub.add_parser("audit", help="leakage audit: canary exposure, membership inference")
    audit.add_argument("config", help="the run's TOML file (with --compare: an audit directory)")
    audit.add_argument(
        "--compare", nargs="+", metavar="DIR", help="more audit directories to set beside it"
    )
    audit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    audit.add_argument("--data-dir")
    audit.add_argument("--out", help="where audit.json and audit.md go")
    audit.add_argument("--canaries", type=int, default=5, help="secrets in client 0's data")
    audit.add_argument("--repeats", type=int, default=10, help="copies of each secret")
    audit.add_argument("--candidates", type=int, default=200, help="secrets ranked against")
    audit.add_argument(
        "--attack",
        choices=["canary", "reconstruction"],
        default="canary",
        help="canary: exposure and membership (default); reconstruction: text from uploads",
    )
    audit.add_argument("--batches", default="1,4,16", help="reconstruction: batch sizes")
    audit.add_argument("--draws", type=int, default=2, help="reconstruction: batches per size")
    audit.add_argument(
        "--steps", type=int, default=1, help="reconstruction: AdamW steps each client takes"
    )
    audit.set_defaults(func=cmd_audit)
    plan = sub.add_parser("plan", help="predicted peak memory of the server and a client")
    plan.add_argument("config", help="the run's TOML file")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument(
        "--device-memory", metavar="SIZE", help="e.g. 80GiB: how many clients fit on one device"
    )
    plan.set_defaults(func=cmd_plan)
    rep = sub.add_parser("report", help="rebuild an experiment's report, or compare two")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="one directory, or two to compare")
    rep.add_argument("--metric", default="acc", help="acc, acc_norm, rougeL, target_loss...")
    rep.set_defaults(func=cmd_report)

    models = sub.add_parser("models", help="the registry of pretrained models usable offline")
    models.add_argument("--fetch", nargs="+", metavar="NAME", help="fetch and convert these now")
    models.set_defaults(func=cmd_models)

    tasks = sub.add_parser("tasks", help="the built-in tasks: kind, splits and metrics")
    tasks.add_argument("files", nargs="*", metavar="FILE", help="task files to check and show")
    tasks.set_defaults(func=cmd_tasks)

    certs = sub.add_parser("certs", help="test TLS and SuperNode credentials (docs/DEPLOYMENT.md)")
    certs.add_argument("dir", help="where to write them")
    certs.add_argument("--supernodes", type=int, default=3, help="key pairs to make")
    certs.set_defaults(func=cmd_certs)
    return p


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    plain_when_logged()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # a clean exit, not the default kill
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from fedcollm.federation.processes import RunInterrupted

        if not isinstance(err, RunInterrupted):
            raise
        print(f"\n{err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Flower's ServerApp thread may still wait for replies that will never come.
        os._exit(err.exit_code)


if __name__ == "__main__":
    sys.exit(main())
