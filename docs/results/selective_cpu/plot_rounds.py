"""The figure of docs/RESULTS.md's "Selective distillation on vell_fruits": the global SLM's
and the LLM's accuracy per round, for each run here and seed 0's Algorithm 1 and kd_weight 0
runs of ../cross_cpu. Run from the repository root:
    .venv/bin/python docs/results/selective_cpu/plot_rounds.py
"""

import json
from pathlib import Path

from fedcollm.tracking.plots import figure

HERE = Path(__file__).parent
RUNS = {
    ("Algorithm 1 (selection none)", 0): HERE.parent / "cross_cpu" / "demo_s0",
    ("Algorithm 1 (selection none)", 1): HERE / "vell_fruits_s1_none",
    ("kd_weight 0 (FedAvg + D_a)", 0): HERE.parent / "cross_cpu" / "demo_s0_kd0",
    ("kd_weight 0 (FedAvg + D_a)", 1): HERE / "vell_fruits_s1_kd0",
    ("selection position", 0): HERE / "vell_fruits_s0_position",
    ("selection position", 1): HERE / "vell_fruits_s1_position",
}
STYLES = {"Algorithm 1": "C3", "kd_weight 0": "C0", "selection position": "C2"}

with figure(HERE / "accuracy_per_round.png", 1, 2, figsize=(10, 4), sharey=True) as (_, axes):
    for (label, seed), run in RUNS.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        colour = next(c for key, c in STYLES.items() if label.startswith(key))
        for ax, role in zip(axes, ("slm", "llm"), strict=True):
            ax.plot(
                [r["round"] for r in rows],
                [100 * r[f"{role}_acc"] for r in rows],
                "o-" if seed == 0 else "s--",
                color=colour,
                label=f"{label}, seed {seed}",
                alpha=0.85,
            )
    for ax, title in zip(axes, ("global SLM", "server LLM"), strict=True):
        ax.set_title(f"{title}: vell_fruits, 60 validation questions")
        ax.set_xlabel("round (0 = zero-shot)")
        ax.set_xticks([0, 1, 2])
        ax.axhline(25, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%); dotted: chance")
    axes[0].set_ylim(0, 102)
    axes[1].legend(fontsize=7, loc="upper left")
