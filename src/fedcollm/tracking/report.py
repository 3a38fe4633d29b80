"""What a person reads after a run: `report.md` (the summary table) and `accuracy.png`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcollm.tracking.metrics import summary_table


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy of the server LLM and the global SLM per round (round 0: zero-shot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for role, label, colour in (
        ("llm", "server LLM", "tab:blue"),
        ("slm", "global SLM", "tab:orange"),
    ):
        ax.plot(rounds, [r[f"{role}_acc"] for r in rows], "o-", color=colour, label=f"{label} acc")
        ax.plot(
            rounds,
            [r[f"{role}_acc_norm"] for r in rows],
            "s--",
            color=colour,
            alpha=0.6,
            label=f"{label} acc_norm",
        )
    last = rows[-1]
    title = f"{last['task']}: {last['eval_questions']} {last['eval_split']} questions"
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
