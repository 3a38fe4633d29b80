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

from fedcollm.evaluation.multiple_choice import stderr
from fedcollm.experiments.methods import load_results
from fedcollm.tracking.metrics import human_bytes

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

# (block, row label, method, which score)
TABLE1_ROWS = [
    ("LLM", "Zero-shot", "zero-shot", "llm"),
    ("LLM", "Centralized", "centralized", "llm"),
    ("LLM", "FedCoLLM", "fedcollm", "llm"),
    ("SLM, clients' own adapters", "Zero-shot", "zero-shot", "slm_clients"),
    ("SLM, clients' own adapters", "Standalone", "standalone", "slm_clients"),
    ("SLM, clients' own adapters", "FedAvg", "fedavg", "slm_clients"),
    ("SLM, clients' own adapters", "FedCoLLM", "fedcollm", "slm_clients"),
    ("SLM, global adapter", "FedAvg", "fedavg", "slm_global"),
    ("SLM, global adapter", "FedCoLLM", "fedcollm", "slm_global"),
]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (nan with a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def seed_score(result: dict[str, Any], which: str, metric: str) -> float | None:
    """One seed's score: the LLM, the global SLM, or the mean over the clients' SLMs."""
    value = result.get(which)
    if value is None:
        return None
    if which == "slm_clients":
        return statistics.fmean(c[metric] for c in value)
    return value[metric]


def questions_scored(result: dict[str, Any], which: str) -> int:
    value = result[which]
    return (value[0] if which == "slm_clients" else value)["n"]


def table1_cells(results: list[dict[str, Any]], metric: str) -> dict[tuple, tuple]:
    """(row index, task) -> (mean, ci half-width over seeds, seeds, questions)."""
    scores: dict[tuple, list[float]] = defaultdict(list)
    questions: dict[tuple, int] = {}
    for r in results:
        for i, (_, _, method, which) in enumerate(TABLE1_ROWS):
            if r["method"] == method and (s := seed_score(r, which, metric)) is not None:
                scores[i, r["task"]].append(s)
                questions[i, r["task"]] = questions_scored(r, which)
    return {key: (*mean_ci(v), len(v), questions[key]) for key, v in scores.items()}


def _cell(cell: tuple | None) -> str:
    """Mean over seeds, ± its 95% interval over seeds, and (se) the standard error that one
    seed's accuracy has on this many questions."""
    if cell is None:
        return "-"
    mean, ci, _, questions = cell
    se = f" (se {100 * stderr(mean, questions):.1f})"
    return f"{100 * mean:.1f}{se}" if math.isnan(ci) else f"{100 * mean:.1f} ± {100 * ci:.1f}{se}"


def table1(results: list[dict[str, Any]], metric: str = "acc") -> str:
    tasks = sorted({r["task"] for r in results})
    cells = table1_cells(results, metric)
    lines = [f"| model | method | {' | '.join(tasks)} |", "|---|---|" + "---|" * len(tasks)]
    for i, (block, label, _, _) in enumerate(TABLE1_ROWS):
        if any((i, t) in cells for t in tasks):
            row = " | ".join(_cell(cells.get((i, t))) for t in tasks)
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
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "seed", "model", "acc", "acc_norm", "n"])
        for r in results:
            for which in ("llm", "slm_global"):
                if r.get(which):
                    s = r[which]
                    writer.writerow(
                        [r["task"], r["method"], r["seed"], which, s["acc"], s["acc_norm"], s["n"]]
                    )
            for k, s in enumerate(r.get("slm_clients") or []):
                writer.writerow(
                    [
                        r["task"],
                        r["method"],
                        r["seed"],
                        f"slm_client{k}",
                        s["acc"],
                        s["acc_norm"],
                        s["n"],
                    ]
                )


def plot_rounds(results: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per round (mean over seeds) of the LLM and the global SLM, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results if r.get("history")})
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method, role, style in (
            ("fedcollm", "llm", "o-"),
            ("fedcollm", "slm", "s-"),
            ("fedavg", "slm", "s--"),
        ):
            runs = [
                r["history"]
                for r in results
                if (r["task"], r["method"]) == (task, method) and r.get("history")
            ]
            if not runs:
                continue
            rounds = [row["round"] for row in runs[0]]
            means = [
                statistics.fmean(h[i][f"{role}_acc"] for h in runs) for i in range(len(rounds))
            ]
            ax.plot(
                rounds, means, style, label=f"{method}: {'LLM' if role == 'llm' else 'global SLM'}"
            )
        ax.set(title=task, xlabel="round (0 = zero-shot)", ylabel="accuracy", xticks=rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_experiment_report(out: Path) -> Path:
    results = load_results(out)
    if not results:
        raise FileNotFoundError(f"{out} holds no results (runs/*/*/*/result.json)")
    write_csv(results, out / "results.csv")
    plot_rounds(results, out / "accuracy_per_round.png")
    seeds = sorted({r["seed"] for r in results})
    text = f"""# FedCoLLM experiment

{len(results)} runs; seeds {seeds}. Cells: accuracy in % (mean over seeds ± half-width of
the 95% confidence interval, Student t; no interval with one seed), then in brackets the
standard error one seed's accuracy has on the questions scored (lm-eval's acc_stderr).

- **SLM, clients' own adapters**: each client's adapter after its last local update, scored
  on the evaluation split and averaged over clients (the paper's client rows).
- **SLM, global adapter**: the adapter the server holds at the end (for FedCoLLM: after
  distillation).

## Table 1: accuracy (acc)

{table1(results, "acc")}

## Table 1: length-normalised accuracy (acc_norm)

{table1(results, "acc_norm")}

## Table 2: communication of the SLM per round

{table2(results)}

![accuracy per round](accuracy_per_round.png)
"""
    path = out / "report.md"
    path.write_text(text)
    return path


def compare(a: Path, b: Path, metric: str = "acc") -> str:
    """Table 1 of two experiments side by side, with B - A."""
    cells_a, cells_b = (table1_cells(load_results(d), metric) for d in (a, b))
    lines = [f"| model | method | task | A: {a} | B: {b} | B - A |", "|---|---|---|---|---|---|"]
    for key in sorted(set(cells_a) | set(cells_b)):
        block, label, _, _ = TABLE1_ROWS[key[0]]
        ca, cb = cells_a.get(key), cells_b.get(key)
        diff = f"{100 * (cb[0] - ca[0]):+.1f}" if ca and cb else "-"
        lines.append(f"| {block} | {label} | {key[1]} | {_cell(ca)} | {_cell(cb)} | {diff} |")
    return "\n".join(lines)
