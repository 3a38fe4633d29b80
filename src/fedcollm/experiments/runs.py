"""An experiment's runs on disk: each (task, method, seed) in `runs/<task>/<method>/seed<seed>/`,
run when missing, kept when done (and checked against the config), read back whole.

The methods themselves are `methods.py`'s; with clients of several SLMs the results read
back are each group's (`grouped.py`).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import fedcollm.experiments.methods  # noqa: F401  - registers the methods
from fedcollm.config import Config, ConfigError, differences
from fedcollm.data import get_task
from fedcollm.experiments.grouped import per_group
from fedcollm.registry import METHODS


def method_config(config: Config, task: str, method: str, seed: int) -> Config:
    run = copy.deepcopy(config)
    run.task, run.seed = task, seed
    run.eval.clients = True
    METHODS[method].configure(run)
    return run


def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    """Where one run lives; a task file's runs under the task's name."""
    return out / "runs" / get_task(task).name / method / f"seed{seed}"


# Config keys that change how a run is carried out or recorded, not what it computes.
UNSCORED_KEYS = {
    "federation.round_timeout",
    "federation.client_cpus",
    "federation.client_gpus",
    "eval.every",
    "tracking",
}


def check_kept(done: Path, run: Config) -> None:
    """A result kept from an earlier invocation must be of this run's config: a re-run with
    other settings never mixes old results with new ones."""
    kept = read_result(done)
    if "config" not in kept:
        raise ConfigError(f"{done} is damaged; delete it to run that method again")
    changed = [k for k in differences(kept["config"], run) if k not in UNSCORED_KEYS]
    if changed:
        raise ConfigError(
            f"{done.parent} was run with another config ({', '.join(changed)} differ); choose "
            f"another --out, or delete {done.parent} to run it with this one"
        )


def run_experiment(
    config: Config, methods: list[str], seeds: list[int], tasks: list[str], out: Path
) -> list[dict[str, Any]]:
    """Run what is missing under `out`, then return every result there. Every result kept
    there is checked against this config before anything runs."""
    plan = [(t, s, m) for t in tasks for s in seeds for m in methods]
    for task, seed, method in plan:
        done = run_dir(out, task, method, seed) / "result.json"
        if done.is_file():
            check_kept(done, method_config(config, task, method, seed))
    for number, (task, seed, method) in enumerate(plan, start=1):
        directory = run_dir(out, task, method, seed)
        done = directory / "result.json"
        label = f"[{number}/{len(plan)}] {get_task(task).name} {method} seed {seed}"
        if done.is_file():
            print(f"{label}: done before, kept", flush=True)
            continue
        print(f"{label}: running", flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run = method_config(config, task, method, seed)
        result = METHODS[method].run(run, directory)
        result.update(
            task=get_task(task).name,
            metrics=list(get_task(task).metric_names[:2]),
            method=method,
            seed=seed,
            seconds=time.perf_counter() - start,
            config=run.to_dict(),
        )
        partial = done.with_suffix(".partial")
        partial.write_text(json.dumps(result, indent=1))
        partial.rename(done)  # a result is there whole or not at all
        print(f"{label}: finished in {result['seconds']:.0f} s", flush=True)
    return load_results(out)


RESULT_KEYS = ("task", "method", "seed")


def read_result(path: Path) -> dict[str, Any]:
    """One run's result.json, whole (task, method and seed at least), else ConfigError."""
    try:
        result = json.loads(path.read_text())
        if isinstance(result, dict) and all(k in result for k in RESULT_KEYS):
            return result
    except (OSError, ValueError):
        pass
    raise ConfigError(f"{path} is damaged; delete it to run that method again")


def load_results(out: Path, missing: list[str] | None = None) -> list[dict[str, Any]]:
    """Every whole result under `out`. A damaged result.json is an error naming it, or,
    with `missing` given, is left out and said there, with every run not finished yet."""
    results = []
    for run in sorted(p for p in (out / "runs").glob("*/*/*") if p.is_dir()):
        path = run / "result.json"
        label = " ".join(run.parts[-3:])
        if not path.is_file():
            if missing is not None:
                missing.append(f"{label}: not finished (no result.json yet)")
            continue
        try:
            results.append(read_result(path))
        except ConfigError:
            if missing is None:
                raise
            missing.append(f"{label}: {path} is damaged; delete it and run the experiment again")
    return per_group(results)
