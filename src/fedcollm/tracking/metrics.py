"""metrics.jsonl (one object per round, round 0 = zero-shot), the per-question predictions
of each round's evaluation (predictions/round_N.json), progress lines, the summary."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per round to `out_dir/metrics.jsonl` as soon as it is known."""

    def __init__(self, out_dir: Path, trackers=None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.path.write_text("")
        self.rows: list[dict[str, Any]] = []
        self.trackers = trackers  # TensorBoard, MLflow (tracking/trackers.py), if asked for

    def write_all(self, rows: list[dict[str, Any]]) -> None:
        """A resumed run's earlier rows: into the file again, not to the trackers again."""
        for row in rows:
            self.write(row, track=False)

    def write(self, row: dict[str, Any], track: bool = True) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if track and self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def predictions_path(out_dir: Path, server_round: int) -> Path:
    return out_dir / "predictions" / f"round_{server_round}.json"


def write_predictions(out_dir: Path, server_round: int, predictions: dict[str, Any]) -> None:
    """A round's per-question predictions by role (`llm`, `slm`, `clients` by partition)."""
    path = predictions_path(out_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(predictions))
    partial.rename(path)


def read_predictions(out_dir: Path, server_round: int) -> dict[str, Any]:
    """What `write_predictions` wrote for the round; {} for a run that kept none."""
    path = predictions_path(out_dir, server_round)
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def worth_reporting(step: int, total: int, reports: int = 5) -> bool:
    """True on about `reports` evenly spaced steps of `total`, always on the last one."""
    return step == total or step % max(total // reports, 1) == 0


def row_metrics(row: dict[str, Any]) -> list[str]:
    """The headline metric of a row and the one beside it (rows of older runs: acc, acc_norm)."""
    return row.get("metrics") or ["acc", "acc_norm"]


def slm_roles(row: dict[str, Any]) -> list[str]:
    """The global SLMs a row scores: "slm", or with clients of several SLMs one per group,
    "slm[<group>]" (algorithm/groups.py)."""
    found = [m.group(1) for k in row if (m := re.match(r"(slm\[.+\])_", k))]
    return list(dict.fromkeys(found)) or ["slm"]


def headline_scores(row: dict[str, Any]) -> dict[str, float]:
    """The LLM's and the global SLMs' headline metric, for Flower's own evaluation record."""
    metric = row_metrics(row)[0]
    keys = [f"{role}_{metric}" for role in ("llm", *slm_roles(row))]
    return {key: row[key] for key in keys if row.get(key) is not None}  # none: not scored


def progress_line(row: dict[str, Any], rounds: int) -> str:
    """One line per round while the run goes on."""
    parts = [f"round {row['round']}/{rounds}"]
    roles = slm_roles(row)
    if row["round"] > 0:
        parts.append(f"client loss {_fmt(row['client_train_loss'])}")
        if row.get("distill_llm_kd") is not None:
            slm_kd = " ".join(_fmt(row.get(f"distill_{role}_kd")) for role in roles)
            parts.append(f"KD(slm) {slm_kd} KD(llm) {_fmt(row['distill_llm_kd'])}")
    metric = row_metrics(row)[0]
    parts.append(
        " / ".join(
            f"{_label(role)} {metric} {_fmt(row.get(f'{role}_{metric}'))}"
            for role in ("llm", *roles)
        )
    )
    if "epsilon" in row:
        epsilon = "inf (no noise)" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        parts.append(f"epsilon {epsilon} at delta {row['delta']:g}")
    parts.append(f"{_fmt(row['seconds']['round'], '.1f')} s")
    return " | ".join(parts)


def _label(role: str) -> str:
    """ "LLM", "SLM", "SLM[<group>]": a role as a person reads it."""
    return role.upper() if "[" not in role else "SLM" + role[3:]


def _with_stderr(row: dict[str, Any], key: str) -> str:
    """A metric and its standard error, "0.467±0.065" (rows of older runs lack the latter)."""
    stderr = row.get(f"{key}_stderr")
    return _fmt(row.get(key)) + (f"±{stderr:.3f}" if stderr is not None else "")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The table printed at the end of a run: the task's metrics and communication per round."""
    first, second = row_metrics(rows[-1])[:2]
    roles = ["llm", *slm_roles(rows[-1])]
    width = max(11, *(len(_label(r)) + len(first) + 1 for r in roles))
    scored = "  ".join(f"{_label(r) + ' ' + first:>{width}} {second:>11}" for r in roles)
    head = (
        f"{'round':>5}  {scored}  "
        f"{'client loss':>11}  {'sent/client':>11} {'recv/client':>11}  {'seconds':>8}"
    )
    lines = [head, "-" * len(head)]
    total_bytes = 0
    for r in rows:
        clients = r.get("clients", [])
        sent = sum(c["bytes_sent"] for c in clients)
        received = sum(c["bytes_received"] for c in clients)
        total_bytes += sent + received
        per_client = max(len(clients), 1)
        scores = "  ".join(
            f"{_with_stderr(r, f'{role}_{first}'):>{width}} "
            f"{_with_stderr(r, f'{role}_{second}'):>11}"
            for role in roles
        )
        lines.append(
            f"{r['round']:>5}  {scores}  "
            f"{_fmt(r.get('client_train_loss')):>11}  "
            f"{human_bytes(sent / per_client) if clients else '-':>11} "
            f"{human_bytes(received / per_client) if clients else '-':>11}  "
            f"{_fmt(r['seconds']['round'], '.1f'):>8}"
        )
    lines.append("")
    last = rows[-1]
    lines.append(
        f"evaluated on {last['eval_questions']} {last['eval_split']} questions of {last['task']}"
        " (± one standard error, as lm-eval's *_stderr)"
    )
    if last.get("llm_majority") is not None:
        lines.append(f"majority-class floor: {last['llm_majority']:.3f}")
    if "epsilon" in last:
        spent = "infinite (no noise)" if last["epsilon"] is None else f"{last['epsilon']:.3g}"
        lines.append(
            f"client-level DP: epsilon {spent} at delta {last['delta']:g} after round "
            f"{last['round']} (docs/PRIVACY.md)"
        )
    lines += who_knows_more(rows)
    if "adapter_params" in last:
        lines.append(
            f"SLM adapter: {last['adapter_params']:,} parameters, "
            f"{100 * last['adapter_params'] / last['slm_params']:.3f}% of the SLM's "
            f"{last['slm_params']:,}; total traffic {human_bytes(total_bytes)}"
        )
    return "\n".join(lines)


def who_knows_more(rows: list[dict[str, Any]]) -> list[str]:
    """Before the first round and after the last: which model scores higher on the task and
    which has the lower loss on D_a's answers. FedCoLLM's premise is an LLM that knows more;
    where it knows less, distilling it into the SLM pulls the SLM toward a weaker teacher."""
    from fedcollm.evaluation.metrics import lower_is_better

    scored = [
        r for r in rows if "llm_aux_loss" in r and r.get(f"llm_{row_metrics(r)[0]}") is not None
    ]
    if not scored:
        return []
    metric = row_metrics(scored[-1])[0]
    lines = ["who knows more (the task's score; the mean answer loss on D_a, lower is better):"]
    for row in scored[:1] + scored[1:][-1:]:  # the first and the last (once if one)
        when = "round 0 (zero-shot)" if row["round"] == 0 else f"after round {row['round']}"
        for role in slm_roles(row):
            llm, slm = row[f"llm_{metric}"], row[f"{role}_{metric}"]
            name = _label(role)
            higher = "LLM" if (llm < slm if lower_is_better(metric) else llm > slm) else name
            slm_loss = row[f"{role}_aux_loss"]
            lower_loss = "LLM" if row["llm_aux_loss"] < slm_loss else name
            if llm == slm:
                verdict = f"the same score, the {lower_loss} has the lower D_a loss"
            elif higher == lower_loss:
                verdict = f"the {higher} on both"
            else:
                verdict = f"the {higher} scores higher, the {lower_loss} has the lower D_a loss"
            lines.append(
                f"  {when}: LLM {metric} {_fmt(llm)}, D_a loss {_fmt(row['llm_aux_loss'])} | "
                f"{name} {metric} {_fmt(slm)}, D_a loss {_fmt(slm_loss)} -> {verdict}"
            )
    return lines
