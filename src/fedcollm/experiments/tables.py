"""The experiment report: Table 1 (accuracy), Table 2 (communication), results.csv, plots.

Everything here is rebuilt from the `result.json` files an experiment leaves, so
`fedcollm report DIR` works on any finished or half-finished experiment directory.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedcollm.config import ConfigError
from fedcollm.evaluation.metrics import is_share, shown
from fedcollm.experiments.claims import significance_section
from fedcollm.experiments.runs import load_results
from fedcollm.experiments.significance import RESAMPLES, seed_score
from fedcollm.registry import METHODS
from fedcollm.tracking.metrics import human_bytes, row_metrics
from fedcollm.tracking.plots import figure

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1 seeds).
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}

# Table 1's blocks: (heading, the role scored).
BLOCKS = (
    ("LLM", "llm"),
    ("SLM, clients' own adapters", "slm_clients"),
    ("SLM, global adapter", "slm_global"),
)


def table1_rows() -> list[tuple[str, str, str, str]]:
    """(block, row label, method, role): each registered method in each block it scores."""
    return [
        (block, method.label, method.name, role)
        for block, role in BLOCKS
        for method in METHODS.values()
        if role in method.scores
    ]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (nan with a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def table1_cells(results: list[dict[str, Any]], metric: str) -> dict[tuple, tuple]:
    """(row index, task) -> (mean, ci half-width over seeds, seeds, mean standard error)."""
    scores: dict[tuple, list[float]] = defaultdict(list)
    errors: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        for i, (_, _, method, which) in enumerate(table1_rows()):
            if r["method"] == method and (s := seed_score(r, which, metric)) is not None:
                scores[i, r["task"]].append(s[0])
                errors[i, r["task"]].append(s[1])
    return {key: (*mean_ci(v), len(v), statistics.fmean(errors[key])) for key, v in scores.items()}


def _cell(cell: tuple | None, metric: str = "acc") -> str:
    """Mean over seeds, ± its 95% interval over seeds, and (se) the standard error that one
    seed's score has on the questions scored; shares in %, losses as they are."""
    if cell is None:
        return "-"
    mean, ci, _, se = cell
    scale, digits, _ = shown(metric)
    text = f"{scale * mean:.{digits}f}"
    if not math.isnan(ci):
        text += f" ± {scale * ci:.{digits}f}"
    return f"{text} (se {scale * se:.{digits}f})"


def majority_floors(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each multiple-choice task's majority-class floor on its evaluation questions."""
    floors = {}
    for r in results:
        for which in ("llm", "slm_global"):
            if r.get(which) and "majority" in r[which]:
                floors[r["task"]] = r[which]["majority"]
    return floors


def report_metrics(results: list[dict[str, Any]]) -> list[str]:
    """The metrics the report tabulates: each task's two, in order (older results: acc)."""
    names: list[str] = []
    for r in results:
        for metric in row_metrics(r):
            if metric not in names:
                names.append(metric)
    return names


def table1(results: list[dict[str, Any]], metric: str = "acc") -> str:
    tasks = sorted({r["task"] for r in results})
    cells = table1_cells(results, metric)
    lines = [f"| model | method | {' | '.join(tasks)} |", "|---|---|" + "---|" * len(tasks)]
    for i, (block, label, _, _) in enumerate(table1_rows()):
        if any((i, t) in cells for t in tasks):
            row = " | ".join(_cell(cells.get((i, t)), metric) for t in tasks)
            lines.append(f"| {block} | {label} | {row} |")
    return "\n".join(lines)


def table2(results: list[dict[str, Any]]) -> str:
    """Trainable and communicated parameters of the SLM per round, full model vs adapter."""
    lines = [
        "| SLM | full model params | adapter params | share | bytes per client per round, "
        "full model (fp32, both ways) | adapter (measured on the wire payload) |",
        "|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in results:
        history = r.get("history")
        if not history or r["config"]["slm"]["name"] in seen:
            continue
        seen.add(r["config"]["slm"]["name"])
        last = history[-1]
        full, adapter = last["slm_params"], last["adapter_params"]
        per_client = statistics.fmean(
            c["bytes_sent"] + c["bytes_received"] for c in last["clients"]
        )
        lines.append(
            f"| {r['config']['slm']['name']} | {full:,} | {adapter:,} | "
            f"{100 * adapter / full:.3f}% | {human_bytes(8 * full)} | {human_bytes(per_client)} |"
        )
    for name, full, adapter in paper_reference_sizes():
        lines.append(
            f"| {name} (paper's model, our default LoRA) | {full:,} | {adapter:,} | "
            f"{100 * adapter / full:.3f}% | {human_bytes(8 * full)} | "
            f"{human_bytes(8 * adapter)} |"
        )
    return "\n".join(lines)


def paper_reference_sizes() -> list[tuple[str, int, int]]:
    """GPT-2-Small and OPT-1.3B with our default LoRA (r 8), built on the meta device."""
    import torch
    import transformers

    from fedcollm.config import LoraConfig
    from fedcollm.models import add_lora

    sizes = []
    for name, config in (
        ("GPT-2-Small", transformers.GPT2Config()),
        (
            "OPT-1.3B",
            transformers.OPTConfig(
                hidden_size=2048,
                num_hidden_layers=24,
                ffn_dim=8192,
                num_attention_heads=32,
                word_embed_proj_dim=2048,
            ),
        ),
    ):
        with torch.device("meta"):
            model = add_lora(transformers.AutoModelForCausalLM.from_config(config), LoraConfig())
        adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        full = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        sizes.append((name, full, adapter))
    return sizes


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    """One line per run, model and metric: the score and its standard error."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "seed", "model", "metric", "value", "stderr", "n"])
        for r in results:
            scored = [(which, r.get(which)) for which in ("llm", "slm_global")]
            scored += [(f"slm_client{k}", s) for k, s in enumerate(r.get("slm_clients") or [])]
            for model, s in scored:
                for metric in row_metrics(r):
                    if s and metric in s:
                        error = s.get(f"{metric}_stderr", "")
                        row = [r["task"], r["method"], r["seed"], model, metric, s[metric]]
                        writer.writerow([*row, error, s["n"]])


def plot_rounds(results: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per round of the LLM and the global SLM per task: the mean over seeds with
    its 95% interval (Student t; no bar with one seed)."""
    tasks = sorted({r["task"] for r in results if r.get("history")})
    if not tasks:
        return
    with figure(path, 1, len(tasks), figsize=(5 * len(tasks), 4), dpi=110, squeeze=False) as (
        fig,
        axes,
    ):
        floors = majority_floors(results)
        for ax, task in zip(axes[0], tasks, strict=True):
            rounds: list[int] = []
            curves = [(m.name, role, style) for m in METHODS.values() for role, style in m.curves]
            for method, role, style in curves:
                runs = [
                    r["history"]
                    for r in results
                    if (r["task"], r["method"]) == (task, method) and r.get("history")
                ]
                if not runs:
                    continue
                metric = row_metrics(runs[0][-1])[0]
                key = f"{role}_{metric}"
                # Rounds scored in every seed (eval.every can leave rounds unscored).
                scored = [
                    row["round"]
                    for row in runs[0]
                    if all(any(r["round"] == row["round"] and key in r for r in h) for h in runs)
                ]
                cells = [
                    mean_ci([next(r[key] for r in h if r["round"] == n) for h in runs])
                    for n in scored
                ]
                untrained = _zero_shot(results, task, role, metric)
                if scored and scored[0] != 0 and untrained is not None:
                    # eval.every = 0 scores no round 0: the zero-shot method's score is its start.
                    scored, cells = [0, *scored], [(untrained, math.nan), *cells]
                ax.errorbar(
                    scored,
                    [mean for mean, _ in cells],
                    yerr=_error_bars(cells, metric),
                    fmt=style,
                    capsize=3,
                    label=f"{method}: {'LLM' if role == 'llm' else 'global SLM'}",
                )
                rounds = sorted({*rounds, *scored})
            floor = floors.get(task)
            if floor is not None and is_share(metric):
                ax.axhline(floor, color="grey", linestyle=":", label="majority-class floor")
            ax.set(title=task, xlabel="round (0 = zero-shot)", ylabel=metric, xticks=rounds)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)


def _zero_shot(results: list[dict[str, Any]], task: str, role: str, metric: str) -> float | None:
    """The zero-shot method's score of the role's model (the same for every seed)."""
    for r in results:
        scores = r.get("llm" if role == "llm" else "slm_global")
        untrained = r["method"] in METHODS and not METHODS[r["method"]].trains
        if r["task"] == task and untrained and scores and metric in scores:
            return scores[metric]
    return None


def _error_bars(cells: list[tuple[float, float]], metric: str):
    """The 95% intervals as error bars, cut at the metric's range (a share lies in [0, 1],
    a loss above 0): two seeds' t-interval easily reaches past both ends. A point without an
    interval (one seed, zero-shot) has none."""
    top = 1.0 if is_share(metric) else math.inf
    below, above = [], []
    for mean, half in cells:
        half = 0.0 if math.isnan(half) else half
        below.append(min(half, mean))
        above.append(min(half, top - mean))
    return None if not any(below + above) else [below, above]


def write_experiment_report(out: Path) -> Path:
    missing: list[str] = []
    results = load_results(out, missing)
    if not results:
        said = f" ({missing[0]}{' ...' if len(missing) > 1 else ''})" if missing else ""
        raise ConfigError(
            f"{out}: no finished run to report yet{said}; run `fedcollm experiment ... --out "
            f"{out}` (it resumes there)"
        )
    seeds = sorted({r["seed"] for r in results})
    tables = "\n\n".join(
        f"## Table 1: {metric}\n\n{table1(results, metric)}" for metric in report_metrics(results)
    )
    floors = majority_floors(results)
    if floors:
        tables += "\n\nMajority-class floor (always the most common answer): " + ", ".join(
            f"{task} {100 * share:.1f}%" for task, share in sorted(floors.items())
        )
    text = f"""# FedCoLLM experiment

{len(results)} runs; seeds {seeds}. Cells: the task's metric (shares in %, losses as they
are; mean over seeds ± half-width of the 95% confidence interval, Student t; no interval
with one seed), then in brackets the standard error one seed's score has on the questions
scored (lm-eval's *_stderr). A task with one metric shows "-" in the other's table.

- **SLM, clients' own adapters**: each client's adapter after its last local update, scored
  on the evaluation split and averaged over clients (the paper's client rows). For FedCoLLM
  that is before the last round's distillation: the clients never hold its result.
- **SLM, global adapter**: the adapter the server holds at the end (for FedCoLLM: after
  distillation). It is also what every client holds once the final theta is broadcast: a
  client with the final theta is this row.

{tables}

## Table 2: communication of the SLM per round

{table2(results)}

![accuracy per round](accuracy_per_round.png)

## Significance

Paired on the same questions and seeds: the mean difference with a bootstrap 95% interval
that resamples questions and seeds together ({RESAMPLES} resamples), an exact paired test
per seed (McNemar for one model against one; for the clients, a sign test over questions of
their mean correctness, since the clients share the questions and theta), and the smallest
difference this design detects at 80% power (2.80 standard errors of the difference).

{significance_section(results, out)}
"""
    if missing:
        text += "\n## Not in this report\n\n" + "\n".join(f"- {m}" for m in missing) + "\n"
    # Every output from the same results, written once all of them are made.
    write_csv(results, out / "results.csv")
    plot_rounds(results, out / "accuracy_per_round.png")
    path = out / "report.md"
    path.write_text(text)
    return path


def compare(a: Path, b: Path, metric: str = "acc") -> str:
    """Table 1 of two experiments side by side, with B - A."""
    cells_a, cells_b = (table1_cells(load_results(d), metric) for d in (a, b))
    lines = [f"| model | method | task | A: {a} | B: {b} | B - A |", "|---|---|---|---|---|---|"]
    for key in sorted(set(cells_a) | set(cells_b)):
        block, label, _, _ = table1_rows()[key[0]]
        ca, cb = cells_a.get(key), cells_b.get(key)
        diff = f"{100 * (cb[0] - ca[0]):+.1f}" if ca and cb else "-"
        lines.append(f"| {block} | {label} | {key[1]} | {_cell(ca)} | {_cell(cb)} | {diff} |")
    return "\n".join(lines)
