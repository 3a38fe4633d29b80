"""What a person reads after a run: `report.md` (the summary table) and `accuracy.png`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcollm.tracking.metrics import summary_table


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy of the server LLM and the global SLM per round (round 0: zero-shot), with
    error bars of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = [
        ("llm", "server LLM", "tab:blue", "acc", "o-", 1.0),
        ("llm", "server LLM", "tab:blue", "acc_norm", "s--", 0.6),
        ("slm", "global SLM", "tab:orange", "acc", "o-", 1.0),
        ("slm", "global SLM", "tab:orange", "acc_norm", "s--", 0.6),
    ]
    for k, (role, label, colour, metric, style, alpha) in enumerate(series):
        key = f"{role}_{metric}"
        # ± one standard error, where the rows have it (rows of older runs do not); each
        # series a little to the side, so that the bars do not hide each other.
        errors = [r.get(f"{key}_stderr") for r in rows]
        ax.errorbar(
            [r + 0.03 * (k - 1.5) for r in rounds],
            [r[key] for r in rows],
            yerr=errors if None not in errors else None,
            fmt=style,
            color=colour,
            alpha=alpha,
            capsize=3,
            label=f"{label} {metric}",
        )
    last = rows[-1]
    title = f"{last['task']}: {last['eval_questions']} {last['eval_split']} questions"
    title += "\n(bars: one standard error)"
    ax.set(
        xlabel="round (0 = zero-shot)", ylabel="accuracy", ylim=(0, 1), xticks=rounds, title=title
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], config: dict[str, Any], out_dir: Path) -> Path:
    plot_accuracy(rows, out_dir / "accuracy.png")
    models = f"server LLM `{config['llm']['name']}`, client SLM `{config['slm']['name']}`"
    setting = f"{config['num_clients']} clients, {config['rounds']} rounds, task `{config['task']}`"
    text = "\n".join(
        [
            "# FedCoLLM run",
            "",
            f"{setting}; {models}.",
            "Accuracy is multiple-choice log-likelihood (acc) and its length-normalised form"
            " (acc_norm); the SLM row is the global adapter after distillation.",
            "",
            "```",
            summary_table(rows),
            "```",
            "",
            "![accuracy per round](accuracy.png)",
            "",
            "Per-round details: `metrics.jsonl`; configuration: `config.json`.",
            "",
        ]
    )
    path = out_dir / "report.md"
    path.write_text(text)
    return path
