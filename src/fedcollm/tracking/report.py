"""What a person reads after a run: `report.md` (the summary table) and `accuracy.png`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcollm.evaluation.metrics import is_share
from fedcollm.tracking.metrics import row_metrics, slm_roles, summary_table
from fedcollm.tracking.plots import figure


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """The task's two metrics of the server LLM and the global SLM per round (round 0:
    zero-shot), with error bars of one standard error; a loss on an axis of its own."""
    roles = slm_roles(rows[-1]) if rows else ["slm"]
    rows = [r for r in rows if r.get(f"{roles[0]}_{row_metrics(r)[0]}") is not None]  # scored
    rounds = [r["round"] for r in rows]
    first, second = row_metrics(rows[-1])[:2]
    # The legend goes below the axes, where it hides no point (the LLM's round-0 score sat
    # under it, top left): two columns, the figure taller by its rows.
    legend_rows = (2 * (1 + len(roles)) + 1 + 1) // 2
    with figure(path, figsize=(6, 3.6 + 0.2 * legend_rows), dpi=120) as (fig, ax):
        loss_ax = ax.twinx() if not is_share(second) else ax
        models = [("llm", "server LLM", "tab:blue")] + [
            (role, f"global SLM{role[3:]}", f"C{k}") for k, role in enumerate(roles, start=1)
        ]
        series = [
            (role, label, colour, metric, style, alpha)
            for role, label, colour in models
            for metric, style, alpha in ((first, "o-", 1.0), (second, "s--", 0.6))
        ]
        for k, (role, label, colour, metric, style, alpha) in enumerate(series):
            key = f"{role}_{metric}"
            # ± one standard error, where the rows have it (rows of older runs do not); each
            # series a little to the side, so that the bars do not hide each other.
            scored = [r for r in rows if key in r]  # FedAvg's LLM is scored at round 0 only
            errors = [r.get(f"{key}_stderr") for r in scored]
            (loss_ax if not is_share(metric) else ax).errorbar(
                [r["round"] + 0.03 * (k - (len(series) - 1) / 2) for r in scored],
                [r[key] for r in scored],
                yerr=errors if None not in errors else None,
                fmt=style,
                color=colour,
                alpha=alpha,
                capsize=3,
                label=f"{label} {metric}",
            )
        last = rows[-1]
        if last.get("llm_majority") is not None:  # what always giving one answer scores
            floor = last["llm_majority"]
            ax.axhline(floor, color="grey", ls=":", lw=1, label=f"majority-class floor {floor:.2f}")
        title = f"{last['task']}: {last['eval_questions']} {last['eval_split']} questions"
        title += "\n(bars: one standard error)"
        ylabel = first if first not in ("acc",) else "accuracy"
        ax.set(
            xlabel="round (0 = zero-shot)", ylabel=ylabel, ylim=(0, 1), xticks=rounds, title=title
        )
        handles, labels = ax.get_legend_handles_labels()
        if loss_ax is not ax:
            loss_ax.set(ylabel=f"{second} (dashed)")
            more = loss_ax.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.grid(alpha=0.3)
        ax.legend(
            handles, labels, fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2)
        )


_METRICS_NOTE = (
    "acc is multiple-choice log-likelihood accuracy and acc_norm its length-normalised form;"
    " rougeL is ROUGE-L F1 of the greedy generation, target_loss the reference answer's mean"
    " token loss, exact_match the share of generations equal to the reference."
)


def write_report(rows: list[dict[str, Any]], config: dict[str, Any], out_dir: Path) -> Path:
    plot_accuracy(rows, out_dir / "accuracy.png")
    roles = slm_roles(rows[-1])
    slms = ", ".join(f"`{r[4:-1]}`" for r in roles) if roles != ["slm"] else ""
    models = f"server LLM `{config['llm']['name']}`, " + (
        f"client SLMs in groups {slms} (one global adapter each)"
        if slms
        else f"client SLM `{config['slm']['name']}`"
    )
    setting = f"{config['num_clients']} clients, {config['rounds']} rounds, task `{config['task']}`"
    text = "\n".join(
        [
            "# FedCoLLM run",
            "",
            f"{setting}; {models}.",
            _METRICS_NOTE,
            "The SLM row is the global adapter after distillation.",
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
