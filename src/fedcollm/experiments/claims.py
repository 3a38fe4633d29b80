"""The paper's three claims, each with a verdict from this experiment's numbers.

1. Clients' SLMs gain over Standalone: FedCoLLM's clients' SLMs minus Standalone's.
2. The LLM reaches 97-99% of Centralized: FedCoLLM's LLM over Centralized's, as a ratio.
3. Communication is about 0.24% of the SLM: what the clients send, measured on the wire.

A verdict is "confirmed" when the 95% interval lies on the claim's side, "contradicted"
when it lies wholly on the other, and otherwise "not resolved at this power", with the
smallest difference this design detects (80% power) beside it.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fedcollm.evaluation.metrics import lower_is_better, shown
from fedcollm.experiments.significance import Comparison, claim_comparisons
from fedcollm.tracking.metrics import human_bytes, row_metrics
from fedcollm.tracking.plots import figure

PAPER_SHARE = 0.0024  # the paper's "about 0.24%"
LLM_SHARE = 0.97  # the low end of the paper's 97-99%
# The paper's SLMs, by the names a config would give them; communication on another model
# is not comparable with its 0.24%.
PAPER_SLMS = {"gpt2", "openai-community/gpt2", "facebook/opt-1.3b"}


def _points(value: float, metric: str) -> str:
    scale, digits, _ = shown(metric)
    return f"{scale * value:+.{digits}f}"


def _interval(low: float, high: float, metric: str) -> str:
    return f"[{_points(low, metric)}, {_points(high, metric)}]"


def _unit(metric: str) -> str:
    return shown(metric)[2]


def gain_verdict(c: Comparison | None) -> str:
    claim = "Clients' SLMs gain over Standalone"
    if c is None:
        return f"- **{claim}**: not tested (needs the standalone and fedcollm methods)."
    low, high = c.diff_ci
    gained, lost = (high < 0, low > 0) if lower_is_better(c.metric) else (low > 0, high < 0)
    said = f"{_points(c.diff, c.metric)}{_unit(c.metric)} {c.metric}, 95% CI " + _interval(
        low, high, c.metric
    )
    if gained:
        return f"- **{claim}**: confirmed, {said}."
    if lost:
        return f"- **{claim}**: contradicted, {said}."
    return (
        f"- **{claim}**: not resolved at this power, {said}; this design detects "
        f"{_points(c.detectable, c.metric).lstrip('+')}{_unit(c.metric)} or more (80% power)."
    )


def llm_verdict(c: Comparison | None) -> str:
    claim = "The LLM reaches 97-99% of Centralized"
    if c is None:
        return f"- **{claim}**: not tested (needs the centralized and fedcollm methods)."
    low, high = c.ratio_ci
    said = (
        f"FedCoLLM's LLM scores {100 * c.ratio:.1f}% of Centralized's {c.metric} "
        f"({100 * c.mean:.1f} against {100 * c.baseline_mean:.1f}), 95% CI "
        f"[{100 * low:.1f}%, {100 * high:.1f}%]"
    )
    if low >= LLM_SHARE:
        return f"- **{claim}**: confirmed, {said}."
    if high < LLM_SHARE:
        return f"- **{claim}**: contradicted, {said}."
    return (
        f"- **{claim}**: not resolved at this power, {said}; the interval spans 97%. "
        f"This design detects a difference of "
        f"{_points(c.detectable, c.metric).lstrip('+')}{_unit(c.metric)} or more."
    )


def communication_verdict(results: list[dict[str, Any]]) -> str:
    """What each client sent per round on the wire, against the full SLM's fp32 bytes."""
    claim = "Communication is about 0.24% of the SLM"
    rows = [
        row
        for r in results
        if r["method"] == "fedcollm"
        for row in r.get("history", [])
        if row.get("clients") and "adapter_params" in row
    ]
    if not rows:
        return f"- **{claim}**: not tested (needs a fedcollm run)."
    sent = [c.get("wire_bytes_sent", c["bytes_sent"]) for row in rows for c in row["clients"]]
    per_round = statistics.median(sent)
    adapter, slm = rows[0]["adapter_params"], rows[0]["slm_params"]
    full = 4 * slm  # the SLM in fp32, as the paper's full-model baseline sends it
    measured = per_round / full
    said = (
        f"each client sends {human_bytes(per_round)} per round (median over clients and "
        f"rounds, whole messages), {100 * measured:.3f}% of the full SLM's "
        f"{human_bytes(full)}; the adapter is {adapter:,} of the SLM's {slm:,} parameters "
        f"({100 * adapter / slm:.3f}%)"
    )
    slm_name = next((r["config"]["slm"]["name"] for r in results if r.get("config")), "")
    if slm_name.lower() not in PAPER_SLMS:
        # The share is the adapter's size over the model's: a property of the model and the
        # rank, so a figure of another model says nothing for or against the paper's.
        return (
            f"- **{claim}**: not comparable (the paper's SLMs are GPT-2 Small and OPT-1.3B; "
            f"this run's is {slm_name or 'another model'}), {said}."
        )
    # Only theta travels when the messages are the adapter's payload and little more.
    if per_round <= 1.1 * 4 * adapter and measured <= 2 * PAPER_SHARE:
        return f"- **{claim}**: confirmed, {said}."
    if measured > 2 * PAPER_SHARE:
        return f"- **{claim}**: contradicted for this SLM and LoRA, {said}."
    return f"- **{claim}**: not resolved, {said}; the messages carry more than the adapter."


def comparisons_table(comparisons: list[Comparison]) -> str:
    lines = [
        "| comparison | metric | seeds x questions | method | baseline | difference, 95% CI "
        "| exact test per seed (questions ours / theirs better, p) | detectable (80% power) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        scale = shown(c.metric)[0]
        mcnemar = "; ".join(f"seed {s}: {b}/{n}, p={p:.2g}" for s, b, n, p in c.mcnemar)
        kind = "" if c.paired else " (unpaired: no per-question predictions)"
        lines.append(
            f"| {c.label}{kind} | {c.metric} | {len(c.seeds)} x {c.questions} "
            f"| {scale * c.mean:.1f} | {scale * c.baseline_mean:.1f} "
            f"| {_points(c.diff, c.metric)} {_interval(*c.diff_ci, c.metric)} "
            f"| {mcnemar or '-'} | {_points(c.detectable, c.metric).lstrip('+')} |"
        )
    return "\n".join(lines)


def significance_section(results: list[dict[str, Any]], out: Path, prefix: str = "") -> str:
    """The report's section: per task, the verdicts, the paired comparisons and their plot
    (written to out/<prefix>significance_<task>.png)."""
    parts = []
    for task in sorted({r["task"] for r in results}):
        runs = [r for r in results if r["task"] == task]
        metric = row_metrics(runs[0])[0]
        comparisons = claim_comparisons(runs, task, metric)
        by_pair = {(c.role, c.method, c.baseline): c for c in comparisons}
        plot = out / f"{prefix}significance_{task}.png"
        if comparisons:
            plot_comparisons(comparisons, task, plot)
        parts += [
            f"### {task}",
            "",
            "Verdicts on the paper's claims:",
            "",
            gain_verdict(by_pair.get(("slm_clients", "fedcollm", "standalone"))),
            llm_verdict(by_pair.get(("llm", "fedcollm", "centralized"))),
            communication_verdict(runs),
            "",
            comparisons_table(comparisons) if comparisons else "No pair of methods to compare.",
            "",
        ]
        if comparisons:
            parts += [f"![paired differences]({plot.name})", ""]
    return "\n".join(parts)


def plot_comparisons(comparisons: list[Comparison], task: str, path: Path) -> None:
    """Each comparison's difference with its 95% interval (and each seed's own), and the
    smallest difference the design detects; the LLM's ratio beside it against 97-99%."""
    ratio = [c for c in comparisons if (c.role, c.baseline) == ("llm", "centralized")]
    with figure(
        path,
        1,
        2 if ratio else 1,
        figsize=(11 if ratio else 7.5, 0.7 * len(comparisons) + 2.2),
        dpi=110,
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 1.2]} if ratio else None,
        rect=(0, 0.5 / (0.7 * len(comparisons) + 2.2), 1, 1),  # room for the legend below
    ) as (fig, axes):
        ax = axes[0][0]
        for y, c in enumerate(reversed(comparisons)):
            scale = shown(c.metric)[0]
            low, high = (scale * v for v in c.diff_ci)
            ax.errorbar(
                scale * c.diff,
                y,
                xerr=[[scale * c.diff - low], [high - scale * c.diff]],
                fmt="o",
                color="tab:blue",
                capsize=4,
            )
            ax.scatter(
                [scale * d for d in c.seed_diffs],
                [y] * len(c.seed_diffs),
                s=12,
                color="tab:gray",
                zorder=3,
                label="one seed" if y == 0 else None,
            )
            ax.plot(
                [-scale * c.detectable, scale * c.detectable],
                [y, y],
                "|",
                color="tab:red",
                markersize=14,
                label="detectable (80% power)" if y == 0 else None,
            )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(comparisons)), [c.label for c in reversed(comparisons)], fontsize=8)
        metric = comparisons[0].metric
        ax.set(
            xlabel=f"difference in {metric}" + (" (points)" if shown(metric)[2] else ""),
            title=f"{task}: paired differences,\n95% bootstrap intervals",
        )
        ax.grid(alpha=0.3, axis="x")
        fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=2)
        if ratio:
            (c,) = ratio
            rax = axes[0][1]
            rax.axvspan(97, 99, color="tab:green", alpha=0.2, label="paper: 97-99%")
            low, high = (100 * v for v in c.ratio_ci)
            rax.errorbar(
                100 * c.ratio,
                0,
                xerr=[[100 * c.ratio - low], [high - 100 * c.ratio]],
                fmt="o",
                color="tab:blue",
                capsize=4,
            )
            rax.axvline(100, color="black", linewidth=0.8)
            rax.set(yticks=[], xlabel="FedCoLLM LLM / Centralized (%)", title="LLM ratio")
            rax.legend(fontsize=7)
