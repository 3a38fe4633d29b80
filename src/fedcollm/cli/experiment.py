"""`fedcollm experiment` (every method, seed, task and sweep point) and `fedcollm report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcollm.cli.common import check_run, prepare_models
from fedcollm.config import Config, ConfigError, load_config
from fedcollm.errors import DataError


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
        prepare_models(point_config)
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
