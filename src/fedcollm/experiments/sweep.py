"""Sweeps: the experiment (methods x seeds) at every point of a grid of config values.

`--sweep distill.kd_weight=0,1 --sweep lora.r=4,16` runs the Cartesian grid. Each point is an
experiment directory of its own, `sweep/<key=value,...>/`, resumable and reported like any
other; the sweep's report puts one table per swept key and a plot of the headline metric
against its value beside every point's verdicts.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedcollm.config import ConfigError
from fedcollm.evaluation.metrics import shown
from fedcollm.experiments.claims import significance_section
from fedcollm.experiments.runs import load_results
from fedcollm.experiments.significance import seed_score
from fedcollm.experiments.tables import mean_ci, table1_rows, write_experiment_report
from fedcollm.tracking.metrics import row_metrics
from fedcollm.tracking.plots import figure


def parse_sweeps(specs: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2,...` per spec -> {key: [v1, v2, ...]} (values as an override spells them)."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise ConfigError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. lora.r=4,8,16)")
        if key in grid:
            raise ConfigError(f"--sweep {key}: swept twice; give all its values in one --sweep")
        if len(set(choices)) < len(choices):
            raise ConfigError(f"--sweep {key}: a value is repeated in {values!r}")
        grid[key] = choices
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def point_label(point: dict[str, str]) -> str:
    """The point's directory name, e.g. `distill.kd_weight=0,lora.r=8`."""
    label = ",".join(f"{key}={value}" for key, value in point.items())
    return label.replace("/", "_").replace('"', "").replace("'", "")


def overrides(point: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in point.items()]


def point_dir(out: Path, point: dict[str, str]) -> Path:
    return out / "sweep" / point_label(point)


def write_grid(out: Path, grid: dict[str, list[str]]) -> None:
    """What `fedcollm report` needs to rebuild the sweep's report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"grid": grid}, indent=1))


def read_grid(out: Path) -> dict[str, list[str]] | None:
    """The sweep's grid, or None for a directory that is not a sweep."""
    path = out / "sweep.json"
    if not path.is_file():
        return None
    try:
        grid = json.loads(path.read_text())["grid"]
        if not isinstance(grid, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{path} is damaged (not a sweep's grid); run the sweep again with the same "
            "--out to rewrite it"
        ) from None
    return grid


def _config_value(result: dict[str, Any], key: str) -> Any:
    value: Any = result["config"]
    for part in key.split("."):
        value = value[part]
    return value


def sweep_cells(results: list[dict[str, Any]], key: str, metric: str):
    """(task, Table 1 row index, value of `key`) -> (mean, 95% half-width, seeds)."""
    scores: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        value = _config_value(r, key)
        for i, (_, _, method, which) in enumerate(table1_rows()):
            if r["method"] == method and (s := seed_score(r, which, metric)) is not None:
                scores[r["task"], i, value].append(s[0])
    return {k: (*mean_ci(v), len(v)) for k, v in scores.items()}


def _sorted_values(values) -> list:
    return sorted(
        values,
        key=lambda v: (not isinstance(v, int | float), v if isinstance(v, int | float) else str(v)),
    )


def sweep_table(results: list[dict[str, Any]], key: str, metric: str, task: str) -> str:
    cells = sweep_cells([r for r in results if r["task"] == task], key, metric)
    values = _sorted_values({v for (_, _, v) in cells})
    rows = sorted({i for (_, i, _) in cells})
    scale, digits, _ = shown(metric)
    head = f"| model | method | {' | '.join(f'{key} = {v}' for v in values)} |"
    lines = [head, "|---|---|" + "---|" * len(values)]
    for i in rows:
        block, label, _, _ = table1_rows()[i]
        texts = []
        for v in values:
            cell = cells.get((task, i, v))
            if cell is None:
                texts.append("-")
                continue
            mean, half, _ = cell
            text = f"{scale * mean:.{digits}f}"
            texts.append(text if math.isnan(half) else f"{text} ± {scale * half:.{digits}f}")
        lines.append(f"| {block} | {label} | {' | '.join(texts)} |")
    return "\n".join(lines)


def plot_sweep(results: list[dict[str, Any]], key: str, metric: str, task: str, path: Path):
    """The headline metric against the swept value, per (method, model), with the 95%
    interval over seeds (one seed: no bar)."""
    cells = sweep_cells([r for r in results if r["task"] == task], key, metric)
    values = _sorted_values({v for (_, _, v) in cells})
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    position = {v: (v if numeric else k) for k, v in enumerate(values)}
    scale = shown(metric)[0]
    with figure(path, figsize=(6.5, 4.2), dpi=110) as (fig, ax):
        rows = sorted({i for (_, i, _) in cells})
        for n, i in enumerate(rows):
            block, label, _, _ = table1_rows()[i]
            here = [v for v in values if (task, i, v) in cells]
            means = [scale * cells[task, i, v][0] for v in here]
            halves = [cells[task, i, v][1] for v in here]
            errors = None if any(math.isnan(h) for h in halves) else [scale * h for h in halves]
            offset = 0.0 if numeric else 0.04 * (n - len(rows) / 2)
            ax.errorbar(
                [position[v] + offset for v in here],
                means,
                yerr=errors,
                fmt="o-",
                capsize=3,
                label=f"{label}: {block}",
            )
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        elif len(values) > 1:
            ax.set_xticks(values)
        ax.set(
            xlabel=key,
            ylabel=metric + (" (%)" if shown(metric)[2] else ""),
            title=f"{task}: {metric} against {key}\n(mean over seeds, bars: 95% interval)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def write_sweep_report(out: Path) -> Path:
    """The sweep's report.md (and each point's own), from the results under out/sweep/."""
    grid = read_grid(out)
    if grid is None:
        raise FileNotFoundError(f"{out} holds no sweep (sweep.json)")
    points = [p for p in grid_points(grid) if (point_dir(out, p) / "runs").is_dir()]
    if not points:
        raise FileNotFoundError(f"{out} holds no results under sweep/")
    every = []
    for point in points:
        write_experiment_report(point_dir(out, point))
        every += load_results(point_dir(out, point))
    tasks = sorted({r["task"] for r in every})
    seeds = sorted({r["seed"] for r in every})
    methods = sorted({r["method"] for r in every})
    parts = [
        "# FedCoLLM sweep",
        "",
        f"Grid: {', '.join(f'`{k}` in {v}' for k, v in grid.items())}; methods "
        f"{', '.join(methods)}; seeds {seeds}. Cells: mean over seeds ± half-width of the 95% "
        "interval (Student t; none with one seed), in % for shares. Each point's own report, "
        "with Table 1 and Table 2 in full, is `sweep/<point>/report.md`.",
        "",
    ]
    for key in grid:
        for task in tasks:
            metric = row_metrics(next(r for r in every if r["task"] == task))[0]
            plot = out / f"sweep_{task}_{key}.png"
            plot_sweep(every, key, metric, task, plot)
            parts += [
                f"## {task}: {metric} against `{key}`",
                "",
                sweep_table(every, key, metric, task),
                "",
                f"![{metric} against {key}]({plot.name})",
                "",
            ]
    parts += ["## Significance at each point", ""]
    for point in points:
        results = load_results(point_dir(out, point))
        parts += [f"## {point_label(point)}", ""]
        parts.append(significance_section(results, out, prefix=f"{point_label(point)}_"))
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
